"""Which images-per-batch (and layout) the Table 2 miniature should run with on this GPU (TABLE_BATCH=auto).

``ablate --images-per-batch N`` trains on the same 48,000 images in 48,000 / N steps (linear
scaling rule): by default (``ablations.MINI_SCHEDULE``) 3000 steps of 16, and 1500 steps of 32
where this script picks 32. A table keeps one N for all its trainings, over every lease, so the
choice is made once:

1. If the committed results already hold trainings, their N, read from the trainings' records
   (the table refuses to mix sizes); else the N of the trainings carried into this lease
   (``--carried``: their checkpoints), which the lease must resume as they ran.
2. Otherwise, of the sizes up to ``--max-batch`` (32), the smallest N whose whole schedule
   ``bench/mini_step.py --json`` priced within
   ``--tolerance`` (1.2) of the cheapest, summed over the runs it timed (one training alone;
   eight at once share the GPU alike). Smallest, because fewer, larger steps cost AP: on the
   CPU, the same 8,000 images in steps of 16 instead of 4 gave C4 1.5 mask AP less
   (docs/training.md, "Fewer, larger steps"). A larger batch has to buy real time. Not above
   32 unless asked (``TABLE_BATCH=64``): the same 8,000 images in 125 steps of 64 instead of 500
   of 16 gave C4 3.9 mask AP instead of 14.8. Too few updates: its loss ended where the
   16-image run's was after ~150 steps. The linear scaling rule does not hold that far here.
   In 250 steps of 32 they gave 11.2 (two seeds): on those images the AP follows the number
   of steps and flattens past ~500. The GPU table trains on 48,000 images: 3000 steps of 16 by
   default, 1500 of 32 where this script picks 32 (it picks 16 or 32 at run time, of the sizes
   mini_step timed: bench/gpu_session.sh times 16, 32, 64 and 64 is above ``--max-batch``).
   Both are past that point; whether 32 then costs as little as the curve suggests is not
   measured.
   A size is a candidate only if ``--jobs`` trainings of it fit in the GPU's memory together:
   ``jobs x heaviest peak x HEAVIER <= FILL x the device's memory``, with the peaks mini_step
   measured (``max_memory_allocated``) for the runs it timed. ``HEAVIER``: the table's heaviest
   run needs a little more than those (``bench/step_memory.py``: the C4 rows that max-pool
   their bins keep more for the backward pass). ``FILL``: each process also holds a CUDA context
   and the caching allocator's slack.
3. With neither, nothing: ``ablate`` keeps the schedule's own 16.

``--channels-last-at N`` answers the layout question the same way (yes / no): the committed
trainings' layout, else NHWC where ``mini_step --channels-last`` timed it at least 5 % faster
at N images, else NCHW.

Prints the number, or nothing.

    python bench/pick_batch.py --mini-step runs/gpu_session/mini_step.json \
        --results results/table2_miniature.json --jobs 8
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


# the heaviest table run's peak over r50_c4's: 1.03 per image on the CPU (bench/step_memory.py,
# fp32: r50_c4_roialign_max and r50_c4_roiwarp_max); the rest is margin for bf16's other mix
HEAVIER = 1.15
FILL = 0.85  # the share of the GPU's memory the trainings' tensors may take together
MAX_BATCH = 32  # 4x fewer steps at 64 collapsed the AP on the CPU (docstring); 1500 steps of 32 may not


def trained_with(results: str | Path | None, key: str, default=None):
    """The ``train_config[key]`` every training in the results JSON ran with (``default`` for a
    record from before the key existed); with no finished training, the value of the last session
    that left trainings to resume (a first lease may finish none); else None. A table keeps one."""
    if not results or not Path(results).is_file():
        return None
    summary = json.loads(Path(results).read_text())
    values = {record["train_config"].get(key, default) for run in summary.get("runs", {}).values()
              for record in run.get("seeds", {}).values()}
    if len(values) > 1:
        raise ValueError(f"{results} mixes {key} {sorted(values)}; a table keeps one")
    if values:
        return values.pop()
    # no training finished yet, but a session may have left trainings to resume: they keep its value
    sessions = [s for s in summary.get("sessions", []) if s.get("left") and key in s]
    return sessions[-1][key] if sessions else None


def _resumed_member(tar) -> str:
    """The checkpoint in a carried training's tar that a resume continues from: the one its
    ``last_checkpoint`` names, or without one (killed between its first checkpoint's rename and
    the pointer's) the highest-numbered ``model_NNNNNNN.pth``, as ``checkpoint.newest_checkpoint``."""
    import re

    names = tar.getnames()
    pointer = next((n for n in names if n.endswith("/last_checkpoint")), None)
    if pointer is not None:
        return f"{pointer.rsplit('/', 1)[0]}/{tar.extractfile(pointer).read().decode().strip()}"
    saved = sorted((n for n in names if re.fullmatch(r"model_\d+\.pth", n.rsplit("/", 1)[-1])),
                   key=lambda n: int(n.rsplit("_", 1)[1].split(".")[0]))
    if not saved:
        raise ValueError("no last_checkpoint and no model_NNNNNNN.pth in it")
    return saved[-1]


def carried_with(carry: str | Path | None, key: str, default=None):
    """The ``key`` of the schedule the trainings carried in ``carry`` (``table2_train_*.tar``, as
    bench/gpu_session.sh packs them) ran with; None without any readable one. A lease that
    resumes them must train as they did (gpu_session.sh drops a training of another schedule),
    also when the report that recorded it was not committed: their checkpoints say it too."""
    if not carry or not Path(carry).is_dir():
        return None
    import io
    import tarfile

    values = set()
    for path in sorted(Path(carry).glob("table2_train_*.tar")):
        try:
            with tarfile.open(path) as tar:
                data = tar.extractfile(_resumed_member(tar)).read()
            import torch

            values.add(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)["config"].get(key, default))
        except Exception as error:  # unreadable: gpu_session.sh drops it anyway
            print(f"pick_batch: {path} unreadable ({type(error).__name__}: {error})", file=sys.stderr)
    if len(values) > 1:
        raise ValueError(f"the trainings in {carry} mix {key} {sorted(values, key=str)}; a table keeps one")
    return values.pop() if values else None


