"""Mask R-CNN: the parts assembled (He et al. 2017, §3, Figure 1 and Figure 4).

"Mask R-CNN adopts the same two-stage procedure [as Faster R-CNN], with an identical first
stage (which is RPN). In the second stage, in parallel to predicting the class and box offset,
Mask R-CNN also outputs a binary mask for each RoI." -- §3

The data's path, every step a module of its own::

    images (list of (3, H_i, W_i) in [0, 1])
      -> preprocess: normalise, resize shorter side, pad-batch to /32   (data/transforms.py)
      -> backbone: {"c4"} | {"c5"} | {"p2".."p6"}                        (backbone/)
      -> RPN: anchors -> objectness + deltas -> proposals               (rpn.py)
      -> box branch: pool -> head -> class + box                        (roi_heads/box_head.py)
      -> mask branch: pool -> FCN -> K x m x m                          (roi_heads/mask_head.py)
      -> keypoint branch (§5): pool -> 8 convs -> K x 56 x 56           (roi_heads/keypoint_head.py)

Train mode: ``model(images, targets) -> dict of losses`` (``loss_objectness``,
``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg``, ``loss_mask``, ``loss_keypoint``);
§3: "the multi-task loss on each sampled RoI is L = L_cls + L_box + L_mask".
Eval mode: ``model(images) -> list of dicts`` with ``boxes (N, 4)``, ``labels (N,)``,
``scores (N,)``, ``masks (N, 1, H, W)`` floats in [0, 1] and ``keypoints (N, Kp, 3)``, all in
the original image's pixels.

Compatibility with torchvision's pretrained detectors (``weights.py``) is three config
switches, all off by default: ``cfg.anchors.stride_mode``, ``cfg.transform.resize_mode`` and
``cfg.transform.paste_mode`` set to ``"torchvision"`` (plus ``aligned=False`` pooling).

The mask branch trains on the box branch's *positive* RoIs (§3.1: "The mask loss L_mask is
defined only on positive RoIs") and at test time runs on the final detections (§3.1: "the mask
branch is then applied to the highest scoring 100 detection boxes").
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mrcnn_edu.anchors import AnchorGenerator, TorchvisionStrideAnchorGenerator
from mrcnn_edu.backbone import build_backbone, make_res5_head
from mrcnn_edu.boxes import check_boxes, invalid_box_rows
from mrcnn_edu.config import MaskRCNNConfig
from mrcnn_edu.data.transforms import (batch_images, draw_min_sizes, normalize, resize_images,
                                      resize_images_like_torchvision, size_ratios)
from mrcnn_edu.device import host_to_device
from mrcnn_edu.roi_heads.box_head import BoxBranch, BoxPredictor, PositiveRoIs, Res5Head, TwoFCHead
from mrcnn_edu.roi_heads.keypoint_head import KeypointHead, heatmaps_to_keypoints, keypoint_loss, keypoint_targets
from mrcnn_edu.roi_heads.mask_head import (batch_mask_targets, build_mask_head, mask_loss, mask_probs,
                                          paste_masks_in_image)
from mrcnn_edu.roi_heads.pooler import RoIPooler
from mrcnn_edu.rpn import RPN, RPNHead

__all__ = ["MaskRCNN"]


class MaskRCNN(nn.Module):
    """Mask R-CNN (and Faster R-CNN with ``cfg.mask_head = None``) built from a config."""

    def __init__(self, cfg: MaskRCNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone)
        names = list(self.backbone.feature_names)
        strides = [self.backbone.strides[n] for n in names]
        channels = self.backbone.out_channels
        if len(cfg.anchors.sizes) != len(names):
            raise ValueError(f"cfg.anchors.sizes has {len(cfg.anchors.sizes)} levels but the "
                             f"{cfg.backbone.features} backbone gives {len(names)} ({names})")
        # FPN: the RPN sees P2..P6, the RoI heads pool from P2..P5 only (FPN §4.2)
        self.num_roi_levels = 4 if cfg.backbone.features == "FPN" else 1
        scales = [1.0 / s for s in strides[: self.num_roi_levels]]

        torchvision_strides = cfg.anchors.stride_mode == "torchvision"
        if torchvision_strides and cfg.transform.size_divisible % 32:
            # the generator rebuilds the padded size as finest map x its stride: exact only when
            # every stride up to 32 divides it, as in torchvision (its size_divisible is 32)
            raise ValueError(f"anchors.stride_mode='torchvision' needs transform.size_divisible to be a "
                             f"multiple of 32 (torchvision's own: 32), got {cfg.transform.size_divisible}")
        generator_class = TorchvisionStrideAnchorGenerator if torchvision_strides else AnchorGenerator
        anchor_generator = generator_class(cfg.anchors.sizes, [cfg.anchors.aspect_ratios] * len(names), strides,
                                           offset=cfg.anchors.offset, round_cell=cfg.anchors.round_cell)
        self.rpn = RPN(cfg.rpn, anchor_generator, RPNHead(channels, anchor_generator.num_anchors_per_cell[0]))

        box_cfg = cfg.box_head
        box_cfg.validate()  # again: its fields may have been edited since it was made
        res5 = None
        if box_cfg.head == "res5":  # Figure 4 left: res5 runs per RoI, 7×7 out (see BoxHeadConfig)
            res5 = make_res5_head(cfg.backbone.resnet, box_cfg.res5_first_stride)
            head, head_dim = Res5Head(res5), res5.out_channels
        else:
            head, head_dim = TwoFCHead(channels, box_cfg.pooler_resolution, box_cfg.fc_dim), box_cfg.fc_dim
        self.box_branch = BoxBranch(box_cfg, RoIPooler(cfg.pooler, box_cfg.pooler_resolution, scales), head,
                                    BoxPredictor(head_dim, cfg.num_classes + 1, box_cfg.class_specific))

        self.mask_pooler = self.mask_head = None
        if cfg.mask_head is not None:
            if cfg.mask_head.head == "res5_deconv":
                if res5 is None:
                    raise ValueError("mask_head.head='res5_deconv' needs box_head.head='res5' (they share res5)")
                self.mask_head = build_mask_head(res5.out_channels, cfg.num_classes, cfg.mask_head)
            else:
                self.mask_pooler = RoIPooler(cfg.pooler, cfg.mask_head.pooler_resolution, scales)
                self.mask_head = build_mask_head(channels, cfg.num_classes, cfg.mask_head)

        self.keypoint_pooler = self.keypoint_head = None
        if cfg.keypoint_head is not None:
            self.keypoint_pooler = RoIPooler(cfg.pooler, cfg.keypoint_head.pooler_resolution, scales)
            self.keypoint_head = KeypointHead(channels, cfg.keypoint_head)

    # --- the forward pass ----------------------------------------------------------------------

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if self.training and targets is None:
            raise ValueError("targets are required in training mode: model(images, targets)")
        _check_images(images, targets, self.cfg.num_classes, self.mask_head is not None,
                      None if self.keypoint_head is None else self.cfg.keypoint_head.num_keypoints,
                      training=self.training)
        original_sizes = [tuple(im.shape[-2:]) for im in images]
        batch, image_sizes, targets, scales = self.preprocess(images, targets)
        feature_maps = self.backbone(batch)
        features = [feature_maps[n] for n in self.backbone.feature_names]  # RPN levels
        roi_features = features[: self.num_roi_levels]  # pooled levels
        proposals, losses = self.rpn(features, image_sizes, targets if self.training else None)

        if self.training:
            box_losses, positives = self.box_branch(roi_features, proposals, image_sizes, targets)
            losses.update(box_losses)
            if self.mask_head is not None:
                losses["loss_mask"] = self.mask_loss(roi_features, positives, targets)
            if self.keypoint_head is not None:
                losses["loss_keypoint"] = self.keypoint_loss(roi_features, positives, targets)
            return losses

        detections = self.box_branch(roi_features, proposals, image_sizes)
        if self.mask_head is not None:
            self.predict_masks(roi_features, detections)
        if self.keypoint_head is not None:
            self.predict_keypoints(roi_features, detections)
        return self.postprocess(detections, scales, original_sizes, image_sizes)

    def preprocess(self, images: list[Tensor], targets: list[dict] | None):
        """Normalise, resize (one random train scale per image) and pad-batch.

        Returns ``(batch (B, 3, Hp, Wp), image_sizes [(h, w)] after resizing, targets resized,
        scales [s])``: a point ``x`` of the original image is at ``s * x`` in the batch.
        Images of the same size that drew the same scale are normalised and resized together,
        in one call each: the result is the same as image by image, with far fewer kernel launches.
        """
        t = self.cfg.transform
        if self.training:  # §5: scale jitter, one draw per image, on the host (no device read)
            # the training loader's targets carry a per-sample "seed": the draw then does not
            # depend on the process or batch the image is in (distributed.SeededSamples)
            seeds = [target.get("seed") for target in targets] if targets is not None else [None] * len(images)
            min_sizes = draw_min_sizes(t.min_size_train, seeds)
        else:
            min_sizes = [t.min_size_test] * len(images)
        groups: dict[tuple, list[int]] = {}  # (h, w, dtype, min_size) -> the images' indices
        for i, (image, min_size) in enumerate(zip(images, min_sizes)):
            if image.dim() != 3:
                raise ValueError(f"image {i} must be (3, H, W), got shape {tuple(image.shape)}")
            groups.setdefault((*image.shape[-2:], image.dtype, min_size), []).append(i)
        # made once per batch: on the device, not copied there once per image, queued without a sync
        mean = host_to_device(torch.tensor(t.pixel_mean, dtype=images[0].dtype), images[0].device)
        std = host_to_device(torch.tensor(t.pixel_std, dtype=images[0].dtype), images[0].device)
        resize_fn = resize_images_like_torchvision if t.resize_mode == "torchvision" else resize_images
        out_images, out_targets, scales = [None] * len(images), [None] * len(images), [0.0] * len(images)
        for (*_, min_size), members in groups.items():
            stack = torch.stack([images[i] for i in members]) if len(members) > 1 else images[members[0]][None]
            stack, resized, scale = resize_fn(normalize(stack, mean, std), None if targets is None else
                                              [targets[i] for i in members], min_size, t.max_size)
            for j, i in enumerate(members):
                out_images[i], scales[i] = stack[j], scale
                if resized is not None:
                    out_targets[i] = resized[j]
        batch, image_sizes = batch_images(out_images, t.size_divisible)
        return batch, image_sizes, (out_targets if targets is not None else None), scales

    # --- the mask branch ---------------------------------------------------------------------

    def _mask_logits(self, roi_features: list[Tensor], boxes: list[Tensor], res5_features: Tensor | None) -> Tensor:
        if self.mask_pooler is None:  # C4: the deconv sits on res5's output, shared with the box head
            return self.mask_head(res5_features)  # (R, C_out, 14, 14)
        return self.mask_head(self.mask_pooler(roi_features, boxes))  # (R, C_out, m, m)

    def mask_loss(self, roi_features: list[Tensor], positives: PositiveRoIs, targets: list[dict]) -> Tensor:
        """L_mask on the positive RoIs, against the ground-truth mask cropped to each RoI (§3)."""
        cfg = self.cfg.mask_head
        logits = self._mask_logits(roi_features, positives.rois, positives.res5_features)
        gt = batch_mask_targets([t["masks"] for t in targets], positives.matched_gt_idx, positives.rois,
                                cfg.resolution)  # (P, m, m)
        return mask_loss(logits, torch.cat(positives.labels), gt, cfg.loss, cfg.class_agnostic)

    def predict_masks(self, roi_features: list[Tensor], detections: list[dict]) -> None:
        """Adds ``"mask_probs": (N_i, m, m)`` to each image's detections (pasted later)."""
        cfg = self.cfg.mask_head
        boxes = [d["boxes"] for d in detections]
        res5 = self.box_branch.res5_features(roi_features, boxes) if self.mask_pooler is None else None
        logits = self._mask_logits(roi_features, boxes, res5)
        probs = mask_probs(logits, torch.cat([d["labels"] for d in detections]), cfg.loss, cfg.class_agnostic,
                           cfg.softmax_readout)
        for d, p in zip(detections, probs.split([len(b) for b in boxes])):
            d["mask_probs"] = p

    # --- the keypoint branch (§5) --------------------------------------------------------------

    def keypoint_loss(self, roi_features: list[Tensor], positives: PositiveRoIs, targets: list[dict]) -> Tensor:
        """§5: cross-entropy over an m²-way softmax per labelled keypoint (v > 0, as in
        torchvision and Detectron), on the positive RoIs.

        A RoI whose object has no labelled keypoint (other categories, unannotated people) has
        no valid target and adds nothing to the mean: the loss is torchvision's. It is still
        pooled: leaving it out would ask the host which RoIs remain (a GPU sync per image)."""
        m = self.cfg.keypoint_head.resolution
        keypoints = torch.cat([t["keypoints"][idx] for t, idx in zip(targets, positives.matched_gt_idx)])  # (P, Kp, 3)
        heatmap_idx, valid = keypoint_targets(keypoints, torch.cat(positives.rois), m)
        logits = self.keypoint_head(self.keypoint_pooler(roi_features, positives.rois))  # (P, Kp, m, m)
        return keypoint_loss(logits, heatmap_idx, valid)

    def predict_keypoints(self, roi_features: list[Tensor], detections: list[dict]) -> None:
        boxes = [d["boxes"] for d in detections]
        logits = self.keypoint_head(self.keypoint_pooler(roi_features, boxes))  # (N, Kp, 56, 56)
        # decoded in fp32 even when the head ran under bf16 autocast (see heatmaps_to_keypoints)
        keypoints = heatmaps_to_keypoints(logits, torch.cat(boxes))  # (N, Kp, 3) (x, y, score)
        for d, k in zip(detections, keypoints.split([len(b) for b in boxes])):
            d["keypoints"] = k

    # --- back to the original image ------------------------------------------------------------

    def postprocess(self, detections: list[dict], scales: list[float], original_sizes: list[tuple[int, int]],
                    image_sizes: list[tuple[int, int]] | None = None):
        """Undo the resize: boxes and keypoints divided by the scale, masks pasted at full size.

        With ``resize_mode="torchvision"`` coordinates are multiplied by the float32 ratios
        original / resized size per axis (``image_sizes``: the resized sizes) and boxes are not
        clamped, as torchvision's ``resize_boxes``.
        """
        t = self.cfg.transform
        results = []
        for i, (d, scale, (height, width)) in enumerate(zip(detections, scales, original_sizes)):
            if t.resize_mode == "torchvision":
                if image_sizes is None:
                    raise ValueError("postprocess with resize_mode='torchvision' needs image_sizes (the resized sizes)")
                ratio_y, ratio_x = size_ratios((height, width), image_sizes[i], d["boxes"].device)
            else:
                ratio_y = ratio_x = torch.full((), 1.0 / scale, dtype=d["boxes"].dtype, device=d["boxes"].device)
            boxes = d["boxes"] * torch.stack([ratio_x, ratio_y, ratio_x, ratio_y])
            if t.resize_mode != "torchvision":  # torchvision's resize_boxes does not clamp
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
            out = {"boxes": boxes, "labels": d["labels"], "scores": d["scores"]}
            if "mask_probs" in d:
                # pasting is resampling arithmetic, not learned: keep it in fp32 under autocast
                with torch.autocast(boxes.device.type, enabled=False):
                    out["masks"] = paste_masks_in_image(d["mask_probs"].float(), boxes.float(), (height, width),
                                                        mode=t.paste_mode)  # (N, 1, H, W)
            if "keypoints" in d:
                keypoints = d["keypoints"].clone()
                keypoints[..., 0] *= ratio_x
                keypoints[..., 1] *= ratio_y
                head = self.cfg.keypoint_head
                if head is not None and head.coordinate_offset:  # weights trained on raw COCO indices
                    keypoints[..., :2] += head.coordinate_offset
                out["keypoints"] = keypoints
            results.append(out)
        return results


