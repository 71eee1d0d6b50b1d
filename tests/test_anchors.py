"""anchors.py against hand-computed anchors."""
import math

import pytest
import torch

from mrcnn_edu.anchors import AnchorGenerator, c4_anchor_generator, cell_anchors, fpn_anchor_generator, grid_anchors


def test_cell_anchors_have_the_requested_area_and_ratio():
    sizes, ratios = (32, 64, 128, 256, 512), (0.5, 1.0, 2.0)
    cell = cell_anchors(sizes, ratios, dtype=torch.float64)
    assert cell.shape == (15, 4)
    w, h = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
    want_area = torch.tensor([s * s for r in ratios for s in sizes], dtype=torch.float64)
    want_ratio = torch.tensor([r for r in ratios for s in sizes], dtype=torch.float64)
    torch.testing.assert_close(w * h, want_area)
    torch.testing.assert_close(h / w, want_ratio)
    torch.testing.assert_close((cell[:, :2] + cell[:, 2:]) / 2, torch.zeros(15, 2, dtype=torch.float64))
    # ratio 0.5, size 32: w = 32 * sqrt(2), h = 32 / sqrt(2)
    torch.testing.assert_close(cell[0], torch.tensor([-16 * math.sqrt(2), -8 * math.sqrt(2), 16 * math.sqrt(2), 8 * math.sqrt(2)], dtype=torch.float64))


def test_anchor_centres_sit_on_cell_centres_by_hand():
    # a 2 x 3 map of stride 16: cell (i, j) covers pixels [16j, 16j+16) x [16i, 16i+16)
    anchors = grid_anchors(cell_anchors([16], [1.0]), (2, 3), stride=16)
    want = torch.tensor([
        [0, 0, 16, 16], [16, 0, 32, 16], [32, 0, 48, 16],
        [0, 16, 16, 32], [16, 16, 32, 32], [32, 16, 48, 32],
    ], dtype=torch.float32)
    torch.testing.assert_close(anchors, want)
    # torchvision's convention: centred on the cell's corner
    corner = grid_anchors(cell_anchors([16], [1.0]), (2, 3), stride=16, offset=0.0)
    torch.testing.assert_close(corner, want - 8)


def test_c4_generator_orders_anchors_cell_major():
    gen = c4_anchor_generator()
    (anchors,) = gen([(3, 4)])
    assert anchors.shape == (3 * 4 * 15, 4)
    per_cell = anchors.reshape(3, 4, 15, 4)
    centres = (per_cell[..., :2] + per_cell[..., 2:]) / 2  # (3, 4, 15, 2)
    for i in range(3):
        for j in range(4):
            torch.testing.assert_close(centres[i, j], torch.tensor([[16 * j + 8.0, 16 * i + 8.0]]).expand(15, 2))
    torch.testing.assert_close(per_cell[1, 2] - per_cell[0, 0], torch.tensor([32.0, 16.0, 32.0, 16.0]).expand(15, 4))


def test_fpn_anchor_count_is_sum_of_cells_times_three():
    gen = fpn_anchor_generator()
    sizes = [(50, 76), (25, 38), (13, 19), (7, 10), (4, 5)]
    anchors = gen(sizes)
    assert [a.shape[0] for a in anchors] == [h * w * 3 for h, w in sizes]
    assert gen.num_anchors_per_cell == [3] * 5
    for level, a in enumerate(anchors):
        w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
        torch.testing.assert_close((w * h)[:3], torch.full((3,), float((32 * 2 ** level) ** 2)))


def test_torchvision_compatible_mode_matches_torchvision():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchors
    from torchvision.models.detection.image_list import ImageList

    sizes = ((32,), (64,), (128,), (256,), (512,))
    ratios = ((0.5, 1.0, 2.0),) * 5
    tv = TVAnchors(sizes, ratios)
    # torchvision infers each stride as image size // map size, so use a size divisible by 64
    maps = [torch.zeros(1, 1, 256 // s, 320 // s) for s in (4, 8, 16, 32, 64)]
    want = tv(ImageList(torch.zeros(1, 3, 256, 320), [(256, 320)]), maps)[0]
    ours = AnchorGenerator(sizes, ratios, (4, 8, 16, 32, 64), offset=0.0, round_cell=True)
    got = torch.cat(ours([m.shape[-2:] for m in maps]))
    torch.testing.assert_close(got, want)


def detectron1_cell_anchors(stride, sizes, ratios):
    """The original Detectron's cell anchors, from the steps of its generate_anchors.py,
    turned into our continuous xyxy (its boxes are inclusive: pixels x1..x2, so x2 + 1)."""
    centre = (stride - 1) / 2  # of the inclusive box [0, 0, s-1, s-1], in pixel indices
    out = []
    for r in ratios:
        base_w = round(math.sqrt(stride * stride / r))  # rounded at the stride's scale ...
        base_h = round(base_w * r)  # (Python's round, like numpy's, sends halves to even)
        for size in sizes:
            w, h = base_w * size / stride, base_h * size / stride  # ... then scaled
            out.append([centre - (w - 1) / 2, centre - (h - 1) / 2, centre + (w - 1) / 2 + 1, centre + (h - 1) / 2 + 1])
    return torch.tensor(out, dtype=torch.float64)


def test_original_detectron_anchors_are_cell_centred_but_no_option_reproduces_them():
    stride, sizes, ratios = 16, (32, 64, 128, 256, 512), (0.5, 1.0, 2.0)
    detectron = detectron1_cell_anchors(stride, sizes, ratios)
    # "centered on stride / 2": the centre of cell (0, 0), our offset=0.5
    centres = (detectron[:, :2] + detectron[:, 2:]) / 2
    torch.testing.assert_close(centres, torch.full((15, 2), stride / 2, dtype=torch.float64))
    # ratio 0.5, size 32: 46 x 24 px there, 45.25 x 22.63 here
    assert (detectron[0, 2:] - detectron[0, :2]).tolist() == [46.0, 24.0]
    for offset in (0.0, 0.5):
        for round_cell in (False, True):
            ours = grid_anchors(cell_anchors(sizes, ratios, round_cell, torch.float64), (1, 1), stride, offset)
            assert not torch.allclose(ours, detectron), (offset, round_cell)


@pytest.mark.parametrize("kwargs, name", [
    (dict(sizes=[(32,)], aspect_ratios=[(0.5,)], strides=[16, 32]), "strides"),
    (dict(sizes=[(-32,)], aspect_ratios=[(1.0,)], strides=[16]), "sizes"),
    (dict(sizes=[(32,)], aspect_ratios=[(float("nan"),)], strides=[16]), "aspect_ratios"),
])
def test_bad_arguments_raise_a_clear_error(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AnchorGenerator(**kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_cast_to_half_precision_places_the_same_anchors(dtype):
    # .to(dtype) casts the cell buffers too; a P2 grid built from them on an 800 x 1216 image
    # lands up to 9.3 px off in bf16 (8 significant bits), 0.37 px in fp16
    sizes = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]  # P2..P6 of an 800 x 1216 image
    exact = fpn_anchor_generator()(sizes)
    cast = fpn_anchor_generator().to(dtype)(sizes)
    for level, (a, b) in enumerate(zip(exact, cast)):
        assert b.dtype == torch.float32, level
        assert torch.equal(a, b), (level, (a - b).abs().max())
    # what the cast alone would have given: the grid in half precision is not the same
    half_cell = fpn_anchor_generator().to(dtype).cell_0
    assert not torch.equal(grid_anchors(half_cell, sizes[0], 4).float(), exact[0])
