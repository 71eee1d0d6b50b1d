"""boxes.py against brute-force Python references and torchvision.ops (where importable)."""
import math
import random

import pytest
import torch

from mrcnn_edu.boxes import (BoxCoder, batched_nms, box_area, box_iou, clip_boxes, greedy_keep, greedy_keep_by_blocks,
                             greedy_keep_in_rounds, keep_sorted, large_boxes_mask, matched_box_iou, nms, nms_in_images,
                             remove_small_boxes)

try:
    import torchvision
except Exception:  # torchvision is a test oracle only; the suite runs without it
    torchvision = None


# --- brute-force references: plain Python floats, one pair at a time --------------------------

def iou_ref(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms_ref(boxes, scores, thr):
    order = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    keep = []
    for i in order:
        if all(iou_ref(boxes[i], boxes[k]) <= thr for k in keep):
            keep.append(i)
    return keep


def random_boxes(rng, n, grid=False):
    """Random boxes; on a coarse grid many coordinates coincide (identical / zero-area boxes)."""
    out = []
    for _ in range(n):
        if grid:
            x1, y1 = rng.randrange(0, 6), rng.randrange(0, 6)
            w, h = rng.randrange(0, 4), rng.randrange(0, 4)
        else:
            x1, y1 = rng.uniform(0, 50), rng.uniform(0, 50)
            w, h = rng.uniform(0, 30), rng.uniform(0, 30)
        out.append([float(x1), float(y1), float(x1 + w), float(y1 + h)])
    return out


def random_case(rng):
    n = rng.choice([0, 1, 2, 5, 20, 60])
    grid = rng.random() < 0.5
    boxes = random_boxes(rng, n, grid)
    if n and rng.random() < 0.3:  # duplicate some boxes exactly
        boxes[rng.randrange(n)] = list(boxes[0])
    # ties in score: draw from few levels half the time
    scores = [float(rng.choice([0.1, 0.5, 0.9])) if grid else rng.random() for _ in range(n)]
    return boxes, scores


def test_box_iou_matches_brute_force_on_hundreds_of_cases():
    rng = random.Random(0)
    for _ in range(300):
        a = random_boxes(rng, rng.randrange(0, 8), grid=rng.random() < 0.5)
        b = random_boxes(rng, rng.randrange(0, 8), grid=rng.random() < 0.5)
        got = box_iou(torch.tensor(a, dtype=torch.float64).reshape(-1, 4), torch.tensor(b, dtype=torch.float64).reshape(-1, 4))
        want = torch.tensor([[iou_ref(x, y) for y in b] for x in a], dtype=torch.float64).reshape(len(a), len(b))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_matched_box_iou_is_box_ious_diagonal():
    rng = random.Random(3)
    for _ in range(100):
        n = rng.randrange(0, 8)
        a = torch.tensor(random_boxes(rng, n, grid=rng.random() < 0.5), dtype=torch.float64).reshape(-1, 4)
        b = torch.tensor(random_boxes(rng, n, grid=rng.random() < 0.5), dtype=torch.float64).reshape(-1, 4)
        torch.testing.assert_close(matched_box_iou(a, b), box_iou(a, b).diagonal(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="as many boxes in b as in a"):
        matched_box_iou(torch.zeros(2, 4), torch.zeros(3, 4))


def test_box_iou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [2.0, 0.0, 4.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    # overlap 1 of union 7; identical; touching edge; zero-area box inside
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1 / 7, 1.0, 0.0, 0.0]]))
    assert box_area(b).tolist() == [4.0, 4.0, 4.0, 0.0]


def test_nms_matches_brute_force_greedy_on_hundreds_of_cases():
    rng = random.Random(1)
    for case in range(400):
        boxes, scores = random_case(rng)
        thr = rng.choice([0.0, 0.3, 0.5, 0.7, 1.0])
        got = nms(torch.tensor(boxes).reshape(-1, 4), torch.tensor(scores), thr).tolist()
        assert got == nms_ref(boxes, scores, thr), f"case {case}"


