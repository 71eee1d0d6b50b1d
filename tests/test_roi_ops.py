"""RoIPool, RoIWarp and RoIAlign (Mask R-CNN §3, Figure 3, Table 2c) against independent
references: per-element Python loops written from the definitions, gradcheck, torchvision."""
import importlib.util
import math
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

from mrcnn_edu.ops import roi_align, roi_pool, roi_warp, sampling_points


def _kernel_source_tests():
    """test_roi_align_kernel_source.py, loaded for its fixtures: ``kernel_path`` runs the CUDA
    kernels of ops/roi_align.cu compiled as C++ on the CPU (skips without a compiler)."""
    path = Path(__file__).with_name("test_roi_align_kernel_source.py")
    spec = importlib.util.spec_from_file_location("_roi_align_kernel_source_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_kernel_source = _kernel_source_tests()
cpu_kernels, kernel_path = _kernel_source.cpu_kernels, _kernel_source.kernel_path  # fixtures, used by name

# ---- brute-force references: one Python float at a time -------------------------------------


def _bilinear(plane, y, x):
    H, W = len(plane), len(plane[0])
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return 0.0
    y, x = min(max(y, 0.0), H - 1), min(max(x, 0.0), W - 1)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    y1, x1 = min(y0 + 1, H - 1), min(x0 + 1, W - 1)
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * plane[y0][x0] + (1 - ly) * lx * plane[y0][x1]
            + ly * (1 - lx) * plane[y1][x0] + ly * lx * plane[y1][x1])


def _align_box(feat, rois, out_hw, bins_from_box, sampling_ratio, mode):
    """Shared loop: `bins_from_box(roi) -> (batch, x0, y0, w, h)` in the sampling frame."""
    R, C, (oh, ow) = len(rois), len(feat[0]), out_hw
    out = torch.zeros(R, C, oh, ow, dtype=torch.float64)
    for r, roi in enumerate(rois):
        b, x0, y0, w, h = bins_from_box(roi)
        for c in range(C):
            for ph in range(oh):
                for pw in range(ow):
                    vals = [_bilinear(feat[b][c], y, x)
                            for y, x in _bin_points(x0, y0, w, h, out_hw, ph, pw, sampling_ratio)]
                    if vals:
                        out[r, c, ph, pw] = max(vals) if mode == "max" else sum(vals) / len(vals)
    return out


def _bin_points(x0, y0, w, h, out_hw, ph, pw, sampling_ratio):
    """``[(y, x)]``: the sampling points of bin ``(ph, pw)`` of a box, in ``(iy, ix)`` row-major order."""
    (oh, ow), bh, bw = out_hw, h / out_hw[0], w / out_hw[1]
    gh = sampling_ratio if sampling_ratio > 0 else max(math.ceil(h / oh), 0)
    gw = sampling_ratio if sampling_ratio > 0 else max(math.ceil(w / ow), 0)
    return [(y0 + ph * bh + (iy + 0.5) * bh / gh, x0 + pw * bw + (ix + 0.5) * bw / gw)
            for iy in range(gh) for ix in range(gw)]


def _align_frame(roi, scale, aligned):
    """RoIAlign's ``(batch, x0, y0, w, h)`` of one roi in the sampling frame."""
    off = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (v * scale - off for v in roi[1:])
    w, h = x2 - x1, y2 - y1
    if not aligned:
        w, h = max(w, 1.0), max(h, 1.0)
    return int(roi[0]), x1, y1, w, h


def ref_roi_align(x, rois, out_hw, scale, sampling_ratio, aligned, mode="avg"):
    def frame(roi):
        return _align_frame(roi, scale, aligned)
    return _align_box(x.tolist(), rois.tolist(), out_hw, frame, sampling_ratio, mode)


def _bilinear_taps(H, W, y, x):
    """``[(i, j, weight)]``: the cells ``_bilinear`` reads for point ``(y, x)`` ([] outside)."""
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return []
    y, x = min(max(y, 0.0), H - 1), min(max(x, 0.0), W - 1)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    y1, x1 = min(y0 + 1, H - 1), min(x0 + 1, W - 1)
    ly, lx = y - y0, x - x0
    return [(y0, x0, (1 - ly) * (1 - lx)), (y0, x1, (1 - ly) * lx), (y1, x0, ly * (1 - lx)), (y1, x1, ly * lx)]


def ref_roi_align_max_grad(x, rois, out_hw, scale, sampling_ratio, aligned, upstream):
    """Max-mode RoIAlign's input gradient, one bin at a time, as the CUDA kernel defines it:
    each bin's gradient goes to the taps of its FIRST maximal sampling point, in (iy, ix)
    row-major order (a later point replaces the best only if strictly greater)."""
    feat, up, (oh, ow) = x.tolist(), upstream.tolist(), out_hw
    _, C, H, W = x.shape
    grad = torch.zeros(x.shape, dtype=torch.float64)
    for r, roi in enumerate(rois.tolist()):
        b, x0, y0, w, h = _align_frame(roi, scale, aligned)
        for c in range(C):
            for ph in range(oh):
                for pw in range(ow):
                    points = _bin_points(x0, y0, w, h, out_hw, ph, pw, sampling_ratio)
                    best = None
                    for y, xx in points:
                        value = _bilinear(feat[b][c], y, xx)
                        if best is None or value > best[0]:
                            best = (value, y, xx)
                    if best is None:
                        continue
                    for i, j, weight in _bilinear_taps(H, W, best[1], best[2]):
                        grad[b, c, i, j] += weight * up[r][c][ph][pw]
    return grad


def _c_round(v):
    return math.floor(v + 0.5) if v >= 0 else -math.floor(-v + 0.5)


def ref_roi_pool(x, rois, out_hw, scale):
    feat, (oh, ow) = x.tolist(), out_hw
    _, C, H, W = x.shape
    out = torch.zeros(len(rois), C, oh, ow, dtype=torch.float64)
    for r, roi in enumerate(rois.tolist()):
        xs, ys, xe, ye = (_c_round(v * scale) for v in roi[1:])
        w, h = max(xe - xs + 1, 1), max(ye - ys + 1, 1)
        for c in range(C):
            for ph in range(oh):
                for pw in range(ow):
                    h0 = min(max(math.floor(ph * h / oh) + ys, 0), H)
                    h1 = min(max(math.ceil((ph + 1) * h / oh) + ys, 0), H)
                    w0 = min(max(math.floor(pw * w / ow) + xs, 0), W)
                    w1 = min(max(math.ceil((pw + 1) * w / ow) + xs, 0), W)
                    cells = [feat[int(roi[0])][c][i][j] for i in range(h0, h1)
                             for j in range(w0, w1)]
                    out[r, c, ph, pw] = max(cells) if cells else 0.0
    return out


