"""Command line: ``python -m mrcnn_edu COMMAND``.

Commands
  demo      generate the synthetic set, train a miniature Mask R-CNN on the CPU for a few
            minutes, evaluate it with COCO AP and draw its predictions (runs/demo/)
  train     train an experiment: a recipe name or JSON file, plus key=value overrides
  eval      COCO AP (boxes, masks, keypoints) of a checkpoint on the val set
  predict   draw a checkpoint's masks, boxes, labels and keypoints on your images
  ablate    reproduce Table 2's ablations: rows x seeds, J at once, resumable
  anchors   draw the C4 and FPN anchors over an image and save the figure

Recipes (python -m mrcnn_edu train --config NAME): the paper's COCO recipes
  r50_c4_coco r101_c4_coco r50_c5_coco r50_fpn_coco r101_fpn_coco x101_fpn_coco
  keypoint_r50_fpn_coco (§3.1: 160k iterations x 16 images, lr 0.02 /10 at 120k; ResNeXt
  x 8 images at lr 0.01; §5: 90k),
and miniature ones on the synthetic shapes set: mini_gpu, mini_cpu (the demo), tiny.
Each key=value changes one field of the experiment (see mrcnn_edu/recipes.py and
docs/training.md), e.g. train.base_lr=0.01 model.pooler.kind=roi_pool data.eval_images=500.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

EXAMPLES = """examples:
  python -m mrcnn_edu demo                                  # a few minutes on a laptop CPU
  python -m mrcnn_edu train --config mini_cpu train.max_iter=100
  python -m mrcnn_edu train --config mini_gpu               # one GPU, synthetic shapes
  python -m mrcnn_edu train --config r50_fpn_coco train.images_per_batch=2   # 1 GPU: lr, steps scaled
  torchrun --nproc_per_node 8 -m mrcnn_edu train --config r50_fpn_coco     # the paper's 8 GPUs
  python -m mrcnn_edu train --config runs/demo/experiment.json --resume    # continue a run
  python -m mrcnn_edu eval --weights runs/demo/model_0000800.pth
  python -m mrcnn_edu predict photo.jpg --weights runs/demo/model_0000800.pth --out runs/pred
