"""RoI feature extraction ops (Mask R-CNN §3, Table 2c/2d): RoIPool, RoIWarp, RoIAlign.

All take ``input (N, C, H, W)`` and ``rois (R, 5)`` rows ``[batch_index, x1, y1, x2, y2]`` in
image pixels and return ``(R, C, oh, ow)``. ``roi_align`` runs a CuPy CUDA kernel for CUDA
tensors when cupy imports (``backend="torch" | "cupy"`` forces either path).
"""
from mrcnn_edu.ops.roi_align import boxes_to_rois, cupy_available, roi_align, sampling_points
from mrcnn_edu.ops.roi_pool import quantise_rois, roi_pool, roi_warp

__all__ = ["roi_align", "roi_pool", "roi_warp", "sampling_points", "boxes_to_rois",
           "quantise_rois", "cupy_available"]
