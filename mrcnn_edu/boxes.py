"""Boxes: the conventions every other module relies on, IoU, the box coder and NMS.

Conventions (fixed for the whole package)
-----------------------------------------
- A box is ``(x1, y1, x2, y2)`` as floats in input-image pixels ("xyxy").
- Pixel ``i`` covers the half-open interval ``[i, i + 1)``: its centre is at ``i + 0.5``.
  A box covering pixels 2..5 inclusive is therefore ``x1 = 2, x2 = 6`` and its width is
  ``x2 - x1 = 4`` (no "+1" as in the original Caffe code).
- Label 0 is background; the K object classes are the contiguous labels ``1..K``
  (``data/coco.py`` maps dataset category ids to them and back).

Notation: ``N``, ``M`` numbers of boxes; ``boxes: (N, 4) xyxy``.

The box parametrisation is Faster R-CNN's (Ren et al. 2015, eq. 2), which Mask R-CNN keeps
for both the RPN and the box branch (§3 "Implementation details"):
``tx = (x - xa) / wa, ty = (y - ya) / ha, tw = log(w / wa), th = log(h / ha)``
where ``(x, y, w, h)`` is a box's centre and size and ``a`` denotes the anchor / proposal.

NMS here is the greedy algorithm written so that one can read it; it keeps what
``torchvision.ops.nms`` keeps (kept indices in decreasing score, ties broken by index) except
when an IoU equals the threshold: see :func:`nms`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from mrcnn_edu.device import host_to_device

__all__ = [
    "check_boxes",
    "invalid_box_rows",
    "greedy_keep_in_rounds",
    "box_area",
    "box_iou",
    "matched_box_iou",
    "pad_boxes",
    "pad_rows",
    "BoxCoder",
    "clip_boxes",
    "large_boxes_mask",
    "remove_small_boxes",
    "nms",
    "keep_sorted",
    "greedy_keep_by_blocks",
    "greedy_keep",
    "nms_in_images",
    "batched_nms",
]

# Detectron's bound on exp(dw): a box may grow at most 1000/16 times its reference per step,
# which keeps an untrained network's first decodes from overflowing.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)
# on a GPU, above this many boxes batched_nms runs one NMS per category (memory N^2 -> sum N_c^2)
_BATCHED_NMS_ONE_MATRIX_MAX = 4000
# on the CPU, NMS over more boxes than this goes by blocks (greedy_keep_by_blocks): for fewer, one
# overlap matrix costs less than the blocks' Python loop (and takes all images of a batch at once)
NMS_MATRIX_MAX_BOXES = 128
# on a GPU, NMS puts at most this many box pairs through the IoU at once (~1 GB of temporaries
# in fp32: about 32 bytes a pair), splitting by images, then by rows of one image's matrix
NMS_PAIRS_PER_CHUNK = 2 ** 25


def check_boxes(boxes: Tensor, name: str = "boxes", allow_empty_size: bool = True,
                values: bool | None = None, batched: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``boxes`` is a finite ``(N, 4)`` xyxy tensor.

    ``batched``: also accept ``(B, N, 4)``, one row of boxes per image (zero-padded to a common
    ``N``; padding boxes are empty, which is legal), checked as its ``B*N`` rows.

    ``allow_empty_size``: zero-width / zero-height boxes are legal (they occur after clipping);
    negative sizes (``x2 < x1``) never are.
    ``values``: also check the coordinates (finite, non-negative sizes). Reading values on the
    host is a synchronisation on a GPU -- it stalls the queue of kernels the CPU runs ahead
    with -- so by default (``None``) only CPU tensors get it. On a GPU, ``MaskRCNN`` checks its
    targets once per batch (``values=True``) and the box functions it then calls many times
    per image check shapes and dtypes only, as torchvision's do.
    """
    if not isinstance(boxes, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if batched and boxes.dim() == 3 and boxes.shape[-1] == 4:
        name = f"{name} (rows of all {boxes.shape[0]} images, in order)"
        boxes = boxes.reshape(-1, 4)
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        if batched:
            raise ValueError(f"{name} must have shape (N, 4) or (B, N, 4) in xyxy, got {tuple(boxes.shape)}")
        raise ValueError(f"{name} must have shape (N, 4) in xyxy, got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {boxes.dtype}")
    if values is None:
        values = boxes.device.type == "cpu"
    if boxes.numel() == 0 or not values:
        return
    bad = invalid_box_rows(boxes, allow_empty_size)
    if not bad.any():  # the one host read
        return
    row = int(bad.nonzero()[0, 0])
    box = boxes[row].tolist()
    if not all(math.isfinite(v) for v in box):
        raise ValueError(f"{name} contains non-finite coordinates (nan or inf) at row {row}: {box}")
    if box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"{name} has a negative size at row {row}: {box} (expected x2 >= x1, y2 >= y1)")
    raise ValueError(f"{name} contains zero-area boxes, e.g. row {row}: {box}")


