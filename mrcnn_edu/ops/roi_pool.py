"""RoIPool (Fast R-CNN) and RoIWarp (MNC): the two quantising ops RoIAlign replaces.

    "RoIPool first quantizes a floating-number RoI to the discrete granularity of the feature
    map, this quantized RoI is then subdivided into spatial bins which are themselves
    quantized, and finally feature values covered by each bin are aggregated (usually by max
    pooling)."  -- Mask R-CNN §3 "RoIAlign"

    "RoIWarp overlooked the alignment issue and was implemented in [10] as quantizing RoI just
    like RoIPool. So even though RoIWarp also adopts bilinear resampling ..., it performs on
    par with RoIPool"  -- §3; Table 2c

Shapes: ``input (N, C, H, W)``, ``rois (R, 5)`` rows ``[batch_index, x1, y1, x2, y2]`` in image
pixels, output ``(R, C, oh, ow)``. Feature cell ``j`` covers ``[j, j + 1)`` in feature units.

What is quantised, precisely (``s = spatial_scale``, ``round`` = half away from zero, as C's):
1. RoIPool and RoIWarp: the RoI. ``start = round(x1 * s)``, ``end = round(x2 * s)``; the RoI
   is the cells ``start .. end`` inclusive, ``size = max(end - start + 1, 1)`` cells.
2. RoIPool only: the bins. Bin ``p`` covers cells ``start + floor(p * size / out)`` up to
   ``start + ceil((p + 1) * size / out)`` (exclusive), clipped to the map; an empty bin gives 0.
   Its value is the max over those cells, and its gradient goes to the first cell (row-major)
   holding it. As in torchvision's kernel, which starts from ``-FLT_MAX`` and keeps a cell only
   if it is ``>`` the running max: NaN cells are skipped, and a bin with no cell above
   ``-FLT_MAX`` (all NaN, or all ``-inf``) gives ``-FLT_MAX`` (``-inf`` in fp16 / bf16, where
   ``-FLT_MAX`` rounds to it) and no gradient.
RoIWarp then does *no* further quantisation: it is RoIAlign (``aligned=True``, bilinear
sampling at ``sampling_ratio x sampling_ratio`` regular points per bin, max or avg) applied to the
quantised box ``[start, start + size)``. Step 1 rounds the end *inclusively*, as RoIPool does:
a box whose corners lie on the feature grid, ``[x1, x2)`` on cell edges, becomes one cell larger
to the right and bottom (``[4, 8, 24, 32]`` at stride 4 is warped as RoIAlign on
``[4, 8, 28, 36]``). Every difference between RoIWarp and RoIAlign is that quantisation.

This is RoIWarp as §3 describes it (RoIPool's quantised RoI, then bilinear resampling), not a
port of MNC's Caffe layer (``roi_warping_layer.cu`` in daijifeng001/caffe-mnc), which differs in
three details of its forward pass: its box is ``end - start`` cells, not ``end - start + 1``;
it samples in the frame where cell ``j``'s value sits at ``j`` (``aligned=False``), on a grid
of ``(ceil(size / out) + 1)²`` points per bin that includes the bin's edges; and it skips
points outside ``[-0.5, H - 0.5]`` instead of reading them as 0. Its box has the same centre as
ours and is one cell smaller. On a ramp (value = x), box ``[4, 8, 24, 32]`` at stride 4, 5
bins, max: MNC gives 2, 3, 4, 5, 6 and this op 1.4, 2.6, 3.8, 5.0, 6.2
(``tests/test_roi_ops.py`` runs MNC's forward pass as loops to check it). Both misalign the RoI
by the same quantisation, which is what Table 2c's RoIWarp rows test; what the paper's own
RoIWarp did in these details it does not say.

Both ops are vectorised over RoIs and bins, differentiable with respect to ``input``, and match
``torchvision.ops.roi_pool`` exactly for RoIPool.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

from mrcnn_edu.device import host_to_device
from mrcnn_edu.ops.roi_align import RoIs, check_roi_inputs, divide, roi_align_torch

__all__ = ["roi_pool", "roi_warp", "quantise_rois"]

_CHUNK_ELEMENTS = 1 << 24


def _lowest(dtype: torch.dtype) -> float:
    """torchvision's start for a bin's running max, ``-FLT_MAX``, as ``dtype`` holds it: the
    value of a bin with no cell above it (``-inf`` in fp16 and bf16, where it overflows)."""
    return torch.tensor(-torch.finfo(torch.float32).max).to(dtype).item()


def _round_half_away(x: Tensor) -> Tensor:
    """C's ``round``: halves go away from zero (``torch.round`` would round them to even).

    From the fraction, which ``x - trunc(x)`` gives exactly: ``floor(|x| + 0.5)`` rounds the
    addition itself, so float32's largest value below 0.5 (0.49999997) came out 1."""
    whole = torch.trunc(x)
    return whole + torch.sign(x) * ((x - whole).abs() >= 0.5).to(x.dtype)


