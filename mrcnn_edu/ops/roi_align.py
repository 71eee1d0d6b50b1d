"""RoIAlign (Mask R-CNN §3 "RoIAlign", Figure 3, Table 2c/2d) in plain PyTorch, and the dispatcher.

    "we avoid any quantization of the RoI boundaries or bins (i.e., we use x/16 instead of
    [x/16]). We use bilinear interpolation to compute the exact values of the input features
    at four regularly sampled locations in each RoI bin, and aggregate the result (using max
    or average)"  -- §3

Notation and shapes
-------------------
- ``input``: ``(N, C, H, W)`` feature map of stride ``1 / spatial_scale``.
- ``rois``: ``(R, 5)`` rows ``[batch_index, x1, y1, x2, y2]`` in input-image pixels
  (torchvision's convention), or a list of per-image ``(Ri, 4)`` boxes.
- output: ``(R, C, oh, ow)``; ``gh x gw`` sampling points per bin (``sampling_ratio`` each
  way, or adaptive ``ceil(roi_h / oh) x ceil(roi_w / ow)`` when ``sampling_ratio <= 0``).

Coordinates. A box is in image pixels where pixel ``i`` covers ``[i, i + 1)``. Multiplying by
``spatial_scale`` gives feature-map units where feature cell ``j`` covers ``[j, j + 1)`` and its
value sits at its centre ``j + 0.5``. Bilinear interpolation indexes values by their centres, so
a continuous coordinate ``u`` must become ``u - 0.5`` before sampling: that is ``aligned=True``.
``aligned=False`` skips the shift (and forces RoIs to be at least 1x1 cell): it is how the
original Detectron and torchvision's pretrained detectors were implemented, a half-cell
misalignment the paper's text does not have; we keep it for compatibility only.

Rules copied exactly from the reference implementations (so that results match torchvision):
a sampling point outside ``[-1, H] x [-1, W]`` contributes 0; inside, it is clamped to
``[0, H-1] x [0, W-1]`` before interpolation; the average divides by ``max(gh * gw, 1)``.
``mode="max"`` takes the maximum over a bin's sampling points of their bilinear values (a point
outside contributes 0, as in the average); a bin with no sampling points returns 0. Its gradient
goes to the maximal point, the first one in ``(iy, ix)`` row-major order on ties (as in the
CUDA kernel; ties are common on flat regions such as a ReLU's zeros).

Gradients flow to ``input`` only, never to the RoI coordinates (the paper's "approximate"
end-to-end training, Appendix, Table 8, ignores them too).

Memory layout of the output: the PyTorch path returns a channels-last strided view
(``(R, oh, ow, C)`` in memory, whatever the input's layout); the CuPy path returns the
input's layout (channels-last for a ``torch.channels_last`` input with ``C > 1``,
``(R, C, oh, ow)``-contiguous otherwise). Rely on neither: use ``reshape`` / ``flatten``
rather than ``view``.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from typing import Sequence, Union

import torch
from torch import Tensor

from mrcnn_edu.device import host_to_device

__all__ = ["roi_align", "roi_align_torch", "sampling_points", "boxes_to_rois", "check_roi_inputs",
           "cupy_available", "divide"]

RoIs = Union[Tensor, Sequence[Tensor]]
# Elements gathered per chunk (4 corners x points x channels): bounds the torch path's memory.
_CHUNK_ELEMENTS = 1 << 24


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Per-image ``(Ri, 4)`` boxes -> ``(sum Ri, 5)`` rois with the image index in column 0."""
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"boxes[{i}] must be an (Ri, 4) xyxy tensor, got {shape}")
    if len(boxes) == 0:
        raise ValueError("boxes must hold one (Ri, 4) tensor per image, got an empty list")
    # the image index of every row, built on the host and queued to the device (one copy, no sync)
    image_index = torch.repeat_interleave(torch.arange(len(boxes)), torch.tensor([b.shape[0] for b in boxes]))
    image_index = host_to_device(image_index.to(boxes[0].dtype), boxes[0].device)
    return torch.cat([image_index[:, None], torch.cat(list(boxes))], dim=1)  # (R, 5)