def invalid_box_rows(boxes: Tensor, allow_empty_size: bool = True) -> Tensor:
    """``(N, 4)`` -> ``(N,)`` bool: the rows :func:`check_boxes` refuses (non-finite, negative
    size, or empty where ``allow_empty_size`` is False), computed on the boxes' device, unread."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    bad = ~torch.isfinite(boxes).all(dim=1) | (widths < 0) | (heights < 0)
    if not allow_empty_size:
        bad |= (widths == 0) | (heights == 0)
    return bad


def box_area(boxes: Tensor) -> Tensor:
    """Area of each box. ``boxes: (N, 4) xyxy`` -> ``(N,)``, or ``(B, N, 4)`` -> ``(B, N)``."""
    check_boxes(boxes, batched=True)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _intersection(a: Tensor, b: Tensor) -> Tensor:
    """Area of ``a ∩ b`` for broadcastable ``(..., 4)`` xyxy boxes -> ``(...)``.

    Two ways to the same bits (the same operations on the same numbers). On the CPU coordinate
    by coordinate: every ``(N, M)`` temporary of a pairwise call is contiguous, 1.3-1.8x faster
    than ``(N, M, 2)`` corner tensors. On a GPU the corner tensors: 5 kernels instead of 9, and
    a small training step is bound by its kernel launches, not by the memory they touch."""
    if _takes_the_cpu_way(a.device):
        ax1, ay1, ax2, ay2 = a.unbind(-1)
        bx1, by1, bx2, by2 = b.unbind(-1)
        width = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(min=0)
        height = (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp(min=0)
        return width * height
    top_left = torch.max(a[..., :2], b[..., :2])
    bottom_right = torch.min(a[..., 2:], b[..., 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def _iou(inter: Tensor, area_a: Tensor, area_b: Tensor) -> Tensor:
    union = area_a + area_b - inter
    # where the union is empty the intersection is too; define 0/0 as 0
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter))


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union of every pair. ``a: (N, 4)``, ``b: (M, 4)`` -> ``(N, M)``.

    A batch of images at once: ``a: (B, N, 4)``, ``b: (B, M, 4)`` -> ``(B, N, M)``, image by
    image, in a fixed number of ops whatever ``B`` (a training step matches 16 images; one call
    per image would be 16 times the kernel launches on a GPU). Pad images with fewer boxes with
    zeros: an empty box has IoU 0 with everything.

    Two zero-area boxes have IoU 0 (not nan): their union is empty, and nothing overlaps.
    """
    check_boxes(a, "a", batched=True)
    check_boxes(b, "b", batched=True)
    if a.dim() != b.dim() or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"box_iou needs a and b both (N, 4) / (M, 4), or both (B, N, 4) / (B, M, 4) "
                         f"with the same B, got {tuple(a.shape)} and {tuple(b.shape)}")
    return _pairwise_iou(a, b)


def _pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """:func:`box_iou` without its checks (for callers that made them once, on all the boxes)."""
    return _iou(_intersection(a[..., :, None, :], b[..., None, :, :]), _area(a)[..., :, None], _area(b)[..., None, :])


def _area(boxes: Tensor) -> Tensor:
    """:func:`box_area` without its checks."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def matched_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of ``a[i]`` with ``b[i]`` only. ``a, b: (N, 4)`` -> ``(N,)``: ``box_iou``'s diagonal,
    without its ``N x N`` matrix (e.g. each box with its own quantised RoI)."""
    check_boxes(a, "a")
    check_boxes(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"matched_box_iou needs as many boxes in b as in a, got {tuple(a.shape)} and {tuple(b.shape)}")
    return _iou(_intersection(a, b), box_area(a), box_area(b))


