"""The keypoint head (§5): 56×56 heatmaps, one-hot targets, m²-way softmax loss, decoding."""
import math

import pytest
import torch

from mrcnn_edu.roi_heads.keypoint_head import (
    KeypointHead,
    KeypointHeadConfig,
    heatmaps_to_keypoints,
    keypoint_head_state_from_torchvision,
    keypoint_loss,
    keypoint_targets,
)


def _random_keypoints(boxes, num_kp, generator):
    """Keypoints around each box: some inside, some outside, some on the far edge, some unlabelled."""
    num = boxes.shape[0]
    wh = boxes[:, 2:] - boxes[:, :2]
    rel = torch.rand(num, num_kp, 2, generator=generator) * 1.4 - 0.2  # 20 % margin outside
    xy = boxes[:, None, :2] + rel * wh[:, None]
    xy[:, 0] = boxes[:, 2:]  # keypoint 0 exactly on the far corner
    xy[:, 1, 0] = boxes[:, 0]  # keypoint 1 on the near edge
    vis = (torch.rand(num, num_kp, generator=generator) > 0.2).float() * 2
    return torch.cat([xy, vis[..., None]], dim=-1)  # (P, Kp, 3)


def test_head_is_eight_512d_convs_a_deconv_and_2x_bilinear_to_56x56():
    head = KeypointHead(16, KeypointHeadConfig(num_keypoints=5, conv_dims=(8,) * 8))
    assert len(head.convs) == 8 and KeypointHeadConfig().conv_dims == (512,) * 8
    assert head(torch.randn(3, 16, 14, 14)).shape == (3, 5, 56, 56)
    with pytest.raises(ValueError, match="resolution"):
        KeypointHead(16, KeypointHeadConfig(resolution=28))


def test_head_matches_torchvision_keypoint_head_after_loading_its_weights():
    keypoint_rcnn = pytest.importorskip("torchvision.models.detection.keypoint_rcnn")
    torch.manual_seed(0)
    tv_head = keypoint_rcnn.KeypointRCNNHeads(16, [32] * 8)  # narrow, same layout as 512
    tv_predictor = keypoint_rcnn.KeypointRCNNPredictor(32, 17)
    tv_state = {f"roi_heads.keypoint_head.{k}": v for k, v in tv_head.state_dict().items()}
    tv_state.update({f"roi_heads.keypoint_predictor.{k}": v for k, v in tv_predictor.state_dict().items()})
    ours = KeypointHead(16, KeypointHeadConfig(conv_dims=(32,) * 8))
    ours.load_state_dict(keypoint_head_state_from_torchvision(tv_state))
    features = torch.randn(2, 16, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(ours(features), tv_predictor(tv_head(features)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="keypoint_head.0.weight"):
        keypoint_head_state_from_torchvision({})


def test_each_keypoint_target_is_a_single_cell_of_the_roi_grid():
    proposals = torch.tensor([[10.0, 20.0, 30.0, 60.0]])  # w = 20, h = 40; m = 4: cells 5 × 10 px
    keypoints = torch.tensor([[[11.0, 21.0, 2], [29.9, 59.9, 1], [30.0, 60.0, 2], [24.9, 45.0, 2],
                               [9.9, 30.0, 2], [15.0, 40.0, 0]]])
    targets, valid = keypoint_targets(keypoints, proposals, m=4)
    # (row, col): (0, 0); (3, 3); far corner -> (3, 3); (2, 2); left of the RoI; unlabelled.
    assert targets.tolist() == [[0, 15, 15, 10, 0, 0]]
    assert valid.tolist() == [[True, True, True, True, False, False]]


def test_a_keypoint_a_rounding_step_inside_the_far_edge_is_kept_in_the_last_cell():
    # in float32, (x - x1) * (m / w) for the float just below x2 rounds up to m here: a cell
    # index past the grid, which torchvision and Detectron then drop as outside the RoI
    x1, x2 = 187.77891540527344, 451.0521240234375
    proposals = torch.tensor([[x1, 0.0, x2, 56.0]])
    x = torch.nextafter(torch.tensor(x2), torch.tensor(0.0)).item()
    assert x < x2 and ((torch.tensor(x) - x1) * (56 / (torch.tensor(x2) - x1))).floor() == 56  # the case
    keypoints = torch.tensor([[[x, 10.5, 2.0], [x2 + 0.01, 10.5, 2.0]]])  # just inside; just outside
    targets, valid = keypoint_targets(keypoints, proposals, m=56)
    assert valid.tolist() == [[True, False]] and targets[0, 0].item() == 10 * 56 + 55


def test_keypoint_targets_match_torchvision_keypoints_to_heatmap():
    roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads")
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g) * 200
    proposals = torch.cat([xy, xy + 5 + torch.rand(20, 2, generator=g) * 100], dim=1)
    keypoints = _random_keypoints(proposals, 17, g)
    targets, valid = keypoint_targets(keypoints, proposals, m=56)
    tv_targets, tv_valid = roi_heads.keypoints_to_heatmap(keypoints, proposals, 56)
    assert torch.equal(valid, tv_valid.bool())
    assert torch.equal(targets, tv_targets)
    assert 0 < valid.sum() < valid.numel()  # the case holds both valid and invalid keypoints


def test_keypoint_loss_is_the_m2_way_softmax_cross_entropy_of_visible_keypoints():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)  # m = 2: a 4-way softmax
    targets = torch.tensor([[3, 0, 1], [2, 2, 0]])
    valid = torch.tensor([[True, False, True], [True, True, False]])
    expected, count = 0.0, 0
    for p in range(2):
        for k in range(3):
            if valid[p, k]:
                zs = logits[p, k].flatten().tolist()
                expected += -(zs[targets[p, k]] - math.log(sum(math.exp(z) for z in zs)))
                count += 1
    assert keypoint_loss(logits, targets, valid).item() == pytest.approx(expected / count, rel=1e-12)


