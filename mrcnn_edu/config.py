"""Model configuration: one tree of dataclasses, and presets for the paper's models.

Every component keeps its own dataclass beside its code (``RPNConfig`` in ``rpn.py``,
``MaskHeadConfig`` in ``roi_heads/mask_head.py``, ...), with the paper's defaults and a comment
citing where each number comes from. This file only gathers them into ``MaskRCNNConfig`` and
writes down the presets:

=====================  ==========================================================  =========
preset                 what                                                        paper
=====================  ==========================================================  =========
``r50_c4``             ResNet-50-C4: res4 features (stride 16), res5 as RoI head   Table 2a-c
``r101_c4``            ResNet-101-C4                                               Table 2a
``r50_c5``             ResNet-50-C5: res5 features (stride 32)                     Table 2d
``r50_fpn``            ResNet-50-FPN (P2-P6)                                       Table 2a,e
``r101_fpn``           ResNet-101-FPN                                              Table 1
``x101_fpn``           ResNeXt-101-32x8d-FPN                                       Table 1
``keypoint_r50_fpn``   R-50-FPN with the keypoint head, person only                §5, Table 4
``mini_fpn``/``mini_c4``/``mini_c5``  the same structures, narrow, from scratch     (here)
=====================  ==========================================================  =========

The C5 set-up of Table 2d follows §4.2: "We use the same head as in Figure 4 (right), as the res5
head is not applicable" -- the FPN-style heads (2-fc box head on 7x7, 4-conv FCN mask head on
14x14) on the single stride-32 map, so that only the RoI feature extractor differs between its
rows. Its RoIs per image (512) and test proposals (300) the paper does not give: ours.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mrcnn_edu.backbone import BackboneConfig, mini_resnet, resnet50, resnet101, resnext101_32x8d
from mrcnn_edu.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mrcnn_edu.roi_heads.box_head import BoxHeadConfig, c4_box_head_config
from mrcnn_edu.roi_heads.keypoint_head import KeypointHeadConfig
from mrcnn_edu.roi_heads.mask_head import MaskHeadConfig
from mrcnn_edu.roi_heads.pooler import PoolerConfig
from mrcnn_edu.rpn import RPNConfig, c4_rpn_config, fpn_rpn_config

__all__ = ["AnchorConfig", "TransformConfig", "MaskRCNNConfig", "PRESETS", "get_preset", "config_differences"]


def config_differences(done, planned, where: str = "", skip: tuple[str, ...] = (),
                       word: str = "planned") -> list[str]:
    """``key=value (planned value)`` for each setting in both nested dicts (configs as
    ``asdict`` and JSON give them) that differs, but those named in ``skip``. A key in only one of
    them (a setting added to the code since) is not a difference: its default is."""
    if isinstance(done, dict) and isinstance(planned, dict):
        return [d for key in done.keys() & planned.keys()
                for d in config_differences(done[key], planned[key], f"{where}.{key}" if where else str(key),
                                            skip, word)]
    return [] if done == planned or where in skip else [f"{where}={done!r} ({word} {planned!r})"]


@dataclass
class AnchorConfig:
    """RPN anchors, one tuple of sizes per feature level (see ``anchors.py``)."""

    sizes: tuple[tuple[float, ...], ...] = ((32,), (64,), (128,), (256,), (512,))  # FPN §4.1: P2..P6
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # §3.1: "3 aspect ratios"
    offset: float = 0.5  # anchor centre at the cell centre (original Detectron too); torchvision / Detectron2: 0.0 (cell corner)
    round_cell: bool = False  # torchvision rounds cell anchors to whole pixels
    # "nominal": each level's own stride (4, 8, ..., 64). "torchvision": padded image size //
    # feature size, per axis, as torchvision's AnchorGenerator -- P6 of an 800-px image has
    # 13 rows and stride 800 // 13 = 61, not 64; its pretrained weights expect those anchors.
    stride_mode: str = "nominal"

    def __post_init__(self) -> None:
        if self.stride_mode not in ("nominal", "torchvision"):
            raise ValueError(f"AnchorConfig.stride_mode must be 'nominal' or 'torchvision', got {self.stride_mode!r}")


@dataclass
class TransformConfig:
    """Resizing and normalisation done inside the model (§3.1 "Implementation details")."""

    min_size_train: tuple[int, ...] = (800,)  # §3.1: shorter side 800; §5: (640, ..., 800) jitter
    max_size: int = 1333  # Detectron's cap on the longer side
    min_size_test: int = 800
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN  # images in [0, 1], RGB
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    size_divisible: int = 32  # every FPN stride up to P5 divides the padded size
    # "exact": x' = s * x for every coordinate (data/transforms.resize). "torchvision": the
    # image is resized to int(H * s) x int(W * s) and coordinates use the per-axis ratios of
    # the sizes, as torchvision's GeneralizedRCNNTransform (for its pretrained weights).
    resize_mode: str = "exact"
    # how m x m mask probabilities go back into the image: "exact" (bilinear, no rounding) or
    # "torchvision" (its padded, integer-rounded paste); see roi_heads.mask_head.paste_masks_in_image
    paste_mode: str = "exact"

    def __post_init__(self) -> None:
        if self.resize_mode not in ("exact", "torchvision"):
            raise ValueError(f"TransformConfig.resize_mode must be 'exact' or 'torchvision', got {self.resize_mode!r}")
        if self.paste_mode not in ("exact", "torchvision"):
            raise ValueError(f"TransformConfig.paste_mode must be 'exact' or 'torchvision', got {self.paste_mode!r}")


@dataclass
class MaskRCNNConfig:
    """The whole model. ``mask_head=None`` gives Faster R-CNN; ``keypoint_head`` adds §5's head."""

    num_classes: int = 80  # K foreground classes (COCO: 80); labels are 1..K, 0 is background
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=fpn_rpn_config)
    # Table 2c/2d: the one choice of RoI feature extractor that every head uses
    pooler: PoolerConfig = field(default_factory=PoolerConfig)
    box_head: BoxHeadConfig = field(default_factory=BoxHeadConfig)
    mask_head: MaskHeadConfig | None = field(default_factory=MaskHeadConfig)
    keypoint_head: KeypointHeadConfig | None = None
    transform: TransformConfig = field(default_factory=TransformConfig)

    def replace(self, **changes) -> "MaskRCNNConfig":
        """A copy with some fields changed (dataclasses.replace, for notebook cells)."""
        return dataclasses.replace(self, **changes)


