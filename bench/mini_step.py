"""Time one training step of a Table 2 miniature run alone: what the table's schedule costs.

The table is 45 trainings of ``MINI_SCHEDULE["max_iter"]`` steps of 16 images each, so its GPU
budget is set by this one number. A GPU lease is short, so this bench measures it in seconds,
with no dataset and no pre-training. It builds each run's model as ``ablate`` does
(``ablations.model_config``) and random shapes as ``bench/dispatch_counts.py`` makes them (192 px
images, 3-6 boxes with their masks, the model upsampling to the table's 384 px). It then times
forward, backward and an SGD step under the schedule's autocast, one process, the GPU
synchronised around each step. ``--profile N`` adds where the step's time goes (torch.profiler:
the GPU's busy share, the host-device round trips, the top kernels). A step whose GPU is busy
for a small share of its wall time is bound by the host, and more trainings at once can share
the GPU. A step that keeps the GPU busy will not get faster that way.

With several ``--images`` sizes it also prints what the whole schedule would cost in batches of
each size (``ablate --images-per-batch``: the same 48,000 images, 48,000 / N steps) and that
against 16 images per batch in the same run. Where a step's cost is launches and host work, a
batch of 64 costs little more than one of 16 and the schedule gets up to 4x shorter. On a GPU it
also prints each size's peak memory (``max_memory_allocated``): the table runs eight trainings
at once, and ``bench/pick_batch.py`` takes no size whose eight do not fit, and the host-device
synchronisations of one step (``torch.cuda.set_sync_debug_mode``: each makes the host wait for
the GPU, and a CPU count cannot see the blocking copies among them). ``--channels-last`` times
each step again with NHWC convolutions (``ablate --channels-last``), the layout cuDNN's bf16
convolutions run natively, where this PyTorch's GroupNorm keeps that layout on the device (CUDA's
did not before 2026: the miniature's GN layers would convert back at every layer).

The sizes run in turn for every run (size-major), and the JSON is rewritten after each timing:
a bench cut off by its time cap keeps every run's smaller sizes. A size that runs out of GPU
memory is left out, with every larger one of that run.

    python bench/mini_step.py                        # r50_c4 and r50_fpn, on a CUDA GPU
    python bench/mini_step.py --images 16,32,64      # the same, at 3 batch sizes
    python bench/mini_step.py --runs r50_c4 --profile 3
    python bench/mini_step.py --images 64 --channels-last   # NCHW against NHWC
    python bench/mini_step.py --quick                # anywhere, seconds (numbers mean nothing)
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dispatch_counts import synthetic_batch  # noqa: E402
from train_infer import profile_steps, timed  # noqa: E402

from mrcnn_edu import ablations  # noqa: E402
from mrcnn_edu.ablations_report import write_json_atomic  # noqa: E402
from mrcnn_edu.device import count_syncs  # noqa: E402
from mrcnn_edu.engine import AMP_DTYPES  # noqa: E402
from mrcnn_edu.model import MaskRCNN  # noqa: E402


def step_fn(run: str, images: list[torch.Tensor], targets: list[dict], device: torch.device, amp: str,
            input_size: int | None, channels_last: bool = False):
    """One training step of ``run``'s miniature model (built with seed 0) on the given batch."""
    torch.manual_seed(0)
    model = MaskRCNN(ablations.model_config(ablations.RUNS[run], input_size=input_size)).to(device).train()
    if channels_last:  # as engine.train does with TrainConfig.channels_last
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)  # small: no divergence
    dtype = AMP_DTYPES[amp]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    step.model, step.optimizer = model, optimizer  # for bench/step_memory.py's accounting
    return step


def group_norm_keeps_channels_last(device: torch.device) -> bool:
    """Whether GroupNorm on ``device`` returns an NHWC input as NHWC. The CPU's does; CUDA's made
    its output NCHW until PyTorch added NHWC kernels in 2026 (pytorch/pytorch#191945)."""
    x = torch.randn(2, 8, 4, 4, device=device).contiguous(memory_format=torch.channels_last)
    return torch.nn.functional.group_norm(x, 4).is_contiguous(memory_format=torch.channels_last)


