"""torchvision's Mask R-CNN / Keypoint R-CNN weights in our model give torchvision's detections.

The oracle is torchvision itself (skipped where it does not import): build its
``maskrcnn_resnet50_fpn`` / ``keypointrcnn_resnet50_fpn`` under a fixed seed, train it briefly
on the synthetic shapes (random weights give near-tied scores, and then which of two tied
detections survives NMS is a coin toss), load its state dict with ``mrcnn_edu.weights`` and
run both in eval mode on the same images. Compared, stage by stage: the resized and padded
batch, the backbone features P2-P6, the RPN proposals, and the final detections -- matched one
to one, boxes within 1e-4 px (1e-3 on CUDA), scores within 1e-4, pasted masks with IoU > 0.99,
keypoints within 1e-3 px (3e-3 on CUDA; bar rare whole-cell argmax flips of near-tied heatmap maxima).

To fit a 2-core CPU both models are configured identically but smaller than COCO's: the 64-px
images resized to 80 px (``min_size=80``; padded to 96, so P5 is 3 x 3, P6 2 x 2 and
torchvision's P6 anchor stride 96 // 2 = 48, not 64 -- though P6's 512-px anchors clip to the
whole image either way; the stride rule is checked exactly below), narrower heads (the box
head's fc 256-d, mask / keypoint convs 64 channels, swapped in the way torchvision's
fine-tuning tutorial swaps predictors; our loader reads the widths from the state dict), fewer
proposals and detections. The ResNet body is not trained: its BatchNorm statistics are
calibrated on the training images and then frozen into torchvision's own ``FrozenBatchNorm2d``,
the layer its COCO-pretrained detectors use (with ``weights=None`` it builds plain BatchNorm,
whose eval-mode output is the same affine map computed in a different order). The RPN and all
RoI heads train for 30 iterations with torchvision's own losses, on the frozen backbone's (body
+ FPN) cached features; the mask logits are then centred so that the binarised masks are not
empty (see ``_centre_mask_logits``).

The GPU variants run the full-size COCO defaults (800 px, 1000 proposals, 100 detections, full
heads) on CUDA. Cheap tests at the end check each compatibility switch (torchvision's anchor
strides, resize, postprocess and mask paste) alone on non-square images.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from mrcnn_edu.data.coco import COCODataset
from mrcnn_edu.data.shapes import generate
from mrcnn_edu.weights import (load_torchvision_keypointrcnn, load_torchvision_maskrcnn,
                               torchvision_keypointrcnn_config, torchvision_maskrcnn_config)

torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection import keypointrcnn_resnet50_fpn, maskrcnn_resnet50_fpn  # noqa: E402
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead  # noqa: E402
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor  # noqa: E402
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBN  # noqa: E402

TRAIN_ITERATIONS = 30
FC_DIM = 256  # the box head's fc width (COCO: 1024)
TV_EPS = 1e-5  # the frozen BN eps of a torchvision model built without its COCO_V1 weights
SMALL = dict(min_size=80, max_size=160, rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=200,
             box_detections_per_img=20)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two OpenMP threads spin-waiting on each
    other made these small convolutions ~5x slower. Both models run under the same setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- data ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    paths = generate(str(root), preset="tiny", seed=0)
    return root, paths


def _mask_data(shapes):
    root, paths = shapes
    dataset = COCODataset(str(root / "train"), paths["train"])
    samples = [dataset[i] for i in range(len(dataset))]
    return [image for image, _ in samples], [{k: t[k] for k in ("boxes", "labels", "masks")} for _, t in samples]


def _person_data(shapes):
    """Images with a labelled person; targets keep the persons only, as label 1."""
    root, paths = shapes
    images, targets = [], []
    for split in ("train", "val"):
        dataset = COCODataset(str(root / split), paths[split], with_keypoints=True)
        person = dataset.class_names.index("person")
        for image, target in (dataset[i] for i in range(len(dataset))):
            keep = target["labels"] == person
            images.append(image)
            targets.append({"boxes": target["boxes"][keep], "labels": torch.ones(int(keep.sum()), dtype=torch.int64),
                            "keypoints": target["keypoints"][keep]})
    return images, targets


# --- torchvision side ----------------------------------------------------------------------------

def _freeze_backbone(model, images) -> None:
    """Calibrate the body's BatchNorm statistics on ``images`` (cumulative average), freeze them
    into torchvision's FrozenBatchNorm2d, and stop the whole backbone's (body + FPN) gradients."""
    body = model.backbone.body
    for module in body.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batch
    body.train()
    with torch.no_grad():
        body(model.transform(images)[0].tensors)

    def replace(parent):
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.BatchNorm2d):
                frozen = TorchvisionFrozenBN(child.num_features, eps=child.eps).to(child.weight.device)
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(child, key).detach())
                setattr(parent, name, frozen)
            else:
                replace(child)
    replace(body)
    model.backbone.requires_grad_(False)


def _train(model, images, targets, iterations: int = TRAIN_ITERATIONS, batch: int = 2) -> None:
    """SGD on torchvision's RPN and RoI heads, with its own losses: GeneralizedRCNN.forward's
    steps, with the frozen backbone's features computed once per mini-batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()
    cache = {}
    for it in range(iterations):
        chosen = tuple((it * batch + j) % len(images) for j in range(batch))
        if chosen not in cache:
            with torch.no_grad():
                image_list, batch_targets = model.transform([images[i] for i in chosen], [targets[i] for i in chosen])
                cache[chosen] = image_list, batch_targets, model.backbone(image_list.tensors)
        image_list, batch_targets, features = cache[chosen]
        proposals, rpn_losses = model.rpn(image_list, features, batch_targets)
        _, head_losses = model.roi_heads(features, proposals, image_list.image_sizes, batch_targets)
        losses = {**rpn_losses, **head_losses}
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise AssertionError(f"torchvision training diverged at iteration {it}: {losses}")
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
    model.eval()