def test_greedy_keep_in_rounds_is_the_greedy_loop_on_hundreds_of_cases():
    # the GPU's way to the same decisions (boxes.nms uses it for CUDA tensors), run on the CPU
    rng = random.Random(1)
    for case in range(400):
        boxes, scores = random_case(rng)
        if not boxes:
            continue
        thr = rng.choice([0.0, 0.3, 0.5, 0.7, 1.0])
        b, s = torch.tensor(boxes).reshape(-1, 4), torch.tensor(scores)
        order = torch.sort(s, descending=True, stable=True).indices
        overlaps = box_iou(b[order], b[order]) > thr
        for rounds_per_read in (1, 4):
            keep = greedy_keep_in_rounds(overlaps, rounds_per_read)
            assert order[keep].tolist() == nms_ref(boxes, scores, thr), f"case {case}"


def test_greedy_keep_in_rounds_on_the_longest_chain():
    # box i overlaps box i + 1 (IoU 0.82) but not i + 2 (0.67): greedy keeps every other box,
    # and each decision waits for the one before it, so it takes all N rounds
    n = 50
    x = torch.arange(n, dtype=torch.float64) * 0.1
    boxes = torch.stack([x, torch.zeros(n), x + 1, torch.ones(n, dtype=torch.float64)], 1)
    overlaps = box_iou(boxes, boxes) > 0.7
    for rounds_per_read in (1, 3, 4):
        assert greedy_keep_in_rounds(overlaps, rounds_per_read).tolist() == [i % 2 == 0 for i in range(n)]
    assert nms(boxes, -x, 0.7).tolist() == list(range(0, n, 2))


def test_greedy_keep_on_a_batch_of_rows_in_rounds_and_by_loop_is_each_rows_greedy_loop():
    rng = random.Random(3)
    rows = [random_case(rng) for _ in range(60)]
    rows = [(b + random_boxes(rng, 60 - len(b)), s + [rng.random() for _ in range(60 - len(s))]) for b, s in rows]
    boxes = torch.tensor([b for b, _ in rows])  # (60 rows, 60 boxes, 4)
    scores = torch.tensor([s for _, s in rows])
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    sorted_boxes = torch.gather(boxes, 1, order[..., None].expand(-1, -1, 4))
    overlaps = box_iou(sorted_boxes, sorted_boxes) > 0.5  # (60, 60, 60)
    by_loop, in_rounds = greedy_keep(overlaps), greedy_keep_in_rounds(overlaps, 4)
    assert by_loop.shape == (60, 60) and torch.equal(by_loop, in_rounds)
    for row, (b, s) in enumerate(rows):
        assert order[row][by_loop[row]].tolist() == nms_ref(b, s, 0.5), row


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_box_iou_takes_the_same_bits_the_cpu_way_and_the_gpu_way(monkeypatch, dtype):
    # coordinate by coordinate (the CPU's) and as corner tensors (a GPU's): the same operations
    import mrcnn_edu.boxes as boxes_module
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(3, 70, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + torch.rand(3, 70, 2, generator=g) * 40], 2).round(decimals=1).to(dtype)
    boxes[0, :5] = 0  # empty boxes too
    calls = (lambda: box_iou(boxes[0], boxes[1, :20]), lambda: box_iou(boxes, boxes),
             lambda: matched_box_iou(boxes[0], boxes[2]))
    cpu_way = [call() for call in calls]
    monkeypatch.setattr(boxes_module, "_takes_the_cpu_way", lambda device: False)
    for got, want in zip(cpu_way, [call() for call in calls]):
        assert got.dtype == dtype and torch.equal(got, want)


