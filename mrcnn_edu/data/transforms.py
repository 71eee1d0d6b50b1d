"""Image transforms that keep boxes, masks and keypoints consistent.

§3.1: "Images are resized such that their scale (shorter edge) is 800 pixels"; the longer
edge is capped (1333 in Detectron). §5 and Appendix B: train-time scale jitter, "randomly
sample a scale from [640, 800] pixels". Inference (Appendix B) also uses horizontal flips.

Shapes: image (3, H, W) float32; target as ``coco.COCODataset`` gives it -- "boxes" (N, 4)
xyxy px, "masks" (N, H, W) uint8, "keypoints" (N, Kp, 3) (x, y, v) continuous px.

Geometry (pixel ``i`` covers ``[i, i+1)``, so a continuous point ``x`` maps exactly):
- ``resize`` is a similarity ``x' = s * x`` for every coordinate. The image is resampled
  with bilinear interpolation whose sampling grid uses exactly ``s`` (``F.interpolate``
  with ``recompute_scale_factor=False``), so output size is ``floor(H * s)`` and mapping
  detections back is just ``/ s``. Masks use pixel-centre ``nearest-exact`` sampling on uint8
  (output pixel ``j`` takes input pixel ``floor((j + 0.5) / s)``), which keeps them binary
  and cheap; it is the same sampling grid as the image's.
- ``hflip``: ``x' = W - x``. Box edges swap: ``x1' = W - x2``, ``x2' = W - x1``; keypoints
  ``x' = W - x`` and left/right keypoint types swap via the flip map.
- ``normalize`` and ``batch_images`` (zero padding at the bottom/right to a multiple of 32,
  so every FPN level's stride divides the size) touch no coordinates.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F

from mrcnn_edu.device import host_to_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # for [0, 1] RGB images (torchvision's backbones)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """The factor ``s`` that scales the shorter side to ``min_size``, the longer to at most ``max_size``."""
    return min(min_size / min(height, width), max_size / max(height, width))


def draw_min_sizes(choices: tuple[int, ...], seeds: list[int | None]) -> list[int]:
    """§5's train-time scale jitter: one shorter side per image, uniform over ``choices``.

    An image with an integer ``seed`` draws from a generator seeded with it (the training loader
    gives every sample one: ``distributed.SeededSamples``), so its scale is the same whichever
    process, batch or worker it lands in. Images with ``None`` (a caller's own
    ``model(images, targets)``) draw from torch's global generator, one draw each. With a single
    choice every image takes that global draw, as it always did: nothing is random then, but the
    draws leave the global generator where they always left it, and with it the RoI sampling
    that follows (so results trained before per-sample seeds repeat exactly).
    """
    if not choices:
        raise ValueError("choices must hold at least one size (TransformConfig.min_size_train)")
    from_global = [i for i, seed in enumerate(seeds) if seed is None or len(choices) == 1]
    picks = dict(zip(from_global, torch.randint(len(choices), (len(from_global),)).tolist()))
    for i, seed in enumerate(seeds):
        if i not in picks:
            generator = torch.Generator().manual_seed(int(seed))
            picks[i] = int(torch.randint(len(choices), (), generator=generator))
    return [choices[picks[i]] for i in range(len(seeds))]


def resize_images(images: torch.Tensor, targets: list[dict] | None, min_size: int, max_size: int
                  ) -> tuple[torch.Tensor, list[dict] | None, float]:
    """:func:`resize` for a stack of same-sized images, with one interpolation for all of them.

    images: (G, 3, H, W); targets: one dict per image or None. Returns (G, 3, floor(H*s),
    floor(W*s)), the targets scaled, s. Each image comes out exactly as :func:`resize` makes it
    alone: interpolation treats every (image, channel) plane on its own.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (G, 3, H, W), got shape {tuple(images.shape)}")
    # a hair above s so floor(H * s) cannot fall one pixel short through rounding error
    scale = resize_scale(*images.shape[-2:], min_size, max_size) * (1 + 1e-7)
    images = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False,
                           recompute_scale_factor=False)
    if targets is None:
        return images, None, scale
    new_h, new_w = images.shape[-2:]
    out = [dict(target) for target in targets]
    if any("boxes" in t for t in targets):
        boxes = _cat(targets, "boxes") * scale
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, new_w)  # the last < 1 px may fall off
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, new_h)
        _split_into(out, "boxes", boxes)
    if any("masks" in t for t in targets):
        masks = _cat(targets, "masks")  # the masks of every image, (N_1 + ... + N_G, H, W)
        if masks.shape[0] == 0:
            masks = masks.new_zeros((0, new_h, new_w))
        else:
            # through uint8: torch has no nearest kernel for bool masks (torchvision's accept them)
            masks = F.interpolate(masks.to(torch.uint8)[None] if masks.dtype == torch.bool else masks[None],
                                  scale_factor=scale, mode="nearest-exact",
                                  recompute_scale_factor=False)[0].to(masks.dtype)  # (N, H', W')
        _split_into(out, "masks", masks)
    if any("keypoints" in t for t in targets):
        keypoints = _cat(targets, "keypoints").clone()
        keypoints[..., :2] *= scale  # v = 0 points stay (0, 0)
        _split_into(out, "keypoints", keypoints)
    if any("area" in t for t in targets):
        _split_into(out, "area", _cat(targets, "area") * scale**2)
    return images, out, scale