"""


# --- building blocks shared by the commands (and notebooks 07, 08) -------------------------

def prepare_data(experiment) -> None:
    """Generate the synthetic set if the experiment names one and it is not there yet; a set
    already there must be the one asked for (another size, count or seed is an error, not a
    silent training on the old one; so is another preset)."""
    synthetic, data = experiment.data.synthetic, experiment.data
    if synthetic is None:
        return
    from mrcnn_edu.data import shapes

    paths = {"train_images": "train", "train_annotations": "annotations/instances_train.json",
             "val_images": "val", "val_annotations": "annotations/instances_val.json"}
    elsewhere = [f"data.{key}={getattr(data, key)}" for key, rel in paths.items()
                 if Path(getattr(data, key)) != Path(synthetic.out_dir) / rel]
    if elsewhere:  # the recipe fixed the paths from its own out_dir when it was built
        raise ValueError(f"data.synthetic.out_dir={synthetic.out_dir} but {', '.join(elsewhere)}: "
                         "give the paths inside it too (train, val, annotations/instances_*.json)")
    if Path(data.val_annotations).is_file():
        _check_synthetic_set(synthetic)
        return

    tic = time.perf_counter()
    print(f"generating the synthetic shapes set in {synthetic.out_dir} ...", flush=True)
    # no warning filter: the empty crowd cluster numpy once warned about is skipped in
    # render_scene now, so a warning here is news worth reading
    shapes.generate(synthetic.out_dir, synthetic.n_train, synthetic.n_val, synthetic.image_size,
                    synthetic.seed, synthetic.preset)
    print(f"generated in {time.perf_counter() - tic:.0f} s", flush=True)


def build_datasets(experiment, train: bool = True, run_class_names: list[str] | None = None,
                   labels: str = "json-order"):
    """(train set or None, val set) as COCODatasets; checks the class count against the model.

    ``run_class_names``: the classes, in label order, of the run whose weights are evaluated
    (``experiment.json``'s ``class_names``): a val json whose categories, numbered as
    ``COCODataset`` numbers them (sorted ids -> labels 1..K), name other classes is refused with
    the difference listed -- it would score each label against another category.
    ``labels="category-ids"`` (``eval --labels``; weights whose labels are category ids, as
    torchvision's COCO weights): the json's ids must lie within the model's labels 1..K."""
    from mrcnn_edu.data.coco import COCODataset
    from mrcnn_edu.data.transforms import RandomHorizontalFlip

    data, model_cfg = experiment.data, experiment.model
    val = COCODataset(data.val_images, data.val_annotations, train=False, with_masks=False)
    if not val.ids:  # else a training runs to its end and fails there, and again on every resume
        raise ValueError(f"{data.val_annotations} lists no image: there is nothing to evaluate on "
                         "(data.val_annotations= a json with images)")
    if run_class_names is not None and list(run_class_names) != val.class_names:
        raise ValueError(f"{data.val_annotations} has other categories than the run the weights come from "
                         f"({_category_difference(run_class_names, val)}); evaluate on a json with the run's "
                         "categories, whose sorted category ids give the same names in the same order")
    if labels == "category-ids":
        if run_class_names is not None:
            raise ValueError(f"--labels category-ids: the weights come from a run of this package "
                             f"({len(run_class_names) - 1} classes in experiment.json), whose labels 1..K are its json's "
                             "sorted category ids; category-ids is for weights whose labels are category ids "
                             "(torchvision's COCO weights)")
        beyond = [cid for cid in val.cat_ids if cid > model_cfg.num_classes]
        if beyond:
            raise ValueError(f"--labels category-ids: {data.val_annotations} has category ids {beyond[:10]} "
                             f"beyond the model's labels 1..{model_cfg.num_classes} (model.num_classes="
                             f"{model_cfg.num_classes}): its labels cannot name them")
        return None, val
    if len(val.cat_ids) != model_cfg.num_classes:
        advice = (f"add model.num_classes={len(val.cat_ids)} to the command" if train else
                  f"the weights predict {model_cfg.num_classes} classes: evaluate them on a json of "
                  "the categories they were trained on (data.val_annotations=...)")
        if not train and run_class_names is None and val.cat_ids and max(val.cat_ids) <= model_cfg.num_classes:
            advice += ("; or, if their labels are category ids (torchvision's COCO weights: labels 1..90 "
                       "for COCO's 80 ids), add --labels category-ids")
        raise ValueError(f"{data.val_annotations} has {len(val.cat_ids)} categories but the model "
                         f"has model.num_classes={model_cfg.num_classes}; {advice}")
    if not train:
        return None, val
    train_set = COCODataset(data.train_images, data.train_annotations, train=True,
                            with_masks=model_cfg.mask_head is not None,
                            with_keypoints=data.keypoints)
    if (train_set.cat_ids, train_set.class_names) != (val.cat_ids, val.class_names):
        # a label would name one class in training and another in evaluation
        raise ValueError(f"{data.train_annotations} and {data.val_annotations} have different categories: "
                         f"{list(zip(train_set.cat_ids, train_set.class_names[1:]))} against "
                         f"{list(zip(val.cat_ids, val.class_names[1:]))}")
    if data.flip_prob > 0:
        train_set.transforms = RandomHorizontalFlip(data.flip_prob, train_set.keypoint_flip_map)
    return train_set, val


def _category_difference(run_class_names: list[str], val) -> str:
    """``label 2: 'square' in the run, 'circle' (category id 2) in the json; ...``"""
    run_names, val_names = list(run_class_names)[1:], val.class_names[1:]  # without __background__
    differ = []
    for label in range(1, max(len(run_names), len(val_names)) + 1):
        ran = repr(run_names[label - 1]) if label <= len(run_names) else "nothing"
        val_text = (f"{val_names[label - 1]!r} (category id {val.cat_ids[label - 1]})"
                    if label <= len(val_names) else "nothing")
        if label > len(run_names) or label > len(val_names) or run_names[label - 1] != val_names[label - 1]:
            differ.append(f"label {label}: {ran} in the run, {val_text} in the json")
    return "; ".join(differ[:10]) + (f"; ... ({len(differ) - 10} more)" if len(differ) > 10 else "")


def _run_info(weights: str, config: str | None = None) -> dict:
    """What training wrote beside the checkpoint (``experiment.json``: its class names, the
    keypoint skeleton), else what ``--config`` holds if it is such a file; {} if neither."""
    for path in (Path(weights).parent / "experiment.json", Path(config) if config else None):
        if path is not None and path.suffix == ".json" and path.is_file():
            return json.loads(path.read_text())
    return {}


def _check_synthetic_elsewhere(experiment, rank: int) -> None:
    """On a process other than rank 0 (another node, maybe): the synthetic set rank 0 made or
    checked must be the one this process reads -- there when the nodes share a file system,
    else missing, or an older set of other images (``_check_synthetic_set`` tells)."""
    import socket

    synthetic = experiment.data.synthetic
    if not Path(experiment.data.val_annotations).is_file():
        raise ValueError(f"rank {rank} on {socket.gethostname()}: the synthetic set {synthetic.out_dir} that "
                         "rank 0 generated is not there; on several nodes put it on a file system they share, "
                         "or copy that folder to the same path on each node before starting")
    _check_synthetic_set(synthetic)


def _check_synthetic_set(synthetic) -> None:
    """ValueError if the shapes set in ``synthetic.out_dir`` is not what ``synthetic`` asks for:
    counts, size, seed, generator version and the preset's whole config (``info["config"]``).
    A set written before the config was recorded passes on the rest, with a warning: it cannot
    show which preset made it."""
    import re

    from mrcnn_edu.data import shapes

    if synthetic.preset not in shapes.PRESETS:
        raise ValueError(f"data.synthetic.preset must be one of {sorted(shapes.PRESETS)}, got {synthetic.preset!r}")
    preset = shapes.PRESETS[synthetic.preset]()
    def given(value, default):
        return default if value is None else value
    asked = {"n_train": given(synthetic.n_train, preset.n_train), "n_val": given(synthetic.n_val, preset.n_val),
             "image_size": given(synthetic.image_size, preset.image_size), "seed": synthetic.seed}
    # what generate() would write into info: the preset with the counts and size given (a json
    # round trip turns its tuples into the lists read back), and the generator's version
    config = replace(preset, n_train=asked["n_train"], n_val=asked["n_val"], image_size=asked["image_size"])
    made_by = {"config": json.loads(json.dumps(asdict(config))), "generator_version": shapes.GENERATOR_VERSION}
    found = {}
    for split in ("train", "val"):
        spec = json.loads((Path(synthetic.out_dir) / "annotations" / f"instances_{split}.json").read_text())
        found[f"n_{split}"] = len(spec["images"])
        found["image_size"] = spec["images"][0]["width"] if spec["images"] else asked["image_size"]
        info = spec.get("info", {})
        seed = re.search(r"seed (\d+)", info.get("description", ""))
        found["seed"] = int(seed.group(1)) if seed else asked["seed"]
        found["generator_version"] = info.get("generator_version", 1)  # version 1 did not say
        found["config"] = info.get("config")
    differ = [f"{key} {found[key]} (asked {asked[key]})" for key in asked if found[key] != asked[key]]
    if found["generator_version"] != made_by["generator_version"]:
        differ.append(f"generator_version {found['generator_version']} (this code writes "
                      f"{made_by['generator_version']})")
    if found["config"] is None and not differ:
        warnings.warn(f"{synthetic.out_dir}: its json does not record the generator config (older code), so "
                      f"whether preset {synthetic.preset!r} made it cannot be checked; delete the folder to "
                      "generate it anew if in doubt", stacklevel=2)
    elif found["config"] != made_by["config"] and not differ:  # e.g. the tiny preset's set, asked for default
        changed = sorted(k for k in made_by["config"] if found["config"].get(k) != made_by["config"][k])
        differ.append(f"generator config {changed} (asked preset {synthetic.preset!r})")
    if differ:
        raise ValueError(f"{synthetic.out_dir} holds another shapes set: {', '.join(differ)}; delete it to "
                         "generate the one asked for, or give data.synthetic.out_dir another folder "
                         "(and the data paths in it)")


def build_model(experiment, weights: str | None = None, strict: bool = True):
    """``MaskRCNN(experiment.model)``, seeded; ``weights``: a checkpoint or state dict to load.

    With ``strict=False`` (a training's ``init_weights``) ``weights`` may also be an ImageNet
    ResNet in torchvision's layout (``conv1.weight``, ``layer1.0...``, ``fc.*``), or
    ``pretrain.py``'s file: its body goes into the backbone and, for C4, its ``layer4`` into
    the res5 head (``ablations.load_body``). A torchvision Mask / Keypoint R-CNN state dict
    (``roi_heads.*`` keys) is renamed to our keys first (``weights.torchvision_state_dict_to_ours``).
    A file none of whose tensors fits is an error: a run "initialised" from it would silently
    train from scratch; the keys left out of a partial fit are named."""
    import torch

    from mrcnn_edu.ablations import load_body
    from mrcnn_edu.backbone.resnet import _key_list, load_state_dict_by_key
    from mrcnn_edu.checkpoint import load_checkpoint
    from mrcnn_edu.model import MaskRCNN

    torch.manual_seed(experiment.train.seed)  # the same initial weights on every process
    model = MaskRCNN(experiment.model)
    if weights:
        saved = load_checkpoint(weights)
        state = saved.get("model", saved)
        if not strict and _is_imagenet_resnet(state):
            init = load_body(model, weights, run=f"the {experiment.name} model", state=saved)
            print(f"loaded the ImageNet-layout ResNet {weights} into the backbone: "
                  f"{init['tensors']} tensors", file=sys.stderr)
            return model
        if _is_torchvision_detector(state):  # its RPN conv, FPN and heads have other names
            from mrcnn_edu.weights import _torchvision_layout, torchvision_overrides, torchvision_state_dict_to_ours

            state = _torchvision_layout(state)
            renamed, unused = torchvision_state_dict_to_ours(state, model)
            print(f"{weights}: a torchvision detector's state dict, renamed to this model's keys",
                  file=sys.stderr)
            differ = torchvision_overrides(experiment.model, state) if strict else []
            if differ:  # every tensor loads into any recipe of these shapes: the detections would differ
                eps = any(text.startswith("model.backbone.resnet.bn_eps=") for text in differ)
                print(f"{weights}: torchvision runs these weights with other settings than this experiment "
                      f"(weights.py); to evaluate or draw them as torchvision does, add {shlex.join(differ)}"
                      + (" (bn_eps 0 is for torchvision's COCO_V1 files; a model it built with weights=None "
                         "runs 1e-5)" if eps else ""), file=sys.stderr)
            state = {**renamed, **{key: state[key] for key in unused}}  # unused: reported below
        if not strict:  # fine-tuning: e.g. COCO's 91-way predictors into a model of other classes
            own = model.state_dict()
            reshaped = [key for key, value in state.items() if key in own and own[key].shape != value.shape]
            if reshaped:
                print(f"{weights}: {len(reshaped)} tensor(s) of another shape than the model's left out "
                      f"(initialised afresh): [{_key_list(reshaped)}]", file=sys.stderr)
                state = {key: value for key, value in state.items() if key not in reshaped}
        report = load_state_dict_by_key(model, state, strict=strict, what=f"model ({weights})")
        if not report.loaded:
            raise ValueError(f"no tensor of {weights} fits the {experiment.name} model (its keys: "
                             f"{', '.join(list(state)[:5])}, ...); it is neither a checkpoint of "
                             "this model nor an ImageNet ResNet in torchvision's layout")
        if report.missing or report.unexpected:
            print(f"loaded {len(report.loaded)} tensors from {weights}; {len(report.missing)} "
                  f"missing (initialised afresh) [{_key_list(report.missing)}], {len(report.unexpected)} "
                  f"unexpected (not used) [{_key_list(report.unexpected)}]", file=sys.stderr)
    return model


def _is_torchvision_detector(state: dict) -> bool:
    """Keys of a torchvision Mask / Keypoint R-CNN (``roi_heads.box_predictor``, ``backbone.body``)."""
    keys = {key.removeprefix("module.") for key in state}
    return (any(key.startswith("roi_heads.box_predictor.") for key in keys)
            and any(key.startswith("backbone.body.") for key in keys))


def _is_imagenet_resnet(state: dict) -> bool:
    """Keys of a torchvision ResNet (maybe DDP's ``module.``-prefixed), not of a MaskRCNN."""
    keys = {key.removeprefix("module.") for key in state}
    return "conv1.weight" in keys and any(key.startswith("layer1.") for key in keys)


def _set_threads(experiment) -> None:
    import torch

    if experiment.cpu_threads:
        torch.set_num_threads(experiment.cpu_threads)


def run_training(experiment, spec: dict | None = None) -> dict:
    """Train ``experiment`` (under torchrun: with DDP); returns ``engine.train``'s result.

    Writes ``experiment.json`` (a config file re-creating the run) beside the checkpoints once
    ``train`` has accepted the start (a refused resume or a refused fresh start leaves the run's
    own file as it was), and prints the AP table of the final evaluation.
    """
    import torch.distributed as dist

    from mrcnn_edu.checkpoint import atomic_write_text
    from mrcnn_edu.data.coco import aspect_ratio_group_ids, collate_fn
    from mrcnn_edu.distributed import init_distributed
    from mrcnn_edu.engine import train
    from mrcnn_edu.evaluation import format_ap_table
    from mrcnn_edu.predict import make_evaluate_fn

    _set_threads(experiment)
    info = init_distributed(experiment.train.device)
    if info.is_main:
        prepare_data(experiment)
    if info.world_size > 1:
        dist.barrier()  # the other processes wait for the data rank 0 writes
        if not info.is_main and experiment.data.synthetic is not None:
            _check_synthetic_elsewhere(experiment, info.rank)
    train_set, val_set = build_datasets(experiment)
    output_dir = Path(experiment.train.output_dir)
    spec = spec or {"recipe": experiment.name, "overrides": {}}
    # train.overwrite is what this call does to the folder, not part of the run: `--config
    # experiment.json` without --resume must not delete the run it re-creates
    spec = {**spec, "overrides": {k: v for k, v in spec["overrides"].items() if k != "train.overwrite"}}

    def write_experiment(start_iter: int) -> None:
        """train() calls it once the start is accepted; atomically, as the run's only config."""
        if info.is_main:
            # class names and the keypoint category's skeleton (1-based pairs, [] if none): what
            # predict draws with
            atomic_write_text(output_dir / "experiment.json", json.dumps(
                {**spec, "class_names": val_set.class_names, "skeleton": val_set.skeleton,
                 "resolved": asdict(experiment)}, indent=1, default=str))

    if info.is_main:
        print(f"experiment {experiment.name}: {len(train_set)} training images, "
              f"{len(val_set)} val images, output {output_dir}", flush=True)
    model = build_model(experiment, experiment.init_weights, strict=False)
    evaluate_fn = make_evaluate_fn(val_set, experiment.data.eval_batch_size,
                                   experiment.data.eval_images)
    group_ids = aspect_ratio_group_ids(train_set.coco, train_set.ids)
    result = train(model, train_set, experiment.train, collate_fn, evaluate_fn,
                   group_ids=group_ids if len(set(group_ids)) > 1 else None, on_start=write_experiment)
    result["model"] = model
    if info.is_main and result["eval"]:
        print(f"COCO AP (%) on {_images_evaluated(experiment, val_set)}, iteration {result['iteration']}:")
        print(format_ap_table(result["eval"]), flush=True)
    return result


def experiment_for_weights(weights: str, config: str | None, overrides: list[str]):
    """The experiment of a checkpoint: ``--config`` if given, else ``experiment.json`` beside it.

    A training checkpoint records its model's config: if the experiment's differs (RoIPool for
    RoIAlign: every tensor would still load), it is an error naming the settings; what only
    inference or only training reads (``engine.WEIGHTS_FREE``: the test scale, NMS, thresholds,
    the samplers) may differ."""
    from mrcnn_edu.engine import WEIGHTS_FREE, model_config_mismatch
    from mrcnn_edu.recipes import load_experiment

    if not Path(weights).is_file():
        raise FileNotFoundError(f"--weights {weights}: no such file")
    if config is None:
        config = str(Path(weights).parent / "experiment.json")
        if not Path(config).is_file():
            raise ValueError(f"no experiment.json beside {weights}; pass --config NAME|FILE "
                             "(the recipe the checkpoint was trained with)")
    experiment, spec = load_experiment(config, overrides)
    differ = model_config_mismatch(_recorded_model_config(weights), experiment.model, free=WEIGHTS_FREE)
    if differ:
        raise ValueError(f"{weights} was trained with another model than {config} (with the overrides "
                         f"given) builds: {'; '.join(differ)}. Pass the run's own --config, or "
                         "overrides that give its settings")
    return experiment, spec


def _recorded_model_config(weights: str) -> dict | None:
    """The ``model_config`` a training checkpoint records, or None (a bare state dict, an older
    checkpoint, a file that is no checkpoint: ``build_model`` names what is wrong with it)."""
    import torch

    try:  # mmap: the tensors stay on disk, only the small config is read
        saved = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return saved.get("model_config") if isinstance(saved, dict) else None


def _images_evaluated(experiment, val_set) -> str:
    """``instances_val.json``, or ``500 of 5000 images of instances_val.json`` for a subset
    (``data.eval_images``): the table is not the whole json's AP."""
    from mrcnn_edu.predict import images_scored

    scored = images_scored(val_set, experiment.data.eval_images)
    subset = f"{scored} of {len(val_set.ids)} images of " if scored < len(val_set.ids) else ""
    return f"{subset}{experiment.data.val_annotations}"


def _metrics_file(path: str) -> Path:
    """``eval --out``'s file, its folder made and checked now: not after the whole evaluation."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file, e.g. {out / 'metrics.json'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {out}: its folder cannot be made ({err})") from err
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"--out {out}: cannot write into {out.parent}")
    return out


# --- the commands ------------------------------------------------------------------------------

def _cmd_train(args: argparse.Namespace) -> int:
    from mrcnn_edu.distributed import leaving_process_group
    from mrcnn_edu.recipes import load_experiment

    overrides, resume = list(args.overrides), args.resume
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
        overrides, resume = [resume, *overrides], True  # "--resume k=v": k=v is an override
    experiment, spec = load_experiment(args.config, overrides)
    if resume:
        experiment = replace(experiment, train=replace(experiment.train, resume=resume))
    from mrcnn_edu.engine import TrainingStopped

    try:
        with leaving_process_group():
            run_training(experiment, spec)
    except TrainingStopped as stop:  # SIGTERM: the iteration is saved; --resume continues it
        print(f"{stop}\n(same command with --resume)", file=sys.stderr, flush=True)
        return 75  # sysexits' TEMPFAIL, as `ablate` reads it: try again later
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mrcnn_edu.distributed import init_distributed, leaving_process_group
    from mrcnn_edu.engine import _pick_device
    from mrcnn_edu.evaluation import format_ap_table
    from mrcnn_edu.predict import evaluate_model

    experiment, _ = experiment_for_weights(args.weights, args.config, args.overrides)
    _set_threads(experiment)
    info = init_distributed(experiment.train.device)
    with leaving_process_group():
        out = _metrics_file(args.out) if args.out else None  # every rank: none waits on one that stopped
        _, val_set = build_datasets(experiment, train=False, labels=args.labels,
                                    run_class_names=_run_info(args.weights, args.config).get("class_names"))
        model = build_model(experiment, args.weights).to(_pick_device(experiment.train.device, info))
        tic = time.perf_counter()
        metrics = evaluate_model(model, val_set, batch_size=experiment.data.eval_batch_size,
                                 max_images=experiment.data.eval_images, labels=args.labels)
        if info.is_main:
            print(f"COCO AP (%) of {args.weights} on {_images_evaluated(experiment, val_set)} "
                  f"({time.perf_counter() - tic:.0f} s):")
            print(format_ap_table(metrics))
            if out is not None:  # fractions, as evaluate_model gives them; null (strict JSON) for nan
                strict = {iou_type: {name: None if math.isnan(value) else value for name, value in row.items()}
                          for iou_type, row in metrics.items()}
                out.write_text(json.dumps(strict, indent=1, allow_nan=False))
    return 0


def keypoint_skeleton(experiment, run_info: dict) -> list | None:
    """The 1-based keypoint pairs to draw for ``experiment``'s keypoints, or None: the keypoint
    category's ``skeleton`` that ``experiment.json`` (``run_info``) holds; without one (an older
    run), COCO's person skeleton if the model has COCO's 17 keypoints; else no lines."""
    from mrcnn_edu.data.shapes import KEYPOINT_NAMES, SKELETON

    head = experiment.model.keypoint_head
    if head is None:
        return None
    if run_info.get("skeleton"):
        return run_info["skeleton"]
    return SKELETON if head.num_keypoints == len(KEYPOINT_NAMES) else None  # COCO's 17


def _cmd_predict(args: argparse.Namespace) -> int:
    from mrcnn_edu.evaluation import SEGM_MASK_THRESHOLD
    from mrcnn_edu.predict import load_image, predict_images, save_prediction_grid

    stems = Counter(Path(p).stem for p in args.images)
    clashing = sorted(s for s, count in stems.items() if count > 1)
    if clashing:  # a/x.png and b/x.png would both be drawn to OUT/x.png
        raise ValueError(f"images with the same name {clashing} would overwrite each other's drawing "
                         f"in {args.out}; predict them in separate calls or rename them")
    out_dir = Path(args.out)
    inputs = {key: source for source in args.images for key in _file_keys(Path(source))}
    for image_path in args.images:  # before anything is predicted, let alone written
        drawing = out_dir / f"{Path(image_path).stem}.png"
        source = next((inputs[key] for key in _file_keys(drawing) if key in inputs), None)
        if source is not None:  # e.g. `predict photo.png --out .`: the photo itself
            raise ValueError(f"the drawing of {image_path}, {drawing}, would overwrite the input image "
                             f"{source} (the same file); give --out another folder")
    experiment, _ = experiment_for_weights(args.weights, args.config, args.overrides)
    _set_threads(experiment)
    run_info = _run_info(args.weights, args.config)
    class_names = run_info.get("class_names")
    skeleton = keypoint_skeleton(experiment, run_info)
    from mrcnn_edu.distributed import DistInfo
    from mrcnn_edu.engine import _pick_device

    # train.device (auto: the GPU when there is one), as eval does; --set train.device=cpu
    model = build_model(experiment, args.weights).to(_pick_device(experiment.train.device, DistInfo()))
    for image_path in args.images:
        image = load_image(image_path)
        # drawn where > 0.5, as evaluation scores them: binarised on the device, a quarter of the copy
        (prediction,) = predict_images(model, [image], batch_size=1, mask_threshold=SEGM_MASK_THRESHOLD)
        path = save_prediction_grid([image], [prediction], out_dir / f"{Path(image_path).stem}.png",
                                    class_names, args.score_threshold, columns=1, skeleton=skeleton)
        kept = int((prediction["scores"] >= args.score_threshold).sum())
        print(f"{image_path}: {kept} detections with score >= {args.score_threshold} -> {path}")
    return 0


def _file_keys(path: Path) -> list:
    """What names one file: its resolved path (links, ``..``) and, if it exists, its device and
    inode (a hard link, a case-insensitive file system). Two paths sharing a key are one file."""
    keys: list = [path.resolve()]
    try:
        status = path.stat()
        keys.append((status.st_dev, status.st_ino))
    except OSError:  # not there (yet): a drawing still to be written
        pass
    return keys


def _cmd_demo(args: argparse.Namespace) -> int:
    from mrcnn_edu.data.shapes import SKELETON
    from mrcnn_edu.evaluation import SEGM_MASK_THRESHOLD
    from mrcnn_edu.predict import predict_images, save_prediction_grid
    from mrcnn_edu.recipes import load_experiment

    tic = time.perf_counter()
    # the demo retrains in the same folder each time it is run: afresh, explicitly
    # (train.resume=True among the overrides continues the last demo instead)
    overrides = [f"train.output_dir={args.out}", "train.progress=True", "train.overwrite=True", *args.overrides]
    experiment, spec = load_experiment("mini_cpu", overrides)
    print("mrcnn_edu demo: a miniature Mask R-CNN (R-mini-FPN, from scratch) on synthetic shapes, "
          "on the CPU.\nrecipe mini_cpu (mrcnn_edu/recipes.py); change it with key=value, "
          "e.g. train.max_iter=100\n", flush=True)
    result = run_training(experiment, spec)
    _, val_set = build_datasets(experiment, train=False)
    images = [val_set.load_image(i) for i in val_set.ids[:8]]
    predictions = predict_images(result["model"], images, batch_size=4, mask_threshold=SEGM_MASK_THRESHOLD)
    # beside the weights and curves: train.output_dir=... given after --out's default wins
    grid = save_prediction_grid(images, predictions, Path(experiment.train.output_dir) / "predictions.png",
                                val_set.class_names, score_threshold=0.3, skeleton=SKELETON)
    segm = result["eval"].get("segm", {}).get("AP", float("nan"))
    print(f"\nmask AP {100 * segm:.1f} (a from-scratch model after {result['iteration']} "
          f"iterations; the paper's R-50-FPN on COCO: 33.6)")
    print(f"predictions: {grid}\nloss curves: {result['loss_curves']}\n"
          f"weights: {result['checkpoint']}\ntotal time {time.perf_counter() - tic:.0f} s, "
          f"peak memory {_peak_memory_mb():.0f} MB")
    return 0


def _peak_memory_mb() -> float:
    """Peak resident memory of this process (Linux / macOS), in MB; nan elsewhere."""
    try:
        import resource
    except ImportError:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


def _cmd_anchors(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from mrcnn_edu.anchors import c4_anchor_generator, fpn_anchor_generator
    from mrcnn_edu.visualize import draw_boxes, show_image

    height, width = args.size
    image = torch.linspace(0.2, 0.8, width).expand(3, height, width)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    (c4,) = c4_anchor_generator()([(height // 16, width // 16)])
    cell = (height // 32) * (width // 16) + width // 32  # the cell nearest the image centre
    show_image(image, axes[0], title="C4: 15 anchors of one stride-16 cell")
    draw_boxes(c4.reshape(-1, 15, 4)[cell], axes[0])
    fpn = fpn_anchor_generator()([(height // s, width // s) for s in (4, 8, 16, 32, 64)])
    show_image(image, axes[1], title="FPN: 3 anchors per level, P2..P6")
    for level, (anchors, stride) in enumerate(zip(fpn, (4, 8, 16, 32, 64))):
        w = width // stride
        centre = (height // stride // 2) * w + w // 2
        draw_boxes(anchors.reshape(-1, 3, 4)[centre], axes[1], color=f"C{level}")
    for ax in axes:
        ax.set_xlim(-300, width + 300)
        ax.set_ylim(height + 300, -300)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, bbox_inches="tight")
    print(f"wrote {out}")
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from mrcnn_edu.ablations import main as ablations_main

    return ablations_main(args.ablate_args)


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m mrcnn_edu", description=__doc__,
                                     epilog=EXAMPLES, formatter_class=formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    overrides_help = "changes to the experiment, e.g. train.base_lr=0.01 model.pooler.kind=roi_pool"

    demo = sub.add_parser("demo", help="train and evaluate a miniature model on the CPU (minutes)",
                          description="The README's main job: generate the "
                          "synthetic set, train the mini_cpu recipe with a progress bar, print "
                          "the COCO AP table, write runs/demo/predictions.png and loss_curves.png.",
                          epilog=EXAMPLES, formatter_class=formatter)
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); "
                      "short for train.output_dir=OUT, which wins if also given")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    demo.set_defaults(func=_cmd_demo)

    train = sub.add_parser("train", help="train a recipe (torchrun for several GPUs / nodes)",
                           description="Train an experiment; checkpoints, metrics.jsonl, "
                           "loss_curves.png and experiment.json go to train.output_dir.",
                           epilog=EXAMPLES, formatter_class=formatter)
    train.add_argument("--config", required=True, metavar="NAME|FILE",
                       help="a recipe name (see python -m mrcnn_edu --help) or a JSON file "
                       '{"recipe": NAME, "overrides": {"train.base_lr": 0.01}}')
    train.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                       help="continue from the newest checkpoint in train.output_dir (or CKPT)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    train.set_defaults(func=_cmd_train)

    evaluate = sub.add_parser("eval", help="COCO AP of a checkpoint on the val set",
                              description="COCO AP (bbox, segm, keypoints) of --weights on the "
                              "experiment's val set; under torchrun the images are sharded.",
                              epilog=EXAMPLES, formatter_class=formatter)
    evaluate.add_argument("--weights", required=True, metavar="CKPT", help="a checkpoint (.pth)")
    evaluate.add_argument("--config", metavar="NAME|FILE",
                          help="the run's recipe (default: experiment.json beside CKPT)")
    evaluate.add_argument("--out", metavar="JSON", help="also write the metrics to this file, as "
                          "fractions in [0, 1] (the table shows percent), null where COCOeval has "
                          "nothing to score; its folder is made first")
    evaluate.add_argument("--labels", choices=("json-order", "category-ids"), default="json-order",
                          help="what the model's labels are: json-order (ours: labels 1..K are the json's "
                          "sorted category ids) or category-ids (torchvision's COCO weights: labels 1..90 "
                          "are COCO's category ids)")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    evaluate.set_defaults(func=_cmd_eval)

    predict = sub.add_parser("predict", help="draw a checkpoint's predictions on images",
                             description="Write OUT/<image name>.png with masks, boxes, class "
                             "names, scores and keypoints for each IMAGE.",
                             epilog=EXAMPLES, formatter_class=formatter)
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--weights", required=True, metavar="CKPT")
    predict.add_argument("--config", metavar="NAME|FILE",
                         help="the run's recipe (default: experiment.json beside CKPT)")
    predict.add_argument("--out", default="runs/predict", help="output folder (default runs/predict)")
    predict.add_argument("--score-threshold", type=float, default=0.5)
    predict.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="key=value",
                         help=overrides_help)
    predict.set_defaults(func=_cmd_predict)

    ablate = sub.add_parser("ablate", help="reproduce Table 2: train and evaluate its rows",
                            description="Train and evaluate the rows of Table 2 (several seeds, "
                            "J trainings at once on one GPU, resumable); see mrcnn_edu/ablations.py "
                            "and `python -m mrcnn_edu ablate --help`.", add_help=False)
    ablate.add_argument("ablate_args", nargs=argparse.REMAINDER)
    ablate.set_defaults(func=_cmd_ablate)

    anchors = sub.add_parser("anchors", help="draw C4 and FPN anchors")
    anchors.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    anchors.add_argument("--out", default="runs/anchors.png")
    anchors.set_defaults(func=_cmd_anchors)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["ablate"]:  # its own parser, options and all (argparse.REMAINDER drops leading flags)
        args = argparse.Namespace(func=_cmd_ablate, ablate_args=argv[1:])
    else:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        # argparse takes one run of positionals: `eval --weights W a=1 --out F b=2` leaves b=2
        # over. Later key=value words are overrides too, in the order given.
        if extra and hasattr(args, "overrides") and all("=" in word and not word.startswith("-") for word in extra):
            args.overrides = [*args.overrides, *extra]
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:  # exit codes a command returns (ablate's 1 for failed trainings, train's 75) pass through
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # a message for a person, not a traceback
        if os.environ.get("MRCNN_EDU_TRACEBACK"):
            raise
        print(f"error: {err}\n(set MRCNN_EDU_TRACEBACK=1 to see where)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
