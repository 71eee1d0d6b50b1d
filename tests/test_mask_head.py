"""The mask branch (§3, Figure 4, Table 2b/2e): heads, targets, losses, pasting."""
import math

import pytest
import torch

from mrcnn_edu.roi_heads.mask_head import (
    FCNMaskHead,
    MaskHeadConfig,
    MLPMaskHead,
    Res5MaskHead,
    build_mask_head,
    fcn_mask_head_state_from_torchvision,
    mask_loss,
    mask_probs,
    mask_targets,
    paste_masks_in_image,
)
from _brute import bilinear  # noqa: E402


def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def _bce(z, t):
    return -(t * math.log(_sigmoid(z)) + (1 - t) * math.log(1 - _sigmoid(z)))


def _softmax_ce(zs, c):
    return -(zs[c] - math.log(sum(math.exp(z) for z in zs)))


def _tiny_case(channels):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, channels, 2, 2, generator=g, dtype=torch.float64)
    targets = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    return logits, targets


# ---------------------------------------------------------------- heads (Figure 4, Table 2e)
@pytest.mark.parametrize(
    "loss, agnostic, channels", [("sigmoid", False, 3), ("sigmoid", True, 1), ("softmax", False, 4), ("softmax", True, 2)]
)
def test_fcn_head_maps_14x14_roi_features_to_28x28_masks(loss, agnostic, channels):
    head = FCNMaskHead(16, num_classes=3, cfg=MaskHeadConfig(loss=loss, class_agnostic=agnostic, conv_dims=(8,) * 4,
                                                             deconv_dim=8))
    assert head(torch.randn(5, 16, 14, 14)).shape == (5, channels, 28, 28)


def test_res5_head_deconvs_7x7_res5_output_to_14x14():
    head = Res5MaskHead(32, num_classes=3, cfg=MaskHeadConfig(head="res5_deconv", resolution=14, deconv_dim=8))
    assert head(torch.randn(4, 32, 7, 7)).shape == (4, 3, 14, 14)


def test_mask_predictor_is_he_initialised_with_fan_out_as_torchvision():
    # torchvision's init, not Detectron2's N(0, 0.001²): std sqrt(2 / fan_out), fan_out = K·1·1
    head = FCNMaskHead(256, num_classes=80, cfg=MaskHeadConfig(conv_dims=(8,), deconv_dim=256))
    weight = head.predictor.weight  # (80, 256, 1, 1)
    assert abs(weight.std().item() / math.sqrt(2 / 80) - 1) < 0.03
    assert not head.predictor.bias.any()


def test_res5_head_refuses_a_mask_resolution_other_than_14_when_built():
    # the default resolution, 28, is the FPN head's: with res5_deconv it used to build and then
    # fail at the first training step, targets (28×28) against logits (14×14)
    with pytest.raises(ValueError, match=r"resolution must be 14 for head='res5_deconv'.*got 28"):
        build_mask_head(32, 3, MaskHeadConfig(head="res5_deconv"))
    from mrcnn_edu.config import mini_c4
    from mrcnn_edu.model import MaskRCNN

    cfg = mini_c4(num_classes=2, image_size=64, width=8)
    cfg.mask_head.resolution = 28
    with pytest.raises(ValueError, match="MaskHeadConfig.resolution"):
        MaskRCNN(cfg)


@pytest.mark.parametrize("mlp_dims", [(1024, 1024), (1024, 1024, 1024)])
def test_mlp_head_of_table_2e_outputs_k_masks_of_28x28(mlp_dims):
    head = MLPMaskHead(4, num_classes=2, cfg=MaskHeadConfig(head="mlp", mlp_dims=mlp_dims))
    assert len(head.fcs) == len(mlp_dims)
    assert head.fcs[0].in_features == 4 * 14 * 14
    assert head(torch.randn(3, 4, 14, 14)).shape == (3, 2, 28, 28)


def test_build_mask_head_picks_the_configured_head_and_rejects_unknown_ones():
    assert isinstance(build_mask_head(4, 2, MaskHeadConfig(head="fcn", conv_dims=(4,))), FCNMaskHead)
    assert isinstance(build_mask_head(4, 2, MaskHeadConfig(head="mlp", mlp_dims=(8,))), MLPMaskHead)
    assert isinstance(build_mask_head(4, 2, MaskHeadConfig(head="res5_deconv", resolution=14)), Res5MaskHead)
    with pytest.raises(ValueError, match="head"):
        build_mask_head(4, 2, MaskHeadConfig(head="unet"))
    with pytest.raises(ValueError, match="loss"):
        FCNMaskHead(4, 2, MaskHeadConfig(loss="dice"))
    with pytest.raises(ValueError, match="resolution"):
        FCNMaskHead(4, 2, MaskHeadConfig(resolution=14))  # 14×14 features deconv to 28×28


