"""The box branch: RoI sampling, the res5 / 2-fc heads of Figure 4, loss and post-processing.

Mask R-CNN §3: "The second stage, which is in essence Fast R-CNN, extracts features using
RoIPool from each candidate box and performs classification and bounding-box regression."
Its heads (Figure 4): with a ResNet **C4** backbone the RoI features on res4 go through
ResNet's fifth stage ``res5`` and a global average pool; with **FPN** two hidden 1024-d fully
connected layers ("2-fc") follow a 7×7 RoI feature. Both end in the *predictor*: a (K+1)-way
classifier and class-specific box deltas.

res5 gives 7×7 per RoI either way (``RES5_OUTPUT_SIZE``), from one of two poolings
(``BoxHeadConfig.res5_first_stride``): 14×14 RoIs into a first block of stride 2, as in ResNet
[19] and Detectron (our default), or 7×7 RoIs into stride 1, the paper's own variant: "'res5'
..., which for simplicity we altered so that the first conv operates on a 7×7 RoI with stride 1
(instead of 14×14 / stride 2 as in [19])" (Figure 4 caption).

Training (§3.1): "an RoI is considered positive if it has IoU with a ground-truth box of at
least 0.5 and negative otherwise"; each image has "N sampled RoIs, with a ratio of 1:3 of
positive to negatives. N is 64 for the C4 backbone and 512 for FPN". As in Detectron and
torchvision the ground-truth boxes are added to the proposals before sampling, so every
object has at least one positive RoI from the first iteration on.

Inference (§3.1): "We run the box prediction branch on these proposals, followed by
non-maximum suppression"; the 100 highest-scoring detections go on to the mask branch.

Notation: ``R`` RoIs (all images together, ``R_i`` of image i), ``K`` object classes,
labels ``0..K`` with 0 the background, ``class_logits: (R, K+1)``,
``box_deltas: (R, 4*(K+1))`` (class-specific) or ``(R, 4)`` (class-agnostic).

Sharing with the mask branch: :meth:`BoxBranch.forward` in training also returns a
:class:`PositiveRoIs` holding, per image, the positive RoIs (the first ``P_i`` rows of the
sampled RoIs), their labels and matched ground-truth indices; for a res5 head it also holds
the positives' ``(sum P_i, 2048, 7, 7)`` res5 output, which the C4 mask head of Figure 4 (left)
consumes without recomputing res5. At test time the mask branch runs on the detections:
:meth:`BoxBranch.res5_features` pools and runs res5 for any boxes.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..boxes import BoxCoder, batched_nms, box_iou, clip_boxes, pad_boxes, pad_rows, remove_small_boxes
from ..device import host_to_device
from ..matching import BACKGROUND, BalancedSampler, Matcher

__all__ = [
    "RES5_OUTPUT_SIZE", "BoxHeadConfig", "sample_rois", "box_loss", "postprocess_detections", "TwoFCHead",
    "Res5Head", "BoxPredictor", "PositiveRoIs", "BoxBranch",
]


RES5_OUTPUT_SIZE = 7  # Figure 4 left: res5's map per RoI is 7×7, which the C4 mask head deconvolves to 14×14


@dataclass
class BoxHeadConfig:
    """Box-branch hyper-parameters; defaults are the FPN set-up (see :func:`c4_box_head_config`)."""

    fg_iou_thresh: float = 0.5  # §3.1: positive if IoU >= 0.5 ...
    bg_iou_thresh: float = 0.5  # ... "and negative otherwise"
    batch_size_per_image: int = 512  # §3.1: N = 512 for FPN (64 for C4)
    positive_fraction: float = 0.25  # §3.1: "a ratio of 1:3 of positive to negatives"
    box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)  # Detectron's target scaling
    smooth_l1_beta: float = 1.0  # Fast R-CNN eq. 3 (torchvision uses 1/9, Detectron2 0)
    score_thresh: float = 0.05  # Detectron / torchvision test-time score threshold
    # §3.1 names NMS [14], not its threshold. 0.5 is the Appendix's "updated baseline" ("We also
    # change the NMS threshold to 0.5 (from a default value of 0.3)"), as in Detectron's released
    # configs and torchvision; the paper's main results, before that update, used 0.3
    nms_thresh: float = 0.5
    detections_per_img: int = 100  # §3.1: "the highest scoring 100 detection boxes"
    min_size: float = 1e-2  # drop degenerate boxes after clipping (torchvision)
    head: str = "2fc"  # Figure 4: "res5" (C4) or "2fc" (FPN; C5 too, §4.2)
    fc_dim: int = 1024  # Figure 4 right: two 1024-d fc layers
    pooler_resolution: int = 7  # 7×7 for 2fc; for res5, 7 × res5_first_stride, so that res5 gives 7×7
    class_specific: bool = True  # one box regressor per class (Fast R-CNN)
    # stride of res5's first block: 2 on 14×14 RoIs as in ResNet [19] and Detectron (the C4
    # results here were trained so); 1 on 7×7 RoIs, the paper's simplification (Figure 4 caption)
    res5_first_stride: int = 2

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError for a setting no head can run (again after fields were edited in place)."""
        if self.head not in ("res5", "2fc"):
            raise ValueError(f"BoxHeadConfig.head must be 'res5' or '2fc', got {self.head!r}")
        if self.batch_size_per_image <= 0 or self.detections_per_img <= 0:
            raise ValueError("BoxHeadConfig.batch_size_per_image and detections_per_img must be positive")
        if self.res5_first_stride not in (1, 2):
            raise ValueError(f"BoxHeadConfig.res5_first_stride must be 1 or 2, got {self.res5_first_stride}")
        pooled = RES5_OUTPUT_SIZE * self.res5_first_stride  # res5 divides the RoI's side by its stride
        if self.head == "res5" and self.pooler_resolution != pooled:
            raise ValueError(
                f"BoxHeadConfig: head='res5' with res5_first_stride={self.res5_first_stride} needs "
                f"pooler_resolution={pooled}, so that res5 gives {RES5_OUTPUT_SIZE}×{RES5_OUTPUT_SIZE} (Figure 4 "
                f"left; 14 with stride 2 as in [19], 7 with stride 1 as the paper), got {self.pooler_resolution}")