def _torchvision_maskrcnn(images, targets, num_classes: int, small: bool, device):
    torch.manual_seed(0)
    kwargs = SMALL if small else {}
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes + 1,
                                  box_batch_size_per_image=32 if small else 512, **kwargs)
    if small:  # narrower heads, swapped in as torchvision's fine-tuning tutorial does
        model.roi_heads.box_head = TwoMLPHead(256 * 7 * 7, FC_DIM)
        model.roi_heads.box_predictor = FastRCNNPredictor(FC_DIM, num_classes + 1)
        model.roi_heads.mask_head = MaskRCNNHeads(256, [64] * 4, 1)
        model.roi_heads.mask_predictor = MaskRCNNPredictor(64, 64, num_classes + 1)
    model.to(device)
    _freeze_backbone(model, images)
    _train(model, images, targets)
    _centre_mask_logits(model, images[:4])
    return model


@torch.no_grad()
def _centre_mask_logits(model, images) -> None:
    """Shift the mask predictor's bias by the median mask logit of ``images``' detections.

    After a few dozen iterations the mask head has learned little more than "mostly
    background", and nearly every mask binarises to a handful of pixels -- an IoU check on
    empty masks proves nothing. Centring the logits puts about half of each m x m mask above
    0.5, so the pasted masks compared below have real shapes and boundaries.
    """
    logits = []
    hook = model.roi_heads.mask_predictor.register_forward_hook(lambda module, args, out: logits.append(out))
    model(images)
    hook.remove()
    model.roi_heads.mask_predictor.mask_fcn_logits.bias -= torch.cat(logits).median()


def _torchvision_keypointrcnn(images, targets, small: bool, device):
    torch.manual_seed(0)
    kwargs = dict(SMALL, min_size=(SMALL["min_size"],)) if small else {}
    model = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                      box_batch_size_per_image=32 if small else 512, **kwargs)
    if small:
        model.roi_heads.box_head = TwoMLPHead(256 * 7 * 7, FC_DIM)
        model.roi_heads.box_predictor = FastRCNNPredictor(FC_DIM, 2)
        model.roi_heads.keypoint_head = KeypointRCNNHeads(256, [64] * 8)
        model.roi_heads.keypoint_predictor = KeypointRCNNPredictor(64, 17)
    model.to(device)
    _freeze_backbone(model, images)
    _train(model, images, targets)
    return model