# --- the paper's COCO models --------------------------------------------------------------------

def _c4(resnet, num_classes: int) -> MaskRCNNConfig:
    return MaskRCNNConfig(
        num_classes=num_classes,
        backbone=BackboneConfig(resnet=resnet, features="C4"),
        anchors=AnchorConfig(sizes=((32, 64, 128, 256, 512),)),  # §3.1: 5 scales on one map
        rpn=c4_rpn_config(),
        box_head=c4_box_head_config(),
        mask_head=MaskHeadConfig(head="res5_deconv", resolution=14),  # Figure 4 left: 14x14 masks
    )


def _fpn(resnet, num_classes: int) -> MaskRCNNConfig:
    return MaskRCNNConfig(num_classes=num_classes, backbone=BackboneConfig(resnet=resnet, features="FPN"))


def r50_c4(num_classes: int = 80) -> MaskRCNNConfig:
    return _c4(resnet50(), num_classes)


def r101_c4(num_classes: int = 80) -> MaskRCNNConfig:
    return _c4(resnet101(), num_classes)


def r50_c5(num_classes: int = 80) -> MaskRCNNConfig:
    """Table 2d: ResNet-50-C5, stride 32 ("features from a single large-stride map").

    §3.1 gives the RoIs sampled per image for C4 (64) and FPN (512), not for C5. Its heads here
    are FPN's (two fc layers, four mask convs: ``BoxHeadConfig()``, ``MaskHeadConfig()``), and so
    is its 512: our choice, not the paper's."""
    return MaskRCNNConfig(
        num_classes=num_classes,
        backbone=BackboneConfig(resnet=resnet50(), features="C5"),
        anchors=AnchorConfig(sizes=((32, 64, 128, 256, 512),)),
        rpn=c4_rpn_config(),
    )


def r50_fpn(num_classes: int = 80) -> MaskRCNNConfig:
    return _fpn(resnet50(), num_classes)


def r101_fpn(num_classes: int = 80) -> MaskRCNNConfig:
    return _fpn(resnet101(), num_classes)


def x101_fpn(num_classes: int = 80) -> MaskRCNNConfig:
    return _fpn(resnext101_32x8d(), num_classes)


