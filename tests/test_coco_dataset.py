"""COCODataset gives back exactly the generated objects; bad input is named, skipped, counted."""

import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from mrcnn_edu.data import shapes
from mrcnn_edu.data.coco import (COCO_KEYPOINT_OFFSET, COCODataset,
                                 aspect_ratio_group_ids, clean_segmentation, collate_fn, load_coco,
                                 rle_counts)

SEED = 11


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny"))
    shapes.generate(root, seed=SEED, preset="tiny")
    return root


def _dataset(root, split="train", **kwargs):
    return COCODataset(os.path.join(root, split),
                       os.path.join(root, "annotations", f"instances_{split}.json"), **kwargs)


def test_loading_gives_back_exactly_the_generated_objects(tiny_set):
    ds = _dataset(tiny_set, train=False, with_keypoints=True, drop_crowd=False)
    cfg = shapes.tiny_config()
    assert ds.class_names == ["__background__", *shapes.SHAPE_NAMES]
    assert ds.keypoint_names == list(shapes.KEYPOINT_NAMES)
    assert ds.keypoint_flip_map == shapes.KEYPOINT_FLIP_MAP and ds.skeleton == shapes.SKELETON
    assert ds.ids == list(range(1, cfg.n_train + 1)) and not ds.skipped
    for i in range(len(ds)):
        image, target = ds[i]
        scene = shapes.render_scene(cfg, shapes.scene_rng(SEED, "train", target["image_id"] - 1))
        assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
        torch.testing.assert_close(image, torch.from_numpy(scene.image).permute(2, 0, 1) / 255.0)
        assert target["orig_size"] == (64, 64)
        assert len(target["labels"]) == len(scene.objects)
        for k, obj in enumerate(scene.objects):
            visible = scene.instance_map == k
            np.testing.assert_array_equal(target["masks"][k].numpy(), visible)
            assert target["labels"][k] == shapes.SHAPE_NAMES.index(obj.category) + 1
            assert target["iscrowd"][k] == obj.iscrowd
            assert target["area"][k] == visible.sum()
            ys, xs = np.nonzero(visible)
            assert target["boxes"][k].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            if obj.keypoints is None:
                assert (target["keypoints"][k] == 0).all()
            else:  # continuous coordinates back, to json's 0.01 rounding
                np.testing.assert_allclose(target["keypoints"][k, :, :2].numpy(), obj.keypoints,
                                           atol=0.005 + 1e-4)


def test_keypoint_training_uses_only_images_with_annotated_keypoints(tiny_set):
    # §5: "Models are trained on all COCO trainval35k images that contain annotated keypoints"
    with pytest.warns(UserWarning, match="no usable annotations"):  # reported, never silent
        ds = _dataset(tiny_set, with_keypoints=True)
    with_person = [i for i in range(1, 13) if any(
        o.category == "person" for o in shapes.render_scene(
            shapes.tiny_config(), shapes.scene_rng(SEED, "train", i - 1)).objects)]
    assert ds.ids == with_person and 0 < len(with_person) < 12
    assert ds.skipped == {"no usable annotations": 12 - len(with_person)}


def test_crowds_are_dropped_by_default(tiny_set):
    with_crowd, without = _dataset(tiny_set, drop_crowd=False), _dataset(tiny_set)
    n_crowd = sum(int(with_crowd[i][1]["iscrowd"].sum()) for i in range(len(with_crowd)))
    assert n_crowd > 0
    assert sum(len(without[i][1]["labels"]) for i in range(len(without))) == \
        sum(len(with_crowd[i][1]["labels"]) for i in range(len(with_crowd))) - n_crowd


def test_a_training_set_with_none_of_its_images_names_the_folder(tiny_set, tmp_path):
    # it warned per image and training then stopped on "the dataset is empty", naming nothing
    with pytest.raises(FileNotFoundError, match=rf"none of the 12 images of .*instances_train.json is in "
                                                rf"{tmp_path}"):
        COCODataset(str(tmp_path), os.path.join(tiny_set, "annotations", "instances_train.json"))


def test_a_model_refuses_crowd_targets_rather_than_train_them_as_objects(tiny_set):
    # nothing downstream reads iscrowd: kept crowds were positives for the RPN and the heads
    from mrcnn_edu.model import _check_images

    with_crowd = _dataset(tiny_set, drop_crowd=False)
    index = next(i for i in range(len(with_crowd)) if with_crowd[i][1]["iscrowd"].any())
    image, target = with_crowd[index]
    num_classes = len(with_crowd.class_names) - 1
    with pytest.raises(ValueError, match=rf"targets\[0\] \(image id {target['image_id']}\) holds crowd regions"):
        _check_images([image], [target], num_classes, with_masks=True)
    without = _dataset(tiny_set)  # the default drops them: the same image trains
    image, target = without[without.ids.index(target["image_id"])]
    assert not target["iscrowd"].any() and len(target["labels"]) > 0
    _check_images([image], [target], num_classes, with_masks=True)