def pad_rows(rows: list[Tensor], fill: float = 0) -> Tensor:
    """Per-image ``(N_i, *rest)`` tensors -> ``(B, max N_i, *rest)``, short images filled with ``fill``.

    One concatenation and one indexed copy, whatever the number of images (``pad_sequence``
    launches a copy per image); the row indices are built on the host and queued to the device
    without a synchronisation (``device.host_to_device``).
    """
    rows = list(rows)
    if not rows:
        raise ValueError("rows must be a non-empty list of tensors, one per image")
    counts = [r.shape[0] for r in rows]
    longest = max(counts)
    out = rows[0].new_full((len(rows), longest, *rows[0].shape[1:]), fill)
    if sum(counts) == 0:
        return out
    # row j of image i goes to row i * longest + j of the flattened output: the True cells of a
    # (B, longest) mask, found with numpy on the host (thousands of proposals per image: no
    # Python loop, and no torch op that reads like a device sync)
    flat = torch.from_numpy(np.flatnonzero(np.arange(longest)[None, :] < np.asarray(counts)[:, None]))
    # index_put_ rather than index_copy_: deterministic on CUDA, also under use_deterministic_algorithms
    out.view(len(rows) * longest, *out.shape[2:])[host_to_device(flat, out.device)] = torch.cat(rows)
    return out


def pad_boxes(boxes: list[Tensor]) -> Tensor:
    """Per-image ``(G_i, 4)`` boxes -> ``(B, max G_i, 4)``, shorter images padded with empty
    ``(0, 0, 0, 0)`` boxes, which overlap nothing (IoU 0) and so never match."""
    return pad_rows(boxes)


class BoxCoder:
    """Encodes boxes as Faster R-CNN deltas relative to reference boxes, and back.

    ``weights = (wx, wy, ww, wh)`` scale the four deltas (Fast R-CNN's target normalisation;
    Detectron uses (1, 1, 1, 1) for the RPN and (10, 10, 5, 5) for the box branch).
    ``scale_clamp`` bounds ``dw, dh`` before ``exp`` when decoding (default ``log(1000/16)``).
    """

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = DEFAULT_SCALE_CLAMP) -> None:
        if len(weights) != 4 or any(w <= 0 for w in weights):
            raise ValueError(f"weights must be four positive numbers, got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def encode(self, boxes: Tensor, reference: Tensor) -> Tensor:
        """Deltas that turn ``reference`` into ``boxes``. Both ``(N, 4)`` -> ``(N, 4)``, or both
        ``(B, N, 4)`` -> ``(B, N, 4)`` (a batch of images).

        Reference boxes must have positive width and height (anchors and proposals do).
        """
        check_boxes(boxes, "boxes", batched=True)
        check_boxes(reference, "reference", batched=True)
        if boxes.shape != reference.shape:
            raise ValueError(f"boxes {tuple(boxes.shape)} and reference {tuple(reference.shape)} must match")
        wx, wy, ww, wh = self.weights
        ref_w = reference[..., 2] - reference[..., 0]
        ref_h = reference[..., 3] - reference[..., 1]
        ref_cx = reference[..., 0] + 0.5 * ref_w
        ref_cy = reference[..., 1] + 0.5 * ref_h
        w = boxes[..., 2] - boxes[..., 0]
        h = boxes[..., 3] - boxes[..., 1]
        cx = boxes[..., 0] + 0.5 * w
        cy = boxes[..., 1] + 0.5 * h
        dx = wx * (cx - ref_cx) / ref_w
        dy = wy * (cy - ref_cy) / ref_h
        dw = ww * torch.log(w / ref_w)
        dh = wh * torch.log(h / ref_h)
        return torch.stack([dx, dy, dw, dh], dim=-1)

    def decode(self, deltas: Tensor, reference: Tensor) -> Tensor:
        """Apply ``deltas`` to ``reference`` boxes.

        ``deltas: (N, 4*k)`` (k = 1, or one set per class), ``reference: (N, 4)`` -> ``(N, 4*k)``,
        in fp32 at least. Under mixed precision the heads' deltas are bf16 or fp16. Their 8- or
        11-bit mantissas would round a 384 px coordinate to a multiple of 2 or 0.25 px, and with
        it every RoI, match and regression target built from the boxes. Detectron2 decodes in
        fp32 for the same reason.
        """
        if deltas.dim() != 2 or deltas.shape[1] % 4 != 0:
            raise ValueError(f"deltas must have shape (N, 4*k), got {tuple(deltas.shape)}")
        check_boxes(reference, "reference")
        if deltas.shape[0] != reference.shape[0]:
            raise ValueError(f"deltas has {deltas.shape[0]} rows but reference has {reference.shape[0]}")
        dtype = torch.promote_types(torch.promote_types(deltas.dtype, reference.dtype), torch.float32)
        deltas, reference = deltas.to(dtype), reference.to(dtype)
        wx, wy, ww, wh = self.weights
        ref_w = (reference[:, 2] - reference[:, 0])[:, None]  # (N, 1)
        ref_h = (reference[:, 3] - reference[:, 1])[:, None]
        ref_cx = reference[:, 0:1] + 0.5 * ref_w
        ref_cy = reference[:, 1:2] + 0.5 * ref_h
        dx = deltas[:, 0::4] / wx  # (N, k)
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.scale_clamp)
        cx = dx * ref_w + ref_cx
        cy = dy * ref_h + ref_cy
        w = torch.exp(dw) * ref_w
        h = torch.exp(dh) * ref_h
        boxes = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=2)  # (N, k, 4)
        return boxes.reshape(deltas.shape)  # (N, 4*k)