def ref_roi_warp(x, rois, out_hw, scale, sampling_ratio, mode):
    def frame(roi):  # RoIPool's quantised box [start, start + size), aligned sampling
        xs, ys, xe, ye = (_c_round(v * scale) for v in roi[1:])
        return int(roi[0]), xs - 0.5, ys - 0.5, max(xe - xs + 1, 1), max(ye - ys + 1, 1)
    return _align_box(x.tolist(), rois.tolist(), out_hw, frame, sampling_ratio, mode)


# ---- test data ------------------------------------------------------------------------------


def make_rois(n_images=2, n=10, extent=40.0, seed=0, dtype=torch.float64):
    """Random boxes plus the awkward ones: partly / wholly outside, zero-size, tiny."""
    g = torch.Generator().manual_seed(seed)
    corners = torch.rand(n, 4, generator=g, dtype=dtype) * (extent + 20) - 10
    boxes = torch.cat([corners[:, :2].min(corners[:, 2:]), corners[:, :2].max(corners[:, 2:])], 1)
    special = torch.tensor([[-30.0, -20.0, -12.0, -5.0],   # wholly outside (top-left)
                            [50.0, 60.0, 90.0, 95.0],      # wholly outside (bottom-right)
                            [-6.0, 4.0, 20.0, 70.0],       # partly outside
                            [8.0, 8.0, 8.0, 8.0],          # zero-size
                            [12.3, 5.1, 12.3, 17.9],       # zero width
                            [3.3, 7.7, 4.1, 8.2]], dtype=dtype)  # smaller than a cell
    boxes = torch.cat([boxes, special])
    index = torch.arange(boxes.shape[0], dtype=dtype)[:, None] % n_images
    return torch.cat([index, boxes], 1)  # (R, 5)


@pytest.fixture
def feature_map():
    torch.manual_seed(0)
    return torch.randn(2, 3, 9, 11, dtype=torch.float64)


# ---- exact agreement with the brute-force references ----------------------------------------


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2, 3])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_roialign_equals_bruteforce_bilinear_sampling(feature_map, aligned, sampling_ratio, mode):
    rois = make_rois()
    got = roi_align(feature_map, rois, (3, 2), 0.25, sampling_ratio, aligned, mode)
    want = ref_roi_align(feature_map, rois, (3, 2), 0.25, sampling_ratio, aligned, mode)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_roipool_equals_bruteforce_quantised_max(feature_map):
    rois = make_rois()
    for scale, size in [(0.25, (3, 2)), (0.5, (2, 4)), (1.0, (1, 1))]:
        torch.testing.assert_close(roi_pool(feature_map, rois, size, scale),
                                   ref_roi_pool(feature_map, rois, size, scale), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roiwarp_equals_bruteforce_quantised_bilinear(feature_map, mode, sampling_ratio):
    rois = make_rois()
    got = roi_warp(feature_map, rois, (3, 2), 0.25, sampling_ratio, mode)
    want = ref_roi_warp(feature_map, rois, (3, 2), 0.25, sampling_ratio, mode)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["align", "pool", "warp"])
def test_ops_accept_noncontiguous_input_and_several_images(op):
    torch.manual_seed(1)
    base = torch.randn(3, 9, 11, 4, dtype=torch.float64)
    x = base.permute(0, 3, 1, 2)[:, ::2]  # (3, 2, 9, 11), neither contiguous nor channels-last
    assert not x.is_contiguous()
    rois = make_rois(n_images=3, seed=3)
    f = {"align": lambda t: roi_align(t, rois, 3, 0.25, 2),
         "pool": lambda t: roi_pool(t, rois, 3, 0.25),
         "warp": lambda t: roi_warp(t, rois, 3, 0.25, 2, "avg")}[op]
    torch.testing.assert_close(f(x), f(x.contiguous()), rtol=0, atol=0)
    ref = {"align": lambda t: ref_roi_align(t, rois, (3, 3), 0.25, 2, True),
           "pool": lambda t: ref_roi_pool(t, rois, (3, 3), 0.25),
           "warp": lambda t: ref_roi_warp(t, rois, (3, 3), 0.25, 2, "avg")}[op]
    torch.testing.assert_close(f(x), ref(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", [lambda x, r: roi_align(x, r, (2, 3), 0.5),
                                lambda x, r: roi_pool(x, r, (2, 3), 0.5),
                                lambda x, r: roi_warp(x, r, (2, 3), 0.5)])
def test_empty_roi_set_gives_empty_output_and_zero_gradient(op):
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64, requires_grad=True)
    out = op(x, torch.zeros(0, 5, dtype=torch.float64))
    assert out.shape == (0, 4, 2, 3)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))


def test_list_of_boxes_equals_rois_with_batch_index(feature_map):
    rois = make_rois()
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    ordered = torch.cat([rois[rois[:, 0] == i] for i in range(2)])
    torch.testing.assert_close(roi_align(feature_map, boxes, 2, 0.25),
                               roi_align(feature_map, ordered, 2, 0.25), rtol=0, atol=0)


# ---- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,op", [
    ("roi_align avg aligned", lambda x, r: roi_align(x, r, (2, 2), 0.5, 2, True, "avg")),
    ("roi_align avg legacy", lambda x, r: roi_align(x, r, (2, 2), 0.5, -1, False, "avg")),
    ("roi_align max aligned", lambda x, r: roi_align(x, r, (2, 2), 0.5, 2, True, "max")),
    ("roi_align max legacy", lambda x, r: roi_align(x, r, (2, 2), 0.5, -1, False, "max")),
    ("roi_pool", lambda x, r: roi_pool(x, r, (2, 2), 0.5)),
    ("roi_warp avg", lambda x, r: roi_warp(x, r, (2, 2), 0.5, 2, "avg")),
    ("roi_warp max", lambda x, r: roi_warp(x, r, (2, 2), 0.5, 2, "max")),
])
def test_gradients_match_finite_differences(name, op):
    torch.manual_seed(2)
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 1.3, 2.2, 9.7, 8.1], [1, -3.0, 0.4, 5.5, 14.2],
                         [1, 6.1, 6.2, 6.1, 9.0], [0, 2.0, 2.0, 13.0, 11.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: op(t, rois), (x,), eps=1e-6, atol=1e-7)


