"""roi_heads/box_head.py: RoI sampling on hand-built IoUs, the loss by hand, post-processing
against a per-class loop and torchvision, and the branch end to end."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mrcnn_edu.boxes import BoxCoder, box_iou, nms
from mrcnn_edu.matching import BalancedSampler, Matcher
from mrcnn_edu.roi_heads.box_head import (BoxBranch, BoxHeadConfig, BoxPredictor, PositiveRoIs, Res5Head,
                                          TwoFCHead, box_loss, c4_box_head_config, postprocess_detections,
                                          sample_rois, sample_rois_padded, split_rows)

ROI_MATCHER = Matcher(0.5, 0.5, allow_low_quality_matches=False)
ROI_CODER = BoxCoder((10.0, 10.0, 5.0, 5.0))


class StandInPooler(nn.Module):
    """A test-only RoIAlign (one bilinear sample per bin centre, aligned) via grid_sample,
    independent of the package's pooler: ``forward(features, boxes per image)``. Border padding
    reproduces RoIAlign's clamping of samples that fall within a pixel of the map's edge."""

    def __init__(self, output_size: int, scale: float) -> None:
        super().__init__()
        self.output_size, self.scale = output_size, scale

    def forward(self, features, boxes):
        feature = features[0]
        batch_idx = torch.cat([torch.full((len(b),), i) for i, b in enumerate(boxes)])
        rois = torch.cat(boxes) * self.scale - 0.5  # aligned: pixel centres at integer coordinates
        steps = (torch.arange(self.output_size) + 0.5) / self.output_size  # (s,)
        xs = rois[:, 0:1] + steps * (rois[:, 2:3] - rois[:, 0:1])  # (R, s)
        ys = rois[:, 1:2] + steps * (rois[:, 3:4] - rois[:, 1:2])  # (R, s)
        height, width = feature.shape[-2:]
        grid_x = (2 * xs + 1) / width - 1  # grid_sample, align_corners=False: normalised coords
        grid_y = (2 * ys + 1) / height - 1
        grid = torch.stack(torch.broadcast_tensors(grid_x[:, None, :], grid_y[:, :, None]), dim=-1)  # (R, s, s, 2)
        return F.grid_sample(feature[batch_idx], grid, padding_mode="border", align_corners=False)  # (R, C, s, s)


def test_stand_in_pooler_is_torchvisions_roi_align_with_one_sample_per_bin():
    torchvision = pytest.importorskip("torchvision")
    generator = torch.Generator().manual_seed(0)
    feature = torch.randn(2, 3, 16, 16, generator=generator)
    boxes = [torch.tensor([[4.0, 6.0, 30.0, 28.0], [1.0, 2.0, 9.0, 5.0]]), torch.tensor([[10.0, 10.0, 50.0, 40.0]])]
    torch.testing.assert_close(StandInPooler(7, 1 / 4)([feature], boxes),
                               torchvision.ops.roi_align(feature, boxes, 7, 1 / 4, sampling_ratio=1, aligned=True))


def test_config_holds_the_papers_sampling_numbers():
    fpn, c4 = BoxHeadConfig(), c4_box_head_config()
    assert (fpn.fg_iou_thresh, fpn.bg_iou_thresh, fpn.positive_fraction) == (0.5, 0.5, 0.25)
    assert (fpn.batch_size_per_image, c4.batch_size_per_image) == (512, 64)  # §3.1
    assert (fpn.head, fpn.pooler_resolution, c4.head, c4.pooler_resolution) == ("2fc", 7, "res5", 14)
    assert fpn.detections_per_img == 100
    with pytest.raises(ValueError, match="head"):
        BoxHeadConfig(head="3fc")


def test_c4_res5_pools_14x14_for_stride_2_and_7x7_for_the_papers_stride_1():
    # both give res5 a 7×7 output (Figure 4 left): Detectron's / [19]'s 14×14 with stride 2 (the
    # default), or the caption's "first conv operates on a 7×7 RoI with stride 1"
    detectron, paper = c4_box_head_config(), c4_box_head_config(res5_first_stride=1)
    assert (detectron.res5_first_stride, detectron.pooler_resolution) == (2, 14)
    assert (paper.res5_first_stride, paper.pooler_resolution) == (1, 7)
    with pytest.raises(ValueError, match=r"res5_first_stride=1 needs pooler_resolution=7.*got 14"):
        BoxHeadConfig(head="res5", pooler_resolution=14, res5_first_stride=1)
    with pytest.raises(ValueError, match=r"res5_first_stride=2 needs pooler_resolution=14.*got 7"):
        c4_box_head_config(pooler_resolution=7)
    with pytest.raises(ValueError, match="res5_first_stride must be 1 or 2"):
        c4_box_head_config(res5_first_stride=4)
    assert BoxHeadConfig(res5_first_stride=1).pooler_resolution == 7  # a 2fc head ignores the stride


def test_roi_is_foreground_at_iou_05_and_gt_boxes_are_added_as_proposals():
    gt = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([3])}
    proposals = torch.tensor([
        [0.0, 0.0, 10.0, 8.0],  # IoU 0.8 -> class 3
        [0.0, 0.0, 10.0, 5.0],  # IoU 0.5 -> class 3 ("at least 0.5")
        [0.0, 0.0, 10.0, 4.0],  # IoU 0.4 -> background
        [20.0, 20.0, 30.0, 30.0],  # IoU 0 -> background
    ])
    rois, labels, targets, matched = sample_rois([proposals], [gt], ROI_MATCHER, BalancedSampler(512, 0.25), ROI_CODER)
    rois, labels, targets, matched = rois[0], labels[0], targets[0], matched[0]
    # 3 foreground (two proposals and the appended gt) first, then the 2 backgrounds
    assert labels.tolist() == [3, 3, 3, 0, 0] and matched.tolist() == [0, 0, 0, -1, -1]
    assert sorted(map(tuple, rois[:3].tolist())) == sorted([(0.0, 0.0, 10.0, 8.0), (0.0, 0.0, 10.0, 5.0),
                                                            (0.0, 0.0, 10.0, 10.0)])
    assert sorted(map(tuple, rois[3:].tolist())) == sorted([(0.0, 0.0, 10.0, 4.0), (20.0, 20.0, 30.0, 30.0)])
    for roi, target in zip(rois[:3], targets[:3]):
        # weights (10, 10, 5, 5): dx = 10 (5 - cx) / w, dy = 10 (5 - cy) / h, dw = 5 log(10 / w), dh = 5 log(10 / h)
        w, h = float(roi[2] - roi[0]), float(roi[3] - roi[1])
        cx, cy = float(roi[0] + roi[2]) / 2, float(roi[1] + roi[3]) / 2
        want = torch.tensor([10 * (5 - cx) / w, 10 * (5 - cy) / h, 5 * math.log(10 / w), 5 * math.log(10 / h)])
        torch.testing.assert_close(target, want)
    assert torch.equal(targets[3:], torch.zeros(2, 4))


def test_a_ground_truth_squeezed_to_no_area_is_not_sampled_as_a_background_roi():
    """The resize's floor can leave a sliver-thin object at the image's edge with x1 == x2: its
    own box, added to the proposals, matched nothing (IoU 0) and was sampled as a negative."""
    gt = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [30.0, 10.0, 30.0, 40.0]]), "labels": torch.tensor([3, 1])}
    proposals = torch.tensor([[20.0, 20.0, 30.0, 30.0]])
    rois, labels, _, matched = sample_rois([proposals], [gt], ROI_MATCHER, BalancedSampler(512, 0.25), ROI_CODER)
    assert sorted(map(tuple, rois[0].tolist())) == [(0.0, 0.0, 10.0, 10.0), (20.0, 20.0, 30.0, 30.0)]
    assert labels[0].tolist() == [3, 0] and matched[0].tolist() == [0, -1]


def test_rois_are_sampled_one_positive_to_three_negatives():
    generator = torch.Generator().manual_seed(0)
    gt = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "labels": torch.tensor([1])}
    near = gt["boxes"] + torch.rand(100, 4, generator=generator) * 4  # IoU > 0.5: 100 foreground
    far = torch.tensor([[60.0, 60.0, 90.0, 90.0]]) + torch.rand(200, 4, generator=generator) * 4
    rois, labels, _, _ = sample_rois([torch.cat([near, far])], [gt], ROI_MATCHER, BalancedSampler(64, 0.25),
                                     ROI_CODER, generator=generator)
    assert rois[0].shape == (64, 4)
    assert (int((labels[0] > 0).sum()), int((labels[0] == 0).sum())) == (16, 48)
    iou = box_iou(rois[0], gt["boxes"])[:, 0]
    assert bool((iou[labels[0] > 0] >= 0.5).all()) and bool((iou[labels[0] == 0] < 0.5).all())


def test_image_without_objects_gives_only_background_rois():
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    proposals = torch.tensor([[0.0, 0.0, 10.0, 8.0], [20.0, 20.0, 30.0, 30.0]])
    rois, labels, targets, matched = sample_rois([proposals], [empty], ROI_MATCHER, BalancedSampler(512, 0.25), ROI_CODER)
    assert labels[0].tolist() == [0, 0] and matched[0].tolist() == [-1, -1]
    assert torch.equal(targets[0], torch.zeros(2, 4)) and rois[0].shape == (2, 4)
    with pytest.raises(ValueError, match="labels"):
        sample_rois([proposals], [{"boxes": torch.zeros(0, 4)}], ROI_MATCHER, BalancedSampler(8, 0.25), ROI_CODER)


def test_box_loss_is_cross_entropy_plus_smooth_l1_on_the_true_class_by_hand():
    class_logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]])  # K = 2
    labels = torch.tensor([2, 0])
    box_deltas = torch.zeros(2, 12)
    box_deltas[0, 8:12] = torch.tensor([0.5, -2.0, 0.0, 1.0])  # class 2's deltas of RoI 0
    box_deltas[0, 4:8] = 9.0  # another class's deltas: not in the loss
    box_deltas[1] = 5.0  # background RoI: no box loss
    targets = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    losses = box_loss(class_logits, box_deltas, labels, targets, beta=1.0)
    ce0 = -2.0 + math.log(1 + math.e + math.e ** 2)  # -log softmax([0, 1, 2])[2]
    ce1 = -1.0 + math.log(math.e + 2)  # -log softmax([1, 0, 0])[0]
    l1 = 0.5 * 0.5 ** 2 + (2.0 - 0.5) + 0.0 + 0.5 * 1.0 ** 2  # beta = 1: 0.5 x^2 if |x| < 1 else |x| - 0.5
    torch.testing.assert_close(losses["loss_classifier"], torch.tensor((ce0 + ce1) / 2))
    torch.testing.assert_close(losses["loss_box_reg"], torch.tensor(l1 / 2))
    agnostic = box_loss(class_logits, box_deltas[:, 8:12], labels, targets, beta=1.0)
    torch.testing.assert_close(agnostic["loss_box_reg"], torch.tensor(l1 / 2))
    empty = box_loss(torch.zeros(0, 3, requires_grad=True), torch.zeros(0, 12), torch.zeros(0), torch.zeros(0, 4))
    assert empty["loss_classifier"].item() == 0.0 and empty["loss_classifier"].requires_grad


def test_box_loss_matches_torchvision_fastrcnn_loss():
    pytest.importorskip("torchvision")
    from torchvision.models.detection.roi_heads import fastrcnn_loss

    generator = torch.Generator().manual_seed(0)
    class_logits, box_deltas = torch.randn(30, 5, generator=generator), torch.randn(30, 20, generator=generator)
    labels = torch.randint(0, 5, (30,), generator=generator)
    targets = torch.randn(30, 4, generator=generator)
    ours = box_loss(class_logits, box_deltas, labels, targets, beta=1 / 9)  # torchvision's beta
    theirs = fastrcnn_loss(class_logits, box_deltas, [labels[:12], labels[12:]], [targets[:12], targets[12:]])
    torch.testing.assert_close(ours["loss_classifier"], theirs[0])
    torch.testing.assert_close(ours["loss_box_reg"], theirs[1])


def _random_head_outputs(generator, proposals_per_image=(40, 25), num_classes=4):
    proposals = []
    for n in proposals_per_image:
        xy = torch.rand(n, 2, generator=generator) * 60
        proposals.append(torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=generator) * 30], dim=1))
    total = sum(proposals_per_image)
    class_logits = 2 * torch.randn(total, num_classes + 1, generator=generator)
    box_deltas = torch.randn(total, 4 * (num_classes + 1), generator=generator)
    return class_logits, box_deltas, proposals


def _brute_force_detections(class_logits, box_deltas, proposals, image_size, cfg):
    """One class at a time: decode that class's box, clip, threshold, greedy NMS; merge, top-k."""
    probs = F.softmax(class_logits, dim=1)
    coder = BoxCoder(cfg.box_weights)
    found = []
    for k in range(1, class_logits.shape[1]):
        boxes = coder.decode(box_deltas[:, 4 * k:4 * k + 4], proposals)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image_size[1])
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image_size[0])
        candidates = [(float(probs[i, k]), boxes[i]) for i in range(len(boxes))
                      if probs[i, k] > cfg.score_thresh
                      and min(boxes[i, 2] - boxes[i, 0], boxes[i, 3] - boxes[i, 1]) >= cfg.min_size]
        kept = []
        for score, box in sorted(candidates, key=lambda c: -c[0]):
            if all(float(box_iou(box[None], other[None])) <= cfg.nms_thresh for _, other, _ in kept):
                kept.append((score, box, k))
        found += kept
    found = sorted(found, key=lambda c: -c[0])[: cfg.detections_per_img]
    return (torch.stack([b for _, b, _ in found]), torch.tensor([s for s, _, _ in found]),
            torch.tensor([k for _, _, k in found]))