def syncs_per_step(step, device: torch.device) -> int | None:
    """How many times one call of ``step`` makes the host wait for the GPU
    (``mrcnn_edu.device.count_syncs``), or None off CUDA."""
    return count_syncs(step)[1] if device.type == "cuda" else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="r50_c4,r50_fpn", help="comma-separated ablations.RUNS names")
    parser.add_argument("--images", default=str(ablations.MINI_SCHEDULE["images_per_batch"]),
                        help="images per batch; comma-separated for several (e.g. 16,32,64)")
    parser.add_argument("--size", type=int, default=ablations.MINI_IMAGE_SIZE, help="the images' side")
    parser.add_argument("--input-size", type=int, default=None,
                        help=f"the model's shorter side (default {ablations.MINI_INPUT_SIZE}, the table's)")
    parser.add_argument("--amp", choices=list(AMP_DTYPES), default=ablations.MINI_SCHEDULE["amp"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="then profile STEPS steps of each run (torch.profiler)")
    parser.add_argument("--channels-last", action="store_true",
                        help="also time each step with NHWC convolutions (ablate --channels-last) "
                             "and print the ratio")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: 2 images of 64 px, 1 step")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write {run: {images: {ms_per_step, schedule_s, peak_mib}}} there "
                             "(gpu_session.sh's TABLE_BATCH=auto reads it)")
    args = parser.parse_args(argv)
    try:
        sizes = sorted({int(n) for n in args.images.split(",")})  # ascending: an OOM skips the larger ones
    except ValueError:
        parser.error(f"--images: comma-separated whole numbers, got {args.images!r}")
    if min(sizes) < 1:
        parser.error(f"--images must be >= 1, got {args.images!r}")
    if args.quick:
        args.device, args.size, args.input_size = "cpu", 64, 64
        sizes = [2, 4][:len(sizes)]
        args.warmup, args.iters, args.amp = 0, 1, "none"
    device = torch.device(args.device)
    runs = args.runs.split(",")
    unknown = [r for r in runs if r not in ablations.RUNS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {sorted(ablations.RUNS)}")
    all_images, all_targets = synthetic_batch(max(sizes), args.size, torch.Generator().manual_seed(0))
    all_images = [image.to(device) for image in all_images]
    all_targets = [{k: v.to(device) for k, v in t.items()} for t in all_targets]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    device_mib = (round(torch.cuda.get_device_properties(device).total_memory / 2**20)
                  if device.type == "cuda" else None)
    input_size = args.input_size or ablations.MINI_INPUT_SIZE
    schedule = ablations.MINI_SCHEDULE
    total = schedule["max_iter"] * schedule["images_per_batch"]  # the images one training sees
    print(f"one miniature training step alone on {name}: {','.join(map(str, sizes))} images of {args.size} px, "
          f"model input {input_size} px, amp={args.amp}, median of {args.iters} after {args.warmup} warm-up")
    results: dict[str, dict[int, dict]] = {}
    nhwc_kept = group_norm_keeps_channels_last(device)
    if args.channels_last and not nhwc_kept:
        print(f"channels last: not timed. This PyTorch's GroupNorm on {device.type} returns NCHW, so every "
              f"GroupNorm of the miniature (GN bodies and FPN) would convert its NHWC input back "
              f"(pytorch/pytorch#111824): NHWC convolutions cannot pay here", flush=True)

    def save() -> None:  # after each timing, atomically: a run cut off later keeps what was timed
        if args.json:
            write_json_atomic(Path(args.json), {"device": name, "device_mib": device_mib, "images": sizes,
                                                "group_norm_keeps_channels_last": nhwc_kept, "runs": results})

    # Size-major: when the phase's time cap cuts the bench off, every run has the smaller sizes,
    # which is what bench/pick_batch.py compares (the sizes timed for all runs).
    first: dict[str, tuple[int, float]] = {}
    out_of_memory: set[str] = set()
    for n in sizes:  # the first n of one set: a larger batch holds the smaller one
        for run in runs:
            if run in out_of_memory:  # a larger batch of it will not fit either
                continue
            if device.type == "cuda":  # this size's own peak, not an earlier one's
                torch.cuda.reset_peak_memory_stats(device)
            try:
                step = step_fn(run, all_images[:n], all_targets[:n], device, args.amp, args.input_size)
                ms = statistics.median(timed(step, device, args.warmup, args.iters))
            except torch.cuda.OutOfMemoryError:
                step = None
                out_of_memory.add(run)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                print(f"{run:22s} {n:3d} images: out of GPU memory; not timed, nor any larger batch of it", flush=True)
                continue
            # the tensors one training of this size holds at most (pick_batch: do --jobs of them fit?)
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            syncs = syncs_per_step(step, device)
            steps_needed = round(total / n)
            seconds = ms * steps_needed / 1000
            first.setdefault(run, (n, seconds))
            against = f"; {seconds / first[run][1]:.2f}x the time with {first[run][0]}" if n != first[run][0] else ""
            results.setdefault(run, {})[n] = {"ms_per_step": round(ms, 2), "schedule_s": round(seconds, 1),
                                              "peak_mib": None if peak is None else round(peak, 1),
                                              "syncs_per_step": syncs}
            save()
            memory = f"; peak {peak / 1024:.1f} GiB" if peak is not None else ""
            waits = f"; {syncs} host-device syncs" if syncs is not None else ""
            print(f"{run:22s} {n:3d} images {ms:8.1f} ms/step {1000 * n / ms:7.0f} images/s; "
                  f"one training ({steps_needed} steps of {n}) alone: {seconds:.0f} s{against}{memory}{waits}",
                  flush=True)
            del step
            if args.channels_last and nhwc_kept:  # the same step with NHWC convolutions, right after
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    step = step_fn(run, all_images[:n], all_targets[:n], device, args.amp, args.input_size, True)
                    nhwc = statistics.median(timed(step, device, args.warmup, args.iters))
                except torch.cuda.OutOfMemoryError:  # NCHW fitted: keep its figures, go on
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    print(f"{run:22s} {n:3d} images, channels last: out of GPU memory; not timed", flush=True)
                    continue
                del step
                nhwc_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
                results[run][n]["channels_last_ms_per_step"] = round(nhwc, 2)
                results[run][n]["channels_last_peak_mib"] = None if nhwc_peak is None else round(nhwc_peak, 1)
                save()
                print(f"{run:22s} {n:3d} images, channels last: {nhwc:8.1f} ms, {nhwc / ms:.2f}x the time "
                      f"of NCHW", flush=True)
    # Profiled only after every timing: a profiler session leaves CUPTI's callbacks in the process
    # (pytorch/pytorch#144455), which slows the launch-bound steps timed after it.
    for n in sizes if args.profile else ():
        for run in runs:
            if n in results.get(run, {}):
                step = step_fn(run, all_images[:n], all_targets[:n], device, args.amp, args.input_size)
                profile_steps(step, device, args.profile, f"{run}, {n} images")
                del step
    return 0


if __name__ == "__main__":
    sys.exit(main())