def _small_config(cfg):
    """Our side of ``SMALL``: the same sizes and counts."""
    cfg.transform.min_size_train = (SMALL["min_size"],)
    cfg.transform.min_size_test, cfg.transform.max_size = SMALL["min_size"], SMALL["max_size"]
    cfg.rpn.pre_nms_top_n_test = SMALL["rpn_pre_nms_top_n_test"]
    cfg.rpn.post_nms_top_n_test = SMALL["rpn_post_nms_top_n_test"]
    cfg.box_head.detections_per_img = SMALL["box_detections_per_img"]
    return cfg


# --- comparisons ---------------------------------------------------------------------------------

@torch.no_grad()
def _stages(ours, theirs, images):
    """(batch, features, proposals) of both models on ``images``, and their detections."""
    image_list, _ = theirs.transform(images)
    their_features = theirs.backbone(image_list.tensors)
    their_proposals, _ = theirs.rpn(image_list, their_features)
    batch, image_sizes, _, _ = ours.preprocess(images, None)
    our_features = ours.backbone(batch)
    our_proposals, _ = ours.rpn([our_features[n] for n in ours.backbone.feature_names], image_sizes)
    assert image_sizes == image_list.image_sizes
    torch.testing.assert_close(batch, image_list.tensors, rtol=0, atol=1e-6)
    for ours_name, their_name in zip(("p2", "p3", "p4", "p5", "p6"), ("0", "1", "2", "3", "pool")):
        torch.testing.assert_close(our_features[ours_name], their_features[their_name], rtol=1e-4, atol=1e-4)
    for mine, their in zip(our_proposals, their_proposals):
        assert mine.shape == their.shape
        # one to one by position: equal objectness may come out in either order
        _pair_boxes(mine, their)
    return ours(images), theirs(images)


def _box_tolerance(device: torch.device) -> float:
    """px. On the CPU both models' boxes came out bit-identical (error 0.0); 1e-4 px still
    leaves room for a reordered sum. CUDA kernels (RoIAlign, convolutions) add in other orders,
    hence 1e-3 there. A half-pixel convention slip is 500x larger than either."""
    return 1e-4 if device.type == "cpu" else 1e-3


def _pair_boxes(mine: torch.Tensor, their: torch.Tensor, forbidden: torch.Tensor | None = None) -> list[int]:
    """Pair each of our boxes with a distinct torchvision box within ``_box_tolerance`` (greedy,
    nearest first; identical boxes -- e.g. the whole image proposed from two levels -- pair in order)."""
    tolerance = _box_tolerance(mine.device)
    box_error = (mine[:, None] - their[None]).abs().amax(dim=2)  # (N, N) max coordinate error
    if forbidden is not None:
        box_error[forbidden] = float("inf")
    partner = []
    for row in box_error:
        row = row.clone()
        row[partner] = float("inf")  # each torchvision box pairs once
        best = int(row.argmin())
        assert row[best] < tolerance, f"no torchvision box within {tolerance} px of ours (nearest {float(row[best])})"
        partner.append(best)
    if partner:  # the margin a GPU run leaves under its tolerance (the parity phase runs with -s)
        largest = float(box_error[torch.arange(len(partner)), torch.tensor(partner)].max())
        print(f"boxes on {mine.device.type}: largest error {largest:.2e} px (tolerance {tolerance})")
    return partner


def _match(mine: dict, their: dict) -> list[int]:
    """For each of our detections, the index of torchvision's with the same label and box (``_pair_boxes``)."""
    assert len(mine["boxes"]) == len(their["boxes"]), (len(mine["boxes"]), len(their["boxes"]))
    assert len(mine["boxes"]) > 0, "no detections to compare"
    partner = _pair_boxes(mine["boxes"], their["boxes"], forbidden=mine["labels"][:, None] != their["labels"][None])
    torch.testing.assert_close(mine["scores"], their["scores"][partner], rtol=0, atol=1e-4)
    return partner