def test_postprocess_equals_a_per_class_loop():
    generator = torch.Generator().manual_seed(0)
    class_logits, box_deltas, proposals = _random_head_outputs(generator)
    cfg = BoxHeadConfig(score_thresh=0.1, detections_per_img=30)
    image_sizes = [(70, 80), (64, 64)]
    detections = postprocess_detections(class_logits, box_deltas, proposals, image_sizes, cfg)
    start = 0
    for proposals_i, size, found in zip(proposals, image_sizes, detections):
        stop = start + len(proposals_i)
        boxes, scores, labels = _brute_force_detections(class_logits[start:stop], box_deltas[start:stop],
                                                        proposals_i, size, cfg)
        start = stop
        assert 0 < found["boxes"].shape[0] <= 30 and found["labels"].dtype == torch.int64
        torch.testing.assert_close(found["boxes"], boxes)
        torch.testing.assert_close(found["scores"], scores)
        assert torch.equal(found["labels"], labels)


def test_postprocess_matches_torchvision_roi_heads():
    pytest.importorskip("torchvision")
    from torchvision.models.detection.roi_heads import RoIHeads

    generator = torch.Generator().manual_seed(1)
    class_logits, box_deltas, proposals = _random_head_outputs(generator, (60, 50), num_classes=3)
    cfg = BoxHeadConfig()
    tv = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, cfg.box_weights, cfg.score_thresh, cfg.nms_thresh,
                  cfg.detections_per_img)
    image_sizes = [(70, 80), (64, 64)]
    tv_boxes, tv_scores, tv_labels = tv.postprocess_detections(class_logits, box_deltas, proposals, image_sizes)
    ours = postprocess_detections(class_logits, box_deltas, proposals, image_sizes, cfg)
    for found, boxes, scores, labels in zip(ours, tv_boxes, tv_scores, tv_labels):
        torch.testing.assert_close(found["boxes"], boxes)
        torch.testing.assert_close(found["scores"], scores)
        assert torch.equal(found["labels"], labels)


