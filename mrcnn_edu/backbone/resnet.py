"""ResNet / ResNeXt backbones with frozen batch norm, exposing C2-C5 (Mask R-CNN §3).

"We evaluate ResNet [19] and ResNeXt [45] networks of depth 50 or 101 layers. The original
implementation of Faster R-CNN with ResNets [19] extracted features from the final
convolutional layer of the 4-th stage, which we call C4." — Mask R-CNN §3, Network Architecture.

Structure (He et al. 2016, Table 1), for an input of shape (N, 3, H, W):

    stem   conv1 7x7/2 -> bn1 -> relu -> maxpool 3x3/2         (N, 64,   H/4,  W/4)
    res2   layer1: blocks[0] bottlenecks               = C2     (N, 256,  H/4,  W/4)
    res3   layer2: blocks[1] bottlenecks, first /2     = C3     (N, 512,  H/8,  W/8)
    res4   layer3: blocks[2] bottlenecks, first /2     = C4     (N, 1024, H/16, W/16)
    res5   layer4: blocks[3] bottlenecks, first /2     = C5     (N, 2048, H/32, W/32)

Sizes round *up*: every stride-2 layer maps a side s to ceil(s / 2). blocks is (3, 4, 6, 3)
for ResNet-50 and (3, 4, 23, 3) for ResNet-101. A bottleneck is 1x1 (reduce) -> 3x3 ->
1x1 (expand, x4) plus a shortcut (a 1x1 projection where shape changes). ResNeXt (Xie et
al. 2017) makes the 3x3 a grouped conv: "32x8d" = 32 groups of width 8 in res2.

Channel bookkeeping (Detectron2's names): res2's bottleneck width is
``groups * width_per_group`` and its output ``res2_out_channels``; both double at each later
stage. Miniature models (:func:`mini_resnet`) shrink these and the block counts but keep
the structure, strides and C2-C5 names, so every feature set-up works unchanged.

Compatibility decisions, made here:

- Module names follow torchvision's ResNet (conv1, bn1, layer1..layer4, each Bottleneck
  conv1/bn1/conv2/bn2/conv3/bn3/downsample.0/downsample.1, fc), so an ImageNet state dict
  in torchvision's key layout loads by key (:func:`load_imagenet_state_dict`).
- The stride-2 of a stage's first block sits on the 3x3 conv ("ResNet v1.5", torchvision's
  layout and its ImageNet weights). The original MSRA ResNets used by Detectron put it on
  the first 1x1 conv; ``stride_in_1x1=True`` gives that layout for such weights.
- ``freeze_at`` follows Detectron: 0 freezes nothing, 1 the stem, 2 the stem and res2 (the
  paper's default when fine-tuning ImageNet weights), ... 5 every stage of the body. In the C4
  design res5 is not in the body but the per-RoI head (``make_res5_head``), which trains
  whatever ``freeze_at`` says, as in Detectron.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .norm import NORM_KINDS, freeze_batch_norm, make_norm

# He et al. 2016, Table 1: bottleneck blocks per stage res2..res5.
BLOCKS_PER_DEPTH = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STAGE_NAMES = ("c2", "c3", "c4", "c5")
STAGE_STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
BOTTLENECK_EXPANSION = 4  # the last 1x1 conv of a bottleneck widens 4x (He et al. 2016, Fig. 5)


@dataclass
class ResNetConfig:
    """A ResNet / ResNeXt body. Defaults are ResNet-50 as fine-tuned in Mask R-CNN."""

    depth: int | tuple[int, int, int, int] = 50  # 50 | 101 | 152, or blocks for res2..res5
    groups: int = 1  # ResNeXt cardinality: 32 for ResNeXt-101 32x8d (Xie et al. 2017)
    width_per_group: int = 64  # res2 bottleneck width per group: 64 ResNet, 8 for 32x8d
    stem_channels: int = 64  # conv1 output channels (He et al. 2016, Table 1)
    res2_out_channels: int = 256  # C2 channels; C3/C4/C5 have 2x/4x/8x (512/1024/2048)
    norm: str = "frozen_bn"  # paper/Detectron: frozen BN (2 images per GPU); "bn" | "gn"
    freeze_at: int = 2  # Detectron convention: stem + res2 frozen when fine-tuning ImageNet
    stride_in_1x1: bool = False  # False: torchvision v1.5 layout; True: MSRA/Detectron layout
    num_classes: int | None = None  # ImageNet classifier (1000) for parameter counts / loading
    zero_init_residual: bool = False  # zero each block's last norm gain: helps from-scratch GN/BN
    # batch norm eps (norm.py): 1e-5 for torchvision's ImageNet weights; 0 for weights converted
    # from Detectron's AffineChannel, e.g. torchvision's COCO_V1 detectors (its overwrite_eps)
    bn_eps: float = 1e-5
    blocks: tuple[int, int, int, int] = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.depth, int):
            if self.depth not in BLOCKS_PER_DEPTH:
                raise ValueError(f"depth must be one of {sorted(BLOCKS_PER_DEPTH)} or a tuple "
                                 f"of 4 block counts, got {self.depth!r}")
            self.blocks = BLOCKS_PER_DEPTH[self.depth]
        else:
            blocks = tuple(self.depth)
            if len(blocks) != 4 or not all(isinstance(b, int) and b >= 1 for b in blocks):
                raise ValueError(f"depth as a tuple must hold 4 block counts >= 1 (res2..res5), "
                                 f"got {self.depth!r}")
            self.blocks = blocks  # type: ignore[assignment]
        if self.norm not in NORM_KINDS:
            raise ValueError(f"norm must be one of {NORM_KINDS}, got {self.norm!r}")
        if not (isinstance(self.bn_eps, (int, float)) and 0 <= self.bn_eps < 1):
            raise ValueError(f"bn_eps must be in [0, 1), got {self.bn_eps!r}")
        if not 0 <= self.freeze_at <= 5:
            raise ValueError(f"freeze_at must be in 0..5, got {self.freeze_at}")
        for name in ("groups", "width_per_group", "stem_channels", "res2_out_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {self.num_classes}")
        if self.zero_init_residual and self.norm == "frozen_bn":
            raise ValueError("zero_init_residual=True with norm='frozen_bn' would switch every "
                             "residual branch off for good; use norm='bn' or 'gn'")
        if self.zero_init_residual and self.freeze_at >= 2:
            # a frozen stage never learns its zeroed gains back: its blocks would stay identities
            raise ValueError(f"zero_init_residual=True with freeze_at={self.freeze_at} would switch "
                             f"the frozen res2..res{min(self.freeze_at, 5)} residual branches off for "
                             "good; a from-scratch body freezes at most the stem (freeze_at <= 1)")

    def bottleneck_channels(self, stage: int) -> int:
        """Width of the 3x3 conv in stage ``stage`` (2..5)."""
        return self.groups * self.width_per_group * 2 ** (stage - 2)

    def out_channels(self, stage: int) -> int:
        """Channels of C``stage`` (2..5)."""
        return self.res2_out_channels * 2 ** (stage - 2)


def resnet50(**overrides) -> ResNetConfig:
    """ResNet-50 (He et al. 2016): 25.6 M parameters with the 1000-way classifier."""
    return ResNetConfig(depth=50, **overrides)


def resnet101(**overrides) -> ResNetConfig:
    """ResNet-101 (He et al. 2016): 44.5 M parameters with the 1000-way classifier."""
    return ResNetConfig(depth=101, **overrides)


def resnext101_32x8d(**overrides) -> ResNetConfig:
    """ResNeXt-101 32x8d (Xie et al. 2017), the backbone of Mask R-CNN's best entries."""
    return ResNetConfig(depth=101, groups=32, width_per_group=8, **overrides)