def test_real_coco_style_json_with_integer_keypoints_and_crowd_rle(tmp_path):
    """A COCO-2017-like person_keypoints file: polygons, uncompressed crowd RLE, int keypoints."""
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "img" / "000000000001.jpg")
    kps = [0] * 51
    kps[0:3] = [4, 5, 2]  # nose at pixel index (4, 5)
    kps[3 * 5:3 * 5 + 3] = [10, 6, 1]  # left_shoulder labelled, not visible
    data = {
        "images": [{"id": 1, "file_name": "000000000001.jpg", "height": 20, "width": 30}],
        "categories": [{"id": 1, "name": "person", "keypoints": list(shapes.KEYPOINT_NAMES),
                        "skeleton": shapes.SKELETON}],
        "annotations": [
            {"id": 5, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 40.0,
             "bbox": [2.0, 3.0, 10.0, 4.0], "segmentation": [[2, 3, 12, 3, 12, 7, 2, 7]],
             "keypoints": kps, "num_keypoints": 2},
            {"id": 6, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 6.0,
             "bbox": [20.0, 0.0, 1.0, 6.0], "segmentation": {"counts": [400, 6, 194], "size": [20, 30]},
             "num_keypoints": 0, "keypoints": [0] * 51},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    ds = COCODataset(str(tmp_path / "img"), str(tmp_path / "ann.json"), with_keypoints=True,
                     drop_crowd=False)
    _, target = ds[0]
    assert ds.label_to_cat_id == {1: 1} and ds.cat_id_to_label == {1: 1}
    assert target["boxes"].tolist() == [[2.0, 3.0, 12.0, 7.0], [20.0, 0.0, 21.0, 6.0]]
    expected = np.zeros((20, 30), np.uint8)
    expected[0:6, 20] = 1  # column 20, rows 0..5: 400 = 20 columns * 20 rows of zeros first
    np.testing.assert_array_equal(target["masks"][1].numpy(), expected)
    np.testing.assert_array_equal(target["masks"][0].numpy(), ds.coco.annToMask(data["annotations"][0]))
    assert target["keypoints"][0, 0].tolist() == [4 + COCO_KEYPOINT_OFFSET, 5 + COCO_KEYPOINT_OFFSET, 2]
    assert target["keypoints"][0, 5].tolist() == [10.5, 6.5, 1]
    assert (target["keypoints"][0, 1] == 0).all()  # unlabelled stays (0, 0, 0)


def _corrupt_copy(root, tmp_path):
    """A copy of the tiny train set with one of each kind of bad annotation and image."""
    shutil.copytree(os.path.join(root, "train"), tmp_path / "train")
    with open(os.path.join(root, "annotations", "instances_train.json")) as f:
        data = json.load(f)
    anns = data["annotations"]
    anns[0]["category_id"] = 999
    anns[1]["bbox"] = [3.0, 4.0, 0.0, 5.0]
    anns[2]["segmentation"] = [[1.0, 1.0, 5.0, 5.0]]
    anns.append(dict(anns[3], id=10_000, image_id=777))
    data["images"].append({"id": 55, "file_name": "missing.png", "height": 64, "width": 64})
    data["images"].append({"id": 56, "file_name": "000000.png", "height": 64, "width": 64})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return data, str(path)


def test_bad_annotations_are_skipped_counted_and_named(tiny_set, tmp_path):
    data, path = _corrupt_copy(tiny_set, tmp_path)
    with pytest.warns(UserWarning, match="bad.json") as record:
        ds = COCODataset(str(tmp_path / "train"), path)
    assert ds.skipped == {"unknown category id": 1, "zero-area box": 1, "bad segmentation": 1,
                          "unknown image id": 1, "missing image file": 1,
                          "no usable annotations": ds.skipped["no usable annotations"]}
    assert ds.skipped["no usable annotations"] >= 1  # image 56 has no annotations
    message = str(record[0].message)
    ids = [data["annotations"][i]["id"] for i in range(3)]
    assert all(f"annotation id {aid} " in " ".join(ds.problems) for aid in ids)
    assert "image id 55" in " ".join(ds.problems) and "missing.png" in " ".join(ds.problems)
    assert "unknown category id" in message
    n_objects = sum(len(ds[i][1]["labels"]) for i in range(len(ds)))  # iterates without error
    assert n_objects > 0 and 55 not in ds.ids and 56 not in ds.ids


def test_keypoints_area_and_iscrowd_that_would_stop_training_later_are_skipped_by_name(tiny_set, tmp_path):
    # they passed the constructor and then crashed __getitem__ (in a loader worker, mid-run)
    # with a TypeError naming nothing
    src = Path(tiny_set) / "annotations" / "instances_train.json"
    data = json.loads(src.read_text())
    people = [a for a in data["annotations"] if a.get("keypoints") and a["num_keypoints"] > 0][:4]
    people[0]["keypoints"][4] = None
    people[1]["keypoints"][2] = 3  # no such visibility
    people[2]["area"] = None
    people[3]["iscrowd"] = "no"
    path = tmp_path / "bad_fields.json"
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="bad_fields.json"):
        ds = COCODataset(os.path.join(tiny_set, "train"), str(path), with_keypoints=True)
    assert ds.skipped["bad keypoints"] == 2 and ds.skipped["bad area or iscrowd"] == 2
    problems = " ".join(ds.problems)
    assert all(f"annotation id {a['id']} " in problems for a in people)
    assert "a keypoint value is not a finite number" in problems
    assert re.search(r"keypoint visibilities \[[0-2, ]*3\] \(COCO's v is 0, 1 or 2\)", problems)
    for i in range(len(ds)):  # every kept annotation loads
        ds[i]


@pytest.mark.parametrize("names, expected", [
    (["left_eye", "right_eye", "nose"], [1, 0, 2]),
    (["eye_left", "eye_right"], [1, 0]),
    (["L_Eye", "R_Eye", "Nose"], [1, 0, 2]),  # AP-10K's naming
    (["Left eye", "Right eye"], [1, 0]),
    (["leftHip", "rightHip", "r-ear", "l-ear"], [1, 0, 3, 2]),
    (["nose", "tail", "rear"], [0, 1, 2]),  # "rear" names no side
    (["upright_tip", "cleft", "nose"], [0, 1, 2]),  # nor do "upright" and "cleft"
    (["Neck", "RShoulder", "LShoulder", "LBigToe", "RBigToe"], [0, 2, 1, 4, 3]),  # OpenPose's BODY_25
])
def test_the_flip_map_pairs_left_and_right_however_they_are_spelled(names, expected):
    from mrcnn_edu.data.coco import keypoint_flip_map

    assert keypoint_flip_map(names) == expected
    # COCO's 17 names: the map the shapes set writes by hand
    assert keypoint_flip_map(list(shapes.KEYPOINT_NAMES)) == list(shapes.KEYPOINT_FLIP_MAP)


def test_a_side_without_a_partner_is_an_error_unless_the_map_is_given(tmp_path):
    # identity for it would teach a mirrored left eye as a left eye, on half the training images
    from mrcnn_edu.data.coco import keypoint_flip_map

    with pytest.raises(ValueError, match="'left_eye' names a side .* has no partner"):
        keypoint_flip_map(["left_eye", "nose"])
    with pytest.raises(ValueError, match="'lefteye' seems to name a side, but not as a word .*'righteye'"):
        keypoint_flip_map(["lefteye", "righteye"])
    with pytest.raises(ValueError, match="'leftear' seems to name a side, .*'rightear'"):
        keypoint_flip_map(["leftear", "RightEar"])  # its partner a side word, it not
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}],
            "categories": [{"id": 1, "name": "cat", "keypoints": ["left_eye", "right_ear", "nose"]}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16,
                             "iscrowd": 0, "keypoints": [2, 2, 2, 4, 2, 2, 3, 3, 2], "num_keypoints": 3}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"ann.json: keypoint 'left_eye'"):
        COCODataset(str(tmp_path / "img"), str(tmp_path / "ann.json"), with_masks=False, with_keypoints=True)
    # without keypoints nothing is flipped by type, so nothing to refuse
    assert COCODataset(str(tmp_path / "img"), str(tmp_path / "ann.json"), with_masks=False).keypoint_flip_map \
        == [0, 1, 2]
    given = COCODataset(str(tmp_path / "img"), str(tmp_path / "ann.json"), with_masks=False, with_keypoints=True,
                        keypoint_flip_map=[1, 0, 2])
    assert given.keypoint_flip_map == [1, 0, 2]
    for bad in ([0, 1], [1, 2, 0], [0, 0, 2], [1.0, 0.0, 2.0]):  # length, inverse, permutation, integers
        with pytest.raises(ValueError, match="keypoint_flip_map must be a permutation of 0..2"):
            COCODataset(str(tmp_path / "img"), str(tmp_path / "ann.json"), with_masks=False,
                        with_keypoints=True, keypoint_flip_map=bad)


