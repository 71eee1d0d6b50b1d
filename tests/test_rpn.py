"""rpn.py: anchor targets on hand-built cases, the loss by hand, proposal selection, and
torchvision's RegionProposalNetwork as an independent oracle where it is importable."""
import math

import pytest
import torch
import torch.nn.functional as F

from mrcnn_edu.anchors import AnchorGenerator, fpn_anchor_generator
from mrcnn_edu.boxes import BoxCoder, box_iou, nms
from mrcnn_edu.matching import BalancedSampler, Matcher
from mrcnn_edu.rpn import (RPN, RPNConfig, RPNHead, c4_rpn_config, flatten_head_outputs, fpn_rpn_config,
                           rpn_loss, rpn_state_dict_from_torchvision, rpn_targets, select_proposals)

RPN_MATCHER = Matcher(0.7, 0.3, allow_low_quality_matches=True)


def test_config_holds_the_papers_proposal_numbers():
    fpn, c4 = fpn_rpn_config(), c4_rpn_config()
    assert (fpn.fg_iou_thresh, fpn.bg_iou_thresh, fpn.batch_size_per_image, fpn.positive_fraction) == (0.7, 0.3, 256, 0.5)
    assert fpn.nms_thresh == 0.7 and fpn.post_nms_top_n(training=False) == 1000  # §3.1: 1000 for FPN
    assert c4.post_nms_top_n(training=False) == 300  # §3.1: 300 for C4
    assert c4.pre_nms_top_n(training=False) == 6000
    with pytest.raises(ValueError, match="post_nms_top_n_test"):
        RPNConfig(post_nms_top_n_test=0)


def test_rpn_targets_label_anchors_by_iou_and_encode_the_matched_box():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])  # centre (5, 5), 10 x 10
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 8.0],  # IoU 80/100 = 0.8 -> 1
        [0.0, 0.0, 10.0, 5.0],  # IoU 0.5 -> ignored (-1)
        [0.0, 0.0, 10.0, 2.0],  # IoU 0.2 -> 0
        [30.0, 30.0, 40.0, 40.0],  # IoU 0 -> 0
    ])
    labels, targets = rpn_targets(anchors, gt, RPN_MATCHER, BoxCoder())
    assert labels.tolist() == [1.0, -1.0, 0.0, 0.0]
    # anchor 0: centre (5, 4), 10 x 8 -> dx = 0, dy = (5 - 4) / 8, dw = log(10/10), dh = log(10/8)
    want = torch.zeros(4, 4)
    want[0] = torch.tensor([0.0, 0.125, 0.0, math.log(10 / 8)])
    torch.testing.assert_close(targets, want)


def test_rpn_targets_make_the_best_anchor_positive_even_below_07():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([[0.0, 0.0, 10.0, 6.0],  # IoU 0.6: best -> positive
                            [0.0, 0.0, 10.0, 4.0]])  # IoU 0.4: ignored
    labels, _ = rpn_targets(anchors, gt, RPN_MATCHER, BoxCoder())
    assert labels.tolist() == [1.0, -1.0]


def test_rpn_targets_for_an_image_without_objects_are_all_negative():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 8.0], [5.0, 5.0, 9.0, 9.0]])
    labels, targets = rpn_targets(anchors, torch.zeros(0, 4), RPN_MATCHER, BoxCoder())
    assert labels.tolist() == [0.0, 0.0]
    assert torch.equal(targets, torch.zeros(2, 4))


def test_rpn_loss_is_bce_over_sampled_plus_smooth_l1_over_positives_by_hand():
    objectness = torch.tensor([[2.0, -1.0, 0.5]])
    labels = torch.tensor([[1.0, 0.0, -1.0]])  # the ignored anchor contributes nothing
    deltas = torch.zeros(1, 3, 4)
    targets = torch.zeros(1, 3, 4)
    targets[0, 0] = torch.tensor([0.05, -0.5, 0.0, 0.2])
    deltas[0, 2] = 7.0  # garbage on the ignored anchor must not count
    losses = rpn_loss(objectness, deltas, labels, targets, BalancedSampler(256, 0.5))
    # BCE: -log sigmoid(2) - log(1 - sigmoid(-1)) = softplus(-2) + softplus(-1), over 2 sampled
    want_bce = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))) / 2
    # smooth-L1, beta = 1/9: 0.5 x^2 / beta if |x| < beta else |x| - beta / 2
    beta = 1 / 9
    want_l1 = (0.5 * 0.05 ** 2 / beta + (0.5 - beta / 2) + 0.0 + (0.2 - beta / 2)) / 2
    torch.testing.assert_close(losses["loss_objectness"], torch.tensor(want_bce))
    torch.testing.assert_close(losses["loss_rpn_box_reg"], torch.tensor(want_l1))


