"""Experiments: a model preset + a training recipe + a dataset, and ``key=value`` overrides.

The paper's COCO recipe (§3.1 "Training"): "Images are resized such that their scale (shorter
edge) is 800 pixels [27]. Each mini-batch has 2 images per GPU ... We train on 8 GPUs (so
effective minibatch size is 16) for 160k iterations, with a learning rate of 0.02 which is
decreased by 10 at the 120k iteration. We use a weight decay of 0.0001 and momentum of 0.9.
With ResNeXt [45], we train with 1 image per GPU and the same number of iterations, with a
starting learning rate of 0.01." (:func:`coco_schedule`: 8 images, lr 0.01, 160k, ÷10 at 120k.)
Keypoints (§5): "models are trained for 90k iterations, starting from a learning rate of 0.02
and reducing it by 10 at 60k and 80k iterations", with scale jitter "[640, 800]".

An :class:`Experiment` is three plain dataclasses side by side: ``model``
(``config.MaskRCNNConfig``), ``train`` (``engine.TrainConfig``) and ``data``
(:class:`DataConfig`). Recipes are plain functions returning one (table in :data:`RECIPES`):

=========================  =================================================================
recipe                     what
=========================  =================================================================
``<preset>_coco``          the paper's COCO recipe for each model preset of ``config.py``
                           (``r50_c4_coco`` ... ``x101_fpn_coco``; ``keypoint_r50_fpn_coco``
                           has §5's 90k schedule and [640, 800] jitter)
``mini_gpu``               R-mini-FPN on the 192 px synthetic shapes set, one GPU, bf16
``mini_cpu``               the demo: R-mini-FPN on 96 px shapes, a few minutes on 2 CPU cores
``tiny``                   a few iterations on 64 px images: tests and notebook smoke runs
=========================  =================================================================

Overrides (the command line's ``key=value`` words) change any nested field by its dotted
path: ``train.base_lr=0.01``, ``model.pooler.kind=roi_pool``, ``train.steps=(3000,4000)``,
``model.mask_head=None``. Values are read as Python literals (``ast.literal_eval``) and
checked against the field's type hint; anything that does not parse is a string. A field that
takes text gets the text as typed: ``train.output_dir=2025`` is the folder ``2025``, not the
number. ``None`` sets only fields that may be None (quote it, ``'None'``, for the text). A wrong
key or value raises ValueError naming the key and what it accepts.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrcnn_edu.config import PRESETS, MaskRCNNConfig, get_preset
from mrcnn_edu.engine import TrainConfig

__all__ = ["DataConfig", "SyntheticData", "Experiment", "RECIPES", "coco_schedule", "get_recipe",
           "parse_override", "apply_overrides", "load_experiment", "flatten_overrides"]

COCO_ROOT = "data/coco"  # data/README.md: where COCO 2017 goes
# the keys of a JSON config file: what it is made of, and what run_training adds when it writes one
# as experiment.json (read by predict, or for a person: the config as it ran)
SPEC_KEYS = {"recipe", "overrides", "class_names", "skeleton", "resolved"}


@dataclass
class SyntheticData:
    """Arguments of ``data.shapes.generate``: the set is written on first use if missing."""

    out_dir: str = "data/generated/shapes"
    preset: str = "default"  # shapes.PRESETS: "default" (192 px) | "tiny" (64 px)
    n_train: int | None = None  # None: the preset's
    n_val: int | None = None
    image_size: int | None = None
    seed: int = 0


@dataclass
class DataConfig:
    """Where the images and COCO json files are (any COCO-format dataset: docs/training.md)."""

    train_images: str = f"{COCO_ROOT}/train2017"
    train_annotations: str = f"{COCO_ROOT}/annotations/instances_train2017.json"
    val_images: str = f"{COCO_ROOT}/val2017"  # = the paper's minival (data/README.md)
    val_annotations: str = f"{COCO_ROOT}/annotations/instances_val2017.json"
    flip_prob: float = 0.5  # horizontal flips in training (Detectron's only augmentation)
    keypoints: bool = False  # §5: load keypoints, keep only images that have some
    eval_images: int | None = None  # evaluate on the first N val images only (None: all)
    eval_batch_size: int = 2  # images per forward pass when evaluating, per process
    synthetic: SyntheticData | None = None  # generate the set here if it is missing

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be a probability in [0, 1], got {self.flip_prob}")
        if self.eval_images is not None and self.eval_images < 1:
            raise ValueError(f"eval_images must be None (all) or >= 1, got {self.eval_images}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")


@dataclass
class Experiment:
    """One training run, fully described: ``python -m mrcnn_edu train --config NAME k=v ...``."""

    name: str
    model: MaskRCNNConfig
    train: TrainConfig
    data: DataConfig = field(default_factory=DataConfig)
    init_weights: str | None = None  # a state dict (our key layout) to start from, loaded non-strictly
    cpu_threads: int | None = None  # torch.set_num_threads for the run; None: torch's default

    def __post_init__(self) -> None:
        if self.cpu_threads is not None and not (isinstance(self.cpu_threads, int) and self.cpu_threads >= 1):
            raise ValueError(f"cpu_threads must be None (torch's default) or >= 1, got {self.cpu_threads!r}")


# --- the paper's COCO recipes --------------------------------------------------------------

def coco_schedule(model: MaskRCNNConfig) -> dict[str, Any]:
    """The ``TrainConfig`` fields of the paper's COCO schedule for ``model``.

    ResNet (§3.1): 16 images per batch (2 per GPU on 8), lr 0.02, 160k iterations, ÷10 at
    120k -- ``TrainConfig``'s defaults. ResNeXt (grouped 3x3 convolutions, ``groups > 1``):
    "1 image per GPU and the same number of iterations, with a starting learning rate of 0.01"
    -- 8 images, lr 0.01, 160k, ÷10 at 120k; ``reference_batch`` 8, so that the linear scaling
    rule starts from 0.01 @ 8. Keypoints (§5): 90k iterations, ÷10 at 60k and 80k.
    """
    schedule: dict[str, Any] = dict(base_lr=0.02, images_per_batch=16, reference_batch=16,
                                    max_iter=160_000, steps=(120_000,))
    if model.backbone.resnet.groups > 1:  # §3.1 "With ResNeXt"
        schedule.update(base_lr=0.01, images_per_batch=8, reference_batch=8)
    if model.keypoint_head is not None:  # §5
        schedule.update(max_iter=90_000, steps=(60_000, 80_000))
    return schedule


def coco_recipe(preset: str) -> Experiment:
    """§3.1's recipe for ``preset`` (§5's for ``keypoint_r50_fpn``), with COCO 2017 paths.

    The paper fine-tunes ImageNet-pre-trained backbones (§3.1 "Implementation details");
    point ``init_weights`` at one (see ``backbone/resnet.py``, ``load_imagenet_state_dict``).
    """
    model = get_preset(preset)
    train = TrainConfig(output_dir=f"runs/{preset}_coco", amp="none", **coco_schedule(model))
    data = DataConfig()
    if model.keypoint_head is not None:
        data = DataConfig(train_annotations=f"{COCO_ROOT}/annotations/person_keypoints_train2017.json",
                          val_annotations=f"{COCO_ROOT}/annotations/person_keypoints_val2017.json",
                          keypoints=True)
    return Experiment(name=f"{preset}_coco", model=model, train=train, data=data)


# --- miniature recipes on the synthetic shapes set -----------------------------------------

def _shapes_data(out_dir: str, synthetic: SyntheticData, **changes) -> DataConfig:
    return DataConfig(train_images=f"{out_dir}/train",
                      train_annotations=f"{out_dir}/annotations/instances_train.json",
                      val_images=f"{out_dir}/val",
                      val_annotations=f"{out_dir}/annotations/instances_val.json",
                      synthetic=synthetic, **changes)


def mini_gpu() -> Experiment:
    """R-mini-FPN on the default 192 px shapes set (4000 / 500 images) on one GPU.

    16 images per batch as in the paper, so the paper's lr 0.02 applies unchanged; a short
    schedule (6000 iterations = 24 epochs, ÷10 at 4500 and 5500) for a from-scratch model.
    """
    out_dir = "data/generated/shapes"
    train = TrainConfig(base_lr=0.02, max_iter=6000, steps=(4500, 5500), warmup_iters=300,
                        images_per_batch=16, reference_batch=16, amp="bf16", num_workers=6,
                        output_dir="runs/mini_gpu", checkpoint_period=1000, eval_period=2000,
                        log_period=20)
    return Experiment(name="mini_gpu", model=get_preset("mini_fpn", num_classes=8, image_size=192),
                      train=train, data=_shapes_data(out_dir, SyntheticData(out_dir=out_dir)))


def mini_cpu() -> Experiment:
    """The demo: a width-8 R-mini-FPN on 96 px shapes (1-3 objects each), minutes on 2 CPU cores.

    Tuned by measurement on the project's 2-core machine (docs/training.md): 96 px images of
    the "tiny" shapes preset (larger objects, no tiny ones) and fewer proposals and sampled
    RoIs than ``mini_fpn`` (on a CPU the time goes to NMS and RoIAlign); one compute thread,
    because two threads on two busy cores spin more than they compute (the data loader
    gets the other core).
    """
    out_dir = "data/generated/shapes_demo"
    synthetic = SyntheticData(out_dir=out_dir, preset="tiny", n_train=600, n_val=100,
                              image_size=96, seed=0)
    model = get_preset("mini_fpn", num_classes=8, image_size=96, width=8)
    model.rpn = dataclasses.replace(model.rpn, pre_nms_top_n_train=300, post_nms_top_n_train=150,
                                    pre_nms_top_n_test=200, post_nms_top_n_test=100)
    model.box_head = dataclasses.replace(model.box_head, batch_size_per_image=64,
                                         detections_per_img=50)
    train = TrainConfig(base_lr=0.04, max_iter=800, steps=(640,), warmup_iters=50,
                        images_per_batch=4, reference_batch=4, device="cpu", num_workers=1,
                        output_dir="runs/demo", checkpoint_period=200, log_period=10)
    return Experiment(name="mini_cpu", model=model, train=train, cpu_threads=1,
                      data=_shapes_data(out_dir, synthetic, eval_batch_size=4))


def tiny() -> Experiment:
    """Three iterations on the tiny 64 px set: for tests and smoke runs (learns nothing)."""
    out_dir = "data/generated/shapes_tiny"
    model = get_preset("mini_fpn", num_classes=8, image_size=64, width=8)
    model.rpn = dataclasses.replace(model.rpn, pre_nms_top_n_train=100, post_nms_top_n_train=50,
                                    pre_nms_top_n_test=100, post_nms_top_n_test=50)
    model.box_head = dataclasses.replace(model.box_head, batch_size_per_image=32,
                                         detections_per_img=20)
    train = TrainConfig(base_lr=0.01, max_iter=3, steps=(2,), warmup_iters=1, images_per_batch=2,
                        reference_batch=2, device="cpu", num_workers=0, output_dir="runs/tiny",
                        checkpoint_period=0, log_period=1)
    return Experiment(name="tiny", model=model, train=train,
                      data=_shapes_data(out_dir, SyntheticData(out_dir=out_dir, preset="tiny")))


RECIPES = {f"{name}_coco": (lambda name=name: coco_recipe(name))
           for name in PRESETS if not name.startswith("mini")}
RECIPES.update(mini_gpu=mini_gpu, mini_cpu=mini_cpu, tiny=tiny)


def get_recipe(name: str) -> Experiment:
    """The recipe called ``name`` (see :data:`RECIPES`), a fresh copy each call."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)} "
                         "or give a .json file")
    return RECIPES[name]()