def test_degenerate_polygon_parts_are_dropped_and_the_rest_kept(tmp_path):
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    good, bad = [1, 1, 6, 1, 6, 6, 1, 6], [2, 2, 3, 3]
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}],
            "categories": [{"id": 3, "name": "thing"}],
            "annotations": [{"id": 9, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 25.0,
                             "bbox": [1.0, 1.0, 5.0, 5.0], "segmentation": [good, bad]}]}
    (tmp_path / "a.json").write_text(json.dumps(data))
    ds = COCODataset(str(tmp_path / "img"), str(tmp_path / "a.json"))
    expected = np.zeros((10, 10), np.uint8)
    expected[1:6, 1:6] = 1  # pycocotools fills the square [1, 6) x [1, 6)
    np.testing.assert_array_equal(ds[0][1]["masks"][0].numpy(), expected)
    assert not ds.skipped and ds.coco.anns[9]["segmentation"] == [good, bad]  # gt untouched


def test_evaluation_mode_keeps_every_image_and_refuses_a_missing_one(tiny_set, tmp_path):
    data, path = _corrupt_copy(tiny_set, tmp_path)
    # an AP computed on the images found would be printed as the json's: a missing file is an error
    with pytest.raises(FileNotFoundError, match=r"1 of \d+ images of .*bad.json are not in .*missing.png"):
        COCODataset(str(tmp_path / "train"), path, train=False)
    data["images"] = [image for image in data["images"] if image["id"] != 55]
    Path(path).write_text(json.dumps(data))
    with pytest.warns(UserWarning):  # the bad annotations are still skipped and named
        ds = COCODataset(str(tmp_path / "train"), path, train=False)
    assert 56 in ds.ids  # an image without annotations is kept: its detections are false positives
    assert len(ds[ds.ids.index(56)][1]["labels"]) == 0


