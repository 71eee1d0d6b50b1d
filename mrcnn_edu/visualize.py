"""Drawing with matplotlib: images, boxes, anchors, masks, keypoints.

Every function draws onto a given ``matplotlib.axes.Axes`` (or makes one) and returns it, so a
notebook cell can combine them. Images are ``(3, H, W)`` float tensors in [0, 1] or ``(H, W, 3)``
arrays; boxes are ``(N, 4)`` xyxy in pixels (pixel ``i`` covers ``[i, i+1)``, so ``imshow``'s
default extent, which puts pixel centres at integers, is shifted by half a pixel here).

This module is shared by all notebooks: add a function at the end, do not reshape the others.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["show_image", "draw_boxes", "draw_masks", "draw_keypoints", "colors"]


def _axes(ax=None, figsize=(5, 5)):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=figsize)
    return ax


def colors(n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct RGB colours in [0, 1], (n, 3)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return np.array([cmap(i % 20)[:3] for i in range(n)])


def _to_hwc(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dim() == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    return image


def show_image(image, ax=None, title: str | None = None):
    """Show an image with pixel ``i`` spanning ``[i, i+1)`` on both axes (our box convention)."""
    ax = _axes(ax)
    img = _to_hwc(image)
    h, w = img.shape[:2]
    ax.imshow(img, extent=(0, w, h, 0), interpolation="nearest", cmap=None if img.ndim == 3 else "gray")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    if title:
        ax.set_title(title)
    return ax


def draw_boxes(boxes, ax=None, labels: Sequence[str] | None = None, color=None, linewidth: float = 1.5,
               linestyle: str = "-", alpha: float = 1.0):
    """Draw ``(N, 4)`` xyxy boxes as rectangles, with optional text labels."""
    from matplotlib.patches import Rectangle

    ax = _axes(ax)
    boxes = torch.as_tensor(boxes).detach().cpu().reshape(-1, 4).tolist()
    palette = colors(len(boxes))
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        c = color if color is not None else palette[i]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=c, linewidth=linewidth,
                               linestyle=linestyle, alpha=alpha))
        if labels is not None:
            ax.text(x1, y1, str(labels[i]), color="white", fontsize=7, va="bottom",
                    bbox=dict(facecolor=c, alpha=0.8, pad=1, edgecolor="none"))
    return ax


def draw_masks(masks, ax=None, alpha: float = 0.45, threshold: float = 0.5, color=None):
    """Overlay ``(N, H, W)`` (or ``(N, 1, H, W)``) masks, each in its own colour.

    Soft masks are drawn where they exceed ``threshold``: the pixels COCO evaluation scores
    (``evaluation.predictions_to_coco_results`` binarises at > 0.5)."""
    ax = _axes(ax)
    masks = torch.as_tensor(masks).detach().cpu()
    if masks.dim() == 4:
        masks = masks[:, 0]
    palette = colors(len(masks))
    for i, m in enumerate(masks):
        m = (m.float() > threshold).numpy()
        h, w = m.shape
        rgba = np.zeros((h, w, 4))
        rgba[..., :3] = color if color is not None else palette[i]
        rgba[..., 3] = m * alpha
        ax.imshow(rgba, extent=(0, w, h, 0), interpolation="nearest")
    return ax


def draw_keypoints(keypoints, ax=None, skeleton: Sequence[Sequence[int]] | None = None, color="yellow",
                   min_visibility: float = 0.5, one_based_skeleton: bool = True):
    """Draw ``(N, K, 3)`` keypoints (x, y, v); ``skeleton`` pairs index keypoints (COCO's are 1-based).

    A pair outside the K keypoints (COCO's 17-point skeleton on a 5-keypoint model) is a
    ValueError naming it, before anything is drawn.
    """
    kps = torch.as_tensor(keypoints).detach().cpu()
    num_keypoints = kps.shape[-2]
    kps = kps.reshape(-1, num_keypoints, 3)  # (N, K, 3)
    first = 1 if one_based_skeleton else 0
    pairs = []  # 0-based
    for pair in [] if skeleton is None else skeleton:  # a list, tuple, array or tensor of pairs
        pair = [int(i) for i in pair]
        if len(pair) != 2 or not all(first <= i < num_keypoints + first for i in pair):
            raise ValueError(f"skeleton pair {pair} does not join two of the {num_keypoints} keypoints "
                             f"(indices {first}..{num_keypoints - 1 + first}, {first}-based)")
        pairs.append((pair[0] - first, pair[1] - first))
    ax = _axes(ax)
    for person in kps:
        visible = person[:, 2] >= min_visibility
        for a, b in pairs:
            if visible[a] and visible[b]:
                ax.plot([person[a, 0], person[b, 0]], [person[a, 1], person[b, 1]], color=color, linewidth=1.2)
        ax.scatter(person[visible, 0], person[visible, 1], s=8, c=color, edgecolors="black", linewidths=0.5, zorder=3)
    return ax
