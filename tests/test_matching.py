"""matching.py: the Matcher on hand-built IoUs and the balanced sampler's budget."""
import collections
import pytest
import torch

from mrcnn_edu.boxes import box_iou
from mrcnn_edu.matching import BACKGROUND, IGNORED, BalancedSampler, Matcher

GT = torch.tensor([[0.0, 0.0, 10.0, 10.0]])  # area 100


def test_anchor_is_positive_at_iou_07_negative_below_03_ignored_between():
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],  # IoU 100/100 = 1.0 -> positive
        [0.0, 0.0, 10.0, 7.0],  # IoU 70/100 = 0.7 -> positive (>= 0.7)
        [0.0, 0.0, 10.0, 5.0],  # IoU 50/100 = 0.5 -> ignored
        [0.0, 0.0, 10.0, 3.0],  # IoU 30/100 = 0.3 -> ignored (not < 0.3)
        [0.0, 0.0, 10.0, 2.0],  # IoU 20/100 = 0.2 -> negative
        [20.0, 20.0, 30.0, 30.0],  # IoU 0 -> negative
    ])
    iou = box_iou(GT, anchors)
    torch.testing.assert_close(iou, torch.tensor([[1.0, 0.7, 0.5, 0.3, 0.2, 0.0]]))
    matched = Matcher(0.7, 0.3, allow_low_quality_matches=False)(iou)
    assert matched.dtype == torch.int64
    assert matched.tolist() == [0, 0, IGNORED, IGNORED, BACKGROUND, BACKGROUND]


def test_each_ground_truth_gets_its_best_anchors_including_ties():
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 5.0],  # IoU 50/100 = 0.5, best, tied
        [5.0, 0.0, 15.0, 5.0],  # inter 25, union 50+100-25 = 125 -> IoU 0.2
        [0.0, 5.0, 10.0, 10.0],  # IoU 0.5, tied best
        [0.0, 0.0, 10.0, 4.0],  # IoU 0.4, ignored
    ])
    iou = box_iou(GT, anchors)
    torch.testing.assert_close(iou, torch.tensor([[0.5, 0.2, 0.5, 0.4]]))
    without = Matcher(0.7, 0.3, allow_low_quality_matches=False)(iou)
    assert without.tolist() == [IGNORED, BACKGROUND, IGNORED, IGNORED]
    with_low_quality = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    assert with_low_quality.tolist() == [0, BACKGROUND, 0, IGNORED]


def test_low_quality_match_takes_the_anchors_own_best_ground_truth():
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 9.0]])  # areas 100, 90
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 8.0],  # IoU gt0 80/100 = 0.8, gt1 80/90 = 0.889: best for both
        [0.0, 0.0, 10.0, 4.0],  # IoU gt0 0.4, gt1 40/90 = 0.444
    ])
    iou = box_iou(gts, anchors)
    torch.testing.assert_close(iou, torch.tensor([[0.8, 0.4], [80 / 90, 40 / 90]]))
    matched = Matcher(0.9, 0.3, allow_low_quality_matches=True)(iou)
    assert matched.tolist() == [1, IGNORED]  # anchor 0 goes to gt1, its higher IoU


def test_ground_truth_overlapping_no_anchor_makes_no_positive():
    anchors = torch.tensor([[20.0, 20.0, 30.0, 30.0], [40.0, 40.0, 50.0, 50.0]])  # IoU 0 with GT
    matched = Matcher(0.7, 0.3, allow_low_quality_matches=True)(box_iou(GT, anchors))
    assert matched.tolist() == [BACKGROUND, BACKGROUND]


def test_image_without_objects_is_all_background():
    matched = Matcher(0.7, 0.3, allow_low_quality_matches=True)(torch.zeros(0, 5))
    assert matched.tolist() == [BACKGROUND] * 5
    assert Matcher(0.5, 0.5)(torch.zeros(3, 0)).shape == (0,)
    # no boxes to match, also with low-quality matches and for a batch
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(torch.zeros(3, 0)).shape == (0,)
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(torch.zeros(2, 3, 0)).shape == (2, 0)


def test_matcher_rejects_bad_thresholds_and_shapes():
    with pytest.raises(ValueError, match="low_threshold"):
        Matcher(0.3, 0.7)
    with pytest.raises(ValueError, match="iou"):
        Matcher(0.7, 0.3)(torch.zeros(4))


def test_matcher_agrees_with_torchvision():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.detection._utils import Matcher as TorchvisionMatcher

    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        xy = torch.rand(40, 2, generator=generator) * 40
        boxes = torch.cat([xy, xy + 5 + torch.rand(40, 2, generator=generator) * 30], dim=1)
        gts, anchors = boxes[:4], boxes[4:]
        # every gt overlaps some anchor here, where both rules agree
        anchors = torch.cat([anchors, gts + 1.0])
        iou = box_iou(gts, anchors)
        for high, low, low_quality in [(0.7, 0.3, True), (0.5, 0.5, False), (0.6, 0.4, False)]:
            ours = Matcher(high, low, low_quality)(iou)
            theirs = TorchvisionMatcher(high, low, low_quality)(iou)
            assert torch.equal(ours, theirs)


def _matched(num_pos: int, num_neg: int, num_ignored: int) -> torch.Tensor:
    return torch.cat([torch.zeros(num_pos, dtype=torch.int64), torch.full((num_neg,), BACKGROUND),
                      torch.full((num_ignored,), IGNORED)])