def _check_images(images: list[Tensor], targets: list[dict] | None, num_classes: int,
                  with_masks: bool = False, num_keypoints: int | None = None, training: bool = False) -> None:
    """Shapes per image (no host read); box coordinates and labels 1..K for the whole batch in
    one host read -- a label out of range would otherwise be an index error deep in a loss, or a
    device-side assert that kills the process on a GPU. Per image only to name the culprit.
    ``training``: the heads' losses need every target's ``masks`` / ``keypoints``."""
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError("images must be a non-empty list of (3, H, W) float tensors in [0, 1]")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"images[{i}] must be a (3, H, W) float tensor in [0, 1], got {shape}")
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"images[{i}] is empty: shape {tuple(image.shape)}")
    if targets is None:
        return
    if len(targets) != len(images):
        raise ValueError(f"got {len(targets)} targets for {len(images)} images")
    for i, (t, image) in enumerate(zip(targets, images)):
        if "boxes" not in t or "labels" not in t:
            raise ValueError(f"targets[{i}] needs 'boxes' (G, 4) and 'labels' (G,); has {sorted(t)}")
        check_boxes(t["boxes"], f"targets[{i}]['boxes']", values=False)
        for key in ("boxes", "labels", "masks", "keypoints"):
            # else a device error deep in a head's targets (the RoI labels, the mask crops)
            if isinstance(t.get(key), Tensor) and t[key].device != image.device:
                raise ValueError(f"targets[{i}]['{key}'] is on {t[key].device}, images[{i}] on {image.device}: "
                                 "move the targets with the images (engine.to_device does both)")
        num_gt, (height, width) = t["boxes"].shape[0], image.shape[-2:]
        labels = t["labels"]
        if not isinstance(labels, Tensor) or labels.shape != (num_gt,) or labels.is_floating_point():
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"targets[{i}]['labels'] must be ({num_gt},) integer class ids for its {num_gt} "
                             f"boxes, got {shape}{'' if not isinstance(labels, Tensor) else ' ' + str(labels.dtype)}")
        if with_masks and "masks" in t and tuple(t["masks"].shape) != (num_gt, height, width):
            raise ValueError(f"targets[{i}]['masks'] must be (G, H, W) = {(num_gt, height, width)}, one per box "
                             f"at the image's size, got {tuple(t['masks'].shape)}")
        if num_keypoints is not None and "keypoints" in t \
                and tuple(t["keypoints"].shape) != (num_gt, num_keypoints, 3):
            raise ValueError(f"targets[{i}]['keypoints'] must be (G, Kp, 3) = {(num_gt, num_keypoints, 3)}, "
                             f"got {tuple(t['keypoints'].shape)}")
        for key, needed, hint in (("masks", with_masks, "with_masks=True"),
                                  ("keypoints", num_keypoints is not None, "with_keypoints=True")):
            if training and needed and key not in t:
                raise ValueError(f"targets[{i}] has no '{key}', which the model's {key[:-1]} head trains on "
                                 f"(a COCODataset gives them with {hint}); has {sorted(t)}")
    boxes, labels = torch.cat([t["boxes"] for t in targets]), torch.cat([t["labels"] for t in targets])
    if boxes.numel() == 0:
        return
    crowds = [torch.as_tensor(t["iscrowd"], device=boxes.device).reshape(-1) for t in targets if "iscrowd" in t]
    no_crowd = torch.zeros((), dtype=torch.bool, device=boxes.device)
    crowd = torch.cat(crowds).any() if crowds else no_crowd
    # a zero-area box has IoU 0 with everything: no anchor or RoI could learn it, and its own box,
    # added to the proposals, would train as background on the object (torchvision refuses it too)
    flags = torch.stack([invalid_box_rows(boxes, allow_empty_size=False).any(),
                         ((labels < 1) | (labels > num_classes)).any(), crowd])
    if not flags.any():  # the one host read (the box functions downstream skip it on a GPU)
        return
    for i, t in enumerate(targets):
        check_boxes(t["boxes"], f"targets[{i}]['boxes'] (image id {t.get('image_id', '?')})",
                    allow_empty_size=False, values=True)
        outside = (t["labels"] < 1) | (t["labels"] > num_classes)
        if outside.any():
            raise ValueError(f"targets[{i}]['labels'] holds {t['labels'][outside].tolist()}: class ids run "
                             f"1..{num_classes} (0 is the background, never a target)")
        if "iscrowd" in t and torch.as_tensor(t["iscrowd"]).any():
            # Detectron ignores anchors and proposals on a crowd; our matchers have no such label
            raise ValueError(f"targets[{i}] (image id {t.get('image_id', '?')}) holds crowd regions (iscrowd=1): "
                             "they would train as objects; load the data with drop_crowd=True "
                             "(COCODataset's default), which leaves them background")
