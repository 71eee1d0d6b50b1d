"""The Region Proposal Network (Faster R-CNN, Ren et al. 2015, §3.1; Mask R-CNN §3, §3.1).

Mask R-CNN's first stage is unchanged from Faster R-CNN: "The first stage, called a Region
Proposal Network (RPN), proposes candidate object bounding boxes" (§3). A small network slides
over the feature map(s): a 3×3 conv (+ ReLU) shared by every level, then two sibling 1×1
convs giving, for each of the ``A`` anchors of a cell, an objectness logit and 4 box deltas.

Training (Faster R-CNN §3.1.2): anchors are matched to ground truth (IoU >= 0.7 positive, the
best anchor of each box positive too, < 0.3 negative, see ``matching.py``); 256 anchors per image
are sampled, up to half positive; the loss is binary cross-entropy on objectness plus
smooth-L1 on the positive anchors' deltas. Proposals are then selected (top-k by objectness
per level, decode, clip, NMS at 0.7, top-k per image) and passed on *detached*: the box
branch does not back-propagate into the proposal coordinates (approximate joint training).

One departure, as in torchvision and Detectron2: Faster R-CNN §3.3 ignores anchors that
cross the image boundary during training; here every anchor takes part (proposals are clipped).

Notation: ``N`` images, ``L`` feature levels, level ``l`` of size ``(H_l, W_l)`` with ``A``
anchors per cell; ``N_a = sum_l H_l*W_l*A`` anchors per image, ordered ``(level, H, W, A)``
as in ``anchors.py``; ``G`` ground-truth boxes of an image. Objectness: ``(N, N_a)`` logits;
deltas: ``(N, N_a, 4)``.

Parameter names follow torchvision (``head.conv``, ``head.cls_logits``, ``head.bbox_pred``),
so its ``rpn.*`` weights load through :func:`rpn_state_dict_from_torchvision`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .anchors import AnchorGenerator
from .boxes import BoxCoder, box_iou, clip_boxes, large_boxes_mask, nms_in_images, pad_boxes
from .matching import BACKGROUND, BalancedSampler, Matcher

# rpn_targets matches at most this many (image, box, anchor) triples at once: box_iou and the
# matcher hold ~32 bytes of temporaries per triple, so ~1 GB (as boxes.NMS_PAIRS_PER_CHUNK)
RPN_PAIRS_PER_CHUNK = 2 ** 25

__all__ = [
    "RPNConfig", "fpn_rpn_config", "c4_rpn_config", "RPNHead", "rpn_targets", "rpn_loss",
    "select_proposals", "RPN", "rpn_state_dict_from_torchvision",
]


@dataclass
class RPNConfig:
    """RPN hyper-parameters; the defaults are the FPN set-up (Mask R-CNN §3.1 follows [27])."""

    fg_iou_thresh: float = 0.7  # Faster R-CNN §3.1.2: IoU >= 0.7 is a positive anchor
    bg_iou_thresh: float = 0.3  # Faster R-CNN §3.1.2: IoU < 0.3 with every box is negative
    batch_size_per_image: int = 256  # Faster R-CNN §3.1.3: 256 anchors per image
    positive_fraction: float = 0.5  # Faster R-CNN §3.1.3: "a ratio of up to 1:1"
    nms_thresh: float = 0.7  # Faster R-CNN §3.3: NMS on proposals at IoU 0.7
    pre_nms_top_n_train: int = 2000  # per level, FPN (Detectron / torchvision)
    pre_nms_top_n_test: int = 1000  # per level, FPN (Detectron / torchvision)
    post_nms_top_n_train: int = 2000  # per image (torchvision; Detectron counts per batch)
    post_nms_top_n_test: int = 1000  # Mask R-CNN §3.1: "1000 for FPN (as in [27])"
    min_size: float = 1e-3  # drop (near-)empty boxes after clipping (torchvision)
    score_thresh: float = 0.0  # objectness probability below which proposals are dropped
    box_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)  # Faster R-CNN eq. 2
    # torchvision / Detectron's choice, not stated in the papers: smooth-L1 with beta = 1/9 is
    # the Caffe "sigma = 3" loss of the original py-faster-rcnn code
    smooth_l1_beta: float = 1.0 / 9.0

    def __post_init__(self) -> None:
        for name in ("pre_nms_top_n_train", "pre_nms_top_n_test", "post_nms_top_n_train", "post_nms_top_n_test"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RPNConfig.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.nms_thresh <= 1.0:
            raise ValueError(f"RPNConfig.nms_thresh must be in [0, 1], got {self.nms_thresh}")

    def pre_nms_top_n(self, training: bool) -> int:
        return self.pre_nms_top_n_train if training else self.pre_nms_top_n_test

    def post_nms_top_n(self, training: bool) -> int:
        return self.post_nms_top_n_train if training else self.post_nms_top_n_test


def fpn_rpn_config(**overrides) -> RPNConfig:
    """FPN: 2000 / 1000 per level before NMS (train / test), 2000 / 1000 after (§3.1, [27])."""
    return RPNConfig(**overrides)


def c4_rpn_config(**overrides) -> RPNConfig:
    """C4 (one level): Detectron's 12000 / 6000 before NMS, 2000 after in training, and at
    test time Mask R-CNN §3.1's "the proposal number is 300 for the C4 backbone (as in [36])"."""
    values = dict(pre_nms_top_n_train=12000, pre_nms_top_n_test=6000,
                  post_nms_top_n_train=2000, post_nms_top_n_test=300)
    values.update(overrides)
    return RPNConfig(**values)