def tied_maps_and_rois():
    """Maps where many sampling points of a bin tie: constant (every inside point equal), and
    ReLU-like (plateaus of zeros; a point outside the map is 0 too). RoIs for 2 x 2 bins at
    scale 1/2, on a 1/4-cell grid with sizes of 1/2 to 8 cells: every sampling point, with 2 or
    the adaptive 1, 2 or 4 points per bin, and so every bilinear weight, is exact in fp64, and
    on the constant map every point inside the map is exactly 2."""
    g = torch.Generator().manual_seed(7)
    constant = torch.full((2, 2, 6, 7), 2.0, dtype=torch.float64)
    relu = torch.randn(2, 2, 6, 7, generator=g, dtype=torch.float64).clamp(min=0)
    relu[:, :, :3, :4] = 0.0  # a plateau larger than a bin
    cells = torch.tensor([[0, 0.5, 1.0, 4.5, 5.0], [1, -1.5, 0.25, 2.5, 2.25], [1, 3.0, 3.0, 3.0, 3.0],
                          [0, 1.0, 1.0, 9.0, 5.0], [0, -2.0, -2.0, 6.0, 2.0], [1, 0.0, 0.0, 1.0, 0.5],
                          [1, 5.25, 3.75, 7.25, 7.75]], dtype=torch.float64)
    rois = cells * torch.tensor([1, 2, 2, 2, 2], dtype=torch.float64)  # in pixels, for scale 1/2
    return (constant, relu), rois


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_roialign_max_gives_a_tied_bins_gradient_to_its_first_maximal_point(aligned, sampling_ratio):
    # On flat regions every sampling point of a bin is a maximum. The CUDA kernel gives the
    # bin's gradient to the first of them; the PyTorch path must do the same (splitting it
    # among the ties, as amax's backward does, moves gradient to other cells).
    maps, rois = tied_maps_and_rois()
    for x in maps:
        leaf = x.clone().requires_grad_(True)
        out = roi_align(leaf, rois, (2, 2), 0.5, sampling_ratio, aligned, "max", backend="torch")
        if x is maps[0]:  # exact ties: 2 inside the map, 0 for a bin with every point outside
            assert set(out.unique().tolist()) <= {0.0, 2.0}
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        (grad,) = torch.autograd.grad(out, leaf, upstream)
        want = ref_roi_align_max_grad(x, rois, (2, 2), 0.5, sampling_ratio, aligned, upstream)
        torch.testing.assert_close(grad, want, rtol=0, atol=1e-12)
        # the forward is the plain max, ties or not
        torch.testing.assert_close(out.detach(), ref_roi_align(x, rois, (2, 2), 0.5, sampling_ratio, aligned, "max"),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_roialign_max_ties_give_the_gradient_the_cuda_kernel_gives(kernel_path, aligned, sampling_ratio):
    # the kernel itself (ops/roi_align.cu, compiled for the CPU) as the oracle for the tied bins
    maps, rois = tied_maps_and_rois()
    for x in maps:
        grads = []
        for op in (lambda t: kernel_path(t, rois, (2, 2), 0.5, sampling_ratio, aligned, "max"),
                   lambda t: roi_align(t, rois, (2, 2), 0.5, sampling_ratio, aligned, "max", backend="torch")):
            leaf = x.clone().requires_grad_(True)
            out = op(leaf)
            upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
            grads.append((out.detach(), torch.autograd.grad(out, leaf, upstream)[0]))
        (out_k, grad_k), (out_t, grad_t) = grads
        torch.testing.assert_close(out_k, out_t, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad_k, grad_t, rtol=0, atol=1e-12)


# ---- the paper's claims ---------------------------------------------------------------------


def test_roialign_samples_exactly_at_the_returned_sampling_points():
    # On a linear map f(y, x) = 3x - 2y + 1, bilinear interpolation is exact inside the map,
    # so RoIAlign's average must equal f averaged over the points sampling_points reports.
    H, W = 20, 30
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64),
                            torch.arange(W, dtype=torch.float64), indexing="ij")
    x = (3 * xx - 2 * yy + 1)[None, None]
    roi = torch.tensor([0, 21.0, 13.0, 77.0, 55.0], dtype=torch.float64)
    for aligned in (True, False):
        for sr in (1, 2, -1):
            pts = sampling_points(roi, (4, 3), sr, 0.25, aligned)  # (4, 3, gh, gw, 2)
            want = (3 * pts[..., 0] - 2 * pts[..., 1] + 1).mean(dim=(2, 3))
            got = roi_align(x, roi[None], (4, 3), 0.25, sr, aligned)[0, 0]
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_sampling_points_are_the_hand_computed_ones():
    # roi_align and sampling_points share _roi_frame / _axis_samples, so the test above cannot
    # see a wrong offset in them. By hand, from §3 (continuous coordinates, no rounding): RoI
    # [21, 13, 77, 55] at scale 1/4 is x [5.25, 19.25], y [3.25, 13.75] in feature cells; a cell's
    # value sits at its centre, so aligned=True subtracts 0.5: x from 4.75, 14 wide, 3 bins of 14/3;
    # y from 2.75, 10.5 high, 4 bins of 2.625. One point per bin sits at its bin's centre.
    roi = torch.tensor([21.0, 13.0, 77.0, 55.0], dtype=torch.float64)
    cases = {True: ([4.75 + 7 / 3, 11.75, 4.75 + 35 / 3], [4.0625, 6.6875, 9.3125, 11.9375]),
             # legacy: no half-cell shift, x from 5.25 and y from 3.25 with the same bins
             False: ([5.25 + 7 / 3, 12.25, 5.25 + 35 / 3], [4.5625, 7.1875, 9.8125, 12.4375])}
    H, W = 20, 30  # a linear map f = 3x - 2y + 1, exact under bilinear interpolation inside it
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    linear = (3 * xx - 2 * yy + 1)[None, None]
    for aligned, (xs, ys) in cases.items():
        want_x = torch.tensor(xs, dtype=torch.float64)[None, :].expand(4, 3)
        want_y = torch.tensor(ys, dtype=torch.float64)[:, None].expand(4, 3)
        pts = sampling_points(roi, (4, 3), 1, 0.25, aligned)
        assert pts.shape == (4, 3, 1, 1, 2)
        torch.testing.assert_close(pts[:, :, 0, 0], torch.stack([want_x, want_y], -1), rtol=0, atol=1e-12)
        # and roi_align itself samples there, with no shared helper in between
        got = roi_align(linear, torch.cat([roi.new_zeros(1), roi])[None], (4, 3), 0.25, 1, aligned)[0, 0]
        torch.testing.assert_close(got, 3 * want_x - 2 * want_y + 1, rtol=0, atol=1e-12)
    # adaptive grid: ceil(10.5 / 4) = 3 x ceil(14 / 3) = 5 points, at the centres of sub-bins
    pts = sampling_points(roi, (4, 3), -1, 0.25, True)
    assert pts.shape == (4, 3, 3, 5, 2)
    bin_y0, bin_x0 = 2.75 + 1 * 2.625, 4.75 + 2 * 14 / 3  # bin (1, 2)
    want = torch.tensor([[[bin_x0 + (ix + 0.5) * 14 / 15, bin_y0 + (iy + 0.5) * 0.875] for ix in range(5)]
                         for iy in range(3)], dtype=torch.float64)
    torch.testing.assert_close(pts[1, 2], want, rtol=0, atol=1e-12)
    # a RoI under one cell, [8, 8, 9, 10] at 1/4 (0.25 x 0.5 cells): legacy stretches it to 1 x 1
    # cell from (2, 2), so its one point is (2.5, 2.5); aligned keeps it: (1.5 + 0.125, 1.5 + 0.25)
    tiny = torch.tensor([8.0, 8.0, 9.0, 10.0], dtype=torch.float64)
    assert sampling_points(tiny, 1, 1, 0.25, False).reshape(2).tolist() == [2.5, 2.5]
    assert sampling_points(tiny, 1, 1, 0.25, True).reshape(2).tolist() == [1.625, 1.75]