def test_keypoint_loss_matches_torchvision_keypointrcnn_loss():
    roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads")
    g = torch.Generator().manual_seed(4)
    xy = torch.rand(5, 2, generator=g) * 100
    proposals = torch.cat([xy, xy + 10 + torch.rand(5, 2, generator=g) * 80], dim=1)
    gt_keypoints = _random_keypoints(proposals[[0, 2, 4]], 17, g)  # 3 gt people
    matched_gt_idx = torch.tensor([0, 0, 1, 2, 2])
    logits = torch.randn(5, 17, 56, 56, generator=g)
    targets, valid = keypoint_targets(gt_keypoints[matched_gt_idx], proposals)
    expected = roi_heads.keypointrcnn_loss(logits, [proposals], [gt_keypoints], [matched_gt_idx])
    torch.testing.assert_close(keypoint_loss(logits, targets, valid), expected)


def test_keypoint_loss_ignores_invalid_keypoints_and_keeps_the_graph_without_any():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    targets = torch.tensor([[5, 0, 1], [2, 9, 0]])
    valid = torch.tensor([[True, False, False], [False, False, False]])
    keypoint_loss(logits, targets, valid).backward()
    assert logits.grad[0, 0].abs().sum() > 0
    assert logits.grad[0, 1:].abs().max() == 0 and logits.grad[1].abs().max() == 0
    logits.grad = None
    loss = keypoint_loss(logits, targets, torch.zeros_like(valid))
    loss.backward()
    assert loss.item() == 0 and logits.grad.abs().max() == 0


def test_gradients_reach_every_layer_of_the_head():
    torch.manual_seed(0)
    head = KeypointHead(4, KeypointHeadConfig(num_keypoints=3, conv_dims=(4,) * 8))
    logits = head(torch.randn(2, 4, 14, 14))
    targets = torch.randint(0, 56 * 56, (2, 3))
    keypoint_loss(logits, targets, torch.ones(2, 3, dtype=torch.bool)).backward()
    for name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_a_one_hot_heatmap_decodes_to_its_cell_centre():
    boxes = torch.tensor([[100.0, 50.0, 156.0, 106.0]])  # 56 px: one pixel per heatmap cell
    logits = torch.zeros(1, 2, 56, 56)
    logits[0, 0, 10, 33] = 5.0
    logits[0, 1, 55, 0] = 3.0
    points = heatmaps_to_keypoints(logits, boxes)
    torch.testing.assert_close(points[0], torch.tensor([[133.5, 60.5, 5.0], [100.5, 105.5, 3.0]]))