class RPNHead(nn.Module):
    """3×3 conv + ReLU shared over levels, then 1×1 objectness (A) and 1×1 deltas (4A).

    ``forward(features: list of (N, C, H_l, W_l))`` -> ``(objectness, deltas)``, lists of
    ``(N, A, H_l, W_l)`` and ``(N, 4A, H_l, W_l)``. Weights ~ N(0, 0.01²), biases 0
    (Faster R-CNN §3.1.3).
    """

    def __init__(self, in_channels: int, num_anchors: int) -> None:
        super().__init__()
        if in_channels <= 0 or num_anchors <= 0:
            raise ValueError(f"in_channels and num_anchors must be positive, got {in_channels}, {num_anchors}")
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4 * num_anchors, kernel_size=1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        objectness, deltas = [], []
        for feature in features:
            hidden = F.relu(self.conv(feature))
            objectness.append(self.cls_logits(hidden))  # (N, A, H, W)
            deltas.append(self.bbox_pred(hidden))  # (N, 4A, H, W)
        return objectness, deltas


def flatten_head_outputs(objectness: Tensor, deltas: Tensor) -> tuple[Tensor, Tensor]:
    """One level's head outputs in anchor order ``(H, W, A)``.

    ``(N, A, H, W)``, ``(N, 4A, H, W)`` -> ``(N, H*W*A)``, ``(N, H*W*A, 4)``.
    """
    n, a, h, w = objectness.shape
    objectness = objectness.permute(0, 2, 3, 1).reshape(n, h * w * a)  # (N, A, H, W) -> (N, H, W, A) -> (N, H*W*A)
    deltas = deltas.view(n, a, 4, h, w)  # (N, A, 4, H, W): torchvision / Detectron group the 4 deltas per anchor
    deltas = deltas.permute(0, 3, 4, 1, 2).reshape(n, h * w * a, 4)  # (N, H, W, A, 4) -> (N, H*W*A, 4)
    return objectness, deltas