def test_roialign_has_no_quantisation_error_and_roipool_does():
    # Shift a box by a fraction of the stride on a linear ramp f(x) = x (feature units):
    # RoIAlign's output moves by exactly shift * scale; RoIPool's and RoIWarp's stay put.
    ramp = torch.arange(40, dtype=torch.float64).repeat(30, 1)[None, None]  # (1, 1, 30, 40)
    scale = 1 / 16
    box = torch.tensor([[0, 96.0, 64.0, 320.0, 288.0]], dtype=torch.float64)
    shift = torch.tensor([[0, 5.0, 0.0, 5.0, 0.0]], dtype=torch.float64)  # 5 px < stride / 2
    align_moves = roi_align(ramp, box + shift, 7, scale, 2) - roi_align(ramp, box, 7, scale, 2)
    torch.testing.assert_close(align_moves, torch.full_like(align_moves, 5 * scale))
    assert torch.equal(roi_pool(ramp, box + shift, 7, scale), roi_pool(ramp, box, 7, scale))
    assert torch.equal(roi_warp(ramp, box + shift, 7, scale), roi_warp(ramp, box, 7, scale))


def test_roiwarp_on_a_grid_aligned_box_equals_roialign(feature_map):
    # Its only difference from RoIAlign is the quantisation of the RoI.
    rois = torch.tensor([[0, 4.0, 8.0, 24.0, 32.0], [1, 0.0, 4.0, 40.0, 20.0]], dtype=torch.float64)
    # RoIPool's "inclusive" quantisation: [x1, x2] -> cells x1/4 .. x2/4, so x2 = last cell start
    pool_rois = rois.clone()
    pool_rois[:, 3:] -= 4.0
    torch.testing.assert_close(roi_warp(feature_map, pool_rois, 3, 0.25, 2, "avg"),
                               roi_align(feature_map, rois, 3, 0.25, 2, True, "avg"))


# ---- torchvision as an oracle ---------------------------------------------------------------


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 4])
def test_roialign_matches_torchvision(aligned, sampling_ratio):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(4)
    x = torch.randn(2, 5, 25, 31)
    rois = make_rois(extent=120.0, n=40, dtype=torch.float32)
    got = roi_align(x, rois, (7, 5), 0.25, sampling_ratio, aligned)
    want = tv.ops.roi_align(x, rois, (7, 5), 0.25, sampling_ratio, aligned)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_roipool_matches_torchvision():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(5)
    x = torch.randn(2, 5, 25, 31, requires_grad=True)
    rois = make_rois(extent=120.0, n=40, dtype=torch.float32)
    for scale, size in [(0.25, (7, 7)), (1 / 16, (2, 3))]:
        got = roi_pool(x, rois, size, scale)
        want = tv.ops.roi_pool(x, rois, size, scale)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        g = torch.randn_like(got)
        torch.testing.assert_close(torch.autograd.grad(got, x, g)[0],
                                   torch.autograd.grad(want, x, g)[0], rtol=1e-6, atol=1e-6)


def test_roipool_rounds_coordinates_as_cs_round_does():
    # floor(|x| + 0.5) rounds the addition: float32's largest value below 0.5 came out 1, and
    # odd integers from 2^23 up came out one higher; C's round (torchvision's) gives 0 and x
    from mrcnn_edu.ops.roi_pool import _round_half_away

    below_half = float(torch.tensor(0.5).nextafter(torch.tensor(0.0)))  # 0.49999997
    x = torch.tensor([below_half, -below_half, 0.5, -0.5, 1.5, 2.5, -2.5, 8388609.0, -8388609.0, 0.0])
    want = [math.copysign(math.floor(abs(v) + 0.5), v) for v in x.tolist()]  # exact in float64
    assert _round_half_away(x).tolist() == want == [0.0, 0.0, 1.0, -1.0, 2.0, 3.0, -3.0, 8388609.0, -8388609.0, 0.0]
    tv = pytest.importorskip("torchvision")
    ramp = torch.arange(8.0).repeat(3, 1)[None, None]  # (1, 1, 3, 8): value = column
    roi = torch.tensor([[0.0, below_half, 0.0, 5.0, 2.0]])
    assert roi_pool(ramp, roi, (1, 3), 1.0).tolist() == tv.ops.roi_pool(ramp, roi, (1, 3), 1.0).tolist()


