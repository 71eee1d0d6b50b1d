"""The CUDA source of the CuPy RoIAlign (ops/roi_align.cu), checked without a GPU.

Two independent checks that run on any machine with the test dependencies:

1. NVRTC -- the compiler CuPy uses -- accepts the source for all four storage types with the
   very options ``roi_align_cupy`` passes (plus CuPy's own). NVRTC ships with PyTorch's CUDA
   wheels (``nvidia-cuda-nvrtc``, reached through ``cuda-bindings``); it needs no GPU or driver.
2. The kernels, compiled as plain C++ with ``cuda_on_cpu/cuda_shim.h``, run on the CPU behind the
   real ``RoIAlignCuPy`` autograd function (only the CuPy launch is swapped out), and must equal
   the PyTorch path -- itself checked against brute force and torchvision in test_roi_ops.py --
   forward and backward, avg and max, aligned and legacy, fixed and adaptive sampling.

What only a GPU shows (half-precision arithmetic, racing atomics, streams, DLPack) stays in
test_roi_align_cuda.py.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from mrcnn_edu.ops import roi_align
from mrcnn_edu.ops import roi_align_cupy as cupy_path

SHIM = Path(__file__).with_name("cuda_on_cpu") / "cuda_shim.h"


# ---- 1. NVRTC -----------------------------------------------------------------------------

def _nvrtc():
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="needs cuda-bindings (NVRTC)")
    try:
        nvrtc.nvrtcVersion()
    except Exception as error:  # the wheel is there but libnvrtc is not
        pytest.skip(f"NVRTC is not loadable: {error}")
    return nvrtc


def _nvrtc_compile(nvrtc, source: str, options: list[str]) -> tuple[bool, str, str]:
    """(success, log, ptx) of one NVRTC compilation."""
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"roi_align.cu", 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    encoded = [o.encode() for o in options]
    (status,) = nvrtc.nvrtcCompileProgram(prog, len(encoded), encoded)
    # NVRTC writes into the buffers it is given: mutable ones. (The `b" " * size` of NVRTC's
    # examples is an immutable bytes object, and for size 1 -- an empty log -- it is CPython's
    # shared b" " itself: overwriting it corrupted every later use of b" " in the process.)
    _, log_size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = bytearray(log_size)
    nvrtc.nvrtcGetProgramLog(prog, log)
    ptx = bytearray()
    if status == nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, ptx_size = nvrtc.nvrtcGetPTXSize(prog)
        ptx = bytearray(ptx_size)
        nvrtc.nvrtcGetPTX(prog, ptx)
    nvrtc.nvrtcDestroyProgram(prog)
    text = (bytes(b).rstrip(b"\0").decode(errors="replace") for b in (log, ptx))
    return (status == nvrtc.nvrtcResult.NVRTC_SUCCESS, *text)


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_nvrtc_compiles_the_kernels_for_every_storage_type(dtype, bits):
    nvrtc = _nvrtc()
    options = cupy_path.compile_options(dtype, bits)
    if dtype in (torch.float16, torch.bfloat16) and not any(o.startswith("-I") for o in options):
        pytest.skip("no CUDA headers (cuda_fp16.h / cuda_bf16.h) on this machine")
    # what CuPy's RawModule adds on an H100 (compute capability 9.0)
    options += ["-ftz=true", "--device-as-default-execution-space", "-arch=compute_90"]
    ok, log, ptx = _nvrtc_compile(nvrtc, cupy_path.KERNEL_SOURCE.read_text(), options)
    assert ok, log
    for name in ("roi_align_forward", "roi_align_backward"):
        assert f".entry {name}(" in ptx  # extern "C": unmangled names for get_function
    # --fmad=false is what makes the kernel round like the PyTorch path: no fused mul-adds
    assert "fma.rn.f32" not in ptx and "fma.rn.f64" not in ptx
    # the 32-bit build has no 64-bit integer division (a long software routine on a GPU)
    assert (("div.s64" in ptx or "div.u64" in ptx or "rem.s64" in ptx or "rem.u64" in ptx)
            == (bits == 64))


def test_index_bits_keeps_every_index_in_range():
    assert cupy_path.index_bits(1024 * 256 * 7 * 7, 2 * 256 * 200 * 336) == 32  # the bench's
    assert cupy_path.index_bits(2**30, 10) == 64  # i + stride could pass 2^31
    assert cupy_path.index_bits(2**30 - 1, 2**31 - 1) == 32
    assert cupy_path.index_bits(10, 2**31) == 64  # offsets into the features
    assert cupy_path.index_bits(2**29, 10, 2**29) == 64  # 5 * r into the RoIs, with C * oh * ow = 1


def test_nvrtc_reports_errors_with_the_line():
    nvrtc = _nvrtc()
    broken = cupy_path.KERNEL_SOURCE.read_text().replace("g.bin_h = roi_h / pooled_h;",
                                                         "g.bin_h = roi_h / pooled_hh;")
    ok, log, _ = _nvrtc_compile(nvrtc, broken, cupy_path.compile_options(torch.float32)
                                + ["-arch=compute_90"])
    assert not ok and "pooled_hh" in log  # the check above can fail, so it means something


# ---- 2. the kernels as C++ on the CPU -------------------------------------------------------

_CTYPES = {np.int64: ctypes.c_longlong, np.int32: ctypes.c_int, np.float32: ctypes.c_float,
           np.float64: ctypes.c_double}


class EmulatedKernel:
    """A compiled kernel called like a ``cupy.RawKernel``: ``kernel(grid, block, args)``.

    Threads run one after another; each sees its own ``blockIdx`` / ``threadIdx`` and runs the
    kernel's grid-stride loop, exactly the indexing a GPU launch of the same shape does.
    """

    def __init__(self, library: ctypes.CDLL, name: str):
        self.library, self.function = library, getattr(library, name)
        self.function.restype = None

    def __call__(self, grid: tuple[int], block: tuple[int], args: tuple) -> None:
        converted = [a if isinstance(a, ctypes.c_void_p) else _CTYPES[type(a)](a) for a in args]
        for b in range(grid[0]):
            for t in range(block[0]):
                self.library.emulated_launch_coordinates(b, t, block[0], grid[0])
                self.function(*converted)


@pytest.fixture(scope="module")
def cpu_kernels(tmp_path_factory):
    """{torch dtype: (forward, backward)} for fp32 and fp64 storage, built with g++."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("needs a C++ compiler")
    built = {}
    for dtype, ctype in ((torch.float32, "float"), (torch.float64, "double")):
        for bits, index in ((32, "int"), (64, "long long")):
            library = tmp_path_factory.mktemp("kernels") / f"roi_align_{ctype}_{bits}.so"
            # -ffp-contract=off mirrors --fmad=false: every product and sum rounds on its own
            subprocess.run([compiler, "-O2", "-std=c++14", "-ffp-contract=off", "-shared",
                            "-fPIC", "-x", "c++", "-include", str(SHIM), f"-DSCALAR_T={ctype}",
                            f"-DACC_T={ctype}", f"-DINDEX_T={index}",
                            str(cupy_path.KERNEL_SOURCE), "-o", str(library)],
                           check=True, capture_output=True, text=True)
            lib = ctypes.CDLL(str(library))
            built[dtype, bits] = (EmulatedKernel(lib, "roi_align_forward"),
                                  EmulatedKernel(lib, "roi_align_backward"))
    return built


