"""The mask branch of Mask R-CNN (He et al. 2017, §3, Figure 4, Table 2b/2e).

"The mask branch has a Km²-dimensional output for each RoI, which encodes K binary masks of
resolution m × m, one for each of the K classes. To this we apply a per-pixel sigmoid, and
define L_mask as the average binary cross-entropy loss. For an RoI associated with
ground-truth class k, L_mask is only defined on the k-th mask" (§3).

Heads (Figure 4; all convs 3×3 + ReLU, deconvs 2×2 stride 2, output conv 1×1):
  - `FCNMaskHead`   FPN (right panel): 14×14×256 RoIAlign features → 4 × conv(256) → deconv
                    (256) → 28×28 → 1×1 conv → C_out × 28×28.
  - `Res5MaskHead`  C4 (left panel): the res5 output 7×7×2048 → deconv(256) → 14×14 → 1×1 conv.
  - `MLPMaskHead`   Table 2e: flatten 14×14×C → fc 1024 → fc 1024 [→ fc 1024] → C_out·m².

Output channels C_out: K per-class sigmoid masks (default); 1 class-agnostic mask (§4.2, "nearly
as effective"); K+1 for the multinomial per-pixel softmax of Table 2b (channel 0 = background,
channel k = class k; with `class_agnostic` it is 2: background / object).

Notation: P positive RoIs, G ground-truth instances of an image, N detections, K classes,
m the mask resolution. Labels are 1..K (0 is background and never reaches the mask branch).

Mask targets are "the intersection between an RoI and its associated ground-truth mask"
(§3.1): we RoIAlign (aligned=True, average) the binary mask into the RoI's m×m grid and
threshold at 0.5, as Detectron2 does. torchvision instead keeps the soft values and uses
`aligned=False`; targets only matter in training, so this does not affect loading its weights.

At test time "the mask branch is then applied to the highest scoring 100 detection boxes ...
we only use the k-th mask, where k is the predicted class ... The m×m floating-number mask
output is then resized to the RoI size, and binarized at a threshold of 0.5" (§3.1).
`paste_masks_in_image` does the resizing for all detections at once, as two batched matrix
products (bilinear resizing is separable; the numbers are `grid_sample`'s).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mrcnn_edu.device import host_to_device
from mrcnn_edu.ops import roi_align
from mrcnn_edu.roi_heads.box_head import RES5_OUTPUT_SIZE


SOFTMAX_READOUTS = ("probability", "argmax", "foreground")  # MaskHeadConfig.softmax_readout


@dataclass
class MaskHeadConfig:
    head: str = "fcn"  # "fcn" (Figure 4 right) | "mlp" (Table 2e) | "res5_deconv" (Figure 4 left)
    loss: str = "sigmoid"  # per-pixel sigmoid + BCE (§3); "softmax" = multinomial (Table 2b)
    class_agnostic: bool = False  # one m×m mask for every class (§4.2, 29.7 vs 30.3 AP)
    resolution: int = 28  # m: 28 for FPN, 14 for C4 (Figure 4)
    pooler_resolution: int = 14  # RoIAlign output fed to the FCN / MLP heads (Figure 4 right)
    conv_dims: tuple[int, ...] = (256,) * 4  # "×4" convs of 256 channels (Figure 4 right)
    deconv_dim: int = 256  # channels of the 2×2 stride-2 deconv (Figure 4)
    mlp_dims: tuple[int, ...] = (1024, 1024)  # Table 2e: (1024, 1024) or (1024, 1024, 1024)
    # how the softmax loss's (K+1)-way output becomes class k's mask at test time (the paper does
    # not say): "probability" = p_k, binarised at 0.5 like the sigmoid's; "argmax" = the pixels
    # where k wins the (K+1)-way vote, FCN's own rule; "foreground" = 1 - p_background, any class
    # (a diagnostic: the object's pixels, whichever class the head gives them). Ignored by sigmoid.
    softmax_readout: str = "probability"


def mask_output_channels(num_classes: int, loss: str = "sigmoid", class_agnostic: bool = False) -> int:
    """C_out: K (per-class sigmoid), 1 (agnostic), +1 background channel for the softmax loss."""
    if loss not in ("sigmoid", "softmax"):
        raise ValueError(f"loss must be 'sigmoid' or 'softmax', got {loss!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    masks = 1 if class_agnostic else num_classes
    return masks + 1 if loss == "softmax" else masks


def _init_conv(layer: nn.Module) -> None:
    # He init (fan_out) for every layer, the 1×1 mask predictor included: torchvision's mask
    # heads do exactly this. Detectron2 draws its predictor from N(0, 0.001²) (He for the rest);
    # Detectron's default (MRCNN.CONV_INIT "GaussianFill") is N(0, 0.001²) throughout, its Mask
    # R-CNN configs switch to "MSRAFill" (this He init) but keep N(0, 0.001²) for a
    # class-agnostic predictor.
    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(layer.bias)


class FCNMaskHead(nn.Module):
    """Figure 4 (right): convs 3×3 + ReLU → deconv 2×2 s2 + ReLU → 1×1 conv; (R,C,14,14) → (R,C_out,28,28).

    Parameter names map one-to-one onto torchvision's maskrcnn_resnet50_fpn, see
    `torchvision_mask_key_map`.
    """

    def __init__(self, in_channels: int, num_classes: int, cfg: MaskHeadConfig | None = None):
        super().__init__()
        cfg = cfg or MaskHeadConfig()
        if cfg.resolution != 2 * cfg.pooler_resolution:
            raise ValueError(f"cfg.resolution must be 2 × cfg.pooler_resolution (one 2× deconv), "
                             f"got {cfg.resolution} and {cfg.pooler_resolution}")
        self.cfg = cfg
        self.num_outputs = mask_output_channels(num_classes, cfg.loss, cfg.class_agnostic)
        dims = (in_channels,) + tuple(cfg.conv_dims)
        self.convs = nn.ModuleList(nn.Conv2d(dims[i], dims[i + 1], 3, padding=1) for i in range(len(cfg.conv_dims)))
        self.deconv = nn.ConvTranspose2d(dims[-1], cfg.deconv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(cfg.deconv_dim, self.num_outputs, 1)
        for layer in [*self.convs, self.deconv, self.predictor]:
            _init_conv(layer)

    def forward(self, roi_features: torch.Tensor) -> torch.Tensor:
        x = roi_features  # (R, C, 14, 14)
        for conv in self.convs:
            x = F.relu(conv(x))  # (R, 256, 14, 14)
        x = F.relu(self.deconv(x))  # (R, 256, 28, 28)
        return self.predictor(x)  # (R, C_out, 28, 28)


class Res5MaskHead(nn.Module):
    """Figure 4 (left), C4: the res5 output (R, 2048, 7, 7) → deconv 2×2 s2 + ReLU → 1×1 → (R, C_out, 14, 14).

    res5 itself is shared with the box branch and lives in the box head; this is only the part
    the mask branch adds on top of it.
    """

    def __init__(self, in_channels: int, num_classes: int, cfg: MaskHeadConfig | None = None):
        super().__init__()
        side = 2 * RES5_OUTPUT_SIZE  # the deconv doubles res5's 7×7: the masks are 14×14 (Figure 4 left)
        cfg = cfg or MaskHeadConfig(head="res5_deconv", resolution=side)
        if cfg.resolution != side:  # else the targets would not match the logits, at the first step
            raise ValueError(f"MaskHeadConfig.resolution must be {side} for head='res5_deconv' (res5's "
                             f"{RES5_OUTPUT_SIZE}×{RES5_OUTPUT_SIZE} output, doubled by the deconv: Figure 4 "
                             f"left), got {cfg.resolution}")
        self.cfg = cfg
        self.num_outputs = mask_output_channels(num_classes, cfg.loss, cfg.class_agnostic)
        self.deconv = nn.ConvTranspose2d(in_channels, cfg.deconv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(cfg.deconv_dim, self.num_outputs, 1)
        _init_conv(self.deconv)
        _init_conv(self.predictor)

    def forward(self, res5_features: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.deconv(res5_features))  # (R, 256, 14, 14)
        return self.predictor(x)  # (R, C_out, 14, 14)


class MLPMaskHead(nn.Module):
    """Table 2e: fc layers on the flattened RoI features, "collapsing" the spatial layout (§3)."""

    def __init__(self, in_channels: int, num_classes: int, cfg: MaskHeadConfig | None = None):
        super().__init__()
        cfg = cfg or MaskHeadConfig(head="mlp")
        self.cfg = cfg
        self.num_outputs = mask_output_channels(num_classes, cfg.loss, cfg.class_agnostic)
        m = cfg.resolution
        dims = (in_channels * cfg.pooler_resolution**2,) + tuple(cfg.mlp_dims)
        self.fcs = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(len(cfg.mlp_dims)))
        self.predictor = nn.Linear(dims[-1], self.num_outputs * m * m)
        for fc in self.fcs:
            nn.init.kaiming_uniform_(fc.weight, a=1)  # Detectron's "caffe2_xavier" for fc heads
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, roi_features: torch.Tensor) -> torch.Tensor:
        m = self.cfg.resolution
        x = roi_features.flatten(1)  # (R, C*14*14)
        for fc in self.fcs:
            x = F.relu(fc(x))  # (R, 1024)
        return self.predictor(x).view(-1, self.num_outputs, m, m)  # (R, C_out*m*m) -> (R, C_out, m, m)


def build_mask_head(in_channels: int, num_classes: int, cfg: MaskHeadConfig) -> nn.Module:
    """The head `cfg.head` names: FCNMaskHead, MLPMaskHead or Res5MaskHead."""
    if cfg.softmax_readout not in SOFTMAX_READOUTS:  # used only at test time: refuse it before training
        raise ValueError(f"cfg.softmax_readout must be one of {SOFTMAX_READOUTS}, got {cfg.softmax_readout!r}")
    if cfg.head == "fcn":
        return FCNMaskHead(in_channels, num_classes, cfg)
    if cfg.head == "mlp":
        return MLPMaskHead(in_channels, num_classes, cfg)
    if cfg.head == "res5_deconv":
        return Res5MaskHead(in_channels, num_classes, cfg)
    raise ValueError(f"cfg.head must be 'fcn', 'mlp' or 'res5_deconv', got {cfg.head!r}")


def torchvision_mask_key_map(num_convs: int = 4, prefix: str = "roi_heads.") -> dict[str, str]:
    """Our FCNMaskHead parameter name -> torchvision maskrcnn_resnet50_fpn state-dict key.

    torchvision predicts K+1 channels (channel 0, background, is never used); our per-class
    predictor has K, so its `predictor.*` tensors are torchvision's `mask_fcn_logits.*[1:]`.
    `fcn_mask_head_state_from_torchvision` does that slicing.
    """
    key_map = {}
    for i in range(num_convs):
        for p in ("weight", "bias"):
            key_map[f"convs.{i}.{p}"] = f"{prefix}mask_head.{i}.0.{p}"
    for p in ("weight", "bias"):
        key_map[f"deconv.{p}"] = f"{prefix}mask_predictor.conv5_mask.{p}"
        key_map[f"predictor.{p}"] = f"{prefix}mask_predictor.mask_fcn_logits.{p}"
    return key_map


def fcn_mask_head_state_from_torchvision(
    state_dict: dict[str, torch.Tensor], num_convs: int = 4, prefix: str = "roi_heads."
) -> dict[str, torch.Tensor]:
    """A state dict for a per-class sigmoid `FCNMaskHead` from torchvision's (drops background channel 0)."""
    ours = {}
    for our_key, tv_key in torchvision_mask_key_map(num_convs, prefix).items():
        if tv_key not in state_dict:
            raise ValueError(f"state_dict has no key {tv_key!r} (expected a torchvision Mask R-CNN state dict)")
        tensor = state_dict[tv_key]
        ours[our_key] = tensor[1:] if our_key.startswith("predictor.") else tensor
    return ours


