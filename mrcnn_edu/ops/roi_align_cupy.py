"""RoIAlign on the GPU: the CUDA kernels of ``roi_align.cu`` run through CuPy (Mask R-CNN §3).

The PyTorch path (``roi_align.py``) is the definition; this is the fast path with the very same
arguments and results. How the pieces fit:

- ``roi_align.cu`` is compiled by ``cupy.RawModule`` once per (dtype, device) and cached (CuPy
  also keeps the compiled binary on disk). The storage type is a macro, ``-DSCALAR_T=...``;
  products and sums use ``ACC_T`` = fp32 (fp64 for fp64 inputs), also for fp16 / bf16.
- Tensors cross from PyTorch to CuPy through DLPack: ``cupy.from_dlpack(tensor)`` is a view of
  the same GPU memory, no copy. Memory is allocated by PyTorch's caching allocator.
- Kernels are launched on PyTorch's *current* stream (``cupy.cuda.ExternalStream``), so they
  are ordered with the surrounding PyTorch work without any synchronisation.
- No copy of the features: a ``torch.channels_last`` input is read with channels fastest
  (coalesced per tap), a standard ``(N, C, H, W)`` one with ``pw`` fastest, as torchvision
  does (see the layout note in ``roi_align.cu``); the output comes back in the same layout.
- Backward: avg scatters ``grad / count`` to every sampling point's four taps; max scatters to
  the taps of the arg-max point the forward pass stored. ``grad_input`` accumulates in fp32.
  Gradients flow to the features only (not to the RoI coordinates), as in the PyTorch path.
"""
from __future__ import annotations

import functools
import glob
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["roi_align_cupy", "RoIAlignCuPy", "KERNEL_SOURCE", "SUPPORTED_DTYPES", "compile_options",
           "index_bits", "kernel_strides"]

KERNEL_SOURCE = Path(__file__).with_name("roi_align.cu")
_THREADS = 256
# storage type, accumulation type, extra macros for the kernel
_DTYPES = {
    torch.float32: ("float", "float", ()),
    torch.float64: ("double", "double", ()),
    torch.float16: ("__half", "float", ("-DROI_USE_FP16",)),
    torch.bfloat16: ("__nv_bfloat16", "float", ("-DROI_USE_BF16",)),
}
SUPPORTED_DTYPES = tuple(_DTYPES)