def test_fcn_head_matches_torchvision_maskrcnn_heads_after_loading_its_weights():
    mask_rcnn = pytest.importorskip("torchvision.models.detection.mask_rcnn")
    torch.manual_seed(0)
    tv_head = mask_rcnn.MaskRCNNHeads(32, [32, 32, 32, 32], 1)  # narrow, same layout as 256
    tv_predictor = mask_rcnn.MaskRCNNPredictor(32, 32, 4)  # background + 3 classes
    tv_state = {f"roi_heads.mask_head.{k}": v for k, v in tv_head.state_dict().items()}
    tv_state.update({f"roi_heads.mask_predictor.{k}": v for k, v in tv_predictor.state_dict().items()})
    ours = FCNMaskHead(32, num_classes=3, cfg=MaskHeadConfig(conv_dims=(32,) * 4, deconv_dim=32))
    ours.load_state_dict(fcn_mask_head_state_from_torchvision(tv_state))
    features = torch.randn(3, 32, 14, 14)
    with torch.no_grad():
        expected = tv_predictor(tv_head(features))[:, 1:]  # torchvision's channel 0 is never read
        torch.testing.assert_close(ours(features), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mask_head.0.0.weight"):
        fcn_mask_head_state_from_torchvision({})


def test_gradients_reach_every_layer_of_each_head():
    cases = [
        (FCNMaskHead(4, 2, MaskHeadConfig(conv_dims=(4, 4), deconv_dim=4)), (3, 4, 14, 14)),
        (MLPMaskHead(2, 2, MaskHeadConfig(head="mlp", mlp_dims=(16, 16))), (3, 2, 14, 14)),
        (Res5MaskHead(4, 2, MaskHeadConfig(head="res5_deconv", resolution=14, deconv_dim=4)), (3, 4, 7, 7)),
    ]
    torch.manual_seed(0)
    for head, input_shape in cases:
        logits = head(torch.randn(input_shape))
        targets = (torch.rand(3, *logits.shape[2:]) > 0.5).float()
        mask_loss(logits, torch.tensor([1, 2, 1]), targets).backward()
        for name, param in head.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- losses (§3, Table 2b)
def test_sigmoid_loss_is_the_mean_bce_on_the_gt_class_mask_only():
    logits, targets = _tiny_case(3)
    labels = torch.tensor([2, 3])
    expected = 0.0
    for p in range(2):
        for i in range(2):
            for j in range(2):
                expected += _bce(logits[p, labels[p] - 1, i, j].item(), targets[p, i, j].item())
    expected /= 2 * 2 * 2
    assert mask_loss(logits, labels, targets).item() == pytest.approx(expected, rel=1e-12)


def test_class_agnostic_sigmoid_loss_reads_the_single_mask():
    logits, targets = _tiny_case(1)
    expected = sum(_bce(logits[p, 0, i, j].item(), targets[p, i, j].item())
                   for p in range(2) for i in range(2) for j in range(2)) / 8
    got = mask_loss(logits, torch.tensor([2, 3]), targets, class_agnostic=True)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_softmax_loss_is_per_pixel_cross_entropy_with_background_outside_the_mask():
    logits, targets = _tiny_case(4)  # background + K = 3
    labels = torch.tensor([2, 3])
    expected = 0.0
    for p in range(2):
        for i in range(2):
            for j in range(2):
                pixel_class = labels[p].item() if targets[p, i, j] > 0.5 else 0
                expected += _softmax_ce([logits[p, c, i, j].item() for c in range(4)], pixel_class)
    assert mask_loss(logits, labels, targets, loss="softmax").item() == pytest.approx(expected / 8, rel=1e-12)


def test_class_agnostic_softmax_loss_is_object_versus_background():
    logits, targets = _tiny_case(2)
    expected = sum(_softmax_ce([logits[p, 0, i, j].item(), logits[p, 1, i, j].item()], int(targets[p, i, j] > 0.5))
                   for p in range(2) for i in range(2) for j in range(2)) / 8
    got = mask_loss(logits, torch.tensor([3, 1]), targets, loss="softmax", class_agnostic=True)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_sigmoid_masks_do_not_compete_across_classes():
    logits, targets = _tiny_case(3)
    labels = torch.tensor([2, 3])
    other = logits.clone()
    other[0, [0, 2]] += torch.randn(2, 2, 2, dtype=torch.float64) * 5  # RoI 0 is class 2
    other[1, [0, 1]] -= 3.0  # RoI 1 is class 3
    assert mask_loss(other, labels, targets).item() == mask_loss(logits, labels, targets).item()
    logits.requires_grad_(True)
    mask_loss(logits, labels, targets).backward()
    assert logits.grad[0, [0, 2]].abs().max() == 0 and logits.grad[1, [0, 1]].abs().max() == 0
    assert logits.grad[0, 1].abs().min() > 0 and logits.grad[1, 2].abs().min() > 0


def test_softmax_masks_compete_across_classes():
    logits, targets = _tiny_case(4)
    labels = torch.tensor([2, 3])
    other = logits.clone()
    other[0, 1] += 2.0  # class 1 is not RoI 0's class, yet raising it changes RoI 0's loss
    assert mask_loss(other, labels, targets, loss="softmax").item() > mask_loss(logits, labels, targets,
                                                                               loss="softmax").item()


@pytest.mark.parametrize("head, loss, agnostic", [("fcn", "sigmoid", False), ("fcn", "softmax", False),
                                                  ("fcn", "sigmoid", True), ("mlp", "softmax", True)])
def test_mask_loss_without_positives_gives_every_head_parameter_a_zero_gradient(head, loss, agnostic):
    # A batch can have no positive RoI. Its mask loss must still be an exact 0 on the head's
    # graph: detached, the head's grads stay None and DDP (find_unused_parameters=False) fails
    # or hangs on them; a mean over no pixels is NaN, which would poison every weight.
    cfg = MaskHeadConfig(head=head, loss=loss, class_agnostic=agnostic, conv_dims=(8, 8), deconv_dim=8, mlp_dims=(16,))
    mask_head = build_mask_head(16, 3, cfg)
    logits = mask_head(torch.randn(0, 16, 14, 14))
    assert logits.shape == (0, mask_head.num_outputs, 28, 28)
    value = mask_loss(logits, torch.zeros(0, dtype=torch.long), torch.zeros(0, 28, 28), loss, agnostic)
    assert value.grad_fn is not None and value.item() == 0
    params = dict(mask_head.named_parameters())
    grads = torch.autograd.grad(value, list(params.values()))  # raises if one is off the graph
    for (name, param), grad in zip(params.items(), grads):
        assert grad is not None and grad.shape == param.shape and not grad.any(), name  # any() is True on NaN


def test_mask_loss_rejects_bad_inputs_by_name():
    logits, targets = _tiny_case(3)
    with pytest.raises(ValueError, match="labels"):
        mask_loss(logits, torch.tensor([1]), targets)
    with pytest.raises(ValueError, match="labels"):
        mask_loss(logits, torch.tensor([0, 4]), targets)  # background / beyond K
    with pytest.raises(ValueError, match="mask_targets"):
        mask_loss(logits, torch.tensor([1, 2]), targets[:, :1])
    with pytest.raises(ValueError, match="mask_logits"):
        mask_loss(logits, torch.tensor([1, 2]), targets, class_agnostic=True)  # 3 channels, agnostic needs 1
    with pytest.raises(ValueError, match="mask_logits"):
        mask_loss(logits[:, 0], torch.tensor([1, 2]), targets)
    with pytest.raises(ValueError, match="loss"):
        mask_loss(logits, torch.tensor([1, 2]), targets, loss="focal")


def test_mask_probs_of_half_precision_logits_are_float32_and_keep_what_is_above_one_half():
    """bf16 spaces [0.5, 1) 1/256 apart: sigmoid(0.004) = 0.501 became exactly 0.5 and was
    dropped by the paste's > 0.5 (review finding: 0.05 % of the mask pixels flipped)."""
    logits = torch.full((1, 2, 2, 2), 0.004)
    for dtype in (torch.bfloat16, torch.float16):
        for loss, channels in (("sigmoid", 1), ("softmax", 2)):
            probs = mask_probs(logits[:, :channels].to(dtype) if loss == "sigmoid" else
                               torch.stack([torch.zeros(1, 2, 2), torch.full((1, 2, 2), 0.008)], 1).to(dtype),
                               torch.tensor([1]), loss=loss, class_agnostic=loss == "sigmoid")
            assert probs.dtype == torch.float32 and (probs > 0.5).all(), (dtype, loss, probs)
    assert (logits.to(torch.bfloat16).sigmoid() == 0.5).all()  # what it computed before


def test_mask_probs_take_the_predicted_class_channel():
    logits, _ = _tiny_case(4)
    labels = torch.tensor([3, 1])
    sig = mask_probs(logits[:, :3], labels)
    torch.testing.assert_close(sig, torch.stack([logits[0, 2].sigmoid(), logits[1, 0].sigmoid()]))
    soft = mask_probs(logits, labels, loss="softmax")
    i, j = 1, 0
    zs = [logits[0, c, i, j].item() for c in range(4)]
    assert soft[0, i, j].item() == pytest.approx(math.exp(-_softmax_ce(zs, 3)), rel=1e-12)
    agnostic = mask_probs(logits[:, :1], labels, class_agnostic=True)
    torch.testing.assert_close(agnostic, logits[:, 0].sigmoid())


def test_softmax_readouts_differ_where_the_foreground_is_split_between_classes():
    # one RoI, 2x1 pixels, channels (background, class 1, class 2); probabilities by hand:
    # pixel 0: (0.20, 0.45, 0.35) -- class 1 wins the vote but holds under half the mass
    # pixel 1: (0.60, 0.30, 0.10) -- background wins
    probs = torch.tensor([[0.20, 0.45, 0.35], [0.60, 0.30, 0.10]], dtype=torch.float64)
    logits = probs.log().T.reshape(1, 3, 2, 1)  # softmax(log p) = p
    label = torch.tensor([1])
    p1 = mask_probs(logits, label, loss="softmax")
    torch.testing.assert_close(p1[0, :, 0], torch.tensor([0.45, 0.30], dtype=torch.float64))
    vote = mask_probs(logits, label, loss="softmax", softmax_readout="argmax")
    assert vote[0, :, 0].tolist() == [1.0, 0.0]  # pixel 0 is class 1's by argmax, not by p >= 0.5
    assert mask_probs(logits, torch.tensor([2]), loss="softmax", softmax_readout="argmax")[0, :, 0].tolist() == [0.0, 0.0]
    anything = mask_probs(logits, torch.tensor([2]), loss="softmax", softmax_readout="foreground")
    torch.testing.assert_close(anything[0, :, 0], torch.tensor([0.80, 0.40], dtype=torch.float64))
    # the sigmoid loss has no competing classes: the readout does not apply
    sig = mask_probs(logits[:, 1:], label, softmax_readout="argmax")
    torch.testing.assert_close(sig, logits[:, 1].sigmoid())
    with pytest.raises(ValueError, match="softmax_readout"):
        mask_probs(logits, label, loss="softmax", softmax_readout="max")
    with pytest.raises(ValueError, match="softmax_readout"):
        build_mask_head(8, 2, MaskHeadConfig(loss="softmax", softmax_readout="vote"))


# ---------------------------------------------------------------- mask targets (§3.1)
def test_mask_targets_match_a_brute_force_roialign_loop():
    g = torch.Generator().manual_seed(1)
    gt_masks = (torch.rand(2, 12, 15, generator=g) > 0.4).to(torch.uint8)
    gt_masks[1, 3:9, 2:11] = 1
    proposals = torch.tensor([[1.3, 0.7, 9.6, 10.2], [2.2, 2.9, 12.7, 8.1], [-1.4, 4.3, 6.1, 13.5]])
    matched = torch.tensor([0, 1, 0])
    m = 5
    got = mask_targets(gt_masks, matched, proposals, m)
    assert got.shape == (3, m, m)
    for p in range(3):
        image = gt_masks[matched[p]].double().tolist()
        x1, y1, x2, y2 = (v - 0.5 for v in proposals[p].double().tolist())  # aligned=True
        bin_w, bin_h = (x2 - x1) / m, (y2 - y1) / m
        grid_w, grid_h = math.ceil(bin_w), math.ceil(bin_h)  # adaptive sampling
        for i in range(m):
            for j in range(m):
                total = sum(bilinear(image, y1 + i * bin_h + (a + 0.5) * bin_h / grid_h,
                                      x1 + j * bin_w + (b + 0.5) * bin_w / grid_w)
                            for a in range(grid_h) for b in range(grid_w))
                soft = total / (grid_h * grid_w)
                assert abs(soft - 0.5) > 1e-4  # no tie at the threshold, so the comparison is exact
                assert got[p, i, j].item() == float(soft >= 0.5), (p, i, j)


def test_mask_target_is_the_gt_mask_cropped_to_the_roi():
    gt_masks = torch.zeros(1, 20, 20, dtype=torch.bool)
    gt_masks[0, 6:15, 3:9] = True
    # An RoI on pixel edges with one pixel per cell: the target is the mask's crop, exactly.
    got = mask_targets(gt_masks, torch.tensor([0]), torch.tensor([[2.0, 4.0, 12.0, 14.0]]), m=10)
    torch.testing.assert_close(got[0], gt_masks[0, 4:14, 2:12].float())


def test_mask_targets_reject_bad_inputs_by_name():
    masks = torch.zeros(2, 8, 8, dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    with pytest.raises(ValueError, match="gt_masks"):
        mask_targets(masks[0], torch.tensor([0]), boxes, 4)
    with pytest.raises(ValueError, match="matched_gt_idx"):
        mask_targets(masks, torch.tensor([2]), boxes, 4)
    with pytest.raises(ValueError, match="proposals"):
        mask_targets(masks, torch.tensor([0]), boxes[:, :3], 4)
    assert mask_targets(masks, torch.zeros(0, dtype=torch.long), torch.zeros(0, 4), 4).shape == (0, 4, 4)


# ---------------------------------------------------------------- pasting (§3.1 inference)
def _disc_masks(num, m, generator):
    """Smooth soft masks (blurry ellipses), like a trained head's output."""
    coords = (torch.arange(m) + 0.5) / m
    centre = 0.3 + 0.4 * torch.rand(num, 2, generator=generator)
    radius = 0.25 + 0.2 * torch.rand(num, 2, generator=generator)
    d = ((coords[None, None, :] - centre[:, 0, None, None]) / radius[:, 0, None, None]) ** 2 + (
        (coords[None, :, None] - centre[:, 1, None, None]) / radius[:, 1, None, None]) ** 2
    return torch.sigmoid(6 * (1 - d))  # (num, m, m)


def _random_boxes(num, height, width, generator, min_size=1.0, max_size=40.0, inside=False):
    wh = min_size + torch.rand(num, 2, generator=generator) * (max_size - min_size)
    room = torch.tensor([width, height]) - (wh if inside else 0)
    xy = torch.rand(num, 2, generator=generator) * room
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)  # detections are clipped to the image
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


def test_pasting_matches_a_per_pixel_brute_force_loop():
    g = torch.Generator().manual_seed(2)
    masks = torch.rand(3, 4, 4, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[2.3, 1.6, 9.9, 7.2], [-3.0, 5.5, 4.0, 12.5], [8.0, 0.0, 13.0, 3.0]], dtype=torch.float64)
    height, width, m = 11, 13, 4
    got = paste_masks_in_image(masks, boxes, (height, width))
    assert got.shape == (3, 1, height, width)
    for n in range(3):
        x1, y1, x2, y2 = boxes[n].tolist()
        for y in range(height):
            for x in range(width):
                u = (x + 0.5 - x1) / (x2 - x1) * m - 0.5  # pixel centre in mask-cell-centre units
                v = (y + 0.5 - y1) / (y2 - y1) * m - 0.5
                j0, i0 = math.floor(u), math.floor(v)
                value = 0.0
                for i, wi in ((i0, 1 - (v - i0)), (i0 + 1, v - i0)):
                    for j, wj in ((j0, 1 - (u - j0)), (j0 + 1, u - j0)):
                        if 0 <= i < m and 0 <= j < m:  # zero outside the mask
                            value += wi * wj * masks[n, i, j].item()
                assert got[n, 0, y, x].item() == pytest.approx(value, abs=1e-12), (n, y, x)


