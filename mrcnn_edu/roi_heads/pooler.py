"""The RoI pooler: which feature map each RoI is pooled from, and with which op.

Mask R-CNN §3 "Network Architecture": with FPN, "we assign an RoI of width w and height h (on the
input image to the network) to the level Pk of our feature pyramid by" (FPN paper, eq. 1)

    k = floor(k0 + log2(sqrt(w h) / 224)),   k0 = 4,

clamped to the available levels (P2..P5 in the paper). 224 is the canonical ImageNet size: an
RoI of 224x224 goes to P4 and one half as large to P3. With a single feature map (C4 / C5
backbones) every RoI is pooled from it.

The op is one of Table 2c's rows: RoIPool (max), RoIWarp (max / avg), RoIAlign (max / avg);
``aligned`` picks the half-pixel convention (see ``ops/roi_align.py``).

Shapes: ``features``: list of ``(N, C, H_l, W_l)``, one per level, finest first, with
``scales[l] = 1 / stride_l``; ``rois (R, 5)`` ``[batch_index, x1, y1, x2, y2]`` in image pixels;
output ``(R, C, oh, ow)`` in the input order of ``rois``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from mrcnn_edu.ops.roi_align import boxes_to_rois, check_roi_inputs, roi_align
from mrcnn_edu.ops.roi_pool import roi_pool, roi_warp

__all__ = ["PoolerConfig", "fpn_level", "pool_rois", "RoIPooler"]


@dataclass
class PoolerConfig:
    kind: str = "roi_align"  # Table 2c: "roi_pool" | "roi_warp" | "roi_align" (the paper's)
    mode: str = "avg"  # Table 2c: "insensitive to max/average pool; we use average"
    # §3: "four regularly sampled locations in each RoI bin" = 2x2 points, what Detectron's
    # Mask R-CNN configs set (ROI_XFORM_SAMPLING_RATIO: 2; its config.py default is 0, the
    # adaptive grid). <= 0 = adaptive ceil(roi_size / output_size), torchvision's op default (-1)
    sampling_ratio: int = 2
    aligned: bool = True  # the paper's definition; False = legacy Detectron / torchvision
    canonical_size: float = 224.0  # FPN eq. 1: ImageNet pre-training size
    canonical_level: int = 4  # FPN eq. 1: k0, the level a canonical-size RoI maps to

    def __post_init__(self):
        if self.kind not in ("roi_pool", "roi_warp", "roi_align"):
            raise ValueError(f"PoolerConfig.kind must be 'roi_pool', 'roi_warp' or 'roi_align', "
                             f"got {self.kind!r}")
        if self.mode not in ("avg", "max"):
            raise ValueError(f"PoolerConfig.mode must be 'avg' or 'max', got {self.mode!r}")


def fpn_level(boxes: Tensor, k_min: int = 2, k_max: int = 5, canonical_size: float = 224.0,
              canonical_level: int = 4, eps: float = 1e-6) -> Tensor:
    """FPN eq. 1: ``(R, 4)`` xyxy boxes -> ``(R,)`` int64 pyramid levels in ``[k_min, k_max]``.

    ``eps`` is added inside the logarithm, ``log2(sqrt(area) / canonical_size + eps)``, as in
    Detectron (``1e-6``) and Detectron2 (``1e-8``): it keeps ``log2`` finite for empty boxes
    (they land on ``k_min``). torchvision's ``LevelMapper`` adds its ``eps = 1e-6`` outside
    instead, ``floor(k0 + log2(sqrt(area) / canonical_size) + eps)``. Both lift a box whose
    log2 lands a hair below a level boundary (rounding) to the upper level, by different
    amounts (outside: 1e-6; inside: ``eps / (ln 2 * sqrt(area) / canonical_size)``, 2.9e-6 at
    112 px): they disagree only on boxes within ~1e-5 (relative) of a level boundary (112,
    224 or 448 px by default).
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (R, 4), got {tuple(boxes.shape)}")
    if k_min > k_max:
        raise ValueError(f"k_min ({k_min}) must not exceed k_max ({k_max})")
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0)  # (R,)
    level = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_size + eps))
    return level.clamp(k_min, k_max).to(torch.int64)