def c4_box_head_config(**overrides) -> BoxHeadConfig:
    """C4: res5 head, 64 sampled RoIs per image (§3.1: "N is 64 for the C4 backbone").

    RoIs are pooled to 7 × ``res5_first_stride``: 14×14 into a stride-2 res5 by default (ResNet
    [19], Detectron), 7×7 with ``res5_first_stride=1`` (Figure 4 left).
    """
    stride = overrides.get("res5_first_stride", BoxHeadConfig.res5_first_stride)
    values = dict(head="res5", batch_size_per_image=64, pooler_resolution=RES5_OUTPUT_SIZE * stride)
    values.update(overrides)
    return BoxHeadConfig(**values)


def sample_rois(proposals: list[Tensor], targets: list[dict[str, Tensor]], matcher: Matcher,
                sampler: BalancedSampler, box_coder: BoxCoder, add_gt_as_proposals: bool = True,
                generator: torch.Generator | None = None
                ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """The RoIs the box branch trains on, per image.

    ``proposals[i]: (R_i, 4)``, ``targets[i]``: ``"boxes" (G_i, 4)``, ``"labels" (G_i,)`` in 1..K.
    Returns per image ``rois (S_i, 4)``, ``labels (S_i,)`` int64 (0 background),
    ``regression_targets (S_i, 4)`` (zeros for background) and ``matched_gt_idx (S_i,)``
    (-1 for background). The ``P_i`` positives come first, then the negatives, each in the
    order of the candidates (the proposals, then the ground-truth boxes).

    All images are matched and sampled together, padded to the longest (a fixed number of ops
    whatever the batch; one host read, of the ``S_i``, to split the result per image).
    """
    if not proposals and not targets:
        return [], [], [], []
    padded, counts = sample_rois_padded(proposals, targets, matcher, sampler, box_coder,
                                        add_gt_as_proposals, generator)
    return split_rows(padded, counts[0].tolist())  # the one host read


def sample_rois_padded(proposals: list[Tensor], targets: list[dict[str, Tensor]], matcher: Matcher,
                       sampler: BalancedSampler, box_coder: BoxCoder, add_gt_as_proposals: bool = True,
                       generator: torch.Generator | None = None
                       ) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """:func:`sample_rois` before the split per image, with no host read.

    Returns ``(rois (B, S, 4), labels (B, S), regression_targets (B, S, 4), matched_gt_idx
    (B, S))``, image ``i``'s ``S_i`` sampled RoIs in its first ``S_i`` columns, and ``counts
    (2, B)``: ``S_i`` and the positives ``P_i``, for the caller to read in one go.
    """
    if len(proposals) != len(targets):
        raise ValueError(f"proposals has {len(proposals)} images, targets {len(targets)}")
    if not proposals:
        raise ValueError("proposals must hold at least one image")
    for image, target in enumerate(targets):
        if "boxes" not in target or "labels" not in target:
            raise ValueError(f"targets[{image}] needs 'boxes' and 'labels', got keys {sorted(target)}")
        if target["labels"].shape != target["boxes"].shape[:1]:
            raise ValueError(f"targets[{image}]: labels {tuple(target['labels'].shape)} "
                             f"do not match boxes {tuple(target['boxes'].shape)}")
    reference = proposals[0]
    gt_boxes = pad_boxes([t["boxes"].to(reference) for t in targets])  # (B, G, 4)
    gt_labels = pad_rows([t["labels"].to(reference.device, torch.int64) for t in targets])  # (B, G)
    candidates = [p.detach() for p in proposals]
    if add_gt_as_proposals:
        candidates = [torch.cat([p, t["boxes"].to(p)]) for p, t in zip(candidates, targets)]  # (R_i + G_i, 4)
    num_candidates = [c.shape[0] for c in candidates]
    candidates = pad_boxes(candidates)  # (B, M, 4), M = max(R_i + G_i)
    # padding rows are neither positive nor negative (built on the host: no device read, no sync)
    is_real = host_to_device(torch.arange(candidates.shape[1])[None, :] < torch.tensor(num_candidates)[:, None],
                             reference.device)
    # nor are boxes of no area: a ground truth squeezed to nothing by the resize (it lay in the
    # last fraction of a pixel that floor(H * s) drops) would otherwise be a negative on its object
    is_real = is_real & (candidates[..., 2] > candidates[..., 0]) & (candidates[..., 3] > candidates[..., 1])

    matched_idx = matcher(box_iou(gt_boxes, candidates))  # (B, M)
    pos_mask, neg_mask = sampler.sample((matched_idx >= 0) & is_real, (matched_idx == BACKGROUND) & is_real,
                                        generator)  # (B, M) each, at most batch_size_per_image per row
    # positives first, then negatives, then the rest; a stable sort keeps the candidates' order
    rank = torch.where(pos_mask, 0, torch.where(neg_mask, 1, 2))
    num_columns = min(sampler.batch_size_per_image, candidates.shape[1])
    chosen = rank.argsort(dim=1, stable=True)[:, :num_columns]  # (B, S) with S >= every S_i
    positive = torch.gather(pos_mask, 1, chosen)  # (B, S)
    rois = torch.gather(candidates, 1, chosen[..., None].expand(-1, -1, 4))  # (B, S, 4)
    matched = torch.where(positive, torch.gather(matched_idx, 1, chosen), -1)  # (B, S)
    labels = torch.zeros_like(matched)
    regression_targets = torch.zeros_like(rois)
    if gt_boxes.shape[1] > 0:  # some image has objects
        gt_index = matched.clamp(min=0)  # the background rows read gt 0, then are masked out
        labels = torch.where(positive, torch.gather(gt_labels, 1, gt_index), 0)
        matched_boxes = torch.gather(gt_boxes, 1, gt_index[..., None].expand(-1, -1, 4))
        # every row encoded, the negatives' and padding's then zeroed: no host read of which is which
        regression_targets = torch.where(positive[..., None], box_coder.encode(matched_boxes, rois), 0.0)
    counts = torch.stack([(pos_mask | neg_mask).sum(dim=1), pos_mask.sum(dim=1)])  # (2, B)
    return (rois, labels, regression_targets, matched), counts


def split_rows(padded: tuple[Tensor, ...], counts: list[int]) -> tuple[list[Tensor], ...]:
    """Each ``(B, S, ...)`` tensor -> a list of ``B`` views, image ``i``'s first ``counts[i]`` rows."""
    return tuple([rows[:n] for rows, n in zip(tensor, counts)] for tensor in padded)


def box_loss(class_logits: Tensor, box_deltas: Tensor, labels: Tensor, regression_targets: Tensor,
             beta: float = 1.0) -> dict[str, Tensor]:
    """Fast R-CNN's multi-task loss (eq. 1) = Mask R-CNN's ``L_cls + L_box`` (§3).

    ``class_logits: (R, K+1)``, ``box_deltas: (R, 4*(K+1))`` or ``(R, 4)``, ``labels: (R,)``,
    ``regression_targets: (R, 4)``. ``loss_classifier``: cross-entropy averaged over the R RoIs.
    ``loss_box_reg``: smooth-L1 on the ground-truth class's deltas of the foreground RoIs,
    summed and divided by R (Detectron / torchvision).
    """
    num_rois = class_logits.shape[0]
    if labels.shape != (num_rois,) or regression_targets.shape != (num_rois, 4) or box_deltas.shape[0] != num_rois:
        raise ValueError(
            f"shapes disagree: class_logits {tuple(class_logits.shape)}, box_deltas {tuple(box_deltas.shape)}, "
            f"labels {tuple(labels.shape)}, regression_targets {tuple(regression_targets.shape)}"
        )
    if num_rois == 0:  # zeros that keep the graph
        zero = class_logits.sum() * 0 + box_deltas.sum() * 0
        return {"loss_classifier": zero, "loss_box_reg": zero}
    labels = labels.to(torch.int64)
    loss_classifier = F.cross_entropy(class_logits, labels)
    deltas = box_deltas.view(num_rois, -1, 4)  # (R, K+1, 4) or (R, 1, 4)
    column = labels if deltas.shape[1] > 1 else torch.zeros_like(labels)
    picked = deltas[torch.arange(num_rois, device=labels.device), column]  # (R, 4): each RoI's class's deltas
    # Background RoIs count as zero against zero: selecting the foreground rows instead (nonzero)
    # would be a host read, a GPU sync per step. Masking the inputs, not the loss, keeps a
    # background RoI's target (unused, possibly inf for a degenerate proposal) out of the gradient.
    foreground = (labels > 0)[:, None]
    # in the wider of the two dtypes: bf16 deltas (mixed precision) must not round the targets
    dtype = torch.promote_types(deltas.dtype, regression_targets.dtype)
    loss_box_reg = F.smooth_l1_loss(torch.where(foreground, picked.to(dtype), 0.0),
                                    torch.where(foreground, regression_targets.to(dtype), 0.0),
                                    beta=beta, reduction="sum") / num_rois
    return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}