def test_greedy_keep_by_blocks_is_the_greedy_loop_for_any_block_size_and_with_categories():
    # the CPU's way (nms takes it for CPU tensors of over 128 boxes): blocks of 1 and 3 boxes cut
    # through the chains of suppression (and the category groups) that a block of 256 holds whole
    rng = random.Random(5)
    for case in range(300):
        boxes, scores = random_case(rng)
        thr = rng.choice([0.0, 0.3, 0.5, 0.7, 1.0])
        categories = [rng.randrange(3) for _ in boxes]
        b, s = torch.tensor(boxes).reshape(-1, 4), torch.tensor(scores)
        order = torch.sort(s, descending=True, stable=True).indices
        grouped = sorted(order.tolist(), key=lambda i: categories[i])  # stable: by score within each
        want_by_category = sorted((k for c in range(3) for k in [
            [i for i, ci in enumerate(categories) if ci == c][j]
            for j in nms_ref([bb for bb, ci in zip(boxes, categories) if ci == c],
                             [ss for ss, ci in zip(scores, categories) if ci == c], thr)]),
            key=lambda i: (-scores[i], i))
        grouped_categories = torch.tensor([categories[i] for i in grouped], dtype=torch.int64)
        for block in (1, 3, 256):
            keep = greedy_keep_by_blocks(b[order], thr, block=block)
            assert order[keep].tolist() == nms_ref(boxes, scores, thr), (case, block)
            keep = greedy_keep_by_blocks(b[grouped], thr, grouped_categories, block)
            assert sorted([i for i, k in zip(grouped, keep.tolist()) if k], key=lambda i: (-scores[i], i)) \
                == want_by_category, (case, block)
    with pytest.raises(ValueError, match="grouped by category"):
        greedy_keep_by_blocks(torch.zeros(3, 4), 0.5, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"categories must have shape \(2, 3\)"):
        keep_sorted(torch.zeros(2, 3, 4), 0.5, torch.zeros(3, dtype=torch.int64))


def test_nms_on_crowded_proposals_is_the_same_by_blocks_and_by_the_whole_matrix(monkeypatch):
    # the RPN's case: thousands of boxes around few objects, most suppressed by an earlier
    # block -- the rows greedy_keep_by_blocks skips
    import mrcnn_edu.boxes as boxes_module
    g = torch.Generator().manual_seed(0)
    centres, sizes = torch.rand(12, 2, generator=g) * 300, torch.rand(12, 2, generator=g) * 80 + 10
    which = torch.randint(0, 12, (3000,), generator=g)
    centre = centres[which] + torch.randn(3000, 2, generator=g) * sizes[which] * 0.1
    size = sizes[which] * torch.exp(torch.randn(3000, 2, generator=g) * 0.1)
    boxes, scores = torch.cat([centre - size / 2, centre + size / 2], 1), torch.rand(3000, generator=g)
    pairs = []
    pairwise_iou = boxes_module._pairwise_iou
    monkeypatch.setattr(boxes_module, "_pairwise_iou", lambda a, b: pairs.append(len(a) * len(b)) or pairwise_iou(a, b))
    by_blocks = nms(boxes, scores, 0.7)
    assert len(by_blocks) < 3000 // 4  # most of them suppressed
    # the CPU went by blocks, and skipped the rows of boxes suppressed by an earlier block
    assert len(pairs) > 1 and sum(pairs) < 3000 ** 2 / 8
    monkeypatch.setattr(boxes_module, "_pairwise_iou", pairwise_iou)
    monkeypatch.setattr(boxes_module, "_takes_the_cpu_way", lambda device: False)
    assert torch.equal(nms(boxes, scores, 0.7), by_blocks)
    if torchvision is not None:
        assert torch.equal(torchvision.ops.nms(boxes, scores, 0.7), by_blocks)


# by blocks (the CPU's way); the GPU's whole matrices: every image together, one image at a
# time in blocks of 16 rows, one row at a time
@pytest.mark.parametrize("by_blocks, pairs_per_chunk", [(True, 2 ** 25), (False, 2 ** 25), (False, 5000), (False, 1)])
def test_nms_in_images_is_nms_image_by_image_leaving_out_the_invalid(monkeypatch, by_blocks, pairs_per_chunk):
    import mrcnn_edu.boxes as boxes_module
    monkeypatch.setattr(boxes_module, "NMS_PAIRS_PER_CHUNK", pairs_per_chunk)
    monkeypatch.setattr(boxes_module, "_takes_the_cpu_way", lambda device: by_blocks)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(5, 300, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 2 + torch.rand(5, 300, 2, generator=g) * 40], dim=2)
    scores = torch.randint(0, 50, (5, 300), generator=g).float()  # ties too
    valid = torch.rand(5, 300, generator=g) > 0.3
    keep = nms_in_images(boxes, scores, 0.5, valid)
    assert keep.shape == (5, 300) and not bool((keep & ~valid).any())
    for i in range(5):
        members = torch.nonzero(valid[i]).flatten()
        want = torch.zeros(300, dtype=torch.bool)
        want[members[nms(boxes[i, members], scores[i, members], 0.5)]] = True
        assert torch.equal(keep[i], want), i
        assert 0 < int(keep[i].sum()) < int(valid[i].sum())  # NMS removed some, kept some
    assert torch.equal(nms_in_images(boxes, scores, 0.5), torch.stack(
        [torch.zeros(300, dtype=torch.bool).index_fill(0, nms(b, s, 0.5), True) for b, s in zip(boxes, scores)]))


