"""The model's mask and keypoint losses as §3 and §5 define them, on the RoIs a real training
step sampled; and the keypoint branch learning where keypoints are.

One training forward pass of a miniature Mask R-CNN is watched by spies: the RoI sampler (what
it was given and what it chose), the backbone (the feature maps) and the mask / keypoint
poolers and heads (their inputs and outputs). From those records the two losses are rebuilt,
once with the package's lower-level functions and once by brute force (RoIAlign crops and
one-hot cells in plain Python), and must equal what the model returned. The mask and keypoint
heads must see the *sampled proposals*, not the ground-truth boxes they matched: a swap, or
matched indices out of order, changes the numbers.
"""
import math

import pytest
import torch

from mrcnn_edu.config import mini_c4, mini_fpn
from mrcnn_edu.model import MaskRCNN
from mrcnn_edu.roi_heads import box_head
from mrcnn_edu.roi_heads.box_head import PositiveRoIs, split_rows
from mrcnn_edu.roi_heads.keypoint_head import keypoint_loss, keypoint_targets
from mrcnn_edu.roi_heads.mask_head import mask_loss, mask_targets
from _brute import bilinear  # noqa: E402

SIZE = 64  # the mini presets' train size for these images: the model resizes by s = 1
NUM_KEYPOINTS = 5


def _ellipse_masks(boxes, size=SIZE):
    """Each box's inscribed ellipse: a mask that is not its box, so that the crop matters."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    masks = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        masks[k] = (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1).to(torch.uint8)
    return masks


def _keypoints(boxes, generator, margin=0.0):
    """NUM_KEYPOINTS per box, uniform inside it (``margin`` px in from its sides); keypoint 3 unlabelled."""
    inner = boxes + torch.tensor([margin, margin, -margin, -margin])
    rel = torch.rand(len(boxes), NUM_KEYPOINTS, 2, generator=generator)
    xy = inner[:, None, :2] + rel * (inner[:, None, 2:] - inner[:, None, :2])
    visibility = torch.tensor([2.0, 2.0, 1.0, 0.0, 2.0]).expand(len(boxes), NUM_KEYPOINTS)
    return torch.cat([xy, visibility[..., None]], dim=-1)  # (G, Kp, 3)


def _batch():
    """Two 64 px images: two objects of different classes in the first, one in the second
    whose keypoints are all unlabelled (as a dataset's non-person objects: (0, 0, 0) each)."""
    g = torch.Generator().manual_seed(0)
    boxes = [torch.tensor([[6.3, 8.1, 38.7, 50.2], [30.2, 20.6, 60.9, 58.4]]), torch.tensor([[12.5, 4.2, 52.8, 44.9]])]
    labels = [torch.tensor([2, 3]), torch.tensor([1])]
    targets = [{"boxes": b, "labels": l, "masks": _ellipse_masks(b), "keypoints": _keypoints(b, g)}
               for b, l in zip(boxes, labels)]
    targets[1]["keypoints"].zero_()
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in boxes]
    return images, targets