def test_input_that_would_corrupt_or_crash_pycocotools_is_refused_or_skipped_by_name(tiny_set, tmp_path):
    data, path = _corrupt_copy(tiny_set, tmp_path)
    # a repeated annotation id would hand one object's mask to another image
    data["annotations"][5]["id"] = data["annotations"][4]["id"]
    Path(path).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad.json: annotations with repeated ids \[\d+\]"):
        load_coco(path)
    data["annotations"][5]["id"] = 20_000
    del data["categories"][0]["name"]
    Path(path).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad.json: category entry .* lacks id/name"):
        load_coco(path)
    # polygons pycocotools would allocate without limit for, and a corrupt RLE: skipped, named
    assert clean_segmentation([[0, 0, 1e9, 0, 1, 1]], 20, 30)[0] is None
    assert clean_segmentation([[0, 0, float("nan"), 0, 1, 1]], 20, 30)[0] is None
    assert clean_segmentation({"counts": [5, 3], "size": [20, 30]}, 20, 30)[1].startswith("corrupt RLE")
    assert clean_segmentation({"counts": "zzzzzz", "size": [20, 30]}, 20, 30)[1].startswith("corrupt RLE")
    # the compressed RLE reader agrees with pycocotools' encoder
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        mask = np.asfortranarray((rng.random((h, w)) < rng.random()).astype(np.uint8))
        rle = mask_utils.encode(mask)
        runs = rle_counts(rle["counts"].decode())
        assert sum(runs) == h * w and clean_segmentation(rle, h, w)[1] is None
        np.testing.assert_array_equal(mask_utils.decode(mask_utils.frPyObjects({"counts": runs, "size": [h, w]}, h, w)), mask)
    # a box wholly outside its image would be clamped to zero area: skipped, named
    data = json.loads(Path(os.path.join(tiny_set, "annotations", "instances_train.json")).read_text())
    first = data["annotations"][0]
    first["bbox"] = [data["images"][0]["width"] + 5.0, 2.0, 10.0, 8.0]
    first["image_id"] = data["images"][0]["id"]
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="box outside the image"):
        ds = COCODataset(os.path.join(tiny_set, "train"), str(outside))
    assert ds.skipped["box outside the image"] == 1 and f"annotation id {first['id']} " in " ".join(ds.problems)
    # narrower than a float32 step at its coordinate: a box in float64, x1 == x2 in the float32
    # target the model refuses (zero area); skipped the same way
    width = data["images"][0]["width"]
    first["bbox"] = [width - 1e-5, 2.0, 1e-6, 8.0]
    assert first["bbox"][2] > 0 and np.float32(first["bbox"][0]) + np.float32(first["bbox"][2]) == np.float32(first["bbox"][0])
    outside.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="box outside the image"):
        ds = COCODataset(os.path.join(tiny_set, "train"), str(outside))
    assert ds.skipped["box outside the image"] == 1
    # an unreadable image names its file and id
    (tmp_path / "train" / "000000.png").write_text("not an image")
    ds = COCODataset(str(tmp_path / "train"), os.path.join(tiny_set, "annotations", "instances_train.json"))
    image_id = next(i for i in ds.ids if ds.coco.imgs[i]["file_name"] == "000000.png")
    with pytest.raises(ValueError, match=r"000000.png \(image id \d+\) cannot be read"):
        ds.load_image(image_id)