# --- overrides ---------------------------------------------------------------------------------

def parse_override(text: str) -> tuple[str, Any]:
    """``"train.base_lr=0.01"`` -> ``("train.base_lr", 0.01)``; unparsable values stay strings."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise ValueError(f"override {text!r} must look like key=value, e.g. train.base_lr=0.01")
    if raw.lower() in ("none", "null"):
        return key, None
    if raw.lower() in ("true", "false"):
        return key, raw.lower() == "true"
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw  # a bare word: roi_pool, bf16, runs/x


def flatten_overrides(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"base_lr": 0.01}}`` -> ``{"train.base_lr": 0.01}`` (for JSON config files)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_overrides(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _read_overrides(overrides: list[str] | dict[str, Any]) -> dict[str, tuple[Any, str | None]]:
    """key -> (value, the text as typed); the text is None for values given as Python objects."""
    if isinstance(overrides, dict):
        return {key: (value, None) for key, value in overrides.items()}
    read = {}
    for text in overrides:
        key, value = parse_override(text)
        read[key] = (value, text.partition("=")[2].strip())
    return read


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint, key: str, text: str | None = None) -> Any:
    """``value`` converted to the type ``hint`` allows, or ValueError naming ``key``.

    ``text``: the value as typed on the command line. A field that takes a string gets it when
    ``value`` is not one (``train.output_dir=2025`` is the folder "2025", not the number);
    None is only for fields that may be None.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, text)
            except ValueError:
                pass
    elif hint is Any:
        return value
    elif dataclasses.is_dataclass(hint):
        pass  # a whole sub-config cannot be written as one value: set its fields
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
        if text is not None and value is not None:  # 2025, 1e5, true: read as a literal, meant as text
            return text
    elif origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]  # 120000 -> (120000,)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(item, args[0], key) for item in items)
        if len(items) == len(args):
            return tuple(_coerce(item, arg, key) for item, arg in zip(items, args))
    why = " (it cannot be None; quote it, 'None', for the text)" if value is None else ""
    raise ValueError(f"bad value for {key}: {value!r} is not a {_type_name(hint)}{why}")