def keypoint_r50_fpn(num_classes: int = 1) -> MaskRCNNConfig:
    """§5: person keypoints with R-50-FPN, train scale jitter [640, 800]; masks off by default."""
    cfg = _fpn(resnet50(), num_classes)
    cfg.mask_head = None
    cfg.keypoint_head = KeypointHeadConfig()
    cfg.transform = TransformConfig(min_size_train=(640, 672, 704, 736, 768, 800))
    return cfg


# --- miniature models: the same structures, narrow, trained from scratch on small images ------

def _mini_common(num_classes: int, image_size: int) -> dict:
    return dict(
        num_classes=num_classes,
        transform=TransformConfig(min_size_train=(image_size,), max_size=image_size * 2, min_size_test=image_size),
    )


def mini_fpn(num_classes: int = 8, image_size: int = 128, width: int = 16, keypoints: int = 0) -> MaskRCNNConfig:
    """R-mini-FPN: a 1-block-per-stage GroupNorm ResNet of width 16, FPN of 64 channels.

    Anchors are scaled down with the images (16..256 px on P2..P6 for 128 px images); heads
    keep their structure with fewer channels; fewer sampled RoIs per image (few objects).
    """
    cfg = MaskRCNNConfig(
        backbone=BackboneConfig(resnet=mini_resnet(width=width), features="FPN", fpn_channels=4 * width, fpn_norm="gn"),
        anchors=AnchorConfig(sizes=((16,), (32,), (64,), (128,), (256,))),
        rpn=fpn_rpn_config(pre_nms_top_n_train=1000, post_nms_top_n_train=500,
                           pre_nms_top_n_test=500, post_nms_top_n_test=300),
        box_head=BoxHeadConfig(batch_size_per_image=128, fc_dim=256),
        mask_head=MaskHeadConfig(conv_dims=(4 * width,) * 4, deconv_dim=4 * width),
        keypoint_head=KeypointHeadConfig(num_keypoints=keypoints, conv_dims=(4 * width,) * 4) if keypoints else None,
        **_mini_common(num_classes, image_size),
    )
    return cfg


def mini_c4(num_classes: int = 8, image_size: int = 128, width: int = 16) -> MaskRCNNConfig:
    """R-mini-C4: res4 features (stride 16), res5 as the RoI head, as ``r50_c4``."""
    return MaskRCNNConfig(
        backbone=BackboneConfig(resnet=mini_resnet(width=width), features="C4"),
        anchors=AnchorConfig(sizes=((16, 32, 64, 128, 256),)),
        rpn=c4_rpn_config(pre_nms_top_n_train=2000, post_nms_top_n_train=500,
                          pre_nms_top_n_test=1000, post_nms_top_n_test=300),
        box_head=c4_box_head_config(batch_size_per_image=64),
        mask_head=MaskHeadConfig(head="res5_deconv", resolution=14, deconv_dim=4 * width),
        **_mini_common(num_classes, image_size),
    )


def mini_c5(num_classes: int = 8, image_size: int = 128, width: int = 16) -> MaskRCNNConfig:
    """R-mini-C5: res5 features (stride 32), FPN-style heads on the single map, as ``r50_c5``."""
    return MaskRCNNConfig(
        backbone=BackboneConfig(resnet=mini_resnet(width=width), features="C5"),
        anchors=AnchorConfig(sizes=((16, 32, 64, 128, 256),)),
        rpn=c4_rpn_config(pre_nms_top_n_train=2000, post_nms_top_n_train=500,
                          pre_nms_top_n_test=1000, post_nms_top_n_test=300),
        box_head=BoxHeadConfig(batch_size_per_image=128, fc_dim=256),
        mask_head=MaskHeadConfig(conv_dims=(4 * width,) * 4, deconv_dim=4 * width),
        **_mini_common(num_classes, image_size),
    )


PRESETS = {
    "r50_c4": r50_c4, "r101_c4": r101_c4, "r50_c5": r50_c5, "r50_fpn": r50_fpn, "r101_fpn": r101_fpn,
    "x101_fpn": x101_fpn, "keypoint_r50_fpn": keypoint_r50_fpn,
    "mini_fpn": mini_fpn, "mini_c4": mini_c4, "mini_c5": mini_c5,
}


def get_preset(name: str, **kwargs) -> MaskRCNNConfig:
    """The preset called ``name`` (see the table above); ``kwargs`` go to its function."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**kwargs)