def _pool_one_level(cfg: PoolerConfig, feature: Tensor, rois: Tensor, output_size,
                    scale: float, check_values: bool = True) -> Tensor:
    if cfg.kind == "roi_pool":
        return roi_pool(feature, rois, output_size, scale, check_values=check_values)
    if cfg.kind == "roi_warp":
        return roi_warp(feature, rois, output_size, scale, cfg.sampling_ratio, cfg.mode,
                        check_values=check_values)
    return roi_align(feature, rois, output_size, scale, cfg.sampling_ratio, cfg.aligned,
                     cfg.mode, check_values=check_values)


def _levels_from_scales(scales: Sequence[float]) -> list[int]:
    """``[1/4, 1/8, ...]`` -> ``[2, 3, ...]``; consecutive powers of two, finest first."""
    levels = [-math.log2(s) if s > 0 else math.nan for s in scales]
    rounded = [round(k) if math.isfinite(k) else None for k in levels]
    ok = all(r is not None and abs(k - r) < 1e-6 for k, r in zip(levels, rounded))
    if not ok or rounded != list(range(rounded[0], rounded[0] + len(scales))):
        raise ValueError(f"scales must be consecutive powers of 1/2, finest first (e.g. "
                         f"[1/4, 1/8, 1/16, 1/32]) for several levels, got {list(scales)}")
    return rounded


def pool_rois(cfg: PoolerConfig, features: Sequence[Tensor], rois: Tensor,
              output_size: Union[int, Sequence[int]], scales: Sequence[float],
              check_values: bool = True) -> Tensor:
    """Pool every RoI from its FPN level (or the single map): ``(R, C, oh, ow)``, input order.

    ``check_values``: validate the RoIs' values (see ``roi_align``); ``RoIPooler`` skips it, as
    it builds the RoIs itself from the model's own boxes.
    """
    if len(features) == 0 or len(features) != len(scales):
        raise ValueError(f"features ({len(features)} maps) and scales ({len(scales)}) must be "
                         f"non-empty lists of the same length")
    if len(features) == 1:
        return _pool_one_level(cfg, features[0], rois, output_size, scales[0], check_values)
    levels = _levels_from_scales(scales)
    if not isinstance(rois, Tensor) or rois.dim() != 2 or rois.shape[1] != 5:
        shape = tuple(rois.shape) if isinstance(rois, Tensor) else type(rois).__name__
        raise ValueError(f"rois must have shape (R, 5), got {shape}")
    if check_values:  # before fpn_level, which maps a nan box to a nonsense level; rows as given
        check_roi_inputs(features[0], rois, output_size, scales[0], cfg.mode, check_values=True)
        check_values = False
    level_of_roi = fpn_level(rois[:, 1:], levels[0], levels[-1], cfg.canonical_size,
                             cfg.canonical_level) - levels[0]  # (R,) index into features
    # RoIs sorted by level, then one slice per level: a single host read (the counts) for all
    # levels, where a mask per level would be one GPU sync each
    order = torch.argsort(level_of_roi, stable=True)  # (R,)
    counts = torch.bincount(level_of_roi, minlength=len(features)).tolist()
    sorted_rois = rois[order]
    pooled = [_pool_one_level(cfg, feature, level_rois, output_size, scale, check_values)
              for feature, scale, level_rois in zip(features, scales, sorted_rois.split(counts))]
    return torch.cat(pooled)[torch.argsort(order)]  # (R, C, oh, ow), the RoIs' input order


class RoIPooler(nn.Module):
    """``forward(features, boxes per image) -> (R, C, oh, ow)``; see ``pool_rois``."""

    def __init__(self, cfg: PoolerConfig, output_size: Union[int, Sequence[int]],
                 scales: Sequence[float]):
        super().__init__()
        self.cfg, self.output_size, self.scales = cfg, output_size, list(scales)

    def forward(self, features: Union[Sequence[Tensor], Mapping[str, Tensor]],
                boxes: Sequence[Tensor]) -> Tensor:
        if isinstance(features, Mapping):
            features = list(features.values())
        rois = boxes_to_rois(boxes)  # (R, 5), batch indices right by construction
        return pool_rois(self.cfg, list(features), rois, self.output_size, self.scales,
                         check_values=False)

    def extra_repr(self) -> str:
        return f"{self.cfg}, output_size={self.output_size}, scales={self.scales}"