@pytest.mark.parametrize("num_pos,num_neg,want_pos,want_neg", [
    (10, 100, 8, 8),  # plenty of both: half and half
    (3, 100, 3, 13),  # few positives: negatives fill the batch
    (2, 5, 2, 5),  # few of both: a smaller batch
    (100, 0, 8, 0),  # positives never exceed their fraction
])
def test_sampler_takes_at_most_half_positives_and_fills_with_negatives(num_pos, num_neg, want_pos, want_neg):
    matched = _matched(num_pos, num_neg, 7)
    (pos,), (neg,) = BalancedSampler(16, 0.5)([matched], generator=torch.Generator().manual_seed(1))
    assert int(pos.sum()) == want_pos and int(neg.sum()) == want_neg
    assert bool((matched[pos] >= 0).all()) and bool((matched[neg] == BACKGROUND).all())
    assert not bool((pos & neg).any())


def test_sampler_keeps_one_to_three_for_rois():
    (pos,), (neg,) = BalancedSampler(512, 0.25)([_matched(1000, 1000, 0)])
    assert (int(pos.sum()), int(neg.sum())) == (128, 384)


def test_sampler_is_random_and_reproducible_with_a_generator():
    matched = _matched(50, 50, 0)
    sampler = BalancedSampler(10, 0.5)
    first = sampler([matched], generator=torch.Generator().manual_seed(3))
    again = sampler([matched], generator=torch.Generator().manual_seed(3))
    assert torch.equal(first[0][0], again[0][0]) and torch.equal(first[1][0], again[1][0])
    generator = torch.Generator().manual_seed(4)
    ever_chosen = torch.zeros(100, dtype=torch.bool)
    for _ in range(100):
        (pos,), (neg,) = sampler([matched], generator=generator)
        ever_chosen |= pos | neg
    assert bool(ever_chosen.all())  # not a fixed subset: every candidate gets drawn


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size_per_image"):
        BalancedSampler(0, 0.5)
    with pytest.raises(ValueError, match="positive_fraction"):
        BalancedSampler(10, 1.5)


def _random_boxes(n, generator, size=100.0):
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("low_quality", [False, True])
def test_matcher_on_a_padded_batch_matches_each_image_alone(low_quality):
    # images with 3, 0 and 5 ground-truth boxes, padded to 5 with empty boxes
    generator = torch.Generator().manual_seed(0)
    gts = [_random_boxes(g, generator) for g in (3, 0, 5)]
    anchors = [_random_boxes(200, generator) for _ in gts]
    padded = torch.zeros(3, 5, 4)
    for i, gt in enumerate(gts):
        padded[i, :len(gt)] = gt
    matcher = Matcher(0.5, 0.2, allow_low_quality_matches=low_quality)
    batched = matcher(box_iou(padded, torch.stack(anchors)))
    assert batched.shape == (3, 200)
    for i, (gt, image_anchors) in enumerate(zip(gts, anchors)):
        alone = matcher(box_iou(gt, image_anchors))
        assert torch.equal(batched[i], alone), i
        assert bool((alone >= 0).any()) or len(gt) == 0  # the case exercises real matches


def test_sampler_draws_every_subset_uniformly():
    # 6 positives among 20, 2 to take: each positive should be taken 1/3 of the time; over
    # 3000 draws the count is Binomial(3000, 1/3): mean 1000, sd 25.8 -> allow 5 sd
    matched = _matched(6, 14, 0)
    sampler = BalancedSampler(4, 0.5)
    generator = torch.Generator().manual_seed(0)
    pos_counts = torch.zeros(20)
    neg_counts = torch.zeros(20)
    pairs = collections.Counter()
    for _ in range(3000):
        (pos,), (neg,) = sampler([matched], generator=generator)
        pos_counts += pos
        neg_counts += neg
        pairs[tuple(pos.nonzero().flatten().tolist())] += 1
    assert bool((pos_counts[matched >= 0] - 1000).abs().max() < 5 * 25.8), pos_counts
    # equal marginals do not make a uniform draw (always taking neighbours 0-1, 2-3, 4-5 has
    # them too): each of the C(6, 2) = 15 pairs must come 3000 / 15 = 200 times, sd 13.7
    assert len(pairs) == 15 and all(len(pair) == 2 for pair in pairs), pairs
    assert max(abs(count - 200) for count in pairs.values()) < 5 * 13.7, pairs
    # 14 negatives, 2 taken: Binomial(3000, 1/7): mean 428.6, sd 19.2
    assert bool((neg_counts[matched == BACKGROUND] - 3000 / 7).abs().max() < 5 * 19.2), neg_counts
    assert pos_counts[matched < 0].sum() == 0 and neg_counts[matched >= 0].sum() == 0


def test_sampler_on_a_batch_keeps_each_rows_budget():
    # three images: plenty of both, few positives, few of both -> as the one-image cases above
    rows = [_matched(10, 100, 7), _matched(3, 100, 14), _matched(2, 5, 110)]
    positive = torch.stack([m >= 0 for m in rows])
    negative = torch.stack([m == BACKGROUND for m in rows])
    pos, neg = BalancedSampler(16, 0.5).sample(positive, negative, torch.Generator().manual_seed(0))
    assert pos.shape == neg.shape == (3, 117)
    assert pos.sum(dim=1).tolist() == [8, 3, 2] and neg.sum(dim=1).tolist() == [8, 13, 5]
    assert not bool((pos & ~positive).any()) and not bool((neg & ~negative).any())
