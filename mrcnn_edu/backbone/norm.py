"""Normalisation layers for the backbone: frozen batch norm, batch norm, group norm.

Mask R-CNN §3.1 (Implementation Details) fine-tunes an ImageNet-pretrained ResNet with a
mini-batch of 2 images per GPU. Batch statistics over 2 images are useless, so the paper's
code (Detectron) *freezes* batch norm: the ImageNet running mean / variance and the affine
weight / bias become constants, and BN is a fixed per-channel affine map

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias  =  x * scale + shift

Shapes: x is (N, C, H, W); all four statistics are (C,).

Three kinds are offered by :func:`make_norm`:

- ``"frozen_bn"`` — the paper's setting (default). Statistics are buffers, not parameters,
  so they are saved and loaded with the state dict but never trained.
- ``"bn"`` — ordinary ``nn.BatchNorm2d``; used for ImageNet-style classification and to
  count parameters as torchvision does (its BN weight/bias are parameters).
- ``"gn"`` — GroupNorm (Wu & He, 2018). Frozen BN only makes sense with pretrained
  statistics; a *miniature* backbone trained from scratch on small batches has none, and
  live BN with 2-8 images per GPU is noisy. GroupNorm normalises within each image, so it
  trains from scratch at any batch size. We use 32 groups (the GN paper's default) or, for
  narrow models whose channel count 32 does not divide, the largest divisor <= 32.

Compatibility note on ``eps``: torchvision's ``FrozenBatchNorm2d`` (used by its detection
models) and ``nn.BatchNorm2d`` both use eps = 1e-5, and the ImageNet weights were trained
with it; Detectron (Caffe2) folded BN into an ``AffineChannel`` op, i.e. eps = 0. We pick
torchvision's 1e-5 so that torchvision-layout ImageNet weights reproduce their features.
"""

from __future__ import annotations

import torch
from torch import nn

NORM_KINDS = ("frozen_bn", "bn", "gn")
GN_MAX_GROUPS = 32  # Wu & He, "Group Normalization", ECCV 2018: G = 32 by default


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (buffers, not parameters).

    Loads ``weight``, ``bias``, ``running_mean``, ``running_var`` from a BatchNorm2d state
    dict and ignores its ``num_batches_tracked`` counter.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # A BatchNorm2d state dict carries a step counter that means nothing once frozen.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()  # (C,)
        shift = self.bias - self.running_mean * scale  # (C,)
        # in x's dtype: fp32 buffers would promote a bf16 / fp16 (autocast) activation back to
        # fp32, and every ReLU and residual add after it would run and be stored in fp32
        return x * scale.to(x.dtype).reshape(1, -1, 1, 1) + shift.to(x.dtype).reshape(1, -1, 1, 1)

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d) -> "FrozenBatchNorm2d":
        """A frozen copy of ``bn``'s current statistics and affine parameters."""
        any_tensor = next(bn.parameters(), next(bn.buffers(), torch.empty(0)))
        frozen = cls(bn.num_features, eps=bn.eps).to(any_tensor.device)
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            if bn.track_running_stats:
                frozen.running_mean.copy_(bn.running_mean)
                frozen.running_var.copy_(bn.running_var)
        return frozen

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def group_norm_groups(num_channels: int, max_groups: int = GN_MAX_GROUPS) -> int:
    """The largest number of groups <= ``max_groups`` that divides ``num_channels``."""
    if num_channels < 1:
        raise ValueError(f"num_channels must be >= 1, got {num_channels}")
    groups = min(max_groups, num_channels)
    while num_channels % groups != 0:
        groups -= 1
    return groups


def make_norm(kind: str, num_channels: int, bn_eps: float = 1e-5) -> nn.Module:
    """One normalisation layer of ``kind`` ("frozen_bn" | "bn" | "gn") over ``num_channels``;
    ``bn_eps``: the two batch norms' eps."""
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(num_channels, eps=bn_eps)
    if kind == "bn":
        return nn.BatchNorm2d(num_channels, eps=bn_eps)
    if kind == "gn":
        return nn.GroupNorm(group_norm_groups(num_channels), num_channels)
    raise ValueError(f"norm must be one of {NORM_KINDS}, got {kind!r}")


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` inside ``module`` by a FrozenBatchNorm2d copy.

    Used for frozen stages (``freeze_at``) of a live-BN model, as Detectron2 does: without
    it a frozen stage's running statistics would still drift in ``train()`` mode.
    """
    if isinstance(module, nn.BatchNorm2d):
        return FrozenBatchNorm2d.from_batch_norm(module)
    for name, child in module.named_children():
        new_child = freeze_batch_norm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