def _check_masks(mine: torch.Tensor, their: torch.Tensor) -> None:
    """Binarised at 0.5 (§3.1), each pair of pasted masks overlaps with IoU > 0.99."""
    assert mine.shape == their.shape
    print(f"soft masks: largest difference {float((mine - their).abs().max()):.2e}")
    torch.testing.assert_close(mine, their, rtol=0, atol=1e-5)  # the soft masks, every pixel
    a, b = mine[:, 0] >= 0.5, their[:, 0] >= 0.5  # (N, H, W)
    assert a.flatten(1).any(1).float().mean() > 0.5, "most masks should be non-empty for the IoU to mean something"
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    assert iou.min() > 0.99, iou


def _run_maskrcnn_parity(device, small: bool, shapes) -> None:
    images, targets = _mask_data(shapes)
    num_classes = int(max(t["labels"].max() for t in targets))
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    theirs = _torchvision_maskrcnn(images, targets, num_classes, small, device)
    state = theirs.state_dict()
    cfg = None
    if small:
        cfg = _small_config(torchvision_maskrcnn_config(num_classes, (64,) * 4, 64, fc_dim=FC_DIM, bn_eps=TV_EPS))
    ours = load_torchvision_maskrcnn(state, cfg=cfg, bn_eps=TV_EPS).to(device)
    eval_images = images[:4]
    our_out, their_out = _stages(ours, theirs, eval_images)
    for mine, their in zip(our_out, their_out):
        partner = _match(mine, their)
        _check_masks(mine["masks"], their["masks"][partner])


