"""Experiments: the paper's COCO recipes (§3.1, §5), the miniature ones, and key=value overrides."""
from __future__ import annotations

import json
import re

import pytest
import torch

from mrcnn_edu.engine import describe_scaling, lr_at, scale_for_batch
from mrcnn_edu.model import MaskRCNN
from mrcnn_edu.recipes import (RECIPES, apply_overrides, flatten_overrides, get_recipe,
                               load_experiment, parse_override)

PAPER_PRESETS = ["r50_c4", "r101_c4", "r50_c5", "r50_fpn", "r101_fpn", "x101_fpn"]
RESNET_PRESETS = [name for name in PAPER_PRESETS if not name.startswith("x")]
C4_PRESETS, FPN_PRESETS = ["r50_c4", "r101_c4"], ["r50_fpn", "r101_fpn", "x101_fpn"]


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_recipe_is_800_px_coco_with_momentum_09_and_weight_decay_00001(preset):
    experiment = get_recipe(f"{preset}_coco")
    assert (experiment.train.momentum, experiment.train.weight_decay) == (0.9, 1e-4)
    assert experiment.model.transform.min_size_train == (800,)  # "shorter edge is 800 pixels"
    assert experiment.model.transform.min_size_test == 800
    assert experiment.model.num_classes == 80
    assert experiment.data.train_images == "data/coco/train2017"  # trainval35k (data/README.md)
    assert experiment.data.val_annotations == "data/coco/annotations/instances_val2017.json"


@pytest.mark.parametrize("preset", RESNET_PRESETS)
def test_resnet_recipe_is_160k_iterations_of_16_images_lr_002_divided_by_10_at_120k(preset):
    train = get_recipe(f"{preset}_coco").train
    assert train.base_lr == 0.02  # §3.1 "a learning rate of 0.02"
    assert (train.max_iter, train.steps, train.gamma) == (160_000, (120_000,), 0.1)
    assert (train.images_per_batch, train.reference_batch) == (16, 16)  # "2 images per GPU", 8 GPUs
    assert lr_at(119_999, train) == pytest.approx(0.02) and lr_at(120_000, train) == pytest.approx(0.002)


def test_resnext_recipe_is_1_image_per_gpu_and_lr_001_for_the_same_160k_iterations():
    """§3.1: "With ResNeXt [45], we train with 1 image per GPU and the same number of
    iterations, with a starting learning rate of 0.01" -- 8 images on the 8 GPUs."""
    experiment = get_recipe("x101_fpn_coco")
    assert experiment.model.backbone.resnet.groups == 32  # ResNeXt-101 32x8d
    train = experiment.train
    assert (train.images_per_batch, train.reference_batch, train.base_lr) == (8, 8, 0.01)
    assert (train.max_iter, train.steps, train.gamma) == (160_000, (120_000,), 0.1)
    assert scale_for_batch(train) is train  # 8 images is the recipe's own batch: nothing rescaled
    assert lr_at(119_999, train) == pytest.approx(0.01) and lr_at(120_000, train) == pytest.approx(0.001)
    # on one GPU with 1 image: lr / 8, schedule x 8, from ResNeXt's 0.01 @ 8 (not ResNet's 0.02 @ 16)
    one_gpu = scale_for_batch(apply_overrides(experiment, ["train.images_per_batch=1"]).train)
    assert one_gpu.base_lr == pytest.approx(0.01 / 8, rel=1e-12)
    assert (one_gpu.max_iter, one_gpu.steps) == (160_000 * 8, (120_000 * 8,))


@pytest.mark.parametrize("preset, rois", [(name, 64) for name in C4_PRESETS] + [(name, 512) for name in FPN_PRESETS])
def test_n_sampled_rois_per_image_is_64_for_c4_and_512_for_fpn_one_positive_to_three_negatives(preset, rois):
    # §3.1: "each image has N sampled RoIs, with a ratio of 1:3 of positive to negatives [12].
    # N is 64 for the C4 backbone (as in [12, 36]) and 512 for FPN (as in [27])"
    box_head = get_recipe(f"{preset}_coco").model.box_head
    assert box_head.batch_size_per_image == rois
    assert box_head.positive_fraction == 0.25  # 1 : 3


@pytest.mark.parametrize("preset, proposals", [(name, 300) for name in C4_PRESETS] + [(name, 1000) for name in FPN_PRESETS])
def test_test_time_proposals_are_300_for_c4_and_1000_for_fpn(preset, proposals):
    # §3.1: "At test time, the proposal number is 300 for the C4 backbone (as in [36]) and 1000
    # for FPN (as in [27])"
    assert get_recipe(f"{preset}_coco").model.rpn.post_nms_top_n_test == proposals


@pytest.mark.parametrize("preset", C4_PRESETS + FPN_PRESETS)
def test_rpn_anchors_span_5_scales_and_3_aspect_ratios(preset):
    # §3.1: "The RPN anchors span 5 scales and 3 aspect ratios, following [27]"; the sizes are
    # [27]'s (FPN §4.1: 32^2 ... 512^2 pixels), which this paper does not print
    anchors = get_recipe(f"{preset}_coco").model.anchors
    scales = sorted({size for level in anchors.sizes for size in level})
    assert scales == [32, 64, 128, 256, 512] and sorted(anchors.aspect_ratios) == [0.5, 1.0, 2.0]
    if preset in FPN_PRESETS:  # one scale per level, P2 .. P6
        assert anchors.sizes == ((32,), (64,), (128,), (256,), (512,))
    else:  # all five on the one stride-16 map: 15 anchors per cell
        assert anchors.sizes == ((32, 64, 128, 256, 512),)


