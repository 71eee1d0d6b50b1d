"""Running a trained model: COCO evaluation over a dataset, and pictures of its predictions.

§4: "We report the standard COCO metrics including AP (averaged over IoU thresholds), AP50,
AP75, and APS, APM, APL". At test time (§3.1 "Inference") "the box prediction branch [runs] on
these proposals, followed by non-maximum suppression. The mask branch is then applied to the
highest scoring 100 detection boxes ... The m×m floating-number mask output is then resized to
the RoI size, and binarized at a threshold of 0.5."

Evaluation streams: each image's detections become COCO result entries (masks as compressed
RLE) straight away, so memory stays small even on COCO's 5k val images (100 full-size float
masks per image would not fit). Under ``torchrun`` each process predicts its shard
(``distributed.shard_indices``); ``gather_predictions`` brings the entries to rank 0, which
runs ``COCOeval``. Shapes: predictions as ``model.py`` returns them -- ``boxes (N, 4)``,
``labels (N,)``, ``scores (N,)``, ``masks (N, 1, H, W)`` in [0, 1], ``keypoints (N, Kp, 3)``.
"""
from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mrcnn_edu.data.coco import COCODataset, read_rgb
from mrcnn_edu.distributed import gather_predictions, get_dist_info, shard_indices
from mrcnn_edu.evaluation import (NO_KEYPOINT_CATEGORY, SEGM_MASK_THRESHOLD, check_ground_truth,
                                  keypoint_category_ids, predictions_to_coco_results, run_cocoeval,
                                  stats_to_metrics)

__all__ = ["iou_types_of", "predict_images", "evaluate_model", "images_scored", "make_evaluate_fn",
           "draw_prediction", "save_prediction_grid", "load_image"]


def iou_types_of(model: nn.Module) -> tuple[str, ...]:
    """What the model can be scored on: boxes always, masks and keypoints if it has the head."""
    cfg = model.cfg
    return ("bbox",) + (("segm",) if cfg.mask_head is not None else ()) + (
        ("keypoints",) if cfg.keypoint_head is not None else ())