@pytest.mark.parametrize("chunk_elements", [1 << 24, 5000])
def test_roipool_gathers_rois_of_every_size_in_chunks_and_keeps_their_order(monkeypatch, chunk_elements):
    """RoIs are pooled in chunks of similar window size (one whole-image RoI among small ones
    once made every RoI gather at its size), and, with little memory, in many small chunks:
    the output rows and the gradient must still be torchvision's, in the RoIs' order."""
    tv = pytest.importorskip("torchvision")
    module = sys.modules["mrcnn_edu.ops.roi_pool"]
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(11)
    x = torch.randn(2, 3, 40, 56, requires_grad=True)
    whole = torch.tensor([[1, 0.0, 0.0, 223.0, 159.0], [0, 8.0, 8.0, 12.0, 12.0]])
    rois = torch.cat([make_rois(extent=200.0, n=30, dtype=torch.float32), whole])
    rois = rois[torch.randperm(len(rois))]
    x_start, y_start, width, height = module.quantise_rois(rois, 0.25)
    y_first, y_last = module._bin_edges(y_start, height, 7, 40)
    x_first, x_last = module._bin_edges(x_start, width, 7, 56)
    order, chunks = module._chunks_by_window(y_last - y_first, x_last - x_first, 7 * 7 * 3)
    assert len(chunks) > 1 and sorted(order.tolist()) == list(range(len(rois)))
    assert [c[0] for c in chunks] == [0] + [c[1] for c in chunks[:-1]] and chunks[-1][1] == len(rois)
    got = roi_pool(x, rois, (7, 7), 0.25)
    want = tv.ops.roi_pool(x, rois, (7, 7), 0.25)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0],
                               rtol=1e-6, atol=1e-6)


def test_roipool_gives_a_tied_max_gradient_to_the_first_cell_as_torchvision():
    # Quantised features tie often (e.g. after a ReLU, whole bins of zeros). Each bin's
    # gradient goes to one cell, its first maximum in row-major order: here, a constant map
    # sends every bin's gradient to its top-left cell, as torchvision's kernel does.
    x = torch.ones(1, 2, 8, 8, requires_grad=True)
    rois = torch.tensor([[0, 0.0, 0.0, 31.0, 31.0], [0, 4.0, 8.0, 20.0, 27.0]])
    (grad,) = torch.autograd.grad(roi_pool(x, rois, (2, 2), 0.25).sum(), x)
    want = torch.zeros(8, 8)
    for y0, x0 in [(0, 0), (0, 4), (4, 0), (4, 4)]:  # roi 0: cells 0..7, bins of 4 x 4
        want[y0, x0] += 1
    for y0, x0 in [(2, 1), (2, 3), (5, 1), (5, 3)]:  # roi 1: x cells 1..5 (bins from 1, 3), y 2..7 (2, 5)
        want[y0, x0] += 1
    assert torch.equal(grad, want.expand(1, 2, 8, 8))
    tv = pytest.importorskip("torchvision")
    (tv_grad,) = torch.autograd.grad(tv.ops.roi_pool(x, rois, (2, 2), 0.25).sum(), x)
    assert torch.equal(grad, tv_grad)


def test_roipool_skips_nan_in_the_max_as_torchvision():
    # torchvision's kernel keeps a cell only if `cell > running max` (false for NaN), starting
    # from -FLT_MAX: a NaN never wins, and a bin of nothing but NaN / -inf is -FLT_MAX with
    # no gradient. The reviewer's case: max(1, 5, nan, 3) is 5 (taking the first cell gave 1).
    tv = pytest.importorskip("torchvision")
    nan, inf = float("nan"), float("inf")
    one_bin = torch.tensor([[0, 0.0, 0.0, 1.0, 1.0]])
    x = torch.tensor([[[[1.0, 5.0], [nan, 3.0]]]])
    assert roi_pool(x, one_bin, 1).item() == 5.0 == tv.ops.roi_pool(x, one_bin, 1).item()
    for dtype in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(6)
        x = torch.randn(2, 3, 12, 14, generator=g, dtype=dtype)
        holes = torch.rand(x.shape, generator=g)
        x[holes < 0.3] = nan  # bins with some NaN
        x[(holes > 0.3) & (holes < 0.35)] = -inf
        x[0, :, :4, :4] = nan  # bins of nothing but NaN ...
        x[0, :, 4:6, :4] = -inf  # ... or of -inf
        x[1, 0, :3, :3] = torch.tensor([[nan, -inf, nan], [-inf, nan, nan], [nan, nan, -inf]], dtype=dtype)
        x.requires_grad_(True)
        rois = torch.cat([make_rois(extent=56.0, n=40, seed=1, dtype=dtype),
                          torch.tensor([[0, 0.0, 0.0, 15.0, 15.0], [0, 0.0, 16.0, 15.0, 23.0],
                                        [1, 0.0, 0.0, 11.0, 11.0]], dtype=dtype)])
        for scale, size in [(0.25, (4, 4)), (0.25, (2, 3)), (0.5, (3, 3))]:
            got = roi_pool(x, rois, size, scale)
            want = tv.ops.roi_pool(x, rois, size, scale)
            assert not got.isnan().any() and (got == -torch.finfo(torch.float32).max).any()
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            upstream = torch.randn(got.shape, generator=g, dtype=dtype)
            torch.testing.assert_close(torch.autograd.grad(got, x, upstream)[0],
                                       torch.autograd.grad(want, x, upstream)[0], rtol=1e-6, atol=1e-6)


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("rois,message", [
    (torch.zeros(3, 4), "rois must have shape"),
    (torch.tensor([[2.0, 0, 0, 4, 4]]), "batch_index"),
    (torch.tensor([[-1.0, 0, 0, 4, 4]]), "batch_index"),
    (torch.tensor([[0.5, 0, 0, 4, 4]]), "batch_index"),
    (torch.tensor([[0.0, 0, float("nan"), 4, 4]]), "finite"),
    (torch.tensor([[0.0, 0, 0, float("inf"), 4]]), "finite"),
    (torch.zeros(1, 5, dtype=torch.int64), "floating point"),
    (torch.zeros(1, 5, device="meta"), "on meta"),
])
@pytest.mark.parametrize("op", [roi_align, roi_pool, roi_warp])
def test_bad_rois_get_a_clear_error(op, rois, message):
    with pytest.raises(ValueError, match=message):
        op(torch.zeros(2, 3, 8, 8), rois, 2)