def mask_targets(
    gt_masks: torch.Tensor, matched_gt_idx: torch.Tensor, proposals: torch.Tensor, m: int
) -> torch.Tensor:
    """The ground-truth mask cropped to each positive RoI and resampled to m×m, in {0, 1}.

    gt_masks (G, H, W) uint8/bool; matched_gt_idx (P,) long; proposals (P, 4) xyxy -> (P, m, m) float.
    One RoIAlign call for all positives: each gt mask is its own "image" of the batch, and the
    RoI's batch index is the index of the gt it is matched to.

    Binarised at 0.5, as Detectron2 does (torchvision keeps the soft values): a cell is
    foreground when the object covers at least half of it. An object thinner than about half a
    cell nowhere -- a 1-3 px diagonal stroke in a 150 px box, one cell being 5.4 px -- gets an
    all-zero target, and its positive RoIs learn "no mask here". The shapes set has no such
    object (its thinnest class, person, crops and pastes back at IoU >= 0.84 at m = 28, 40 images measured).
    """
    if gt_masks.dim() != 3:
        raise ValueError(f"gt_masks must be (G, H, W), got shape {tuple(gt_masks.shape)}")
    if proposals.dim() != 2 or proposals.shape[1] != 4:
        raise ValueError(f"proposals must be (P, 4), got shape {tuple(proposals.shape)}")
    if matched_gt_idx.shape != proposals.shape[:1]:
        raise ValueError(f"matched_gt_idx must be (P,) = ({proposals.shape[0]},), got {tuple(matched_gt_idx.shape)}")
    # value checks read the device: on a GPU they would be a sync per step, and there the model's
    # own matcher made these indices (as check_boxes, values are checked on the CPU only)
    if matched_gt_idx.numel() > 0 and _check_values(matched_gt_idx) \
            and bool(((matched_gt_idx < 0) | (matched_gt_idx >= gt_masks.shape[0])).any()):
        raise ValueError(f"matched_gt_idx must index the {gt_masks.shape[0]} gt masks, got {matched_gt_idx.tolist()}")
    if proposals.shape[0] == 0:
        return proposals.new_zeros((0, m, m))
    rois = torch.cat([matched_gt_idx.to(proposals)[:, None], proposals], dim=1)  # (P, 5)
    masks = gt_masks[:, None].to(proposals.dtype)  # (G, 1, H, W)
    # sampling_ratio=0: adaptive, ceil(bin size) samples per bin, so no mask pixel is skipped.
    soft = roi_align(masks, rois, (m, m), spatial_scale=1.0, sampling_ratio=0, aligned=True,
                     check_values=False)  # (P, 1, m, m); indices checked above
    return (soft[:, 0] >= 0.5).to(proposals.dtype)  # (P, m, m)