def mini_resnet(width: int = 16, blocks: tuple[int, int, int, int] = (1, 1, 1, 1),
                **overrides) -> ResNetConfig:
    """A narrow, shallow ResNet of the same structure, for training from scratch here.

    ``width`` replaces 64 everywhere (stem and res2 bottleneck width; C2 has 4 * width
    channels). Defaults to GroupNorm and nothing frozen, because a from-scratch model has
    no ImageNet statistics to freeze (see norm.py).
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    settings = dict(depth=tuple(blocks), stem_channels=width, width_per_group=width,
                    res2_out_channels=BOTTLENECK_EXPANSION * width, norm="gn", freeze_at=0)
    settings.update(overrides)
    return ResNetConfig(**settings)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (grouped for ResNeXt) -> 1x1 expand, plus the shortcut."""

    def __init__(self, in_channels: int, bottleneck_channels: int, out_channels: int,
                 stride: int, groups: int, norm: str, stride_in_1x1: bool, bn_eps: float = 1e-5) -> None:
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, bottleneck_channels, 1, stride_1x1, bias=False)
        self.bn1 = make_norm(norm, bottleneck_channels, bn_eps)
        self.conv2 = nn.Conv2d(bottleneck_channels, bottleneck_channels, 3, stride_3x3,
                               padding=1, groups=groups, bias=False)
        self.bn2 = make_norm(norm, bottleneck_channels, bn_eps)
        self.conv3 = nn.Conv2d(bottleneck_channels, out_channels, 1, bias=False)
        self.bn3 = make_norm(norm, out_channels, bn_eps)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            # Projection shortcut (He et al. 2016, option B); index names match torchvision.
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                make_norm(norm, out_channels, bn_eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut, inplace=True)