@torch.no_grad()
def postprocess_detections(class_logits: Tensor, box_deltas: Tensor, proposals: list[Tensor],
                           image_sizes: list[tuple[int, int]], cfg: BoxHeadConfig) -> list[dict[str, Tensor]]:
    """Detections per image: softmax, class-specific decode, clip, drop background, score
    threshold, drop tiny boxes, NMS within each class, keep the ``detections_per_img`` best.

    ``class_logits: (R, K+1)`` and ``box_deltas: (R, 4*(K+1)) | (R, 4)`` for the concatenated
    ``proposals[i]: (R_i, 4)``. Returns per image ``{"boxes": (D, 4), "scores": (D,),
    "labels": (D,) int64 in 1..K}`` in decreasing score. All classes are handled at once: each
    (RoI, class) pair is one candidate box.
    """
    if len(proposals) != len(image_sizes):
        raise ValueError(f"proposals has {len(proposals)} images, image_sizes {len(image_sizes)}")
    num_per_image = [p.shape[0] for p in proposals]
    if class_logits.shape[0] != sum(num_per_image) or box_deltas.shape[0] != sum(num_per_image):
        raise ValueError(f"class_logits {tuple(class_logits.shape)} / box_deltas {tuple(box_deltas.shape)} "
                         f"need one row per proposal ({sum(num_per_image)})")
    num_classes = class_logits.shape[1]  # K + 1
    box_coder = BoxCoder(cfg.box_weights)
    reference = torch.cat(proposals) if proposals else class_logits.new_zeros(0, 4)
    boxes = box_coder.decode(box_deltas, reference)  # (R, 4*(K+1)) or (R, 4)
    if boxes.shape[1] == 4:  # class-agnostic: the same box for every class
        boxes = boxes.repeat(1, num_classes)  # (R, 4*(K+1))
    probs = F.softmax(class_logits.to(boxes.dtype), dim=-1)  # (R, K+1), fp32 at least as the boxes

    detections = []
    for image_boxes, image_probs, image_size in zip(boxes.split(num_per_image), probs.split(num_per_image), image_sizes):
        num_rois = image_boxes.shape[0]
        image_boxes = clip_boxes(image_boxes, image_size).view(num_rois, num_classes, 4)  # (R_i, K+1, 4)
        class_ids = torch.arange(num_classes, device=image_boxes.device).expand(num_rois, num_classes)  # (R_i, K+1)
        # drop the background column, then treat each (RoI, class) pair as one candidate
        image_boxes = image_boxes[:, 1:].reshape(-1, 4)  # (R_i*K, 4)
        scores = image_probs[:, 1:].reshape(-1)  # (R_i*K,)
        labels = class_ids[:, 1:].reshape(-1)  # (R_i*K,)
        keep = torch.nonzero(scores > cfg.score_thresh).flatten()
        keep = keep[remove_small_boxes(image_boxes[keep], cfg.min_size)]
        image_boxes, scores, labels = image_boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(image_boxes, scores, labels, cfg.nms_thresh)[: cfg.detections_per_img]
        detections.append({"boxes": image_boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return detections


class TwoFCHead(nn.Module):
    """Figure 4 right: flatten the ``(R, C, r, r)`` RoI feature, fc -> ReLU -> fc -> ReLU -> ``(R, fc_dim)``.

    Names ``fc6`` / ``fc7`` as torchvision's ``roi_heads.box_head`` (and the VGG layers they replace).
    """

    def __init__(self, in_channels: int, resolution: int, fc_dim: int = 1024) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_channels * resolution * resolution, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.out_features = fc_dim

    def forward(self, roi_features: Tensor) -> Tensor:
        hidden = roi_features.flatten(1)  # (R, C*r*r)
        return F.relu(self.fc7(F.relu(self.fc6(hidden))))  # (R, fc_dim)


class Res5Head(nn.Module):
    """Figure 4 left: ResNet's fifth stage on the RoI feature, then a global average pool.

    ``res5`` is given (``backbone.resnet.make_res5_head``), for ResNet-50/101 ``(R, 1024, 14, 14)
    -> (R, 2048, 7, 7)`` with a stride-2 first block (ResNet [19], Detectron) or ``(R, 1024, 7, 7)
    -> (R, 2048, 7, 7)`` with stride 1 (Figure 4 left). ``features`` returns the res5 map, which
    the C4 mask head shares; ``forward`` returns the pooled ``(R, 2048)`` vector the predictor needs.
    """

    def __init__(self, res5: nn.Module, out_channels: int | None = None) -> None:
        super().__init__()
        self.res5 = res5
        # backbone.resnet.make_res5_head records its width as ``out_channels``
        self.out_features = out_channels if out_channels is not None else getattr(res5, "out_channels", None)

    def features(self, roi_features: Tensor) -> Tensor:
        return self.res5(roi_features)  # (R, C5, 7, 7)

    @staticmethod
    def pool(res5_features: Tensor) -> Tensor:
        return res5_features.mean(dim=(2, 3))  # (R, C5)

    def forward(self, roi_features: Tensor) -> Tensor:
        return self.pool(self.features(roi_features))


class BoxPredictor(nn.Module):
    """The two sibling layers of Fast R-CNN: ``cls_score`` (K+1 logits) and ``bbox_pred``
    (4 deltas per class, or 4 if class-agnostic). ``num_classes`` includes the background.

    Initialised as Fast R-CNN §2.3 ("SGD hyper-parameters"): N(0, 0.01²) for classification, N(0, 0.001²) for box
    regression, zero biases.
    """

    def __init__(self, in_features: int, num_classes: int, class_specific: bool = True) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, 4 * num_classes if class_specific else 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(features), self.bbox_pred(features)  # (R, K+1), (R, 4(K+1))


@dataclass
class PositiveRoIs:
    """What the mask and keypoint branches need from a training step of the box branch.

    Per image: ``rois[i]: (P_i, 4)``, ``labels[i]: (P_i,)`` in 1..K, ``matched_gt_idx[i]: (P_i,)``
    indices into that image's targets. ``res5_features``: the res5 head's output for these
    positives, ``(sum P_i, C5, 7, 7)`` in the same order, or None for a 2-fc head.
    """

    rois: list[Tensor]
    labels: list[Tensor]
    matched_gt_idx: list[Tensor]
    res5_features: Tensor | None = None


class BoxBranch(nn.Module):
    """Pooler -> head -> predictor, with sampling and loss in training, post-processing at test.

    ``pooler``: any module with ``forward(features: list[Tensor], boxes: list[(R_i, 4)]) ->
    (sum R_i, C, r, r)`` (``roi_heads.pooler.RoIPooler``). ``head``: :class:`TwoFCHead` or
    :class:`Res5Head`; ``predictor``: :class:`BoxPredictor`.

    ``forward(features, proposals, image_sizes, targets=None)``:
    training -> ``(losses, PositiveRoIs)``; eval -> list of detections per image.
    """

    def __init__(self, cfg: BoxHeadConfig, pooler: nn.Module, head: nn.Module, predictor: BoxPredictor) -> None:
        super().__init__()
        self.cfg = cfg
        self.pooler = pooler
        self.head = head
        self.predictor = predictor
        self.matcher = Matcher(cfg.fg_iou_thresh, cfg.bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedSampler(cfg.batch_size_per_image, cfg.positive_fraction)
        self.box_coder = BoxCoder(cfg.box_weights)

    def res5_features(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """Pooled RoI features through res5: ``(sum R_i, C5, 7, 7)`` (C4 mask head at test time)."""
        if not isinstance(self.head, Res5Head):
            raise ValueError("res5_features needs a Res5Head box head")
        return self.head.features(self.pooler(features, boxes))

    def forward(self, features: list[Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None,
                generator: torch.Generator | None = None):
        if not self.training:
            class_logits, box_deltas = self.predictor(self.head(self.pooler(features, proposals)))
            return postprocess_detections(class_logits, box_deltas, proposals, image_sizes, self.cfg)
        if targets is None:
            raise ValueError("targets are required in training mode (list of dicts with 'boxes' and 'labels')")
        padded, counts = sample_rois_padded(proposals, targets, self.matcher, self.sampler, self.box_coder,
                                            generator=generator)
        num_sampled, num_pos = counts.tolist()  # the step's one host read of the box branch
        rois, labels, regression_targets, matched_gt_idx = split_rows(padded, num_sampled)
        roi_features = self.pooler(features, rois)  # (sum S_i, C, r, r)
        positive_res5 = None
        if isinstance(self.head, Res5Head):
            res5_map = self.head.features(roi_features)  # (sum S_i, C5, 7, 7)
            head_features = self.head.pool(res5_map)
            # positives come first within each image, and their counts are on the host already:
            # slices, not a boolean mask (whose count the GPU would have to send back)
            starts = [0, *itertools.accumulate(num_sampled)][:-1]
            positive_res5 = torch.cat([res5_map[s:s + p] for s, p in zip(starts, num_pos)])  # (sum P_i, C5, 7, 7)
        else:
            head_features = self.head(roi_features)
        class_logits, box_deltas = self.predictor(head_features)
        losses = box_loss(class_logits, box_deltas, torch.cat(labels), torch.cat(regression_targets),
                          beta=self.cfg.smooth_l1_beta)
        pos_rois, pos_labels, pos_matched = split_rows((rois, labels, matched_gt_idx), num_pos)  # positives first
        positives = PositiveRoIs(rois=pos_rois, labels=pos_labels, matched_gt_idx=pos_matched,
                                 res5_features=positive_res5)
        return losses, positives