def batch_mask_targets(gt_masks: list[torch.Tensor], matched_gt_idx: list[torch.Tensor],
                       proposals: list[torch.Tensor], m: int) -> torch.Tensor:
    """:func:`mask_targets` for a batch: per image ``gt_masks[i] (G_i, H_i, W_i)``,
    ``matched_gt_idx[i] (P_i,)``, ``proposals[i] (P_i, 4)`` -> ``(sum P_i, m, m)`` in image order.

    Images whose masks have the same size (every image of a batch, when the dataset's do) go
    through one :func:`mask_targets` call: their masks stacked, each index shifted by the masks
    of the images before it. Masks of different sizes are not padded to one size, since RoIAlign
    treats a mask's last row and column differently from a padded one's (it clamps at the edge),
    so each run of same-size images gets its own call.
    """
    if not (len(gt_masks) == len(matched_gt_idx) == len(proposals)):
        raise ValueError(f"need one gt_masks, matched_gt_idx and proposals per image, got "
                         f"{len(gt_masks)}, {len(matched_gt_idx)}, {len(proposals)}")
    pieces, start = [], 0
    for end in range(1, len(gt_masks) + 1):
        if end < len(gt_masks) and gt_masks[end].shape[-2:] == gt_masks[start].shape[-2:]:
            continue
        run = range(start, end)
        # each RoI's image's mask count and index shift, built on the host from known shapes
        num_rois = torch.tensor([matched_gt_idx[i].shape[0] for i in run])
        num_masks = torch.tensor([gt_masks[i].shape[0] for i in run])
        shift = host_to_device((num_masks.cumsum(0) - num_masks).repeat_interleave(num_rois), proposals[start].device)
        bound = host_to_device(num_masks.repeat_interleave(num_rois), proposals[start].device)
        idx = torch.cat([matched_gt_idx[i] for i in run])
        if idx.numel() > 0 and _check_values(idx) and bool(((idx < 0) | (idx >= bound)).any()):  # CPU only, as above
            bad = next(i for i in run
                       if bool(((matched_gt_idx[i] < 0) | (matched_gt_idx[i] >= gt_masks[i].shape[0])).any()))
            raise ValueError(f"matched_gt_idx[{bad}] must index image {bad}'s {gt_masks[bad].shape[0]} gt masks, "
                             f"got {matched_gt_idx[bad].tolist()}")
        pieces.append(mask_targets(torch.cat([gt_masks[i] for i in run]), idx + shift,
                                   torch.cat([proposals[i] for i in run]), m))
        start = end
    if not pieces:
        return torch.zeros(0, m, m)
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _check_values(tensor: torch.Tensor) -> bool:
    """Whether to check ``tensor``'s values: on the CPU only. On a GPU reading them is a sync per
    step, and the model checks its targets once per batch (``model._check_images``)."""
    return tensor.device.type == "cpu"


