"""COCO evaluation: ground truth scores AP 1, perturbations score lower, figures = pycocotools."""

import contextlib
import copy
import io
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.cocoeval import COCOeval

from mrcnn_edu.data import shapes
from mrcnn_edu.data.coco import COCODataset
from mrcnn_edu.evaluation import (evaluate_coco, format_ap_table, predictions_to_coco_results)

SEED = 5  # its tiny val split holds crowds and a person


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("val"))
    shapes.generate(root, n_train=0, n_val=10, seed=SEED, preset="tiny")
    ds = COCODataset(os.path.join(root, "val"), os.path.join(root, "annotations", "instances_val.json"),
                     train=False, with_keypoints=True)
    return ds, [ds[i][1] for i in range(len(ds))]


def _ground_truth_predictions(targets, shift=0.0, erode=False, kp_shift=0.0):
    preds = {}
    for t in targets:
        n = len(t["labels"])
        masks = t["masks"].clone()
        if erode:  # drop the mask's first row and column
            masks = masks & torch.roll(masks, 1, dims=1) & torch.roll(masks, 1, dims=2)
        kps = t["keypoints"].clone()
        kps[..., 0] += kp_shift
        preds[t["image_id"]] = {"boxes": t["boxes"] + shift, "labels": t["labels"],
                                "scores": torch.linspace(1.0, 0.5, n), "masks": masks[:, None].bool(),
                                "keypoints": kps}
    return preds


def test_ground_truth_fed_back_scores_ap_one(val_set):
    ds, targets = val_set
    assert any((t["labels"] == ds.class_names.index("person")).any() for t in targets)
    results = evaluate_coco(ds.coco, _ground_truth_predictions(targets))
    assert set(results) == {"bbox", "segm", "keypoints"}
    one = pytest.approx(1.0, rel=0, abs=1e-12)  # COCOeval averages floats: 1 up to rounding
    for iou_type in ("bbox", "segm", "keypoints"):
        assert results[iou_type]["AP"] == one
        assert results[iou_type]["AP50"] == one and results[iou_type]["AP75"] == one
    assert math.isnan(results["keypoints"]["APs"])  # COCO has no small range for keypoints


@pytest.mark.parametrize("iou_type,perturbation", [
    ("bbox", {"shift": 1.5}), ("segm", {"erode": True}), ("keypoints", {"kp_shift": 0.5})])
def test_perturbed_predictions_score_lower(val_set, iou_type, perturbation):
    ds, targets = val_set
    results = evaluate_coco(ds.coco, _ground_truth_predictions(targets, **perturbation), (iou_type,))
    assert 0.0 < results[iou_type]["AP"] < 1.0


def _direct_results(coco, rng):
    """COCO results written straight from the json, perturbed: the independent oracle's input."""
    out = {"bbox": [], "segm": [], "keypoints": []}
    person = coco.getCatIds(catNms=["person"])[0]
    for ann in coco.loadAnns(coco.getAnnIds(iscrowd=False)):
        score = float(rng.uniform(0.05, 1.0))
        x, y, w, h = (np.array(ann["bbox"]) + rng.normal(0, 1.0, 4)).tolist()
        out["bbox"].append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                            "bbox": [x, y, w, h], "score": score})
        mask = coco.annToMask(ann)
        if rng.uniform() < 0.5:
            mask = np.roll(mask, int(rng.integers(1, 3)), axis=int(rng.integers(2)))
        out["segm"].append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                            "mask": mask, "score": score})
        if ann["category_id"] == person:
            kps = np.array(ann["keypoints"], float).reshape(-1, 3)
            kps[:, :2] += rng.normal(0, 1.0, (len(kps), 2))
            out["keypoints"].append({"image_id": ann["image_id"], "category_id": person,
                                     "keypoints": kps.reshape(-1).tolist(), "score": score})
    return out