def test_detections_of_one_class_do_not_overlap_beyond_the_nms_threshold():
    generator = torch.Generator().manual_seed(2)
    class_logits, box_deltas, proposals = _random_head_outputs(generator, (80,), num_classes=2)
    (found,) = postprocess_detections(class_logits, 0.1 * box_deltas, proposals, [(100, 100)], BoxHeadConfig())
    for k in (1, 2):
        boxes = found["boxes"][found["labels"] == k]
        iou = box_iou(boxes, boxes) - torch.eye(len(boxes))
        assert float(iou.max()) <= 0.5
        assert torch.equal(nms(boxes, found["scores"][found["labels"] == k], 0.5), torch.arange(len(boxes)))


def test_heads_take_torchvision_weights_by_name():
    pytest.importorskip("torchvision")
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    torch.manual_seed(0)
    tv_head, tv_predictor = TwoMLPHead(8 * 7 * 7, 32), FastRCNNPredictor(32, 4)
    head, predictor = TwoFCHead(8, 7, 32), BoxPredictor(32, 4)
    head.load_state_dict(tv_head.state_dict())
    predictor.load_state_dict(tv_predictor.state_dict())
    roi_features = torch.randn(5, 8, 7, 7)
    for ours, theirs in zip(predictor(head(roi_features)), tv_predictor(tv_head(roi_features))):
        torch.testing.assert_close(ours, theirs)