def test_malformed_json_and_missing_files_name_the_file(tiny_set, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json"):
        load_coco(str(bad))
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        load_coco(str(tmp_path / "nothere.json"))
    shutil.copytree(os.path.join(tiny_set, "train"), tmp_path / "train")
    ds = COCODataset(str(tmp_path / "train"), os.path.join(tiny_set, "annotations", "instances_train.json"))
    os.remove(tmp_path / "train" / "000002.png")  # vanishes after the dataset was built
    with pytest.raises(FileNotFoundError, match=r"000002\.png.*image id 3"):
        ds[2]


def test_aspect_ratio_groups_come_from_the_json(tmp_path):
    data = {"images": [{"id": i, "file_name": f"{i}.png", "height": h, "width": w}
                       for i, (h, w) in enumerate([(480, 640), (640, 480), (500, 500)], 1)]}
    (tmp_path / "a.json").write_text(json.dumps(data))
    coco = load_coco(str(tmp_path / "a.json"))
    assert aspect_ratio_group_ids(coco, [1, 2, 3]) == [1, 0, 1]


def test_collate_keeps_lists(tiny_set):
    ds = _dataset(tiny_set)
    images, targets = collate_fn([ds[0], ds[1]])
    assert isinstance(images, list) and len(images) == 2 and targets[1]["image_id"] == ds.ids[1]


def test_sixteen_bit_greyscale_keeps_its_levels_instead_of_saturating(tmp_path):
    from mrcnn_edu.data.coco import read_rgb
    from mrcnn_edu.predict import load_image

    levels = np.array([[0, 255, 256, 1000], [30000, 40000, 65534, 65535]], dtype=np.uint16)
    Image.fromarray(levels).save(tmp_path / "deep.png")  # a 16-bit greyscale PNG
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")  # what Pillow opens it as; convert("RGB") would clip at 255
    expected = levels.astype(np.float32) / np.float32(65535.0)
    pixels = read_rgb(tmp_path / "deep.png")
    assert pixels.shape == (2, 4, 3) and pixels.dtype == np.float32
    for channel in range(3):
        np.testing.assert_array_equal(pixels[:, :, channel], expected)
    assert len(np.unique(pixels)) == 8  # every level distinct: nothing saturated
    torch.testing.assert_close(load_image(tmp_path / "deep.png"), torch.from_numpy(pixels).permute(2, 0, 1),
                               rtol=0, atol=0)
    # 8-bit RGB as before: ÷ 255
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 13
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "rgb.png"), rgb.astype(np.float32) / np.float32(255.0))
    (tmp_path / "junk.png").write_text("not an image")
    with pytest.raises(ValueError, match="junk.png cannot be read"):
        load_image(tmp_path / "junk.png")


def test_the_json_is_read_as_utf8_whatever_the_platform_default_and_other_bytes_are_named(tmp_path, monkeypatch):
    # open() without an encoding takes the locale's (cp1252 on Windows): "café" came back as
    # "cafÃ©", and bytes that are not UTF-8 raised a bare UnicodeDecodeError naming no file
    import builtins

    import mrcnn_edu.data.coco as coco_module

    path = tmp_path / "utf8.json"
    path.write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "café"}]}, ensure_ascii=False),
                    encoding="utf-8")
    real_open = builtins.open

    def latin1_locale_open(file, mode="r", *args, encoding=None, **kwargs):
        if "b" not in mode and encoding is None:
            encoding = "latin-1"  # what a non-UTF-8 locale gives open() by default
        return real_open(file, mode, *args, encoding=encoding, **kwargs)

    monkeypatch.setattr(coco_module, "open", latin1_locale_open, raising=False)
    assert load_coco(str(path)).cats[1]["name"] == "café"
    monkeypatch.undo()
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ValueError, match=r"malformed json in .*bin\.json: 'utf-8' codec can't decode"):
        load_coco(str(tmp_path / "bin.json"))


def _one_image_json(**changes) -> dict:
    """A valid one-image, one-annotation json; ``changes``: ``"images.height": "40"`` etc."""
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 60}],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25.0,
                             "iscrowd": 0, "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]}]}
    for where, value in changes.items():
        key, field = where.split(".")
        data[key][0][field] = value
    return data


@pytest.mark.parametrize("where, value, message", [
    ("images.height", "40", r"image id 1: height '40' is not a positive integer"),
    ("images.height", None, r"image id 1: height None is not a positive integer"),
    ("images.width", 0, r"image id 1: width 0 is not a positive integer"),
    ("images.width", 60.5, r"image id 1: width 60.5 is not a positive integer"),
    ("images.id", [1], r"image id \[1\] is not an integer"),
    ("images.id", True, r"image id True is not an integer"),
    ("images.id", 2**63, r"image id 9223372036854775808 does not fit in 64 bits"),  # the record ids' int64
    ("images.file_name", None, r"image id 1: file_name None is not a file name"),
    ("annotations.image_id", [1], r"annotation id 7 \(image id \[1\]\): image_id \[1\] is not an integer"),
    ("annotations.category_id", [1], r"annotation id 7 \(image id 1\): category_id \[1\] is not an integer"),
    ("annotations.id", "7", r"annotation id '7' \(image id 1\): id '7' is not an integer"),
    ("categories.id", "1", r"category id '1' \('thing'\) is not an integer"),
])
def test_fields_of_the_wrong_type_are_named_where_the_json_is_read(tmp_path, where, value, message):
    # they passed the key check and crashed later with a bare TypeError (a height of None in the
    # box check, an unhashable id in pycocotools' index) or matched nothing without a word
    path = tmp_path / "typed.json"
    path.write_text(json.dumps(_one_image_json(**{where: value})))
    with pytest.raises(ValueError, match=rf"typed\.json: {message}"):
        load_coco(str(path))


