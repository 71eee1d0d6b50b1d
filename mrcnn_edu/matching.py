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
        """``iou: (G, N)`` -> ``matched_idx: (N,)`` int64 in ``{0..G-1, BACKGROUND, IGNORED}``.

        A batch of images: ``iou: (B, G, N)`` -> ``(B, N)``, each image on its own. Images with
        fewer than ``G`` ground-truth boxes are padded with empty boxes, whose IoU is 0
        everywhere: such a row never wins a match (a best IoU of 0 is background) and never
        claims a low-quality match.
        """
        if not isinstance(iou, Tensor) or iou.dim() not in (2, 3):
            raise ValueError(f"iou must be a (G, N) or (B, G, N) tensor, got {getattr(iou, 'shape', type(iou))}")
        num_gt, num_boxes = iou.shape[-2:]
        if num_gt == 0 or num_boxes == 0:  # no objects: everything is background (or nothing to match)
            return torch.full(iou.shape[:-2] + iou.shape[-1:], BACKGROUND, dtype=torch.int64, device=iou.device)

        best_iou, matched_idx = iou.max(dim=-2)  # (..., N), (..., N)
        matched_idx = torch.where(best_iou < self.high_threshold, IGNORED, matched_idx)
        matched_idx = torch.where(best_iou < self.low_threshold, BACKGROUND, matched_idx)
        if self.allow_low_quality_matches:
            best_iou_per_gt = iou.max(dim=-1, keepdim=True).values  # (..., G, 1)
            # every anchor tied for a gt's best IoU, but only for gts that overlap something
            is_best = (iou == best_iou_per_gt) & (best_iou_per_gt > 0)  # (..., G, N)
            low_quality = is_best.any(dim=-2)  # (..., N)
            matched_idx = torch.where(low_quality, iou.argmax(dim=-2), matched_idx)
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
        """One image: boolean candidate masks ``(N,)`` -> sampled ``(pos_mask, neg_mask)`` ``(N,)``.

        A batch of images: ``(B, N)`` masks, a budget of ``batch_size_per_image`` for each row.
        The counts stay on the device (no host read, so no GPU sync), and the ops are the same
        whatever ``B``.
        """
        if positive.shape != negative.shape or positive.dim() not in (1, 2):
            raise ValueError(f"positive {tuple(positive.shape)} and negative {tuple(negative.shape)} "
                             f"must be (N,) or (B, N) masks")
        positive, negative = positive.bool(), negative.bool()
        max_pos = int(self.batch_size_per_image * self.positive_fraction)
        num_pos = positive.sum(dim=-1).clamp(max=max_pos)  # (...,)
        pos_mask = self._random_subset(positive, num_pos, max_pos, generator)
        # negatives fill the rest of the budget; fewer positives -> more negatives
        num_neg = torch.minimum(negative.sum(dim=-1), self.batch_size_per_image - num_pos)
        neg_mask = self._random_subset(negative, num_neg, self.batch_size_per_image, generator)
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
    def _random_subset(candidates: Tensor, count: Tensor, max_count: int,
                       generator: torch.Generator | None) -> Tensor:
        """A mask of ``count`` candidates per row, drawn uniformly without replacement.

        ``candidates: (..., N)`` bool, ``count: (...,)`` at most the row's candidates and at most
        ``max_count`` (a Python int, so that the shapes are known without reading ``count``).
        Each candidate gets a uniform random key; the ``count`` smallest keys of a row are a
        uniform random subset of its candidates (non-candidates get key 2, after every one).
        """
        draw_device = generator.device if generator is not None else candidates.device
        keys = torch.rand(candidates.shape, generator=generator, device=draw_device).to(candidates.device)
        keys = keys.masked_fill(~candidates, 2.0)
        k = min(max_count, candidates.shape[-1])
        order = keys.topk(k, dim=-1, largest=False, sorted=True).indices  # (..., k) candidates first
        take = torch.arange(k, device=candidates.device) < count[..., None]  # (..., k)
        return torch.zeros_like(candidates).scatter(-1, order, take)