def test_a_full_mask_pastes_to_exactly_its_box_bar_the_corners_of_a_large_one():
    boxes = torch.tensor([[3.0, 2.0, 17.0, 9.0], [0.0, 10.0, 6.0, 20.0], [4.0, 3.0, 104.0, 53.0]])
    pasted = paste_masks_in_image(torch.ones(3, 28, 28), boxes, (60, 110)) > 0.5  # evaluation's threshold
    for n, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        expected = torch.zeros(60, 110, dtype=torch.bool)
        expected[y1:y2, x1:x2] = True
        if n == 2:  # 100 x 50 px: a corner pixel reads (0.5 + 14/100)(0.5 + 14/50) = 0.4992 of the mask
            expected[[y1, y1, y2 - 1, y2 - 1], [x1, x2 - 1, x1, x2 - 1]] = False
        assert torch.equal(pasted[n, 0], expected), n


def test_pasting_in_chunks_gives_the_same_masks():
    g = torch.Generator().manual_seed(3)
    masks, boxes = torch.rand(7, 14, 14, generator=g), _random_boxes(7, 50, 60, g)
    whole = paste_masks_in_image(masks, boxes, (50, 60))
    torch.testing.assert_close(paste_masks_in_image(masks, boxes, (50, 60), chunk_pixels=2 * 50 * 60), whole)


