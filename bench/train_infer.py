"""Our R-50-FPN Mask R-CNN against torchvision's ``maskrcnn_resnet50_fpn``, same GPU, one run.

The two models are the same network with the same weights: torchvision's is built as around
its COCO weights (frozen BN, stem and res2 frozen, 80 + 1 classes, shorter side 800 / longer
1333, 1000 proposals at test time, 100 detections per image) and ours is loaded from its
state dict with ``load_torchvision_maskrcnn`` (which also adopts its settings: legacy
``aligned=False`` pooling, sampling ratio 2, anchors). So the ratios compare implementations,
nothing else. fp32 unless ``--amp``.

- inference: milliseconds per image on an 800 x 1067 image, 100 detections with masks. Random
  weights score every class alike; as a trained detector does, each proposal is made to score
  above the 0.05 threshold for a few classes (4 classifier biases raised, in both models), so
  NMS sees ~4 candidates per proposal. ``--all-classes`` is the stress case instead: score
  threshold 0, all 80 classes of all 1000 proposals through NMS.
- training: milliseconds per iteration (forward, backward, SGD step) at 2 images per batch
  with 6 random objects each.

Prints the medians and the ratios ours / torchvision (below 1.0: we are faster). Timings
synchronise the GPU around each call. ``--quick`` is a CPU smoke test of the same code at
128 px with one timed iteration (its numbers mean nothing).

    python bench/train_infer.py             # on a CUDA GPU
    python bench/train_infer.py --quick     # anywhere, seconds
    python bench/train_infer.py --profile 5 # and where each model's training step spends its time
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mrcnn_edu.model import MaskRCNN  # noqa: E402
from mrcnn_edu.weights import load_torchvision_maskrcnn, torchvision_maskrcnn_config  # noqa: E402


def build_torchvision(min_size: int, max_size: int, all_classes: bool):
    """``maskrcnn_resnet50_fpn`` as torchvision builds it around pre-trained weights (frozen BN,
    res3-res5 trained), without loading any: ``weights=None`` would switch to plain BN."""
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), trainable_layers=3)
    model = TorchvisionMaskRCNN(backbone, num_classes=81, min_size=min_size, max_size=max_size,
                                box_score_thresh=0.0 if all_classes else 0.05,
                                box_detections_per_img=100)
    if not all_classes:  # a few likely classes per proposal, as a trained detector has
        with torch.no_grad():
            model.roi_heads.box_predictor.cls_score.bias[1:5] += 4.0
    return model


def build_ours(theirs, min_size: int, max_size: int, all_classes: bool) -> MaskRCNN:
    """Ours, configured as ``theirs`` and holding its weights (``mrcnn_edu.weights``)."""
    cfg = torchvision_maskrcnn_config(num_classes=80)  # bn_eps 1e-5: torchvision's FrozenBatchNorm2d default
    cfg.transform.min_size_train, cfg.transform.min_size_test = (min_size,), min_size
    cfg.transform.max_size = max_size
    cfg.box_head.score_thresh = 0.0 if all_classes else 0.05
    return load_torchvision_maskrcnn(theirs.state_dict(), cfg=cfg)


def random_targets(images: list[torch.Tensor], objects: int, generator: torch.Generator) -> list[dict]:
    targets = []
    for image in images:
        height, width = image.shape[-2:]
        xy = torch.rand(objects, 2, generator=generator) * torch.tensor([width * 0.7, height * 0.7])
        wh = (0.1 + 0.2 * torch.rand(objects, 2, generator=generator)) * torch.tensor([width, height])
        boxes = torch.cat([xy, xy + wh], dim=1)  # (G, 4) xyxy
        masks = torch.zeros(objects, height, width, dtype=torch.uint8)
        for g, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
            masks[g, y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, 81, (objects,), generator=generator),
                        "masks": masks})
    return targets


def timed(fn, device: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed ones."""
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - tic))
    return times


def device_us(event) -> float:
    """A profiler event's self time on the device, in µs (``self_cuda_time_total`` before PyTorch 2.4's rename)."""
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)


def device_events(events: list) -> list:
    """The GPU's own events (kernels, copies) of ``prof.key_averages()``.

    The list holds the host's ops too, and an op's self GPU time is the time of the kernels it
    launched, which are also in the list as events of their own: summing every event's self GPU
    time counts each kernel twice. torch.profiler's own table totals the device events alone.
    """
    from torch.autograd import DeviceType

    return [e for e in events if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)]


