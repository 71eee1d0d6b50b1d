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


# half an ulp of the storage type, relative: 2^-11 (fp16, 11-bit significand), 2^-8 (bf16)
@pytest.mark.parametrize("dtype,atol,half_ulp", [(torch.float16, 2e-3, 2.0 ** -11),
                                                 (torch.bfloat16, 2e-2, 2.0 ** -8)])
def test_half_precision_inputs_accumulate_in_fp32(dtype, atol, half_ulp):
    # Same half-precision input for both: the only differences left are the final rounding
    # of the output to the storage type (half an ulp of values of order 1).
    x, rois = make_case(dtype=dtype)
    out_k = roi_align(x, rois, 7, 0.25, 2, backend="cupy")
    assert out_k.dtype == dtype
    out_ref = roi_align(x.double(), rois, 7, 0.25, 2, backend="torch")
    torch.testing.assert_close(out_k.double(), out_ref, rtol=0, atol=atol)
    # Backward, for a random upstream gradient in the storage type (as autograd hands it):
    # the kernel sums each cell's gradient in fp32 and rounds the sum to the storage type
    # once. Against the exact (fp64) gradient of the same rounded input and upstream gradient,
    # that leaves half an ulp of each element, relative, held here with a factor 2 to spare,
    # plus the fp32 sums' error (~3e-5 here, as in the fp32 test; atol is 2e-5 of the
    # gradient's scale, ~2.5e-4). Measured by running the same kernel compiled for the CPU
    # on these inputs: at most 0.49 of this bound. A gradient 0.5% (fp16) or 1% (bf16) off,
    # or off by one more ulp of the storage type per element (the least that summing in it
    # would add), does not pass.
    leaf = x.detach().requires_grad_(True)
    out = roi_align(leaf, rois, 7, 0.25, 2, backend="cupy")
    upstream = torch.randn(out.shape, generator=torch.Generator("cuda").manual_seed(1),
                           device="cuda").to(dtype)
    (grad,) = torch.autograd.grad(out, leaf, upstream)
    assert grad.dtype == dtype
    exact_leaf = x.detach().double().requires_grad_(True)
    exact_out = roi_align(exact_leaf, rois.double(), 7, 0.25, 2, backend="torch")
    (exact,) = torch.autograd.grad(exact_out, exact_leaf, upstream.double())
    scale = float(exact.abs().max())
    assert scale > 1  # the comparison below is about something
    torch.testing.assert_close(grad.double(), exact, rtol=2 * half_ulp, atol=2e-5 * scale)


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("aligned", [True, False])
def test_cupy_gradcheck_in_float64(mode, aligned):
    x, rois = make_case(n=2, c=2, h=7, w=8, n_rois=6, scale=0.5, dtype=torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: roi_align(t, rois, (2, 3), 0.5, -1, aligned, mode, backend="cupy"), (x,),
        eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize("aligned", [True, False])
def test_max_mode_gives_a_tied_bins_gradient_to_the_same_point_in_both_paths(aligned,
                                                                            sampling_ratio):
    # On flat regions every sampling point of a bin is a maximum: a constant map, a ReLU's
    # zeros (points outside the map are 0 too). The kernel gives the bin's gradient to the
    # first maximal point; the PyTorch path (max(dim) on the GPU) must pick the same one.
    # RoIs on a 1/4-cell grid with sizes of 1/2 to 8 cells for 2 x 2 bins: exact ties in fp64.
    g = torch.Generator().manual_seed(7)
    constant = torch.full((2, 3, 6, 7), 2.0, dtype=torch.float64)
    relu = torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64).clamp(min=0)
    relu[:, :, :3, :4] = 0.0
    cells = torch.tensor([[0, 0.5, 1.0, 4.5, 5.0], [1, -1.5, 0.25, 2.5, 2.25],
                          [1, 3.0, 3.0, 3.0, 3.0], [0, 1.0, 1.0, 9.0, 5.0],
                          [0, -2.0, -2.0, 6.0, 2.0], [1, 0.0, 0.0, 1.0, 0.5],
                          [1, 5.25, 3.75, 7.25, 7.75]], dtype=torch.float64)
    rois = (cells * torch.tensor([1, 2, 2, 2, 2], dtype=torch.float64)).cuda()  # scale 1/2
    for features in (constant.cuda(), relu.cuda()):
        results = []
        for backend in ("cupy", "torch"):
            leaf = features.clone().requires_grad_(True)
            out = roi_align(leaf, rois, 2, 0.5, sampling_ratio, aligned, "max", backend=backend)
            upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(8),
                                   dtype=torch.float64).cuda()
            results.append((out.detach(), torch.autograd.grad(out, leaf, upstream)[0]))
        (out_k, grad_k), (out_t, grad_t) = results
        torch.testing.assert_close(out_k, out_t, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad_k, grad_t, rtol=0, atol=1e-12)


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


