"""ImageNet pre-training, in miniature: a classifier on single synthetic shapes.

Mask R-CNN sets its training up "following existing Fast/Faster R-CNN work" (§3.1), which
fine-tunes ImageNet-pre-trained networks; Appendix B calls it pre-training on "the standard
1k-class subset" of ImageNet. Every Table 2 row of the paper starts from such weights. The
miniature Table 2 (``ablations.py``) has no ImageNet, and a from-scratch detector learns
*what* an object is very slowly: He, Girshick & Dollár, "Rethinking ImageNet Pre-training"
(2018), match pre-trained accuracy from scratch only with GroupNorm and ~3x longer schedules.
Measured here (``docs/training.md``): a from-scratch R-mini-C4 after 6000 images proposes well
(RPN recall 85 % at IoU 0.5) but names only 22 % of the objects it finds correctly (by the
class of its highest-scoring detection on each; chance is 12.5 %) -- the synthetic classes
differ only by outline.

So the miniature does what the paper does, on data of its own world: this module trains the
ResNet body *as a classifier* (global average pool of C5, then fc, as ImageNet models are) on
images that each show one shape of ``data/shapes.py`` -- random class, size, rotation,
colour, texture and background -- drawn on the fly from their own random stream (never the
detection set's images, train or val). It writes a state dict in torchvision's ResNet key
layout, the format of an ImageNet checkpoint, which the detector loads exactly as it would
ImageNet weights (``backbone.load_imagenet_state_dict``: the body, and for C4 the res5 head).

    python -m mrcnn_edu.pretrain --blocks 1,1,1,1 --width 16 --out runs/pretrain/R-mini-50.pth

Shapes: images (N, 3, S, S) normalised like the detector's inputs (``TransformConfig``'s
ImageNet mean / std, images in [0, 1]); labels (N,) in 0..7, the index in ``SHAPE_NAMES``
(the detector's category id minus one).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from mrcnn_edu.backbone import ResNet, ResNetConfig, mini_resnet
from mrcnn_edu.checkpoint import atomic_save, load_checkpoint
from mrcnn_edu.data import shapes
from mrcnn_edu.data.transforms import normalize
from mrcnn_edu.distributed import get_dist_info
from mrcnn_edu.engine import _pick_device

__all__ = ["PretrainConfig", "ShapeClassification", "pretrain", "evaluate_classifier", "top1_by_size",
           "load_classifier", "main"]

STREAM = 7  # the random stream of the classification images: scene_rng's splits are 0, 1
# object sides (px) at which top1_by_size checks a classifier: the detection set's objects
# (192 px images) are 17 / 28 / 46 / 75 px at their 10th / 25th / 50th / 75th percentile
SIZES_PX = (10, 13, 16, 20, 26, 32, 40, 48, 61, 80, 100, 122)


@dataclass
class PretrainConfig:
    """A short ImageNet-style schedule: SGD with momentum, linear warm-up, cosine decay."""

    image_size: int = 64  # C5 is 2 x 2; ImageNet's 224 px gives 7 x 7 -- small objects here
    batch_size: int = 128
    iterations: int = 1500  # ablations.MINI_PRETRAIN's: 340 s on one CPU core, top-1 99.5 %
    base_lr: float = 0.1  # for batch_size (He et al. 2016 use 0.1 for 256; GroupNorm takes more)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    min_size_frac: float = 0.4  # the object's size as a fraction of the image side
    max_size_frac: float = 0.95  # ImageNet objects fill most of the frame
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when available
    num_workers: int = 2
    log_period: int = 100
    eval_images: int = 1000  # held-out images for the top-1 accuracy reported at the end

    def __post_init__(self) -> None:
        for name in ("image_size", "batch_size", "iterations", "eval_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.min_size_frac <= self.max_size_frac <= 1:
            raise ValueError(f"PretrainConfig needs 0 < min_size_frac <= max_size_frac <= 1, got "
                             f"{self.min_size_frac}, {self.max_size_frac}")


class ShapeClassification(Dataset):
    """Image ``i`` (of an endless set: ``length`` only sets an epoch) shows one shape.

    Deterministic: image ``i`` draws from ``numpy.random.default_rng([seed, STREAM, i])``.
    Returns ``(image (3, S, S) float normalised, label int)``.
    """

    def __init__(self, cfg: PretrainConfig, length: int, offset: int = 0) -> None:
        self.cfg, self.length, self.offset = cfg, length, offset
        self.scene = shapes.ShapesConfig(image_size=cfg.image_size, min_objects=1, max_objects=1,
                                         min_size_frac=cfg.min_size_frac,
                                         max_size_frac=cfg.max_size_frac, tiny_prob=0.0,
                                         crowd_prob=0.0, min_visible_area=1)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng([self.cfg.seed, STREAM, self.offset + index])
        scene = shapes.render_scene(self.scene, rng)
        # one object is drawn, alone, so nothing occludes it; min_visible_area=1 keeps it however small
        label = shapes.SHAPE_NAMES.index(scene.objects[0].category)
        return normalize(torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255.0), label


def _lr_at(cfg: PretrainConfig, iteration: int) -> float:
    if iteration < cfg.warmup_iters:
        return cfg.base_lr * (iteration + 1) / cfg.warmup_iters
    progress = (iteration - cfg.warmup_iters) / max(1, cfg.iterations - cfg.warmup_iters)
    return 0.5 * cfg.base_lr * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate_classifier(model: ResNet, cfg: PretrainConfig, leave_out: Sequence[int] = ()) -> float:
    """Top-1 accuracy on ``cfg.eval_images`` held-out images (indices past any training index);
    images whose true label is in ``leave_out`` are not counted (:func:`top1_by_size`)."""
    device = next(model.parameters()).device
    images = cfg.eval_images
    held_out = ShapeClassification(cfg, images, offset=10**9)
    # the images are seeded per index, so workers draw the same ones. In one process, drawing
    # the 13,000 images of top1_by_size was most of the 51 s the GPU machine spent after training
    # (119 s in all, 68 s of training; 2026-11-30)
    loader = DataLoader(held_out, batch_size=256, num_workers=cfg.num_workers)
    was_training, correct, counted = model.training, 0, 0
    left_out = torch.tensor(list(leave_out), dtype=torch.int64)
    model.eval()
    for x, y in loader:
        kept = ~torch.isin(y, left_out)
        correct += ((model.classify(x.to(device)).argmax(1).cpu() == y) & kept).sum().item()
        counted += int(kept.sum())
    model.train(was_training)
    if counted == 0:
        raise ValueError(f"no held-out image left to score: all {images} are of the labels left out {list(leave_out)}")
    return correct / counted


def top1_by_size(model: ResNet, cfg: PretrainConfig, sizes_px: tuple[int, ...] = SIZES_PX) -> dict[int, float]:
    """Top-1 on held-out images whose one shape is exactly ``px`` pixels, for each size that
    fits ``cfg.image_size`` (``cfg``'s own size range is ignored). A detector's RoIs meet
    objects of every size, so a body that knows its classes at one scale only helps little.

    Below ``shapes.PERSON_MIN_SIDE`` (20 px) the person is not counted: it is never drawn that
    small, so its images there would be 20 px people -- the very same ones at every smaller size
    (the images are seeded per index) -- and would lift the small sizes' accuracy by what the
    body knows at 20 px. Those sizes score the seven other classes (chance 1/8 still: the
    classifier may answer "person").
    """
    person = shapes.SHAPE_NAMES.index(shapes.PERSON)
    return {px: evaluate_classifier(model, dataclasses.replace(cfg, min_size_frac=px / cfg.image_size,
                                                                max_size_frac=px / cfg.image_size),
                                    leave_out=(person,) if px < shapes.PERSON_MIN_SIDE else ())
            for px in sizes_px if px <= cfg.image_size}


def load_classifier(path: str | Path) -> tuple[ResNet, PretrainConfig]:
    """The classifier ``pretrain`` wrote to ``path``, and the config it was trained with."""
    saved = load_checkpoint(path)  # a missing, cut-off or foreign file: an error naming it
    info = saved.get("info", {}) if isinstance(saved, dict) else {}
    if not isinstance(saved, dict) or "model" not in saved or "resnet" not in info or "config" not in info:
        raise ValueError(f"{path}: not a file written by mrcnn_edu.pretrain (needs 'model' and info's "
                         f"'resnet' and 'config')")
    depth = info["resnet"]["depth"]
    resnet = dict(info["resnet"], depth=tuple(depth) if isinstance(depth, (list, tuple)) else depth,
                  num_classes=len(shapes.SHAPE_NAMES), freeze_at=0)
    resnet.pop("blocks")  # derived from depth, not an argument
    model = ResNet(ResNetConfig(**resnet))
    model.load_state_dict(saved["model"])
    return model.eval(), PretrainConfig(**info["config"])


def pretrain(resnet: ResNetConfig, cfg: PretrainConfig, out: str | Path | None = None,
             verbose: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Train ``resnet`` (its ``num_classes`` is set to 8 here) to classify shapes.

    Seeds torch with ``cfg.seed`` (the initial weights); the images are seeded per index.

    Returns ``(state_dict, info)``: the state dict in torchvision's ResNet key layout (body
    and ``fc``), and ``info`` with the accuracy on ``cfg.eval_images`` held-out images (``top1``;
    1000 by default, 64 with ``ablate --quick``), per object size ``top1_by_size``, the losses and
    the wall time. With ``out``, also writes ``{"model": state_dict, "info": info}`` there
    atomically -- ``load_imagenet_state_dict`` takes either form's ``model``.
    """
    if resnet.norm == "frozen_bn":  # its statistics never train: the body would have no normalisation
        raise ValueError("pretrain needs a norm that trains (resnet.norm 'gn' or 'bn'), got 'frozen_bn': "
                         "frozen BN keeps the unit statistics it starts with")
    device = _pick_device(cfg.device, get_dist_info())
    torch.manual_seed(cfg.seed)
    model = ResNet(dataclasses.replace(resnet, num_classes=len(shapes.SHAPE_NAMES), freeze_at=0)).to(device)
    data = ShapeClassification(cfg, cfg.iterations * cfg.batch_size)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                        drop_last=True, pin_memory=device.type == "cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.base_lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    tic, losses, running = time.perf_counter(), [], torch.zeros((), device=device)
    model.train()
    for iteration, (x, y) in enumerate(loader):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(cfg, iteration)
        loss = F.cross_entropy(model.classify(x.to(device, non_blocking=True)), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += loss.detach()  # read on the host only when logged: no GPU sync per step
        if (iteration + 1) % cfg.log_period == 0 or iteration + 1 == cfg.iterations:
            losses.append((iteration + 1, running.item() / ((iteration % cfg.log_period) + 1)))
            running.zero_()
            if verbose:
                print(f"pretrain iter {iteration + 1}/{cfg.iterations}  loss {losses[-1][1]:.3f}  "
                      f"lr {_lr_at(cfg, iteration):.4f}  {time.perf_counter() - tic:.0f} s", flush=True)
    info = {"top1": evaluate_classifier(model, cfg), "top1_by_size": top1_by_size(model, cfg),
            "losses": losses, "wall_time_s": round(time.perf_counter() - tic, 1), "device": str(device),
            "config": dataclasses.asdict(cfg), "resnet": dataclasses.asdict(resnet)}
    if verbose:
        print(f"pretrain: top-1 {100 * info['top1']:.1f} % on {cfg.eval_images} held-out shapes "
              f"({info['wall_time_s']:.0f} s on {device}); by object side: "
              + ", ".join(f"{px} px {100 * acc:.0f} %" for px, acc in info["top1_by_size"].items()), flush=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if out is not None:
        atomic_save({"model": state, "info": info}, out)
    return state, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mrcnn_edu.pretrain",
                                     description="Pre-train a miniature ResNet body on single synthetic shapes "
                                                 "(the miniature's stand-in for ImageNet pre-training).")
    parser.add_argument("--blocks", default="1,1,1,1", help="bottlenecks in res2..res5")
    parser.add_argument("--width", type=int, default=16, help="mini_resnet width (stem and res2)")
    parser.add_argument("--groups", type=int, default=1, help="ResNeXt: groups of the 3x3 convolutions")
    parser.add_argument("--width-per-group", type=int, default=None, help="ResNeXt: width of each group in res2")
    parser.add_argument("--iterations", type=int, default=PretrainConfig.iterations)
    parser.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=PretrainConfig.base_lr)
    parser.add_argument("--image-size", type=int, default=PretrainConfig.image_size)
    parser.add_argument("--min-size-frac", type=float, default=PretrainConfig.min_size_frac,
                        help="smallest object side as a fraction of the image side")
    parser.add_argument("--max-size-frac", type=float, default=PretrainConfig.max_size_frac,
                        help="largest object side as a fraction of the image side")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="where the state dict goes (.pth)")
    parser.add_argument("--evaluate", metavar="FILE",
                        help="instead of training: print FILE's top-1 per object size (top1_by_size)")
    args = parser.parse_args(argv)
    if args.evaluate:
        model, cfg = load_classifier(args.evaluate)
        cfg = dataclasses.replace(cfg, device="cpu", num_workers=0)
        by_size = top1_by_size(model, cfg)
        print(f"{args.evaluate}: top-1 by object side ({cfg.image_size} px images, {cfg.eval_images} each, "
              f"the person left out under {shapes.PERSON_MIN_SIDE:.0f} px): "
              + ", ".join(f"{px} px {100 * acc:.0f} %" for px, acc in by_size.items()))
        return 0
    if not args.out:
        parser.error("--out is required (or --evaluate FILE)")
    try:
        blocks = tuple(int(b) for b in args.blocks.split(","))
    except ValueError:
        blocks = ()
    if len(blocks) != 4 or min(blocks) < 1:
        parser.error(f"--blocks must be 4 integers >= 1 like 1,1,1,1, got {args.blocks!r}")
    if args.width < 1:
        parser.error(f"--width must be >= 1, got {args.width}")
    extra = {"groups": args.groups} if args.groups != 1 else {}
    if args.width_per_group is not None:
        extra["width_per_group"] = args.width_per_group
    try:  # what the configs refuse, said as a usage error (the fields are the options' names)
        resnet = mini_resnet(width=args.width, blocks=blocks, **extra)
        cfg = PretrainConfig(image_size=args.image_size, batch_size=args.batch_size, iterations=args.iterations,
                             base_lr=args.lr, seed=args.seed, device=args.device, num_workers=args.workers,
                             min_size_frac=args.min_size_frac, max_size_frac=args.max_size_frac)
    except ValueError as err:
        parser.error(str(err))
    pretrain(resnet, cfg, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