def test_figures_equal_a_direct_pycocotools_run(val_set):
    import pycocotools.mask as mask_utils
    ds, _ = val_set
    rng = np.random.default_rng(0)
    direct = _direct_results(ds.coco, rng)
    # the same detections in the model's format (xyxy, labels, masks, continuous keypoints)
    preds = {i: {"boxes": [], "labels": [], "scores": [], "masks": [], "keypoints": []} for i in ds.ids}
    for box, seg in zip(direct["bbox"], direct["segm"]):
        p = preds[box["image_id"]]
        x, y, w, h = box["bbox"]
        p["boxes"].append([x, y, x + w, y + h])
        p["labels"].append(ds.cat_id_to_label[box["category_id"]])
        p["scores"].append(box["score"])
        p["masks"].append(seg["mask"][None])
        kp = next((k for k in direct["keypoints"] if k["score"] == box["score"]), None)
        p["keypoints"].append(np.zeros((17, 3)) if kp is None else
                              np.array(kp["keypoints"]).reshape(17, 3) + [0.5, 0.5, 0])
    preds = {i: {k: torch.tensor(np.array(v), dtype=torch.float64) for k, v in p.items()}
             for i, p in preds.items()}
    ours = evaluate_coco(ds.coco, preds)
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    for iou_type, dets in direct.items():
        dets = copy.deepcopy(dets)
        for d in dets:
            if "mask" in d:
                rle = mask_utils.encode(np.asfortranarray(d.pop("mask")))
                d["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(ds.coco, ds.coco.loadRes(dets), iou_type)
            ev.params.imgIds = ds.ids
            if iou_type == "keypoints":
                ev.params.catIds = ds.coco.getCatIds(catNms=["person"])
            ev.evaluate(), ev.accumulate(), ev.summarize()
        stats = list(ev.stats[:3]) + ([math.nan] if iou_type == "keypoints" else [ev.stats[3]]) + \
            list(ev.stats[3:5] if iou_type == "keypoints" else ev.stats[4:6])
        expected = [math.nan if s == -1 else s for s in stats]
        got = [ours[iou_type][n] for n in names]
        np.testing.assert_array_equal(got, expected)
        assert 0 < ours[iou_type]["AP"] < 1


def test_empty_predictions_score_zero_not_crash(val_set):
    """No detection anywhere: 0 for what the model predicts; what it cannot predict is skipped
    (a box-only model once got segm and keypoints rows of 0.0 here, but no rows with one detection)."""
    ds, targets = val_set
    empty = {t["image_id"]: {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                             "scores": torch.zeros(0), "masks": torch.zeros(0, 1, *t["masks"].shape[-2:]),
                             "keypoints": torch.zeros(0, 17, 3)} for t in targets}
    results = evaluate_coco(ds.coco, empty)
    for iou_type in ("bbox", "segm", "keypoints"):
        assert results[iou_type]["AP"] == 0.0 and results[iou_type]["AP50"] == 0.0
    boxes_only = {k: {f: v[f] for f in ("boxes", "labels", "scores")} for k, v in empty.items()}
    with pytest.warns(UserWarning, match="skipping segm"):
        results = evaluate_coco(ds.coco, boxes_only)
    assert set(results) == {"bbox"} and results["bbox"]["AP"] == 0.0


def test_no_predictions_at_all_is_an_error_not_a_table_of_dashes(val_set):
    ds, _ = val_set
    with pytest.raises(ValueError, match="no predictions to evaluate"):
        evaluate_coco(ds.coco, {})


def test_category_ids_the_ground_truth_lacks_are_named_not_dropped(val_set):
    """predictions_to_coco_results without a mapping takes labels as category ids: model labels
    1..K on a json with gapped ids were scored as misses (or as another category) silently."""
    from mrcnn_edu.evaluation import run_cocoeval

    ds, targets = val_set
    preds = _ground_truth_predictions(targets)
    missing = max(ds.coco.cats) + 1
    bad = {k: dict(v, labels=torch.full_like(v["labels"], missing)) for k, v in preds.items()}
    results = predictions_to_coco_results(bad, "bbox")
    with pytest.raises(ValueError, match=f"category id {missing} is not in the ground truth"):
        run_cocoeval(ds.coco, results, "bbox", list(preds))


def test_mask_probabilities_are_binarised_at_one_half(val_set):
    ds, targets = val_set
    preds = _ground_truth_predictions(targets)
    for p in preds.values():
        p["masks"] = p["masks"].float() * 0.6 + (~p["masks"]).float() * 0.4
    assert evaluate_coco(ds.coco, preds, ("segm",))["segm"]["AP"] == pytest.approx(1.0, rel=0, abs=1e-12)
    results = predictions_to_coco_results(preds, "segm", ds.label_to_cat_id)
    first = next(iter(preds.values()))
    assert isinstance(results[0]["segmentation"]["counts"], str)
    np.testing.assert_array_equal(mask_decode(results[0]["segmentation"]), first["masks"][0, 0] > 0.5)


def mask_decode(rle):
    import pycocotools.mask as mask_utils
    return mask_utils.decode(rle)


def test_prints_only_when_verbose_and_formats_a_table(val_set, capsys):
    ds, targets = val_set
    preds = _ground_truth_predictions(targets)
    results = evaluate_coco(ds.coco, preds, ("bbox",))
    assert capsys.readouterr().out == ""
    evaluate_coco(ds.coco, preds, ("bbox",), verbose=True)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in capsys.readouterr().out
    table = format_ap_table(results)
    assert "| bbox | 100.0 | 100.0 | 100.0 |" in table


def test_iou_types_without_predictions_are_skipped_with_a_warning(val_set):
    ds, targets = val_set
    boxes_only = {k: {f: v[f] for f in ("boxes", "labels", "scores")}
                  for k, v in _ground_truth_predictions(targets).items()}
    with pytest.warns(UserWarning, match="skipping segm"):
        results = evaluate_coco(ds.coco, boxes_only, ("bbox", "segm"))
    assert set(results) == {"bbox"}


def test_unknown_image_ids_and_labels_are_named(val_set):
    ds, targets = val_set
    preds = _ground_truth_predictions(targets)
    with pytest.raises(ValueError, match="image ids \\[999\\]"):
        evaluate_coco(ds.coco, {999: next(iter(preds.values()))})
    bad = {k: dict(v, labels=torch.full_like(v["labels"], 42)) for k, v in preds.items()}
    with pytest.raises(ValueError, match="labels \\[42\\]"):
        evaluate_coco(ds.coco, bad, ("bbox",))


def _broken(coco, change):
    """A deep copy of ``coco`` (a pycocotools COCO) with ``change(dataset)`` applied, re-indexed."""
    from pycocotools.coco import COCO

    broken = COCO()
    broken.dataset = copy.deepcopy(coco.dataset)
    change(broken.dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        broken.createIndex()
    return broken


@pytest.mark.parametrize("change, message", [
    (lambda d: d["annotations"][0].pop("area"), "'area' must be a finite number"),
    (lambda d: d["annotations"][0].update(segmentation=[[1.0, 1.0, 4.0, 4.0]]), "< 3 points"),
    (lambda d: d["annotations"][0].update(segmentation=[]), "segmentation COCOeval cannot read"),
    (lambda d: d["annotations"][0].update(bbox=[1.0, 2.0, float("nan"), 3.0]), "'bbox' must be 4 finite"),
])
def test_ground_truth_cocoeval_would_crash_on_is_named_before_predicting(val_set, change, message):
    ds, targets = val_set
    broken = _broken(ds.coco, change)
    first = broken.dataset["annotations"][0]
    with pytest.raises(ValueError, match=rf"annotation id {first['id']} \(image id {first['image_id']}\).*{message}"):
        evaluate_coco(broken, _ground_truth_predictions(targets), iou_types=("bbox", "segm"))


def test_keypoint_ground_truth_is_checked_for_cocoevals_17_keypoints(val_set):
    ds, targets = val_set
    person = next(c for c in ds.coco.dataset["categories"] if c.get("keypoints"))

    def five_keypoints(d):
        next(c for c in d["categories"] if c["id"] == person["id"])["keypoints"] = person["keypoints"][:5]

    with pytest.raises(ValueError, match=r"keypoint categories \{\d+: 5\} .* not COCO's 17"):
        evaluate_coco(_broken(ds.coco, five_keypoints), _ground_truth_predictions(targets))

    def no_count(d):
        next(a for a in d["annotations"] if a["category_id"] == person["id"]).pop("num_keypoints")

    with pytest.raises(ValueError, match="needs 'keypoints' \\(51 values\\) and 'num_keypoints'"):
        evaluate_coco(_broken(ds.coco, no_count), _ground_truth_predictions(targets))


def test_labels_read_as_category_ids_for_every_image_without_a_mapping():
    predictions = {1: {"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]]), "labels": torch.tensor([3]),
                       "scores": torch.tensor([0.9])},
                   2: {"boxes": torch.tensor([[1.0, 1.0, 4.0, 5.0]]), "labels": torch.tensor([7]),
                       "scores": torch.tensor([0.8])}}
    results = predictions_to_coco_results(predictions, "bbox", None)  # once: image 2's 7 was refused
    assert [(r["image_id"], r["category_id"]) for r in results] == [(1, 3), (2, 7)]
    assert results[1]["bbox"] == [1.0, 1.0, 3.0, 4.0]  # xyxy -> xywh


def test_masks_keypoints_or_rows_that_do_not_fit_the_image_are_named_not_scored_as_misses(val_set):
    ds, targets = val_set
    preds = _ground_truth_predictions(targets)
    image_id = next(iter(preds))
    # masks of the padded batch (not pasted into the original image): COCOeval's mask IoU is -1, AP 0
    padded = {k: dict(v, masks=torch.nn.functional.pad(v["masks"], (0, 32, 0, 32))) for k, v in preds.items()}
    with pytest.raises(ValueError, match=rf"image id {image_id}: mask is \[96, 96\] .* the image is \[64, 64\]"):
        evaluate_coco(ds.coco, padded, ("segm",))
    five = {k: dict(v, keypoints=v["keypoints"][:, :5]) for k, v in preds.items()}
    with pytest.raises(ValueError, match=r"image id \d+: 5 keypoints, but category \d+ has 17"):
        evaluate_coco(ds.coco, five, ("keypoints",))
    extra_box = {**preds, image_id: dict(preds[image_id], boxes=preds[image_id]["boxes"].repeat(2, 1))}
    with pytest.raises(ValueError, match=rf"image id {image_id}: \d+ scores but .*'boxes'"):
        evaluate_coco(ds.coco, extra_box, ("bbox",))


def test_drawn_masks_are_the_pixels_evaluation_scores():
    # a soft mask with cells at exactly the threshold: the picture must not show pixels the
    # score leaves out (draw_masks used >= 0.5 where the results use > 0.5)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pycocotools import mask as mask_utils

    from mrcnn_edu.visualize import draw_masks

    soft = torch.zeros(1, 6, 8)
    soft[0, 1:3, 1:4] = 0.5  # 6 pixels at the threshold
    soft[0, 3:5, 2:7] = 0.75  # 10 above it
    pred = {7: {"scores": torch.tensor([0.9]), "labels": torch.tensor([1]),
                "boxes": torch.tensor([[1.0, 1.0, 7.0, 5.0]]), "masks": soft}}
    (result,) = predictions_to_coco_results(pred, "segm")
    scored = int(mask_utils.area(result["segmentation"]))
    fig, ax = plt.subplots()
    draw_masks(soft, ax)
    drawn = int((ax.images[0].get_array()[..., 3] > 0).sum())
    plt.close(fig)
    assert scored == drawn == 10


def test_a_prediction_grid_of_nothing_or_of_unpaired_lists_is_named(tmp_path):
    from mrcnn_edu.predict import save_prediction_grid

    with pytest.raises(ValueError, match=r"grid\.png\): needs at least one image.*got 0 images"):
        save_prediction_grid([], [], tmp_path / "grid.png")  # was a ZeroDivisionError
    image = torch.zeros(3, 8, 8)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    with pytest.raises(ValueError, match="got 2 images, 1 predictions"):
        save_prediction_grid([image, image], [empty], tmp_path / "grid.png")
    assert save_prediction_grid([image], [empty], tmp_path / "grid.png").is_file()


def test_predict_images_puts_a_training_model_back_in_training_mode_even_after_an_error():
    from mrcnn_edu.predict import predict_images

    class Picky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, images):
            if images[0].shape[0] != 3:
                raise ValueError("images[0] must be (3, H, W)")
            return [{"boxes": torch.zeros(0, 4)} for _ in images]

    model = Picky().train()
    assert predict_images(model, [torch.rand(3, 8, 8)] * 3)[2]["boxes"].shape == (0, 4) and model.training
    with pytest.raises(ValueError, match="images"):
        predict_images(model, [torch.rand(1, 8, 8)])
    assert model.training  # not left in eval mode by the failed batch
    with pytest.raises(ValueError, match="batch_size"):
        predict_images(model, [torch.rand(3, 8, 8)], batch_size=0)


def test_predict_images_can_binarise_masks_before_they_leave_the_device():
    from mrcnn_edu.predict import predict_images

    probabilities = torch.tensor([0.0, 0.25, 0.5, 0.5001, 0.75, 1.0]).reshape(1, 1, 2, 3)

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, images):
            return [{"masks": probabilities.clone(), "scores": torch.ones(1)} for _ in images]

    (soft,) = predict_images(Fixed(), [torch.rand(3, 2, 3)])
    (hard,) = predict_images(Fixed(), [torch.rand(3, 2, 3)], mask_threshold=0.5)
    assert soft["masks"].dtype == torch.float32 and torch.equal(soft["masks"], probabilities)
    # §3: binarised at 0.5, strictly above it as the evaluation's own binarisation
    assert hard["masks"].dtype == torch.bool
    assert hard["masks"].flatten().tolist() == [False, False, False, True, True, True]
    assert torch.equal(hard["scores"], torch.ones(1))
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="mask_threshold"):
            predict_images(Fixed(), [torch.rand(3, 2, 3)], mask_threshold=bad)