def test_auto_backend_takes_the_deterministic_torch_path_when_asked(monkeypatch):
    """The CuPy backward's atomics vary from run to run; under use_deterministic_algorithms a
    backward goes through the PyTorch path (auto), and an explicit backend='cupy' refuses."""
    import mrcnn_edu.ops.roi_align_cupy as cupy_path

    x, rois = make_case()
    used = []
    real = cupy_path.roi_align_cupy
    monkeypatch.setattr(cupy_path, "roi_align_cupy", lambda *a, **k: (used.append(1), real(*a, **k))[1])
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        grads = []
        for _ in range(2):
            leaf = x.detach().requires_grad_(True)
            roi_align(leaf, rois, 7, 0.25, 2).sum().backward()
            grads.append(leaf.grad)
        assert not used and torch.equal(grads[0], grads[1])
        roi_align(x, rois, 7, 0.25, 2)  # no gradient wanted: the kernel still runs
        assert used
        leaf = x.detach().requires_grad_(True)
        with pytest.raises(RuntimeError, match="adds with float atomics"):
            roi_align(leaf, rois, 7, 0.25, 2, backend="cupy").sum().backward()
        # RoIs that require grad get none: no backward to refuse (it raised, for nothing)
        out = roi_align(x, rois.detach().requires_grad_(True), 7, 0.25, 2)
        assert not out.requires_grad and len(used) == 2
    finally:
        torch.use_deterministic_algorithms(was)


def test_empty_roi_set_on_gpu():
    x, _ = make_case()
    leaf = x.requires_grad_(True)
    out = roi_align(leaf, torch.zeros(0, 5, device="cuda"), 7, backend="cupy")
    assert out.shape == (0, 32, 7, 7)
    out.sum().backward()
    assert torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_kernel_runs_on_pytorchs_current_stream():
    # Nothing here reads a value back to the host (a synchronisation, which would hide a
    # kernel on the wrong stream): check_values=False skips the RoI check's read. Each stream
    # is kept busy with a sleeping kernel, so that a kernel launched on any other stream than
    # the side one (PyTorch's current stream in the block) gets a wrong answer:
    # - the side stream sleeps before it writes the input: a kernel on a stream that does not
    #   wait for it reads the NaNs the input holds until then;
    # - the main (default, also CuPy's null) stream sleeps twice as long: a kernel queued
    #   there runs after the side stream has already copied the output that it had not
    #   written yet. (The input has values no earlier call computed, so that memory reused
    #   from one cannot hold the right output by chance.)
    x, rois = make_case()
    roi_align(x, rois, 7, 0.25, 2, backend="cupy")  # compiled now: the sleeps must outlast the host
    source = x + 1.0
    want = roi_align(source, rois, 7, 0.25, 2, backend="torch")
    y = torch.full_like(x, float("nan"))
    main, side = torch.cuda.current_stream(), torch.cuda.Stream()
    side.wait_stream(main)  # source, want, y and rois are ready
    torch.cuda._sleep(2 * 10**8)  # on main: ~0.1 s at ~2 GHz
    with torch.cuda.stream(side):
        torch.cuda._sleep(10**8)
        y.copy_(source)  # queued on the side stream; the kernel must see it finished
        out = roi_align(y, rois, 7, 0.25, 2, backend="cupy", check_values=False)
        seen = out.clone()  # what the side stream's next op reads
    main.wait_stream(side)
    torch.testing.assert_close(seen, want, rtol=0, atol=1e-5)


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
