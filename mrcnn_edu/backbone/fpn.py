"""Feature Pyramid Network: P2-P6 from C2-C5 (Lin et al. 2017 [27]; Mask R-CNN §3).

"FPN uses a top-down architecture with lateral connections to build an in-network feature
pyramid from a single-scale input." — Mask R-CNN §3, Network Architecture.

For levels l = 2..5, with C_l of shape (N, C_in_l, H_l, W_l) and d = 256 channels:

    T_5 = lateral_5(C_5)                                  lateral: 1x1 conv, C_in_l -> d
    T_l = lateral_l(C_l) + upsample_2x(T_{l+1})           nearest-neighbour, to C_l's size
    P_l = output_l(T_l)                                   output: 3x3 conv, d -> d
    P_6 = max_pool(P_5, kernel 1, stride 2)               subsampling, for the RPN only

so P_l is (N, d, H_l, W_l) with stride 2^l (4, 8, 16, 32, 64). The upsampling targets the
lateral's exact size (``F.interpolate(size=...)``) rather than a factor 2, so odd sides —
where C_l's side is twice C_{l+1}'s minus one — still line up.

As in the FPN paper and Detectron, FPN's own convs have a bias and no normalisation; their
weights start from ``kaiming_uniform_(a=1)`` and biases from 0. ``norm="gn"`` adds GroupNorm
after each of them (and drops the then-redundant bias) for miniature models trained from
scratch (see norm.py).

Compatibility: :func:`torchvision_fpn_key_map` renames torchvision's ``BackboneWithFPN`` /
``maskrcnn_resnet50_fpn`` keys to ours so its weights load by key — ``body.*`` is shared;
``fpn.inner_blocks.i.0.*`` are our ``fpn.lateral_convs.i.0.*`` and ``fpn.layer_blocks.i.0.*``
our ``fpn.output_convs.i.0.*`` (i = 0 is the C2 level). torchvision's output names
'0', '1', '2', '3', 'pool' are our 'p2'..'p6'.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .norm import make_norm
from .resnet import LoadReport, ResNet, ResNetConfig, load_state_dict_by_key

FPN_NORMS = ("none", "gn")
FPN_FEATURE_NAMES = ("p2", "p3", "p4", "p5", "p6")
FPN_STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


def _conv_norm(in_channels: int, out_channels: int, kernel_size: int, norm: str) -> nn.Sequential:
    """Conv (+ GroupNorm). A Sequential, so the conv's keys end in ".0.weight" as torchvision's."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                     bias=norm == "none")
    # FPN / Detectron init ("c2_xavier_fill"): kaiming_uniform with a=1, zero bias.
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    layers = [conv] if norm == "none" else [conv, make_norm("gn", out_channels)]
    return nn.Sequential(*layers)


def last_level_max_pool(p5: torch.Tensor) -> torch.Tensor:
    """P6: "a stride two subsampling of P5" (FPN §4.1), max-pool with kernel 1, stride 2."""
    return F.max_pool2d(p5, kernel_size=1, stride=2)  # (N, d, ceil(H5/2), ceil(W5/2))


class FPN(nn.Module):
    """Lateral 1x1 convs, a top-down pathway and 3x3 output convs over C2..C5."""

    def __init__(self, in_channels: list[int], out_channels: int = 256, norm: str = "none") -> None:
        super().__init__()
        if norm not in FPN_NORMS:
            raise ValueError(f"norm must be one of {FPN_NORMS}, got {norm!r}")
        if out_channels < 1 or not in_channels:
            raise ValueError(f"need out_channels >= 1 and at least one input level, got "
                             f"out_channels={out_channels}, in_channels={in_channels}")
        self.lateral_convs = nn.ModuleList(_conv_norm(c, out_channels, 1, norm)
                                           for c in in_channels)
        self.output_convs = nn.ModuleList(_conv_norm(out_channels, out_channels, 3, norm)
                                          for _ in in_channels)
        self.out_channels = out_channels

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """``features`` fine to coarse (C2..C5) -> outputs fine to coarse (P2..P5)."""
        if len(features) != len(self.lateral_convs):
            raise ValueError(f"features must hold {len(self.lateral_convs)} levels, "
                             f"got {len(features)}")
        top_down = self.lateral_convs[-1](features[-1])  # (N, d, H5, W5)
        outputs = [self.output_convs[-1](top_down)]
        for level in range(len(features) - 2, -1, -1):
            lateral = self.lateral_convs[level](features[level])  # (N, d, H_l, W_l)
            upsampled = F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            top_down = lateral + upsampled
            outputs.insert(0, self.output_convs[level](top_down))
        return outputs


