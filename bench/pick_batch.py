"""Which images-per-batch the Table 2 miniature should run with on this GPU (TABLE_BATCH=auto).

``ablate --images-per-batch N`` trains on the same 48,000 images in 48,000 / N steps (linear
scaling rule). A table keeps one N for all its trainings, over every lease, so the choice is
made once:

1. If the committed results already hold trainings, their N, read from the trainings' records
   (the table refuses to mix sizes).
2. Otherwise the smallest N whose whole schedule ``bench/mini_step.py --json`` priced within
   ``--tolerance`` (1.2) of the cheapest, summed over the runs it timed (one training alone;
   eight at once share the GPU alike). Smallest, because fewer, larger steps cost AP: on the
   CPU, the same 8,000 images in steps of 16 instead of 4 gave C4 1.5 mask AP less
   (docs/training.md, "Fewer, larger steps"). A larger batch has to buy real time.
3. With neither, nothing: ``ablate`` keeps the schedule's own 16.

Prints the number, or nothing.

    python bench/pick_batch.py --mini-step runs/gpu_session/mini_step.json \
        --results results/table2_miniature.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def pick_batch(mini_step: str | Path | None, results: str | Path | None, tolerance: float = 1.2) -> int | None:
    """The images per batch for the table: the committed one, else the smallest timed within
    ``tolerance`` of the cheapest schedule, else None."""
    if results and Path(results).is_file():
        runs = json.loads(Path(results).read_text()).get("runs", {})
        sizes = {record["train_config"]["images_per_batch"] for run in runs.values()
                 for record in run.get("seeds", {}).values()}
        if len(sizes) > 1:
            raise ValueError(f"{results} mixes batch sizes {sorted(sizes)}; a table keeps one")
        if sizes:
            return sizes.pop()
    if mini_step and Path(mini_step).is_file():
        runs = json.loads(Path(mini_step).read_text())["runs"]
        if runs:
            timed = [{int(n): t["schedule_s"] for n, t in by_size.items()} for by_size in runs.values()]
            common = set.intersection(*(set(t) for t in timed))
            if common:
                cost = {n: sum(t[n] for t in timed) for n in common}
                return min(n for n in common if cost[n] <= tolerance * min(cost.values()))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mini-step", default=None, help="bench/mini_step.py --json output")
    parser.add_argument("--results", default=None, help="the table's results JSON (ablate --out)")
    parser.add_argument("--tolerance", type=float, default=1.2,
                        help="take the smallest batch whose schedule costs at most this times the cheapest")
    args = parser.parse_args(argv)
    batch = pick_batch(args.mini_step, args.results, args.tolerance)
    if batch is not None:
        print(batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