@pytest.fixture
def kernel_path(cpu_kernels, monkeypatch):
    """``RoIAlignCuPy`` with the CuPy launch replaced by the CPU-compiled kernels.

    Returns ``run(x, rois, size, scale, sampling_ratio, aligned, mode, launch=(1, 1))``; the
    launch shape is (blocks, threads per block).
    """
    shape = {"launch": (1, 1)}

    def launch(kernel, total, tensors, scalars, device):
        if total == 0:
            return
        for t in tensors:  # what DLPack would hand the kernel: dense memory
            assert t.is_contiguous(), "the wrapper must pass contiguous buffers to the kernel"
        blocks, threads = shape["launch"]
        kernel((blocks,), (threads,), (*[ctypes.c_void_p(t.data_ptr()) for t in tensors],
                                       *scalars))

    monkeypatch.setattr(cupy_path, "_kernels", lambda dtype, device, bits: cpu_kernels[dtype, bits])
    monkeypatch.setattr(cupy_path, "_launch", launch)

    def run(x, rois, size, scale, sampling_ratio, aligned, mode, launch=(1, 1)):
        shape["launch"] = launch
        return cupy_path.RoIAlignCuPy.apply(x, rois, size, scale, sampling_ratio, aligned, mode)

    return run


def make_case(dtype, n=2, c=5, h=11, w=13, n_rois=40, scale=0.25, seed=0):
    """Random features and RoIs, with the awkward ones first: wholly outside, zero-size, partly
    outside, tiny, on exact cell borders."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    H, W = h / scale, w / scale
    xy = torch.rand(n_rois, 2, generator=g, dtype=torch.float64) * torch.tensor([W, H]) * 1.3 - 8
    wh = torch.exp(torch.rand(n_rois, 2, generator=g, dtype=torch.float64) * 4.0)  # 1..55 px
    boxes = torch.cat([xy, xy + wh], 1)
    awkward = torch.tensor([[-60.0, -50, -20, -12], [12, 12, 12, 12], [-10, 6, 30, H + 20],
                            [W - 3, H - 2, W + 40, H + 30], [8, 4, 24, 40]], dtype=torch.float64)
    boxes[:5] = awkward[:n_rois]
    index = torch.randint(0, n, (n_rois, 1), generator=g, dtype=torch.float64)
    return x.to(dtype), torch.cat([index, boxes], 1).to(dtype)


def forward_backward(op, x, rois, grad_seed=1):
    leaf = x.detach().requires_grad_(True)
    out = op(leaf, rois)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed),
                       dtype=out.dtype)
    (grad_input,) = torch.autograd.grad(out, leaf, grad)
    return out, grad_input


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])  # the kernel's two thread orders
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 2, 3])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_kernel_equals_pytorch_forward_and_backward(kernel_path, dtype, atol, layout, aligned,
                                                    sampling_ratio, mode):
    x, rois = make_case(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    size = (7, 5)
    args = (size, 0.25, sampling_ratio, aligned, mode)
    out_k, grad_k = forward_backward(lambda t, r: kernel_path(t, r, *args), x, rois)
    out_t, grad_t = forward_backward(lambda t, r: roi_align(t, r, *args, backend="torch"),
                                     x, rois)
    assert out_k.shape == out_t.shape == (rois.shape[0], x.shape[1], *size)
    torch.testing.assert_close(out_k, out_t, rtol=0, atol=atol)
    torch.testing.assert_close(grad_k, grad_t, rtol=0, atol=atol)
    assert grad_k.abs().sum() > 0  # gradients actually reached the input


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_kernel_gradient_is_as_accurate_as_the_pytorch_paths_on_large_rois(kernel_path, mode):
    # RoIs up to 61 cells wide, 3 x 3 points per bin: an input cell sums the gradients of many
    # bins, and the kernel (thread order) and the PyTorch path (autograd's order) add them up
    # differently. Here each fp32 gradient is 3.4e-5 to 3.9e-5 from the exact (fp64) one; the
    # two sums can land over 1e-5 apart (2.9e-5 on an H200, whose atomics add in any order).
    # test_roi_align_cuda.py holds the GPU kernel to this measure: the PyTorch path's accuracy.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 40, 52, generator=g, dtype=torch.float64)
    xy = torch.rand(200, 2, generator=g, dtype=torch.float64) * torch.tensor([208.0, 160.0]) * 1.2 - 10
    wh = torch.exp(torch.rand(200, 2, generator=g, dtype=torch.float64) * 5.5)  # 1..245 px
    index = torch.randint(0, 2, (200, 1), generator=g).double()
    rois = torch.cat([index, xy, xy + wh], 1)
    args = ((7, 5), 0.25, 3, True, mode)

    def gradient(op, features):
        leaf = features.detach().requires_grad_(True)
        out = op(leaf, rois.to(features.dtype))
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        return torch.autograd.grad(out, leaf, grad.to(out.dtype))[0].double()

    exact = gradient(lambda t, r: roi_align(t, r, *args, backend="torch"), x)
    kernel = gradient(lambda t, r: kernel_path(t, r, *args), x.float())
    torch_path = gradient(lambda t, r: roi_align(t, r, *args, backend="torch"), x.float())
    error_k, error_t = (kernel - exact).abs().max(), (torch_path - exact).abs().max()
    assert 1e-6 < error_t < 1e-4  # fp32 rounding, visible and small
    assert error_k <= 1.5 * error_t, (error_k, error_t)


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_64_bit_index_build_equals_the_32_bit_one(kernel_path, monkeypatch, channels_last):
    # the wrapper picks 32-bit indices for every map here; force the 64-bit build (what a map
    # of over 2^31 elements gets) and check that it, and the scalars it is passed, agree
    x, rois = make_case(torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for mode in ("avg", "max"):
        args = ((7, 5), 0.25, -1, True, mode)
        narrow = forward_backward(lambda t, r: kernel_path(t, r, *args), x, rois)
        with monkeypatch.context() as patch:
            patch.setattr(cupy_path, "index_bits", lambda outputs, elements, num_rois=0: 64)
            wide = forward_backward(lambda t, r: kernel_path(t, r, *args), x, rois)
        for a, b in zip(wide, narrow):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_every_thread_of_a_multi_block_launch_does_its_share(kernel_path, channels_last):
    # 2 blocks x 3 threads over 3 * 2 * 2 * 5 = 60 outputs: each thread strides by 6, as the
    # wrapper's (blocks, 256) launch does on a GPU; one thread doing everything must agree
    # (the forward bit for bit; the backward up to the order of its atomic adds)
    x, rois = make_case(torch.float64, n_rois=3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for mode in ("avg", "max"):
        args = ((2, 2), 0.25, 2, True, mode)
        one, grad_one = forward_backward(lambda t, r: kernel_path(t, r, *args), x, rois)
        six, grad_six = forward_backward(lambda t, r: kernel_path(t, r, *args, launch=(2, 3)),
                                         x, rois)
        torch.testing.assert_close(six, one, rtol=0, atol=0)
        torch.testing.assert_close(grad_six, grad_one, rtol=0, atol=1e-13)


def test_kernel_reads_channels_last_and_non_contiguous_inputs(kernel_path):
    x, rois = make_case(torch.float32)
    args = (7, 7), 0.25, 2, True, "avg"
    want = roi_align(x, rois, *args, backend="torch")
    for variant in (x.contiguous(memory_format=torch.channels_last),
                    torch.stack([x, x], -1)[..., 0],  # every other element: strided
                    x.transpose(2, 3).contiguous().transpose(2, 3)):
        torch.testing.assert_close(kernel_path(variant, rois, *args), want, rtol=0, atol=1e-5)


def test_a_size_one_dimension_with_a_stride_beyond_int32_runs_on_32_bit_indices(kernel_path):
    """``big[:1, c:c + 1]`` of a map of more than 2^31 elements is contiguous, but its strides
    of the size-1 dimensions are the big map's: passed as int32, numpy raised OverflowError
    (review finding); such a dimension is only ever indexed at 0."""
    x, rois = make_case(torch.float32, n=1, c=1)
    rois[:, 0] = 0
    huge = x.as_strided(x.shape, (2**32, 2**31, x.shape[3], 1))
    assert huge.is_contiguous() and cupy_path.index_bits(len(rois) * 49, huge.numel(), len(rois)) == 32
    want = forward_backward(lambda leaf, r: roi_align(leaf, r, (7, 7), 0.25, 2, backend="torch"), huge, rois)
    got = forward_backward(lambda leaf, r: kernel_path(leaf, r, (7, 7), 0.25, 2, True, "avg"), huge, rois)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert cupy_path.kernel_strides(huge, np.int32) == [0, 0, x.shape[3], 1]


def test_the_cupy_backward_refuses_under_deterministic_algorithms(kernel_path):
    """Its float atomics add in an order that varies from run to run: refused (or a warning in
    warn_only mode), as torchvision's CUDA roi_align is."""
    x, rois = make_case(torch.float32)
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="adds with float atomics.*use_deterministic_algorithms"):
            forward_backward(lambda leaf, r: kernel_path(leaf, r, (7, 7), 0.25, 2, True, "avg"), x, rois)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="adds with float atomics"):
            forward_backward(lambda leaf, r: kernel_path(leaf, r, (7, 7), 0.25, 2, True, "avg"), x, rois)
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def test_kernel_reads_the_features_in_place_in_both_layouts(kernel_path, monkeypatch):
    # no copy of the feature map into another layout: the kernel gets the input's own memory
    seen = []
    launch = cupy_path._launch
    monkeypatch.setattr(cupy_path, "_launch",
                        lambda kernel, total, tensors, *rest: (seen.append(tensors[0].data_ptr()),
                                                               launch(kernel, total, tensors, *rest)))
    x, rois = make_case(torch.float32)
    for features in (x, x.contiguous(memory_format=torch.channels_last)):
        out = kernel_path(features, rois, (7, 7), 0.25, 2, True, "avg")
        assert seen[-1] == features.data_ptr()
        # the output comes back in the input's memory order (what the kernel wrote in order)
        assert out.is_contiguous(memory_format=torch.channels_last) == (features is not x)


