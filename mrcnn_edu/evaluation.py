"""COCO evaluation: model outputs -> COCO results json -> pycocotools ``COCOeval``.

§4: "We report the standard COCO metrics including AP (averaged over IoU thresholds), AP50,
AP75, and APS, APM, APL (AP at different scales). Unless noted, AP is evaluating using mask
IoU." §5 reports keypoint AP (OKS-based) the same way.

Predictions, per image id: {"boxes" (N, 4) xyxy in *original* image pixels, "labels" (N,)
contiguous 1..K, "scores" (N,), "masks" (N, 1, H, W) or (N, H, W) float probabilities
(binarised at > 0.5) or bool, "keypoints" (N, Kp, 3) continuous (x, y, score): the model's
third column is the heatmap's peak logit, written to the json where COCO puts v (COCOeval
reads only x and y of a detection)}.

Conversions: boxes xyxy -> COCO xywh; labels -> category ids with ``label_to_cat_id``
(default: the sorted category ids of ``coco_gt``, as ``COCODataset`` numbers them; labels that
already are category ids -- torchvision's COCO models, ``weights.py`` -- need the identity
``{cid: cid for cid in coco_gt.getCatIds()}``); masks ->
compressed RLE via ``pycocotools.mask.encode``; keypoints -> COCO pixel indices by subtracting
``COCO_KEYPOINT_OFFSET`` (0.5; see ``data/coco.py``).

Results are FRACTIONS in [0, 1], exactly ``COCOeval.stats``; an entry COCOeval cannot score
(no ground truth in that size range, e.g. APs for keypoints, where COCO has no "small"
range) is ``nan``. Images evaluated = the image ids in ``predictions`` (give every image you
ran, with empty outputs where nothing was detected: skipped images would hide misses).
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings

import numpy as np
import pycocotools.mask as mask_utils
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn_edu.data.coco import COCO_KEYPOINT_OFFSET

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# positions of METRICS in COCOeval.stats (keypoints have no small range)
_STATS_INDEX = {"bbox": (0, 1, 2, 3, 4, 5), "segm": (0, 1, 2, 3, 4, 5),
                "keypoints": (0, 1, 2, None, 3, 4)}
_NEEDS = {"bbox": "boxes", "segm": "masks", "keypoints": "keypoints"}
# §3 "Implementation Details", inference: "The m×m floating-number mask output is then resized to
# the RoI size, and binarized at a threshold of 0.5"
SEGM_MASK_THRESHOLD = 0.5
NO_KEYPOINT_CATEGORY = "skipping keypoints evaluation: no ground-truth category has keypoints"


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def predictions_to_coco_results(predictions: dict[int, dict], iou_type: str,
                                label_to_cat_id: dict[int, int] | None = None) -> list[dict]:
    """COCO results list (``loadRes`` format) of one iou type.

    ``label_to_cat_id=None`` means the labels already are dataset category ids (not
    :func:`evaluate_coco`'s default, which maps a model's 1..K onto the sorted ids);
    :func:`run_cocoeval` refuses a category id the ground truth does not have.
    """
    if iou_type not in _NEEDS:
        raise ValueError(f"iou_type must be one of {tuple(_NEEDS)}, got {iou_type!r}")
    results = []
    for image_id, pred in predictions.items():
        scores = _numpy(pred["scores"]).astype(float).reshape(-1)
        if len(scores) == 0:
            continue
        field = _NEEDS[iou_type]
        if field not in pred:
            raise ValueError(f"image id {image_id}: predictions lack '{field}' needed for {iou_type}")
        labels = _numpy(pred["labels"]).reshape(-1)
        counts = {"labels": labels.size, "boxes": _numpy(pred["boxes"]).reshape(-1, 4).shape[0]}
        if field != "boxes":
            counts[field] = len(_numpy(pred[field]))  # (N, ...)
        if any(n != len(scores) for n in counts.values()):  # else rows pair up wrongly, silently
            raise ValueError(f"image id {image_id}: {len(scores)} scores but {counts} rows")
        if label_to_cat_id is None:  # labels are the category ids (for every image, not the first's)
            cat_ids = [int(label) for label in labels]
        else:
            unknown = sorted(set(labels.tolist()) - set(label_to_cat_id))
            if unknown:
                raise ValueError(f"image id {image_id}: labels {unknown} not in label_to_cat_id (labels that "
                                 "already are category ids, as torchvision's COCO models give, map to "
                                 "themselves: {cid: cid, ...})")
            cat_ids = [int(label_to_cat_id[int(label)]) for label in labels]
        boxes = _numpy(pred["boxes"]).astype(float).reshape(-1, 4)
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
        for i in range(len(scores)):
            results.append({"image_id": int(image_id), "category_id": cat_ids[i],
                            "score": float(scores[i]), "bbox": xywh[i].tolist()})
        if iou_type == "segm":
            masks = _numpy(pred["masks"])
            masks = masks.reshape(len(scores), *masks.shape[-2:])  # (N, H, W)
            binary = masks if masks.dtype == bool else masks > SEGM_MASK_THRESHOLD
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
            for res, rle in zip(results[-len(scores):], rles):
                res["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
                del res["bbox"]  # loadRes derives it from the mask
        elif iou_type == "keypoints":
            kps = _numpy(pred["keypoints"]).astype(float).reshape(len(scores), -1, 3).copy()
            kps[..., :2] -= COCO_KEYPOINT_OFFSET  # continuous px -> COCO pixel index
            for res, kp in zip(results[-len(scores):], kps):
                res["keypoints"] = kp.reshape(-1).tolist()
                del res["bbox"]  # loadRes derives it from the keypoints
    return results


def _is_polygon(entry) -> bool:
    """A polygon both pycocotools and ``clean_segmentation`` read whole: 3 or more x, y pairs."""
    return isinstance(entry, list) and len(entry) >= 6 and len(entry) % 2 == 0


def _polygon_text(entry) -> str:
    return f"{len(entry)} values" if isinstance(entry, list) else f"{entry!r:.40}, not a list"


def check_ground_truth(coco_gt: COCO, iou_types: tuple[str, ...], source: str = "the ground truth") -> None:
    """ValueError, naming ``source`` and the annotation, for ground truth COCOeval would crash on
    with a bare KeyError or TypeError (or score wrongly) -- before any image is predicted.

    COCOeval reads every annotation of an image in the json as it is (one of an image the json
    does not list it never reads; nor does ``COCODataset``, which skips it with a warning): each
    needs a finite ``area`` and ``bbox`` and an ``iscrowd`` of 0 or 1 (``COCODataset`` reads a
    missing one as 0, but COCOeval's ``int(ann['iscrowd'])`` is a bare KeyError); for
    "segm", a sound RLE or a list of polygons whose *first* has 3 points or more: pycocotools
    picks the reading from the first entry alone (4 values: boxes, a TypeError for a list). A later
    polygon of fewer than 3 points (under 6 values) is rasterised as nothing, so COCOeval scores
    the mask ``COCODataset`` trains on, which drops it (``clean_segmentation``): accepted. A later
    one of an odd count of 7 or more values is not (pycocotools draws its first points, training
    drops it). For "keypoints", 3 values per keypoint, ``num_keypoints``, and 17 keypoints
    (COCOeval's OKS sigmas are COCO's 17).

    The verdict is the json's: :func:`run_cocoeval` puts back the polygons COCOeval rewrites to
    RLE in place, so an evaluation run earlier in the process changes nothing here."""
    from mrcnn_edu.data.coco import clean_segmentation

    kp_cats = {c["id"]: len(c["keypoints"]) for c in coco_gt.dataset["categories"] if c.get("keypoints")}
    if "keypoints" in iou_types:
        odd = {cid: n for cid, n in kp_cats.items() if n != 17}
        if odd:
            raise ValueError(f"{source}: keypoint categories {odd} (id: keypoints) are not COCO's 17, "
                             "whose OKS sigmas COCOeval uses")
    for ann in coco_gt.dataset["annotations"]:
        if ann.get("image_id") not in coco_gt.imgs:  # of no image: COCOeval never reads it
            continue
        where = f"{source}: annotation id {ann.get('id')} (image id {ann.get('image_id')})"
        area, bbox, crowd = ann.get("area"), ann.get("bbox"), ann.get("iscrowd", "missing")
        if crowd not in (0, 1):  # as COCODataset reads it (True / 1.0 are 1 to int() too)
            raise ValueError(f"{where}: 'iscrowd' must be 0 or 1 (COCOeval reads it on every "
                             f"annotation), got {crowd!r}")
        if not isinstance(area, (int, float)) or not math.isfinite(area):
            raise ValueError(f"{where}: 'area' must be a finite number, got {area!r}")
        if not (isinstance(bbox, list) and len(bbox) == 4
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
            raise ValueError(f"{where}: 'bbox' must be 4 finite numbers, got {bbox!r:.80}")
        if "segm" in iou_types:
            image = coco_gt.imgs[ann["image_id"]]
            segm = ann.get("segmentation")
            cleaned, why = clean_segmentation(segm, image.get("height", 0), image.get("width", 0))
            if cleaned is None:
                raise ValueError(f"{where}: segmentation COCOeval cannot read: {why}")
            if isinstance(segm, list):  # cleaning kept a polygon; pycocotools must read the list alike
                if not _is_polygon(segm[0]):  # the entry pycocotools reads the whole list by
                    raise ValueError(f"{where}: segmentation COCOeval cannot read: its first polygon is "
                                     f"{_polygon_text(segm[0])} (pycocotools reads a list by its first entry, "
                                     "which needs an even count >= 6 of values)")
                # dropped by training, but drawn (in part) by pycocotools, or not readable at all
                drawn = [part for part in segm
                         if not _is_polygon(part) and not (isinstance(part, list) and len(part) < 6)]
                if drawn:
                    raise ValueError(f"{where}: segmentation COCOeval cannot read as training does: a later "
                                     f"polygon is {_polygon_text(drawn[0])} (x, y pairs, an even count, are needed)")
        if "keypoints" in iou_types and ann.get("category_id") in kp_cats:
            n = kp_cats[ann["category_id"]]
            kps = ann.get("keypoints")
            if not (isinstance(kps, list) and len(kps) == 3 * n) or "num_keypoints" not in ann:
                raise ValueError(f"{where}: needs 'keypoints' ({3 * n} values) and 'num_keypoints'")


def keypoint_category_ids(coco_gt: COCO) -> list[int]:
    """The categories with keypoints (COCO: person), the only ones OKS can score."""
    return sorted(c["id"] for c in coco_gt.dataset["categories"] if c.get("keypoints"))


def _empty_results(coco_gt: COCO) -> COCO:
    """A results COCO with no detections (``loadRes`` cannot take an empty list)."""
    coco_dt = COCO()
    coco_dt.dataset = {"images": coco_gt.dataset["images"], "annotations": [],
                       "categories": coco_gt.dataset["categories"]}
    coco_dt.createIndex()
    return coco_dt


def _check_results_fit(coco_gt: COCO, results: list[dict], iou_type: str) -> None:
    """ValueError, naming the image id, for results COCOeval would score as misses without a word:
    a mask of another size than its image (mask IoU -1: e.g. masks of the resized or padded
    image) or another number of keypoints than its category's (a bare numpy broadcast error)."""
    kp_counts = {c["id"]: len(c["keypoints"]) for c in coco_gt.dataset["categories"] if c.get("keypoints")}
    for res in results:
        if res["category_id"] not in coco_gt.cats:  # COCOeval drops it: a silent miss
            raise ValueError(f"image id {res['image_id']}: category id {res['category_id']} is not in the "
                             f"ground truth's {sorted(coco_gt.cats)[:10]}...: were model labels 1..K given "
                             "without label_to_cat_id?")
        image, segm = coco_gt.imgs.get(res["image_id"], {}), res.get("segmentation")
        if iou_type == "segm" and isinstance(segm, dict) and \
                list(segm.get("size", [])) != [image.get("height"), image.get("width")]:
            raise ValueError(f"image id {res['image_id']}: mask is {segm.get('size')} (h, w) but "
                             f"the image is {[image.get('height'), image.get('width')]}: paste masks into "
                             "the original image")
        if iou_type == "keypoints" and res["category_id"] in kp_counts and \
                len(res["keypoints"]) != 3 * kp_counts[res["category_id"]]:
            raise ValueError(f"image id {res['image_id']}: {len(res['keypoints']) // 3} keypoints, but category "
                             f"{res['category_id']} has {kp_counts[res['category_id']]}")


def run_cocoeval(coco_gt: COCO, results: list[dict], iou_type: str, image_ids: list[int],
                 cat_ids: list[int] | None = None) -> COCOeval:
    """loadRes + evaluate + accumulate + summarize (prints the standard table).

    For "segm", COCOeval replaces each ground-truth polygon list by its RLE, in ``coco_gt``
    itself; the polygons are put back afterwards, so that ``coco_gt`` reads the same to the
    next caller (``check_ground_truth`` above all) however many evaluations ran before."""
    _check_results_fit(coco_gt, results, iou_type)
    coco_dt = coco_gt.loadRes(results) if results else _empty_results(coco_gt)
    coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
    coco_eval.params.imgIds = sorted(image_ids)
    if cat_ids is not None:
        coco_eval.params.catIds = cat_ids
    as_given = [(ann, ann["segmentation"]) for ann in coco_gt.dataset["annotations"]
                if "segmentation" in ann] if iou_type == "segm" else []
    try:
        coco_eval.evaluate()  # the IoUs are computed here; accumulate() reads no segmentation
    finally:
        for ann, segmentation in as_given:
            ann["segmentation"] = segmentation
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval


def evaluate_coco(coco_gt: COCO, predictions: dict[int, dict],
                  iou_types: tuple[str, ...] = ("bbox", "segm", "keypoints"),
                  label_to_cat_id: dict[int, int] | None = None,
                  verbose: bool = False) -> dict[str, dict[str, float]]:
    """{iou_type: {AP, AP50, AP75, APs, APm, APl}} as fractions; nan where COCOeval gives -1.

    An iou type is skipped (with a warning) when no image's predictions carry its field
    (e.g. "keypoints" for a detector without a keypoint head) or, for keypoints, when no
    ground-truth category defines keypoints.

    ``label_to_cat_id``: model label -> the json's category id. By default a model's labels
    1..K name the json's K category ids in sorted order, as ``COCODataset`` numbers them for
    training. A model whose labels already are category ids -- torchvision's COCO models
    (``weights.py``: labels 1..90, COCO's ids) -- needs the identity on the json's ids,
    ``label_to_cat_id={cid: cid for cid in coco_gt.getCatIds()}``. Through the default, a label
    above K is refused with that advice; labels that all lie within 1..K cannot be told apart
    and would be scored against the wrong categories, so give the mapping.
    """
    if not predictions:  # COCOeval would print a table of -1s, as if a model had been scored
        raise ValueError("no predictions to evaluate: no image was predicted (is the val set empty?)")
    if label_to_cat_id is None:
        gt_cat_ids = sorted(coco_gt.getCatIds())
        label_to_cat_id = {i + 1: cid for i, cid in enumerate(gt_cat_ids)}
        labels = {int(label) for p in predictions.values() for label in _numpy(p.get("labels", [])).reshape(-1)}
        beyond = sorted(labels - set(label_to_cat_id))
        if beyond:  # e.g. torchvision's COCO labels (category ids up to 90) against COCO's 80 categories
            raise ValueError(f"labels {beyond[:10]} are not among 1..{len(gt_cat_ids)}: by default a model's labels "
                             f"1..K name the ground truth's K = {len(gt_cat_ids)} category ids in sorted order; "
                             "labels that already are category ids (torchvision's COCO models) need "
                             "label_to_cat_id={cid: cid for cid in coco_gt.getCatIds()}")
    unknown = sorted(set(map(int, predictions)) - set(coco_gt.getImgIds()))
    if unknown:
        raise ValueError(f"predictions for image ids {unknown[:10]} that are not in the ground truth")
    check_ground_truth(coco_gt, tuple(iou_types))
    kp_cat_ids = keypoint_category_ids(coco_gt)
    out = {}
    for iou_type in iou_types:
        field = _NEEDS.get(iou_type)
        if field is None:
            raise ValueError(f"iou_types must be from {tuple(_NEEDS)}, got {iou_type!r}")
        # an image without detections still carries its model's fields (masks (0, 1, H, W)):
        # a box-only model evaluated as segm would otherwise score 0.0 instead of being skipped
        if not any(field in p for p in predictions.values()):
            warnings.warn(f"skipping {iou_type} evaluation: no prediction has '{field}'", stacklevel=2)
            continue
        if iou_type == "keypoints" and not kp_cat_ids:
            warnings.warn(NO_KEYPOINT_CATEGORY, stacklevel=2)
            continue
        results = predictions_to_coco_results(predictions, iou_type, label_to_cat_id)
        cat_ids = None
        if iou_type == "keypoints":  # COCOeval's OKS needs num_keypoints on every gt it sees
            cat_ids = kp_cat_ids
            results = [r for r in results if r["category_id"] in kp_cat_ids]
        quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            if verbose:
                print(f"IoU metric: {iou_type}")
            stats = run_cocoeval(coco_gt, results, iou_type, list(map(int, predictions)), cat_ids).stats
        out[iou_type] = stats_to_metrics(stats, iou_type)
    return out


def stats_to_metrics(stats, iou_type: str) -> dict[str, float]:
    """``COCOeval.stats`` -> {AP, AP50, AP75, APs, APm, APl} as fractions; nan where COCOeval has
    nothing to score (its -1, and APs for keypoints: COCO has no "small" keypoint range)."""
    return {name: (math.nan if i is None or stats[i] < 0 else float(stats[i]))
            for name, i in zip(METRICS, _STATS_INDEX[iou_type])}


def format_ap_table(results: dict[str, dict[str, float]]) -> str:
    """A markdown table of AP metrics in percent, one row per iou type."""
    lines = ["| iou type | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for iou_type, metrics in results.items():
        cells = ["-" if math.isnan(metrics[m]) else f"{100 * metrics[m]:.1f}" for m in METRICS]
        lines.append(f"| {iou_type} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