def _pair(output_size: Union[int, Sequence[int]]) -> tuple[int, int]:
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"output_size must be a positive int or (oh, ow), got {output_size!r}")
    return size


def check_roi_inputs(input: Tensor, rois: RoIs, output_size, spatial_scale: float,
                     mode: str = "avg", check_values: bool = True) -> tuple[Tensor, tuple[int, int]]:
    """Validate the arguments shared by every RoI op; return ``(rois (R, 5), (oh, ow))``.

    One combined device check (one host sync) covers batch indices and finiteness, so a bad
    RoI is a ``ValueError`` here and never an out-of-bounds read on the GPU. ``check_values=
    False`` skips that one for RoIs the caller built itself (the pooler, the mask targets):
    on a GPU a host read stalls the queue of kernels, and it would happen per call.
    """
    if not isinstance(input, Tensor) or input.dim() != 4:
        shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
        raise ValueError(f"input must be an (N, C, H, W) tensor, got {shape}")
    if not input.is_floating_point():
        raise ValueError(f"input must be floating point, got {input.dtype}")
    if input.shape[2] == 0 or input.shape[3] == 0:
        raise ValueError(f"input has an empty spatial size {tuple(input.shape[2:])}")
    if not isinstance(rois, Tensor):
        rois = boxes_to_rois(rois)
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must have shape (R, 5) rows [batch_index, x1, y1, x2, y2], "
                         f"got {tuple(rois.shape)}")
    if rois.device != input.device:
        raise ValueError(f"rois are on {rois.device} but input is on {input.device}")
    if not rois.is_floating_point():
        raise ValueError(f"rois must be floating point, got {rois.dtype}")
    if not (isinstance(spatial_scale, (int, float)) and math.isfinite(spatial_scale)
            and spatial_scale > 0):
        raise ValueError(f"spatial_scale must be a positive finite number, got {spatial_scale!r}")
    if mode not in ("avg", "max"):
        raise ValueError(f"mode must be 'avg' or 'max', got {mode!r}")
    size = _pair(output_size)
    if check_values and rois.shape[0] > 0:
        batch_index = rois[:, 0]
        bad = (~torch.isfinite(rois).all(dim=1) | (batch_index < 0)
               | (batch_index >= input.shape[0]) | (batch_index != batch_index.floor()))
        if bool(bad.any()):  # the one host sync; the slow path below only runs on error
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"rois[{row}] = {rois[row].tolist()} is invalid: coordinates must "
                             f"be finite and batch_index an integer in [0, {input.shape[0]})")
    return rois, size


def divide(numerator: Tensor, denominator: int) -> Tensor:
    """``numerator / denominator``, rounded as IEEE division on every device.

    PyTorch's CUDA kernels divide by a Python number as a multiplication by its reciprocal,
    which is not the correctly rounded quotient: there ``21 / 7`` is ``3.0000002`` in fp32, and
    RoIPool's ``ceil`` makes that bin one cell wider. In RoIAlign the sampling points move by an
    ulp, which the bilinear weights carry into the output: up to 3.7e-5 in fp32 at 100-cell
    coordinates, measured on an H200 (the CPU reproduces it: ``size * (1 / bins)``). Dividing
    by a tensor on the same device divides exactly, as the CPU, torchvision's kernels and our
    CuPy kernel do, so every path samples the same points.
    """
    return numerator / torch.full((), denominator, dtype=numerator.dtype, device=numerator.device)


