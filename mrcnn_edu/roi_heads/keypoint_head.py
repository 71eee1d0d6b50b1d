"""The keypoint head of Mask R-CNN for human pose (He et al. 2017, §5).

"We model a keypoint's location as a one-hot mask, and adopt Mask R-CNN to predict K masks,
one for each of K keypoint types ... For each of the K keypoints of an instance, the training
target is a one-hot m × m binary mask where only a single pixel is labeled as foreground.
During training, for each visible ground-truth keypoint, we minimize the cross-entropy loss
over an m²-way softmax output (which encourages a single point to be detected)" (§5).

"The keypoint head consists of a stack of eight 3×3 512-d conv layers, followed by a deconv
layer and 2× bilinear upscaling, producing an output resolution of 56×56" (§5, Implementation).

Notation: P RoIs (positives in training, detections at test time), Kp keypoint types (17 on
COCO), m = 56 the heatmap side; keypoints are (x, y, v) in image pixels with v > 0 = labelled.
Shapes: RoI features (P, C, 14, 14) → heatmap logits (P, Kp, 56, 56).

Layer layout and decoding follow torchvision's keypointrcnn_resnet50_fpn (and Detectron) so
that its weights load by a simple key map (`torchvision_keypoint_key_map`) and its detections
decode to the same pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class KeypointHeadConfig:
    num_keypoints: int = 17  # Kp: the COCO person keypoints (§5)
    conv_dims: tuple[int, ...] = (512,) * 8  # "a stack of eight 3×3 512-d conv layers" (§5)
    pooler_resolution: int = 14  # RoIAlign output, as the mask head's (Figure 4 right)
    resolution: int = 56  # m: "an output resolution of 56×56" = 14 → deconv ×2 → bilinear ×2
    # pixels added to the decoded x and y in the original image. 0 for weights trained here (the
    # targets are pixel centres, COCO index + 0.5: data/coco.py). 0.5 for torchvision's COCO
    # weights: they trained on the raw indices, so their points land half a pixel up-left of
    # ours, and evaluation.py's "- 0.5" back to indices would move them again (weights.py sets it)
    coordinate_offset: float = 0.0


class KeypointHead(nn.Module):
    """8 × (conv 3×3 + ReLU) → deconv 4×4 stride 2 → 2× bilinear: (P, C, 14, 14) -> (P, Kp, 56, 56) logits."""

    def __init__(self, in_channels: int, cfg: KeypointHeadConfig | None = None):
        super().__init__()
        cfg = cfg or KeypointHeadConfig()
        if cfg.resolution != 4 * cfg.pooler_resolution:
            raise ValueError(f"cfg.resolution must be 4 × cfg.pooler_resolution (deconv ×2, bilinear ×2), "
                             f"got {cfg.resolution} and {cfg.pooler_resolution}")
        self.cfg = cfg
        dims = (in_channels,) + tuple(cfg.conv_dims)
        self.convs = nn.ModuleList(nn.Conv2d(dims[i], dims[i + 1], 3, padding=1) for i in range(len(cfg.conv_dims)))
        # Kernel 4, stride 2, padding 1 exactly doubles the side (Detectron's "kps_score_lowres").
        self.deconv = nn.ConvTranspose2d(dims[-1], cfg.num_keypoints, 4, stride=2, padding=1)
        for layer in [*self.convs, self.deconv]:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, roi_features: torch.Tensor) -> torch.Tensor:
        x = roi_features  # (P, C, 14, 14)
        for conv in self.convs:
            x = F.relu(conv(x))  # (P, 512, 14, 14)
        x = self.deconv(x)  # (P, Kp, 28, 28)
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)  # (P, Kp, 56, 56)


def torchvision_keypoint_key_map(num_convs: int = 8, prefix: str = "roi_heads.") -> dict[str, str]:
    """Our KeypointHead parameter name -> torchvision keypointrcnn_resnet50_fpn state-dict key.

    torchvision's head is an nn.Sequential of (Conv2d, ReLU) pairs, so its convs sit at even
    indices 0, 2, ..., 14; the deconv is `keypoint_predictor.kps_score_lowres`.
    """
    key_map = {}
    for i in range(num_convs):
        for p in ("weight", "bias"):
            key_map[f"convs.{i}.{p}"] = f"{prefix}keypoint_head.{2 * i}.{p}"
    for p in ("weight", "bias"):
        key_map[f"deconv.{p}"] = f"{prefix}keypoint_predictor.kps_score_lowres.{p}"
    return key_map


def keypoint_head_state_from_torchvision(
    state_dict: dict[str, torch.Tensor], num_convs: int = 8, prefix: str = "roi_heads."
) -> dict[str, torch.Tensor]:
    """A state dict for `KeypointHead` from torchvision's keypoint R-CNN state dict."""
    ours = {}
    for our_key, tv_key in torchvision_keypoint_key_map(num_convs, prefix).items():
        if tv_key not in state_dict:
            raise ValueError(f"state_dict has no key {tv_key!r} (expected a torchvision Keypoint R-CNN state dict)")
        ours[our_key] = state_dict[tv_key]
    return ours


def _check_boxes(boxes: torch.Tensor, name: str, num: int) -> None:
    if boxes.shape != (num, 4):
        raise ValueError(f"{name} must be ({num}, 4) xyxy boxes, got shape {tuple(boxes.shape)}")