def clip_boxes(boxes: Tensor, image_size: tuple[int, int] | list[tuple[int, int]]) -> Tensor:
    """Clip ``boxes: (N, 4*k)`` to an image of ``image_size = (height, width)`` pixels.

    A batch: ``boxes: (B, N, 4*k)`` and ``image_size`` a list of B ``(height, width)``, each
    image's boxes to its own size, in a fixed number of ops.

    With pixel ``i`` covering ``[i, i+1)`` the image spans ``[0, width] x [0, height]``. A NaN
    coordinate (a diverged network's decode) becomes 0: clipped boxes are always in the image,
    so no RoI op downstream indexes memory with a NaN (the loss, NaN too, stops training).
    """
    if boxes.dim() not in (2, 3) or boxes.shape[-1] % 4 != 0:
        raise ValueError(f"boxes must have shape (N, 4*k) or (B, N, 4*k), got {tuple(boxes.shape)}")
    sizes = list(image_size) if boxes.dim() == 3 else [image_size]
    if len(sizes) != boxes.shape[0] and boxes.dim() == 3:
        raise ValueError(f"image_size needs one (height, width) per image, got {len(sizes)} for {boxes.shape[0]}")
    for size in sizes:
        if len(size) != 2 or size[0] <= 0 or size[1] <= 0:
            raise ValueError(f"image_size must be positive (height, width), got {size}")
    boxes = boxes.nan_to_num(nan=0.0)
    if boxes.dim() == 2:
        height, width = image_size
        x = boxes[:, 0::2].clamp(min=0, max=width)
        y = boxes[:, 1::2].clamp(min=0, max=height)
        return torch.stack([x, y], dim=2).reshape(boxes.shape)
    # built on the host, queued to the device (a plain new_tensor from a list blocks on a GPU)
    limits = host_to_device(torch.tensor(sizes, dtype=boxes.dtype), boxes.device)[:, None, :]  # (B, 1, 2) as (h, w)
    x = torch.minimum(boxes[..., 0::2].clamp(min=0), limits[..., 1:])
    y = torch.minimum(boxes[..., 1::2].clamp(min=0), limits[..., :1])
    return torch.stack([x, y], dim=-1).reshape(boxes.shape)