def test_torchvision_mode_reproduces_torchvision_paste_masks_in_image():
    roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads")
    g = torch.Generator().manual_seed(4)
    masks, boxes = torch.rand(40, 28, 28, generator=g), _random_boxes(40, 90, 120, g, max_size=70)
    expected = roi_heads.paste_masks_in_image(masks[:, None], boxes, (90, 120))
    got = paste_masks_in_image(masks, boxes, (90, 120), mode="torchvision")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_exact_paste_agrees_with_torchvision_up_to_its_rounding():
    roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads")
    g = torch.Generator().manual_seed(5)
    # Typical boxes (50-150 px, inside the image): torchvision's integer rounding moves a mask
    # edge by up to a pixel, a small fraction of such an object.
    masks, boxes = _disc_masks(30, 28, g), _random_boxes(30, 200, 240, g, min_size=50, max_size=150, inside=True)
    ours = paste_masks_in_image(masks, boxes, (200, 240)) >= 0.5
    theirs = roi_heads.paste_masks_in_image(masks[:, None], boxes, (200, 240)) >= 0.5
    iou = (ours & theirs).flatten(1).sum(1) / (ours | theirs).flatten(1).sum(1)
    assert iou.min() > 0.95, iou


def test_paste_rejects_bad_inputs_by_name():
    with pytest.raises(ValueError, match="masks"):
        paste_masks_in_image(torch.rand(2, 1, 4, 4), torch.zeros(2, 4), (8, 8))
    with pytest.raises(ValueError, match="boxes"):
        paste_masks_in_image(torch.rand(2, 4, 4), torch.zeros(3, 4), (8, 8))
    with pytest.raises(ValueError, match="mode"):
        paste_masks_in_image(torch.rand(2, 4, 4), torch.zeros(2, 4), (8, 8), mode="nearest")
    assert paste_masks_in_image(torch.rand(0, 4, 4), torch.zeros(0, 4), (8, 9)).shape == (0, 1, 8, 9)


