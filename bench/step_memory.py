"""Peak memory of one Table 2 miniature training step, per run and images per batch.

The table trains ``--jobs`` (8) runs at once on one GPU, so a batch size is only usable if eight
trainings of it fit in the GPU's memory together. This bench measures what one step needs: each
(run, images) pair in a fresh process, which builds the run's model as ``ablate`` does
(``ablations.model_config``), takes one SGD step (so momentum buffers exist), then measures a
second one. What it reports is the most bytes of tensors alive at once during that step:

- on a CUDA GPU, ``torch.cuda.max_memory_allocated`` (the caching allocator reserves somewhat
  more, and each process holds a CUDA context besides);
- on the CPU, the same quantity counted exactly by :class:`LiveTensors`: the bytes of every
  storage an op creates, until it is freed, plus what was alive before the step (parameters,
  gradients, momentum, the batch). A process's resident memory would also count Python, PyTorch
  and what glibc's allocator keeps, and moves with it.

``--amp bf16`` on the CPU runs the step under CPU autocast, whose op lists are close to but not
the same as CUDA's: an estimate of the GPU's figure, not a measurement. The images are
``bench/dispatch_counts.py``'s random shapes (192 px, 3-6 boxes with masks, upsampled to the
table's 384 px), as ``bench/mini_step.py`` times them.

    python bench/step_memory.py                               # every run, 2 and 8 images, CPU fp32
    python bench/step_memory.py --runs r50_c4,r50_fpn --images 16,64   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mrcnn_edu import ablations  # noqa: E402
from mrcnn_edu.engine import AMP_DTYPES  # noqa: E402


class LiveTensors(TorchDispatchMode):
    """Counts the bytes of tensor storage alive, and their peak, while it is active.

    Every storage an op returns is counted once, until the storage itself is freed (a weak
    reference's callback). Storages outlive their Python tensors when autograd saves them for
    the backward pass, and views share their base's storage: both are counted as the allocator
    sees them. Storages made before the mode started are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.alive: set[int] = set()
        self.bytes = 0
        self.peak = 0

    def _freed(self, key: int, nbytes: int) -> None:
        self.alive.discard(key)
        self.bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.alive:
                    self.alive.add(key)
                    self.bytes += nbytes
                    self.peak = max(self.peak, self.bytes)
                    weakref.finalize(storage, self._freed, key, nbytes)
        return out


def storage_bytes(tensors) -> int:
    """The bytes of the distinct storages behind ``tensors``."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
                if isinstance(t, torch.Tensor)}
    return sum(storages.values())


def measure(run: str, images: int, device: str, amp: str, size: int, input_size: int | None) -> dict:
    """Peak tensor memory (MiB) of ``run``'s second training step on ``images`` images, here."""
    from dispatch_counts import synthetic_batch
    from mini_step import step_fn

    torch.set_num_threads(1)
    dev = torch.device(device)
    batch, targets = synthetic_batch(images, size, torch.Generator().manual_seed(0))
    batch = [image.to(dev) for image in batch]
    targets = [{k: v.to(dev) for k, v in t.items()} for t in targets]
    step = step_fn(run, batch, targets, dev, amp, input_size)
    step()  # the optimizer's momentum buffers exist from here on
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        torch.cuda.synchronize(dev)
        return {"peak_mib": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1),
                "reserved_mib": round(torch.cuda.max_memory_reserved(dev) / 2**20, 1)}
    params = list(step.model.parameters()) + list(step.model.buffers())
    before = storage_bytes(params + [p.grad for p in params]
                           + [v for state in step.optimizer.state.values() for v in state.values()]
                           + batch + [v for t in targets for v in t.values()])
    # The old gradients are freed by zero_grad before the new ones exist; counting both (as
    # here) overstates the peak by one set of gradients, a few MB for the miniature models.
    with LiveTensors() as live:
        step()
    return {"peak_mib": round((before + live.peak) / 2**20, 1), "before_step_mib": round(before / 2**20, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="all", help="comma-separated ablations.RUNS names, or all")
    parser.add_argument("--images", default="2,8", help="comma-separated images per batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=list(AMP_DTYPES), default=None,
                        help="default: the schedule's on a GPU, none (fp32) on the CPU")
    parser.add_argument("--size", type=int, default=ablations.MINI_IMAGE_SIZE, help="the images' side")
    parser.add_argument("--input-size", type=int, default=None,
                        help=f"the model's shorter side (default {ablations.MINI_INPUT_SIZE}, the table's)")
    parser.add_argument("--jobs", type=int, default=ablations.DEFAULT_JOBS,
                        help="trainings at once: the table prints what that many of each need")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the measurements there")
    parser.add_argument("--child", nargs=2, metavar=("RUN", "IMAGES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    amp = args.amp or (ablations.MINI_SCHEDULE["amp"] if args.device.startswith("cuda") else "none")
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.device, amp, args.size,
                                 args.input_size)))
        return 0
    runs = list(ablations.RUNS) if args.runs == "all" else args.runs.split(",")
    unknown = [r for r in runs if r not in ablations.RUNS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {sorted(ablations.RUNS)}")
    try:
        sizes = sorted({int(n) for n in args.images.split(",")})
    except ValueError:
        parser.error(f"--images: comma-separated whole numbers, got {args.images!r}")
    if sizes[0] < 1:
        parser.error(f"--images must be >= 1, got {args.images!r}")
    what = ("max_memory_allocated" if args.device.startswith("cuda") else "counted op by op on the CPU")
    print(f"peak tensor memory of one training step, MiB ({what}), amp={amp}, images of {args.size} px")
    print(f"{'run':22s} " + " ".join(f"{n:>8d}" for n in sizes) + "   MiB/image" +
          (f"   x{args.jobs} at {sizes[-1]}" if args.jobs > 1 else ""))
    results: dict[str, dict] = {}
    for run in runs:
        peaks = {}
        for n in sizes:
            command = [sys.executable, __file__, "--child", run, str(n), "--device", args.device, "--amp", amp,
                       "--size", str(args.size)]
            if args.input_size:
                command += ["--input-size", str(args.input_size)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:  # e.g. out of memory: say so, keep the other sizes
                print(f"{run} at {n} images failed (rc {done.returncode}): {done.stderr.strip()[-300:]}",
                      file=sys.stderr)
                continue
            peaks[n] = json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]
        per_image = ((peaks[sizes[-1]] - peaks[sizes[0]]) / (sizes[-1] - sizes[0])
                     if len(sizes) > 1 and sizes[0] in peaks and sizes[-1] in peaks else None)
        results[run] = {"peak_mib": peaks, "mib_per_image": None if per_image is None else round(per_image, 1)}
        cells = " ".join(f"{peaks[n]:8.0f}" if n in peaks else f"{'failed':>8s}" for n in sizes)
        slope = f"{per_image:12.1f}" if per_image is not None else f"{'-':>12s}"
        together = (f"   {args.jobs * peaks[sizes[-1]] / 1024:8.1f} GiB"
                    if args.jobs > 1 and sizes[-1] in peaks else "")
        print(f"{run:22s} {cells}{slope}{together}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"device": args.device, "amp": amp, "images": sizes,
                                                   "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
