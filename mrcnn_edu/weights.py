"""Loading torchvision's Mask R-CNN and Keypoint R-CNN weights into our model.

The paper's models took 8 GPUs for one to two days each (§3.1, "Training takes 32 hours
in our synchronized 8-GPU implementation"); torchvision publishes COCO weights of the same
architecture -- ResNet-50-FPN Mask R-CNN (Table 1's R-50-FPN row) and the §5 keypoint model --
so a learner can run a real detector in our notebooks. Nothing here downloads anything: a user
who has the files loads them with ``torch.load`` and hands us the state dict::

    # once, with torchvision installed and internet access (torchvision's own download):
    #   from torchvision.models.detection import maskrcnn_resnet50_fpn, MaskRCNN_ResNet50_FPN_Weights
    #   torch.save(maskrcnn_resnet50_fpn(weights=MaskRCNN_ResNet50_FPN_Weights.COCO_V1).state_dict(), "mrcnn.pth")
    # Then, anywhere:
    state_dict = torch.load("mrcnn.pth", map_location="cpu", weights_only=True)
    model = load_torchvision_maskrcnn(state_dict)          # eval mode, 90 COCO classes
    detections = model([image])                            # image: (3, H, W) in [0, 1]

The .pth that ``MaskRCNN_ResNet50_FPN_Weights.COCO_V1.url`` names, fetched by hand, is what
torchvision's builder hands to ``model.load_state_dict`` (``weights.get_state_dict``). There its
modules' ``_load_from_state_dict`` rename the key names of older torchvision releases: mask head
``mask_fcn1..4`` (-> ``0.0 .. 3.0``), FPN ``inner_blocks.i`` and ``layer_blocks.i`` (-> ``.i.0``),
RPN ``head.conv`` (-> ``head.conv.0.0``). Our loaders rename them alike (``_torchvision_layout``
here, ``backbone/fpn.py``, ``rpn.py``), so that file can be handed to them too. This is tested on
a state dict written in the old layout, not on the downloaded file itself (no network here;
neither its actual key names nor how ``torch.load`` reads it were checked).

Labels are torchvision's: its COCO models use the 91 "category id" slots (labels 1..90, some
unused), not the 80 contiguous ones of our COCO loader. They are COCO's category ids already, so
``evaluation.evaluate_coco`` must be told to keep them:
``evaluate_coco(coco_gt, predictions, label_to_cat_id={cid: cid for cid in coco_gt.getCatIds()})``.
Its default reads labels 1..80 as the json's 80 sorted ids, which is our loader's numbering,
not torchvision's (a label above 80 is refused with this advice; below, it cannot be told).
``predict.evaluate_model(..., labels="category-ids")`` and ``python -m mrcnn_edu eval
--labels category-ids`` do the same (leaving out, with a count, detections of labels that are no
category of the json, as COCOeval ignores them).

What "configured as torchvision" means, each a config switch so the difference is visible:

==========================  ========================================================
torchvision                 our config
==========================  ========================================================
resize to int(H*s)×int(W*s) ``transform.resize_mode = "torchvision"`` (800 / 1333;
                            keypoints: train 640..800, test 800)
anchors on cell corners,    ``anchors.offset = 0``, ``round_cell = True``,
rounded, stride = image //  ``stride_mode = "torchvision"``; sizes 32..512 on P2..P6,
feature size                ratios 0.5, 1, 2
MultiScaleRoIAlign          ``pooler.aligned = False``, ``sampling_ratio = 2``
RPN 2000/2000 train,        ``fpn_rpn_config()`` defaults (NMS 0.7, min size 1e-3)
1000/1000 test
box head                    score 0.05, NMS 0.5, 100 detections, weights (10, 10, 5, 5),
                            smooth-L1 beta 1/9
mask paste                  ``transform.paste_mode = "torchvision"``
K+1 mask channels           channel 0 (background) dropped by the key map
keypoints learned on COCO's ``keypoint_head.coordinate_offset = 0.5``: x, y + 0.5 px,
raw pixel indices           so that ``evaluation.py``'s "- 0.5" gives torchvision's json
==========================  ========================================================

Head widths (mask / keypoint convs, the box head's fc size) and the number of classes and
keypoints are read from the state dict's shapes, so fine-tuned or narrowed torchvision models
load too. Training differences that do not touch loaded weights: our mask targets are binarised
``aligned=True`` crops (torchvision keeps soft ``aligned=False`` ones) and our keypoint targets
are computed as in ``roi_heads/keypoint_head.py``.

One known numerical difference remains (see the issue report): torchvision's FPN level
mapper adds its ``eps = 1e-6`` outside the logarithm, ours (``roi_heads/pooler.fpn_level``)
inside; a box whose ``log2(sqrt(area) / 224)`` lies within a few 1e-6 below an integer can be
pooled from a different level.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import asdict

import torch
from torch import Tensor

from mrcnn_edu.backbone import BackboneConfig, resnet50, torchvision_fpn_key_map
from mrcnn_edu.config import AnchorConfig, MaskRCNNConfig, TransformConfig
from mrcnn_edu.data.coco import COCO_KEYPOINT_OFFSET
from mrcnn_edu.engine import TRAINING_ONLY
from mrcnn_edu.model import MaskRCNN
from mrcnn_edu.recipes import flatten_overrides, parse_override
from mrcnn_edu.roi_heads.box_head import BoxHeadConfig
from mrcnn_edu.roi_heads.keypoint_head import (KeypointHeadConfig, keypoint_head_state_from_torchvision,
                                               torchvision_keypoint_key_map)
from mrcnn_edu.roi_heads.mask_head import (MaskHeadConfig, fcn_mask_head_state_from_torchvision,
                                           torchvision_mask_key_map)
from mrcnn_edu.roi_heads.pooler import PoolerConfig
from mrcnn_edu.rpn import fpn_rpn_config, rpn_state_dict_from_torchvision

__all__ = [
    "torchvision_maskrcnn_config", "torchvision_keypointrcnn_config", "torchvision_config_of",
    "torchvision_overrides", "torchvision_state_dict_to_ours",
    "load_torchvision_maskrcnn", "load_torchvision_keypointrcnn",
]

# torchvision's COCO_V1 Mask / Keypoint R-CNN weights came from Detectron, whose frozen BN was an
# AffineChannel op without eps: torchvision sets eps 0 on loading them (overwrite_eps), and so do we
COCO_V1_BN_EPS = 0.0
# torchvision reads COCO keypoints as positions as they are, we as pixel centres (data/coco.py):
# its models' points sit this much up-left of ours. Only for its weights as they are: a model
# trained further here learns pixel centres, so set keypoint_head.coordinate_offset = 0 for it
TORCHVISION_KEYPOINT_OFFSET = COCO_KEYPOINT_OFFSET

_CLS_SCORE = "roi_heads.box_predictor.cls_score.weight"
_FC6 = "roi_heads.box_head.fc6.weight"
_MASK_CONV = re.compile(r"^roi_heads\.mask_head\.(\d+)\.0\.weight$")
# older torchvision named the mask head's convs mask_fcn1..4 (its MaskRCNNHeads._load_from_state_dict
# still renames them)
_LEGACY_MASK_CONV = re.compile(r"^roi_heads\.mask_head\.mask_fcn([1-9]\d*)\.(weight|bias)$")
_KEYPOINT_CONV = re.compile(r"^roi_heads\.keypoint_head\.(\d+)\.weight$")


def _torchvision_common(num_classes: int, fc_dim: int, min_size_train: tuple[int, ...],
                        bn_eps: float) -> MaskRCNNConfig:
    """The parts torchvision's maskrcnn_ and keypointrcnn_resnet50_fpn share."""
    return MaskRCNNConfig(
        num_classes=num_classes,
        # ResNet-50 v1.5 with frozen BN, stem + res2 frozen (torchvision: 3 trainable layers)
        backbone=BackboneConfig(resnet=resnet50(bn_eps=bn_eps), features="FPN"),
        anchors=AnchorConfig(offset=0.0, round_cell=True, stride_mode="torchvision"),
        rpn=fpn_rpn_config(),  # torchvision's rpn_* defaults are the FPN ones
        pooler=PoolerConfig(kind="roi_align", mode="avg", sampling_ratio=2, aligned=False),
        box_head=BoxHeadConfig(fc_dim=fc_dim, smooth_l1_beta=1.0 / 9.0),
        mask_head=None,
        transform=TransformConfig(min_size_train=min_size_train, max_size=1333, min_size_test=800,
                                  resize_mode="torchvision", paste_mode="torchvision"),
    )