def test_predictor_follows_fast_rcnn_initialisation():
    torch.manual_seed(0)
    predictor = BoxPredictor(1024, 81)
    assert predictor.bbox_pred.weight.shape == (324, 1024)
    assert abs(predictor.cls_score.weight.detach().std().item() - 0.01) < 5e-4
    assert abs(predictor.bbox_pred.weight.detach().std().item() - 0.001) < 5e-5
    assert BoxPredictor(16, 3, class_specific=False).bbox_pred.weight.shape == (4, 16)
    with pytest.raises(ValueError, match="num_classes"):
        BoxPredictor(16, 1)


def _two_image_batch():
    torch.manual_seed(0)
    features = [torch.randn(2, 8, 16, 16)]  # stride 4 on 64 x 64 images
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 28.0], [36.0, 30.0, 60.0, 60.0]]), "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([2])}]
    proposals = [t["boxes"].repeat(6, 1) + 6 * torch.rand(6 * len(t["boxes"]), 4) - 3 for t in targets]
    proposals = [torch.cat([p, torch.tensor([[0.0, 40.0, 20.0, 64.0], [40.0, 0.0, 64.0, 20.0]])]) for p in proposals]
    return features, proposals, targets


def test_box_branch_trains_its_head_and_hands_positive_rois_to_the_mask_branch():
    features, proposals, targets = _two_image_batch()
    cfg = BoxHeadConfig(batch_size_per_image=16, fc_dim=32)
    branch = BoxBranch(cfg, StandInPooler(7, 1 / 4), TwoFCHead(8, 7, 32), BoxPredictor(32, 3)).train()
    losses, positives = branch(features, proposals, [(64, 64)] * 2, targets, generator=torch.Generator().manual_seed(0))
    assert set(losses) == {"loss_classifier", "loss_box_reg"}
    sum(losses.values()).backward()
    for name, param in branch.named_parameters():
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, name
    assert isinstance(positives, PositiveRoIs) and positives.res5_features is None
    for rois, labels, matched, target in zip(positives.rois, positives.labels, positives.matched_gt_idx, targets):
        assert len(rois) == len(labels) == len(matched) > 0
        assert torch.equal(labels, target["labels"][matched])
        assert bool((box_iou(rois, target["boxes"]).gather(1, matched[:, None]) >= 0.5).all())
    branch.eval()
    detections = branch(features, proposals, [(64, 64)] * 2)
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "scores", "labels"}