def fits(by_run: list[dict], n: int, device_mib: float | None, jobs: int, peak: str = "peak_mib") -> bool:
    """Whether ``jobs`` trainings of ``n`` images fit on the device, by mini_step's peaks
    (``peak``: NCHW's, or ``"channels_last_peak_mib"``; unknown peaks, e.g. a CPU's timings, fit)."""
    peaks = [t[n][peak] for t in by_run if t[n].get(peak) is not None]
    if not device_mib or not peaks:
        return True
    return jobs * max(peaks) * HEAVIER <= FILL * device_mib


def pick_batch(mini_step: str | Path | None, results: str | Path | None, tolerance: float = 1.2,
               jobs: int = 8, max_batch: int = MAX_BATCH, carried: str | Path | None = None) -> int | None:
    """The images per batch for the table: the committed one, else that of the trainings
    ``carried`` in, else the smallest timed within ``tolerance`` of the cheapest schedule among
    those up to ``max_batch`` whose ``jobs`` trainings fit in memory, else None."""
    committed = trained_with(results, "images_per_batch")
    if committed is None:
        committed = carried_with(carried, "images_per_batch")
    if committed is not None:
        return committed
    if mini_step and Path(mini_step).is_file():
        timings = json.loads(Path(mini_step).read_text())
        if timings["runs"]:
            by_run = [{int(n): t for n, t in by_size.items()} for by_size in timings["runs"].values()]
            common = {n for n in set.intersection(*(set(t) for t in by_run)) if n <= max_batch}
            usable = {n for n in common if fits(by_run, n, timings.get("device_mib"), jobs)}
            if common and not usable:
                smallest = min(common)
                print(f"pick_batch: {jobs} trainings do not fit in {timings['device_mib']} MiB at any timed size; "
                      f"taking the smallest, {smallest}: lower --jobs", file=sys.stderr)
                return smallest
            if usable:
                cost = {n: sum(t[n]["schedule_s"] for t in by_run) for n in usable}
                return min(n for n in usable if cost[n] <= tolerance * min(cost.values()))
    return None


def pick_channels_last(mini_step: str | Path | None, results: str | Path | None, batch: int | None,
                       gain: float = 0.95, carried: str | Path | None = None, jobs: int = 8) -> bool:
    """Whether the table trains with NHWC convolutions (``ablate --channels-last``): as the
    committed trainings did, else where ``mini_step --channels-last`` timed the summed step at
    ``batch`` images under ``gain`` times NCHW's and ``jobs`` NHWC trainings fit in memory by
    their own peaks (:func:`pick_batch` checked NCHW's), else not. Both layouts compute the same
    numbers up to summation order; a table keeps one so that its timings compare."""
    committed = trained_with(results, "channels_last", default=False)
    if committed is None:
        committed = carried_with(carried, "channels_last", default=False)
    if committed is not None:
        return committed
    if batch and mini_step and Path(mini_step).is_file():
        timings = json.loads(Path(mini_step).read_text())
        timed = [by_size.get(str(batch), {}) for by_size in timings["runs"].values()]
        if timed and all("channels_last_ms_per_step" in t for t in timed):
            faster = (sum(t["channels_last_ms_per_step"] for t in timed)
                      < gain * sum(t["ms_per_step"] for t in timed))
            return faster and fits([{batch: t} for t in timed], batch, timings.get("device_mib"), jobs,
                                   "channels_last_peak_mib")
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mini-step", default=None, help="bench/mini_step.py --json output")
    parser.add_argument("--results", default=None, help="the table's results JSON (ablate --out)")
    parser.add_argument("--tolerance", type=float, default=1.2,
                        help="take the smallest batch whose schedule costs at most this times the cheapest")
    parser.add_argument("--carried", default=None, metavar="DIR",
                        help="the trainings carried into this lease (gpu_session.sh's .carry): "
                             "without committed trainings, their batch and layout")
    parser.add_argument("--jobs", type=int, default=8, help="trainings at once (ablate --jobs)")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH,
                        help="take no larger size (fewer, larger steps cost AP; see above)")
    parser.add_argument("--channels-last-at", type=int, default=None, metavar="N",
                        help="instead: print yes if the table should train channels-last at N images, else no")
    args = parser.parse_args(argv)
    if args.channels_last_at is not None:
        print("yes" if pick_channels_last(args.mini_step, args.results, args.channels_last_at,
                                               carried=args.carried, jobs=args.jobs) else "no")
        return 0
    batch = pick_batch(args.mini_step, args.results, args.tolerance, args.jobs, args.max_batch, args.carried)
    if batch is not None:
        print(batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
