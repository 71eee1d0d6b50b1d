"""The paper's Table 2 claims judged on the CPU probes' per-seed numbers (docs/training.md).

``bench/miniature_probe.py`` trains one run at a time on the CPU (no GPU table yet); each run's
log ends with a ``RESULT`` line holding its box and mask AP. Those numbers are copied below, one
entry per seed, exactly as docs/training.md's tables print them (one decimal), and put through
``ablations_report.judge_claims`` -- the same test the GPU table's report applies -- so every
verdict docs/training.md and notebook 09 quote comes from this command::

    python bench/cpu_probe_claims.py

The probes ran in two designs that must not be compared with each other: C4 / C5 at 384 px
(pre-trained on 128 px images) and FPN at 192 px (64 px images). Each is judged on its own, so a
claim across them ("FPN beats C4") is "not run" here. Within a design, a seed's runs share one
pre-trained body: the FPN seed 0 runs of the mask heads used the first R-mini-50 body, the seed 1
runs the body re-made on 2026-12-02 (docs/training.md); the deeper claim compares R-mini-101 with
R-50 runs that all used the re-made body (``FPN_192_REMADE``), where the ResNeXt claim compares
R-mini-X101, on its own body, with R-mini-101. A missing metric (an early probe
printed mask AP only) is nan and left out of its contrast.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mrcnn_edu.ablations_report import judge_claims  # noqa: E402

nan = math.nan


def r(box: tuple[float, float, float], mask: tuple[float, float, float]) -> dict[str, float]:
    """One seed's (box AP, AP50, AP75) and (mask AP, AP50, AP75), in percent."""
    return dict(zip(("APbb", "APbb50", "APbb75", "AP", "AP50", "AP75"), (*box, *mask)))


# C4 / C5 at 384 px, 2000 iterations of 4 images, lr /10 at 1500, the 128 px body; seeds 0, 1, 2 in order
C4_384 = {
    "r50_c4": [r((22.1, 44.8, 18.5), (16.0, 32.8, 13.6)), r((22.3, 44.8, 18.5), (16.1, 32.4, 14.1)),
               r((23.1, 45.3, 20.2), (16.7, 33.0, 14.7))],
    "r50_c4_roipool": [r((14.7, 34.4, 9.3), (8.4, 22.3, 4.9)), r((14.7, 36.1, 8.2), (8.6, 22.4, 5.2)),
                       r((16.1, 37.5, 10.4), (8.9, 23.1, 5.3))],
    "r50_c4_agnostic": [r((20.8, nan, nan), (15.8, 30.8, 14.5)), r((22.4, 45.2, 18.2), (16.5, 32.3, 14.8)),
                        r((22.1, 45.0, 18.7), (16.8, 32.3, 15.1))],
    "r50_c4_softmax": [r((21.1, 43.7, 16.9), (7.8, 15.2, 7.3)), r((22.6, 46.0, 18.7), (8.1, 16.1, 7.4))],
    "r50_c4_roiwarp_avg": [r((15.3, 34.9, 9.8), (9.1, 23.8, 5.5)), r((16.1, 37.6, 9.6), (9.9, 24.5, 6.8))],
    "r50_c4_roiwarp_max": [r((16.2, 37.7, 10.5), (9.5, 25.5, 5.7)), r((16.6, 37.9, 11.3), (10.1, 24.8, 6.8))],
    "r50_c4_roialign_max": [r((21.4, 44.5, 17.4), (15.4, 32.3, 13.2)), r((22.5, 45.3, 19.5), (16.3, 33.1, 14.5))],
    "r50_c5_roialign": [r((35.4, 62.6, 34.9), (20.7, 44.6, 16.9)), r((36.1, 64.3, 35.5), (21.1, 45.3, 17.0))],
    "r50_c5_roipool": [r((23.1, 52.4, 14.1), (9.5, 30.2, 3.4)), r((24.0, 54.1, 14.6), (9.7, 29.8, 4.2))],
}

# FPN at 192 px, the same schedule, the 64 px body (seed 0: the first body; seed 1: the re-made one)
FPN_192 = {
    "r50_fpn": [r((39.1, nan, nan), (29.9, 55.5, 28.8)), r((41.5, 69.8, 43.9), (32.4, 58.5, 32.0))],
    "r50_fpn_mlp2": [r((38.6, nan, nan), (12.7, 35.7, 8.0)), r((40.4, 68.8, 42.1), (13.1, 36.5, 8.2))],
    "r50_fpn_mlp3": [r((38.6, nan, nan), (11.4, 34.8, 7.0)), r((40.1, 68.7, 41.4), (11.7, 35.2, 7.8))],
}

# FPN at 192 px, every seed of R-50 on the re-made R-mini-50 body (seed 0 run again on it,
# 2026-12-02), against R-mini-101 (seeds 0-2 on one body, pre-trained 2026-12-02 at 64 px, top-1 99.4 %)
FPN_192_REMADE = {
    "r50_fpn": [r((40.2, 68.2, 42.6), (30.9, 55.8, 31.6)), r((41.5, 69.8, 43.9), (32.4, 58.5, 32.0)),
                r((41.0, 69.4, 43.8), (31.9, 56.1, 32.7))],
    "r101_fpn": [r((38.6, 65.9, 41.1), (28.6, 52.3, 28.8)), r((39.2, 66.9, 41.8), (30.4, 54.2, 30.6)),
                 r((39.2, 67.1, 41.6), (29.0, 52.6, 28.2))],
    "x101_fpn": [r((38.3, 66.5, 40.6), (29.1, 54.1, 28.8))],  # its own body, R-mini-X101 (seed 0)
}


def verdicts(values: dict[str, list[dict[str, float]]]) -> list[str]:
    """One line per claim these runs can judge."""
    lines = []
    for claim in judge_claims(values):
        if claim["verdict"] == "not run":
            continue
        seeds = ", ".join(f"{run} {n}" for run, n in claim["n"].items())
        lines.append(f"{claim['claim']}: ours {claim['delta']:+.2f} ± {claim['se']:.2f} "
                     f"(df {claim['df']:.1f}; seeds: {seeds}), paper {claim['paper_delta']:+.1f}: {claim['verdict']}")
    return lines


def main() -> int:
    for name, values in (("C4 / C5 at 384 px", C4_384), ("FPN at 192 px", FPN_192),
                         ("FPN at 192 px, every R-50 run on the re-made body", FPN_192_REMADE)):
        print(f"== {name}")
        for line in verdicts(values):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