def test_a_one_hot_target_decodes_to_a_point_in_the_keypoints_cell():
    g = torch.Generator().manual_seed(2)
    boxes = torch.tensor([[10.0, 20.0, 122.0, 188.0], [5.5, 7.25, 61.5, 119.25]])  # cells of 2-3 px
    keypoints = _random_keypoints(boxes, 17, g)
    targets, valid = keypoint_targets(keypoints, boxes, m=56)
    logits = torch.full((2, 17, 56 * 56), -10.0)
    logits.scatter_(2, targets[..., None], 10.0)  # a peaked one-hot heatmap per keypoint
    decoded = heatmaps_to_keypoints(logits.view(2, 17, 56, 56), boxes)
    decoded_targets, decoded_valid = keypoint_targets(
        torch.cat([decoded[..., :2], torch.ones(2, 17, 1)], dim=-1), boxes, m=56)
    assert decoded_valid.all()
    assert torch.equal(decoded_targets[valid], targets[valid])


def test_decoding_matches_torchvision_heatmaps_to_keypoints():
    roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads")
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(6, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + 0.5 + torch.rand(6, 2, generator=g) * 150], dim=1)  # one box under 1 px
    boxes[0, 2:] = boxes[0, :2] + 0.6
    logits = torch.randn(6, 17, 56, 56, generator=g)
    ours = heatmaps_to_keypoints(logits, boxes)
    tv_xy, tv_scores = roi_heads.heatmaps_to_keypoints(logits, boxes)
    torch.testing.assert_close(ours[..., :2], tv_xy[..., :2], rtol=0, atol=1e-4)
    torch.testing.assert_close(ours[..., 2], tv_scores, rtol=0, atol=1e-5)


def test_no_detections_decode_to_no_keypoints():
    assert heatmaps_to_keypoints(torch.zeros(0, 17, 56, 56), torch.zeros(0, 4)).shape == (0, 17, 3)
    targets, valid = keypoint_targets(torch.zeros(0, 17, 3), torch.zeros(0, 4))
    assert targets.shape == valid.shape == (0, 17)


def test_bad_inputs_are_rejected_by_name():
    with pytest.raises(ValueError, match="keypoints"):
        keypoint_targets(torch.zeros(2, 17, 2), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="proposals"):
        keypoint_targets(torch.zeros(2, 17, 3), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="keypoint_logits"):
        keypoint_loss(torch.zeros(2, 17, 56), torch.zeros(2, 17, dtype=torch.long), torch.ones(2, 17, dtype=torch.bool))
    with pytest.raises(ValueError, match="targets"):
        keypoint_loss(torch.zeros(2, 17, 4, 4), torch.zeros(2, 16, dtype=torch.long), torch.ones(2, 17, dtype=torch.bool))
    with pytest.raises(ValueError, match="boxes"):
        heatmaps_to_keypoints(torch.zeros(2, 17, 4, 4), torch.zeros(2, 5))


def _peaked_heatmaps(num_rois, num_kp, generator, m=56):
    """Logits as a trained head gives them: one smooth bump per keypoint (peak ~8) on noise."""
    centres = torch.rand(num_rois, num_kp, 2, 1, 1, generator=generator) * (m - 1)
    rows, cols = torch.arange(m).view(m, 1).float(), torch.arange(m).view(1, m).float()
    squared = (rows - centres[:, :, 1]) ** 2 + (cols - centres[:, :, 0]) ** 2  # (P, Kp, m, m)
    return 8 * torch.exp(-squared / 18) + 0.3 * torch.randn(num_rois, num_kp, m, m, generator=generator)


def test_heatmaps_that_arrive_in_bf16_decode_as_in_fp32():
    # Under bf16 autocast the head hands bf16 logits to the decoder. Resized and argmaxed in
    # bf16, neighbouring values tie and the first of them wins: keypoints moved up-left by
    # pixels on a large box. Decoded in fp32, the bf16 logits give the same points as their
    # exact fp32 values, under autocast or not.
    g = torch.Generator().manual_seed(4)
    boxes = torch.tensor([[20.0, 30.0, 320.0, 630.0], [5.5, 7.25, 205.5, 107.25]])  # 300×600 and 200×100
    logits_bf16 = _peaked_heatmaps(2, 17, g).bfloat16()
    expected = heatmaps_to_keypoints(logits_bf16.float(), boxes)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = heatmaps_to_keypoints(logits_bf16, boxes)
            got_from_fp32 = heatmaps_to_keypoints(logits_bf16.float(), boxes)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(got_from_fp32, expected, rtol=0, atol=0)