def _check_logits_labels(mask_logits: torch.Tensor, labels: torch.Tensor, loss: str, class_agnostic: bool) -> None:
    if mask_logits.dim() != 4:
        raise ValueError(f"mask_logits must be (P, C_out, m, m), got shape {tuple(mask_logits.shape)}")
    if labels.shape != mask_logits.shape[:1]:
        raise ValueError(f"labels must be ({mask_logits.shape[0]},), got shape {tuple(labels.shape)}")
    if loss not in ("sigmoid", "softmax"):
        raise ValueError(f"loss must be 'sigmoid' or 'softmax', got {loss!r}")
    num_masks = 1 if class_agnostic else mask_logits.shape[1] - (loss == "softmax")  # K
    if num_masks < 1 or mask_logits.shape[1] != mask_output_channels(num_masks, loss, class_agnostic):
        raise ValueError(f"mask_logits has {mask_logits.shape[1]} channels, which loss={loss!r}, "
                         f"class_agnostic={class_agnostic} cannot read")
    # the values on the CPU only (a GPU sync otherwise); the model checks its targets' labels once per batch
    if labels.numel() > 0 and _check_values(labels) \
            and bool(((labels < 1) | ((labels > num_masks) & (not class_agnostic))).any()):
        raise ValueError(f"labels must be foreground classes 1..{num_masks}, got {labels.unique().tolist()}")