def _axis_samples(start: Tensor, size: Tensor, bins: int, grid: int) -> Tensor:
    """Sampling coordinates along one axis: ``(R,)`` RoI starts / sizes -> ``(R, bins, grid)``.

    Point ``i`` of bin ``p`` sits at ``start + p * bin + (i + 0.5) * bin / grid`` (torchvision's
    expression, kept in the same order so that the points agree with torchvision's to the last bit).
    """
    bin_size = divide(size, bins)  # (R,)
    p = torch.arange(bins, device=start.device, dtype=start.dtype)
    i = torch.arange(grid, device=start.device, dtype=start.dtype)
    return (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]
            + divide((i[None, None, :] + 0.5) * bin_size[:, None, None], grid))  # (R, bins, grid)


def _roi_frame(rois: Tensor, spatial_scale: float, aligned: bool) -> tuple[Tensor, ...]:
    """RoI start and size in feature-map sampling coordinates (value of cell j sits at j)."""
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, k] * spatial_scale - offset for k in range(1, 5))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # legacy: RoIs at least one cell wide
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    return x1, y1, roi_w, roi_h


def _grid_sizes(roi_h: Tensor, roi_w: Tensor, output_size: tuple[int, int],
                sampling_ratio: int) -> tuple[Tensor, Tensor]:
    """Points per bin each way: fixed, or adaptive ``ceil(roi_size / output_size)`` (>= 0)."""
    if sampling_ratio > 0:
        full = torch.full_like(roi_h, sampling_ratio, dtype=torch.long)
        return full, full
    gh = torch.ceil(divide(roi_h, output_size[0])).clamp(min=0).long()
    gw = torch.ceil(divide(roi_w, output_size[1])).clamp(min=0).long()
    return gh, gw


def sampling_points(roi: Tensor, output_size: Union[int, Sequence[int]], sampling_ratio: int = 2,
                    spatial_scale: float = 1.0, aligned: bool = True) -> Tensor:
    """The ``(oh, ow, gh, gw, 2)`` points ``(x, y)`` where RoIAlign samples one RoI.

    ``roi``: ``(4,)`` box or ``(5,)`` roi in image pixels. Coordinates are returned in the
    feature map's *sampling* frame: the value of feature cell ``(j, i)`` sits at ``(x=i, y=j)``
    (before the clamping near borders). ``roi_align`` computes its points with the same helpers.
    """
    oh, ow = _pair(output_size)
    roi = torch.as_tensor(roi, dtype=torch.float64).reshape(-1)[-4:]
    rois = torch.cat([roi.new_zeros(1), roi])[None]  # (1, 5)
    x1, y1, roi_w, roi_h = _roi_frame(rois, spatial_scale, aligned)
    gh, gw = (int(g) for g in _grid_sizes(roi_h, roi_w, (oh, ow), sampling_ratio))
    ys = _axis_samples(y1, roi_h, oh, gh)[0]  # (oh, gh)
    xs = _axis_samples(x1, roi_w, ow, gw)[0]  # (ow, gw)
    y = ys[:, None, :, None].expand(oh, ow, gh, gw)
    x = xs[None, :, None, :].expand(oh, ow, gh, gw)
    return torch.stack([x, y], dim=-1)  # (oh, ow, gh, gw, 2)


