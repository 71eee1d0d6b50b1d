"""Which images-per-batch the Table 2 miniature should run with on this GPU (TABLE_BATCH=auto).

``ablate --images-per-batch N`` trains on the same 48,000 images in 48,000 / N steps (linear
scaling rule). A table keeps one N for all its trainings, over every lease, so the choice is
made once:

1. If the committed results already hold trainings, their N (the table refuses to mix sizes).
2. Otherwise the N for which ``bench/mini_step.py --json`` priced the whole schedule cheapest,
   summed over the runs it timed (one training alone; eight at once share the GPU alike).
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


def pick_batch(mini_step: str | Path | None, results: str | Path | None) -> int | None:
    """The images per batch for the table: the committed one, else the cheapest timed, else None."""
    if results and Path(results).is_file():
        schedules = json.loads(Path(results).read_text()).get("schedules", [])
        sizes = {plan["images_per_batch"] for plan in schedules}
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
                return min(sorted(common), key=lambda n: sum(t[n] for t in timed))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mini-step", default=None, help="bench/mini_step.py --json output")
    parser.add_argument("--results", default=None, help="the table's results JSON (ablate --out)")
    args = parser.parse_args(argv)
    batch = pick_batch(args.mini_step, args.results)
    if batch is not None:
        print(batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