def keypoint_targets(
    keypoints: torch.Tensor, proposals: torch.Tensor, m: int = 56
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot m×m targets as flat indices: keypoints (P, Kp, 3), proposals (P, 4) -> (P, Kp) long, (P, Kp) bool.

    The RoI is cut into m×m cells; a keypoint at x falls in column floor((x − x1)·m / w) (a point
    on the far edge x = x2 goes to column m − 1). Only labelled (v > 0) keypoints inside the RoI
    (x1 <= x <= x2, y1 <= y <= y2) are valid; invalid entries hold index 0 and must be ignored
    (as torchvision's `keypoints_to_heatmap`, Detectron's `keypoints_to_heatmap_labels`; unlike
    them, the rare point a float rounding step inside x2, whose column computes to m, is kept).
    """
    if keypoints.dim() != 3 or keypoints.shape[2] != 3:
        raise ValueError(f"keypoints must be (P, Kp, 3) rows (x, y, v), got shape {tuple(keypoints.shape)}")
    _check_boxes(proposals, "proposals", keypoints.shape[0])
    x1, y1, x2, y2 = (proposals[:, i : i + 1] for i in range(4))  # each (P, 1)
    x, y = keypoints[..., 0], keypoints[..., 1]  # (P, Kp)
    # inside is decided on the coordinates, not on the cell index: a point a rounding step inside
    # x2 can compute to column m (torchvision and Detectron then drop it); clamping puts it, and a
    # point on the far edge itself, in the last cell
    inside = (x >= x1) & (x <= x2) & (y >= y1) & (y <= y2)
    col = ((x - x1) * (m / (x2 - x1))).floor().long().clamp(0, m - 1)
    row = ((y - y1) * (m / (y2 - y1))).floor().long().clamp(0, m - 1)
    valid = inside & (keypoints[..., 2] > 0)  # (P, Kp)
    targets = torch.where(valid, row * m + col, 0)  # (P, Kp) flat index into m²
    return targets, valid


def keypoint_loss(keypoint_logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the m²-way softmax of each valid keypoint, averaged over valid keypoints.

    keypoint_logits (P, Kp, m, m); targets (P, Kp) long flat indices; valid (P, Kp) bool.
    """
    if keypoint_logits.dim() != 4 or keypoint_logits.shape[2] != keypoint_logits.shape[3]:
        raise ValueError(f"keypoint_logits must be (P, Kp, m, m), got shape {tuple(keypoint_logits.shape)}")
    if targets.shape != keypoint_logits.shape[:2] or valid.shape != keypoint_logits.shape[:2]:
        raise ValueError(f"targets and valid must be (P, Kp) = {tuple(keypoint_logits.shape[:2])}, "
                         f"got {tuple(targets.shape)} and {tuple(valid.shape)}")
    # every (RoI, keypoint) pair's loss, the invalid ones zeroed: picking the valid ones by a
    # boolean mask would ask the host how many there are (a GPU sync). With none valid the loss is
    # a zero that keeps the graph.
    losses = F.cross_entropy(keypoint_logits.flatten(2).flatten(0, 1), targets.flatten(), reduction="none")
    return torch.where(valid.flatten(), losses, 0.0).sum() / valid.sum().clamp(min=1)  # mean over valid


def heatmaps_to_keypoints(keypoint_logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Decode heatmaps to (x, y, score) in image pixels: (P, Kp, m, m), (P, 4) -> (P, Kp, 3).

    As Detectron / torchvision: each heatmap is resized bicubically to the box's ceil(w)×ceil(h)
    pixels, the argmax cell (i, j) becomes the point (j + 0.5, i + 0.5)·(w / ceil(w), h / ceil(h))
    + (x1, y1) (Heckbert's discrete-to-continuous c = d + 0.5), and the score is the resized
    logit there. A per-RoI loop: every box has its own output size, and resizing all heatmaps
    to the largest box would cost far more memory; it runs over at most 100 detections.

    Always in fp32, whatever the input dtype and even under autocast: bf16's 8-bit mantissa
    would round neighbouring resized logits to the same value, and the argmax, taking the
    first of equals, would pull keypoints up and left by several pixels on a large box.
    """
    if keypoint_logits.dim() != 4:
        raise ValueError(f"keypoint_logits must be (P, Kp, m, m), got shape {tuple(keypoint_logits.shape)}")
    _check_boxes(boxes, "boxes", keypoint_logits.shape[0])
    with torch.autocast(keypoint_logits.device.type, enabled=False):  # resampling arithmetic, not learned
        return _decode_heatmaps(keypoint_logits.detach().float(), boxes.detach().float())  # no graph: inference


def _decode_heatmaps(keypoint_logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """:func:`heatmaps_to_keypoints` on checked fp32 inputs: (P, Kp, m, m), (P, 4) -> (P, Kp, 3)."""
    num_rois, num_kp = keypoint_logits.shape[:2]
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=1)  # (P,)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=1)
    widths_px, heights_px = widths.ceil(), heights.ceil()
    result = keypoint_logits.new_zeros((num_rois, num_kp, 3), dtype=torch.float32)
    kp_index = torch.arange(num_kp, device=keypoint_logits.device)
    # every box's pixel size in one host read (two per box would be a GPU sync each)
    sizes = torch.stack([widths_px, heights_px], dim=1).long().tolist()  # (P, 2)
    for i in range(num_rois):
        out_w, out_h = sizes[i]
        roi_map = F.interpolate(keypoint_logits[i][:, None], size=(out_h, out_w), mode="bicubic",
                                align_corners=False)[:, 0]  # (Kp, out_h, out_w)
        best = roi_map.flatten(1).argmax(dim=1)  # (Kp,) flat index
        col, row = best % out_w, best // out_w
        result[i, :, 0] = (col.float() + 0.5) * (widths[i] / out_w) + boxes[i, 0]
        result[i, :, 1] = (row.float() + 0.5) * (heights[i] / out_h) + boxes[i, 1]
        result[i, :, 2] = roi_map[kp_index, row, col]
    return result