def torchvision_maskrcnn_config(num_classes: int = 90, mask_conv_dims: tuple[int, ...] = (256,) * 4,
                                 mask_deconv_dim: int = 256, fc_dim: int = 1024,
                                 bn_eps: float = 1e-5) -> MaskRCNNConfig:
    """Our config for torchvision's ``maskrcnn_resnet50_fpn`` (COCO: 90 = 91 - background).

    ``bn_eps``: 1e-5 (torchvision's FrozenBatchNorm2d default, and its ImageNet weights'); 0 as
    torchvision runs its COCO_V1 weights (``COCO_V1_BN_EPS``, what the loaders below use)."""
    cfg = _torchvision_common(num_classes, fc_dim, min_size_train=(800,), bn_eps=bn_eps)
    cfg.mask_head = MaskHeadConfig(head="fcn", loss="sigmoid", resolution=28, pooler_resolution=14,
                                   conv_dims=tuple(mask_conv_dims), deconv_dim=mask_deconv_dim)
    return cfg


def torchvision_keypointrcnn_config(num_keypoints: int = 17, keypoint_conv_dims: tuple[int, ...] = (512,) * 8,
                                    fc_dim: int = 1024, num_classes: int = 1,
                                    bn_eps: float = 1e-5) -> MaskRCNNConfig:
    """Our config for torchvision's ``keypointrcnn_resnet50_fpn``: person only, no masks (§5).
    ``bn_eps`` as in :func:`torchvision_maskrcnn_config`."""
    cfg = _torchvision_common(num_classes, fc_dim, min_size_train=(640, 672, 704, 736, 768, 800), bn_eps=bn_eps)
    # torchvision trains on COCO's raw keypoint indices, we on pixel centres (index + 0.5)
    cfg.keypoint_head = KeypointHeadConfig(num_keypoints=num_keypoints, conv_dims=tuple(keypoint_conv_dims),
                                           coordinate_offset=TORCHVISION_KEYPOINT_OFFSET)
    return cfg