def _bilinear_taps(coord: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-axis bilinear taps: indices ``lo, hi``, weights ``w_lo, w_hi`` (0 if outside) and
    ``inside``, whether the coordinate is within ``[-1, size]``."""
    inside = (coord >= -1.0) & (coord <= size)
    c = coord.clamp(0, size - 1)
    lo = c.floor()
    hi = (lo + 1).clamp(max=size - 1)
    frac = c - lo
    w_lo = torch.where(inside, 1.0 - frac, torch.zeros_like(frac))
    w_hi = torch.where(inside, frac, torch.zeros_like(frac))
    return lo.long(), hi.long(), w_lo, w_hi, inside


def _sample_group(features: Tensor, rois: Tensor, x1: Tensor, y1: Tensor, roi_w: Tensor,
                  roi_h: Tensor, size: tuple[int, int], gh: int, gw: int, height: int,
                  width: int, mode: str) -> Tensor:
    """RoIAlign for RoIs that share one grid ``gh x gw``; ``features`` is ``(N*H*W + 1, C)``,
    its last row zeros."""
    oh, ow = size
    R, C = rois.shape[0], features.shape[1]
    ys = _axis_samples(y1, roi_h, oh, gh).reshape(R, oh * gh)  # (R, oh*gh)
    xs = _axis_samples(x1, roi_w, ow, gw).reshape(R, ow * gw)  # (R, ow*gw)
    y_lo, y_hi, wy_lo, wy_hi, y_inside = _bilinear_taps(ys, height)
    x_lo, x_hi, wx_lo, wx_hi, x_inside = _bilinear_taps(xs, width)
    row_base = rois[:, 0].long()[:, None] * height  # (R, 1)
    rows = torch.stack([y_lo, y_hi], -1) + row_base[..., None]  # (R, oh*gh, 2)
    wy = torch.stack([wy_lo, wy_hi], -1)  # (R, oh*gh, 2)
    cols, wx = torch.stack([x_lo, x_hi], -1), torch.stack([wx_lo, wx_hi], -1)  # (R, ow*gw, 2)
    # every (y tap, x tap) pair: flat index into the (N*H*W) rows of `features`
    index = rows[:, :, None, :, None] * width + cols[:, None, :, None, :]  # (R, oh*gh, ow*gw, 2, 2)
    # A point outside the map is 0 (the CUDA kernel and torchvision skip it), whatever the
    # clamped cells hold: a weight of 0 times a NaN or inf cell is NaN, not 0. So its taps
    # read the zero row that roi_align_torch appends (64x cheaper than masking the samples).
    outside = ~(y_inside[:, :, None] & x_inside[:, None, :])  # (R, oh*gh, ow*gw)
    index = index.masked_fill(outside[..., None, None], features.shape[0] - 1)
    points = index.numel() // 4  # R * oh*gh * ow*gw
    weight = (wy[:, :, None, :, None] * wx[:, None, :, None, :]).reshape(points, 4)  # taps (y, x) row-major
    values = features[index.reshape(-1)].reshape(points, 4, C)  # (points, 4 taps, C)
    samples = _weigh_taps(weight.to(values.dtype), values)  # (points, C)
    samples = samples.reshape(R, oh, gh, ow, gw, C).permute(0, 1, 3, 2, 4, 5)
    samples = samples.reshape(R, oh, ow, gh * gw, C)  # points in (iy, ix) row-major order
    if mode == "avg":
        return divide(samples.sum(dim=3), max(gh * gw, 1))  # (R, oh, ow, C)
    return _max_over_points(samples)  # (R, oh, ow, C)


def _weigh_taps(weight: Tensor, values: Tensor) -> Tensor:
    """Each point's bilinear interpolation from its taps: ``weight (P, 4)``, ``values (P, 4, C)``
    -> ``(P, C)``, in the values' dtype whatever autocast says (resampling, not learned).

    On the CPU one ``(1 x 4) @ (4 x C)`` product per point: no ``(P, 4, C)`` tensor of products,
    forward and backward ~1.6x faster than multiplying, then summing, at the C4 box head's 256
    channels (6x the forward alone). On a GPU, where this path is the fallback, the product and
    sum: cuBLAS's batched product refused deterministic mode on PyTorch before 2.9 unless
    ``CUBLAS_WORKSPACE_CONFIG`` was set, and a deterministic backward is when a GPU takes this path.
    """
    if values.device.type != "cpu":
        return (values * weight[..., None]).sum(dim=1)
    with torch.autocast("cpu", enabled=False):
        return torch.matmul(weight[:, None, :], values)[:, 0]


def _max_over_points(samples: Tensor) -> Tensor:
    """Max mode's aggregation: ``samples (R, oh, ow, P, C)`` -> ``(R, oh, ow, C)``.

    The gradient of each bin goes to its first maximal point (``(iy, ix)`` row-major), as in
    the CUDA kernel; a NaN point is the maximum (the first NaN: both propagate it). Ties are
    common: on a flat region (a constant map, a ReLU's zeros, points outside the map, which
    are 0) every point of a bin is a maximum, and ``amax``'s backward
    would split the gradient among them, i.e. among other cells than the kernel's.
    ``max(dim)`` returns the first maximal index (PyTorch documents it) and its backward
    routes the whole gradient there. Without autograd ``amax`` gives the same values and is
    several times faster on the CPU (``max(dim)`` also computes the indices).
    """
    if not samples.requires_grad:
        return samples.amax(dim=3)
    return samples.max(dim=3).values


def _grid_groups(roi_h: Tensor, roi_w: Tensor, output_size: tuple[int, int],
                 sampling_ratio: int) -> list[tuple[Tensor, int, int]]:
    """``[(members (Rg,), gh, gw)]``: the RoIs sharing each sampling grid.

    A fixed ``sampling_ratio`` is one group of every RoI, found without reading a value (no
    GPU sync); the adaptive grid reads the sizes to group the RoIs, in one host read: the RoIs
    sorted by grid, then each grid's key and count (mask targets of a batch have ~100 grids).
    """
    R = roi_h.shape[0]
    if R == 0:
        return []
    if sampling_ratio > 0:
        return [(torch.arange(R, device=roi_h.device), sampling_ratio, sampling_ratio)]
    gh, gw = _grid_sizes(roi_h, roi_w, output_size, sampling_ratio)
    grid_key = gh.long() * 2 ** 31 + gw.long()  # (R,) one key per (gh, gw); grids stay far below 2**31
    order = torch.argsort(grid_key, stable=True)  # (R,) the RoIs of one grid together, in input order
    keys, counts = torch.unique_consecutive(grid_key[order], return_counts=True)
    keys, counts = torch.stack([keys, counts]).tolist()  # the one host read
    return [(members, key >> 31, key & (2 ** 31 - 1)) for members, key in zip(order.split(counts), keys)]


def roi_align_torch(input: Tensor, rois: Tensor, output_size: tuple[int, int],
                    spatial_scale: float, sampling_ratio: int, aligned: bool,
                    mode: str) -> Tensor:
    """Vectorised RoIAlign on already-validated arguments (see ``roi_align``).

    RoIs are grouped by their sampling grid ``(gh, gw)`` -- one group when ``sampling_ratio > 0``
    -- so every group is a dense gather with no masked points; groups are chunked to bound
    memory. The Python loop runs over groups and chunks, never over single RoIs.
    """
    N, C, H, W = input.shape
    oh, ow = output_size
    R = rois.shape[0]
    compute_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    rois = rois.detach().to(compute_dtype)
    # channels-last rows: one (y, x) position's C values are contiguous for the gather
    features = input.permute(0, 2, 3, 1).reshape(N * H * W, C).to(compute_dtype)  # (N*H*W, C)
    features = torch.cat([features, features.new_zeros(1, C)])  # (N*H*W + 1, C): the last row is
    # what a sampling point outside the map reads (_sample_group)
    x1, y1, roi_w, roi_h = _roi_frame(rois, spatial_scale, aligned)
    pieces, order = [], []
    for members, g_h, g_w in _grid_groups(roi_h, roi_w, output_size, sampling_ratio):
        if g_h == 0 or g_w == 0:  # zero-size aligned RoIs: no sampling point, output 0 --
            # the appended zero row, so that the output stays on the graph even if all are so
            pieces.append(features[-1].expand(members.shape[0], oh, ow, C))
            order.append(members)
            continue
        per_roi = max(oh * g_h * ow * g_w * 4 * C, 1)
        for chunk in members.split(max(_CHUNK_ELEMENTS // per_roi, 1)):
            pieces.append(_sample_group(features, rois[chunk], x1[chunk], y1[chunk],
                                        roi_w[chunk], roi_h[chunk], output_size, g_h, g_w,
                                        H, W, mode))
            order.append(chunk)
    if not pieces:  # empty RoI set: keep the output attached to the graph
        out = features[:0, None, None, :].expand(0, oh, ow, C)  # (0, oh, ow, C)
    elif sampling_ratio > 0:  # one group, chunks in order
        out = torch.cat(pieces)  # (R, oh, ow, C)
    else:
        out = torch.cat(pieces)[torch.argsort(torch.cat(order))]  # (R, oh, ow, C) input order
    return out.to(input.dtype).permute(0, 3, 1, 2)  # (R, C, oh, ow), channels-last strides


@functools.lru_cache(maxsize=1)
def cupy_available() -> bool:
    """True when cupy imports (its kernel is then used for CUDA tensors by default)."""
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy  # noqa: F401
    except Exception:  # a broken CUDA install: fall back to the torch path
        return False
    return True


def _cupy_suits(input: Tensor) -> bool:
    """Whether ``backend="auto"`` takes the CuPy kernel: a CUDA tensor of a dtype it compiles
    for, cupy importable, and no deterministic backward asked for -- its backward adds with
    float atomics, in an order that varies from run to run; the PyTorch path's accumulating
    ``index_put_`` is deterministic under ``torch.use_deterministic_algorithms(True)``."""
    if not (input.is_cuda and cupy_available()):
        return False
    from mrcnn_edu.ops.roi_align_cupy import SUPPORTED_DTYPES
    if input.dtype not in SUPPORTED_DTYPES:  # e.g. float8: the PyTorch path computes it
        return False
    return not (input.requires_grad and torch.is_grad_enabled() and torch.are_deterministic_algorithms_enabled())


def roi_align(input: Tensor, rois: RoIs, output_size: Union[int, Sequence[int]],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = True,
              mode: str = "avg", backend: str = "auto", check_values: bool = True) -> Tensor:
    """RoIAlign: ``(N, C, H, W)`` features, ``(R, 5)`` rois -> ``(R, C, oh, ow)``.

    ``sampling_ratio``: points per bin each way; ``<= 0`` adapts to ``ceil(roi_size / out)``.
    ``aligned``: the half-pixel shift (True, the paper's definition) or the legacy behaviour.
    ``mode``: ``"avg"`` (the paper's choice, Table 2c) or ``"max"``.
    ``backend``: ``"auto"`` uses the CuPy kernel for CUDA tensors when cupy imports and plain
    PyTorch otherwise (also for a dtype the kernel has no build for, and for a backward under
    ``torch.use_deterministic_algorithms(True)``: the kernel's atomics add in varying order);
    ``"torch"`` / ``"cupy"`` force one (``"cupy"``'s backward then refuses, as torchvision's
    CUDA kernel does, or warns in ``warn_only`` mode).
    ``check_values``: check that RoIs are finite with valid batch indices (see
    ``check_roi_inputs``; ``False`` only for RoIs built by the caller).
    """
    rois, size = check_roi_inputs(input, rois, output_size, spatial_scale, mode, check_values)
    if not isinstance(sampling_ratio, int):
        raise ValueError(f"sampling_ratio must be an int, got {sampling_ratio!r}")
    if backend not in ("auto", "torch", "cupy"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'cupy', got {backend!r}")
    if backend == "cupy" and not input.is_cuda:
        raise ValueError(f"backend='cupy' needs CUDA tensors, got input on {input.device}")
    if backend == "cupy" and not cupy_available():
        raise ValueError("backend='cupy' but cupy is not importable; install the 'gpu-cuda12' or "
                         "'gpu-cuda13' extra (pip install -e '.[gpu-cuda12]', as the README says)")
    if backend == "cupy" or (backend == "auto" and _cupy_suits(input)):
        from mrcnn_edu.ops.roi_align_cupy import roi_align_cupy
        return roi_align_cupy(input, rois, size, float(spatial_scale), sampling_ratio,
                              bool(aligned), mode)
    return roi_align_torch(input, rois, size, float(spatial_scale), sampling_ratio,
                           bool(aligned), mode)