def test_bad_arguments_get_a_clear_error():
    x, rois = torch.zeros(1, 3, 8, 8), torch.tensor([[0.0, 0, 0, 4, 4]])
    with pytest.raises(ValueError, match="input must be an"):
        roi_align(torch.zeros(3, 8, 8), rois, 2)
    with pytest.raises(ValueError, match="output_size"):
        roi_align(x, rois, (2, 0))
    with pytest.raises(ValueError, match="mode"):
        roi_align(x, rois, 2, mode="sum")
    with pytest.raises(ValueError, match="spatial_scale"):
        roi_pool(x, rois, 2, spatial_scale=0.0)
    with pytest.raises(ValueError, match="backend"):
        roi_align(x, rois, 2, backend="triton")
    with pytest.raises(ValueError, match="cupy"):
        roi_align(x, rois, 2, backend="cupy")  # CPU tensors


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_CUDA)])
def test_divide_is_the_correctly_rounded_quotient_on_every_device(device):
    # PyTorch's CUDA kernels divide by a Python number through its reciprocal: 21 / 7 is
    # 3.0000002 there. The fp64 quotient rounded to fp32 is the correctly rounded fp32 one.
    from mrcnn_edu.ops.roi_align import divide

    numerators = torch.arange(1, 4001, dtype=torch.float64) * 0.75
    for d in (3, 7, 14, 28):
        got = divide(numerators.to(device, torch.float32), d).cpu()
        assert torch.equal(got, (numerators / d).to(torch.float32)), d


@_CUDA
def test_pytorch_paths_on_cuda_sample_what_they_sample_on_the_cpu():
    # RoIs whose sizes in cells are multiples of the bins (21 / 7 = 3, 14 / 7 = 2), where a
    # quotient rounded up by one ulp moves RoIPool's bin edges (ceil) and RoIAlign's points
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 40, 52, generator=g)
    starts = torch.randint(0, 20, (12, 2), generator=g).double() * 4  # cell starts, in pixels
    cells = torch.tensor([[21, 14], [14, 21], [28, 7], [7, 28]]).repeat(3, 1).double()
    boxes = torch.cat([starts, starts + (cells - 1) * 4], 1)  # RoIPool: cells start..end inclusive
    rois = torch.cat([torch.arange(12).remainder(2)[:, None].double(), boxes], 1).float()
    ops = [lambda t, r: roi_pool(t, r, 7, 0.25),
           lambda t, r: roi_warp(t, r, 7, 0.25, 2, "max"),
           lambda t, r: roi_align(t, r, 7, 0.25, 2, backend="torch"),
           lambda t, r: roi_align(t, r, 7, 0.25, -1, mode="max", backend="torch")]
    for op in ops:
        on_cpu, on_gpu = op(x, rois), op(x.cuda(), rois.cuda()).cpu()
        torch.testing.assert_close(on_gpu, on_cpu, rtol=0, atol=1e-6)


_BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "roi_align.py"


def test_benchmark_script_prints_a_timed_row_per_case_and_method(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(_BENCH_SCRIPT), "--quick", "--device", "cpu", "--iters", "1"])
    bench = runpy.run_path(str(_BENCH_SCRIPT), run_name="__main__")
    printed = capsys.readouterr().out
    methods = [name for name, _ in bench["candidates"](torch.device("cpu"), 2, True)]
    row = re.compile(r"^(\d+) -> (\d+)x\2\s+(.+?)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$")
    rows = {}
    for line in printed.splitlines():
        match = row.match(line)
        if match:
            n, size, name, *numbers = match.groups()
            rows[int(n), int(size), name] = numbers
    # --quick's two cases, each timed for every method the script benchmarks here
    assert set(rows) == {(n, size, name) for n, size in [(64, 7), (32, 14)] for name in methods}
    for key, (forward, both, forward_ratio, both_ratio) in rows.items():
        times = [float(forward), float(both)]
        assert all(math.isfinite(t) and t > 0 for t in times), (key, times)
        if "torchvision" not in methods:  # no reference: the ratios are dashes
            assert (forward_ratio, both_ratio) == ("-", "-"), key
            continue
        reference = [float(v) for v in rows[key[0], key[1], "torchvision"][:2]]
        for t, ref, ratio in zip(times, reference, (float(forward_ratio), float(both_ratio))):
            # ours / torchvision's, from times printed to 0.0005 ms and a ratio to 0.005
            low, high = (t - 5e-4) / (ref + 5e-4), (t + 5e-4) / (ref - 5e-4)
            assert low - 5e-3 <= ratio <= high + 5e-3, (key, t, ref, ratio)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_CUDA)])
@pytest.mark.parametrize("aligned", [True, False])
def test_benchmarked_methods_compute_what_the_torch_path_computes(device, aligned):
    # a timing is only comparable if every method computes the same RoIAlign: the script's own
    # calls (scale, sampling ratio, aligned, RoI dtype) on its --quick inputs
    bench = runpy.run_path(str(_BENCH_SCRIPT), run_name="bench_roi_align")
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 25, 42, generator=g).to(device)
    rois = bench["make_rois"](64, (100, 168), 2, g).to(device)
    methods = bench["candidates"](device, 2, aligned)
    assert "ours torch" in [name for name, _ in methods]
    want = roi_align(x, rois, 7, 0.25, 2, aligned, backend="torch")
    assert want.abs().sum() > 0  # RoIs on the map, not a comparison of zeros
    for name, fn in methods:
        features = x
        if fn == "channels_last":  # as the script: the first method on a channels-last input
            features, fn = x.contiguous(memory_format=torch.channels_last), methods[0][1]
        torch.testing.assert_close(fn(features, rois, 7), want, rtol=1e-5, atol=1e-5,
                                   msg=lambda text, name=name: f"{name}: {text}")