def load_image(path: str | Path) -> torch.Tensor:
    """(3, H, W) float32 RGB in [0, 1] from an image file, turned upright as its EXIF
    orientation says (a phone photo is stored sideways and tagged; viewers show it upright).
    ``COCODataset`` reads its images raw instead: COCO's sizes and annotations are of the raw
    pixels."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        pixels = read_rgb(path, upright=True)  # (H, W, 3); 16-bit greyscale kept, not clipped to 8 bits
    except OSError as err:  # not an image, empty, truncated (too large: read_rgb's ValueError)
        raise ValueError(f"image file {path} cannot be read: {err}") from err
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # (3, H, W)


@torch.no_grad()
def predict_images(model: nn.Module, images: Sequence[torch.Tensor], batch_size: int = 2,
                   mask_threshold: float | None = None) -> list[dict]:
    """Eval-mode predictions for ``images``, moved to the CPU.

    Masks stay (N, 1, H, W) probabilities, or with ``mask_threshold`` become ``masks > mask_threshold``
    (bool) before they leave the device: a quarter of the bytes to copy, for a caller (COCO
    evaluation, at §3's 0.5) that binarises anyway.
    """
    device = next(model.parameters()).device
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mask_threshold is not None and not 0.0 <= mask_threshold < 1.0:
        raise ValueError(f"mask_threshold must be None or in [0, 1), got {mask_threshold}")
    was_training = model.training
    model.eval()
    outputs = []
    try:  # a bad image must not leave a training model in eval mode (its BN, its RoI sampling)
        for start in range(0, len(images), batch_size):
            batch = [image.to(device) for image in images[start:start + batch_size]]
            for out in model(batch):
                if mask_threshold is not None and "masks" in out:
                    out["masks"] = out["masks"] > mask_threshold
                outputs.append({k: v.cpu() for k, v in out.items()})
    finally:
        model.train(was_training)
    return outputs


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: COCODataset, iou_types: Sequence[str] | None = None,
                   batch_size: int = 2, max_images: int | None = None,
                   labels: str = "json-order") -> dict[str, dict[str, float]]:
    """COCO AP of ``model`` on ``dataset`` (all processes call it; rank 0 gets the numbers).

    ``labels``: what the model's labels mean. ``"json-order"`` (ours): labels 1..K are the
    json's K category ids in sorted order, as ``COCODataset`` numbers them for training.
    ``"category-ids"``: the labels are the json's category ids themselves -- torchvision's COCO
    weights (``weights.py``: labels 1..90 with gaps, against COCO's 80 ids). Their detections of
    a label that is no category of the json (a gap, or a class a subset json leaves out) are left
    out, with a warning counting them: COCOeval ignores them in torchvision's own evaluation.

    Returns ``{iou_type: {AP, AP50, AP75, APs, APm, APl}}`` as fractions (nan where COCOeval
    has nothing to score); other ranks return ``{}``. Scores the first ``max_images`` images of
    ``dataset.ids`` (all if None): :func:`images_scored` says how many. Keypoints are skipped,
    with a warning, when no category of the json has keypoints (as ``evaluate_coco`` does).
    """
    if max_images is not None and max_images < 1:  # 0 would read as "no limit" below
        raise ValueError(f"max_images must be None (every image) or >= 1, got {max_images}")
    if labels not in ("json-order", "category-ids"):
        raise ValueError(f"labels must be 'json-order' or 'category-ids', got {labels!r}")
    if not dataset.ids:  # COCOeval would print a table of -1s, as if a model had been scored
        raise ValueError(f"{dataset.ann_file}: no image to evaluate on (its 'images' list is empty)")
    iou_types = tuple(iou_types or iou_types_of(model))
    check_ground_truth(dataset.coco, iou_types, dataset.ann_file)  # before predicting, not after
    info = get_dist_info()
    image_ids = dataset.ids[:images_scored(dataset, max_images)]
    to_cat_id = dataset.label_to_cat_id if labels == "json-order" else {c: c for c in dataset.cat_ids}
    json_ids = torch.tensor(dataset.cat_ids, dtype=torch.int64)
    left_out = 0
    local: dict[int, dict[str, list[dict]]] = {}
    mine = [image_ids[i] for i in shard_indices(len(image_ids), info.rank, info.world_size)]
    for start in range(0, len(mine), batch_size):
        ids = mine[start:start + batch_size]
        predictions = predict_images(model, [dataset.load_image(i) for i in ids], batch_size,
                                     mask_threshold=SEGM_MASK_THRESHOLD)
        for image_id, prediction in zip(ids, predictions):
            if labels == "category-ids":
                known = torch.isin(prediction["labels"], json_ids)
                left_out += int((~known).sum())
                prediction = {k: v[known] for k, v in prediction.items()}
            # one image's entries, RLE-encoded now: memory stays O(detections), not O(pixels)
            local[image_id] = {t: predictions_to_coco_results({image_id: prediction}, t, to_cat_id)
                               for t in iou_types}
    gathered = gather_predictions(local)
    if labels == "category-ids" and info.world_size > 1:  # every shard's count, for rank 0 to tell
        counts: list = [None] * info.world_size
        torch.distributed.all_gather_object(counts, left_out)
        left_out = sum(counts)
    if not info.is_main:
        return {}
    if left_out:
        warnings.warn(f"{left_out} detections of labels that are no category id of {dataset.ann_file} were "
                      "left out (labels='category-ids'; COCOeval would ignore them)", stacklevel=3)
    coco_gt = dataset.coco
    keypoint_cats = keypoint_category_ids(coco_gt)
    metrics = {}
    for iou_type in iou_types:
        results = [r for per_image in gathered.values() for r in per_image[iou_type]]
        cat_ids = None
        if iou_type == "keypoints":  # OKS needs num_keypoints: score person categories only
            if not keypoint_cats:  # a keypoint model on a json without them: say so, not a missing row
                warnings.warn(f"{dataset.ann_file}: {NO_KEYPOINT_CATEGORY}", stacklevel=3)  # past no_grad's wrapper
                continue
            cat_ids, results = keypoint_cats, [r for r in results if r["category_id"] in keypoint_cats]
        with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its own table
            stats = run_cocoeval(coco_gt, results, iou_type, sorted(gathered), cat_ids).stats
        metrics[iou_type] = stats_to_metrics(stats, iou_type)
    return metrics


def images_scored(dataset: COCODataset, max_images: int | None) -> int:
    """How many images :func:`evaluate_model` scores: the first ``max_images``, or all."""
    return min(max_images, len(dataset.ids)) if max_images else len(dataset.ids)


def make_evaluate_fn(dataset: COCODataset, batch_size: int = 2, max_images: int | None = None):
    """``evaluate_fn(model)`` for ``engine.train``: COCO AP on ``dataset``."""
    def evaluate(model: nn.Module) -> dict:
        return evaluate_model(model, dataset, batch_size=batch_size, max_images=max_images)
    return evaluate


# --- pictures ----------------------------------------------------------------------------------

def draw_prediction(image: torch.Tensor, prediction: dict, ax, class_names: Sequence[str] | None = None,
                    score_threshold: float = 0.5, skeleton: Sequence[Sequence[int]] | None = None,
                    title: str | None = None):
    """Masks, boxes, "class score" labels and keypoints of the detections above the threshold."""
    from mrcnn_edu.visualize import draw_boxes, draw_keypoints, draw_masks, show_image

    show_image(image, ax, title=title)
    keep = prediction["scores"] >= score_threshold
    if "masks" in prediction and keep.any():
        draw_masks(prediction["masks"][keep], ax)
    labels = prediction["labels"][keep].tolist()
    names = [(class_names[label] if class_names and label < len(class_names) else f"class {label}")
             for label in labels]
    texts = [f"{name} {score:.2f}" for name, score in zip(names, prediction["scores"][keep].tolist())]
    draw_boxes(prediction["boxes"][keep], ax, labels=texts, linewidth=1.0)
    if "keypoints" in prediction and keep.any():
        # the third column of predicted keypoints is a heatmap logit, not a visibility flag
        draw_keypoints(prediction["keypoints"][keep], ax, skeleton=skeleton,
                       min_visibility=-math.inf)
    ax.set_axis_off()
    return ax


def save_prediction_grid(images: Sequence[torch.Tensor], predictions: Sequence[dict],
                         path: str | Path, class_names: Sequence[str] | None = None,
                         score_threshold: float = 0.5, columns: int = 4,
                         skeleton: Sequence[Sequence[int]] | None = None,
                         titles: Sequence[str] | None = None) -> Path:
    """One PNG with a panel per image (no pyplot: the caller's backend is left alone)."""
    from matplotlib.figure import Figure

    if not images or len(predictions) != len(images) or (titles and len(titles) != len(images)):
        raise ValueError(f"save_prediction_grid({path}): needs at least one image, and one prediction "
                         f"(and title) per image; got {len(images)} images, {len(predictions)} predictions"
                         + (f", {len(titles)} titles" if titles else ""))
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    fig = Figure(figsize=(3 * columns, 3 * rows))
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).reshape(-1)
    for i, ax in enumerate(axes):
        if i < len(images):
            draw_prediction(images[i], predictions[i], ax, class_names, score_threshold, skeleton,
                            titles[i] if titles else None)
        else:
            ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path