def test_clip_boxes_on_a_batch_clips_each_image_to_its_own_size():
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(3, 20, 8, generator=g) * 120 - 10  # 2 boxes per row (class-specific)
    boxes[1, 0, 0] = float("nan")
    sizes = [(50, 80), (100, 30), (64, 64)]
    got = clip_boxes(boxes, sizes)
    for i, size in enumerate(sizes):
        assert torch.equal(got[i], clip_boxes(boxes[i], size)), i
    with pytest.raises(ValueError, match="one \\(height, width\\) per image"):
        clip_boxes(boxes, sizes[:2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nms_in_images_on_cuda_equals_the_cpu():
    g = torch.Generator().manual_seed(5)
    xy = torch.rand(8, 2000, 2, generator=g) * 400
    boxes = torch.cat([xy, xy + 5 + torch.rand(8, 2000, 2, generator=g) * 100], 2)
    scores = torch.randint(0, 100, (8, 2000), generator=g).float()
    valid = torch.rand(8, 2000, generator=g) > 0.1
    for thr in (0.3, 0.7):
        assert torch.equal(nms_in_images(boxes.cuda(), scores.cuda(), thr, valid.cuda()).cpu(),
                           nms_in_images(boxes, scores, thr, valid))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nms_on_cuda_equals_nms_on_the_cpu():
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        n = int(torch.randint(1, 3000, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 400
        boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 100], 1)
        scores = torch.randint(0, 100, (n,), generator=g).float()  # ties too
        for thr in (0.3, 0.7):
            assert nms(boxes.cuda(), scores.cuda(), thr).cpu().tolist() == nms(boxes, scores, thr).tolist()


# by blocks on the CPU (even for a few boxes), and the GPU's matrix
@pytest.mark.parametrize("by_blocks", [True, False])
def test_batched_nms_suppresses_only_within_a_category(monkeypatch, by_blocks):
    import mrcnn_edu.boxes as boxes_module
    monkeypatch.setattr(boxes_module, "_takes_the_cpu_way", lambda device: by_blocks)
    monkeypatch.setattr(boxes_module, "NMS_MATRIX_MAX_BOXES", 0)
    rng = random.Random(2)
    for case in range(200):
        boxes, scores = random_case(rng)
        idxs = [rng.randrange(3) for _ in boxes]
        thr = rng.choice([0.3, 0.5, 0.7])
        want = []
        for c in set(idxs):
            members = [i for i in range(len(boxes)) if idxs[i] == c]
            want += [members[k] for k in nms_ref([boxes[i] for i in members], [scores[i] for i in members], thr)]
        want.sort(key=lambda i: (-scores[i], i))
        got = batched_nms(torch.tensor(boxes).reshape(-1, 4), torch.tensor(scores), torch.tensor(idxs, dtype=torch.int64), thr)
        assert got.tolist() == want, f"case {case}"


def test_an_iou_exactly_at_the_threshold_does_not_suppress():
    # whole-pixel boxes whose IoU is exactly the threshold: 30 / 100, 50 / 100, 70 / 100
    for thr, height in ((0.3, 3.0), (0.5, 5.0), (0.7, 7.0)):
        boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, height]])
        scores = torch.tensor([0.9, 0.8])
        assert nms_ref(boxes.tolist(), scores.tolist(), thr) == [0, 1]  # float64: 0.3 > 0.3 is false
        assert nms(boxes, scores, thr).tolist() == [0, 1]
        assert batched_nms(boxes, scores, torch.zeros(2, dtype=torch.int64), thr).tolist() == [0, 1]
        if torchvision is not None:
            # torchvision compares the float32 IoU with the double threshold: 0.3 rounds up in
            # float32, so there it suppresses (nms's docstring); 0.5 and 0.7 do not
            expected = [0] if thr == 0.3 else [0, 1]
            assert torchvision.ops.nms(boxes, scores, thr).tolist() == expected