def _spied_training_step(model, images, targets):
    """One training forward pass; returns its losses and what the spies recorded."""
    seen = {}
    real_sample = box_head.sample_rois_padded

    def sampler_spy(proposals, targets, *args, **kwargs):
        # the targets after the model's resize: the very dicts the mask / keypoint losses read
        seen["proposals"], seen["targets"] = [p.detach().clone() for p in proposals], targets
        seen["sampled"] = real_sample(proposals, targets, *args, **kwargs)
        return seen["sampled"]

    def record(name):
        def hook(module, args, out):
            seen[name] = (args, out)
        return hook

    hooks = [model.backbone.register_forward_hook(record("backbone"))]
    for name in ("mask_pooler", "mask_head", "keypoint_pooler", "keypoint_head"):
        if getattr(model, name) is not None:
            hooks.append(getattr(model, name).register_forward_hook(record(name)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(box_head, "sample_rois_padded", sampler_spy)
        try:
            losses = model(images, targets)
        finally:
            for hook in hooks:
                hook.remove()
    padded, counts = seen["sampled"]
    num_sampled, num_pos = counts.tolist()
    rois, labels, _, matched = split_rows(padded, num_sampled)
    seen["positives"] = PositiveRoIs(*split_rows((rois, labels, matched), num_pos))  # positives come first
    feature_maps = seen["backbone"][1]
    seen["features"] = [feature_maps[n] for n in model.backbone.feature_names][: model.num_roi_levels]
    return {k: v.detach() for k, v in losses.items()}, seen


@pytest.fixture(scope="module")
def fpn_step():
    torch.manual_seed(0)  # the model's initialisation and the RoI sampler's draws
    model = MaskRCNN(mini_fpn(num_classes=3, image_size=SIZE, keypoints=NUM_KEYPOINTS)).train()
    images, targets = _batch()
    losses, seen = _spied_training_step(model, images, targets)
    return model, targets, losses, seen


def _iou(a, b):
    """IoU of two xyxy boxes given as lists, in plain Python."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_positives_are_sampled_proposals_paired_with_their_best_matching_gt(fpn_step):
    _, original_targets, _, seen = fpn_step
    positives, targets = seen["positives"], seen["targets"]
    num_not_gt, objects_hit = 0, []
    for i, (rois, labels, matched) in enumerate(zip(positives.rois, positives.labels, positives.matched_gt_idx)):
        gt = targets[i]["boxes"]
        # s = 1 (up to the resize's 1e-7 nudge): the model's targets are the ones we gave
        torch.testing.assert_close(gt, original_targets[i]["boxes"], rtol=1e-6, atol=0)
        assert torch.equal(targets[i]["masks"], original_targets[i]["masks"])
        candidates = torch.cat([seen["proposals"][i], gt]).tolist()
        assert len(rois) > 0
        for roi, label, g in zip(rois.tolist(), labels.tolist(), matched.tolist()):
            assert roi in candidates  # a proposal or a gt box, unchanged
            ious = [_iou(roi, box) for box in gt.tolist()]
            assert g == max(range(len(ious)), key=ious.__getitem__) and ious[g] >= 0.5
            assert label == int(targets[i]["labels"][g])
            num_not_gt += roi != gt[g].tolist()
        objects_hit.append(len(set(matched.tolist())))
    # what makes the wiring checks below bite: RoIs that are not their gt box (so pooling or
    # cropping with the gt box would differ), and an image whose positives match both its objects
    assert num_not_gt >= 10 and objects_hit[0] == 2, (num_not_gt, objects_hit)
    # the mask and keypoint branches pool exactly the positives, image by image
    for name in ("mask_pooler", "keypoint_pooler"):
        pooled_boxes = seen[name][0][1]
        assert len(pooled_boxes) == len(positives.rois)
        assert all(torch.equal(b, r) for b, r in zip(pooled_boxes, positives.rois)), name


# ---------------------------------------------------------------- the mask loss (§3)
def _brute_force_mask_target(mask, box, m):
    """mask_targets' documented definition, one cell at a time: RoIAlign (aligned, average,
    adaptive ceil(bin) samples per bin) of the binary mask over the box's m x m grid, >= 0.5.
    Returns the m x m target and the soft values' smallest distance to the 0.5 threshold."""
    image = mask.double().tolist()
    x1, y1, x2, y2 = (v - 0.5 for v in box.double().tolist())  # aligned: pixel centres at integers
    bin_w, bin_h = (x2 - x1) / m, (y2 - y1) / m
    grid_w, grid_h = math.ceil(bin_w), math.ceil(bin_h)
    target, closest = torch.zeros(m, m), 1.0
    for i in range(m):
        for j in range(m):
            soft = sum(bilinear(image, y1 + i * bin_h + (a + 0.5) * bin_h / grid_h,
                                 x1 + j * bin_w + (b + 0.5) * bin_w / grid_w)
                       for a in range(grid_h) for b in range(grid_w)) / (grid_h * grid_w)
            target[i, j] = float(soft >= 0.5)
            closest = min(closest, abs(soft - 0.5))
    return target, closest


def test_mask_loss_is_bce_of_the_positives_pooled_logits_against_gt_masks_cropped_by_the_proposals(fpn_step):
    model, _, losses, seen = fpn_step
    positives, targets, features = seen["positives"], seen["targets"], seen["features"]
    m = model.cfg.mask_head.resolution
    assert m == 28
    with torch.no_grad():  # the head on the positives' pooled features, by us: the logits it gave
        pooled = model.mask_pooler(features, positives.rois)
        logits = model.mask_head(pooled)
    torch.testing.assert_close(seen["mask_head"][0][0], pooled, rtol=0, atol=0)
    torch.testing.assert_close(seen["mask_head"][1].detach(), logits, rtol=0, atol=0)
    labels = torch.cat(positives.labels)

    # the package's own functions, one image at a time (the model batches them)
    gt = torch.cat([mask_targets(t["masks"], idx, rois, m)
                    for t, idx, rois in zip(targets, positives.matched_gt_idx, positives.rois)])
    torch.testing.assert_close(losses["loss_mask"], mask_loss(logits, labels, gt), rtol=0, atol=1e-6)

    # brute force: every target cropped cell by cell, the BCE of the label's channel by its formula
    brute, closest = [], 1.0
    for t, idx, rois in zip(targets, positives.matched_gt_idx, positives.rois):
        for g, box in zip(idx.tolist(), rois):
            target, gap = _brute_force_mask_target(t["masks"][g], box, m)
            brute.append(target)
            closest = min(closest, gap)
    brute = torch.stack(brute)
    assert closest > 1e-4  # no soft value at the threshold: the comparison below is exact
    assert torch.equal(gt, brute)
    assert 0.2 < float(brute.mean()) < 0.9  # ellipses cropped: both classes of pixel are there
    z = logits[torch.arange(len(labels)), labels - 1].double()  # (P, m, m): channel k - 1 for class k
    by_hand = -(brute * torch.nn.functional.logsigmoid(z) + (1 - brute) * torch.nn.functional.logsigmoid(-z)).mean()
    torch.testing.assert_close(losses["loss_mask"].double(), by_hand, rtol=0, atol=1e-6)


def test_c4_mask_loss_reads_res5_of_the_positive_proposals():
    # Figure 4 left: the C4 mask head deconvolves the box head's res5 output of the positives,
    # 14 x 14 targets cropped with the same proposals
    torch.manual_seed(0)
    model = MaskRCNN(mini_c4(num_classes=3, image_size=SIZE, width=8)).train()
    images, targets = _batch()
    for t in targets:
        del t["keypoints"]
    losses, seen = _spied_training_step(model, images, targets)
    positives = seen["positives"]
    assert sum(len(r) for r in positives.rois) > 0
    with torch.no_grad():
        logits = model.mask_head(model.box_branch.res5_features(seen["features"], positives.rois))
    torch.testing.assert_close(seen["mask_head"][1].detach(), logits, rtol=1e-6, atol=1e-6)
    gt = torch.cat([mask_targets(t["masks"], idx, rois, 14)
                    for t, idx, rois in zip(seen["targets"], positives.matched_gt_idx, positives.rois)])
    want = mask_loss(logits, torch.cat(positives.labels), gt)
    torch.testing.assert_close(losses["loss_mask"], want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the keypoint loss (§5)
def test_keypoint_loss_is_the_m2_way_cross_entropy_at_the_matched_gt_keypoints_in_each_proposal(fpn_step):
    model, _, losses, seen = fpn_step
    positives, targets, features = seen["positives"], seen["targets"], seen["features"]
    m = model.cfg.keypoint_head.resolution
    assert m == 56
    with torch.no_grad():
        pooled = model.keypoint_pooler(features, positives.rois)
        logits = model.keypoint_head(pooled)  # (P, Kp, m, m)
    torch.testing.assert_close(seen["keypoint_head"][0][0], pooled, rtol=0, atol=0)
    torch.testing.assert_close(seen["keypoint_head"][1].detach(), logits, rtol=0, atol=0)

    # the package's functions: each positive's matched gt keypoints, encoded in its own box
    keypoints = torch.cat([t["keypoints"][idx] for t, idx in zip(targets, positives.matched_gt_idx)])
    cells, valid = keypoint_targets(keypoints, torch.cat(positives.rois), m)
    torch.testing.assert_close(losses["loss_keypoint"], keypoint_loss(logits, cells, valid), rtol=0, atol=1e-6)

    # brute force: §5's one-hot target cell of every labelled keypoint inside its RoI, found by
    # hand, and the cross-entropy of the m²-way softmax there, averaged over those keypoints
    terms, outside = [], 0
    for t, idx, rois, roi_logits in zip(targets, positives.matched_gt_idx, positives.rois,
                                        logits.split([len(r) for r in positives.rois])):
        for g, (x1, y1, x2, y2), heatmaps in zip(idx.tolist(), rois.tolist(), roi_logits):
            for k, (x, y, v) in enumerate(t["keypoints"][g].tolist()):
                if v == 0:
                    continue
                col = m - 1 if x == x2 else math.floor((x - x1) / (x2 - x1) * m)
                row = m - 1 if y == y2 else math.floor((y - y1) / (y2 - y1) * m)
                if not (0 <= col < m and 0 <= row < m):
                    outside += 1  # labelled, but this proposal does not hold it: no target
                    continue
                heatmap = heatmaps[k].double()
                terms.append(float(heatmap.logsumexp(dim=(0, 1)) - heatmap[row, col]))
    assert outside > 0 and len(terms) > 20  # both cases occur
    assert int(valid.sum()) == len(terms)
    assert not valid[-len(positives.rois[1]):].any()  # image 1's object: its RoIs add nothing
    assert float(losses["loss_keypoint"]) == pytest.approx(sum(terms) / len(terms), rel=0, abs=1e-5)


# ---------------------------------------------------------------- the keypoint branch learns
def test_keypoint_branch_alone_learns_to_place_keypoints_within_a_pixel():
    # Fixed random feature maps, three people, twelve RoIs (each person's box and three
    # proposals with every side moved 2-4 px): only the keypoint head trains, through the
    # model's own keypoint_loss, and the model's own inference decodes. Every RoI of a person
    # must put its labelled keypoints on the same image pixels, which needs each proposal's
    # targets encoded in that proposal's frame (in the gt box's they would be 2-4 px off).
    # Measured over 6 seeds: within 1 px for 0 % of them untrained, 71-94 % after 10 steps,
    # 98-100 % after 40 (largest error 1.0 px, median 0.3-0.5 px); 2-4 s on one thread.
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cfg = mini_fpn(num_classes=1, image_size=SIZE, keypoints=NUM_KEYPOINTS)
    model = MaskRCNN(cfg).train()
    channels = cfg.backbone.fpn_channels
    features = [torch.randn(1, channels, SIZE // s, SIZE // s, generator=g) for s in (4, 8, 16, 32)]  # P2..P5
    gt_boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [24.0, 2.0, 60.0, 36.0], [18.0, 26.0, 54.0, 62.0]])
    target = {"boxes": gt_boxes, "labels": torch.ones(3, dtype=torch.int64),
              "keypoints": _keypoints(gt_boxes, g, margin=5.0)}  # 5 px in: every shifted RoI holds them
    magnitude = torch.randint(2, 5, (3, 4), generator=g).float()
    sign = torch.randint(0, 2, (3, 4), generator=g) * 2 - 1
    shifts = torch.cat([torch.zeros(1, 4), magnitude * sign])  # (4, 4): the gt box itself, then 3 shifted
    rois = (gt_boxes[None] + shifts[:, None]).reshape(-1, 4)  # (12, 4)
    matched = torch.arange(3).repeat(4)
    positives = PositiveRoIs([rois], [torch.ones(12, dtype=torch.int64)], [matched])
    optimizer = torch.optim.Adam(model.keypoint_head.parameters(), lr=1e-3)
    for _ in range(40):
        loss = model.keypoint_loss(features, positives, [target])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    detections = [{"boxes": rois}]
    with torch.no_grad():
        model.eval().predict_keypoints(features, detections)
    found = detections[0]["keypoints"][..., :2]  # (12, Kp, 2) image pixels
    truth = target["keypoints"][matched]  # (12, Kp, 3)
    labelled = truth[..., 2] > 0
    assert int(labelled.sum()) == 12 * (NUM_KEYPOINTS - 1)
    error = (found - truth[..., :2]).abs().amax(dim=-1)[labelled]  # px, the worse axis
    assert float((error <= 1.0).float().mean()) >= 0.9, sorted(error.tolist())