def test_evaluating_zero_images_is_an_error_not_every_image(val_set):
    from mrcnn_edu.predict import evaluate_model

    with pytest.raises(ValueError, match="max_images"):
        evaluate_model(torch.nn.Linear(1, 1), val_set, iou_types=("bbox",), max_images=0)


def test_predict_loads_a_photo_upright_as_its_exif_says_and_a_dataset_image_raw(tmp_path):
    """A phone photo is stored sideways with EXIF orientation 6 ("rotate 90° clockwise to show")."""
    from PIL import Image

    from mrcnn_edu.data.coco import read_rgb
    from mrcnn_edu.predict import load_image

    stored = np.zeros((40, 100, 3), np.uint8)  # (H, W): wide as stored
    stored[0, 0] = 255  # the stored top-left pixel
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
    upright = load_image(tmp_path / "phone.png")
    assert upright.shape == (3, 100, 40)  # tall, as a viewer shows it
    # rotating 90° clockwise takes the stored top-left corner to the top-right
    assert upright[:, 0, -1].tolist() == [1.0, 1.0, 1.0] and upright.sum() == 3
    assert read_rgb(tmp_path / "phone.png").shape == (40, 100, 3)  # COCO's annotations are of these


def test_a_prediction_drawn_from_binarised_masks_is_the_same_picture(tmp_path):
    """predict and demo copy masks off the device binarised at 0.5 (predict_images(mask_threshold=)):
    the picture must be byte for byte the one the soft masks give."""
    from mrcnn_edu.evaluation import SEGM_MASK_THRESHOLD
    from mrcnn_edu.predict import save_prediction_grid

    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 24, 32, generator=generator)
    soft = torch.rand(2, 1, 24, 32, generator=generator)
    soft[0, 0, :4, :4] = SEGM_MASK_THRESHOLD  # at the threshold: not drawn, not scored
    prediction = {"boxes": torch.tensor([[2.0, 2.0, 20.0, 15.0], [5.0, 6.0, 30.0, 22.0]]),
                  "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.7]), "masks": soft}
    hard = dict(prediction, masks=soft > SEGM_MASK_THRESHOLD)
    a = save_prediction_grid([image], [prediction], tmp_path / "soft.png", ["bg", "a", "b"])
    b = save_prediction_grid([image], [hard], tmp_path / "hard.png", ["bg", "a", "b"])
    assert a.read_bytes() == b.read_bytes()


def _as_written(ds, change=lambda dataset: None):
    """``ds``'s json read afresh from its file (the fixture's COCO object went through COCOeval in
    tests above, which rewrites its polygons in place), with ``change(dataset)`` applied."""
    import json

    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = json.loads(Path(ds.ann_file).read_text())
    change(coco.dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _polygon_annotation(dataset):
    """The first annotation whose segmentation is a list of polygons (the shapes json mixes in RLE)."""
    return next(a for a in dataset["annotations"] if isinstance(a["segmentation"], list) and not a["iscrowd"])


def test_a_degenerate_polygon_after_a_valid_one_is_scored_as_training_reads_it(val_set):
    """pycocotools reads a list of polygons by its first entry and rasterises a later 2-point one
    as nothing; COCODataset drops it. The check refused such ground truth COCOeval scores right."""
    from mrcnn_edu.evaluation import check_ground_truth

    ds, targets = val_set
    for extra in ([1.0, 1.0, 4.0, 4.0], [3.0, 7.0], []):  # 2, 1, 0 points
        tailed = _as_written(ds, lambda d: _polygon_annotation(d)["segmentation"].append(list(extra)))
        check_ground_truth(tailed, ("bbox", "segm"))  # accepted
        results = evaluate_coco(tailed, _ground_truth_predictions(targets), ("segm",))
        assert results["segm"]["AP"] == pytest.approx(1.0, rel=0, abs=1e-12)  # the mask training learns
    # what pycocotools cannot read as training does: a first entry of 4 values (a TypeError), a
    # later one of 7 (its first 3 points drawn, where training drops it)
    boxed = _as_written(ds, lambda d: _polygon_annotation(d)["segmentation"].insert(0, [1.0, 1.0, 4.0, 4.0]))
    with pytest.raises(ValueError, match=r"its first polygon is 4 values \(pycocotools reads a list by its first"):
        check_ground_truth(boxed, ("segm",))
    odd = _as_written(ds, lambda d: _polygon_annotation(d)["segmentation"].append([1.0, 1, 9, 1, 5, 9, 2]))
    with pytest.raises(ValueError, match="a later polygon is 7 values"):
        check_ground_truth(odd, ("segm",))


def test_the_ground_truth_check_does_not_depend_on_an_evaluation_run_before_it(val_set):
    """COCOeval rewrote the gt polygons to RLE in place: json the check refused passed once any
    segm evaluation had run on it in the process."""
    from mrcnn_edu.evaluation import check_ground_truth, run_cocoeval

    ds, targets = val_set
    # a polygon reaching 10 images beyond the image: pycocotools clips it, COCODataset refuses it
    def far(d):
        polygon = _polygon_annotation(d)["segmentation"][0]
        polygon[0] = 10.0 * next(i["width"] for i in d["images"] if i["id"] == _polygon_annotation(d)["image_id"])

    beyond = _as_written(ds, far)
    annotation = _polygon_annotation(beyond.dataset)
    polygons = annotation["segmentation"]
    message = "segmentation COCOeval cannot read: polygon coordinate not a finite number near the image"
    with pytest.raises(ValueError, match=message):
        check_ground_truth(beyond, ("segm",))
    results = predictions_to_coco_results(_ground_truth_predictions(targets), "segm", ds.label_to_cat_id)
    with contextlib.redirect_stdout(io.StringIO()):
        run_cocoeval(beyond, results, "segm", sorted(beyond.getImgIds()))  # unchecked, as a user might
    assert annotation["segmentation"] is polygons  # put back, not left as COCOeval's RLE
    with pytest.raises(ValueError, match=message):
        check_ground_truth(beyond, ("segm",))  # the same verdict as before the evaluation
    # through evaluate_coco too: the json reads as it was written after a segm evaluation
    fresh = _as_written(ds)
    listed = [a for a in fresh.dataset["annotations"] if isinstance(a["segmentation"], list)]
    evaluate_coco(fresh, _ground_truth_predictions(targets), ("segm",))
    assert listed and all(isinstance(a["segmentation"], list) for a in listed)


def test_labels_that_are_category_ids_get_advice_and_score_with_the_identity_map(val_set):
    """torchvision's COCO labels are category ids: the default 1..K -> sorted ids map refused them
    with an unexplained 'not in label_to_cat_id'."""
    ds, targets = val_set
    gapped = dict(zip(sorted(ds.cat_ids), (1, 2, 3, 5, 6, 7, 9, 10)))  # COCO's ids have gaps too

    def renumber(d):
        for c in d["categories"]:
            c["id"] = gapped[c["id"]]
        for a in d["annotations"]:
            a["category_id"] = gapped[a["category_id"]]

    coco = _broken(ds.coco, renumber)
    predictions = {k: dict(v, labels=torch.tensor([gapped[ds.label_to_cat_id[int(label)]] for label in v["labels"]],
                                                  dtype=torch.long))
                   for k, v in _ground_truth_predictions(targets).items()}  # labels = category ids
    with pytest.raises(ValueError, match=r"labels \[9, 10\] are not among 1\.\.8.*"
                                         r"label_to_cat_id=\{cid: cid for cid in coco_gt.getCatIds\(\)\}"):
        evaluate_coco(coco, predictions, ("bbox",))
    identity = {cid: cid for cid in coco.getCatIds()}
    results = evaluate_coco(coco, predictions, ("bbox",), label_to_cat_id=identity)
    assert results["bbox"]["AP"] == pytest.approx(1.0, rel=0, abs=1e-12)


class _FixedDetector(torch.nn.Module):
    """One person-sized detection with 17 keypoints on every image: a stand-in keypoint model."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images):
        keypoints = torch.cat([torch.rand(1, 17, 2) * 20, torch.ones(1, 17, 1)], dim=2)
        return [{"boxes": torch.tensor([[2.0, 2.0, 30.0, 40.0]]), "labels": torch.tensor([1]),
                 "scores": torch.tensor([0.9]), "keypoints": keypoints} for _ in images]


def _dataset_with(ds, tmp_path, change):
    """``ds``'s json with ``change(dataset)`` applied, written to ``tmp_path`` and read as a COCODataset."""
    import json

    dataset = json.loads(Path(ds.ann_file).read_text())
    change(dataset)
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(dataset))
    return COCODataset(ds.image_dir, str(path), train=False, with_masks=False)


def test_evaluate_model_on_a_json_without_images_is_an_error_naming_it(val_set, tmp_path):
    """evaluate_coco refused it; evaluate_model (eval, training) printed a table of dashes."""
    from mrcnn_edu.predict import evaluate_model

    ds, _ = val_set
    empty = _dataset_with(ds, tmp_path, lambda d: d.update(images=[], annotations=[]))
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'instances_val.json'))}: no image to evaluate"):
        evaluate_model(_FixedDetector(), empty, iou_types=("bbox",))