def _mask_channel(labels: torch.Tensor, loss: str, class_agnostic: bool) -> torch.Tensor:
    """Index of the channel holding each RoI's class mask (the foreground class for softmax)."""
    if class_agnostic:
        return torch.full_like(labels, 1 if loss == "softmax" else 0)
    return labels if loss == "softmax" else labels - 1  # softmax keeps channel 0 for background


def mask_loss(
    mask_logits: torch.Tensor,
    labels: torch.Tensor,
    mask_targets: torch.Tensor,
    loss: str = "sigmoid",
    class_agnostic: bool = False,
) -> torch.Tensor:
    """L_mask over the positive RoIs; mask_logits (P, C_out, m, m), labels (P,) 1..K, targets (P, m, m).

    sigmoid: mean binary cross-entropy over P·m² on the gt class's channel only (§3) — the other
    K-1 channels get no gradient, so classes do not compete.
    softmax: per-pixel (K+1)-way cross-entropy, target = the RoI's class inside the mask and
    background outside (Table 2b) — raising one class's logit lowers the others' probability.
    """
    _check_logits_labels(mask_logits, labels, loss, class_agnostic)
    if mask_targets.shape != (mask_logits.shape[0],) + mask_logits.shape[2:]:
        raise ValueError(f"mask_targets must be (P, m, m) = {(mask_logits.shape[0],) + tuple(mask_logits.shape[2:])}, "
                         f"got {tuple(mask_targets.shape)}")
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0  # no positives: a zero that keeps the graph
    channel = _mask_channel(labels, loss, class_agnostic)
    if loss == "sigmoid":
        picked = mask_logits[torch.arange(len(labels), device=labels.device), channel]  # (P, m, m)
        return F.binary_cross_entropy_with_logits(picked, mask_targets.to(picked.dtype))
    pixel_class = torch.where(mask_targets >= 0.5, channel[:, None, None], 0)  # (P, m, m) long
    return F.cross_entropy(mask_logits, pixel_class)