def rpn_targets(anchors: Tensor, gt_boxes: Tensor, matcher: Matcher, box_coder: BoxCoder) -> tuple[Tensor, Tensor]:
    """Labels and regression targets for one image's anchors, or a batch of images'.

    ``anchors: (N_a, 4)``, ``gt_boxes: (G, 4)`` -> ``labels: (N_a,)`` float in {1 positive,
    0 negative, -1 ignored}, ``regression_targets: (N_a, 4)`` (deltas to the matched box for
    positives, zeros elsewhere -- only positives enter the loss).

    ``gt_boxes: (B, G, 4)`` (``boxes.pad_boxes``: images with fewer boxes padded with empty ones)
    -> ``(B, N_a)``, ``(B, N_a, 4)``: every image at once, in as many ops as one -- or, where
    ``B x G x N_a`` IoUs would pass ``RPN_PAIRS_PER_CHUNK`` (one crowded image pads every other
    to its ``G``: COCO at 800 px has ~270k anchors and up to ~90 boxes an image), a few images at
    a time, which bounds the IoU's temporaries at about a GB.
    """
    if gt_boxes.dim() not in (2, 3) or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must have shape (G, 4) or (B, G, 4), got {tuple(gt_boxes.shape)}")
    gt_boxes = gt_boxes.to(anchors)
    if gt_boxes.dim() == 3:
        per_chunk = max(1, RPN_PAIRS_PER_CHUNK // max(1, gt_boxes.shape[1] * anchors.shape[0]))
        if per_chunk < gt_boxes.shape[0]:
            parts = [rpn_targets(anchors, chunk, matcher, box_coder) for chunk in gt_boxes.split(per_chunk)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    reference = anchors.expand(gt_boxes.shape[:-2] + anchors.shape)  # (N_a, 4) or (B, N_a, 4)
    matched_idx = matcher(box_iou(gt_boxes, reference))  # (N_a,) or (B, N_a)
    positive = matched_idx >= 0
    labels = torch.where(positive, 1.0, torch.where(matched_idx == BACKGROUND, 0.0, -1.0)).to(anchors.dtype)
    if gt_boxes.shape[-2] == 0:
        return labels, torch.zeros_like(reference)
    # each anchor against its matched box, and every unmatched one against itself (zero deltas):
    # more arithmetic than encoding the positives alone, but no host read of how many there
    # are -- on a GPU that read would stall the queue
    matched_boxes = torch.gather(gt_boxes, -2, matched_idx.clamp(min=0)[..., None].expand(reference.shape))
    regression_targets = box_coder.encode(torch.where(positive[..., None], matched_boxes, reference), reference)
    return labels, regression_targets


def rpn_loss(objectness: Tensor, deltas: Tensor, labels: Tensor, regression_targets: Tensor,
             sampler: BalancedSampler, beta: float = 1.0 / 9.0,
             generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Faster R-CNN eq. 1 on ``sampler``'s anchors.

    ``objectness: (N, N_a)`` logits, ``deltas: (N, N_a, 4)``, ``labels: (N, N_a)`` in {1, 0, -1},
    ``regression_targets: (N, N_a, 4)``. ``loss_objectness`` is the BCE averaged over the sampled
    anchors; ``loss_rpn_box_reg`` is smooth-L1 summed over the sampled positives and divided by
    the number of sampled anchors (Detectron / torchvision's normalisation of eq. 1's λ term).
    """
    if objectness.shape != labels.shape or deltas.shape != regression_targets.shape \
            or deltas.shape[:2] != objectness.shape:
        raise ValueError(
            f"shapes disagree: objectness {tuple(objectness.shape)}, labels {tuple(labels.shape)}, "
            f"deltas {tuple(deltas.shape)}, regression_targets {tuple(regression_targets.shape)}"
        )
    pos_mask, neg_mask = sampler.sample(labels == 1, labels == 0, generator)  # (N, N_a): 256 per image
    sampled = pos_mask | neg_mask  # (N, N_a)
    num_sampled = sampled.sum().clamp(min=1)  # a tensor: no host read (a GPU sync) per step
    # Every anchor's loss, the unsampled ones zeroed: indexing by a boolean mask (objectness[sampled])
    # would ask the host how many are True -- a GPU sync each -- for a few hundred thousand cheap terms.
    bce = F.binary_cross_entropy_with_logits(objectness, labels.clamp(min=0).to(objectness.dtype), reduction="none")
    loss_objectness = torch.where(sampled, bce, 0.0).sum() / num_sampled
    # in the wider of the two dtypes: bf16 deltas (mixed precision) must not round the targets
    dtype = torch.promote_types(deltas.dtype, regression_targets.dtype)
    l1 = F.smooth_l1_loss(deltas.to(dtype), regression_targets.to(dtype), beta=beta, reduction="none").sum(-1)
    loss_box_reg = torch.where(pos_mask, l1, 0.0).sum() / num_sampled
    return {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box_reg}


@torch.no_grad()
def select_proposals(objectness: list[Tensor], deltas: list[Tensor], anchors: list[Tensor],
                     image_sizes: list[tuple[int, int]], cfg: RPNConfig,
                     training: bool) -> tuple[list[Tensor], list[Tensor]]:
    """Proposals from the RPN's outputs (Faster R-CNN §3.3, FPN §4.1).

    Per level: ``objectness[l]: (N, H_l*W_l*A)``, ``deltas[l]: (N, H_l*W_l*A, 4)``,
    ``anchors[l]: (H_l*W_l*A, 4)``. For each image: keep the ``pre_nms_top_n`` highest-scoring
    anchors of each level, decode them, clip to the image, drop boxes smaller than
    ``min_size`` or below ``score_thresh``, NMS at ``nms_thresh`` within each level, keep the
    ``post_nms_top_n`` best. Returns ``(proposals, scores)``: per image ``(R_i, 4)`` boxes and
    ``(R_i,)`` objectness probabilities, in decreasing score. No gradient flows through.
    """
    if not (len(objectness) == len(deltas) == len(anchors)):
        raise ValueError(f"need one objectness, deltas and anchors tensor per level, got "
                         f"{len(objectness)}, {len(deltas)}, {len(anchors)}")
    num_images = objectness[0].shape[0]
    if len(image_sizes) != num_images:
        raise ValueError(f"image_sizes has {len(image_sizes)} entries for {num_images} images")
    box_coder = BoxCoder(cfg.box_weights)
    pre_nms_top_n, post_nms_top_n = cfg.pre_nms_top_n(training), cfg.post_nms_top_n(training)

    # top-k per level, for the whole batch at once
    top_logits, top_deltas, top_anchors, level_sizes = [], [], [], []
    for level_logits, level_deltas, level_anchors in zip(objectness, deltas, anchors):
        k = min(pre_nms_top_n, level_logits.shape[1])
        logits, top_idx = level_logits.topk(k, dim=1)  # (N, k)
        top_logits.append(logits)
        top_deltas.append(torch.gather(level_deltas, 1, top_idx[..., None].expand(-1, -1, 4)))  # (N, k, 4)
        top_anchors.append(level_anchors[top_idx])  # (N, k, 4)
        level_sizes.append(k)
    chosen_deltas = torch.cat(top_deltas, dim=1).reshape(-1, 4)  # (N*K, 4)
    chosen_anchors = torch.cat(top_anchors, dim=1).reshape(-1, 4)  # (N*K, 4)
    # every level's boxes in one decode, in fp32 at least (so also under mixed precision)
    all_boxes = box_coder.decode(chosen_deltas, chosen_anchors)
    all_scores = torch.cat(top_logits, dim=1).to(all_boxes.dtype).sigmoid()  # (N, K), K = sum_l k_l
    all_boxes = clip_boxes(all_boxes.view(num_images, -1, 4), image_sizes)  # (N, K, 4)
    valid = large_boxes_mask(all_boxes, cfg.min_size) & (all_scores >= cfg.score_thresh)  # (N, K)

    # NMS per level (FPN / torchvision: levels are scored independently), every image at once;
    # the tiny and low-scoring boxes are left out as masks, not dropped (which is a host read)
    keep = []
    for level_boxes, level_scores, level_valid in zip(all_boxes.split(level_sizes, dim=1),
                                                      all_scores.split(level_sizes, dim=1),
                                                      valid.split(level_sizes, dim=1)):
        keep.append(nms_in_images(level_boxes, level_scores, cfg.nms_thresh, level_valid))  # (N, k_l)
    keep = torch.cat(keep, dim=1)  # (N, K)
    # each image's post_nms_top_n best kept boxes, in decreasing score (equal scores: index order)
    ranked = torch.where(keep, all_scores, -torch.inf).sort(dim=1, descending=True, stable=True).indices
    ranked = ranked[:, :post_nms_top_n]  # (N, T)
    num_kept = keep.sum(dim=1).clamp(max=post_nms_top_n).tolist()  # the one host read
    # gathered for every image at once; each image's first num_kept are its proposals (views)
    ranked_boxes = torch.gather(all_boxes, 1, ranked[..., None].expand(-1, -1, 4))  # (N, T, 4)
    ranked_scores = torch.gather(all_scores, 1, ranked)  # (N, T)
    proposals = [boxes[:n] for boxes, n in zip(ranked_boxes, num_kept)]
    scores = [image_scores[:n] for image_scores, n in zip(ranked_scores, num_kept)]
    return proposals, scores


class RPN(nn.Module):
    """Anchors -> head -> (losses) and proposals.

    ``forward(features, image_sizes, targets=None)``: ``features`` a list of ``(N, C, H_l, W_l)``
    maps (one for C4 / C5, P2..P6 for FPN), ``image_sizes`` the ``(h, w)`` of each image before
    padding, ``targets`` a list of dicts with ``"boxes": (G_i, 4)``. Returns
    ``(proposals: list of (R_i, 4), losses: dict)``. In training mode targets are required; in
    eval mode losses are computed only if targets are given. ``self.training`` picks the
    train or test proposal counts. The last ``select_proposals`` scores are kept in
    ``self.last_proposal_scores`` for inspection (notebook 02).
    """

    def __init__(self, cfg: RPNConfig, anchor_generator: AnchorGenerator, head: RPNHead) -> None:
        super().__init__()
        # one head serves every level (FPN §4.1), so every level needs its A anchors per cell
        per_cell = anchor_generator.num_anchors_per_cell
        if any(a != head.cls_logits.out_channels for a in per_cell):
            raise ValueError(f"the anchor generator has {per_cell} anchors per cell on its levels, the "
                             f"RPN head predicts {head.cls_logits.out_channels}: every level must carry as "
                             "many anchors per cell as the head (set the anchor sizes and aspect_ratios so)")
        self.cfg = cfg
        self.anchor_generator = anchor_generator
        self.head = head
        self.matcher = Matcher(cfg.fg_iou_thresh, cfg.bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedSampler(cfg.batch_size_per_image, cfg.positive_fraction)
        self.box_coder = BoxCoder(cfg.box_weights)
        self.last_proposal_scores: list[Tensor] = []

    def forward(self, features: Sequence[Tensor] | Mapping[str, Tensor], image_sizes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None,
                generator: torch.Generator | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
        if isinstance(features, Mapping):  # {"p2": ..., "p6": ...} or {"c4": ...}, finest first
            features = list(features.values())
        if self.training and targets is None:
            raise ValueError("targets are required in training mode (list of dicts with 'boxes')")
        if len(features) != len(self.anchor_generator.strides):
            raise ValueError(f"features has {len(features)} levels, "
                             f"the anchor generator {len(self.anchor_generator.strides)}")
        anchors = self.anchor_generator([tuple(f.shape[-2:]) for f in features])  # L x (H_l*W_l*A, 4)
        raw_objectness, raw_deltas = self.head(features)
        flat = [flatten_head_outputs(o, d) for o, d in zip(raw_objectness, raw_deltas)]
        objectness = [o for o, _ in flat]  # L x (N, H_l*W_l*A)
        deltas = [d for _, d in flat]  # L x (N, H_l*W_l*A, 4)

        proposals, self.last_proposal_scores = select_proposals(
            [o.detach() for o in objectness], [d.detach() for d in deltas], anchors, image_sizes,
            self.cfg, self.training)

        losses: dict[str, Tensor] = {}
        if targets is not None:
            if len(targets) != len(image_sizes):
                raise ValueError(f"targets has {len(targets)} entries for {len(image_sizes)} images")
            all_anchors = torch.cat(anchors)  # (N_a, 4)
            gt_boxes = pad_boxes([t["boxes"].to(all_anchors) for t in targets])  # (N, max G_i, 4)
            labels, regression_targets = rpn_targets(all_anchors, gt_boxes, self.matcher, self.box_coder)
            losses = rpn_loss(torch.cat(objectness, dim=1), torch.cat(deltas, dim=1),  # (N, N_a), (N, N_a, 4)
                              labels, regression_targets, self.sampler,  # (N, N_a), (N, N_a, 4)
                              beta=self.cfg.smooth_l1_beta, generator=generator)
        return proposals, losses


def rpn_state_dict_from_torchvision(state_dict: dict[str, Tensor], prefix: str = "rpn.") -> dict[str, Tensor]:
    """The :class:`RPN` state dict from a torchvision Faster / Mask R-CNN state dict.

    torchvision >= 0.13 names the shared conv ``rpn.head.conv.0.0.*`` (a Conv2dNormActivation
    inside a Sequential), older versions ``rpn.head.conv.*``; both map to ``head.conv.*``.
    ``cls_logits`` and ``bbox_pred`` have the same names here. Note torchvision's anchors sit on
    cell corners with rounded sizes: build the generator with ``offset=0.0, round_cell=True``.
    """
    mapped = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix + "head."):
            continue
        name = key[len(prefix):].replace("head.conv.0.0.", "head.conv.")
        mapped[name] = value
    if not mapped:
        raise ValueError(f"state_dict has no keys starting with {prefix + 'head.'!r}")
    return mapped
