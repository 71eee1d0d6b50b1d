"""The paper's three feature set-ups on a ResNet / ResNeXt body (Mask R-CNN §3, Table 2).

"We denote the backbone architecture using the nomenclature network-depth-features." — §3.

=========  ==================  ==========  ========================================
features   feature_names       strides     RoI head
=========  ==================  ==========  ========================================
"C4"       ["c4"]              16          res5 per RoI (:func:`make_res5_head`), Fig. 4 left
"C5"       ["c5"]              32          the FPN-style head, Fig. 4 right (Table 2d)
"FPN"      ["p2", ..., "p6"]   4 ... 64    the FPN head; P6 feeds the RPN only
=========  ==================  ==========  ========================================

:func:`build_backbone` returns a module whose ``forward(images)`` maps (N, 3, H, W) to a dict
over ``feature_names`` and that carries ``out_channels`` (an int: every returned level has
it) and ``strides`` ({name: stride in input pixels}). The ResNet body is always at
``.body``, so torchvision-style ``backbone.body.*`` keys line up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .fpn import (FPN, FPNBackbone, last_level_max_pool, load_torchvision_fpn_state_dict,
                  torchvision_fpn_key_map)
from .norm import FrozenBatchNorm2d, freeze_batch_norm, group_norm_groups, make_norm
from .resnet import (STAGE_STRIDES, Bottleneck, LoadReport, ResNet, ResNetConfig,
                     load_imagenet_state_dict, load_state_dict_by_key, make_res5_head,
                     mini_resnet, resnet50, resnet101, resnext101_32x8d,
                     split_imagenet_state_dict)

FEATURE_SETUPS = ("C4", "C5", "FPN")


@dataclass
class BackboneConfig:
    """Which body and which feature set-up. Defaults: ResNet-50-FPN (Mask R-CNN Table 1)."""

    resnet: ResNetConfig = field(default_factory=ResNetConfig)
    features: str = "FPN"  # "C4" (§3, [19]) | "C5" (Table 2d) | "FPN" ([27])
    fpn_channels: int = 256  # d = 256 in FPN [27] §3 and Mask R-CNN Figure 4 (right)
    fpn_norm: str = "none"  # FPN paper: no norm; "gn" for from-scratch miniatures

    def __post_init__(self) -> None:
        if self.features not in FEATURE_SETUPS:
            raise ValueError(f"features must be one of {FEATURE_SETUPS}, got {self.features!r}")


class SingleLevelBackbone(nn.Module):
    """ResNet-C4 or ResNet-C5: the body up to res4 / res5, returning that one map."""

    def __init__(self, cfg: ResNetConfig, last_stage: int) -> None:
        super().__init__()
        self.body = ResNet(cfg, last_stage=last_stage)
        name = f"c{last_stage}"
        self.feature_names = [name]
        self.out_channels = cfg.out_channels(last_stage)
        self.strides = {name: STAGE_STRIDES[name]}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        name = self.feature_names[0]
        return {name: self.body(images)[name]}  # (N, C, ceil(H/stride), ceil(W/stride))


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """The C4, C5 or FPN backbone of ``cfg`` (for C4, build res5 with :func:`make_res5_head`)."""
    if cfg.features == "C4":
        return SingleLevelBackbone(cfg.resnet, last_stage=4)
    if cfg.features == "C5":
        return SingleLevelBackbone(cfg.resnet, last_stage=5)
    if cfg.features == "FPN":
        return FPNBackbone(cfg.resnet, cfg.fpn_channels, cfg.fpn_norm)
    raise ValueError(f"features must be one of {FEATURE_SETUPS}, got {cfg.features!r}")


__all__ = [
    "BackboneConfig", "Bottleneck", "FEATURE_SETUPS", "FPN", "FPNBackbone", "FrozenBatchNorm2d",
    "LoadReport", "ResNet", "ResNetConfig", "SingleLevelBackbone", "build_backbone",
    "freeze_batch_norm", "group_norm_groups", "last_level_max_pool", "load_imagenet_state_dict",
    "load_state_dict_by_key", "load_torchvision_fpn_state_dict", "make_norm", "make_res5_head",
    "mini_resnet", "resnet50", "resnet101", "resnext101_32x8d", "split_imagenet_state_dict",
    "torchvision_fpn_key_map",
]