def test_rpn_refuses_levels_with_another_anchor_count_than_its_head():
    # one shared head predicts A per cell on every level; a level of 2A anchors would pair half
    # of them with no logit, and the others with another anchor's
    uneven = AnchorGenerator([(32,), (64, 90), (128,)], [(0.5, 1.0, 2.0)] * 3, (4, 8, 16))
    with pytest.raises(ValueError, match=r"\[3, 6, 3\] anchors per cell.*predicts 3"):
        RPN(fpn_rpn_config(), uneven, RPNHead(8, 3))
    with pytest.raises(ValueError, match="predicts 15"):
        RPN(fpn_rpn_config(), fpn_anchor_generator(), RPNHead(8, 15))


def test_rpn_loss_samples_at_most_the_budget_per_image():
    # 2 images x 1000 anchors, 300 positives each: with a budget of 256, 128 + 128 per image;
    # all logits 0 -> BCE log 2 per anchor whatever is sampled; deltas 1 vs targets 0 on every
    # positive -> smooth-L1 (1 - beta/2) x 4 x 128 positives x 2 images / 512 sampled
    labels = torch.zeros(2, 1000)
    labels[:, :300] = 1.0
    losses = rpn_loss(torch.zeros(2, 1000), torch.ones(2, 1000, 4), labels, torch.zeros(2, 1000, 4),
                      BalancedSampler(256, 0.5), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(losses["loss_objectness"], torch.tensor(math.log(2.0)))
    torch.testing.assert_close(losses["loss_rpn_box_reg"], torch.tensor((1 - 1 / 18) * 4 * 256 / 512))


def test_head_outputs_flatten_in_anchor_order():
    n, a, h, w = 2, 3, 4, 5
    # the value encodes (image, cell row, cell column, anchor) so that order can be read off
    obj = torch.zeros(n, a, h, w)
    deltas = torch.zeros(n, 4 * a, h, w)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                for k in range(a):
                    obj[b, k, i, j] = 1000 * b + (i * w + j) * a + k
                    for c in range(4):
                        deltas[b, 4 * k + c, i, j] = 10 * (1000 * b + (i * w + j) * a + k) + c
    flat_obj, flat_deltas = flatten_head_outputs(obj, deltas)
    index = torch.arange(h * w * a, dtype=torch.float32)
    torch.testing.assert_close(flat_obj, torch.stack([index, index + 1000]))
    torch.testing.assert_close(flat_deltas[..., 2], 10 * flat_obj + 2)


def test_head_has_the_paper_initialisation_and_torchvision_names():
    torch.manual_seed(0)
    head = RPNHead(64, 3)
    assert sorted(dict(head.named_parameters())) == sorted([
        "conv.weight", "conv.bias", "cls_logits.weight", "cls_logits.bias", "bbox_pred.weight", "bbox_pred.bias"])
    assert abs(head.conv.weight.detach().std().item() - 0.01) < 1e-3  # 36864 draws: std within 1e-3 of 0.01
    assert float(head.cls_logits.bias.detach().abs().max()) == 0.0


def _brute_force_proposals(objectness, deltas, anchors, image_size, cfg, training):
    """Per level: sort, take top k, decode, clip, filter; then greedy NMS level by level, merge."""
    coder = BoxCoder(cfg.box_weights)
    candidates = []
    for level, (o, d, a) in enumerate(zip(objectness, deltas, anchors)):
        order = sorted(range(o.shape[0]), key=lambda i: -float(o[i]))[: cfg.pre_nms_top_n(training)]
        for i in order:
            box = coder.decode(d[i:i + 1], a[i:i + 1])[0]
            box[0::2] = box[0::2].clamp(0, image_size[1])
            box[1::2] = box[1::2].clamp(0, image_size[0])
            score = float(torch.sigmoid(o[i]))
            if box[2] - box[0] >= cfg.min_size and box[3] - box[1] >= cfg.min_size and score >= cfg.score_thresh:
                candidates.append((score, level, box))
    kept = []
    for level in range(len(objectness)):
        mine = sorted([c for c in candidates if c[1] == level], key=lambda c: -c[0])
        level_kept = []
        for score, _, box in mine:
            if all(float(box_iou(box[None], k[None])) <= cfg.nms_thresh for _, k in level_kept):
                level_kept.append((score, box))
        kept += level_kept
    kept = sorted(kept, key=lambda c: -c[0])[: cfg.post_nms_top_n(training)]
    return torch.stack([b for _, b in kept]), torch.tensor([s for s, _ in kept])


def test_select_proposals_keeps_top_k_per_level_then_nms_against_brute_force():
    generator = torch.Generator().manual_seed(0)
    anchor_gen = AnchorGenerator([(16,), (32,)], [(0.5, 1.0, 2.0)] * 2, [8, 16])
    anchors = anchor_gen([(6, 6), (3, 3)])  # 108 and 27 anchors on a 48 x 48 image
    objectness = [torch.randn(1, a.shape[0], generator=generator) for a in anchors]
    deltas = [0.3 * torch.randn(1, a.shape[0], 4, generator=generator) for a in anchors]
    cfg = RPNConfig(pre_nms_top_n_test=20, post_nms_top_n_test=25)
    boxes, scores = select_proposals(objectness, deltas, anchors, [(48, 40)], cfg, training=False)
    want_boxes, want_scores = _brute_force_proposals([o[0] for o in objectness], [d[0] for d in deltas],
                                                     anchors, (48, 40), cfg, training=False)
    assert boxes[0].shape == want_boxes.shape and boxes[0].shape[0] == 25
    torch.testing.assert_close(boxes[0], want_boxes)
    torch.testing.assert_close(scores[0], want_scores)
    # a second level-wise fact: before the cut, NMS removed something but left no pair > 0.7 in a level
    all_boxes, _ = select_proposals(objectness, deltas, anchors, [(48, 40)],
                                    RPNConfig(pre_nms_top_n_test=20, post_nms_top_n_test=1000), training=False)
    assert 25 < all_boxes[0].shape[0] < 40


def test_select_proposals_drop_small_and_low_scoring_boxes_image_by_image_against_brute_force():
    # two images of different sizes: clipping to the smaller one makes tiny boxes at its edge
    generator = torch.Generator().manual_seed(1)
    anchor_gen = AnchorGenerator([(16,), (32,)], [(0.5, 1.0, 2.0)] * 2, [8, 16])
    anchors = anchor_gen([(6, 6), (3, 3)])
    objectness = [torch.randn(2, a.shape[0], generator=generator) for a in anchors]
    deltas = [0.3 * torch.randn(2, a.shape[0], 4, generator=generator) for a in anchors]
    cfg = RPNConfig(pre_nms_top_n_test=40, post_nms_top_n_test=1000, min_size=6.0, score_thresh=0.4)
    sizes = [(48, 40), (20, 14)]
    boxes, scores = select_proposals(objectness, deltas, anchors, sizes, cfg, training=False)
    dropped = 0
    for i, size in enumerate(sizes):
        want_boxes, want_scores = _brute_force_proposals([o[i] for o in objectness], [d[i] for d in deltas],
                                                         anchors, size, cfg, training=False)
        torch.testing.assert_close(boxes[i], want_boxes)
        torch.testing.assert_close(scores[i], want_scores)
        unfiltered = _brute_force_proposals([o[i] for o in objectness], [d[i] for d in deltas], anchors, size,
                                            RPNConfig(pre_nms_top_n_test=40, post_nms_top_n_test=1000), False)
        dropped += unfiltered[0].shape[0] - want_boxes.shape[0]
    assert boxes[1].shape[0] < boxes[0].shape[0] and dropped > 10  # the filters did bite
    assert bool((scores[0] >= 0.4).all()) and bool((scores[1] >= 0.4).all())


def test_select_proposals_nms_removes_duplicates_of_the_best_anchor():
    # three identical anchors, zero deltas: only the highest-scoring survives NMS
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3 + [[20.0, 20.0, 30.0, 30.0]])]
    objectness = [torch.tensor([[0.1, 0.9, 0.5, -3.0]])]
    boxes, scores = select_proposals(objectness, [torch.zeros(1, 4, 4)], anchors, [(40, 40)], RPNConfig(), False)
    torch.testing.assert_close(boxes[0], torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]))
    torch.testing.assert_close(scores[0], torch.sigmoid(torch.tensor([0.9, -3.0])))
    assert torch.equal(nms(boxes[0], scores[0], 0.7), torch.tensor([0, 1]))