def quantise_rois(rois: Tensor, spatial_scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RoIPool's step 1: ``(R, 5)`` rois -> integer-valued ``x_start, y_start, width, height``
    in feature cells (float tensors, ``(R,)`` each)."""
    x_start = _round_half_away(rois[:, 1] * spatial_scale)
    y_start = _round_half_away(rois[:, 2] * spatial_scale)
    x_end = _round_half_away(rois[:, 3] * spatial_scale)
    y_end = _round_half_away(rois[:, 4] * spatial_scale)
    width = (x_end - x_start + 1).clamp(min=1)
    height = (y_end - y_start + 1).clamp(min=1)
    return x_start, y_start, width, height


def _bin_edges(start: Tensor, size: Tensor, bins: int, limit: int) -> tuple[Tensor, Tensor]:
    """RoIPool's step 2 along one axis: ``(R, bins)`` first and one-past-last cell of each bin."""
    bin_size = divide(size[:, None], bins)  # (R, 1); exact, so that ceil(21 / 7) is 3 on a GPU too
    p = torch.arange(bins, device=start.device, dtype=start.dtype)[None]  # (1, bins)
    first = (torch.floor(p * bin_size) + start[:, None]).clamp(0, limit)
    last = (torch.ceil((p + 1) * bin_size) + start[:, None]).clamp(0, limit)
    return first.long(), last.long()  # (R, bins) each


def roi_pool(input: Tensor, rois: RoIs, output_size: Union[int, Sequence[int]],
             spatial_scale: float = 1.0, check_values: bool = True) -> Tensor:
    """Fast R-CNN's RoIPool: quantised RoI, quantised bins, max over each bin's cells.

    ``check_values``: as in ``roi_align`` (``False`` only for RoIs built by the caller).
    """
    rois, (oh, ow) = check_roi_inputs(input, rois, output_size, spatial_scale,
                                      check_values=check_values)
    N, C, H, W = input.shape
    R = rois.shape[0]
    coord_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    x_start, y_start, width, height = quantise_rois(rois.detach().to(coord_dtype), spatial_scale)
    y_first, y_last = _bin_edges(y_start, height, oh, H)  # (R, oh)
    x_first, x_last = _bin_edges(x_start, width, ow, W)  # (R, ow)
    features = input.permute(0, 2, 3, 1).reshape(N * H * W, C)  # (N*H*W, C)
    lowest = _lowest(input.dtype)
    order, chunks = _chunks_by_window(y_last - y_first, x_last - x_first, oh * ow * max(C, 1))
    pieces = []
    for begin, end, kh, kw in chunks:
        chunk = order[begin:end]  # a view: no copy to the device per chunk
        pieces.append(_pool_chunk(features, rois[chunk, 0].long(), y_first[chunk], y_last[chunk],
                                  x_first[chunk], x_last[chunk], kh, kw, H, W, lowest))
    if pieces:
        out = torch.cat(pieces)[torch.argsort(order)]  # (R, oh, ow, C), the RoIs' order
    else:  # empty RoI set: keep the output attached to the graph
        out = features[:0, None, None, :].expand(0, oh, ow, C)
    return out.permute(0, 3, 1, 2)  # (R, C, oh, ow), channels-last strides


def _chunks_by_window(bin_heights: Tensor, bin_widths: Tensor, per_cell: int
                      ) -> tuple[Tensor, list[tuple[int, int, int, int]]]:
    """The RoIs in chunks of similar bin extent: ``order (R,)`` on the RoIs' device, and per
    chunk ``(begin, end, kh, kw)``: the RoIs ``order[begin:end]``, gathered as ``kh x kw``
    windows (the chunk's largest bin), at most ``_CHUNK_ELEMENTS`` at a time.

    ``bin_heights (R, oh)``, ``bin_widths (R, ow)``: cells per bin. One window size for all RoIs
    made one whole-image RoI among small proposals gather every RoI at its size: 128 RoIs on a
    C4 map took 2.7-3.0 s with one such RoI and 0.35-0.48 s without (that version loaded beside
    this one, same runs, 2026-12-01); now about the same either way (``bench/roi_pool_windows.py``
    prints the ratios to torchvision's op). RoIs are grouped by their bin extent rounded up to a
    power of two on each axis, so each is gathered at most at twice its own extent each way,
    and a group larger than memory allows is split. One host read (R pairs), as before (the
    largest extent was read for all RoIs), and one queued copy back of the order: chunks are
    slices of it, not a copy each (on a GPU, a copy from unpinned memory waits for the queue).
    """
    if len(bin_heights) == 0:
        return bin_heights.new_zeros(0, dtype=torch.long), []
    extents = torch.stack([bin_heights.amax(dim=1), bin_widths.amax(dim=1)], 1).clamp(min=1).cpu()  # one read
    # (ceil(log2 h), ceil(log2 w)) per RoI, as one sortable key; RoIs of a group end up adjacent
    groups = torch.ceil(torch.log2(extents.double())).long()  # (R, 2)
    key = groups[:, 0] * 64 + groups[:, 1]
    order = torch.argsort(key, stable=True)
    _, counts = torch.unique_consecutive(key[order], return_counts=True)
    chunks, begin = [], 0
    for count in counts.tolist():  # a loop over groups (a handful), not over RoIs
        members = order[begin:begin + count]
        kh, kw = (int(v) for v in extents[members].amax(dim=0))
        step = max(_CHUNK_ELEMENTS // (kh * kw * per_cell), 1)
        chunks += [(start, min(start + step, begin + count), kh, kw) for start in range(begin, begin + count, step)]
        begin += count
    return host_to_device(order, bin_heights.device), chunks


def _pool_chunk(features: Tensor, batch: Tensor, y_first: Tensor, y_last: Tensor, x_first: Tensor,
                x_last: Tensor, kh: int, kw: int, H: int, W: int, lowest: float) -> Tensor:
    """RoIPool's step 3 for a chunk of Rc RoIs whose bins fit ``kh x kw`` windows: the max over
    each bin's cells, ``(Rc, oh, ow, C)``. ``features (N*H*W, C)``; ``batch (Rc,)``; the bins'
    first and one-past-last cells ``(Rc, oh)`` / ``(Rc, ow)``."""
    C = features.shape[1]
    dy = torch.arange(kh, device=features.device)
    dx = torch.arange(kw, device=features.device)
    ys = y_first[:, :, None] + dy  # (Rc, oh, kh)
    xs = x_first[:, :, None] + dx  # (Rc, ow, kw)
    y_ok = ys < y_last[:, :, None]
    x_ok = xs < x_last[:, :, None]
    rows = batch[:, None, None] * H + ys.clamp(max=H - 1)  # (Rc, oh, kh)
    index = (rows[:, :, None, :, None] * W
             + xs.clamp(max=W - 1)[:, None, :, None, :]).flatten(3)  # (Rc, oh, ow, kh*kw)
    valid = (y_ok[:, :, None, :, None] & x_ok[:, None, :, None, :]).flatten(3)  # (Rc, oh, ow, kh*kw)
    # Which cell holds each bin's max is found without autograd; the output is then one
    # gather from the map, whose backward keeps only that cell's index. Max-pooling the
    # gathered windows with autograd would keep every window (kh*kw times the output) for
    # the backward pass.
    with torch.no_grad():
        windows = features[index.reshape(-1)].reshape(*index.shape, C)  # (Rc, oh, ow, kh*kw, C)
        # cells outside the bin, and NaN cells (torchvision's `cell > max` is false for NaN),
        # take no part in the max
        skipped = ~valid[..., None] | windows.isnan()
        windows = windows.masked_fill(skipped, float("-inf"))
        best = windows.amax(dim=3)  # (Rc, oh, ow, C)
        # the first cell (row-major in the bin) holding the max, as torchvision's kernel
        # picks it, so that tied cells give the gradient to the same one (argmax along a
        # middle dimension is very slow on the CPU; kh*kw is small)
        cell = index[:, :, :, :1].expand(best.shape)  # in range whatever the values
        for k in reversed(range(kh * kw)):
            cell = torch.where(windows[:, :, :, k] == best, index[:, :, :, k, None], cell)
        # torchvision's running max starts at -FLT_MAX and only a cell above it replaces it
        nothing_above = ~(best > lowest)  # (Rc, oh, ow, C)
        del windows
    out = features.gather(0, cell.reshape(-1, C)).reshape(cell.shape)  # (Rc, oh, ow, C)
    # masked_fill passes no gradient to what it fills: such bins have no max cell
    out = out.masked_fill(nothing_above, lowest)
    empty = ~valid.any(dim=3)  # (Rc, oh, ow): bin clipped away entirely
    return out.masked_fill(empty[..., None], 0.0)


def roi_warp(input: Tensor, rois: RoIs, output_size: Union[int, Sequence[int]],
             spatial_scale: float = 1.0, sampling_ratio: int = 2, mode: str = "max",
             check_values: bool = True) -> Tensor:
    """RoIWarp as §3 describes MNC's: RoIPool's quantised RoI, then RoIAlign's bilinear
    sampling inside it (how it differs from MNC's own Caffe layer: the module docstring).

    ``sampling_ratio``: points per bin each way (2 = the paper's four points; ``<= 0``
    adaptive); ``mode``: ``"max"`` or ``"avg"`` (both rows of Table 2c); ``check_values``:
    as in ``roi_align``.
    """
    rois, size = check_roi_inputs(input, rois, output_size, spatial_scale, mode, check_values)
    if not isinstance(sampling_ratio, int):
        raise ValueError(f"sampling_ratio must be an int, got {sampling_ratio!r}")
    coord_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    rois = rois.detach().to(coord_dtype)
    x_start, y_start, width, height = quantise_rois(rois, spatial_scale)
    # the quantised box, in feature units, handed to RoIAlign at scale 1
    boxes = torch.stack([rois[:, 0], x_start, y_start, x_start + width, y_start + height], 1)
    return roi_align_torch(input, boxes, size, 1.0, sampling_ratio, True, mode)  # (R, C, oh, ow)