def torchvision_overrides(cfg: MaskRCNNConfig, state_dict: dict[str, Tensor]) -> list[str]:
    """``["model.anchors.offset=0.0", ...]``: the overrides (``key=value`` as the command line
    takes them) that give ``cfg`` every setting torchvision runs ``state_dict`` with
    (:func:`torchvision_config_of`, frozen-BN eps 0 as for its COCO_V1 files), except those only
    training reads. Empty when ``cfg`` runs the weights as torchvision does. A head that ``cfg``
    or the file lacks is not listed: loading names its keys."""
    expected, now = flatten_overrides(asdict(torchvision_config_of(state_dict))), flatten_overrides(asdict(cfg))
    return [f"model.{key}={_as_typed(value)}" for key, value in expected.items()
            # only training reads engine.TRAINING_ONLY: evaluating or drawing needs no match there
            if key in now and now[key] != value and key not in TRAINING_ONLY and _settable(cfg, key)]


def _as_typed(value) -> str:
    """``value`` as an override the command line reads back as it is: a word as itself
    (``torchvision``), a word it would read otherwise (``none``: None) quoted, anything else
    as Python writes it, without spaces (one shell word)."""
    if isinstance(value, str) and parse_override(f"key={value}")[1] == value:
        return value
    return repr(value).replace(" ", "")


def _settable(cfg, key: str) -> bool:
    """Whether ``key`` ("backbone.resnet.depth") is a field the command line may set: not one
    derived from others (``init=False``, e.g. ``ResNetConfig.blocks``), which it refuses."""
    *parents, name = key.split(".")
    for parent in parents:
        cfg = getattr(cfg, parent)
    return any(f.name == name and f.init for f in dataclasses.fields(cfg))