def test_a_malformed_rle_size_is_skipped_and_counted_like_other_bad_segmentations(tmp_path):
    # list(5) raised a bare TypeError in the constructor; bad segmentations are skipped, by name
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    data = _one_image_json()
    data["annotations"].append(dict(data["annotations"][0], id=8, segmentation={"counts": [2400], "size": 5}))
    (tmp_path / "rle.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="bad segmentation"):
        ds = COCODataset(str(tmp_path / "img"), str(tmp_path / "rle.json"))
    assert ds.skipped == {"bad segmentation": 1} and ds.ids == [1]
    assert "annotation id 8 (image id 1): RLE size 5 is not [height, width]" in ds.problems
    assert len(ds[0][1]["labels"]) == 1  # the good annotation of the image still loads
    for size in ("40x60", [40], [None, 60], [40, 60, 1]):
        assert clean_segmentation({"counts": [2400], "size": size}, 40, 60)[1].startswith("RLE size")
    assert clean_segmentation({"counts": [2400], "size": [40.0, 60.0]}, 40, 60)[1] is None  # as before


def test_a_training_set_left_with_no_image_names_the_file_and_why(tmp_path):
    # it warned, gave len 0, and training stopped later on "the dataset is empty", naming nothing
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    (tmp_path / "flat.json").write_text(json.dumps(_one_image_json(**{"annotations.bbox": [1, 1, 0, 5]})))
    with pytest.raises(ValueError, match=r"flat\.json: no image is left to train on \(skipped \{'zero-area box': 1, "
                                         r"'no usable annotations': 1\}\); e\.g\. annotation id 7 \(image id 1\): "
                                         r"zero-area or malformed bbox \[1, 1, 0, 5\]"):
        COCODataset(str(tmp_path / "img"), str(tmp_path / "flat.json"))
    with pytest.warns(UserWarning, match="zero-area box"):  # evaluation keeps the image: a false positive there
        assert COCODataset(str(tmp_path / "img"), str(tmp_path / "flat.json"), train=False).ids == [1]


def test_images_without_a_known_zero_to_one_reading_are_refused_by_name(tmp_path):
    # a float image read as all zeros; 32-bit levels above 65535 reached the model far above 1
    from mrcnn_edu.data.coco import read_rgb

    Image.fromarray(np.full((4, 16), 0.5, np.float32)).save(tmp_path / "float.tif")
    with Image.open(tmp_path / "float.tif") as img:
        assert img.mode == "F" and not np.asarray(img.convert("RGB")).any()  # what convert made of it
    with pytest.raises(ValueError, match=r"float\.tif has Pillow mode 'F', which is not read as RGB in \[0, 1\]"):
        read_rgb(tmp_path / "float.tif")
    deep = np.array([[0, 1000, 70000, 2_000_000_000]], np.int32)
    Image.fromarray(deep).save(tmp_path / "deep32.tif")
    with pytest.raises(ValueError, match=r"deep32\.tif holds levels 0\.\.2000000000 \(Pillow mode 'I'\); "
                                         r"only 0\.\.65535"):
        read_rgb(tmp_path / "deep32.tif")
    within = np.array([[0, 1000, 65535]], np.int32)  # mode "I" that fits 16 bits: read as 16-bit
    Image.fromarray(within).save(tmp_path / "i16.tif")
    np.testing.assert_array_equal(read_rgb(tmp_path / "i16.tif")[..., 0],
                                  within.astype(np.float32) / np.float32(65535.0))
    # the 8-bit modes convert("RGB") reads exactly still load, in [0, 1]
    rgb = Image.fromarray(np.arange(4 * 16 * 3, dtype=np.uint8).reshape(4, 16, 3))
    for mode in ("1", "L", "LA", "P", "RGBA", "CMYK"):
        rgb.convert(mode).save(tmp_path / f"m{mode}.{'jpg' if mode == 'CMYK' else 'png'}")
        pixels = read_rgb(tmp_path / f"m{mode}.{'jpg' if mode == 'CMYK' else 'png'}")
        assert pixels.shape == (4, 16, 3) and 0 <= pixels.min() and pixels.max() <= 1
    # in a dataset the message names the image id too
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((40, 60), np.float32)).save(tmp_path / "img" / "a.tif")
    (tmp_path / "f.json").write_text(json.dumps(_one_image_json(**{"images.file_name": "a.tif"})))
    ds = COCODataset(str(tmp_path / "img"), str(tmp_path / "f.json"))
    with pytest.raises(ValueError, match=r"a\.tif \(image id 1\) cannot be read: .*mode 'F'"):
        ds[0]


def test_the_skip_warning_names_a_missing_file_after_many_bad_annotations(tiny_set, tmp_path):
    # the warning's examples were the first five problems: six bad boxes first, and the missing
    # file was never named
    spec = json.loads(open(os.path.join(tiny_set, "annotations", "instances_train.json")).read())
    for ann in spec["annotations"][:6]:
        ann["bbox"] = [1.0, 1.0, 0.0, 5.0]  # zero width
    ann_file = tmp_path / "instances_train.json"
    ann_file.write_text(json.dumps(spec))
    shutil.copytree(os.path.join(tiny_set, "train"), tmp_path / "train")
    last = max(spec["images"], key=lambda im: im["id"])
    os.remove(tmp_path / "train" / last["file_name"])
    with pytest.warns(UserWarning) as caught:
        COCODataset(str(tmp_path / "train"), str(ann_file))
    message = str(caught[0].message)
    assert "'zero-area box': 6" in message and "'missing image file': 1" in message
    assert f"image id {last['id']}: {tmp_path / 'train' / last['file_name']} not found" in message