def make_stage(cfg: ResNetConfig, stage: int, in_channels: int, first_stride: int) -> nn.Sequential:
    """Stage res``stage`` (2..5): cfg.blocks[stage - 2] bottlenecks, the first with the stride."""
    width, out_channels = cfg.bottleneck_channels(stage), cfg.out_channels(stage)
    blocks = []
    for index in range(cfg.blocks[stage - 2]):
        blocks.append(Bottleneck(in_channels if index == 0 else out_channels, width,
                                 out_channels, first_stride if index == 0 else 1,
                                 cfg.groups, cfg.norm, cfg.stride_in_1x1, cfg.bn_eps))
    return nn.Sequential(*blocks)


def init_resnet_weights(module: nn.Module, zero_init_residual: bool = False) -> None:
    """He (MSRA) init for convs, unit gain / zero bias for norms (torchvision, Detectron)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        # Each block then starts as the identity (Goyal et al. 2017), easing from-scratch training.
        for m in module.modules():
            if isinstance(m, Bottleneck) and isinstance(m.bn3, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.zeros_(m.bn3.weight)


class ResNet(nn.Module):
    """The ResNet body up to stage ``last_stage``; ``forward`` returns {"c2", ..., "c<last>"}.

    ``last_stage=4`` is the C4 set-up's trunk (res5 then runs per RoI, see
    :func:`make_res5_head`); ``last_stage=5`` gives C5 and FPN their inputs.
    """

    def __init__(self, cfg: ResNetConfig, last_stage: int = 5) -> None:
        super().__init__()
        if last_stage not in (2, 3, 4, 5):
            raise ValueError(f"last_stage must be 2, 3, 4 or 5, got {last_stage}")
        if cfg.num_classes is not None and last_stage != 5:
            raise ValueError(f"num_classes={cfg.num_classes} needs last_stage=5 (the classifier "
                             f"reads C5), got last_stage={last_stage}")
        self.cfg, self.last_stage = cfg, last_stage
        self.conv1 = nn.Conv2d(3, cfg.stem_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(cfg.norm, cfg.stem_channels, cfg.bn_eps)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = cfg.stem_channels
        for stage in range(2, last_stage + 1):
            # torchvision calls res2..res5 layer1..layer4; res2 keeps the stem's stride 4.
            setattr(self, f"layer{stage - 1}",
                    make_stage(cfg, stage, in_channels, first_stride=1 if stage == 2 else 2))
            in_channels = cfg.out_channels(stage)
        self.feature_names = list(STAGE_NAMES[: last_stage - 1])
        self.out_channels = {f"c{s}": cfg.out_channels(s) for s in range(2, last_stage + 1)}
        self.strides = {name: STAGE_STRIDES[name] for name in self.feature_names}
        if cfg.num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cfg.out_channels(5), cfg.num_classes)
        init_resnet_weights(self, cfg.zero_init_residual)
        self.freeze(cfg.freeze_at)

    def freeze(self, freeze_at: int) -> None:
        """Stop gradients into the stem (1) and res2..res<freeze_at> (Detectron's FREEZE_AT)."""
        if freeze_at >= 1:
            self.bn1 = freeze_batch_norm(self.bn1)
            for module in (self.conv1, self.bn1):
                module.requires_grad_(False)
        for stage in range(2, min(freeze_at, self.last_stage) + 1):
            layer = freeze_batch_norm(getattr(self, f"layer{stage - 1}"))
            layer.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
        x = self.maxpool(F.relu(self.bn1(self.conv1(images)), inplace=True))  # (N, stem, H/4, W/4)
        features = {}
        for stage in range(2, self.last_stage + 1):
            x = getattr(self, f"layer{stage - 1}")(x)  # (N, C_stage, H/2^stage, W/2^stage)
            features[f"c{stage}"] = x
        return features

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (N, num_classes): global average pool of C5, then fc."""
        if self.cfg.num_classes is None:
            raise ValueError("classify needs a config with num_classes set")
        c5 = self.forward(images)["c5"]
        return self.fc(self.avgpool(c5).flatten(1))  # (N, 2048) -> (N, num_classes)


def make_res5_head(cfg: ResNetConfig, first_stride: int = 2) -> nn.Sequential:
    """res5 as the per-RoI head of the C4 set-up (Mask R-CNN Figure 4, left).

    Input: RoI features (R, C4 channels, 14, 14) -> output (R, C5 channels, 7, 7) with the
    default ``first_stride=2``, as in the ResNet paper [19] and Detectron's code. The box head
    then average-pools this to (R, 2048); the mask head deconvolves it to 14x14.
    The Mask R-CNN paper's figure instead uses 7x7 RoIs and stride 1 ("for simplicity we
    altered [res5] so that the first conv operates on a 7x7 RoI with stride 1");
    ``first_stride=1`` gives that (``BoxHeadConfig.res5_first_stride`` picks it for the model;
    the strides change no parameter shape). Keys are layer4's without the prefix ("0.conv1.weight"),
    so ImageNet res5 weights load with :func:`split_imagenet_state_dict`.
    """
    if first_stride not in (1, 2):
        raise ValueError(f"first_stride must be 1 or 2, got {first_stride}")
    head = make_stage(cfg, 5, cfg.out_channels(4), first_stride)
    init_resnet_weights(head, cfg.zero_init_residual)
    head.out_channels = cfg.out_channels(5)
    return head


# --- Loading ImageNet weights a user brings (torchvision key layout) -------------------------

@dataclass
class LoadReport:
    """What :func:`load_state_dict_by_key` did with each key."""

    loaded: list[str] = field(default_factory=list)  # copied into the model
    missing: list[str] = field(default_factory=list)  # model keys the state dict lacks
    unexpected: list[str] = field(default_factory=list)  # state-dict keys with no place to go
    ignored: list[str] = field(default_factory=list)  # skipped on purpose (e.g. fc for a body)

    def merge(self, other: "LoadReport", prefix: str = "") -> "LoadReport":
        return LoadReport(self.loaded + [prefix + k for k in other.loaded],
                          self.missing + [prefix + k for k in other.missing],
                          self.unexpected + [prefix + k for k in other.unexpected],
                          self.ignored + [prefix + k for k in other.ignored])


def _key_list(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_by_key(module: nn.Module, state_dict: dict[str, torch.Tensor],
                           strict: bool = True, what: str = "model") -> LoadReport:
    """Copy tensors into ``module`` by key; name every key that does not fit.

    BatchNorm's ``num_batches_tracked`` counters are ignored both ways (FrozenBatchNorm2d
    has none). A shape mismatch always raises ValueError naming the keys; with
    ``strict=True`` so do missing and unexpected keys.
    """
    own = module.state_dict()
    report, mismatched = LoadReport(), []
    for key, value in state_dict.items():
        if key in own:
            if tuple(own[key].shape) != tuple(value.shape):
                mismatched.append(f"{key}: {tuple(value.shape)} in the state dict, "
                                  f"{tuple(own[key].shape)} in the {what.split(' (')[0]}")
            else:
                report.loaded.append(key)
        elif key.endswith("num_batches_tracked"):
            report.ignored.append(key)
        else:
            report.unexpected.append(key)
    report.missing = [k for k in own
                      if k not in state_dict and not k.endswith("num_batches_tracked")]
    if mismatched:
        raise ValueError(f"state dict does not fit the {what}: shape mismatch for "
                         f"{len(mismatched)} key(s): " + "; ".join(mismatched[:10]))
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"state dict does not fit the {what} (strict=True): "
                         f"missing keys [{_key_list(report.missing)}]; "
                         f"unexpected keys [{_key_list(report.unexpected)}]")
    module.load_state_dict({k: state_dict[k] for k in report.loaded}, strict=False)
    return report


def split_imagenet_state_dict(state_dict: dict[str, torch.Tensor]
                              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a torchvision-layout ImageNet ResNet state dict for the C4 set-up.

    Returns ``(body, res5)``: ``body`` holds the stem and layer1..layer3 (the classifier
    ``fc.*`` is dropped), ``res5`` holds layer4 with the ``layer4.`` prefix removed, the key
    layout of :func:`make_res5_head`.
    """
    body, res5 = {}, {}
    for key, value in state_dict.items():
        if key.startswith("layer4."):
            res5[key[len("layer4."):]] = value
        elif not key.startswith("fc."):
            body[key] = value
    return body, res5