def mask_probs(
    mask_logits: torch.Tensor, labels: torch.Tensor, loss: str = "sigmoid", class_agnostic: bool = False,
    softmax_readout: str = "probability",
) -> torch.Tensor:
    """The predicted class's soft mask: (N, C_out, m, m) logits, (N,) labels -> (N, m, m) in [0, 1].

    sigmoid: σ of class k's channel. softmax (Table 2b): ``softmax_readout="probability"`` gives
    p_k, which the paste binarises at 0.5; ``"argmax"`` gives 1 where channel k has the largest
    of the K+1 probabilities, else 0 (a pixel whose foreground mass is split between k and a
    class it resembles can be k's by argmax with p_k < 0.5); ``"foreground"`` gives 1 - p_0, the
    mass of every class together, which ignores ``labels``: what the head would segment if it
    did not have to name each pixel.

    Computed in float32 from bf16 / fp16 logits (inference under autocast): bf16 spaces
    [0.5, 1) 1/256 apart, so a probability in (0.5, 0.502) would round to 0.5 and fail the
    paste's ``> 0.5``; the keypoint decoder does the same.
    """
    _check_logits_labels(mask_logits, labels, loss, class_agnostic)
    if mask_logits.dtype in (torch.float16, torch.bfloat16):
        mask_logits = mask_logits.float()
    if softmax_readout not in SOFTMAX_READOUTS:
        raise ValueError(f"softmax_readout must be one of {SOFTMAX_READOUTS}, got {softmax_readout!r}")
    channel = _mask_channel(labels, loss, class_agnostic)
    rows = torch.arange(len(labels), device=labels.device)
    if loss == "sigmoid":
        return mask_logits[rows, channel].sigmoid()  # (N, m, m)
    if softmax_readout == "argmax":
        return (mask_logits.argmax(dim=1) == channel[:, None, None]).to(mask_logits.dtype)  # (N, m, m)
    if softmax_readout == "foreground":
        return 1 - mask_logits.softmax(dim=1)[:, 0]  # (N, m, m)
    return mask_logits.softmax(dim=1)[rows, channel]  # (N, m, m)