def test_an_image_in_a_subfolder_is_found_on_every_os(tiny_set, tmp_path, monkeypatch):
    # COCO writes "/" whatever the OS; on Windows (os.sep "\\") "sub/a.png" was looked up in the
    # folder's listing, where it cannot be, and reported missing
    spec = json.loads(open(os.path.join(tiny_set, "annotations", "instances_val.json")).read())
    (tmp_path / "val" / "sub").mkdir(parents=True)
    for image in spec["images"]:
        shutil.copy(os.path.join(tiny_set, "val", image["file_name"]), tmp_path / "val" / "sub")
        image["file_name"] = "sub/" + image["file_name"]
    ann_file = tmp_path / "instances_val.json"
    ann_file.write_text(json.dumps(spec))
    monkeypatch.setattr(os, "sep", "\\")
    ds = COCODataset(str(tmp_path / "val"), str(ann_file), train=False)
    assert len(ds) == len(spec["images"]) and not ds.skipped


# --- items read one byte buffer, not the json's objects (fork workers would copy those) ------

def _target_from_json(coco, image_id: int, skipped_ann_ids: set[int], with_masks: bool,
                      with_keypoints: bool, drop_crowd: bool) -> dict:
    """The target as ``load_target`` built it from the COCO object's dicts and lists, before
    the records were serialised: the reference the buffer must reproduce bit for bit."""
    info = coco.imgs[image_id]
    h, w = info["height"], info["width"]
    cat_ids = sorted(coco.cats)
    anns = [a for a in coco.imgToAnns.get(image_id, [])
            if a["id"] not in skipped_ann_ids and not (drop_crowd and a.get("iscrowd", 0))]
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    target = {"boxes": boxes,
              "labels": torch.tensor([cat_ids.index(a["category_id"]) + 1 for a in anns], dtype=torch.int64),
              "image_id": image_id,
              "iscrowd": torch.tensor([a.get("iscrowd", 0) for a in anns], dtype=torch.int64),
              "area": torch.tensor([a.get("area", 0.0) for a in anns], dtype=torch.float32),
              "orig_size": (h, w)}
    if with_masks:
        masks = [mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(
            clean_segmentation(a["segmentation"], h, w)[0], h, w))) if isinstance(a["segmentation"], list)
            else coco.annToMask(a) for a in anns]
        target["masks"] = (torch.from_numpy(np.stack(masks)) if masks
                           else torch.zeros((0, h, w), dtype=torch.uint8))
    if with_keypoints:
        n_kp = len(shapes.KEYPOINT_NAMES)
        kps = torch.zeros((len(anns), n_kp, 3), dtype=torch.float32)
        for i, a in enumerate(anns):
            if a.get("keypoints") is not None:
                kps[i] = torch.tensor(a["keypoints"], dtype=torch.float32).reshape(n_kp, 3)
        labelled = kps[..., 2] > 0
        kps[..., :2] += COCO_KEYPOINT_OFFSET * labelled[..., None]
        kps[~labelled] = 0.0
        target["keypoints"] = kps
    return target


def _assert_same_target(ours: dict, reference: dict) -> None:
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        if isinstance(value, torch.Tensor):
            assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
        else:
            assert type(ours[key]) is type(value) and ours[key] == value, key


def _cleaned_copy(root, tmp_path, with_missing_image: bool) -> tuple[str, set[int]]:
    """The tiny train set with a polygon that needs cleaning, a skipped annotation, an image
    without annotations and (optionally) one whose file is missing; and the skipped ids."""
    data = json.loads((Path(root) / "annotations" / "instances_train.json").read_text())
    polygon = next(a for a in data["annotations"] if isinstance(a["segmentation"], list) and not a["iscrowd"])
    # a degenerate part, dropped by cleaning: left first, pycocotools reads the lists as boxes
    polygon["segmentation"].insert(0, [1.0, 1.0, 2.0, 2.0])
    skipped = next(a for a in data["annotations"] if a is not polygon)
    skipped["category_id"] = 999
    data["images"].append({"id": 56, "file_name": "000000.png", "height": 64, "width": 64})
    if with_missing_image:
        data["images"].append({"id": 55, "file_name": "missing.png", "height": 64, "width": 64})
    path = tmp_path / "cleaned.json"
    path.write_text(json.dumps(data))
    return str(path), {skipped["id"]}


@pytest.mark.parametrize("with_masks, with_keypoints, drop_crowd, train", [
    (True, False, True, True), (True, True, False, False), (False, True, True, True),
    (False, False, False, False), (True, True, True, True)])