def _check_keypoint_positions(mine: torch.Tensor, their: torch.Tensor, boxes: torch.Tensor,
                              scale: tuple[float, float]) -> None:
    """(N, 17, 2) keypoints agree within 1e-3 px (CUDA: 3e-3, three times the box tolerance, as a
    keypoint moves with its box's x1 and width), bar a rare argmax flip of whole heatmap cells.

    A keypoint is the centre of its resized heatmap's argmax cell, (j + 0.5) * w / ceil(w) + x1,
    with the box in the resized image's pixels; ``scale`` (x, y) then maps those to the input's.
    A missing +0.5 or a legacy offset moves every keypoint by a fraction of a cell (half a cell
    is 0.2-0.4 px here, 0.02-0.04 px in the 800-px GPU run); measured on the CPU, all 391
    keypoints coincide exactly. Two heatmaps equal to float rounding can still put a near-tied
    maximum in a neighbouring cell: such a keypoint is a whole number of cells off (its score,
    the maximum, already agrees to 1e-4). Those may be at most 1 % of the keypoints: a
    systematic off-by-one-cell would move them all.
    """
    tolerance = max(1e-3, 3 * _box_tolerance(boxes.device))
    widths = ((boxes[:, 2] - boxes[:, 0]) / scale[0]).clamp(min=1)  # as heatmaps_to_keypoints sees them
    heights = ((boxes[:, 3] - boxes[:, 1]) / scale[1]).clamp(min=1)
    cell = torch.stack([scale[0] * widths / widths.ceil(), scale[1] * heights / heights.ceil()], -1)  # (N, 2) px
    cell = cell[:, None]  # (N, 1, 2): one heatmap cell, in the input image's pixels
    offset = mine - their  # (N, 17, 2) px
    off_grid = ((offset / cell - (offset / cell).round()).abs() * cell).amax(-1)  # px from whole cells
    flipped = offset.abs().amax(-1) >= tolerance  # (N, 17)
    print(f"keypoints: {int(flipped.sum())} of {flipped.numel()} apart by {tolerance} px or more, largest "
          f"{float(offset.abs().max()):.2e} px, largest off the cell grid {float(off_grid.max()):.2e} px")
    assert off_grid.max() < tolerance, "keypoints moved by a fraction of a heatmap cell: an offset convention differs"
    assert flipped.sum() <= max(1, flipped.numel() // 100), "more argmax flips than near-ties explain"


def _run_keypointrcnn_parity(device, small: bool, shapes) -> None:
    images, targets = _person_data(shapes)
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    theirs = _torchvision_keypointrcnn(images, targets, small, device)
    cfg = None
    if small:
        cfg = _small_config(torchvision_keypointrcnn_config(17, (64,) * 8, fc_dim=FC_DIM, bn_eps=TV_EPS))
    ours = load_torchvision_keypointrcnn(theirs.state_dict(), cfg=cfg, bn_eps=TV_EPS).to(device)
    our_out, their_out = _stages(ours, theirs, images[:3])
    resized = theirs.transform(images[:3])[0].image_sizes  # (h, w) the heads saw
    for image, (height, width), mine, their in zip(images, resized, our_out, their_out):
        partner = _match(mine, their)
        their_keypoints = their["keypoints"][partner]  # (N, 17, 3) rows (x, y, 1)
        # scores before positions: a score is its heatmap's maximum, so a mismatch there points
        # at the heatmaps themselves, where a moved argmax alone could be a near-tie
        torch.testing.assert_close(mine["keypoints"][..., 2], their["keypoints_scores"][partner], rtol=0, atol=1e-4)
        # ours are pixel centres, theirs COCO's raw indices: the config's offset is the whole difference
        assert ours.cfg.keypoint_head.coordinate_offset == 0.5
        _check_keypoint_positions(mine["keypoints"][..., :2] - 0.5, their_keypoints[..., :2], their["boxes"][partner],
                                  (image.shape[-1] / width, image.shape[-2] / height))


# --- the claims ----------------------------------------------------------------------------------

def test_torchvision_maskrcnn_weights_give_torchvision_detections_and_masks(shapes):
    _run_maskrcnn_parity(torch.device("cpu"), small=True, shapes=shapes)


def test_torchvision_keypointrcnn_weights_give_torchvision_keypoints(shapes):
    _run_keypointrcnn_parity(torch.device("cpu"), small=True, shapes=shapes)


@pytest.fixture
def full_fp32():
    """Convolutions and matrix products in full fp32 for the GPU parity tests, as on the CPU.

    PyTorch lets cuDNN convolve in TF32 by default (a 10-bit mantissa, on Ampere and later
    GPUs). Two fp32 inputs that differ in their last bits -- here two RoIAlign kernels that
    add in another order -- can then round to TF32 values 1e-3 apart. With TF32 on, on an
    H200, the two models' soft masks differed by up to 2.3e-4 and keypoints by up to 1.8 px.
    The claim checked is that both compute the same fp32 network.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torchvision_maskrcnn_parity_on_gpu_full_size(shapes, full_fp32):
    _run_maskrcnn_parity(torch.device("cuda"), small=False, shapes=shapes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torchvision_keypointrcnn_parity_on_gpu_full_size(shapes, full_fp32):
    _run_keypointrcnn_parity(torch.device("cuda"), small=False, shapes=shapes)


def test_loader_reads_classes_and_head_widths_from_the_state_dict():
    torch.manual_seed(0)
    theirs = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4)
    ours = load_torchvision_maskrcnn(theirs.state_dict())
    assert not ours.training and ours.cfg.num_classes == 3  # torchvision counts the background
    assert ours.cfg.mask_head.conv_dims == (256,) * 4 and ours.cfg.box_head.fc_dim == 1024
    assert (ours.cfg.transform.min_size_test, ours.cfg.transform.max_size) == (800, 1333)
    # K + 1 = 4 torchvision mask channels, channel 0 (background) dropped: ours has K = 3
    assert torch.equal(ours.mask_head.predictor.weight, theirs.roi_heads.mask_predictor.mask_fcn_logits.weight[1:])
    theirs = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    ours = load_torchvision_keypointrcnn(theirs.state_dict())
    assert ours.cfg.num_classes == 1 and ours.mask_head is None
    assert ours.cfg.keypoint_head.num_keypoints == 17 and ours.cfg.keypoint_head.conv_dims == (512,) * 8
    assert ours.cfg.transform.min_size_train == (640, 672, 704, 736, 768, 800)


def test_the_loader_runs_frozen_bn_with_eps_0_as_torchvision_runs_its_coco_weights():
    # torchvision's COCO_V1 files come from Detectron (AffineChannel, no eps): it sets eps 0 on
    # loading them (overwrite_eps). Small running variances make the difference visible.
    from torchvision.models import resnet50 as tv_resnet50
    from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
    from torchvision.models.detection._utils import overwrite_eps
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozenBN

    from mrcnn_edu.backbone import FrozenBatchNorm2d

    torch.manual_seed(0)
    theirs = TorchvisionMaskRCNN(_resnet_fpn_extractor(tv_resnet50(norm_layer=TorchvisionFrozenBN), 3),
                                 num_classes=4).eval()
    for module in theirs.modules():
        if isinstance(module, TorchvisionFrozenBN):
            module.running_var.uniform_(1e-5, 1e-3)
            module.weight.mul_(0.01)  # keeps the activations finite through 53 such layers
    overwrite_eps(theirs, 0.0)
    x = torch.rand(1, 3, 64, 96)
    expected = list(theirs.backbone(x).values())
    for eps, same in ((None, True), (TV_EPS, False)):
        kwargs = {} if eps is None else {"bn_eps": eps}
        ours = load_torchvision_maskrcnn(theirs.state_dict(), **kwargs)
        frozen = {m.eps for m in ours.modules() if isinstance(m, FrozenBatchNorm2d)}
        assert frozen == {0.0 if eps is None else eps}
        got = list(ours.backbone(x).values())
        close = all(torch.allclose(g, e, rtol=1e-4, atol=1e-5) for g, e in zip(got, expected))
        assert close == same, (eps, [float((g - e).abs().max()) for g, e in zip(got, expected)])
    with pytest.raises(ValueError, match=r"bn_eps=0.0 but cfg.backbone.resnet.bn_eps=1e-05: give one"):
        load_torchvision_maskrcnn(theirs.state_dict(), cfg=torchvision_maskrcnn_config(num_classes=3), bn_eps=0.0)


def test_loader_names_missing_and_unexpected_keys():
    torch.manual_seed(0)
    state = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3).state_dict()
    state.pop("rpn.head.cls_logits.bias")
    state["roi_heads.extra.weight"] = torch.zeros(1)
    expected = r"missing .*rpn\.head\.cls_logits\.bias.*unexpected .*roi_heads\.extra\.weight"
    with pytest.raises(ValueError, match=expected):
        load_torchvision_maskrcnn(state)
    with pytest.raises(ValueError, match="num_classes=5"):
        load_torchvision_maskrcnn(state, num_classes=5)
    with pytest.raises(ValueError, match="not a torchvision"):
        load_torchvision_keypointrcnn({"backbone.body.conv1.weight": torch.zeros(1)})


# --- the compatibility switches, one at a time, on non-square images ------------------------------

def test_torchvision_strides_put_p6_anchors_61_pixels_apart_when_p5_is_odd():
    """An 800 x 1333 image pads to 800 x 1344: P5 is 25 x 42, P6 13 x 21, and torchvision's
    P6 anchors step by 800 // 13 = 61 rows and 1344 // 21 = 64 columns."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    from mrcnn_edu.anchors import TorchvisionStrideAnchorGenerator
    sizes = ((32,), (64,), (128,), (256,), (512,))
    ratios = ((0.5, 1.0, 2.0),) * 5
    theirs = TorchvisionAnchorGenerator(sizes, ratios)
    ours = TorchvisionStrideAnchorGenerator(sizes, ratios, (4, 8, 16, 32, 64), offset=0.0, round_cell=True)
    grid = [(200, 336), (100, 168), (50, 84), (25, 42), (13, 21)]
    image_list = ImageList(torch.zeros(1, 3, 800, 1344), [(800, 1333)])
    expected = theirs(image_list, [torch.zeros(1, 1, h, w) for h, w in grid])[0]
    mine = torch.cat(ours(grid))
    assert torch.equal(mine, expected)
    p6 = ours(grid)[4].view(13, 21, 3, 4)
    assert p6[1, 0, 0, 1] - p6[0, 0, 0, 1] == 61 and p6[0, 1, 0, 0] - p6[0, 0, 0, 0] == 64


def _compat_model():
    from mrcnn_edu.config import TransformConfig, mini_fpn
    from mrcnn_edu.model import MaskRCNN
    cfg = mini_fpn(num_classes=3)
    cfg.transform = TransformConfig(min_size_train=(100,), max_size=150, min_size_test=100,
                                    resize_mode="torchvision", paste_mode="torchvision")
    return MaskRCNN(cfg)


def test_torchvision_resize_mode_matches_generalized_rcnn_transform():
    """Images, image sizes and (training) targets as torchvision's transform makes them."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform
    torch.manual_seed(0)
    ours = _compat_model().train()
    theirs = GeneralizedRCNNTransform(100, 150, list(ours.cfg.transform.pixel_mean), list(ours.cfg.transform.pixel_std))
    images = [torch.rand(3, 37, 53), torch.rand(3, 71, 45)]
    targets = [{"boxes": torch.tensor([[1.5, 2.25, 30.0, 36.0]]), "labels": torch.tensor([1]),
                "masks": (torch.rand(1, *im.shape[-2:]) > 0.5).to(torch.uint8),
                "keypoints": torch.tensor([[[3.25, 7.5, 2.0], [20.0, 30.75, 1.0]]])} for im in images]
    batch, image_sizes, our_targets, _ = ours.preprocess(images, targets)
    image_list, their_targets = theirs(images, [dict(t) for t in targets])
    assert image_sizes == image_list.image_sizes == [(100, 143), (150, 95)]
    assert torch.equal(batch, image_list.tensors)
    for mine, their in zip(our_targets, their_targets):
        for key in ("boxes", "masks", "keypoints"):
            assert torch.equal(mine[key], their[key]), key


def test_torchvision_postprocess_matches_its_boxes_keypoints_and_pasted_masks():
    """Back to the original pixels: float32 size ratios per axis, torchvision's mask paste."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform
    torch.manual_seed(0)
    ours = _compat_model().eval()
    theirs = GeneralizedRCNNTransform(100, 150, [0.0] * 3, [1.0] * 3).eval()
    resized, original = [(100, 143), (150, 95)], [(37, 53), (71, 45)]
    detections = []
    for h, w in resized:
        xy = torch.rand(5, 2) * torch.tensor([w * 0.6, h * 0.6])
        boxes = torch.cat([xy, xy + 3 + torch.rand(5, 2) * torch.tensor([w * 0.4, h * 0.4])], dim=1)
        detections.append({"boxes": boxes, "labels": torch.tensor([1, 2, 3, 1, 2]), "scores": torch.rand(5),
                           "mask_probs": torch.rand(5, 28, 28), "keypoints": torch.rand(5, 17, 3) * 40})
    mine = ours.postprocess([dict(d) for d in detections], [1.0, 1.0], original, resized)
    their = theirs.postprocess([{"boxes": d["boxes"], "masks": d["mask_probs"][:, None],
                                 "keypoints": d["keypoints"]} for d in detections], resized, original)
    for m, t in zip(mine, their):
        assert torch.equal(m["boxes"], t["boxes"])
        assert torch.equal(m["keypoints"][..., :2], t["keypoints"][..., :2])
        torch.testing.assert_close(m["masks"], t["masks"], rtol=0, atol=1e-5)
        assert torch.equal(m["masks"] >= 0.5, t["masks"] >= 0.5)


def test_loader_with_a_given_cfg_names_head_convs_it_has_no_place_for():
    """A cfg with fewer mask / keypoint convs than the state dict must not drop the rest silently."""
    torch.manual_seed(0)
    state = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3).state_dict()
    cfg = torchvision_maskrcnn_config(num_classes=2, mask_conv_dims=(256,) * 3)  # theirs has 4
    with pytest.raises(ValueError, match=r"unexpected .*roi_heads\.mask_head\.3\.0\.weight"):
        load_torchvision_maskrcnn(state, cfg=cfg)
    state = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    cfg = torchvision_keypointrcnn_config(keypoint_conv_dims=(512,) * 7)  # theirs has 8
    with pytest.raises(ValueError, match=r"unexpected .*roi_heads\.keypoint_head\.14\.weight"):
        load_torchvision_keypointrcnn(state, cfg=cfg)


