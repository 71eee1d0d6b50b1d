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
- The kernels read channels-last features ``(N, H, W, C)``. A ``torch.channels_last`` input is
  used as is; a standard ``(N, C, H, W)``-contiguous one is transposed once per call.
  The output is returned as a channels-last strided ``(R, C, oh, ow)`` view.
- Backward: avg scatters ``grad / count`` to every sampling point's four taps; max scatters to
  the taps of the arg-max point the forward pass stored. ``grad_input`` accumulates in fp32.
  Gradients flow to the features only (not to the RoI coordinates), as in the PyTorch path.
"""
from __future__ import annotations

import functools
import glob
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["roi_align_cupy", "RoIAlignCuPy", "KERNEL_SOURCE"]

KERNEL_SOURCE = Path(__file__).with_name("roi_align.cu")
_THREADS = 256
# storage type, accumulation type, extra macros for the kernel
_DTYPES = {
    torch.float32: ("float", "float", ()),
    torch.float64: ("double", "double", ()),
    torch.float16: ("__half", "float", ("-DROI_USE_FP16",)),
    torch.bfloat16: ("__nv_bfloat16", "float", ("-DROI_USE_BF16",)),
}


def _cuda_include_dirs() -> list[str]:
    """Directories holding ``cuda_bf16.h`` (NVRTC searches none by itself; CuPy adds its own
    headers, which cover fp16 but not always bf16)."""
    candidates = [os.path.join(p, "include") for p in
                  (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda")
                  if p]
    for site in sys.path:  # CUDA headers from pip wheels (nvidia-cuda-runtime-*)
        candidates += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return [d for d in candidates if os.path.isfile(os.path.join(d, "cuda_bf16.h"))][:1]


@functools.lru_cache(maxsize=None)
def _kernels(dtype: torch.dtype, device_index: int):
    """Compile ``roi_align.cu`` for one dtype on one device: (forward, backward) kernels."""
    import cupy

    scalar, acc, macros = _DTYPES[dtype]
    # --fmad=false: no fused multiply-adds, so each product and sum rounds as in the PyTorch
    # path and max mode picks the same point; the kernel is memory-bound, FMAs would not help
    options = ["--std=c++14", "--fmad=false", f"-DSCALAR_T={scalar}", f"-DACC_T={acc}", *macros]
    options += [f"-I{d}" for d in _cuda_include_dirs()]
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=KERNEL_SOURCE.read_text(), options=tuple(options))
        return module.get_function("roi_align_forward"), module.get_function("roi_align_backward")


def _launch(kernel, total: int, tensors: list[Tensor], scalars: list, device: torch.device):
    """Run ``kernel`` over ``total`` threads on PyTorch's current stream (DLPack views)."""
    import cupy

    if total == 0:
        return
    blocks = min((total + _THREADS - 1) // _THREADS, 2**31 - 1)
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream.cuda_stream):
        # zero-copy views; CuPy has no bfloat16 dtype, so bf16 travels as its int16 bit pattern
        arrays = [cupy.from_dlpack(t.detach().view(torch.int16) if t.dtype == torch.bfloat16
                                   else t.detach()) for t in tensors]
        kernel((blocks,), (_THREADS,), (*arrays, *scalars))


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
        features = input.detach().permute(0, 2, 3, 1).contiguous()  # (N, H, W, C), no-op if NHWC
        boxes = rois.detach().to(acc_dtype).contiguous()  # (R, 5)
        output = torch.empty((R, oh, ow, C), dtype=input.dtype, device=input.device)
        use_max = mode == "max"
        argmax = torch.empty((R, oh, ow, C) if use_max else (1,), dtype=torch.int32,
                             device=input.device)
        # kernel scalars as explicit numpy types: CuPy passes Python ints as 64-bit
        scalars = [np.int64(R * oh * ow * C), np.int32(H), np.int32(W), np.int32(C),
                   np.int32(oh), np.int32(ow), np_acc(spatial_scale), np.int32(sampling_ratio),
                   np.int32(aligned), np.int32(use_max)]
        forward_kernel, _ = _kernels(input.dtype, input.device.index)
        _launch(forward_kernel, R * oh * ow * C, [features, boxes, output, argmax], scalars,
                input.device)
        ctx.save_for_backward(boxes, argmax)
        ctx.scalars = scalars
        ctx.input_shape, ctx.input_dtype = (N, C, H, W), input.dtype
        return output.permute(0, 3, 1, 2)  # (R, C, oh, ow), channels-last strides

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        boxes, argmax = ctx.saved_tensors
        N, C, H, W = ctx.input_shape
        grad = grad_output.permute(0, 2, 3, 1).contiguous().to(ctx.input_dtype)  # (R, oh, ow, C)
        grad_input = torch.zeros((N, H, W, C), dtype=boxes.dtype, device=grad.device)
        _, backward_kernel = _kernels(ctx.input_dtype, grad.device.index)
        total = int(ctx.scalars[0])
        _launch(backward_kernel, total, [grad, boxes, argmax, grad_input], ctx.scalars,
                grad.device)
        grad_input = grad_input.to(ctx.input_dtype).permute(0, 3, 1, 2)  # (N, C, H, W)
        return grad_input, None, None, None, None, None, None


def roi_align_cupy(input: Tensor, rois: Tensor, output_size: tuple[int, int],
                   spatial_scale: float, sampling_ratio: int, aligned: bool,
                   mode: str) -> Tensor:
    """RoIAlign with the CuPy kernels on validated arguments (``roi_align`` validates)."""
    if not input.is_cuda:
        raise ValueError(f"the CuPy RoIAlign needs CUDA tensors, got input on {input.device}")
    if input.dtype not in _DTYPES:
        raise ValueError(f"the CuPy RoIAlign supports {list(_DTYPES)}, got {input.dtype}")
    return RoIAlignCuPy.apply(input, rois, output_size, spatial_scale, sampling_ratio,
                              aligned, mode)