def test_targets_from_the_serialised_records_are_bit_identical_to_the_json_objects(
        tiny_set, tmp_path, with_masks, with_keypoints, drop_crowd, train):
    path, skipped = _cleaned_copy(tiny_set, tmp_path, with_missing_image=train)
    with pytest.warns(UserWarning, match="unknown category id"):
        ds = COCODataset(os.path.join(tiny_set, "train"), path, train=train, with_masks=with_masks,
                         with_keypoints=with_keypoints, drop_crowd=drop_crowd)
    coco = load_coco(path)  # a fresh copy of the json's objects, not the dataset's
    assert ds.skipped["unknown category id"] == 1
    assert ds.skipped["bad segmentation"] == 0  # the degenerate part is dropped, the rest kept
    for image_id in sorted(coco.imgs):  # every id of the json, also those not in ds.ids (55, 56)
        reference = _target_from_json(coco, image_id, skipped, with_masks, with_keypoints, drop_crowd)
        _assert_same_target(ds.load_target(image_id), reference)
    for index in range(len(ds)):
        _assert_same_target(ds[index][1], ds.load_target(ds.ids[index]))
    assert (56 in ds.ids) != train and 55 not in ds.ids


class _Untouchable:
    """Stands in for an object items must not read: any attribute access fails."""

    def __getattribute__(self, name):
        raise AssertionError(f"an item read .{name} of an object a fork worker would copy")

    def __len__(self):
        raise AssertionError("an item took the length of an object a fork worker would copy")

    def __getitem__(self, key):
        raise AssertionError(f"an item indexed [{key!r}] an object a fork worker would copy")


def test_items_read_none_of_the_json_objects_a_fork_worker_would_copy(tiny_set):
    # reading a Python object writes its reference count: each page read in a forked worker is
    # copied into it (bench/worker_memory.py); items read one numpy byte buffer instead
    with pytest.warns(UserWarning, match="no usable annotations"):  # keypoint training: not every id
        ds = _dataset(tiny_set, with_keypoints=True)
    outside = next(i for i in range(1, 13) if i not in ds.ids)
    expected_item, expected_target = ds[1], ds.load_target(outside)
    assert not hasattr(ds, "_anns") and not hasattr(ds, "_segmentation")  # no per-image objects kept
    ds._coco = _Untouchable()  # the json's objects (what ds.coco returns)
    image, target = ds[1]
    torch.testing.assert_close(image, expected_item[0], rtol=0, atol=0)
    _assert_same_target(target, expected_item[1])
    _assert_same_target(ds.load_target(outside), expected_target)
    assert ds.load_image(outside).shape == (3, 64, 64)
    with pytest.raises(KeyError, match="image id 999 is not in .*instances_train.json"):
        ds.load_target(999)


def test_the_ids_items_read_follow_the_public_list(tiny_set):
    ds = _dataset(tiny_set)
    ds.ids = ds.ids[::-1][:3]  # a subset, as a user might take
    assert len(ds) == 3 and [ds[i][1]["image_id"] for i in range(3)] == [12, 11, 10]
    ds.ids.reverse()  # or edited in place
    assert [ds[i][1]["image_id"] for i in range(3)] == [10, 11, 12]


def test_a_spawned_worker_receives_the_records_without_the_coco_object(tiny_set):
    # spawn / forkserver workers get the dataset pickled: the COCO object would double it
    ds = _dataset(tiny_set)
    expected = ds[2]
    blob = pickle.dumps(ds)
    assert len(blob) < len(pickle.dumps(ds.coco))  # the whole json's objects are not in it
    copy = pickle.loads(blob)
    assert copy.__dict__["_coco"] is None and ds.__dict__["_coco"] is not None  # the original keeps its own
    image, target = copy[2]
    torch.testing.assert_close(image, expected[0], rtol=0, atol=0)
    _assert_same_target(target, expected[1])
    assert copy.__dict__["_coco"] is None  # items never asked for it
    assert copy.coco.imgs.keys() == ds.coco.imgs.keys()  # read again from the json when asked
    assert copy.class_names == ds.class_names


def test_items_go_through_the_public_loaders_a_subclass_may_override(tiny_set):
    class WithDepth(COCODataset):  # e.g. a learner's dataset adding a field to each target
        def load_target(self, image_id: int) -> dict:
            return {**super().load_target(image_id), "depth": torch.zeros(1)}

    ds = WithDepth(os.path.join(tiny_set, "train"), os.path.join(tiny_set, "annotations", "instances_train.json"))
    assert "depth" in ds[0][1]


@pytest.mark.parametrize("as_error", [False, True])
def test_a_dataset_image_beyond_pillows_decompression_bomb_limit_names_its_file_and_id(tiny_set, monkeypatch,
                                                                                      as_error):
    """Pillow's DecompressionBombError (and its warning, under -W error) is no OSError: the dataset
    let it through, from a loader worker, naming neither the file nor the image id."""
    ds = COCODataset(os.path.join(tiny_set, "train"), os.path.join(tiny_set, "annotations", "instances_train.json"))
    image_id = ds.ids[0]
    record = ds.coco.imgs[image_id]
    pixels = record["height"] * record["width"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels - 1 if as_error else pixels // 2 - 1)  # warns / refuses
    with warnings.catch_warnings():
        warnings.simplefilter("error" if as_error else "default")
        with pytest.raises(ValueError, match=rf"{re.escape(record['file_name'])} \(image id {image_id}\) cannot be "
                                             r"read: .*too large .*MAX_IMAGE_PIXELS"):
            ds.load_image(image_id)
