"""Experiments: the paper's COCO recipes (§3.1, §5), the miniature ones, and key=value overrides."""
from __future__ import annotations

import json

import pytest
import torch

from mrcnn_edu.engine import describe_scaling, lr_at, scale_for_batch
from mrcnn_edu.model import MaskRCNN
from mrcnn_edu.recipes import (RECIPES, apply_overrides, flatten_overrides, get_recipe,
                               load_experiment, parse_override)

PAPER_PRESETS = ["r50_c4", "r101_c4", "r50_c5", "r50_fpn", "r101_fpn", "x101_fpn"]


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_recipe_is_160k_iterations_of_16_images_lr_002_divided_by_10_at_120k(preset):
    experiment = get_recipe(f"{preset}_coco")
    train = experiment.train
    assert (train.base_lr, train.momentum, train.weight_decay) == (0.02, 0.9, 1e-4)
    assert (train.max_iter, train.steps, train.gamma) == (160_000, (120_000,), 0.1)
    assert (train.images_per_batch, train.reference_batch) == (16, 16)
    assert experiment.model.transform.min_size_train == (800,)  # "shorter edge is 800 pixels"
    assert experiment.model.transform.min_size_test == 800
    assert experiment.model.num_classes == 80
    assert experiment.data.train_images == "data/coco/train2017"  # trainval35k (data/README.md)
    assert experiment.data.val_annotations == "data/coco/annotations/instances_val2017.json"
    assert lr_at(119_999, train) == pytest.approx(0.02) and lr_at(120_000, train) == pytest.approx(0.002)


def test_keypoint_recipe_is_90k_iterations_divided_at_60k_and_80k_with_640_to_800_jitter():
    experiment = get_recipe("keypoint_r50_fpn_coco")
    assert (experiment.train.max_iter, experiment.train.steps) == (90_000, (60_000, 80_000))
    sizes = experiment.model.transform.min_size_train
    assert min(sizes) == 640 and max(sizes) == 800
    assert experiment.model.keypoint_head.num_keypoints == 17
    assert experiment.data.keypoints
    assert experiment.data.train_annotations.endswith("person_keypoints_train2017.json")


def test_one_gpu_with_2_images_scales_lr_down_and_schedule_up_8_times():
    experiment = apply_overrides(get_recipe("r50_fpn_coco"), ["train.images_per_batch=2"])
    scaled = scale_for_batch(experiment.train)
    assert scaled.base_lr == pytest.approx(0.02 / 8, rel=1e-12)
    assert (scaled.max_iter, scaled.steps) == (160_000 * 8, (120_000 * 8,))
    assert "0.0025 @ 2 images" in describe_scaling(experiment.train)


@pytest.mark.parametrize("name", ["mini_gpu", "mini_cpu", "tiny"])
def test_miniature_recipes_are_not_rescaled(name):
    train = get_recipe(name).train
    assert train.reference_batch == train.images_per_batch
    assert scale_for_batch(train) is train


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds_its_model(name):
    experiment = get_recipe(name)
    with torch.device("meta"):  # the structure only: no memory, no initialisation cost
        model = MaskRCNN(experiment.model)
    assert (model.mask_head is None) == (experiment.model.mask_head is None)
    assert (model.keypoint_head is None) == (experiment.model.keypoint_head is None)
    num_params = sum(p.numel() for p in model.parameters())
    assert num_params > 0


def test_mini_cpu_recipe_runs_a_forward_pass_on_its_image_size():
    experiment = get_recipe("mini_cpu")
    torch.manual_seed(0)
    model = MaskRCNN(experiment.model).eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 96, 96)])
    assert out["masks"].shape[1:] == (1, 96, 96)
    assert len(out["boxes"]) <= experiment.model.box_head.detections_per_img


def test_override_reaches_nested_fields_and_keeps_the_recipe_unchanged():
    experiment = apply_overrides(get_recipe("tiny"), [
        "train.base_lr=0.5", "model.pooler.kind=roi_pool", "model.pooler.aligned=false",
        "train.steps=(5,7)", "data.eval_images=3", "model.mask_head.loss=softmax"])
    assert experiment.train.base_lr == 0.5 and experiment.model.pooler.kind == "roi_pool"
    assert experiment.model.pooler.aligned is False
    assert experiment.train.steps == (5, 7) and experiment.data.eval_images == 3
    assert experiment.model.mask_head.loss == "softmax"
    fresh = get_recipe("tiny")
    assert (fresh.train.base_lr, fresh.model.pooler.kind) == (0.01, "roi_align")