def test_box_branch_losses_are_fast_rcnn_eq3_on_the_rois_it_sampled(monkeypatch):
    # The branch's own losses, recomputed from their definitions on the RoIs, labels and
    # targets it sampled and the logits / deltas its predictor gave: cross-entropy over K + 1
    # classes, plus smooth-L1 with Fast R-CNN's beta = 1 (eq. 3; BoxHeadConfig.smooth_l1_beta)
    # on the true class's 4 deltas of each foreground RoI, summed and divided by all sampled RoIs.
    from mrcnn_edu.roi_heads import box_head

    features, proposals, targets = _two_image_batch()
    cfg = BoxHeadConfig(batch_size_per_image=16, fc_dim=32)
    assert cfg.smooth_l1_beta == 1.0
    branch = BoxBranch(cfg, StandInPooler(7, 1 / 4), TwoFCHead(8, 7, 32), BoxPredictor(32, 3)).train()
    seen = {}
    real_sample = box_head.sample_rois_padded

    def spy(*args, **kwargs):
        seen["sampled"] = real_sample(*args, **kwargs)
        return seen["sampled"]

    monkeypatch.setattr(box_head, "sample_rois_padded", spy)
    branch.predictor.register_forward_hook(lambda module, args, out: seen.update(out=out))
    losses, _ = branch(features, proposals, [(64, 64)] * 2, targets, generator=torch.Generator().manual_seed(0))
    padded, counts = seen["sampled"]
    _, labels, regression_targets, _ = (torch.cat(x) for x in split_rows(padded, counts[0].tolist()))
    class_logits, box_deltas = (t.detach() for t in seen["out"])
    num_rois = len(labels)
    foreground = labels > 0
    assert 0 < int(foreground.sum()) < num_rois
    log_probs = class_logits - class_logits.logsumexp(dim=1, keepdim=True)
    want_cls = -log_probs[torch.arange(num_rois), labels].mean()
    error = (box_deltas.view(num_rois, -1, 4)[torch.arange(num_rois), labels] - regression_targets)[foreground].abs()
    assert float(error.max()) > 1.0 and float(error.min()) < 1 / 9  # both branches of smooth-L1, and beta matters
    want_reg = torch.where(error < 1.0, 0.5 * error ** 2, error - 0.5).sum() / num_rois
    torch.testing.assert_close(losses["loss_classifier"].detach(), want_cls)
    torch.testing.assert_close(losses["loss_box_reg"].detach(), want_reg)