@pytest.mark.skipif(torchvision is None, reason="torchvision not importable")
def test_nms_agrees_with_torchvision():
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        n = int(torch.randint(0, 300, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 100
        wh = torch.rand(n, 2, generator=g) * 40
        boxes = torch.cat([xy, xy + wh], 1)
        scores = torch.rand(n, generator=g)
        idxs = torch.randint(0, 4, (n,), generator=g)
        for thr in (0.3, 0.5, 0.7):
            assert torch.equal(nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr))
            assert torch.equal(batched_nms(boxes, scores, idxs, thr), torchvision.ops.batched_nms(boxes, scores, idxs, thr))
        torch.testing.assert_close(box_iou(boxes, boxes[:7]), torchvision.ops.box_iou(boxes, boxes[:7]))


@pytest.mark.parametrize("by_blocks", [True, False])
def test_batched_nms_on_large_inputs_is_nms_per_category(monkeypatch, by_blocks):
    # above 4000 boxes batched_nms loops over categories on a GPU, and goes by blocks in one
    # pass on the CPU; the answer must not change
    import mrcnn_edu.boxes as boxes_module
    monkeypatch.setattr(boxes_module, "_takes_the_cpu_way", lambda device: by_blocks)
    g = torch.Generator().manual_seed(3)
    n = 4500
    xy = torch.rand(n, 2, generator=g) * 400
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 60], 1)
    scores = torch.randint(0, 50, (n,), generator=g).float()  # many ties
    idxs = torch.randint(0, 5, (n,), generator=g)
    want = []
    for c in range(5):
        members = torch.nonzero(idxs == c).flatten()
        want.append(members[nms(boxes[members], scores[members], 0.5)])
    want = torch.cat(want)
    order = sorted(range(len(want)), key=lambda k: (-float(scores[want[k]]), int(want[k])))
    assert batched_nms(boxes, scores, idxs, 0.5).tolist() == want[order].tolist()


def per_category_nms(boxes, scores, idxs, thr):
    """The definition of batched NMS: nms on each category alone, merged by decreasing score."""
    keep = []
    for c in torch.unique(idxs).tolist():
        members = torch.nonzero(idxs == c).flatten()
        keep += members[nms(boxes[members], scores[members], thr)].tolist()
    return sorted(keep, key=lambda i: (-float(scores[i]), i))


def near_threshold_boxes(g, n_pairs, thr, width=1333.0, height=1000.0):
    """Image-scale boxes in pairs whose IoU is ``thr`` up to fp32 rounding: a box and itself
    shifted right by ``w (1 - thr) / (1 + thr)`` (IoU ``(w - dx) / (w + dx)``)."""
    w = 20 + torch.rand(n_pairs, generator=g) * 300
    h = 20 + torch.rand(n_pairs, generator=g) * 300
    x1 = torch.rand(n_pairs, generator=g) * (width - 2 * w)
    y1 = torch.rand(n_pairs, generator=g) * (height - h)
    dx = w * (1 - thr) / (1 + thr)
    first = torch.stack([x1, y1, x1 + w, y1 + h], 1)
    second = torch.stack([x1 + dx, y1, x1 + dx + w, y1 + h], 1)
    return torch.cat([first, second])  # pair k is rows k and n_pairs + k


def test_batched_nms_with_large_category_ids_equals_nms_on_the_category_alone():
    # the reviewer's case: IoU(0, 1) = 0.50001448 in fp32, so NMS on category 60 suppresses
    # box 1; shifting category 60 by 60 * 1334 px (torchvision's trick) rounds the IoU below 0.5
    boxes = torch.tensor([[591.9867553710938, 309.75274658203125, 774.8672485351562, 436.33441162109375],
                          [652.944580078125, 309.75274658203125, 835.8250732421875, 436.33441162109375],
                          [0.0, 0.0, 1333.0, 1000.0]])
    scores = torch.tensor([0.9, 0.8, 0.1])
    idxs = torch.tensor([60, 60, 0])
    assert float(box_iou(boxes[:1], boxes[1:2])) > 0.5
    assert nms(boxes[:2], scores[:2], 0.5).tolist() == [0]
    assert batched_nms(boxes, scores, idxs, 0.5).tolist() == [0, 2]


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_batched_nms_near_the_threshold_equals_per_category_nms_for_many_seeds(thr):
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        n_pairs = 100
        boxes = near_threshold_boxes(g, n_pairs, thr)
        category = torch.randint(1, 91, (n_pairs,), generator=g)  # COCO's ids go up to 90
        # most pairs share a category (NMS decides near the threshold); a quarter are split
        # across two (the overlap must then suppress nothing)
        split = torch.rand(n_pairs, generator=g) < 0.25
        idxs = torch.cat([category, torch.where(split, category % 90 + 1, category)])
        scores = torch.rand(2 * n_pairs, generator=g)
        assert batched_nms(boxes, scores, idxs, thr).tolist() == per_category_nms(boxes, scores, idxs, thr), seed