def _cuda_include_dirs() -> list[str]:
    """Directories holding ``cuda_bf16.h`` (NVRTC searches none by itself; CuPy adds its own
    headers, which cover fp16 but not always bf16)."""
    candidates = [os.path.join(p, "include") for p in
                  (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda")
                  if p]
    for site in sys.path:  # CUDA headers from pip wheels (nvidia-cuda-runtime-*)
        candidates += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return [d for d in candidates if os.path.isfile(os.path.join(d, "cuda_bf16.h"))][:1]


def compile_options(dtype: torch.dtype, bits: int = 32) -> list[str]:
    """NVRTC options for ``roi_align.cu`` with ``dtype`` storage and ``bits``-bit index
    arithmetic (see :func:`index_bits`; CuPy adds the architecture).

    ``--fmad=false``: no fused multiply-adds, so each product and sum rounds as in the PyTorch
    path and max mode picks the same point; the kernel is memory-bound, FMAs would not help.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"the CuPy RoIAlign supports {list(_DTYPES)}, got {dtype}")
    scalar, acc, macros = _DTYPES[dtype]
    index = {32: "int", 64: "long long"}[bits]
    options = ["--std=c++14", "--fmad=false", f"-DSCALAR_T={scalar}", f"-DACC_T={acc}",
               f"-DINDEX_T={index}", *macros]
    return options + [f"-I{d}" for d in _cuda_include_dirs()]


def index_bits(outputs: int, feature_elements: int, num_rois: int = 0) -> int:
    """32 when the kernel's indices fit in an ``int``, else 64 (see ``roi_align.cu``).

    ``outputs`` (R * C * oh * ow) bounds the flat thread index; under 2^30, the grid-stride
    loop's ``i + stride`` (at most twice that) stays below 2^31 too. ``feature_elements``
    bounds every offset into the features and their gradient; ``num_rois`` (R) the offset
    ``5 * r`` into the RoIs (above ``outputs`` only when C * oh * ow < 5).
    """
    return 32 if outputs < 2**30 and feature_elements < 2**31 and 5 * num_rois < 2**31 else 64


def kernel_strides(tensor: Tensor, np_index) -> list:
    """``tensor``'s strides as the kernel's index type, 0 for a dimension of size 1.

    :func:`index_bits` chooses 32-bit indices from the element count, and a size-1 dimension
    is only ever indexed at 0, but its stride can be anything: ``big[:1, c:c + 1]`` of a map
    of more than 2^31 elements is contiguous with ``stride(0)`` = the whole map's C*H*W, which
    an int32 cannot hold (numpy raises OverflowError)."""
    return [np_index(stride if size > 1 else 0) for stride, size in zip(tensor.stride(), tensor.shape)]


@functools.lru_cache(maxsize=None)
def _kernels(dtype: torch.dtype, device_index: int, bits: int = 32):
    """Compile ``roi_align.cu`` for one dtype, index width and device: (forward, backward)."""
    import cupy

    with cupy.cuda.Device(device_index):
        options = tuple(compile_options(dtype, bits))
        module = cupy.RawModule(code=KERNEL_SOURCE.read_text(), options=options)
        return module.get_function("roi_align_forward"), module.get_function("roi_align_backward")


def _launch(kernel, total: int, tensors: list[Tensor], scalars: list, device: torch.device):
    """Run ``kernel`` over ``total`` threads on PyTorch's current stream (DLPack views)."""
    import cupy

    if total == 0:
        return
    blocks = min((total + _THREADS - 1) // _THREADS, 2**31 - 1)
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index):  # the stream below belongs to the tensors' GPU, not the current one
        with warnings.catch_warnings():
            # CuPy 14 deprecates ExternalStream for Stream.from_external, which older CuPy lacks
            warnings.simplefilter("ignore", DeprecationWarning)
            external = cupy.cuda.ExternalStream(stream.cuda_stream)
        with external:
            # zero-copy views; CuPy has no bfloat16 dtype, so bf16 travels as its int16 bit pattern
            arrays = [cupy.from_dlpack(t.detach().view(torch.int16) if t.dtype == torch.bfloat16
                                       else t.detach()) for t in tensors]
            kernel((blocks,), (_THREADS,), (*arrays, *scalars))


def _layout(input: Tensor) -> tuple[Tensor, bool]:
    """``(features, channels_fastest)``: the input as the kernel reads it, without a copy when
    it is ``(N, C, H, W)``-contiguous or channels-last (anything else is made contiguous)."""
    if input.shape[1] > 1 and input.is_contiguous(memory_format=torch.channels_last):
        return input, True  # a torch.channels_last tensor: channels fastest in memory
    return input.contiguous(), False


def _dense(t: Tensor) -> Tensor:
    """The same memory as a contiguous tensor (a channels-last ``(N, C, H, W)`` tensor becomes
    its ``(N, H, W, C)`` permutation), so that DLPack hands the kernel a plain dense buffer."""
    if t.dim() == 4 and not t.is_contiguous():
        t = t.permute(0, 2, 3, 1)
    assert t.is_contiguous()
    return t


def _memory_format(channels_fastest: bool) -> torch.memory_format:
    """The memory order of the kernel's outputs: that of the features it reads."""
    return torch.channels_last if channels_fastest else torch.contiguous_format


class RoIAlignCuPy(torch.autograd.Function):
    """``torch.autograd.Function`` around the two kernels; arguments as ``roi_align``."""

    @staticmethod
    def forward(ctx, input: Tensor, rois: Tensor, output_size: tuple[int, int],
                spatial_scale: float, sampling_ratio: int, aligned: bool, mode: str) -> Tensor:
        N, C, H, W = input.shape
        oh, ow = output_size
        R = rois.shape[0]
        acc_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        np_acc = np.float64 if acc_dtype == torch.float64 else np.float32
        features, channels_fastest = _layout(input.detach())
        boxes = rois.detach().to(acc_dtype).contiguous()  # (R, 5)
        kw = dict(device=input.device, memory_format=_memory_format(channels_fastest))
        output = torch.empty((R, C, oh, ow), dtype=input.dtype, **kw)
        use_max = mode == "max"
        argmax = torch.empty((R, C, oh, ow) if use_max else (1, 1, 1, 1), dtype=torch.int32, **kw)
        # kernel scalars as explicit numpy types (CuPy passes Python ints as 64-bit); the
        # total and the strides are the kernel's index_t
        bits = index_bits(R * C * oh * ow, N * C * H * W, R)
        np_index = np.int32 if bits == 32 else np.int64
        shape = [np_index(R * C * oh * ow), np.int32(H), np.int32(W), np.int32(C)]
        rest = [np.int32(channels_fastest), np.int32(oh), np.int32(ow), np_acc(spatial_scale),
                np.int32(sampling_ratio), np.int32(aligned), np.int32(use_max)]
        strides = kernel_strides(features, np_index)  # (N, C, H, W) order
        forward_kernel, _ = _kernels(input.dtype, input.device.index, bits)
        _launch(forward_kernel, R * C * oh * ow,
                [_dense(features), boxes, _dense(output), _dense(argmax)],
                shape + strides + rest, input.device)
        ctx.save_for_backward(boxes, argmax)
        ctx.scalars = (shape, rest, np_index, bits)
        ctx.input_shape, ctx.input_dtype = (N, C, H, W), input.dtype
        ctx.channels_fastest = channels_fastest
        return output  # (R, C, oh, ow), in the memory order of the input's layout

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        if torch.are_deterministic_algorithms_enabled():  # as torchvision's CUDA roi_align does
            message = ("the CuPy RoIAlign backward adds with float atomics: its result varies from run "
                       "to run, but torch.use_deterministic_algorithms(True) is set; use backend='torch' "
                       "(backend='auto' does under that setting)")
            if not torch.is_deterministic_algorithms_warn_only_enabled():
                raise RuntimeError(message)
            warnings.warn(message, stacklevel=2)
        boxes, argmax = ctx.saved_tensors
        shape, rest, np_index, bits = ctx.scalars
        fastest = ctx.channels_fastest
        # the gradient in the forward output's memory order (the kernel indexes both alike)
        grad = grad_output.to(ctx.input_dtype).contiguous(memory_format=_memory_format(fastest))
        # accumulated in fp32 (fp64 for fp64), in the input's layout: fp32 atomics are native
        grad_input = torch.empty(ctx.input_shape, dtype=boxes.dtype, device=grad.device,
                                 memory_format=_memory_format(fastest)).zero_()
        strides = kernel_strides(grad_input, np_index)
        _, backward_kernel = _kernels(ctx.input_dtype, grad.device.index, bits)
        _launch(backward_kernel, int(shape[0]), [_dense(grad), boxes, _dense(argmax),
                                                 _dense(grad_input)],
                shape + strides + rest, grad.device)
        return grad_input.to(ctx.input_dtype), None, None, None, None, None, None


def roi_align_cupy(input: Tensor, rois: Tensor, output_size: tuple[int, int],
                   spatial_scale: float, sampling_ratio: int, aligned: bool,
                   mode: str) -> Tensor:
    """RoIAlign with the CuPy kernels on validated arguments (``roi_align`` validates)."""
    if not input.is_cuda:
        raise ValueError(f"the CuPy RoIAlign needs CUDA tensors, got input on {input.device}")
    if input.dtype not in _DTYPES:
        raise ValueError(f"the CuPy RoIAlign supports {list(_DTYPES)}, got {input.dtype}")
    # the RoIs get no gradient (as in the PyTorch path): detached, a box that requires grad
    # does not make a backward run (and, under deterministic algorithms, refuse) for nothing
    return RoIAlignCuPy.apply(input, rois.detach(), output_size, spatial_scale, sampling_ratio,
                              aligned, mode)