def test_kernel_with_an_empty_roi_set_keeps_the_graph(kernel_path):
    x, _ = make_case(torch.float32)
    leaf = x.detach().requires_grad_(True)
    out = kernel_path(leaf, torch.zeros(0, 5), (7, 7), 0.25, -1, True, "avg")
    assert out.shape == (0, x.shape[1], 7, 7)
    out.sum().backward()
    assert torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_kernel_on_a_hand_computed_case(kernel_path):
    # one 1x1 bin over a 2x2 ramp, one sampling point at the RoI centre: with aligned=True the
    # box [0, 2] x [0, 2] (pixels) has its centre at sampling coordinate 0.5, so the value is
    # the mean of the four cells; with aligned=False the centre sits at 1.0: the last cell
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    rois = torch.tensor([[0.0, 0.0, 0.0, 2.0, 2.0]], dtype=torch.float64)
    assert kernel_path(x, rois, (1, 1), 1.0, 1, True, "avg").item() == 2.5
    assert kernel_path(x, rois, (1, 1), 1.0, 1, False, "avg").item() == 4.0


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_kernel_propagates_nan_as_the_pytorch_path_does(kernel_path, mode):
    # A NaN in the features (a diverged step) must show in every bin that samples it, in
    # either backend: torch's max and amax propagate NaN, and the gradient goes to the first
    # NaN point. A kernel that kept `value > best` alone showed NaN only when a bin's *first*
    # point was NaN, and otherwise hid the divergence behind the other points' maximum.
    x, rois = make_case(torch.float64)
    x[0, :, 4:6, 5:7] = float("nan")
    x[1, 2, 0, 0] = float("nan")
    args = ((7, 5), 0.25, 2, True, mode)
    out_k, grad_k = forward_backward(lambda t, r: kernel_path(t, r, *args), x, rois)
    out_t, grad_t = forward_backward(lambda t, r: roi_align(t, r, *args, backend="torch"), x, rois)
    assert out_t.isnan().any() and not out_t.isnan().all()  # the case has bins of both kinds
    torch.testing.assert_close(out_k, out_t, rtol=0, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(grad_k, grad_t, rtol=0, atol=1e-12, equal_nan=True)