def test_nms_empty_input():
    out = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert out.dtype == torch.int64 and out.numel() == 0
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).numel() == 0


def test_box_coder_matches_hand_computed_deltas():
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), size 10 x 20
    box = torch.tensor([[2.0, 4.0, 22.0, 24.0]])  # centre (12, 14), size 20 x 20
    want = torch.tensor([[10 * 7 / 10, 10 * 4 / 20, 5 * math.log(2.0), 5 * math.log(1.0)]])
    torch.testing.assert_close(coder.encode(box, anchor), want)
    torch.testing.assert_close(coder.decode(want, anchor), box)


def test_box_coder_round_trips_and_decodes_per_class():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=g) * 500
    ref = torch.cat([xy, xy + 10 + torch.rand(500, 2, generator=g) * 290], 1)  # size ratios stay under the clamp
    xy = torch.rand(500, 2, generator=g) * 500
    boxes = torch.cat([xy, xy + 10 + torch.rand(500, 2, generator=g) * 290], 1)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        coder = BoxCoder(weights)
        torch.testing.assert_close(coder.decode(coder.encode(boxes, ref), ref), boxes, rtol=0, atol=1e-3)
    # (N, 4*k) deltas decode each class's box independently
    coder = BoxCoder()
    deltas = torch.cat([coder.encode(boxes, ref), torch.zeros(500, 4)], 1)
    decoded = coder.decode(deltas, ref)
    torch.testing.assert_close(decoded[:, 4:], ref)


def test_box_coder_decodes_low_precision_deltas_in_fp32():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 300
    reference = torch.cat([xy, xy + 10 + torch.rand(50, 2, generator=g) * 80], 1)  # fp32, off the bf16 grid
    deltas = (torch.randn(50, 8, generator=g) * 0.3).to(torch.bfloat16)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    boxes = coder.decode(deltas, reference)
    assert boxes.dtype == torch.float32
    torch.testing.assert_close(boxes, coder.decode(deltas.float(), reference), rtol=0, atol=0)
    assert coder.decode(deltas.double(), reference).dtype == torch.float64


def test_box_coder_clamps_huge_scale_deltas():
    coder = BoxCoder()
    out = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), torch.tensor([[0.0, 0.0, 16.0, 16.0]]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 2] - out[0, 0], torch.tensor(1000.0))


def test_box_coder_clamps_the_weighted_scale_delta_with_box_head_weights():
    # The clamp bounds dw / ww, not the raw delta: 100 / 5 = 20 > log(1000 / 16), so the 16 px
    # anchor grows to exp(log(62.5)) * 16 = 1000 px about its unchanged centre (8, 8). Clamping
    # the raw delta (then / 5) would give 16 * 62.5 ** (1 / 5) = 36.6 px.
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    anchor = torch.tensor([[0.0, 0.0, 16.0, 16.0]], dtype=torch.float64)
    out = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]], dtype=torch.float64), anchor)
    torch.testing.assert_close(out, torch.tensor([[-492.0, -492.0, 508.0, 508.0]], dtype=torch.float64),
                               rtol=0, atol=1e-9)