def test_warm_up_is_not_the_papers_and_is_rescaled_with_the_schedule_by_the_linear_rule():
    """§3.1 prints no warm-up: 500 iterations from lr / 3 are Detectron's (Goyal et al. 2017),
    and the linear scaling rule stretches them as it stretches the schedule."""
    recipe = get_recipe("r50_fpn_coco")
    assert (recipe.train.warmup_iters, recipe.train.warmup_factor) == (500, pytest.approx(1 / 3))
    assert lr_at(0, recipe.train) == pytest.approx(0.02 / 3) and lr_at(500, recipe.train) == pytest.approx(0.02)
    two = scale_for_batch(apply_overrides(recipe, ["train.images_per_batch=2"]).train)
    assert two.warmup_iters == 500 * 8  # 16 / 2 = 8 times more, smaller steps
    assert lr_at(4000, two) == pytest.approx(0.0025) and lr_at(0, two) == pytest.approx(0.0025 / 3)
    resnext = scale_for_batch(apply_overrides(get_recipe("x101_fpn_coco"), ["train.images_per_batch=16"]).train)
    assert (resnext.base_lr, resnext.max_iter, resnext.steps, resnext.warmup_iters) == (
        pytest.approx(0.02), 80_000, (60_000,), 250)  # from ResNeXt's own 8 images


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


def test_a_text_field_takes_the_text_as_typed_even_where_it_reads_as_a_number(tmp_path):
    experiment = apply_overrides(get_recipe("tiny"), [
        "train.output_dir=2025", "data.train_images=1e5", "train.resume=0042", "data.val_images=(1, 2)"])
    assert experiment.train.output_dir == "2025" and experiment.data.train_images == "1e5"
    assert experiment.train.resume == "0042"  # bool | str: not a bool, so the text as typed
    assert experiment.data.val_images == "(1, 2)"
    assert apply_overrides(get_recipe("tiny"), ["train.resume=true"]).train.resume is True
    # None only where the field may be None; quoted, it is the text
    with pytest.raises(ValueError, match=r"bad value for train\.output_dir: None is not a str \(it cannot be None"):
        apply_overrides(get_recipe("tiny"), ["train.output_dir=None"])
    assert apply_overrides(get_recipe("tiny"), ["train.output_dir='None'"]).train.output_dir == "None"
    assert apply_overrides(get_recipe("tiny"), ["data.eval_images=None"]).data.eval_images is None
    # the spec holds the value the run got, so that experiment.json re-creates the run
    experiment, spec = load_experiment("tiny", ["train.output_dir=2025", "train.steps=(1,2)"])
    assert spec["overrides"] == {"train.output_dir": "2025", "train.steps": (1, 2)}
    saved = tmp_path / "experiment.json"
    saved.write_text(json.dumps(spec))
    assert load_experiment(str(saved))[0] == experiment


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
    # the overrides as typed on the command line, a list, read the same (it was an AttributeError)
    typed = tmp_path / "typed.json"
    typed.write_text(json.dumps({"recipe": "tiny", "overrides": [
        "train.base_lr=0.3", "train.steps=(1,2)", "model.pooler.kind=roi_warp", "train.max_iter=9"]}))
    assert load_experiment(str(typed))[0] == from_words


def test_bad_config_file_is_named(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        load_experiment(str(path))
    path.write_text(json.dumps({"overrides": {}}))
    with pytest.raises(ValueError, match="'recipe'"):
        load_experiment(str(path))
    path.write_text(json.dumps({"recipe": "tiny", "overrides": "train.max_iter=3"}))
    with pytest.raises(ValueError, match=r"broken.json: 'overrides' must be an object .* or a list"):
        load_experiment(str(path))
    # what the file says wrong is told apart from what the command line says wrong
    for spec, message in (({"recipe": ["tiny"]}, "'recipe' must be a recipe name"),
                          ({"recipe": "tinyy"}, "unknown recipe 'tinyy'"),
                          ({"recipe": "tiny", "overrides": {"train": {"base_lr": "0.01x"}}},
                           "bad value for train.base_lr"),
                          ({"recipe": "tiny", "overrides": {"train.baselr": 0.01}}, "unknown key train.baselr")):
        path.write_text(json.dumps(spec))
        with pytest.raises(ValueError, match=rf"config file {re.escape(str(path))}: {message}"):
            load_experiment(str(path))
    path.write_text(json.dumps({"recipe": "tiny", "overrides": {"train.max_iter": 7}}))
    with pytest.raises(ValueError, match="^bad value for train.base_lr"):  # the command line's own
        load_experiment(str(path), ["train.base_lr=0.01x"])
    assert load_experiment(str(path), ["train.max_iter=9"])[0].train.max_iter == 9  # the command line wins


def test_cpu_threads_must_be_a_positive_count_or_none():
    with pytest.raises(ValueError, match="cpu_threads must be None .* or >= 1, got -1"):
        load_experiment("tiny", ["cpu_threads=-1"])
    with pytest.raises(ValueError, match="got 0"):
        load_experiment("tiny", ["cpu_threads=0"])
    assert load_experiment("tiny", ["cpu_threads=2"])[0].cpu_threads == 2


def test_a_misspelt_key_in_a_config_file_is_named_not_dropped(tmp_path):
    """{"overides": ...} was read as the bare recipe: every override silently gone."""
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"recipe": "tiny", "overides": {"train.max_iter": 100}}))
    with pytest.raises(ValueError, match=r"typo.json: unknown key 'overides'"):
        load_experiment(str(path))
    # what run_training adds to experiment.json is no typo: the file re-creates the run
    path.write_text(json.dumps({"recipe": "tiny", "overrides": {"train.max_iter": 100}, "class_names": ["_bg", "a"],
                                "skeleton": [], "resolved": {"name": "tiny"}}))
    assert load_experiment(str(path))[0].train.max_iter == 100