def test_override_values_are_converted_to_the_fields_type():
    experiment = apply_overrides(get_recipe("tiny"), [
        "train.base_lr=1", "train.steps=4", "model.mask_head=None", "train.resume=true",
        "model.anchors.sizes=((8,),(16,),(32,),(64,),(128,))", "train.clip_grad=None"])
    assert isinstance(experiment.train.base_lr, float) and experiment.train.base_lr == 1.0
    assert experiment.train.steps == (4,)  # a single number becomes a 1-tuple
    assert experiment.model.mask_head is None and experiment.train.resume is True
    assert experiment.model.anchors.sizes == ((8.0,), (16.0,), (32.0,), (64.0,), (128.0,))
    assert experiment.train.clip_grad is None


def test_a_derived_field_follows_the_field_it_derives_from():
    experiment = apply_overrides(get_recipe("tiny"), ["model.backbone.resnet.depth=(2,1,1,1)"])
    assert experiment.model.backbone.resnet.blocks == (2, 1, 1, 1)


@pytest.mark.parametrize("override, message", [
    ("train.base_lrr=0.1", r"unknown key train\.base_lrr.*TrainConfig.*'base_lr'"),
    ("modle.pooler.kind=roi_pool", r"unknown key modle.*choose one of"),
    ("train.base_lr=fast", r"bad value for train\.base_lr: 'fast' is not a float"),
    ("train.max_iter=2.5", r"bad value for train\.max_iter"),
    ("train.steps=(1,x)", r"bad value for train\.steps"),
    ("train=3", r"bad value for train: 3 is not a TrainConfig"),
    ("train.base_lr", r"must look like key=value"),
])
def test_bad_override_is_refused_with_the_key_named(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(get_recipe("tiny"), [override])


def test_setting_a_field_of_a_head_that_is_switched_off_says_so():
    experiment = apply_overrides(get_recipe("tiny"), ["model.mask_head=None"])
    with pytest.raises(ValueError, match=r"model\.mask_head is None"):
        apply_overrides(experiment, ["model.mask_head.loss=softmax"])


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ValueError, match="mini_cpu"):
        get_recipe("mini_cpuu")


def test_parse_override_reads_python_literals_and_bare_words():
    assert parse_override("a.b=0.5") == ("a.b", 0.5)
    assert parse_override("a=(1, 2)") == ("a", (1, 2))
    assert parse_override("a=roi_align") == ("a", "roi_align")
    assert parse_override("a=runs/x y") == ("a", "runs/x y")
    assert parse_override("a=None") == ("a", None) and parse_override("a=False") == ("a", False)


def test_json_config_file_gives_the_same_experiment_as_command_line_overrides(tmp_path):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"recipe": "tiny", "overrides": {
        "train": {"base_lr": 0.3, "steps": [1, 2]}, "model.pooler.kind": "roi_warp"}}))
    from_file, spec = load_experiment(str(path), ["train.max_iter=9"])
    from_words, _ = load_experiment("tiny", ["train.base_lr=0.3", "train.steps=(1,2)",
                                             "model.pooler.kind=roi_warp", "train.max_iter=9"])
    assert from_file == from_words
    assert spec["recipe"] == "tiny" and spec["overrides"]["train.max_iter"] == 9
    # the spec itself is a valid config file: a run can be re-created from experiment.json
    again = tmp_path / "again.json"
    again.write_text(json.dumps(spec))
    assert load_experiment(str(again))[0] == from_file
    assert flatten_overrides({"a": {"b": {"c": 1}}, "d": 2}) == {"a.b.c": 1, "d": 2}


def test_bad_config_file_is_named(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        load_experiment(str(path))
    path.write_text(json.dumps({"overrides": {}}))
    with pytest.raises(ValueError, match="'recipe'"):
        load_experiment(str(path))