def test_pasting_accepts_masks_that_still_carry_a_graph():
    logits = torch.randn(2, 3, 28, 28, requires_grad=True)  # an eval forward without no_grad
    probs = mask_probs(logits, torch.tensor([1, 3]))
    boxes = torch.tensor([[1.0, 2.0, 20.0, 30.0], [5.0, 5.0, 9.0, 9.0]])
    torch.testing.assert_close(paste_masks_in_image(probs, boxes, (32, 32)),
                               paste_masks_in_image(probs.detach(), boxes, (32, 32)))


def test_batch_mask_targets_equal_one_call_per_image_for_equal_and_mixed_sizes():
    from mrcnn_edu.roi_heads.mask_head import batch_mask_targets
    generator = torch.Generator().manual_seed(0)
    # sizes: a run of two equal images (one call), then a different size, then the first again
    sizes, counts, rois_per_image = [(40, 50), (40, 50), (30, 60), (40, 50)], [3, 2, 1, 4], [5, 0, 3, 6]
    masks, idx, rois = [], [], []
    for (h, w), g, p in zip(sizes, counts, rois_per_image):
        masks.append((torch.rand(g, h, w, generator=generator) > 0.5).to(torch.uint8))
        idx.append(torch.randint(0, g, (p,), generator=generator))
        xy = torch.rand(p, 2, generator=generator) * 20
        rois.append(torch.cat([xy, xy + 5 + torch.rand(p, 2, generator=generator) * 20], dim=1))
    got = batch_mask_targets(masks, idx, rois, 14)
    want = torch.cat([mask_targets(mk, i, r, 14) for mk, i, r in zip(masks, idx, rois)])
    assert got.shape == (14, 14, 14) and torch.equal(got, want)
    assert 0 < float(got.mean()) < 1  # not all one value
    bad = [i.clone() for i in idx]
    bad[2][0] = 1  # image 2 has a single mask
    with pytest.raises(ValueError, match=r"matched_gt_idx\[2\]"):
        batch_mask_targets(masks, bad, rois, 14)