def test_evaluate_model_warns_when_keypoints_have_no_category_to_be_scored_on(val_set, tmp_path):
    from mrcnn_edu.predict import evaluate_model

    ds, _ = val_set
    no_keypoints = _dataset_with(ds, tmp_path, lambda d: [c.pop("keypoints", None) for c in d["categories"]])
    with pytest.warns(UserWarning, match="instances_val.json: skipping keypoints evaluation: no ground-truth "
                                         "category has keypoints"):
        metrics = evaluate_model(_FixedDetector(), no_keypoints, iou_types=("bbox", "keypoints"))
    assert set(metrics) == {"bbox"}
    with warnings.catch_warnings():  # a json with its keypoint category: scored, no warning
        warnings.simplefilter("error")
        assert set(evaluate_model(_FixedDetector(), ds, iou_types=("bbox", "keypoints"))) == {"bbox", "keypoints"}


class _GroundTruthByCategoryId(torch.nn.Module):
    """The val json's own objects, one image after another in ``ds.ids`` order, labelled with
    their *category ids* (as torchvision's COCO models label), plus one detection of ``extra``
    (a label that is no category of the json) on every image."""

    def __init__(self, ds, extra: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.ds, self.extra, self.next = ds, extra, 0

    def forward(self, images):
        out = []
        for _ in images:
            coco, image_id = self.ds.coco, self.ds.ids[self.next]
            self.next += 1
            anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a.get("iscrowd")]
            boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)] + [[0, 0, 9, 9]],
                                 dtype=torch.float32)
            masks = np.stack([coco.annToMask(a) for a in anns] + [np.ones_like(coco.annToMask(anns[0]))])
            out.append({"boxes": boxes, "scores": torch.ones(len(boxes)),
                        "labels": torch.tensor([a["category_id"] for a in anns] + [self.extra]),
                        "masks": torch.from_numpy(masks).float()[:, None]})
        return out


