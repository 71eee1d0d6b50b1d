"""The RoI pooler: FPN eq. 1 level mapping and multi-level pooling in the RoIs' input order."""
import math

import pytest
import torch

from mrcnn_edu.ops import roi_align, roi_pool, roi_warp
from mrcnn_edu.roi_heads.pooler import PoolerConfig, RoIPooler, fpn_level, pool_rois


def square(side, x0=10.0):
    return [x0, x0, x0 + side, x0 + side]


def test_fpn_level_follows_eq1_by_hand():
    # k = floor(4 + log2(sqrt(wh) / 224)), clamped to [2, 5]
    boxes = torch.tensor([square(224), square(223), square(112), square(448), square(1000),
                          square(56), square(55), square(1), [5.0, 5.0, 5.0, 5.0],
                          [0.0, 0.0, 448.0, 112.0]])
    want = [4, 3, 3, 5, 5, 2, 2, 2, 2, 4]
    assert fpn_level(boxes).tolist() == want
    assert fpn_level(boxes, k_min=3, k_max=6).tolist() == [4, 3, 3, 5, 6, 3, 3, 3, 3, 4]


def test_fpn_level_matches_the_formula_on_random_boxes():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 500
    wh = torch.exp(torch.rand(200, 2, generator=g) * 7)  # 1 .. 1100 px
    boxes = torch.cat([xy, xy + wh], 1).double()
    for (x1, y1, x2, y2), k in zip(boxes.tolist(), fpn_level(boxes).tolist()):
        want = math.floor(4 + math.log2(math.sqrt((x2 - x1) * (y2 - y1)) / 224 + 1e-6))
        assert k == min(max(want, 2), 5)


def test_fpn_level_adds_eps_inside_the_log_as_detectron_not_outside_as_torchvision():
    # Detectron / Detectron2: floor(k0 + log2(s / 224 + eps)); torchvision's LevelMapper:
    # floor(k0 + log2(s / 224) + eps). They part only a hair below a level boundary: a square
    # of side 112 * 2^(-2e-6) has log2(s / 224) = -1 - 2e-6, which eps = 1e-6 inside the log
    # lifts by 2.9e-6 (to level 3) and outside by 1e-6 only (level 2).
    side = 112 * 2 ** -2e-6
    boxes = torch.tensor([square(side), square(112.0)], dtype=torch.float64)
    assert fpn_level(boxes).tolist() == [3, 3]
    assert math.floor(4 + math.log2(side / 224 + 1e-6)) == 3
    poolers = pytest.importorskip("torchvision.ops.poolers")
    assert (poolers.LevelMapper(2, 5)([boxes]) + 2).tolist() == [2, 3]


