"""Anchors: the reference boxes the RPN classifies and regresses (Faster R-CNN §3.1).

Mask R-CNN keeps Faster R-CNN's RPN. §3.1 "Implementation details": "the RPN anchors span
5 scales and 3 aspect ratios". Two set-ups use them:

- **C4** (one feature map of stride 16): every cell carries all 15 anchors,
  sizes 32, 64, 128, 256, 512 pixels x aspect ratios 0.5, 1, 2.
- **FPN** (Lin et al. 2017, §4.1): one size per level -- 32, 64, 128, 256, 512 on
  P2..P6 (strides 4..64) -- times the same 3 ratios, so 3 anchors per cell.

Notation: ``A`` anchors per cell, ``(H, W)`` a feature map's size, ``s`` its stride.
An anchor of size ``S`` and ratio ``r = height / width`` has area ``S**2``:
``w = S / sqrt(r)``, ``h = S * sqrt(r)``.

Where a cell's anchors sit: a stride-``s`` map is read as the image downsampled in ``s x s``
blocks, cell ``(i, j)`` standing for pixels ``[j*s, (j+1)*s)`` horizontally (pixel ``i`` covers
``[i, i+1)``, see ``boxes.py``), so its anchors are centred at ``((j + 0.5) * s, (i + 0.5) * s)``
-- ``offset=0.5``, our default. RoIAlign's half-pixel shift (``aligned=True``, ``ops/roi_align.py``)
reads a map the same way, so anchors and pooling agree on where a cell is. It is a convention,
not the cell's receptive field: the ResNet's convolutions and max-pool pad by ``k // 2``, which
centres cell ``j``'s receptive field on pixel ``j*s``, at ``j*s + 0.5``, ``(s - 1) / 2`` px
up-left of its anchors (7.5 px at stride 16). The box regression learns a constant shift like
that one; the conventions below differ from ours by such shifts. Elsewhere:

- torchvision puts anchor centres at the cell's top-left corner ``(j*s, i*s)`` and rounds cell
  anchors to whole pixels: ``offset=0.0, round_cell=True`` reproduce its anchors exactly,
  which its pretrained weights need.
- Detectron2 also uses the corner (its default ``MODEL.ANCHOR_GENERATOR.OFFSET = 0.0``) but
  does not round: ``offset=0.0``.
- The original Detectron (``generate_anchors.py``) is cell-centred, like us: it starts from
  the inclusive box ``[0, 0, s-1, s-1]`` ("centered on stride / 2"), whose centre is
  ``(j + 0.5) * s`` in our continuous coordinates. But it quantises sizes its own way, in the
  "+1" convention: widths are rounded at the stride's scale, then multiplied (stride 16, size
  32, ratio 0.5: 46 x 24 px, where ours is 45.25 x 22.63). No option here reproduces it.

Anchors for a map are ordered ``(H, W, A)`` row-major: anchor ``a`` of cell ``(i, j)`` has
index ``(i * W + j) * A + a``. RPN outputs are flattened in the same order.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["cell_anchors", "grid_anchors", "AnchorGenerator", "TorchvisionStrideAnchorGenerator",
           "c4_anchor_generator", "fpn_anchor_generator"]


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float], round_cell: bool = False,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """The ``A = len(aspect_ratios) * len(sizes)`` anchors of one cell, centred on (0, 0).

    Returns ``(A, 4)`` xyxy, ratio-major (all sizes of the first ratio, then the next ratio).
    """
    if len(sizes) == 0 or any((not math.isfinite(s)) or s <= 0 for s in sizes):
        raise ValueError(f"sizes must be positive finite numbers, got {tuple(sizes)}")
    if len(aspect_ratios) == 0 or any((not math.isfinite(r)) or r <= 0 for r in aspect_ratios):
        raise ValueError(f"aspect_ratios must be positive finite numbers, got {tuple(aspect_ratios)}")
    sizes_t = torch.as_tensor(sizes, dtype=torch.float64)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float64)
    heights = (ratios.sqrt()[:, None] * sizes_t[None, :]).flatten()  # (A,) h = S * sqrt(r)
    widths = ((1.0 / ratios.sqrt())[:, None] * sizes_t[None, :]).flatten()  # (A,) w = S / sqrt(r)
    anchors = torch.stack([-widths, -heights, widths, heights], dim=1) / 2  # (A, 4)
    if round_cell:
        anchors = anchors.round()
    return anchors.to(dtype)


def grid_anchors(cell: Tensor, feature_size: tuple[int, int], stride: float | tuple[float, float],
                 offset: float = 0.5) -> Tensor:
    """Place ``cell: (A, 4)`` anchors on every cell of an ``(H, W)`` map of stride ``stride``
    (one number, or ``(stride_y, stride_x)``).

    Returns ``(H * W * A, 4)`` xyxy in image pixels, ordered ``(H, W, A)``.
    """
    if cell.dim() != 2 or cell.shape[1] != 4:
        raise ValueError(f"cell must have shape (A, 4), got {tuple(cell.shape)}")
    height, width = (int(v) for v in feature_size)
    if height < 0 or width < 0:
        raise ValueError(f"feature_size must be non-negative (H, W), got {feature_size}")
    stride_y, stride_x = stride if isinstance(stride, (tuple, list)) else (stride, stride)
    if not (stride_y > 0 and stride_x > 0):
        raise ValueError(f"stride must be positive, got {stride}")
    ys = (torch.arange(height, device=cell.device, dtype=cell.dtype) + offset) * stride_y  # (H,)
    xs = (torch.arange(width, device=cell.device, dtype=cell.dtype) + offset) * stride_x  # (W,)
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
    return (centres + cell[None]).reshape(-1, 4)  # (H*W*A, 4)


class AnchorGenerator(nn.Module):
    """Anchors for one or several feature maps.

    ``sizes[l]`` and ``aspect_ratios[l]`` are level ``l``'s anchor sizes and ratios;
    ``strides[l]`` its stride in image pixels. ``forward(feature_sizes)`` takes the list of
    ``(H_l, W_l)`` and returns a list of ``(H_l * W_l * A_l, 4)`` anchor tensors, one per level.
    Anchors do not depend on the image, only on the map sizes; the RPN drops or clips those
    that leave the image as it sees fit.
    """

    def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]],
                 strides: Sequence[float], offset: float = 0.5, round_cell: bool = False) -> None:
        super().__init__()
        if not (len(sizes) == len(aspect_ratios) == len(strides)):
            raise ValueError(
                f"sizes ({len(sizes)}), aspect_ratios ({len(aspect_ratios)}) and strides ({len(strides)}) "
                "need one entry per feature level"
            )
        self.sizes = [tuple(float(s) for s in level) for level in sizes]
        self.aspect_ratios = [tuple(float(r) for r in level) for level in aspect_ratios]
        self.strides = [float(s) for s in strides]
        self.offset = float(offset)
        self.round_cell = bool(round_cell)
        for level, (s, r) in enumerate(zip(self.sizes, self.aspect_ratios)):
            # buffers follow the module to the GPU; not saved, since the config rebuilds them
            self.register_buffer(f"cell_{level}", cell_anchors(s, r, round_cell), persistent=False)

    @property
    def num_anchors_per_cell(self) -> list[int]:
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def cell(self, level: int) -> Tensor:
        """Level ``level``'s ``(A, 4)`` cell anchors, in float32 or float64 even in a model cast
        to half precision (``model.half()``, ``model.to(torch.bfloat16)``): bf16 holds 8
        significant bits, so a grid of an 800 px image in it is placed 4 px apart."""
        cell = getattr(self, f"cell_{level}")
        if cell.dtype not in (torch.float32, torch.float64):
            cell = cell_anchors(self.sizes[level], self.aspect_ratios[level], self.round_cell).to(cell.device)
        return cell

    def forward(self, feature_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        if len(feature_sizes) != len(self.strides):
            raise ValueError(f"feature_sizes has {len(feature_sizes)} levels, the generator {len(self.strides)}")
        return [grid_anchors(self.cell(level), size, self.strides[level], self.offset)
                for level, size in enumerate(feature_sizes)]


class TorchvisionStrideAnchorGenerator(AnchorGenerator):
    """Anchors placed with torchvision's strides: padded image size // feature size, per axis.

    torchvision does not use a level's nominal stride: it divides the padded batch size by the
    map's size. P2..P5 come out as 4..32, but P6 (P5 max-pooled with stride 2) of a P5 with an
    odd side has ceil(side / 2) cells, so an 800-px-high batch has a P6 stride of 800 // 13 = 61
    rows, not 64. Weights trained that way expect those anchors. The padded size is the finest
    map's size times its stride (the batch is padded to a multiple of 32, so that is exact).
    """

    def forward(self, feature_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        if len(feature_sizes) != len(self.strides):
            raise ValueError(f"feature_sizes has {len(feature_sizes)} levels, the generator {len(self.strides)}")
        finest_h, finest_w = (int(v) for v in feature_sizes[0])
        image_h, image_w = round(finest_h * self.strides[0]), round(finest_w * self.strides[0])
        return [grid_anchors(self.cell(level), (h, w), (image_h // int(h), image_w // int(w)), self.offset)
                for level, (h, w) in enumerate(feature_sizes)]


def c4_anchor_generator(sizes: Sequence[float] = (32, 64, 128, 256, 512),
                        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), stride: int = 16,
                        **kwargs) -> AnchorGenerator:
    """§3.1: one stride-16 map (res4), 5 scales x 3 aspect ratios = 15 anchors per cell."""
    return AnchorGenerator([sizes], [aspect_ratios], [stride], **kwargs)


def fpn_anchor_generator(sizes: Sequence[float] = (32, 64, 128, 256, 512),
                         aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                         strides: Sequence[int] = (4, 8, 16, 32, 64), **kwargs) -> AnchorGenerator:
    """FPN §4.1: one size per level P2..P6 (strides 4..64), 3 aspect ratios = 3 anchors per cell."""
    return AnchorGenerator([(s,) for s in sizes], [aspect_ratios] * len(sizes), strides, **kwargs)