@pytest.mark.skipif(torchvision is None, reason="torchvision not importable")
def test_box_coder_decode_matches_torchvision_past_the_clamp():
    # torchvision's decode_single (0.29: continuous xyxy, w = x2 - x1, no +1, clamp after
    # dividing by the weights) is the same convention as ours, so the boxes agree to rounding.
    from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

    g = torch.Generator().manual_seed(0)
    n = 400
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 500
    reference = torch.cat([xy, xy + 1 + torch.rand(n, 2, generator=g, dtype=torch.float64) * 300], 1)
    shift = torch.randn(n, 2, generator=g, dtype=torch.float64) * 3
    scale = torch.rand(n, 2, generator=g, dtype=torch.float64) * 50 - 10  # / 5: -2 .. 8, clamp at 4.14
    deltas = torch.cat([shift, scale, -shift, scale.flip(1)], 1)  # (N, 8): two classes
    clamped = deltas[:, 2::4] / 5 > math.log(1000 / 16)
    assert 0.2 < clamped.double().mean() < 0.8  # both sides of the clamp are exercised
    ours = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(deltas, reference)
    theirs = TorchvisionBoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(deltas, reference)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-9)


def test_clip_and_remove_small():
    boxes = torch.tensor([[-5.0, -3.0, 30.0, 12.0], [4.0, 4.0, 4.5, 9.0]])
    assert clip_boxes(boxes, (10, 20)).tolist() == [[0.0, 0.0, 20.0, 10.0], [4.0, 4.0, 4.5, 9.0]]
    assert remove_small_boxes(boxes, 1.0).tolist() == [0]
    # "at least min_size" is inclusive, as torchvision's remove_small_boxes (ws >= min_size):
    # widths 2.0, 2.0, 1.5 and heights 2.0, 1.5, 2.0 against min_size 2 keep only the first
    edge = torch.tensor([[1.0, 1.0, 3.0, 3.0], [1.0, 1.0, 3.0, 2.5], [1.0, 1.0, 2.5, 3.0]])
    assert remove_small_boxes(edge, 2.0).tolist() == [0]
    assert large_boxes_mask(edge[None], 2.0).tolist() == [[True, False, False]]


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(3, 5), "shape"),
    (torch.tensor([[0.0, 0.0, float("nan"), 1.0]]), "non-finite"),
    (torch.tensor([[5.0, 0.0, 1.0, 1.0]]), "negative size"),
])
def test_bad_boxes_raise_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        box_iou(bad, torch.zeros(0, 4))
    with pytest.raises(ValueError, match="boxes"):
        nms(bad, torch.zeros(bad.shape[0]), 0.5)


def test_mismatched_scores_raise():
    with pytest.raises(ValueError, match="scores"):
        nms(torch.zeros(2, 4), torch.zeros(3), 0.5)


def test_clip_turns_a_diverged_networks_nan_into_a_box_inside_the_image():
    boxes = torch.tensor([[float("nan"), 2.0, float("inf"), float("-inf")]])
    assert clip_boxes(boxes, (10, 20)).tolist() == [[0.0, 2.0, 20.0, 0.0]]


@pytest.mark.parametrize("counts", [(3, 0, 5, 1), (0, 0), (2,), (0, 4)])
def test_pad_rows_equals_pad_sequence(counts):
    """pad_rows (one indexed copy) against torch's pad_sequence (a copy per image)."""
    from torch.nn.utils.rnn import pad_sequence

    from mrcnn_edu.boxes import pad_boxes, pad_rows

    generator = torch.Generator().manual_seed(sum(counts))
    boxes = [torch.rand(n, 4, generator=generator) * 50 for n in counts]
    labels = [torch.randint(1, 9, (n,), generator=generator) for n in counts]
    masks = [torch.randint(0, 2, (n, 5, 7), generator=generator, dtype=torch.uint8) for n in counts]
    assert torch.equal(pad_boxes(boxes), pad_sequence(boxes, batch_first=True))
    assert torch.equal(pad_rows(labels, fill=-1), pad_sequence(labels, batch_first=True, padding_value=-1))
    assert torch.equal(pad_rows(masks), pad_sequence(masks, batch_first=True))
    assert pad_rows(labels).dtype == torch.int64 and pad_rows(masks).shape == (len(counts), max(counts), 5, 7)
    with pytest.raises(ValueError, match="non-empty"):
        pad_rows([])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pad_rows_on_cuda_equals_the_cpu_also_in_deterministic_mode():
    from mrcnn_edu.boxes import pad_rows

    generator = torch.Generator().manual_seed(0)
    rows = [torch.rand(n, 4, generator=generator) for n in (5, 0, 300, 17)]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(pad_rows([r.cuda() for r in rows]).cpu(), pad_rows(rows))
    finally:
        torch.use_deterministic_algorithms(previous)