def _cat(targets: list[dict], key: str) -> torch.Tensor:
    """One tensor of every target's ``key``, rows in image order (all targets must have it)."""
    missing = [i for i, t in enumerate(targets) if key not in t]
    if missing:
        raise ValueError(f"targets {missing} have no {key!r} while others do")
    return targets[0][key] if len(targets) == 1 else torch.cat([t[key] for t in targets])


def _split_into(out: list[dict], key: str, values: torch.Tensor) -> None:
    """Hand each target its own rows of ``values`` (views, no copies)."""
    counts = [len(t[key]) for t in out]
    for target, part in zip(out, values.split(counts)):
        target[key] = part


def resize(image: torch.Tensor, target: dict | None, min_size: int, max_size: int
           ) -> tuple[torch.Tensor, dict | None, float]:
    """Scale the shorter side to ``min_size`` unless the longer would exceed ``max_size``.

    Returns (image (3, floor(H*s), floor(W*s)), target with boxes/masks/keypoints scaled, s).
    """
    if image.dim() != 3:
        raise ValueError(f"image must be (3, H, W), got shape {tuple(image.shape)}")
    images, targets, scale = resize_images(image[None], None if target is None else [target], min_size, max_size)
    return images[0], None if targets is None else targets[0], scale


def size_ratios(new_size: tuple[int, int], old_size: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(new_h / old_h, new_w / old_w) as float32 tensors, computed as torchvision's resize_boxes does.

    The operands are filled on the device (``torch.full``): ``torch.tensor(x, device=cuda)``
    would copy each from the host and synchronise."""
    return tuple(torch.full((), float(new), dtype=torch.float32, device=device)
                 / torch.full((), float(old), dtype=torch.float32, device=device)
                 for new, old in zip(new_size, old_size))


def resize_images_like_torchvision(images: torch.Tensor, targets: list[dict] | None, min_size: int, max_size: int
                                   ) -> tuple[torch.Tensor, list[dict] | None, float]:
    """:func:`resize_like_torchvision` for a stack of same-sized images (G, 3, H, W), one interpolation."""
    if images.dim() != 4:
        raise ValueError(f"images must be (G, 3, H, W), got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    scale = resize_scale(height, width, min_size, max_size)
    new_size = (int(height * scale), int(width * scale))
    images = F.interpolate(images, size=new_size, mode="bilinear", align_corners=False)
    if targets is None:
        return images, None, scale
    ratio_y, ratio_x = size_ratios(new_size, (height, width), images.device)
    out = []
    for target in targets:  # only the parity path resizes this way: kept per image, as torchvision does
        target = dict(target)
        if "boxes" in target:
            target["boxes"] = target["boxes"] * torch.stack([ratio_x, ratio_y, ratio_x, ratio_y])
        if "masks" in target:
            masks = target["masks"]
            target["masks"] = F.interpolate(masks[:, None].float(), size=new_size)[:, 0].to(masks.dtype)  # (N, H', W')
        if "keypoints" in target:
            keypoints = target["keypoints"].clone()
            keypoints[..., 0] *= ratio_x
            keypoints[..., 1] *= ratio_y
            target["keypoints"] = keypoints
        if "area" in target:
            target["area"] = target["area"] * (ratio_x * ratio_y)
        out.append(target)
    return images, out, scale


def resize_like_torchvision(image: torch.Tensor, target: dict | None, min_size: int, max_size: int):
    """torchvision's GeneralizedRCNNTransform.resize: ``(image, target, scale)``.

    ``s = min(min_size / min(H, W), max_size / max(H, W))``; the image becomes
    ``int(H * s) x int(W * s)`` (bilinear, ``align_corners=False``, resampled with the ratio of
    the integer sizes, not ``s``); boxes and keypoints are multiplied by the float32 per-axis
    size ratios, masks resized by nearest neighbour. Unlike :func:`resize` a
    point ``x`` does not land exactly at ``s * x``: up to a pixel's worth of rounding.
    """
    if image.dim() != 3:
        raise ValueError(f"image must be (3, H, W), got shape {tuple(image.shape)}")
    images, targets, scale = resize_images_like_torchvision(
        image[None], None if target is None else [target], min_size, max_size)
    return images[0], None if targets is None else targets[0], scale


def _flip_permutation(flip_map, num_keypoints: int) -> list[int]:
    """Accept a permutation list or (i, j) pairs; return the permutation.

    There is no default: mirroring a person turns the left eye into a right eye, so a missing
    map would teach the keypoint head the wrong side without a word. Types with no sides
    pass the identity (``list(range(K))``) explicitly. The map must undo itself (flipping twice
    is no flip): pairs that share a type, or a cycle such as ``[1, 2, 0]``, would silently
    duplicate, drop or rotate keypoint types.
    """
    if flip_map is None:
        raise ValueError(f"hflip: the targets carry {num_keypoints} keypoint types but no flip_map was "
                         "given; pass the dataset's keypoint_flip_map (the identity if no type has a side)")
    given = list(flip_map)
    perm = given
    if given and isinstance(given[0], (tuple, list)):
        perm = list(range(num_keypoints))
        for pair in given:
            if len(pair) != 2 or not all(_is_index(k, num_keypoints) for k in pair):
                raise ValueError(f"flip_map pairs must be (i, j) with 0 <= i, j < {num_keypoints}, got {given}")
            i, j = (int(k) for k in pair)
            perm[i], perm[j] = j, i
    if sorted(perm) != list(range(num_keypoints)) or any(perm[j] != i for i, j in enumerate(perm)):
        raise ValueError(f"flip_map must be a permutation of range({num_keypoints}) that is its own inverse "
                         f"(left <-> right pairs, the rest fixed), got {given}")
    return perm


def _is_index(k, size: int) -> bool:
    """An integer in ``range(size)``: a Python or numpy one, not a bool."""
    return isinstance(k, numbers.Integral) and not isinstance(k, (bool, np.bool_)) and 0 <= k < size


def hflip(image: torch.Tensor, target: dict | None, flip_map=None
          ) -> tuple[torch.Tensor, dict | None]:
    """Mirror left-right; swap left/right keypoint types (``flip_map``: permutation or pairs).

    ``flip_map`` is needed only when ``target`` holds keypoints (a ``ValueError`` otherwise).
    """
    width = image.shape[-1]
    image = image.flip(-1)
    if target is None:
        return image, None
    target = dict(target)
    if "boxes" in target:
        boxes = target["boxes"].clone()
        boxes[:, 0], boxes[:, 2] = width - target["boxes"][:, 2], width - target["boxes"][:, 0]
        target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    if "keypoints" in target:
        kps = target["keypoints"].clone()  # (N, Kp, 3)
        labelled = kps[..., 2] > 0
        kps[..., 0] = torch.where(labelled, width - kps[..., 0], kps[..., 0])
        perm = _flip_permutation(flip_map, kps.shape[1])
        target["keypoints"] = kps[:, perm]  # the new "left" is the old "right"
    return image, target


def normalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(image - mean) / std per channel: ``mean``, ``std`` 3 numbers, or (3,) tensors on the image's device."""
    if not isinstance(mean, torch.Tensor):  # numbers: built on the host, queued to the device
        mean = host_to_device(torch.tensor(mean, dtype=image.dtype), image.device)
    if not isinstance(std, torch.Tensor):
        std = host_to_device(torch.tensor(std, dtype=image.dtype), image.device)
    return (image - mean[:, None, None]) / std[:, None, None]


def batch_images(images: list[torch.Tensor], size_divisible: int = 32
                 ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Zero-pad images (bottom/right) to a common size divisible by ``size_divisible``.

    Returns (B, 3, Hp, Wp) and each image's unpadded (h, w).
    """
    if not images:
        raise ValueError("images must be a non-empty list of (3, H, W) tensors")
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    pad_h = math.ceil(max(h for h, _ in sizes) / size_divisible) * size_divisible
    pad_w = math.ceil(max(w for _, w in sizes) / size_divisible) * size_divisible
    if all(size == (pad_h, pad_w) for size in sizes):  # nothing to pad: one copy, not one per image
        return torch.stack(images), sizes
    batch = images[0].new_zeros((len(images), images[0].shape[0], pad_h, pad_w))
    for im, out in zip(images, batch):
        out[:, : im.shape[-2], : im.shape[-1]].copy_(im)
    return batch, sizes


class Compose:
    def __init__(self, transforms: list):
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: dict | None):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


class RandomHorizontalFlip:
    """Flip with probability ``p`` (draws from torch's global generator: seed it)."""

    def __init__(self, p: float = 0.5, flip_map=None):
        self.p, self.flip_map = p, flip_map

    def __call__(self, image: torch.Tensor, target: dict | None):
        if torch.rand(()) < self.p:
            return hflip(image, target, self.flip_map)
        return image, target


class RandomResize:
    """Scale jitter: one shorter side drawn per image from ``min_sizes`` (e.g. 640..800)."""

    def __init__(self, min_sizes: tuple[int, ...], max_size: int):
        if not min_sizes:
            raise ValueError("min_sizes must hold at least one size")
        self.min_sizes, self.max_size = tuple(min_sizes), max_size

    def __call__(self, image: torch.Tensor, target: dict | None):
        min_size = self.min_sizes[int(torch.randint(len(self.min_sizes), ()))]
        image, target, _ = resize(image, target, min_size, self.max_size)
        return image, target
