"""NMS's time against torchvision's, in one run: ours by blocks (the CPU's way), ours from the
whole overlap matrix (the GPU's way, forced here on any device; on the CPU the matrix is then
decided by ``greedy_keep``'s loop, which is how the CPU did it before the blocks) and
``torchvision.ops.nms``.

Two kinds of boxes, ``N`` of each:

- scattered: uniform corners, sides 8-158 px on a 760 px square; few overlap, most are kept;
- crowded: the RPN's case, ``N`` jittered boxes around 30 objects; most are suppressed.

Each size also times ``batched_nms`` over ``--classes`` categories (default 80, COCO's; 0
leaves it out): the box head's per-class NMS.

Times are the median of ``--repeat`` calls (after one warm-up); on CUDA each call is followed
by a synchronisation. Ratios are ours / torchvision's: below 1 means faster. Every row also
checks that the three agree on the kept boxes. On a GPU ours never goes by blocks (each block
would read its decisions on the host): there both columns are the matrix way. Nor on the CPU
for up to ``boxes.NMS_MATRIX_MAX_BOXES`` (128) boxes, where one matrix costs less.

    python bench/nms.py                          # CPU, one thread: N = 1000, 2000, 6000, 12000
    python bench/nms.py --device cuda
    python bench/nms.py --sizes 300 --repeat 1   # a smoke run
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
import mrcnn_edu.boxes as boxes_module  # noqa: E402


def scattered(n: int, generator: torch.Generator) -> torch.Tensor:
    corner = torch.rand(n, 2, generator=generator) * 600
    return torch.cat([corner, corner + 8 + torch.rand(n, 2, generator=generator) * 150], 1)


def crowded(n: int, generator: torch.Generator, objects: int = 30) -> torch.Tensor:
    centres = torch.rand(objects, 2, generator=generator) * 700
    sizes = torch.rand(objects, 2, generator=generator) * 200 + 20
    which = torch.randint(0, objects, (n,), generator=generator)
    centre = centres[which] + torch.randn(n, 2, generator=generator) * sizes[which] * 0.15
    size = sizes[which] * torch.exp(torch.randn(n, 2, generator=generator) * 0.2)
    return torch.cat([centre - size / 2, centre + size / 2], 1)


def median_time(fn, repeat: int, device: torch.device) -> float:
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    synchronize()  # the warm-up's queued work is not the first timing's
    times = []
    for _ in range(repeat):
        tic = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def the_matrix_way(fn):
    """``fn`` with :func:`boxes.keep_sorted` deciding from the whole overlap matrix, and
    :func:`boxes.batched_nms` splitting large inputs by category (the GPU's way)."""
    def call():
        by_blocks = boxes_module._takes_the_cpu_way
        boxes_module._takes_the_cpu_way = lambda device: False
        try:
            return fn()
        finally:
            boxes_module._takes_the_cpu_way = by_blocks
    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,2000,6000,12000", help="numbers of boxes N, comma-separated")
    parser.add_argument("--classes", type=int, default=80, help="categories for batched_nms (0: leave it out)")
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        import torchvision
    except ImportError:
        print("torchvision is not importable: it is this benchmark's reference")
        return 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    print(f"{device}, {torch.get_num_threads()} thread(s), IoU threshold {args.threshold}; median of "
          f"{args.repeat}; ratios ours / torchvision")
    print(f"{'case':<24} {'kept':>6} {'torchvision ms':>15} {'by blocks':>10} {'ratio':>6} "
          f"{'matrix':>10} {'ratio':>6}")
    for n in [int(size) for size in args.sizes.split(",")]:
        for kind, make in (("scattered", scattered), ("crowded", crowded)):
            boxes = make(n, generator).to(device)
            scores = torch.rand(n, generator=generator).to(device)
            labels = torch.randint(0, max(1, args.classes), (n,), generator=generator).to(device)
            calls = [(f"{kind} N={n}", lambda: boxes_module.nms(boxes, scores, args.threshold),
                      lambda: torchvision.ops.nms(boxes, scores, args.threshold))]
            if args.classes:
                calls.append((f"  {args.classes} classes",
                              lambda: boxes_module.batched_nms(boxes, scores, labels, args.threshold),
                              lambda: torchvision.ops.batched_nms(boxes, scores, labels, args.threshold)))
            for name, ours, theirs in calls:
                # as sets: above 4000 boxes torchvision's batched_nms orders equal scores by an
                # unstable sort; ours keeps them in index order
                kept = theirs()
                same = [torch.equal(way().sort().values, kept.sort().values) for way in (ours, the_matrix_way(ours))]
                if not all(same):
                    print(f"{name}: ours and torchvision's keep different boxes")
                    return 1
                reference = median_time(theirs, args.repeat, device)
                blocks = median_time(ours, args.repeat, device)
                matrix = median_time(the_matrix_way(ours), args.repeat, device)
                print(f"{name:<24} {len(kept):>6} {reference * 1e3:>15.2f} {blocks * 1e3:>10.2f} "
                      f"{blocks / reference:>6.2f} {matrix * 1e3:>10.2f} {matrix / reference:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