def test_c4_branch_shares_res5_output_of_positive_rois_with_the_package_pooler():
    from mrcnn_edu.backbone.resnet import ResNetConfig, make_res5_head
    from mrcnn_edu.roi_heads.pooler import PoolerConfig, RoIPooler

    features, proposals, targets = _two_image_batch()
    features = [torch.randn(2, 64, 16, 16)]  # miniature C4 map (64 channels), stride 4 here
    res5 = make_res5_head(ResNetConfig(depth=(1, 1, 1, 1), stem_channels=8, res2_out_channels=16,
                                       width_per_group=4, norm="gn"))
    cfg = c4_box_head_config(batch_size_per_image=16)
    head = Res5Head(res5)
    branch = BoxBranch(cfg, RoIPooler(PoolerConfig(), 14, [1 / 4]), head, BoxPredictor(head.out_features, 3)).train()
    losses, positives = branch(features, proposals, [(64, 64)] * 2, targets, generator=torch.Generator().manual_seed(0))
    num_pos = sum(len(r) for r in positives.rois)
    assert positives.res5_features.shape == (num_pos, 128, 7, 7)
    branch.eval()  # the same res5 on the same RoIs, recomputed at test time
    torch.testing.assert_close(branch.res5_features(features, positives.rois), positives.res5_features.detach())
    assert torch.isfinite(sum(losses.values()))