def _strip_module_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from DistributedDataParallel
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _torchvision_layout(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` without DDP's ``module.`` prefix, its mask head convs renamed from older
    torchvision's ``roi_heads.mask_head.mask_fcn{i+1}.*`` to ``{i}.0.*``, as torchvision's
    own ``MaskRCNNHeads._load_from_state_dict`` renames them. (The FPN's and the RPN conv's old
    names are read by ``torchvision_fpn_key_map`` and ``rpn_state_dict_from_torchvision``.)"""
    def renamed(key: str) -> str:
        old = _LEGACY_MASK_CONV.match(key)
        return f"roi_heads.mask_head.{int(old.group(1)) - 1}.0.{old.group(2)}" if old else key
    return {renamed(key): value for key, value in _strip_module_prefix(state_dict).items()}


def _require(state_dict: dict[str, Tensor], key: str, what: str) -> Tensor:
    if key not in state_dict:
        raise ValueError(f"state_dict has no key {key!r}: not a torchvision {what} state dict "
                         f"(it has {len(state_dict)} keys, e.g. {sorted(state_dict)[:3]})")
    return state_dict[key]


def _infer_num_classes(state_dict: dict[str, Tensor], num_classes: int | None, what: str) -> int:
    inferred = _require(state_dict, _CLS_SCORE, what).shape[0] - 1  # cls_score has K + 1 rows
    if num_classes is not None and num_classes != inferred:
        raise ValueError(f"num_classes={num_classes}, but the state dict's {_CLS_SCORE} has "
                         f"{inferred + 1} rows = {inferred} classes + background")
    return inferred


def _indexed_widths(state_dict: dict[str, Tensor], pattern: re.Pattern) -> list[int]:
    """Output channels of the convs whose keys match ``pattern``, in index order."""
    found = sorted((int(m.group(1)), v.shape[0]) for k, v in state_dict.items() if (m := pattern.match(k)))
    return [width for _, width in found]


def torchvision_state_dict_to_ours(state_dict: dict[str, Tensor],
                                   model: MaskRCNN) -> tuple[dict[str, Tensor], list[str]]:
    """Rename a torchvision Mask / Keypoint R-CNN state dict to ``model``'s keys.

    Returns ``(ours, unused)``: the renamed tensors, and the torchvision keys that went nowhere
    (BatchNorm's ``num_batches_tracked`` counters are dropped silently, they mean nothing frozen).
    Keys in older torchvision's layout are read too (:func:`_torchvision_layout`); ``unused``
    names them as they are after that renaming.
    """
    state_dict = _torchvision_layout(state_dict)
    ours: dict[str, Tensor] = {}
    used: set[str] = set()

    fpn_keys = torchvision_fpn_key_map(state_dict.keys(), prefix="backbone.")  # theirs -> ours
    for theirs, mine in fpn_keys.items():
        if not theirs.endswith("num_batches_tracked"):
            ours["backbone." + mine] = state_dict[theirs]
    used.update(fpn_keys)

    for mine, tensor in rpn_state_dict_from_torchvision(state_dict, prefix="rpn.").items():
        ours["rpn." + mine] = tensor
    used.update(k for k in state_dict if k.startswith("rpn.head."))

    box_renames = {"roi_heads.box_head.": "box_branch.head.", "roi_heads.box_predictor.": "box_branch.predictor."}
    for key, tensor in state_dict.items():
        for theirs, mine in box_renames.items():
            if key.startswith(theirs):
                ours[mine + key[len(theirs):]] = tensor
                used.add(key)

    # a head the file lacks (a Faster R-CNN file for a Mask R-CNN) stays unfilled: the caller's
    # check of missing keys names it
    has = {head: any(k.startswith(f"roi_heads.{head}.") for k in state_dict) for head in ("mask_head", "keypoint_head")}
    if model.mask_head is not None and has["mask_head"]:
        num_convs = len(model.cfg.mask_head.conv_dims)
        for mine, tensor in fcn_mask_head_state_from_torchvision(state_dict, num_convs).items():
            ours["mask_head." + mine] = tensor  # predictor rows 1..K: channel 0 (background) dropped
        # only the keys the key map read: a cfg with fewer convs than the file leaves the rest unused
        used.update(torchvision_mask_key_map(num_convs, prefix="roi_heads.").values())
    if model.keypoint_head is not None and has["keypoint_head"]:
        num_convs = len(model.cfg.keypoint_head.conv_dims)
        for mine, tensor in keypoint_head_state_from_torchvision(state_dict, num_convs).items():
            ours["keypoint_head." + mine] = tensor
        used.update(torchvision_keypoint_key_map(num_convs, prefix="roi_heads.").values())

    unused = [k for k in state_dict if k not in used and not k.endswith("num_batches_tracked")]
    return ours, unused


def _load(model: MaskRCNN, state_dict: dict[str, Tensor], what: str) -> MaskRCNN:
    ours, unused = torchvision_state_dict_to_ours(state_dict, model)
    own = model.state_dict()
    missing = [k for k in own if k not in ours]
    unexpected = unused + [k for k in ours if k not in own]
    mismatched = [f"{k}: torchvision {tuple(v.shape)} vs ours {tuple(own[k].shape)}"
                  for k, v in ours.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or mismatched:
        def listing(keys):
            return ", ".join(keys[:12]) + (f", ... ({len(keys) - 12} more)" if len(keys) > 12 else "")
        raise ValueError(f"the state dict does not fit a torchvision {what}: "
                         f"missing (ours, not filled) [{listing(missing)}]; "
                         f"unexpected (theirs, not used) [{listing(unexpected)}]; "
                         f"shape mismatch [{listing(mismatched)}]")
    model.load_state_dict(ours, strict=True)
    return model.eval()


def _fc_dim(state_dict: dict[str, Tensor], what: str) -> int:
    return _require(state_dict, _FC6, what).shape[0]


def load_torchvision_maskrcnn(state_dict: dict[str, Tensor], num_classes: int | None = None,
                              cfg: MaskRCNNConfig | None = None, bn_eps: float | None = None) -> MaskRCNN:
    """Our :class:`MaskRCNN` configured as torchvision's ``maskrcnn_resnet50_fpn``, with its weights.

    ``state_dict``: ``torchvision.models.detection.maskrcnn_resnet50_fpn(...).state_dict()`` or
    the saved COCO file (see the module docstring; nothing is downloaded here). ``num_classes``
    (foreground, K) is read from ``roi_heads.box_predictor.cls_score`` and only checked if given.
    ``cfg``: a config to use instead of :func:`torchvision_maskrcnn_config` with the widths read
    from the state dict (e.g. that config with a smaller ``transform.min_size_test``).
    ``bn_eps``: the frozen BN's eps; by default 0 (``COCO_V1_BN_EPS``) for the COCO_V1 file as
    torchvision runs it, else ``cfg``'s; 1e-5 for a model torchvision built without those weights
    (``weights=None``). Given with a ``cfg`` of another eps, it is an error.
    Returns the model in eval mode; raises ValueError listing missing / unexpected keys.
    """
    what = "maskrcnn_resnet50_fpn"
    state_dict = _torchvision_layout(state_dict)
    num_classes = _infer_num_classes(state_dict, num_classes, what)
    if cfg is None:
        cfg = _maskrcnn_config_of(state_dict, COCO_V1_BN_EPS if bn_eps is None else bn_eps)
    elif bn_eps is not None and bn_eps != cfg.backbone.resnet.bn_eps:
        raise ValueError(f"bn_eps={bn_eps} but cfg.backbone.resnet.bn_eps={cfg.backbone.resnet.bn_eps}: give one")
    elif cfg.num_classes != num_classes or cfg.mask_head is None:
        raise ValueError(f"cfg must have a mask head and num_classes={num_classes} (the state dict's), "
                         f"got num_classes={cfg.num_classes}, mask_head={cfg.mask_head}")
    return _load(MaskRCNN(cfg), state_dict, what)


def _maskrcnn_config_of(state_dict: dict[str, Tensor], bn_eps: float) -> MaskRCNNConfig:
    """:func:`torchvision_maskrcnn_config` with the classes and widths of ``state_dict`` (renamed by
    :func:`_torchvision_layout`)."""
    what = "maskrcnn_resnet50_fpn"
    conv_dims = _indexed_widths(state_dict, _MASK_CONV)
    if not conv_dims:
        raise ValueError("state_dict has no 'roi_heads.mask_head.<i>.0.weight' (or older torchvision's "
                         "'mask_fcn<i>') keys: not a torchvision Mask R-CNN state dict")
    deconv = _require(state_dict, "roi_heads.mask_predictor.conv5_mask.weight", what)  # (C_in, C_out, 2, 2)
    return torchvision_maskrcnn_config(_infer_num_classes(state_dict, None, what), tuple(conv_dims), deconv.shape[1],
                                       _fc_dim(state_dict, what), bn_eps=bn_eps)


def _keypointrcnn_config_of(state_dict: dict[str, Tensor], bn_eps: float) -> MaskRCNNConfig:
    """:func:`torchvision_keypointrcnn_config` with the classes, keypoints and widths of ``state_dict``."""
    what = "keypointrcnn_resnet50_fpn"
    conv_dims = _indexed_widths(state_dict, _KEYPOINT_CONV)
    if not conv_dims:
        raise ValueError("state_dict has no 'roi_heads.keypoint_head.<i>.weight' keys: not a torchvision "
                         "Keypoint R-CNN state dict")
    deconv = _require(state_dict, "roi_heads.keypoint_predictor.kps_score_lowres.weight", what)  # (C, K, 4, 4)
    return torchvision_keypointrcnn_config(deconv.shape[1], tuple(conv_dims), _fc_dim(state_dict, what),
                                           _infer_num_classes(state_dict, None, what), bn_eps=bn_eps)


def torchvision_config_of(state_dict: dict[str, Tensor], bn_eps: float = COCO_V1_BN_EPS) -> MaskRCNNConfig:
    """The config torchvision runs a Mask / Keypoint R-CNN ``state_dict`` with, as the loaders
    build it: :func:`torchvision_keypointrcnn_config` if it has a keypoint predictor, else
    :func:`torchvision_maskrcnn_config` if a mask predictor, else (Faster R-CNN) their shared
    part; classes, keypoints and head widths read from its shapes. ``bn_eps``: 0 as torchvision
    runs its COCO_V1 files; the file cannot tell (1e-5 for a model built with ``weights=None``)."""
    state_dict = _torchvision_layout(state_dict)
    if any(key.startswith("roi_heads.keypoint_predictor.") for key in state_dict):
        return _keypointrcnn_config_of(state_dict, bn_eps)
    if any(key.startswith("roi_heads.mask_predictor.") for key in state_dict):
        return _maskrcnn_config_of(state_dict, bn_eps)
    what = "fasterrcnn_resnet50_fpn"
    return _torchvision_common(_infer_num_classes(state_dict, None, what), _fc_dim(state_dict, what),
                               min_size_train=(800,), bn_eps=bn_eps)


def load_torchvision_keypointrcnn(state_dict: dict[str, Tensor], cfg: MaskRCNNConfig | None = None,
                                  bn_eps: float | None = None) -> MaskRCNN:
    """Our :class:`MaskRCNN` configured as torchvision's ``keypointrcnn_resnet50_fpn``, with its weights.

    Person detection (1 class) plus §5's keypoint head; the number of keypoints (17 on COCO) and
    the head's widths are read from the state dict. ``cfg`` and ``bn_eps`` as in
    :func:`load_torchvision_maskrcnn`.
    Eval mode; ``keypoints`` come out as ``(N, K, 3)`` rows ``(x, y, score)``. torchvision
    returns ``x, y`` half a pixel less (``TORCHVISION_KEYPOINT_OFFSET``), with a 1 in the third
    column and the score in ``keypoints_scores``: its model learned COCO's raw pixel indices as
    positions, ours pixel centres (index + 0.5, ``data/coco.py``), and our evaluation subtracts
    that 0.5 when it writes COCO results. The config's ``keypoint_head.coordinate_offset`` adds
    it back, so these weights score on COCO what torchvision's own evaluation gives them.
    """
    what = "keypointrcnn_resnet50_fpn"
    state_dict = _torchvision_layout(state_dict)
    num_classes = _infer_num_classes(state_dict, None, what)
    if cfg is None:
        cfg = _keypointrcnn_config_of(state_dict, COCO_V1_BN_EPS if bn_eps is None else bn_eps)
    elif bn_eps is not None and bn_eps != cfg.backbone.resnet.bn_eps:
        raise ValueError(f"bn_eps={bn_eps} but cfg.backbone.resnet.bn_eps={cfg.backbone.resnet.bn_eps}: give one")
    elif cfg.num_classes != num_classes or cfg.keypoint_head is None:
        raise ValueError(f"cfg must have a keypoint head and num_classes={num_classes} (the state dict's), "
                         f"got num_classes={cfg.num_classes}, keypoint_head={cfg.keypoint_head}")
    elif cfg.keypoint_head.coordinate_offset != TORCHVISION_KEYPOINT_OFFSET:
        # right for fine-tuning on pixel centres; for using the weights as they are, half a pixel off
        warnings.warn(f"cfg.keypoint_head.coordinate_offset is {cfg.keypoint_head.coordinate_offset}, not "
                      f"{TORCHVISION_KEYPOINT_OFFSET}: these weights place keypoints at COCO's raw pixel indices, so "
                      f"as they are their keypoints come out "
                      f"{TORCHVISION_KEYPOINT_OFFSET - cfg.keypoint_head.coordinate_offset:g} px up and left of "
                      f"what torchvision's evaluation gives them (torchvision_keypointrcnn_config sets it)",
                      stacklevel=2)
    return _load(MaskRCNN(cfg), state_dict, what)