def test_evaluate_model_scores_labels_that_are_category_ids_when_told_so(val_set, tmp_path):
    """torchvision's COCO weights label with COCO's category ids (1..90 with gaps). ``eval``
    could only refuse them on an 80-category json; ``labels='category-ids'`` scores them, and
    leaves out a label that is no category of the json, as COCOeval ignores it."""
    from mrcnn_edu.predict import evaluate_model

    ds, _ = val_set

    def sparse_ids(d):  # COCO-like gaps: 1..8 -> 3, 6, ..., 24
        for c in d["categories"]:
            c["id"] *= 3
        for a in d["annotations"]:
            a["category_id"] *= 3

    sparse = _dataset_with(ds, tmp_path, sparse_ids)
    assert sparse.cat_ids == [3, 6, 9, 12, 15, 18, 21, 24]
    with pytest.warns(UserWarning, match=r"10 detections of labels that are no category id of .*instances_val.json "
                                         r"were left out"):
        metrics = evaluate_model(_GroundTruthByCategoryId(sparse, extra=4), sparse, iou_types=("bbox", "segm"),
                                 labels="category-ids")
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    # ours (labels 1..8 = the sorted ids) cannot read label 24 and says so, naming the image
    with pytest.raises(ValueError, match=r"image id \d+: labels \[.*\] not in label_to_cat_id"):
        evaluate_model(_GroundTruthByCategoryId(sparse, extra=4), sparse, iou_types=("bbox",))
    with pytest.raises(ValueError, match="labels must be 'json-order' or 'category-ids', got 'ids'"):
        evaluate_model(_GroundTruthByCategoryId(sparse, extra=4), sparse, labels="ids")