def test_box_branch_alone_overfits_one_image_on_fixed_features():
    torch.manual_seed(0)
    features = [torch.randn(1, 16, 16, 16)]
    gt = {"boxes": torch.tensor([[4.0, 6.0, 30.0, 28.0], [36.0, 30.0, 60.0, 60.0]]), "labels": torch.tensor([1, 2])}
    # proposals: jittered copies of the objects (IoU ~0.6-0.9) and background boxes
    proposals = [torch.cat([gt["boxes"].repeat(10, 1) + 8 * torch.rand(20, 4) - 4,
                            torch.tensor([[0.0, 40.0, 20.0, 64.0], [40.0, 0.0, 64.0, 20.0], [20.0, 20.0, 40.0, 40.0]])])]
    cfg = BoxHeadConfig(batch_size_per_image=32, fc_dim=64)
    branch = BoxBranch(cfg, StandInPooler(7, 1 / 4), TwoFCHead(16, 7, 64), BoxPredictor(64, 3)).train()
    optimizer = torch.optim.Adam(branch.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    history = []
    for _ in range(150):
        losses, _ = branch(features, proposals, [(64, 64)], [gt], generator=generator)
        total = sum(losses.values())
        history.append(total.item())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert history[-1] < 0.05 * history[0]
    (found,) = branch.eval()(features, proposals, [(64, 64)])
    top = {int(k): found["boxes"][found["labels"] == k][0] for k in (1, 2)}  # best detection per class
    for box, label in zip(gt["boxes"], gt["labels"]):
        assert float(box_iou(box[None], top[int(label)][None])) > 0.9


def _image(generator, num_gt, num_proposals, num_classes=5):
    xy = torch.rand(num_gt, 2, generator=generator) * 60
    gt = torch.cat([xy, xy + 8 + torch.rand(num_gt, 2, generator=generator) * 30], dim=1)
    labels = torch.randint(1, num_classes + 1, (num_gt,), generator=generator)
    # proposals: jittered copies of the gt boxes (many positives) and random boxes (negatives)
    near = gt.repeat(3, 1) + torch.randn(3 * num_gt, 4, generator=generator) * 3
    near = torch.cat([near[:, :2], torch.maximum(near[:, 2:], near[:, :2] + 1)], dim=1)
    xy = torch.rand(num_proposals, 2, generator=generator) * 90
    far = torch.cat([xy, xy + 2 + torch.rand(num_proposals, 2, generator=generator) * 20], dim=1)
    return torch.cat([near, far]), {"boxes": gt, "labels": labels}


def test_sample_rois_on_a_batch_equal_each_image_alone_when_the_budget_takes_everything():
    # a budget above every image's candidates leaves no randomness, so batched == one by one
    generator = torch.Generator().manual_seed(0)
    images = [_image(generator, g, p) for g, p in ((3, 40), (0, 25), (5, 10), (1, 0))]
    images[3] = (torch.zeros(0, 4), images[3][1])  # no proposals: the gt box is the one candidate
    proposals, targets = [p for p, _ in images], [t for _, t in images]
    sampler = BalancedSampler(1000, 1.0)
    batched = sample_rois(proposals, targets, ROI_MATCHER, sampler, ROI_CODER)
    for i, (p, t) in enumerate(images):
        alone = sample_rois([p], [t], ROI_MATCHER, sampler, ROI_CODER)
        for got, want in zip(batched, alone):
            assert torch.equal(got[i], want[0]), i
    num_pos = [int((labels > 0).sum()) for labels in batched[1]]
    assert num_pos[0] >= 3 and num_pos[1] == 0 and num_pos[2] >= 5 and num_pos[3] == 1
    # the padded form the box branch reads: the same rows, and both counts for one host read
    padded, counts = sample_rois_padded(proposals, targets, ROI_MATCHER, sampler, ROI_CODER)
    assert counts.tolist() == [[len(r) for r in batched[0]], num_pos]
    for got, want in zip(split_rows(padded, counts[0].tolist()), batched):
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_sample_rois_on_a_batch_by_brute_force():
    # the random case: check every image's sample against its definition, box by box
    generator = torch.Generator().manual_seed(1)
    images = [_image(generator, g, p) for g, p in ((4, 300), (2, 50), (0, 80))]
    rois, labels, targets, matched = sample_rois([p for p, _ in images], [t for _, t in images], ROI_MATCHER,
                                                 BalancedSampler(64, 0.25), ROI_CODER,
                                                 generator=torch.Generator().manual_seed(2))
    for i, (proposals, target) in enumerate(images):
        candidates = torch.cat([proposals, target["boxes"]])
        num_pos = int((labels[i] > 0).sum())
        available_pos = 0 if len(target["boxes"]) == 0 else int((box_iou(target["boxes"], candidates).max(0).values >= 0.5).sum())
        assert num_pos == min(16, available_pos) and len(rois[i]) == min(64, len(candidates)), i
        assert bool((labels[i][:num_pos] > 0).all()) and bool((labels[i][num_pos:] == 0).all())  # positives first
        for j in range(len(rois[i])):
            row = int((candidates == rois[i][j]).all(dim=1).nonzero()[0])  # a candidate, unchanged
            ious = [float(box_iou(g[None], candidates[row][None])) for g in target["boxes"]]
            if j < num_pos:
                best = max(range(len(ious)), key=lambda g: ious[g])
                assert int(matched[i][j]) == best and ious[best] >= 0.5
                assert int(labels[i][j]) == int(target["labels"][best])
                torch.testing.assert_close(targets[i][j], ROI_CODER.encode(target["boxes"][best][None], rois[i][j][None])[0])
            else:
                assert max(ious, default=0.0) < 0.5 and int(matched[i][j]) == -1
                assert bool((targets[i][j] == 0).all())
