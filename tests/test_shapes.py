"""The synthetic COCO-format set: deterministic, loads in pycocotools, pixel-exact masks."""

import builtins
import contextlib
import io
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from mrcnn_edu.data import shapes


def _coco(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(path)


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


# a default-like set at 96 px with many crowds, so every encoding shows up
MIXED = replace(shapes.default_config(), image_size=96, crowd_prob=0.4, tiny_prob=0.2)


@pytest.fixture(scope="module")
def mixed_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mixed"))
    shapes.generate(root, n_train=24, n_val=4, seed=3, config=MIXED)
    return root


def test_same_seed_gives_byte_identical_files(tmp_path):
    shapes.generate(str(tmp_path / "a"), seed=7, preset="tiny")
    shapes.generate(str(tmp_path / "b"), seed=7, preset="tiny")
    shapes.generate(str(tmp_path / "c"), seed=8, preset="tiny")
    a, b, c = (_files(str(tmp_path / d)) for d in "abc")
    assert len(a) == 12 + 6 + 2
    assert a == b
    assert a["annotations/instances_train.json"] != c["annotations/instances_train.json"]


def test_parallel_workers_write_the_same_bytes(tmp_path):
    shapes.generate(str(tmp_path / "one"), seed=1, preset="tiny", n_train=6, n_val=2)
    shapes.generate(str(tmp_path / "two"), seed=1, preset="tiny", n_train=6, n_val=2, workers=2)
    assert _files(str(tmp_path / "one")) == _files(str(tmp_path / "two"))


def test_a_generation_killed_mid_write_leaves_no_half_file_and_reruns_to_the_same_set(tmp_path, monkeypatch):
    """The third val image's write is cut after half its bytes, as a kill would cut it."""
    clean, killed = str(tmp_path / "clean"), str(tmp_path / "killed")
    shapes.generate(clean, seed=5, preset="tiny")
    writes = []

    class HalfThenKilled(io.FileIO):
        def write(self, data):
            super().write(data[: len(data) // 2])
            raise KeyboardInterrupt

    real_open = builtins.open

    def cut_open(path, mode="r", *args, **kwargs):
        if "w" in mode and os.path.basename(os.path.dirname(str(path))) == "val":
            writes.append(path)
            if len(writes) == 3:
                return HalfThenKilled(path, "w")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", cut_open)
    with pytest.raises(KeyboardInterrupt):
        shapes.generate(killed, seed=5, preset="tiny")
    monkeypatch.undo()
    left = _files(killed)
    expected = _files(clean)
    # what is there is whole; the set is not marked finished; no temporary file is left
    assert sorted(left) == ["annotations/instances_train.json"] + [f"train/{i:06d}.png" for i in range(12)] \
        + ["val/000000.png", "val/000001.png"]
    assert all(left[name] == expected[name] for name in left)
    shapes.generate(killed, seed=5, preset="tiny")
    assert _files(killed) == expected


def test_masks_from_polygons_and_rle_equal_the_rendered_objects(mixed_set):
    coco = _coco(os.path.join(mixed_set, "annotations", "instances_train.json"))
    kinds = set()
    for image_id in coco.getImgIds():
        scene = shapes.render_scene(MIXED, shapes.scene_rng(3, "train", image_id - 1))
        png = np.asarray(Image.open(os.path.join(mixed_set, "train", coco.imgs[image_id]["file_name"])))
        np.testing.assert_array_equal(png, scene.image)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
        assert len(anns) == len(scene.objects)
        for k, ann in enumerate(anns):
            visible = scene.instance_map == k
            np.testing.assert_array_equal(coco.annToMask(ann), visible)
            assert ann["area"] == visible.sum()
            ys, xs = np.nonzero(visible)  # the box is the visible mask's extent, [i, i+1) pixels
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            segm = ann["segmentation"]
            kinds.add("polygon" if isinstance(segm, list) else
                      "crowd-rle" if isinstance(segm["counts"], list) else "rle")
            assert ann["iscrowd"] == (isinstance(segm, dict) and isinstance(segm["counts"], list))
    assert kinds == {"polygon", "rle", "crowd-rle"}


def test_rings_have_holes_and_occluded_objects_store_their_visible_part(mixed_set):
    coco = _coco(os.path.join(mixed_set, "annotations", "instances_train.json"))
    ring = coco.getCatIds(catNms=["ring"])[0]
    rings = [a for a in coco.loadAnns(coco.getAnnIds(catIds=[ring])) if not a["iscrowd"]]
    assert rings
    for ann in rings:
        assert isinstance(ann["segmentation"], dict)  # holes cannot be a COCO polygon
    scene = shapes.render_scene(MIXED, shapes.scene_rng(3, "train", 0))
    for obj in scene.objects:  # nothing in the set is less than half visible
        visible = (scene.instance_map == scene.objects.index(obj)).sum()
        assert visible >= MIXED.min_visible_frac * obj.full_mask.sum()


def test_object_sizes_span_tiny_to_most_of_the_image():
    sides = []
    for i in range(40):
        scene = shapes.render_scene(MIXED, shapes.scene_rng(0, "train", i))
        for obj in scene.objects:
            if not obj.iscrowd:
                ys, xs = np.nonzero(obj.full_mask)
                sides.append(max(np.ptp(xs), np.ptp(ys)) + 1)
    assert min(sides) <= 12
    assert max(sides) >= 0.5 * MIXED.image_size


def test_person_keypoints_follow_coco_and_mark_occlusion(mixed_set):
    coco = _coco(os.path.join(mixed_set, "annotations", "instances_train.json"))
    person = coco.loadCats(coco.getCatIds(catNms=["person"]))[0]
    assert person["keypoints"] == list(shapes.KEYPOINT_NAMES) and len(person["keypoints"]) == 17
    assert person["skeleton"] == shapes.SKELETON
    for i, j in enumerate(shapes.KEYPOINT_FLIP_MAP):
        left_right = {shapes.KEYPOINT_NAMES[i], shapes.KEYPOINT_NAMES[j]}
        assert i == j or {n.split("_", 1)[0] for n in left_right} == {"left", "right"}
    n_persons = 0
    for image_id in coco.getImgIds():
        scene = shapes.render_scene(MIXED, shapes.scene_rng(3, "train", image_id - 1))
        for k, ann in enumerate(coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))):
            if ann["category_id"] != person["id"]:
                assert "keypoints" not in ann
                continue
            n_persons += 1
            kps = np.array(ann["keypoints"]).reshape(17, 3)
            # stored as COCO pixel indices: continuous position - 0.5, rounded to 0.01
            np.testing.assert_allclose(kps[:, :2] + 0.5, scene.objects[k].keypoints, atol=0.005 + 1e-9)
            owner = scene.instance_map[np.floor(kps[:, 1] + 0.5).astype(int),
                                       np.floor(kps[:, 0] + 0.5).astype(int)]
            np.testing.assert_array_equal(kps[:, 2], np.where(owner > k, 1, 2))
            assert ann["num_keypoints"] == 17
    assert n_persons > 0


def test_crowd_members_pushed_off_the_image_are_dropped_not_piled_on_its_edge():
    mask = np.zeros((4, 5), bool)
    ys, xs = np.array([0, 1, 2, 3]), np.array([3, 3, 4, 1])
    shapes.paste_shifted(mask, ys, xs, (1, -1))  # dx = 1, dy = -1
    expected = np.zeros((4, 5), bool)
    expected[0, 4] = expected[2, 2] = True  # (1, 3) -> (0, 4) and (3, 1) -> (2, 2); the rest leave
    np.testing.assert_array_equal(mask, expected)


def test_keypoint_visibility_is_read_where_the_stored_point_lies():
    # a keypoint 0.0017 px left of a pixel edge, stored rounded to 0.01 px, lies in the next
    # pixel: its v must be that pixel's (here the person's own: 2), not the unrounded point's
    scene = shapes.render_scene(shapes.default_config(), shapes.scene_rng(1, "train", 1262))
    cat_ids = {name: i + 1 for i, name in enumerate(shapes.SHAPE_NAMES)}
    person = next(k for k, obj in enumerate(scene.objects) if obj.keypoints is not None)
    x, y = scene.objects[person].keypoints[4]  # right_ear
    assert int(np.floor(x)) != int(np.floor(round(x - 0.5, 2) + 0.5))  # the case: rounding crosses an edge
    ann = shapes.scene_annotations(scene, 1, 1, cat_ids)[person]
    kps = np.array(ann["keypoints"]).reshape(17, 3)
    owner = scene.instance_map[np.floor(kps[:, 1] + 0.5).astype(int), np.floor(kps[:, 0] + 0.5).astype(int)]
    np.testing.assert_array_equal(kps[:, 2], np.where(owner > person, 1, 2))
    assert scene.instance_map[int(np.floor(y)), int(np.floor(x))] > person  # the old reading: hidden (1)


def test_the_json_says_which_generator_wrote_it(tmp_path):
    shapes.generate(str(tmp_path), n_train=1, n_val=1, seed=0, config=MIXED)
    coco = _coco(os.path.join(tmp_path, "annotations", "instances_val.json"))
    assert coco.dataset["info"]["generator_version"] == shapes.GENERATOR_VERSION == 2


def test_cli_writes_a_coco_dataset(tmp_path):
    shapes.main(["--out", str(tmp_path), "--train", "2", "--val", "1", "--size", "48",
                 "--seed", "5", "--preset", "tiny", "--workers", "1"])
    coco = _coco(str(tmp_path / "annotations" / "instances_val.json"))
    assert len(coco.getImgIds()) == 1 and coco.imgs[1]["width"] == 48
    assert Image.open(tmp_path / "train" / "000001.png").size == (48, 48)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="preset"):
        shapes.generate("/tmp/unused", preset="huge")
    with pytest.raises(ValueError, match="size"):
        shapes.generate("/tmp/unused", size=8, preset="tiny")