def paste_masks_in_image(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    mode: str = "exact",
    chunk_pixels: int = 1 << 26,
) -> torch.Tensor:
    """Resize each m×m soft mask to its box and place it in an (h, w) image: -> (N, 1, h, w) in [0, 1].

    masks (N, m, m) in [0, 1]; boxes (N, 4) xyxy in image pixels. Binarise the result at 0.5.
    mode="exact": mask cell j covers box x1 + [j, j+1)·w/m; each image pixel centre x + 0.5 is
      read bilinearly in that frame, zero beyond the mask's edge cells — the same numbers as
      `F.grid_sample(align_corners=False, padding_mode="zeros")` (Detectron2's paste). A pixel
      between the box's edge and its edge cell's centre reads that cell blended with the zero
      beyond; along an edge it stays above 0.5 (weight 0.5 + m/(2·size) on the cell), but at a
      corner the two weights multiply: a box larger than about m·2.4 px a side loses its corner
      pixels (an all-ones mask in a 100 × 50 px box, m = 28: 0.64 · 0.78 = 0.4992).
    mode="torchvision": reproduces torchvision's `paste_masks_in_image` — the mask padded by one
      zero cell, the box scaled by (m+2)/m and truncated to integers, resized to
      (y2-y1+1, x2-x1+1) pixels with `F.interpolate` — so that a model loaded from torchvision's
      weights gives its masks to the pixel. Its integer rounding shifts masks by up to a pixel.

    Bilinear resizing is separable, so each pasted mask is two small matrix products,
    A_y (h, m) @ mask (m, m) @ A_x(w, m)ᵀ, where row y of A_y holds the two bilinear weights of
    image row y. All detections go through one batched matmul — no loop over detections —
    chunked so that a chunk writes at most `chunk_pixels` floats (100 × 800×1333 is 0.4 GB).
    """
    if masks.dim() != 3 or masks.shape[1] != masks.shape[2]:
        raise ValueError(f"masks must be (N, m, m), got shape {tuple(masks.shape)}")
    if boxes.shape != (masks.shape[0], 4):
        raise ValueError(f"boxes must be (N, 4) = ({masks.shape[0]}, 4), got shape {tuple(boxes.shape)}")
    if mode not in ("exact", "torchvision"):
        raise ValueError(f"mode must be 'exact' or 'torchvision', got {mode!r}")
    im_h, im_w = int(image_size[0]), int(image_size[1])
    num, m = masks.shape[0], masks.shape[-1]
    dtype = torch.float64 if masks.dtype == torch.float64 else torch.float32
    masks, boxes = masks.detach().to(dtype), boxes.detach().to(dtype)  # inference only: no graph
    if num == 0 or im_h == 0 or im_w == 0:
        return masks.new_zeros((num, 1, im_h, im_w))
    if mode == "torchvision":
        masks = F.pad(masks, (1, 1, 1, 1))  # (N, m+2, m+2): a zero border, as torchvision
        centre = (boxes[:, :2] + boxes[:, 2:]) * 0.5  # (N, 2)
        half = (boxes[:, 2:] - boxes[:, :2]) * 0.5 * ((m + 2) / m)
        int_boxes = torch.cat([centre - half, centre + half], dim=1).long().float()  # truncates, as .to(int64)
        origin = int_boxes[:, :2]  # (N, 2) first pixel the mask covers
        size = (int_boxes[:, 2:] - int_boxes[:, :2] + 1).clamp(min=1)  # (N, 2) pixels it covers
    else:
        origin = boxes[:, :2]
        size = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-6)

    xs = torch.arange(im_w, device=masks.device, dtype=dtype)  # pixel indices
    ys = torch.arange(im_h, device=masks.device, dtype=dtype)
    out = masks.new_empty((num, 1, im_h, im_w))  # every pixel is written below
    per_chunk = max(1, chunk_pixels // (im_h * im_w))
    for start in range(0, num, per_chunk):  # a loop over chunks of detections, not detections
        sl = slice(start, start + per_chunk)
        weights_x = _bilinear_weights(xs, origin[sl, 0], size[sl, 0], masks.shape[-1], mode)  # (n, w, m)
        weights_y = _bilinear_weights(ys, origin[sl, 1], size[sl, 1], masks.shape[-1], mode)  # (n, h, m)
        rows = weights_y @ masks[sl]  # (n, h, m) @ (n, m, m) -> (n, h, m)
        # (n, h, m) @ (n, m, w) -> (n, h, w), written in place: the output is the big tensor here.
        torch.bmm(rows, weights_x.transpose(1, 2), out=out[sl, 0])
    return out.clamp_(0, 1)  # the clamp only removes rounding error


def _bilinear_weights(
    pixels: torch.Tensor, origin: torch.Tensor, size: torch.Tensor, cells: int, mode: str
) -> torch.Tensor:
    """(n, L, cells): row p holds the bilinear weights of the mask cells read by pixel p (1-D)."""
    if mode == "exact":
        # Pixel centre p + 0.5 in mask cells, minus 0.5 to index cell centres (cell j's centre is j).
        src = (pixels[None, :] + 0.5 - origin[:, None]) * (cells / size[:, None]) - 0.5  # (n, L)
    else:
        # F.interpolate(size=s) reads source index (j + 0.5)·cells/s − 0.5, clamped into the image.
        src = (pixels[None, :] - origin[:, None] + 0.5) * (cells / size[:, None]) - 0.5
        src = src.clamp(0, cells - 1)
    left = src.floor()
    frac = (src - left)[..., None]  # (n, L, 1)
    cell_idx = torch.arange(cells, device=pixels.device, dtype=src.dtype)  # (cells,)
    # A cell index outside 0..cells-1 matches no column: its weight is dropped (zero padding).
    weights = (1 - frac) * (cell_idx == left[..., None]) + frac * (cell_idx == left[..., None] + 1)
    if mode == "torchvision":
        inside = (pixels[None, :] >= origin[:, None]) & (pixels[None, :] < origin[:, None] + size[:, None])
        weights = weights * inside[..., None]  # torchvision writes only its integer window
    return weights  # (n, L, cells)
