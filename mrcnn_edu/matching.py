"""Matching anchors / RoIs to ground truth, and the balanced sampler that picks the mini-batch.

Two places in Mask R-CNN decide which reference box "belongs" to which ground-truth box:

- **RPN anchors** (Faster R-CNN §3.1.2, kept by Mask R-CNN §3.1): an anchor is positive if
  its IoU with some ground-truth box is >= 0.7, or if it is "the anchor/anchors with the
  highest IoU overlap with a ground-truth box" (so that every object gets at least one
  anchor); negative if its IoU is < 0.3 for all ground-truth boxes; anchors in between are
  ignored. 256 anchors are sampled per image, "the sampled positive and negative anchors have
  a ratio of up to 1:1".
- **RoIs of the box branch** (Mask R-CNN §3.1): "an RoI is considered positive if it has IoU
  with a ground-truth box of at least 0.5 and negative otherwise"; N RoIs per image are
  sampled "with a ratio of 1:3 of positive to negatives".

Both are a :class:`Matcher` (thresholds) followed by a :class:`BalancedSampler` (budget and
positive fraction).

Notation: ``G`` ground-truth boxes, ``N`` anchors or proposals of one image;
``iou: (G, N)``; ``matched_idx: (N,)`` int64 holding the index of the matched ground-truth
box, or :data:`BACKGROUND` (-1) or :data:`IGNORED` (-2).

Surprises, written down where they are decided:

- A low-quality match takes the anchor's *own* best ground-truth box (its argmax over G),
  not necessarily the box it was the best anchor for; Detectron and torchvision do the same.
- A ground-truth box that overlaps no anchor at all (best IoU 0) gets no low-quality match:
  otherwise every anchor (all tied at IoU 0) would become positive. Detectron / torchvision
  would mark them all; the paper's rule ("the highest IoU overlap") is meaningless there.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BACKGROUND", "IGNORED", "Matcher", "BalancedSampler"]

BACKGROUND = -1  # IoU below the low threshold with every ground-truth box
IGNORED = -2  # IoU between the thresholds: neither positive nor negative, not sampled


class Matcher:
    """Assign each of N anchors / proposals to a ground-truth box by IoU.

    ``high_threshold``: IoU >= it is a match (0.7 for the RPN, 0.5 for RoIs).
    ``low_threshold``: IoU < it is background (0.3 for the RPN, 0.5 for RoIs);
    values in ``[low, high)`` are :data:`IGNORED`.
    ``allow_low_quality_matches``: also match each ground-truth box's best anchors, ties
    included (Faster R-CNN §3.1.2; True for the RPN, False for RoIs).
    """

    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False) -> None:
        if not 0.0 <= low_threshold <= high_threshold <= 1.0:
            raise ValueError(
                f"need 0 <= low_threshold <= high_threshold <= 1, got low_threshold={low_threshold}, "
                f"high_threshold={high_threshold}"
            )
        self.high_threshold = float(high_threshold)
        self.low_threshold = float(low_threshold)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __call__(self, iou: Tensor) -> Tensor:
        """``iou: (G, N)`` -> ``matched_idx: (N,)`` int64 in ``{0..G-1, BACKGROUND, IGNORED}``."""
        if not isinstance(iou, Tensor) or iou.dim() != 2:
            raise ValueError(f"iou must be a (G, N) tensor, got {getattr(iou, 'shape', type(iou))}")
        num_gt, num_boxes = iou.shape
        if num_gt == 0:  # an image without objects: everything is background
            return torch.full((num_boxes,), BACKGROUND, dtype=torch.int64, device=iou.device)
        if num_boxes == 0:
            return torch.empty(0, dtype=torch.int64, device=iou.device)

        best_iou, matched_idx = iou.max(dim=0)  # (N,), (N,)
        matched_idx = matched_idx.clone()
        matched_idx[best_iou < self.high_threshold] = IGNORED
        matched_idx[best_iou < self.low_threshold] = BACKGROUND
        if self.allow_low_quality_matches:
            best_iou_per_gt = iou.max(dim=1).values  # (G,)
            # every anchor tied for a gt's best IoU, but only for gts that overlap something
            is_best = (iou == best_iou_per_gt[:, None]) & (best_iou_per_gt[:, None] > 0)  # (G, N)
            low_quality = is_best.any(dim=0)  # (N,)
            matched_idx[low_quality] = iou.argmax(dim=0)[low_quality]
        return matched_idx


class BalancedSampler:
    """Sample at most ``batch_size_per_image`` boxes per image, at most a ``positive_fraction``
    of them positive; negatives fill the rest (Fast R-CNN §2.3, Faster R-CNN §3.1.3).

    RPN: 256 per image, fraction 0.5. Box branch: 512 (FPN) or 64 (C4), fraction 0.25.
    If an image has too few positives, more negatives are taken; if it has too few of both,
    the batch is simply smaller. The choice is uniform at random; pass a ``torch.Generator``
    for reproducible draws.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        if batch_size_per_image <= 0:
            raise ValueError(f"batch_size_per_image must be positive, got {batch_size_per_image}")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)

    def sample(self, positive: Tensor, negative: Tensor,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """One image: boolean candidate masks ``(N,)`` -> sampled ``(pos_mask, neg_mask)`` ``(N,)``."""
        if positive.shape != negative.shape or positive.dim() != 1:
            raise ValueError(f"positive {tuple(positive.shape)} and negative {tuple(negative.shape)} must be (N,) masks")
        positive_idx = torch.nonzero(positive).flatten()
        negative_idx = torch.nonzero(negative).flatten()
        num_pos = min(positive_idx.numel(), int(self.batch_size_per_image * self.positive_fraction))
        num_neg = min(negative_idx.numel(), self.batch_size_per_image - num_pos)
        pos_mask = torch.zeros_like(positive, dtype=torch.bool)
        neg_mask = torch.zeros_like(negative, dtype=torch.bool)
        pos_mask[positive_idx[self._random_subset(positive_idx.numel(), num_pos, generator, positive.device)]] = True
        neg_mask[negative_idx[self._random_subset(negative_idx.numel(), num_neg, generator, negative.device)]] = True
        return pos_mask, neg_mask

    def __call__(self, matched_idxs: list[Tensor],
                 generator: torch.Generator | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """``matched_idxs``: one :class:`Matcher` output ``(N_i,)`` per image (>= 0 positive,
        ``BACKGROUND`` negative, ``IGNORED`` neither) -> per-image ``pos_masks``, ``neg_masks``."""
        pos_masks, neg_masks = [], []
        for matched_idx in matched_idxs:
            pos_mask, neg_mask = self.sample(matched_idx >= 0, matched_idx == BACKGROUND, generator)
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks

    @staticmethod
    def _random_subset(n: int, k: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """``k`` distinct indices out of ``range(n)``, drawn on the generator's device."""
        draw_device = generator.device if generator is not None else device
        return torch.randperm(n, generator=generator, device=draw_device)[:k].to(device)