@pytest.mark.parametrize("argument", ["n_train", "n_val", "seed"])
def test_negative_counts_and_seeds_are_named_not_written_as_an_empty_split(tmp_path, argument):
    with pytest.raises(ValueError, match=f"{argument} must be >= 0, got -1"):
        shapes.generate(str(tmp_path), preset="tiny", **{argument: -1})
    assert not (tmp_path / "annotations" / "instances_train.json").exists()


def test_a_run_killed_while_replacing_a_set_leaves_it_unfinished_not_mislabelled(tmp_path, monkeypatch):
    """Regenerating over a finished set and killed after three images: the old jsons stayed and
    described the new PNGs, and the folder loaded as a finished set."""
    root, clean = str(tmp_path / "set"), str(tmp_path / "clean")
    shapes.generate(root, seed=5, preset="tiny")
    shapes.generate(clean, seed=6, preset="tiny")
    real_write_image, written = shapes._write_image, []

    def killed_after_three(job):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(job)
        return real_write_image(job)

    monkeypatch.setattr(shapes, "_write_image", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        shapes.generate(root, seed=6, preset="tiny")
    monkeypatch.undo()
    left = _files(root)
    # three new PNGs over the old ones, and no json: not marked finished, so callers regenerate
    assert not [name for name in left if name.startswith("annotations/")]
    assert [left[f"train/{i:06d}.png"] == _files(clean)[f"train/{i:06d}.png"] for i in range(4)] \
        == [True, True, True, False]
    shapes.generate(root, seed=6, preset="tiny")
    assert _files(root) == _files(clean)


def test_the_json_records_the_generator_config_so_presets_differ_at_the_same_size_and_counts(tmp_path):
    # only seed, split and version were recorded: the tiny preset's set and the default preset's
    # at 64 px and 12 / 6 images looked the same to every check
    tiny = shapes.generate(str(tmp_path / "tiny"), seed=0, preset="tiny")
    default = shapes.generate(str(tmp_path / "default"), n_train=12, n_val=6, size=64, seed=0, preset="default")
    infos = {}
    for name, paths in (("tiny", tiny), ("default", default)):
        for split in shapes.SPLITS:
            infos[name, split] = _coco(paths[split]).dataset["info"]
    expected_default = replace(shapes.default_config(), image_size=64, n_train=12, n_val=6)
    for split in shapes.SPLITS:
        assert infos["tiny", split]["config"] == {**vars(shapes.tiny_config()), "tiny_size": [8.0, 14.0]}
        assert infos["default", split]["config"] == {**vars(expected_default), "tiny_size": [8.0, 14.0]}
    assert infos["tiny", "val"]["config"]["max_objects"] == 3 != infos["default", "val"]["config"]["max_objects"]


def test_parallel_rendering_from_a_script_without_a_main_guard_fails_with_advice(tmp_path):
    # the render processes are spawned and import the script again: each started generate()
    # anew and died, and multiprocessing.Pool replaced them forever (a hang, nothing written)
    script = tmp_path / "make_data.py"
    script.write_text("from mrcnn_edu.data import shapes\n"
                      f"shapes.generate({str(tmp_path / 'set')!r}, n_train=4, n_val=2, size=64, seed=0, workers=2)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert done.returncode != 0
    assert 'put the call under `if __name__ == "__main__":`' in done.stderr
