"""The CuPy RoIAlign kernel (ops/roi_align.cu) against the PyTorch path, on a CUDA GPU.

Skipped cleanly without cupy or CUDA. The PyTorch path is itself checked against brute force
and torchvision in test_roi_ops.py, so equality with it is equality with the definition.
"""
import pytest
import torch

cupy = pytest.importorskip("cupy")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from mrcnn_edu.ops import roi_align  # noqa: E402


def make_case(n=2, c=32, h=40, w=52, n_rois=200, scale=0.25, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    H, W = h / scale, w / scale
    xy = torch.rand(n_rois, 2, generator=g, dtype=torch.float64) * torch.tensor([W, H]) * 1.2 - 10
    wh = torch.exp(torch.rand(n_rois, 2, generator=g, dtype=torch.float64) * 5.5)  # 1..245 px
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[:4] = torch.tensor([[-80.0, -60, -30, -20], [30, 30, 30, 30],  # outside; zero-size
                              [-20, 10, 60, 400], [W + 5, H + 5, W + 50, H + 80]])
    index = torch.randint(0, n, (n_rois, 1), generator=g).double()
    return x.to("cuda", dtype), torch.cat([index, boxes], 1).to("cuda", torch.float32)


def both_paths(x, rois, size, **kw):
    """Forward and input-gradient of the CuPy and the PyTorch paths for one random grad, and of
    the PyTorch path in float64 (the exact values, to fp32's eyes)."""
    results = []
    grad = None
    for backend, dtype in (("cupy", x.dtype), ("torch", x.dtype), ("torch", torch.float64)):
        leaf = x.detach().to(dtype).requires_grad_(True)
        out = roi_align(leaf, rois.to(dtype), size, backend=backend, **kw)
        if grad is None:
            grad = torch.randn(out.shape, generator=torch.Generator("cuda").manual_seed(1),
                               device="cuda", dtype=out.dtype)
        (g,) = torch.autograd.grad(out, leaf, grad.to(dtype))
        results.append((out, g))
    return results


def largest_error(approx, exact):
    return float((approx.double() - exact).abs().max())


@pytest.mark.parametrize("channels_last", [False, True])  # the kernel's two thread orders
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 2, 3])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_cupy_forward_and_backward_equal_pytorch_in_fp32(channels_last, aligned, sampling_ratio,
                                                         mode):
    x, rois = make_case()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    (out_k, grad_k), (out_t, grad_t), (_, grad_exact) = both_paths(
        x, rois, (7, 5), spatial_scale=0.25, sampling_ratio=sampling_ratio, aligned=aligned,
        mode=mode)
    # forward: the same operations in the same order (exact division in both, no FMA)
    torch.testing.assert_close(out_k, out_t, rtol=0, atol=1e-5)
    # backward: each input cell sums the gradients of every bin that sampled it, by atomics in
    # an order no two runs share, so the two fp32 sums round differently: up to 2.9e-5 apart on
    # an H200, where the PyTorch path's own gradient is up to 3.5e-5 from the exact one. The
    # kernel's gradient is held to that accuracy: as close to the exact gradient as the
    # PyTorch path's (a wrong gradient would be O(1) off).
    error_k, error_t = largest_error(grad_k, grad_exact), largest_error(grad_t, grad_exact)
    assert error_t < 1e-4, error_t
    assert error_k <= 1.5 * error_t, (error_k, error_t)


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_inputs_accumulate_in_fp32(dtype, atol):
    # Same half-precision input for both: the only differences left are the final rounding
    # of the output to the storage type (half an ulp of values of order 1).
    x, rois = make_case(dtype=dtype)
    out_k = roi_align(x, rois, 7, 0.25, 2, backend="cupy")
    assert out_k.dtype == dtype
    out_ref = roi_align(x.double(), rois, 7, 0.25, 2, backend="torch")
    torch.testing.assert_close(out_k.double(), out_ref, rtol=0, atol=atol)
    leaf = x.detach().requires_grad_(True)
    roi_align(leaf, rois, 7, 0.25, 2, backend="cupy").float().sum().backward()
    assert leaf.grad.dtype == dtype and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("aligned", [True, False])
def test_cupy_gradcheck_in_float64(mode, aligned):
    x, rois = make_case(n=2, c=2, h=7, w=8, n_rois=6, scale=0.5, dtype=torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: roi_align(t, rois, (2, 3), 0.5, -1, aligned, mode, backend="cupy"), (x,),
        eps=1e-6, atol=1e-7)


def test_cupy_reads_channels_last_and_noncontiguous_inputs():
    x, rois = make_case()
    want = roi_align(x, rois, 7, 0.25, 2, backend="torch")
    for variant in (x.contiguous(memory_format=torch.channels_last),
                    torch.stack([x, x], -1)[..., 0]):
        torch.testing.assert_close(roi_align(variant, rois, 7, 0.25, 2, backend="cupy"), want,
                                   rtol=0, atol=1e-5)


def test_auto_backend_uses_cupy_and_matches_torchvision():
    # torchvision's kernel is built with fused multiply-adds (nvcc's default), so its sampling
    # coordinates round differently from ours by an ulp, which the bilinear weights carry into
    # the output: 1.0e-5 apart at most on an H200, where each is ~1e-5 from the exact values.
    # So both are compared with the exact (fp64) result: ours must be as accurate as theirs.
    tv = pytest.importorskip("torchvision")
    x, rois = make_case()
    for aligned in (True, False):
        for sr in (-1, 2):
            ours = roi_align(x, rois, 7, 0.25, sr, aligned)
            theirs = tv.ops.roi_align(x, rois, 7, 0.25, sr, aligned)
            exact = roi_align(x.double(), rois.double(), 7, 0.25, sr, aligned, backend="torch")
            assert largest_error(theirs, exact) < 1e-4
            assert largest_error(ours, exact) <= 1.5 * largest_error(theirs, exact)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)


def test_empty_roi_set_on_gpu():
    x, _ = make_case()
    leaf = x.requires_grad_(True)
    out = roi_align(leaf, torch.zeros(0, 5, device="cuda"), 7, backend="cupy")
    assert out.shape == (0, 32, 7, 7)
    out.sum().backward()
    assert torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_kernel_runs_on_pytorchs_current_stream():
    x, rois = make_case()
    want = roi_align(x, rois, 7, 0.25, 2, backend="torch")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = x * 1.0  # queued on the side stream; the kernel must see it finished
        out = roi_align(y, rois, 7, 0.25, 2, backend="cupy")
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)


def test_bad_rois_on_gpu_are_value_errors_not_crashes():
    x, rois = make_case()
    bad = rois.clone()
    bad[3, 0] = 7  # batch index out of range
    with pytest.raises(ValueError, match="batch_index"):
        roi_align(x, bad, 7, backend="cupy")
    with pytest.raises(ValueError, match="on cpu"):
        roi_align(x, rois.cpu(), 7, backend="cupy")
    torch.cuda.synchronize()  # the context is still healthy
    assert torch.isfinite(roi_align(x, rois, 7, backend="cupy")).all()