def _tiny_rpn(cfg=None):
    torch.manual_seed(0)
    anchor_gen = fpn_anchor_generator(sizes=(16, 32), strides=(4, 8))
    return RPN(cfg or RPNConfig(pre_nms_top_n_train=50, post_nms_top_n_train=40), anchor_gen, RPNHead(8, 3))


def test_rpn_losses_reach_the_head_but_proposals_are_detached():
    rpn = _tiny_rpn().train()
    features = [torch.randn(2, 8, 16, 16, requires_grad=True), torch.randn(2, 8, 8, 8, requires_grad=True)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0]])}, {"boxes": torch.zeros(0, 4)}]
    proposals, losses = rpn(features, [(64, 64), (60, 50)], targets, generator=torch.Generator().manual_seed(0))
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg"}
    assert [p.shape[1] for p in proposals] == [4, 4] and all(p.shape[0] <= 40 for p in proposals)
    assert not any(p.requires_grad for p in proposals)
    assert float(proposals[1][:, 2].max()) <= 50 and float(proposals[1][:, 3].max()) <= 60  # clipped to (h, w)
    (losses["loss_objectness"] + losses["loss_rpn_box_reg"]).backward()
    for name, param in rpn.head.named_parameters():
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, name
    with pytest.raises(ValueError, match="targets"):
        rpn(features, [(64, 64), (60, 50)])