def pyramid(seed=0, n=2, c=3, image_hw=(256, 320), levels=(2, 3, 4, 5), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    H, W = image_hw
    return [torch.randn(n, c, H // 2**k, W // 2**k, generator=g, dtype=dtype) for k in levels]


def random_rois(n=60, n_images=2, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * 250
    wh = torch.exp(torch.rand(n, 2, generator=g, dtype=dtype) * 6.6) + 2  # 3 .. 740 px
    wh[:4] = torch.tensor([[20.0, 30.0], [100.0, 150.0], [200.0, 260.0], [500.0, 480.0]])
    index = torch.randint(0, n_images, (n, 1), generator=g).to(dtype)
    return torch.cat([index, xy, xy + wh], 1)  # every FPN level P2..P5 gets RoIs


@pytest.mark.parametrize("kind,mode", [("roi_align", "avg"), ("roi_align", "max"),
                                       ("roi_pool", "max"), ("roi_warp", "avg")])
def test_each_roi_is_pooled_from_its_level_in_input_order(kind, mode):
    feats, rois = pyramid(), random_rois()
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    cfg = PoolerConfig(kind=kind, mode=mode)
    got = pool_rois(cfg, feats, rois, 5, scales)
    levels = fpn_level(rois[:, 1:]) - 2
    assert set(levels.tolist()) == {0, 1, 2, 3}  # the test exercises every level
    for r in range(rois.shape[0]):  # the per-RoI loop is the reference, not the implementation
        l = int(levels[r])
        op = {"roi_align": lambda f, b: roi_align(f, b, 5, scales[l], 2, True, mode),
              "roi_pool": lambda f, b: roi_pool(f, b, 5, scales[l]),
              "roi_warp": lambda f, b: roi_warp(f, b, 5, scales[l], 2, mode)}[kind]
        torch.testing.assert_close(got[r], op(feats[l], rois[r:r + 1])[0], rtol=0, atol=0)


def test_single_level_pooler_is_the_op_itself():
    feats, rois = pyramid(levels=(4,)), random_rois()
    cfg = PoolerConfig(kind="roi_align", sampling_ratio=-1, aligned=False)
    torch.testing.assert_close(pool_rois(cfg, feats, rois, 7, [1 / 16]),
                               roi_align(feats[0], rois, 7, 1 / 16, -1, False), rtol=0, atol=0)


def test_pooler_module_takes_boxes_per_image_and_matches_torchvision_multiscale():
    tv = pytest.importorskip("torchvision")
    feats = pyramid(dtype=torch.float32)
    rois = random_rois(dtype=torch.float32)
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    names = ["p2", "p3", "p4", "p5"]
    oracle = tv.ops.MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2)
    want = oracle(dict(zip(names, feats)), boxes, [(256, 320)] * 2)
    cfg = PoolerConfig(kind="roi_align", mode="avg", sampling_ratio=2, aligned=False)
    pooler = RoIPooler(cfg, 7, [1 / 4, 1 / 8, 1 / 16, 1 / 32])
    got = pooler(dict(zip(names, feats)), boxes)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_pooler_gradients_reach_every_level():
    feats = [f.requires_grad_(True) for f in pyramid(n=1, c=1, image_hw=(64, 64))]
    rois = torch.tensor([[0, 1.0, 2.0, 20.0, 30.0], [0, 0.0, 0.0, 63.0, 60.0],
                         [0, 5.0, 5.0, 9.0, 9.0], [0, 10.0, 10.0, 40.0, 40.0]], dtype=torch.float64)
    cfg = PoolerConfig()
    cfg.canonical_size = 24.0  # small image: spread the four RoIs over the four levels
    # floor(4 + log2(sqrt(wh) / 24)): sqrt(19 * 28) = 23.1 -> 3; 61.5 -> 5; 4 -> 2; 30 -> 4
    assert fpn_level(rois[:, 1:], canonical_size=24.0).tolist() == [3, 5, 2, 4]
    assert torch.autograd.gradcheck(
        lambda *f: pool_rois(cfg, list(f), rois, 2, [1 / 4, 1 / 8, 1 / 16, 1 / 32]),
        tuple(feats), eps=1e-6, atol=1e-7, fast_mode=True)


def test_pooler_rejects_bad_configuration():
    with pytest.raises(ValueError, match="kind"):
        PoolerConfig(kind="roi_magic")
    with pytest.raises(ValueError, match="mode"):
        PoolerConfig(mode="median")
    feats, rois = pyramid(levels=(2, 3)), random_rois()
    with pytest.raises(ValueError, match="scales"):
        pool_rois(PoolerConfig(), feats, rois, 7, [1 / 4, 1 / 16])
    with pytest.raises(ValueError, match="same length"):
        pool_rois(PoolerConfig(), feats, rois, 7, [1 / 4])
    with pytest.raises(ValueError, match=r"\(R, 5\)"):
        pool_rois(PoolerConfig(), feats, rois[:, 1:], 7, [1 / 4, 1 / 8])


def test_several_levels_name_a_bad_roi_by_its_row_as_given():
    """fpn_level ran before any value check: a nan box became level INT64_MIN and bincount
    failed with "Storage size calculation overflowed"; a bad batch index was named by its row in
    the level-sorted subset."""
    feats, rois = pyramid(), random_rois()
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    nan_row = rois.clone()
    nan_row[7, 2] = math.nan
    with pytest.raises(ValueError, match=r"rois\[7\]"):
        pool_rois(PoolerConfig(), feats, nan_row, 7, scales)
    bad_index = rois.clone()
    bad_index[11, 0] = 5  # two images in the batch
    with pytest.raises(ValueError, match=r"rois\[11\]"):
        pool_rois(PoolerConfig(), feats, bad_index, 7, scales)