def _set_field(obj: Any, path: list[str], value: Any, done: str, text: str | None = None) -> tuple[Any, Any]:
    """(a copy of dataclass ``obj`` with the field at ``path`` set, the value it got);
    ``replace`` re-runs the configs' checks."""
    where = done or "the experiment"
    if not dataclasses.is_dataclass(obj):
        raise ValueError(f"unknown key {done}.{'.'.join(path)}: {where} is {obj!r}, not a config "
                         "with fields" + (" (set it to a config first)" if obj is None else ""))
    name, key = path[0], f"{done}.{path[0]}" if done else path[0]
    settable = {f.name: f for f in dataclasses.fields(obj) if f.init}
    if name not in settable:
        raise ValueError(f"unknown key {key}: {type(obj).__name__} has no settable field "
                         f"{name!r}; choose one of {sorted(settable)}")
    if len(path) > 1:
        new_value, given = _set_field(getattr(obj, name), path[1:], value, key, text)
    else:
        new_value = given = _coerce(value, typing.get_type_hints(type(obj))[name], key, text)
    return dataclasses.replace(obj, **{name: new_value}), given


def _apply(experiment: Experiment, overrides: dict[str, tuple[Any, str | None]]) -> tuple[Experiment, dict]:
    """``experiment`` with ``overrides`` (as :func:`_read_overrides` returns them) applied, and
    the value each key got (what a JSON spec must hold to give the same experiment again)."""
    given = {}
    for key, (value, text) in overrides.items():
        experiment, given[key] = _set_field(experiment, key.split("."), value, "", text)
    return experiment, given