def large_boxes_mask(boxes: Tensor, min_size: float) -> Tensor:
    """Which boxes have width and height both at least ``min_size`` pixels: ``(N, 4)`` ->
    ``(N,)`` bool, or ``(B, N, 4)`` -> ``(B, N)``. A mask, so no host read (unlike indices).
    Shapes are checked, not values: its callers' boxes are decoded and clipped, never NaN."""
    check_boxes(boxes, batched=True, values=False)
    return (boxes[..., 2] - boxes[..., 0] >= min_size) & (boxes[..., 3] - boxes[..., 1] >= min_size)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of the boxes whose width and height are both at least ``min_size`` pixels."""
    check_boxes(boxes)
    return torch.nonzero(large_boxes_mask(boxes, min_size)).flatten()


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression (R-CNN's, as Fast R-CNN §3 uses it), returning kept indices (int64).

    Visit boxes by decreasing score; keep a box unless it overlaps an already *kept* box with
    IoU strictly greater than ``iou_threshold``. Equal scores are visited in index order (a
    stable sort), as ``torchvision.ops.nms`` does; the result is in visiting order.

    An IoU exactly at the threshold does not suppress. The IoU is computed in the boxes' dtype
    and compared with the threshold in that dtype, so for whole-pixel boxes (exact areas, one
    rounded division) such a tie is decided as exact arithmetic decides it. torchvision's CPU
    kernel (the one the tests compare with) compares the float32 IoU with the threshold as a
    double instead: where float32 rounds the threshold up (0.3, 0.4, 0.6), boxes
    ``[0, 0, 10, 10]`` and ``[0, 0, 10, 3]`` (IoU 30 / 100) are both kept here and the second
    suppressed there. The package's thresholds, 0.7 and 0.5, round down or not at all, and
    there the two agree.

    The O(N^2) part, the pairwise IoUs, is done in tensor operations on the boxes' device;
    what is left is inherently sequential -- each decision depends on the earlier ones
    (:func:`keep_sorted`).
    """
    check_boxes(boxes)
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores must have shape ({boxes.shape[0]},), got {tuple(scores.shape)}")
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[torch.nonzero(keep_sorted(boxes[order], iou_threshold)).flatten()]


def keep_sorted(sorted_boxes: Tensor, iou_threshold: float, categories: Tensor | None = None) -> Tensor:
    """Greedy NMS's decisions for boxes sorted by decreasing score: ``sorted_boxes: (N, 4)``
    -> ``keep: (N,)`` bool, or ``(B, N, 4)`` -> ``(B, N)`` (B independent rows of boxes).

    ``categories: (N,)`` (``(B, N)``) ints, optional: a box suppresses only boxes of its own
    category (:func:`batched_nms`). The boxes must then be sorted by decreasing score within
    each category, and, for the CPU's blocks, grouped by category in increasing category (one
    overlap matrix does not need that). The boxes' values are not checked here (:func:`nms`
    checks them).

    On the CPU more than :data:`NMS_MATRIX_MAX_BOXES` boxes go by blocks
    (:func:`greedy_keep_by_blocks`), which computes the IoUs only of boxes still alive, with the
    boxes after them. On a GPU that would read the decisions on the host block after block;
    there (and for a few boxes on the CPU) the whole ``(N, N)`` overlap matrix is one tensor
    operation, and :func:`greedy_keep` decides from it.
    """
    if categories is not None and categories.shape != sorted_boxes.shape[:-1]:
        raise ValueError(f"categories must have shape {tuple(sorted_boxes.shape[:-1])}, got {tuple(categories.shape)}")
    if sorted_boxes.numel() == 0:
        return torch.zeros(sorted_boxes.shape[:-1], dtype=torch.bool, device=sorted_boxes.device)
    n = sorted_boxes.shape[-2]
    if _takes_the_cpu_way(sorted_boxes.device) and n > NMS_MATRIX_MAX_BOXES:
        rows = sorted_boxes.reshape(-1, n, 4)
        row_categories = [None] * len(rows) if categories is None else categories.reshape(-1, n)
        keep = [greedy_keep_by_blocks(b, iou_threshold, c) for b, c in zip(rows, row_categories)]
        return torch.stack(keep).reshape(sorted_boxes.shape[:-1])
    overlaps = _overlap_matrix(sorted_boxes, iou_threshold)
    if categories is not None:
        overlaps &= categories[..., :, None] == categories[..., None, :]
    return greedy_keep(overlaps)