def test_rpn_matches_torchvision_proposals_and_losses():
    pytest.importorskip("torchvision")
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.rpn import RegionProposalNetwork
    from torchvision.models.detection.rpn import RPNHead as TVRPNHead

    torch.manual_seed(0)
    sizes, ratios = ((16,), (32,)), ((0.5, 1.0, 2.0),) * 2
    tv_head = TVRPNHead(8, 3)
    for p in tv_head.parameters():  # weights large enough that proposals differ from anchors
        torch.nn.init.normal_(p, std=0.2)
    # a budget larger than the anchors: every candidate is sampled, so the losses are comparable
    tv_rpn = RegionProposalNetwork(TVAnchorGenerator(sizes, ratios), tv_head, 0.7, 0.3, 100000, 0.5,
                                   dict(training=60, testing=30), dict(training=50, testing=20), 0.7)
    cfg = RPNConfig(batch_size_per_image=100000, pre_nms_top_n_train=60, pre_nms_top_n_test=30,
                    post_nms_top_n_train=50, post_nms_top_n_test=20)
    ours = RPN(cfg, AnchorGenerator(sizes, ratios, (4, 8), offset=0.0, round_cell=True), RPNHead(8, 3))
    state = rpn_state_dict_from_torchvision({"rpn." + k: v for k, v in tv_rpn.state_dict().items()})
    ours.load_state_dict(state)

    features = {"p2": torch.randn(2, 8, 16, 16), "p3": torch.randn(2, 8, 8, 8)}
    images = ImageList(torch.zeros(2, 3, 64, 64), [(64, 64), (56, 48)])
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0], [30.0, 30.0, 60.0, 62.0]])},
               {"boxes": torch.tensor([[10.0, 2.0, 40.0, 50.0]])}]
    for training in (False, True):
        tv_rpn.train(training)
        ours.train(training)
        tv_boxes, tv_losses = tv_rpn(images, features, targets if training else None)
        our_boxes, our_losses = ours(list(features.values()), images.image_sizes, targets if training else None)
        for theirs, mine in zip(tv_boxes, our_boxes):
            torch.testing.assert_close(mine, theirs)
        if training:
            torch.testing.assert_close(our_losses["loss_objectness"], tv_losses["loss_objectness"])
            torch.testing.assert_close(our_losses["loss_rpn_box_reg"], tv_losses["loss_rpn_box_reg"])