def apply_overrides(experiment: Experiment, overrides: list[str] | dict[str, Any]) -> Experiment:
    """A copy of ``experiment`` with ``overrides`` (``["a.b=1", ...]`` or ``{"a.b": 1}``) applied."""
    return _apply(experiment, _read_overrides(overrides))[0]


def load_experiment(config: str, overrides: list[str] | dict[str, Any] = ()) -> tuple[Experiment, dict]:
    """A recipe name or a JSON file, then ``overrides``; returns it and its JSON spec.

    A JSON file holds ``{"recipe": NAME, "overrides": {"train.base_lr": 0.01, ...}}``
    (nested dicts are fine too; any key but those of :data:`SPEC_KEYS` is an error naming
    the file and the key); so is the spec returned, with each key's value as the
    experiment got it (``train.output_dir=2025`` as "2025"). ``train`` writes it to its output
    folder as ``experiment.json``, so a finished run can be re-created from it.
    """
    read: dict[str, tuple[Any, str | None]] = {}
    path = None
    if config.endswith(".json") or Path(config).is_file():
        path = Path(config)
        if not path.is_file():
            raise ValueError(f"config file {config} not found")
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {config} is not valid JSON: {err}") from None
        if not isinstance(spec, dict) or "recipe" not in spec:
            raise ValueError(f"config file {config} must be a JSON object with a 'recipe' key "
                             '(e.g. {"recipe": "mini_cpu", "overrides": {"train.max_iter": 100}})')
        unknown = sorted(set(spec) - SPEC_KEYS)
        if unknown:  # a misspelt "overides" would otherwise drop every override unseen
            raise ValueError(f"config file {config}: unknown key {unknown[0]!r}"
                             + (f" (and {unknown[1:]})" if unknown[1:] else "")
                             + f"; it may hold {sorted(SPEC_KEYS)}")
        config = spec["recipe"]
        if not isinstance(config, str):
            raise ValueError(f"config file {path}: 'recipe' must be a recipe name, e.g. \"mini_cpu\", got {config!r}")
        given = spec.get("overrides", {})
        if isinstance(given, list) and all(isinstance(text, str) for text in given):
            read.update(_read_overrides(given))  # ["train.max_iter=100", ...], as on the command line
        elif isinstance(given, dict):
            read.update(_read_overrides(flatten_overrides(given)))
        else:
            raise ValueError(f"config file {path}: 'overrides' must be an object "
                             f'{{"train.max_iter": 100}} or a list ["train.max_iter=100"], got {given!r}')
    try:  # the file's recipe and overrides first, so that an error in them names the file
        experiment, used = _apply(get_recipe(config), read)
    except ValueError as err:
        if path is None:
            raise
        raise ValueError(f"config file {path}: {err}") from None
    experiment, on_the_command_line = _apply(experiment, _read_overrides(overrides))
    used.update(on_the_command_line)
    return experiment, {"recipe": config, "overrides": used}