def profile_steps(step, device: torch.device, steps: int, name: str, top: int = 12) -> None:
    """Where one training step's time goes, per step over ``steps`` profiled ones: the GPU's busy
    time against the wall time (a step the GPU waits on is bound by the CPU: launches, Python,
    synchronisations), the ops with the most GPU and CPU time, and the host-device syncs."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tic = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = 1000 * (time.perf_counter() - tic) / steps
    events = prof.key_averages()
    kernels = device_events(events)
    busy = sum(device_us(e) for e in kernels) / 1000 / steps
    print(f"--- profile of {name}'s training step ({steps} steps): wall {wall:.1f} ms/step under the "
          f"profiler, GPU busy {busy:.1f} ms/step ({100 * busy / wall:.0f} %)")
    syncs = {e.key: e.count / steps for e in events
             if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync",
                          "aten::item", "aten::nonzero", "aten::_local_scalar_dense")}
    print("host-device round trips per step: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(syncs.items())))
    for title, key, rows in (("GPU", device_us, kernels), ("CPU", lambda e: e.self_cpu_time_total, events)):
        print(f"top {top} by self {title} time: ms/step, calls/step")
        for e in sorted(rows, key=key, reverse=True)[:top]:
            print(f"  {key(e) / 1000 / steps:8.2f} {e.count / steps:7.1f}  {e.key[:90]}")


def bench(model, images, targets, device, warmup, iters, amp: str) -> dict:
    model.to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    one_image = images[:1]

    def infer():
        model.eval()
        with torch.no_grad(), autocast():
            infer.detections = len(model(one_image)[0]["boxes"])

    def train_step():
        model.train()
        with autocast():
            losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    infer_ms = timed(infer, device, warmup, iters)
    train_ms = timed(train_step, device, warmup, iters)
    model.cpu()
    # the step, for profiling after *every* timing: a profiler session leaves CUPTI's callbacks in
    # the process (pytorch/pytorch#144455), which slows launch-bound steps timed after it
    return {"infer_ms": statistics.median(infer_ms), "train_ms": statistics.median(train_ms),
            "detections": infer.detections, "train_step": train_step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: 128 px, 1 timed iteration")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=800, help="shorter side (default 800, §3.1)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="then profile STEPS training steps of each model (torch.profiler)")
    parser.add_argument("--all-classes", action="store_true",
                        help="score threshold 0: every class of every proposal through NMS")
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.size, args.warmup, args.iters = "cpu", 128, 0, 1
    try:
        import torchvision  # noqa: F401
    except ImportError:
        print("torchvision is not installed: it is the reference this benchmark compares against")
        return 1
    device = torch.device(args.device)
    if device.type != "cuda" and not args.quick:
        print("warning: no CUDA device; CPU timings say little about the GPU ratios", file=sys.stderr)
    max_size = round(args.size * 1333 / 800)
    generator = torch.Generator().manual_seed(0)
    width = round(args.size * 4 / 3)
    images = [torch.rand(3, args.size, width, generator=generator) for _ in range(2)]  # 2 per batch
    targets = random_targets(images, 6, generator)
    images_dev = [im.to(device) for im in images]
    targets_dev = [{k: v.to(device) for k, v in t.items()} for t in targets]

    torch.manual_seed(0)
    theirs = build_torchvision(args.size, max_size, args.all_classes)
    ours = build_ours(theirs, args.size, max_size, args.all_classes)
    results = {}
    for name, model in (("ours", ours), ("torchvision", theirs)):
        torch.manual_seed(0)  # the same RPN / RoI sampling draws for both
        results[name] = bench(model, images_dev, targets_dev, device, args.warmup, args.iters, args.amp)
    for name, model in (("ours", ours), ("torchvision", theirs)) if args.profile else ():
        model.to(device)  # profiled only now, after both models' timings (see bench)
        profile_steps(results[name].pop("train_step"), device, args.profile, name)
        model.cpu()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"R-50-FPN Mask R-CNN on {name}, {args.size} x {width} images, amp={args.amp}, "
          f"{'all classes, score threshold 0' if args.all_classes else '4 likely classes'}, "
          f"same weights, median of {args.iters} after {args.warmup} warm-up")
    print(f"{'':12s} {'inference ms/image':>20s} {'detections':>11s} {'train ms/iter (2 img)':>22s}")
    for model_name, r in results.items():
        print(f"{model_name:12s} {r['infer_ms']:20.1f} {r['detections']:11d} {r['train_ms']:22.1f}")
    ours, reference = results["ours"], results["torchvision"]
    print(f"ratio ours / torchvision: inference {ours['infer_ms'] / reference['infer_ms']:.2f}, "
          f"training {ours['train_ms'] / reference['train_ms']:.2f}  (target <= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