def _overlap_matrix(sorted_boxes: Tensor, iou_threshold: float) -> Tensor:
    """``(N, 4)`` -> ``(N, N)`` bool, or ``(B, N, 4)`` -> ``(B, N, N)``: IoU above the threshold.

    Above :data:`NMS_PAIRS_PER_CHUNK` pairs in blocks of rows: the matrix is a byte a pair, the
    IoU's float temporaries ~32 (4.4 GB for C4's 12000 boxes at once)."""
    n = sorted_boxes.shape[-2]
    block = max(1, NMS_PAIRS_PER_CHUNK // max(1, math.prod(sorted_boxes.shape[:-1])))
    if block >= n:
        return _pairwise_iou(sorted_boxes, sorted_boxes) > iou_threshold
    overlaps = torch.empty((*sorted_boxes.shape[:-1], n), dtype=torch.bool, device=sorted_boxes.device)
    for row in range(0, n, block):
        rows = sorted_boxes[..., row:row + block, :]
        overlaps[..., row:row + block, :] = _pairwise_iou(rows, sorted_boxes) > iou_threshold
    return overlaps


def _takes_the_cpu_way(device: torch.device) -> bool:
    """Whether tensors on ``device`` take this module's CPU way (:func:`keep_sorted` may decide
    by blocks on the host, :func:`_intersection` goes coordinate by coordinate) or the GPU's
    (the whole overlap matrix; corner tensors). ``bench/dispatch_counts.py`` takes the GPU's
    way on the CPU."""
    return device.type == "cpu"


def greedy_keep_by_blocks(sorted_boxes: Tensor, iou_threshold: float, categories: Tensor | None = None,
                          block: int = 256) -> Tensor:
    """Greedy NMS's decisions on the CPU, ``sorted_boxes: (N, 4)`` by decreasing score ->
    ``keep: (N,)`` bool, without the ``(N, N)`` overlap matrix.

    Like ``torchvision.ops.nms``'s CPU kernel, a box's IoUs are computed only if it is still
    alive when its turn comes, and only with the boxes after it (those it may suppress); but a
    block of ``block`` boxes at a time, as one tensor operation: the block's alive boxes with
    every box from the block's start on. A loop over those rows then decides the block's
    boxes in order. Work: about half the matrix when nothing is suppressed, much less on the
    RPN's crowded proposals; memory: ``block x N`` instead of ``N x N``.

    ``categories: (N,)`` ints, optional: a box suppresses only boxes of its own category. The
    boxes come grouped by category, in increasing category (each group by decreasing score), so
    a block's boxes can only suppress boxes up to the end of its last box's group: the IoUs
    stop there, and the work is about each category's own half matrix.
    """
    n = sorted_boxes.shape[0]
    group_end = np.full(n, n)  # one past the last box that box i may suppress
    if categories is not None:
        if bool((categories[1:] < categories[:-1]).any()):
            raise ValueError("greedy_keep_by_blocks needs the boxes grouped by category, in increasing category")
        group_end = torch.searchsorted(categories.contiguous(), categories.contiguous(), right=True).numpy()
    keep = np.zeros(n, dtype=bool)
    suppressed = np.zeros(n, dtype=bool)
    for start in range(0, n, block):
        stop = min(start + block, n)
        alive = start + np.flatnonzero(~suppressed[start:stop])  # suppressed earlier: no IoUs
        if len(alive) == 0:
            continue
        end = int(group_end[stop - 1])
        rows = torch.from_numpy(alive)
        overlaps = _pairwise_iou(sorted_boxes[rows], sorted_boxes[start:end]) > iou_threshold  # (alive, end - start)
        if categories is not None:
            overlaps &= categories[rows][:, None] == categories[None, start:end]
        for i, row in zip(alive.tolist(), overlaps.numpy()):
            if not suppressed[i]:  # not suppressed by a box decided earlier in this block
                keep[i] = True
                suppressed[start:end] |= row
    return torch.from_numpy(keep)


def greedy_keep(overlaps: Tensor) -> Tensor:
    """Greedy NMS's decisions from ``overlaps: (N, N)`` bool (or ``(B, N, N)``, B independent
    rows of boxes), boxes sorted by decreasing score -> ``keep: (N,)`` (``(B, N)``) bool.

    On the CPU: a short loop over the boolean matrix, one row OR per *kept* box. On a GPU that
    loop would first copy the matrix to the host (4 MB for the RPN's 2000 boxes) and stall the
    queue of kernels; there the same answer is reached in rounds of whole-matrix operations
    (:func:`greedy_keep_in_rounds`).
    """
    if overlaps.device.type != "cpu":  # CUDA, or any other accelerator
        return greedy_keep_in_rounds(overlaps)
    rows = overlaps.reshape(-1, *overlaps.shape[-2:]).numpy()
    keep = np.zeros(rows.shape[:2], dtype=bool)
    for row, row_keep in zip(rows, keep):
        suppressed = np.zeros(len(row), dtype=bool)
        for i in range(len(row)):
            if suppressed[i]:
                continue
            row_keep[i] = True
            suppressed |= row[i]  # everything box i overlaps too much is out
    return torch.from_numpy(keep).reshape(overlaps.shape[:-1])


def nms_in_images(boxes: Tensor, scores: Tensor, iou_threshold: float, valid: Tensor | None = None) -> Tensor:
    """:func:`nms` on each image of a batch at once: ``boxes: (B, N, 4)``, ``scores: (B, N)``
    -> ``keep: (B, N)`` bool, in the boxes' own order (not a list of indices, whose length
    differs per image and would have to be read on the host).

    ``valid: (B, N)`` bool, optional: boxes to leave out; they suppress nothing and are not kept.
    On a GPU the images go through the ``(N, N)`` overlap matrices together, as many at a time
    as fit in :data:`NMS_PAIRS_PER_CHUNK` pairs (one image at a time above that; RPN training
    has 2000 boxes per FPN level, up to 12000 on C4). An image with more pairs than that (C4's
    12000 boxes: 1.4e8) computes its overlap matrix in blocks of rows: the (N, N) bool matrix
    is a byte a pair, the IoU's float temporaries would be ~32 (4.4 GB at 12000 boxes). On the
    CPU each image of more than :data:`NMS_MATRIX_MAX_BOXES` boxes goes by blocks of boxes
    (:func:`keep_sorted`).
    """
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:2]:
        raise ValueError(f"need boxes (B, N, 4) and scores (B, N), got {tuple(boxes.shape)} and {tuple(scores.shape)}")
    check_boxes(boxes, "boxes", batched=True)  # once, here: keep_sorted checks nothing
    if valid is not None:  # an empty box has IoU 0 with every box: it suppresses nothing
        boxes = torch.where(valid[..., None], boxes, 0.0)
    num_images, num_boxes = scores.shape
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if num_boxes == 0:
        return keep
    chunk = max(1, NMS_PAIRS_PER_CHUNK // num_boxes ** 2)
    for start in range(0, num_images, chunk):
        order = torch.sort(scores[start:start + chunk], dim=1, descending=True, stable=True).indices  # (C, N)
        sorted_boxes = torch.gather(boxes[start:start + chunk], 1, order[..., None].expand(-1, -1, 4))
        # back to the boxes' order
        keep[start:start + chunk].scatter_(1, order, keep_sorted(sorted_boxes, iou_threshold))
    return keep if valid is None else keep & valid


def greedy_keep_in_rounds(overlaps: Tensor, rounds_per_read: int = 4) -> Tensor:
    """Greedy NMS's decisions, ``(N,)`` bool, from ``overlaps: (N, N)`` bool of boxes sorted by
    decreasing score (``overlaps[i, j]``: IoU above the threshold), without a per-box loop.
    ``(B, N, N)`` -> ``(B, N)``: B rows of boxes at once, until every row has settled.

    Greedy keeps box ``j`` exactly when no *kept* earlier box overlaps it:
    ``keep[j] = not any(overlaps[i, j] and keep[i] for i < j)``. Each ``keep[j]`` depends only
    on earlier ones, so this has one solution, and applying the rule to all boxes at once,
    starting from "keep everything", reaches it: after ``t`` rounds the first ``t`` boxes are
    right (box 0 from round 1; box ``t`` once boxes ``0..t-1`` are). A round is one matrix
    operation; rounds continue until one changes nothing. That takes as many rounds as the
    longest chain of boxes each suppressing the next: ``N`` at worst, and 2 to 8 (the last one
    changing nothing) on the RPN's proposals of ``bench/train_infer.py`` (800 px, two images,
    84 to 1918 boxes per level), where the CPU loop took 0.05 to 1.1 ms after a copy of the
    matrix to the host. The host reads "changed?" once every ``rounds_per_read`` rounds.
    """
    n = overlaps.shape[-1]
    rank = torch.arange(n, device=overlaps.device)
    suppressors = overlaps & (rank[:, None] < rank[None, :])  # only a higher-scored box suppresses
    keep = torch.ones(overlaps.shape[:-1], dtype=torch.bool, device=overlaps.device)
    for _ in range(0, n + 1, rounds_per_read):
        for _ in range(rounds_per_read):
            keep, previous = ~(suppressors & keep[..., :, None]).any(dim=-2), keep
        if torch.equal(keep, previous):  # the one host read per rounds_per_read rounds
            return keep
    return keep  # n + 1 rounds always suffice (see above)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS run independently per category ``idxs: (N,)``; kept indices in decreasing score
    (equal scores in index order), exactly the union of :func:`nms` on each category.

    The boxes go through :func:`keep_sorted` once, grouped by category, each box suppressing
    only boxes of its own (:func:`_nms_within_categories`). On a GPU that is one ``(N, N)``
    overlap matrix, so there large inputs (over 4000 boxes: the RPN's thousands of proposals
    over five FPN levels) run one :func:`nms` per category instead, which needs ``sum(N_c^2)``
    instead of ``N^2`` memory. On the CPU the blocks stop at each group's end, and need no such
    split. All give the same answer.

    ``torchvision.ops.batched_nms`` (and Detectron2, which calls it) separate the categories
    of up to 1000 boxes (25000 on a GPU; torchvision 0.29) with a trick instead: shift each
    category's boxes by ``idx * (max coordinate + 1)`` and run one NMS. The trick is inexact:
    at offsets of ~1e5 (category 80 of a 1333 px image) fp32 keeps only ~0.01 px of a
    coordinate, which moves an IoU by ~1e-4, so a pair near the threshold can be kept together
    by the batched call yet suppressed by NMS on its category alone. So we do not shift.
    """
    check_boxes(boxes)
    if idxs.dim() != 1 or idxs.shape[0] != boxes.shape[0]:
        raise ValueError(f"idxs must have shape ({boxes.shape[0]},), got {tuple(idxs.shape)}")
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if boxes.shape[0] <= _BATCHED_NMS_ONE_MATRIX_MAX or _takes_the_cpu_way(boxes.device):
        return _nms_within_categories(boxes, scores, idxs, iou_threshold)
    keep = []
    for category in torch.unique(idxs).tolist():
        members = torch.nonzero(idxs == category).flatten()
        keep.append(members[nms(boxes[members], scores[members], iou_threshold)])
    keep = torch.cat(keep).sort().values  # index order first, so equal scores keep it
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def _nms_within_categories(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """:func:`batched_nms` in one greedy pass: ``boxes: (N, 4)``, ``scores, idxs: (N,)`` -> kept
    indices. A box may only suppress boxes of its own category; the IoUs are those of the
    unshifted boxes, as in :func:`nms`. The CPU's blocks need the boxes grouped by category (two
    stable sorts: score, then category); one overlap matrix (a GPU's way) takes them in any
    order of the categories, and is spared the extra sorts and indexing."""
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores must have shape ({boxes.shape[0]},), got {tuple(scores.shape)}")
    order = torch.sort(scores, descending=True, stable=True).indices  # equal scores in index order
    if not _takes_the_cpu_way(boxes.device):
        return order[torch.nonzero(keep_sorted(boxes[order], iou_threshold, idxs[order])).flatten()]
    grouped = order[torch.sort(idxs[order], stable=True).indices]  # by category, each by score
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[grouped] = keep_sorted(boxes[grouped], iou_threshold, idxs[grouped])
    return order[torch.nonzero(keep[order]).flatten()]