class FPNBackbone(nn.Module):
    """ResNet-FPN: ``forward(images)`` returns {"p2", ..., "p6"}, all with ``out_channels``."""

    def __init__(self, cfg: ResNetConfig, out_channels: int = 256, norm: str = "none") -> None:
        super().__init__()
        self.body = ResNet(cfg, last_stage=5)
        self.fpn = FPN([self.body.out_channels[name] for name in ("c2", "c3", "c4", "c5")],
                       out_channels, norm)
        self.feature_names = list(FPN_FEATURE_NAMES)
        self.strides = dict(FPN_STRIDES)
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.body(images)
        p2, p3, p4, p5 = self.fpn([c["c2"], c["c3"], c["c4"], c["c5"]])
        return {"p2": p2, "p3": p3, "p4": p4, "p5": p5, "p6": last_level_max_pool(p5)}


_TV_FPN_RENAMES = (("fpn.inner_blocks.", "fpn.lateral_convs."),
                   ("fpn.layer_blocks.", "fpn.output_convs."))


def torchvision_fpn_key_map(keys, prefix: str = "backbone.") -> dict[str, str]:
    """Map torchvision ResNet-FPN keys under ``prefix`` to :class:`FPNBackbone` keys.

    ``prefix="backbone."`` for a whole ``maskrcnn_resnet50_fpn`` state dict, ``""`` for a
    ``resnet_fpn_backbone`` module's own. Keys outside ``prefix`` (RPN, RoI heads) are left
    out. torchvision before 0.13 stored the FPN convs as bare Conv2d ("inner_blocks.0.weight");
    those get the ".0" that its later Conv2dNormActivation layout (and ours) has.
    """
    mapping = {}
    for key in keys:
        if not key.startswith(prefix):
            continue
        ours = key[len(prefix):]
        for theirs, renamed in _TV_FPN_RENAMES:
            if ours.startswith(theirs):
                ours = renamed + re.sub(r"^(\d+)\.(weight|bias)$", r"\1.0.\2", ours[len(theirs):])
        if ours.startswith(("body.", "fpn.")):
            mapping[key] = ours
    return mapping


def load_torchvision_fpn_state_dict(backbone: FPNBackbone, state_dict: dict[str, torch.Tensor],
                                    prefix: str = "backbone.", strict: bool = True) -> LoadReport:
    """Load torchvision ResNet-FPN weights (see :func:`torchvision_fpn_key_map`) into ``backbone``.

    Reported keys are ours. Nothing is downloaded: bring the state dict yourself.
    """
    if not isinstance(backbone, FPNBackbone):
        raise ValueError(f"backbone must be an FPNBackbone, got {type(backbone).__name__}")
    mapping = torchvision_fpn_key_map(state_dict.keys(), prefix)
    renamed = {ours: state_dict[theirs] for theirs, ours in mapping.items()}
    if not renamed:
        raise ValueError(f"state dict has no torchvision ResNet-FPN keys under prefix {prefix!r} "
                         f"(expected e.g. {prefix}body.conv1.weight)")
    return load_state_dict_by_key(backbone, renamed, strict, what="ResNet-FPN backbone")