@pytest.mark.parametrize("as_error", [False, True])
def test_an_image_beyond_pillows_decompression_bomb_limit_is_named(tmp_path, monkeypatch, as_error):
    """Pillow's DecompressionBombError is no OSError: predict gave a traceback not naming the file.
    Its warning (over MAX_IMAGE_PIXELS, under twice that) is one too under -W error."""
    from PIL import Image

    from mrcnn_edu.predict import load_image

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "huge.png")  # 400 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 if as_error else 100)  # warns / refuses
    with warnings.catch_warnings():
        warnings.simplefilter("error" if as_error else "default")
        with pytest.raises(ValueError, match=rf"image file {re.escape(str(tmp_path / 'huge.png'))} is too large .*"
                                             r"400 pixels.*MAX_IMAGE_PIXELS"):
            load_image(tmp_path / "huge.png")


def test_the_ground_truth_check_names_a_missing_iscrowd_and_skips_annotations_of_no_image(val_set):
    """COCOeval reads ``int(ann['iscrowd'])`` on every annotation of an evaluated image (a bare
    KeyError after the whole prediction pass); it never reads one whose image the json lacks,
    which COCODataset skips too -- the check refused that one with a false reason."""
    import copy

    from mrcnn_edu.evaluation import check_ground_truth, run_cocoeval

    ds, targets = val_set

    def drop_iscrowd(d):
        del _polygon_annotation(d)["iscrowd"]

    bare = _as_written(ds, drop_iscrowd)
    first = next(a for a in bare.dataset["annotations"] if "iscrowd" not in a)
    # the crash the check stands in front of: pycocotools' own KeyError
    results = predictions_to_coco_results(_ground_truth_predictions(targets), "bbox", ds.label_to_cat_id)
    with pytest.raises(KeyError, match="iscrowd"), contextlib.redirect_stdout(io.StringIO()):
        run_cocoeval(bare, results, "bbox", sorted(bare.getImgIds()))
    with pytest.raises(ValueError, match=rf"annotation id {first['id']} \(image id {first['image_id']}\): "
                                         r"'iscrowd' must be 0 or 1 .*got 'missing'"):
        check_ground_truth(bare, ("bbox",))

    def orphan(d):
        stray = copy.deepcopy(_polygon_annotation(d))
        stray.update(id=10**9, image_id=424242)  # no such image in the json
        d["annotations"].append(stray)

    stray = _as_written(ds, orphan)
    check_ground_truth(stray, ("bbox", "segm"))  # accepted: COCOeval never reads it
    scored = evaluate_coco(stray, _ground_truth_predictions(targets), ("bbox", "segm"))
    assert scored["bbox"]["AP"] == scored["segm"]["AP"] == pytest.approx(1.0, rel=0, abs=1e-12)
