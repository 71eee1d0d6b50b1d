"""Benchmark RoIAlign: our CuPy kernel, our PyTorch path and torchvision's kernel, in one run.

Shapes (issue 3): a (2, 256, 200, 336) feature map at scale 1/4 (an 800 x 1344 image's P2),
1024 RoIs -> 7 x 7 (box head) and 512 RoIs -> 14 x 14 (mask head); forward, and forward +
backward. On the GPU a time is the mean of ``--iters`` calls queued back to back between two
CUDA events (as in a training step, where the host queues kernels ahead of the GPU), median of
5 such runs, after ``--warmup`` calls; on the CPU, the median of ``--iters`` single calls. Ratios
are ours / torchvision's: below 1 means faster than torchvision.

Ours is called as the model's pooler calls it, ``check_values=False`` (RoIs it built itself);
the row "checked" validates the RoIs' values first, a host read that stalls the queue: what a
user's call with the default pays. (The first GPU runs timed single checked calls after a sync,
which also counts the host's time before each launch: our forward was then 0.4 ms behind
torchvision's at both sizes, a constant that suggests host time rather than the kernel.)

    python bench/roi_align.py                     # GPU, fp32
    python bench/roi_align.py --dtype float16     # fp16 (torchvision's kernel supports it too)
    python bench/roi_align.py --quick --device cpu   # tiny smoke run
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from mrcnn_edu.ops.roi_align import cupy_available, roi_align  # noqa: E402


def make_rois(n: int, image_hw: tuple[int, int], n_images: int, generator) -> torch.Tensor:
    """Random boxes, sizes log-uniform in [16, 512] px, centres anywhere in the image."""
    H, W = image_hw
    size = torch.exp(torch.empty(n, 2).uniform_(2.77, 6.24, generator=generator))  # 16..512 px
    centre = torch.rand(n, 2, generator=generator) * torch.tensor([W, H])
    boxes = torch.cat([centre - size / 2, centre + size / 2], 1)
    index = torch.randint(0, n_images, (n, 1), generator=generator).float()
    return torch.cat([index, boxes], 1)  # (R, 5)


def time_ms(fn, iters: int, warmup: int, device: torch.device, repeats: int = 5) -> float:
    """Milliseconds per call of ``fn`` (see the module docstring for how)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / iters)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def candidates(device: torch.device, sampling_ratio: int, aligned: bool):
    """(name, fn(x, rois, size)) pairs available on this machine."""
    out = []
    if device.type == "cuda" and cupy_available():
        out.append(("ours cupy", lambda x, r, s: roi_align(x, r, s, 0.25, sampling_ratio, aligned,
                                                            backend="cupy", check_values=False)))
        out.append(("ours cupy, channels_last input", "channels_last"))
        out.append(("ours cupy, checked", lambda x, r, s: roi_align(x, r, s, 0.25, sampling_ratio,
                                                                     aligned, backend="cupy")))
    out.append(("ours torch", lambda x, r, s: roi_align(x, r, s, 0.25, sampling_ratio, aligned,
                                                        backend="torch", check_values=False)))
    try:
        import torchvision
        out.append(("torchvision", lambda x, r, s: torchvision.ops.roi_align(
            x, r, s, 0.25, sampling_ratio, aligned)))
    except ImportError:
        print("torchvision not importable: no reference timings")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--sampling-ratio", type=int, default=2)
    parser.add_argument("--legacy", action="store_true", help="aligned=False")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.quick:
        feature_shape, image_hw, cases = (2, 8, 25, 42), (100, 168), [(64, 7), (32, 14)]
        args.warmup = min(args.warmup, 1)
    else:
        feature_shape, image_hw, cases = (2, 256, 200, 336), (800, 1344), [(1024, 7), (512, 14)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(feature_shape, generator=g).to(device, dtype)
    methods = candidates(device, args.sampling_ratio, not args.legacy)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})"
          f", dtype {args.dtype}, features {tuple(feature_shape)}, scale 1/4, sampling_ratio "
          f"{args.sampling_ratio}, aligned {not args.legacy}, median of {args.iters}")
    print(f"{'RoIs -> size':<14}{'method':<34}{'forward ms':>12}{'fwd+bwd ms':>12}"
          f"{'fwd ratio':>11}{'f+b ratio':>11}")
    for n_rois, size in cases:
        rois = make_rois(n_rois, image_hw, feature_shape[0], g).to(device)
        results = {}
        for name, fn in methods:
            features, boxes = x, rois
            if fn == "channels_last":  # same kernel, input already in the layout it reads
                features, fn = x.contiguous(memory_format=torch.channels_last), methods[0][1]
            if name == "torchvision":  # it takes RoIs only in the features' dtype (ours: fp32)
                boxes = rois.to(dtype)
            leaf = features.detach().requires_grad_(True)
            grad = torch.randn_like(fn(leaf, boxes, size))

            def forward(fn=fn, features=features, boxes=boxes):
                with torch.no_grad():
                    fn(features, boxes, size)

            def forward_backward(fn=fn, leaf=leaf, grad=grad, boxes=boxes):
                leaf.grad = None
                fn(leaf, boxes, size).backward(grad)

            results[name] = (time_ms(forward, args.iters, args.warmup, device),
                             time_ms(forward_backward, args.iters, args.warmup, device))
        reference = results.get("torchvision")
        for name, (fwd, both) in results.items():
            ratios = (f"{fwd / reference[0]:>11.2f}{both / reference[1]:>11.2f}" if reference
                      else f"{'-':>11}{'-':>11}")
            print(f"{f'{n_rois} -> {size}x{size}':<14}{name:<34}{fwd:>12.3f}{both:>12.3f}{ratios}")


if __name__ == "__main__":
    main()
