"""RoIPool's time with and without one whole-image RoI among small proposals, against torchvision.

``mrcnn_edu.ops.roi_pool`` gathers each bin as a ``kh x kw`` window of cells. With one window
size for every RoI (the largest bin of all), a single RoI covering the image -- common among
C4's proposals -- made every RoI gather at its size. The op now pools RoIs in chunks of similar
window (``_chunks_by_window``): this script shows that the one large RoI no longer costs the
rest. Times are the best of ``--repeat`` calls, as ratios to ``torchvision.ops.roi_pool`` in the
same run (forward only, CPU, one thread by default).

    python bench/roi_pool_windows.py            # C4-like: 256 channels, 50 x 84 map, 128 RoIs, 14 x 14
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mrcnn_edu.ops import roi_pool  # noqa: E402


def proposals(count: int, whole_image: bool, generator: torch.Generator) -> torch.Tensor:
    """``count`` boxes 16-64 px on an 800 x 1333 image, the first one the whole image if asked."""
    corners = torch.rand(count, 2, generator=generator) * torch.tensor([1200.0, 700.0])
    sides = 16 + torch.rand(count, 2, generator=generator) * 48
    rois = torch.cat([torch.zeros(count, 1), corners, corners + sides], 1)
    if whole_image:
        rois[0] = torch.tensor([0, 0, 0, 1333, 800.0])
    return rois


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rois", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        import torchvision
    except ImportError:
        print("torchvision is not importable: it is this benchmark's reference")
        return 1
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, 256, 50, 84, generator=generator)  # C4: stride 16 of 800 x 1333
    for whole_image in (False, True):
        rois = proposals(args.rois, whole_image, generator)
        ours = best_time(lambda: roi_pool(features, rois, 14, 1 / 16), args.repeat)
        theirs = best_time(lambda: torchvision.ops.roi_pool(features, rois, 14, 1 / 16), args.repeat)
        print(f"{args.rois} RoIs, {'one' if whole_image else 'no'} whole-image RoI: ours {ours:.3f} s, "
              f"torchvision {theirs:.3f} s, ours / torchvision {ours / theirs:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