def test_state_dict_map_accepts_old_torchvision_names():
    weights = {"rpn.head.conv.weight": torch.zeros(8, 8, 3, 3), "rpn.head.conv.bias": torch.zeros(8),
               "rpn.head.cls_logits.weight": torch.zeros(3, 8, 1, 1), "rpn.head.cls_logits.bias": torch.zeros(3),
               "rpn.head.bbox_pred.weight": torch.zeros(12, 8, 1, 1), "rpn.head.bbox_pred.bias": torch.zeros(12),
               "backbone.body.conv1.weight": torch.zeros(1)}
    mapped = rpn_state_dict_from_torchvision(weights)
    _tiny_rpn().load_state_dict(mapped)  # strict: every key present, none extra
    with pytest.raises(ValueError, match="rpn.head."):
        rpn_state_dict_from_torchvision({"backbone.x": torch.zeros(1)})


def test_rpn_alone_overfits_one_image_on_fixed_features():
    torch.manual_seed(0)
    cfg = RPNConfig(pre_nms_top_n_train=200, post_nms_top_n_train=100, pre_nms_top_n_test=200, post_nms_top_n_test=10)
    rpn = RPN(cfg, fpn_anchor_generator(sizes=(16, 32), strides=(4, 8)), RPNHead(32, 3)).train()
    features = [torch.randn(1, 32, 16, 16), torch.randn(1, 32, 8, 8)]
    gt = torch.tensor([[6.0, 8.0, 26.0, 22.0], [34.0, 30.0, 60.0, 58.0]])
    optimizer = torch.optim.Adam(rpn.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    history = []
    for _ in range(200):
        _, losses = rpn(features, [(64, 64)], [{"boxes": gt}], generator=generator)
        total = losses["loss_objectness"] + losses["loss_rpn_box_reg"]
        history.append(total.item())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert history[-1] < 0.05 * history[0]
    (proposals,), _ = rpn.eval()(features, [(64, 64)])
    best_iou = box_iou(gt, proposals[:2]).max(dim=1).values  # the two top proposals are the objects
    assert bool((best_iou > 0.9).all()), best_iou


@pytest.mark.parametrize("pairs_per_chunk", [None, 4 * 384, 1])  # the whole batch; 1 image; 1 image below the budget
def test_rpn_targets_for_a_padded_batch_equal_each_image_alone(monkeypatch, pairs_per_chunk):
    import mrcnn_edu.rpn as rpn_module
    from mrcnn_edu.boxes import pad_boxes
    if pairs_per_chunk is not None:  # a crowded image pads every other to its G: images are matched a few at a time
        monkeypatch.setattr(rpn_module, "RPN_PAIRS_PER_CHUNK", pairs_per_chunk)
    generator = torch.Generator().manual_seed(0)
    anchors = AnchorGenerator([(8, 16)], [(0.5, 1.0, 2.0)], [4])([(8, 8)])[0]  # (384, 4): 8 x 8 cells, 6 each
    gts = []
    for num in (2, 0, 4):
        xy = torch.rand(num, 2, generator=generator) * 20
        gts.append(torch.cat([xy, xy + 6 + torch.rand(num, 2, generator=generator) * 20], dim=1))
    padded = pad_boxes(gts)
    assert padded.shape == (3, 4, 4) and bool((padded[1] == 0).all())
    labels, targets = rpn_targets(anchors, padded, RPN_MATCHER, BoxCoder())
    assert labels.shape == (3, len(anchors)) and targets.shape == (3, len(anchors), 4)
    for i, gt in enumerate(gts):
        want_labels, want_targets = rpn_targets(anchors, gt, RPN_MATCHER, BoxCoder())
        assert torch.equal(labels[i], want_labels), i
        torch.testing.assert_close(targets[i], want_targets, rtol=0, atol=0)
    assert (labels == 1).sum() > 0 and (labels[1] == 0).all()