def load_imagenet_state_dict(model: ResNet, state_dict: dict[str, torch.Tensor],
                             strict: bool = True, res5_head: nn.Module | None = None
                             ) -> LoadReport:
    """Load an ImageNet ResNet state dict (torchvision keys) into ``model`` (and ``res5_head``).

    Parts the model does not have are *ignored*, not unexpected: ``fc.*`` when it has no
    classifier, ``layer<k>.*`` beyond its ``last_stage`` (``layer4.*`` goes to ``res5_head``
    when one is given). A leading ``module.`` (from DistributedDataParallel) is stripped.
    Each part is checked before anything is copied into it. Nothing is downloaded: bring the
    file yourself, e.g. ``torch.load(path, map_location="cpu", weights_only=True)``.
    """
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    body_part, ignored = {}, []
    for key, value in state_dict.items():
        top = key.split(".", 1)[0]
        stage = int(top[len("layer"):]) + 1 if re.fullmatch(r"layer\d", top) else None
        if top == "fc" and model.cfg.num_classes is None:
            ignored.append(key)
        elif stage is not None and stage > model.last_stage:
            if not (stage == 5 and res5_head is not None):
                ignored.append(key)
        else:
            body_part[key] = value
    report = load_state_dict_by_key(model, body_part, strict, what="ResNet body")
    report.ignored += ignored
    if res5_head is not None:
        _, res5_part = split_imagenet_state_dict(state_dict)
        head_report = load_state_dict_by_key(res5_head, res5_part, strict, what="res5 head")
        report = report.merge(head_report, prefix="layer4.")
    return report