def test_roiwarp_of_a_box_on_the_grid_is_roialign_of_that_box_one_cell_larger():
    # RoIPool's inclusive end: [4, 24) x [8, 32) at stride 4 covers cells 1..6 x 2..8, so the warp
    # samples [4, 28) x [8, 36) -- the docstring's example, and the whole of RoIWarp vs RoIAlign
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    warped = roi_warp(x, torch.tensor([[0, 4.0, 8.0, 24.0, 32.0]]), (2, 2), 0.25, 2, mode="avg")
    assert torch.equal(warped, roi_align(x, torch.tensor([[0, 4.0, 8.0, 28.0, 36.0]]), (2, 2), 0.25, 2, True))
    assert not torch.allclose(warped, roi_align(x, torch.tensor([[0, 4.0, 8.0, 24.0, 32.0]]), (2, 2), 0.25, 2, True))


@pytest.mark.parametrize("op", [roi_align, roi_warp])
def test_the_torch_path_samples_in_the_inputs_precision_under_autocast(op):
    # RoIAlign is resampling, not a learned layer: bf16 autocast (train.amp=bf16) must not lower
    # its precision (its tap product is a matmul, which autocast would otherwise run in bf16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 20, 24, generator=g)
    rois = torch.tensor([[0, 3.3, 5.1, 60.7, 70.2], [1, 10.0, 0.5, 90.0, 41.3], [0, 1.0, 1.0, 2.5, 3.0]])
    want = op(x, rois, 7, 0.25, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = op(x, rois, 7, 0.25, 2)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_roialign_of_a_map_without_channels_is_empty_as_torchvisions():
    out = roi_align(torch.zeros(1, 0, 8, 8), torch.tensor([[0, 1.0, 1.0, 6.0, 6.0]]), 2, 1.0, 2)
    assert out.shape == (1, 0, 2, 2)


def test_adaptive_roialign_of_only_empty_rois_stays_on_the_graph():
    # as an empty list of RoIs does: a loss over them is a zero whose backward runs
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    out = roi_align(x, torch.tensor([[0, 2.0, 2.0, 2.0, 2.0], [0, 5.0, 1.0, 5.0, 9.0]]), (2, 2), 1.0, 0, True)
    assert out.shape == (2, 3, 2, 2) and not out.any()
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert not grad.any()


# ---- backend="auto" dispatch, without a GPU ---------------------------------------------------


class _LooksCuda(torch.Tensor):
    """A CPU tensor that answers ``is_cuda`` True: all roi_align's dispatch reads of the device."""

    @property
    def is_cuda(self):
        return True


class _BrokenCupyFinder:
    """Finds a ``cupy`` whose import raises, as on a machine with cupy but a broken CUDA install."""

    def __init__(self, error):
        self.error, self.imports = error, 0

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name == "cupy" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        self.imports += 1
        raise self.error


@pytest.fixture
def roi_align_module(monkeypatch):
    """mrcnn_edu.ops.roi_align (the package re-exports a function of the same name), with
    cupy_available's cached answer cleared before and after: the test changes what it finds."""
    module = importlib.import_module("mrcnn_edu.ops.roi_align")
    module.cupy_available.cache_clear()
    yield module
    monkeypatch.undo()  # the real import machinery back before the next probe
    module.cupy_available.cache_clear()


@pytest.fixture
def stand_in_kernel(monkeypatch):
    """Replaces the CuPy kernel module with one that records its calls (it needs no CUDA)."""
    calls = []
    kernel = type(sys)("mrcnn_edu.ops.roi_align_cupy")
    kernel.roi_align_cupy = lambda *args: calls.append(args) or torch.full((1, 2, 2, 2), -7.0)
    kernel.SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    monkeypatch.setitem(sys.modules, "mrcnn_edu.ops.roi_align_cupy", kernel)
    return calls


@pytest.mark.parametrize("error", [None, ImportError("libcudart.so.12: cannot open shared object file"),
                                   RuntimeError("CUDA driver version is insufficient"), OSError("libnvrtc")],
                         ids=["missing", "ImportError", "RuntimeError", "OSError"])
def test_a_missing_or_broken_cupy_sends_every_call_to_the_torch_path(roi_align_module, stand_in_kernel,
                                                                     monkeypatch, error):
    monkeypatch.delitem(sys.modules, "cupy", raising=False)  # a real one imported earlier would be reused
    if error is None:
        monkeypatch.setitem(sys.modules, "cupy", None)  # how Python marks a module as not importable
    else:
        finder = _BrokenCupyFinder(error)
        monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    assert roi_align_module.cupy_available() is False
    if error is not None:
        assert finder.imports == 1  # the import was tried, and failed, rather than never found
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    rois = torch.tensor([[0, 1.0, 2.0, 27.0, 30.0]], dtype=torch.float64)
    want = ref_roi_align(x, rois, (2, 2), 0.25, -1, True)
    for inputs in [(x, rois), (x.as_subclass(_LooksCuda), rois.as_subclass(_LooksCuda))]:
        torch.testing.assert_close(roi_align(*inputs, 2, 0.25, backend="auto").as_subclass(torch.Tensor), want,
                                   rtol=0, atol=1e-12)
    assert stand_in_kernel == []
    with pytest.raises(ValueError, match="cupy is not importable"):  # forced, it says why, not crash
        roi_align(x.as_subclass(_LooksCuda), rois.as_subclass(_LooksCuda), 2, backend="cupy")


def test_auto_backend_uses_the_cupy_kernel_for_cuda_tensors_only(roi_align_module, stand_in_kernel, monkeypatch):
    monkeypatch.setattr(roi_align_module, "cupy_available", lambda: True)
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    rois = torch.tensor([[0, 1.0, 2.0, 27.0, 30.0]], dtype=torch.float64)
    # CPU tensors: the torch path, even with cupy importable (the kernel needs device memory)
    torch.testing.assert_close(roi_align(x, rois, 2, 0.25, backend="auto"),
                               ref_roi_align(x, rois, (2, 2), 0.25, -1, True), rtol=0, atol=1e-12)
    assert stand_in_kernel == []
    # CUDA tensors: the kernel, with the validated arguments
    fake_x, fake_rois = x.as_subclass(_LooksCuda), rois.as_subclass(_LooksCuda)
    out = roi_align(fake_x, fake_rois, (2, 2), 0.25, 3, False, "max", backend="auto")
    assert (out == -7.0).all() and len(stand_in_kernel) == 1
    assert stand_in_kernel[0][2:] == ((2, 2), 0.25, 3, False, "max")
    # ... unless the torch path is asked for
    roi_align(fake_x, fake_rois, 2, 0.25, backend="torch")
    assert len(stand_in_kernel) == 1
    # ... or the kernel has no build for the dtype (float8 on a GPU: the torch path computes it)
    monkeypatch.setattr(sys.modules["mrcnn_edu.ops.roi_align_cupy"], "SUPPORTED_DTYPES", (torch.float32,))
    roi_align(fake_x, fake_rois, 2, 0.25, backend="auto")
    assert len(stand_in_kernel) == 1
    monkeypatch.setattr(sys.modules["mrcnn_edu.ops.roi_align_cupy"], "SUPPORTED_DTYPES", (torch.float64,))
    # ... or a deterministic backward is asked for (the kernel's atomics add in varying order)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        roi_align(fake_x.requires_grad_(True), fake_rois, 2, 0.25, backend="auto")
        assert len(stand_in_kernel) == 1
        with torch.no_grad():  # no backward to come: the kernel
            roi_align(fake_x, fake_rois, 2, 0.25, backend="auto")
        assert len(stand_in_kernel) == 2
    finally:
        torch.use_deterministic_algorithms(was)


def _mnc_roi_warping_forward(x: torch.Tensor, rois: torch.Tensor, oh: int, ow: int, scale: float) -> torch.Tensor:
    """MNC's Caffe RoIWarping forward pass (max), read from daijifeng001/caffe-mnc's
    ``roi_warping_layer.cu`` and written as loops: the RoI rounded to cells with no "+1"; per
    bin, the points ``bin + k / ceil(size / bins)`` for k = 0.. while inside the bin's closed
    range (edges included); cell j's value at j; points outside [-0.5, H - 0.5] skipped; an
    empty bin 0. (Caffe steps ``fph += 1 / ratio`` in the blob's dtype; here in float64.)"""
    def c_round(v):
        return math.floor(abs(v) + 0.5) * (1 if v >= 0 else -1)

    def bilinear(plane, h, w):
        H, W = plane.shape
        if h < -0.5 or h > H - 0.5 or w < -0.5 or w > W - 0.5:
            return None
        h, w = max(h, 0.0), max(w, 0.0)
        h_lo, w_lo = int(h), int(w)
        h_hi, w_hi = h_lo + 1, w_lo + 1
        if h_lo >= H - 1:  # at the last row: both taps on it
            h_lo = h_hi = H - 1
            h = float(h_lo)
        if w_lo >= W - 1:
            w_lo = w_hi = W - 1
            w = float(w_lo)
        dh, dw = h - h_lo, w - w_lo
        return float((1 - dh) * (1 - dw) * plane[h_lo, w_lo] + (1 - dh) * dw * plane[h_lo, w_hi]
                     + dh * (1 - dw) * plane[h_hi, w_lo] + dh * dw * plane[h_hi, w_hi])

    out = torch.zeros(len(rois), x.shape[1], oh, ow, dtype=x.dtype)
    for r, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        x_start, y_start = c_round(x1 * scale), c_round(y1 * scale)
        width, height = max(c_round(x2 * scale) - x_start, 0), max(c_round(y2 * scale) - y_start, 0)
        steps = [1 / math.ceil(height / oh) if height else 2.0, 1 / math.ceil(width / ow) if width else 2.0]
        for c in range(x.shape[1]):
            for i in range(oh):
                for j in range(ow):
                    values, fy = [], float(i)
                    while fy <= i + 1:
                        fx = float(j)
                        while fx <= j + 1:
                            values.append(bilinear(x[int(b), c], y_start + fy * height / oh, x_start + fx * width / ow))
                            fx += steps[1]
                        fy += steps[0]
                    values = [v for v in values if v is not None]
                    out[r, c, i, j] = max(values) if values else 0.0
    return out


def test_roi_warp_is_the_papers_description_and_differs_from_mncs_layer_as_documented():
    """roi_pool.py's docstring: on a ramp (cell j holds j), box [4, 8, 24, 32] at stride 4, 5
    bins, max, MNC's layer gives 2, 3, 4, 5, 6 and roi_warp 1.4, 2.6, 3.8, 5.0, 6.2: the same
    centre, MNC's box one cell smaller. Both quantise the RoI as RoIPool does."""
    ramp = torch.arange(12, dtype=torch.float64).expand(1, 1, 12, 12).contiguous()
    rois = torch.tensor([[0, 4.0, 8.0, 24.0, 32.0]], dtype=torch.float64)
    mnc = _mnc_roi_warping_forward(ramp, rois, 1, 5, 0.25).flatten()
    ours = roi_warp(ramp, rois, (1, 5), 0.25, 2, "max").flatten()
    torch.testing.assert_close(mnc, torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64))
    torch.testing.assert_close(ours, torch.tensor([1.4, 2.6, 3.8, 5.0, 6.2], dtype=torch.float64))
    # the quantised RoI they share: RoIPool's, cells 1..6 -- both centred on x = 4 (cell centres)
    assert roi_pool(ramp, rois, (1, 5), 0.25).flatten().tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    # and a random map: they differ by a fraction of the features' spread, not by a shift of cells
    torch.manual_seed(0)
    x = torch.randn(1, 2, 20, 20, dtype=torch.float64)
    boxes = torch.tensor([[0, 13.0, 9.0, 61.0, 70.0], [0, 2.0, 2.0, 77.0, 50.0]], dtype=torch.float64)
    gap = (_mnc_roi_warping_forward(x, boxes, 7, 7, 0.25) - roi_warp(x, boxes, 7, 0.25, 2, "max")).abs()
    assert 0 < gap.mean() < x.abs().mean()