def test_loading_torchvision_keypoints_into_a_cfg_without_their_half_pixel_warns():
    """torchvision's keypoint weights learned raw COCO indices: a cfg that does not add the 0.5
    back (a user's own, say ``keypoint_r50_fpn``'s) would put every keypoint half a pixel off."""
    torch.manual_seed(0)
    state = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    cfg = torchvision_keypointrcnn_config()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_torchvision_keypointrcnn(state, cfg=cfg)  # its own config: no warning
    cfg.keypoint_head.coordinate_offset = 0.0
    with pytest.warns(UserWarning, match="coordinate_offset is 0.0, not 0.5"):
        load_torchvision_keypointrcnn(state, cfg=cfg)


def _older_layout(state: dict) -> dict:
    """``state`` with the key names of older torchvision releases, the ones its modules'
    ``_load_from_state_dict`` still rename: ``mask_head.mask_fcn{i+1}``, bare FPN convs, bare RPN conv."""
    import re

    old = {}
    for key, value in state.items():
        key = re.sub(r"^roi_heads\.mask_head\.(\d+)\.0\.",
                     lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.", key)
        key = re.sub(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.0\.", r"backbone.fpn.\1_blocks.\2.", key)
        old[key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")] = value
    return old


def test_a_state_dict_in_older_torchvisions_layout_loads_as_torchvision_loads_it():
    """The module docstring's route to the COCO_V1 .pth: torchvision still reads the old key names
    (its back-compat renames them); our FPN and RPN maps did, the mask head's refused them."""
    torch.manual_seed(0)
    theirs = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4)
    old = _older_layout(theirs.state_dict())
    assert "roi_heads.mask_head.mask_fcn4.weight" in old and "rpn.head.conv.weight" in old
    assert not any(".0.0." in key or "mask_head.0." in key for key in old)
    # the oracle: torchvision reads this layout into its own model, every key matched
    again = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4)
    assert not again.load_state_dict(dict(old), strict=True).missing_keys
    expected = load_torchvision_maskrcnn(theirs.state_dict()).state_dict()
    got = load_torchvision_maskrcnn(old).state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    from mrcnn_edu.weights import torchvision_config_of

    assert torchvision_config_of(old) == torchvision_config_of(theirs.state_dict())  # what eval / predict compare


def test_the_overrides_named_for_torchvision_weights_are_all_that_differ_at_inference():
    """eval / predict load a torchvision state dict into the recipe given: every tensor fits
    keypoint_r50_fpn_coco, whose anchors, pooler, resize, paste and eps differ. Only the
    keypoints' half pixel was named."""
    from dataclasses import asdict

    from mrcnn_edu.recipes import apply_overrides, get_recipe
    from mrcnn_edu.weights import torchvision_config_of, torchvision_overrides

    state = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    experiment = get_recipe("keypoint_r50_fpn_coco")
    told = torchvision_overrides(experiment.model, state)
    assert sorted(told) == sorted([
        "model.anchors.offset=0.0", "model.anchors.round_cell=True", "model.anchors.stride_mode=torchvision",
        "model.pooler.aligned=False", "model.transform.resize_mode=torchvision",
        "model.transform.paste_mode=torchvision", "model.keypoint_head.coordinate_offset=0.5",
        "model.backbone.resnet.bn_eps=0.0"])  # not box_head.smooth_l1_beta: only training reads it
    fixed = apply_overrides(experiment, told)  # as the command line reads them
    assert torchvision_overrides(fixed.model, state) == []
    expected, now = asdict(torchvision_config_of(state)), asdict(fixed.model)
    now["box_head"]["smooth_l1_beta"] = expected["box_head"]["smooth_l1_beta"]
    assert now == expected  # nothing else differs
    # a recipe of another depth: its blocks differ too, but they follow from the depth, and the
    # command line refuses them; only what it can set is named, and all of it applies
    mini = get_recipe("mini_cpu")
    told = torchvision_overrides(mini.model, state)
    assert "model.backbone.resnet.depth=50" in told and not any(".blocks=" in t for t in told)
    assert "model.backbone.fpn_norm='none'" in told  # the word, not None
    fixed = apply_overrides(mini, told)
    assert torchvision_overrides(fixed.model, state) == []
