"""Probe one Table 2 miniature run: train it on a schedule of your choice, evaluate it on the way.

The design questions of the miniature (does pre-training help? is C4 held back by resolution or
by the schedule?) are answered by single runs like these before a whole table is spent on them.
The probe tables in docs/training.md are runs of this script (commands there), one core each:

    python -m mrcnn_edu.ablations pretrain-one --body ResNet-50 --out runs/probe/R-mini-50.pth
    python bench/miniature_probe.py --run r50_c4 --iters 1000 --eval-at 500 1000 \\
        --weights runs/probe/R-mini-50.pth [--diagnose 60]

(both at the table's default 384 px input; add ``--input-size 192`` to both for 192 px).

It trains ``ablations.model_config(RUNS[run])`` -- exactly the model ``ablate`` trains -- with
the probe's schedule (default: 4 images per batch, lr 0.005, 200 warm-up iterations, no decay,
so that the evaluation at iteration 500 of a 1000-iteration probe is what a 500-iteration run
gives), evaluates with COCOeval at each ``--eval-at`` iteration, and prints one line per
evaluation. ``--diagnose N`` adds, on the first N val images, with the last checkpoint:

- the RPN's recall at IoU 0.5, and the share of found objects (a detection at IoU >= 0.5) whose
  highest-scoring such detection has the right class, overall and per COCO size (what separates
  "where" from "what"), and which class each is taken for (``class_confusion``);
  ``class_right_best_iou`` is the earlier measure, the best-overlapping detection's class, which
  with per-class NMS may be a low-scoring duplicate's;
- the mask branch alone: the mean mask IoU when it is given each object's true box and class,
  and the same for the m x m training target pasted back -- the ceiling of the mask resolution
  (what separates the mask branch from the detector before it), overall, per COCO size and per
  class; for a softmax-loss run (Table 2b) also under each readout of its (K+1)-way output
  (``mask_iou_given_box_by_softmax_readout``: p_k >= 0.5, argmax, and 1 - p_background, which
  tells a head that misses the object from one whose classes split the object's pixels);
  and per class whether the branch draws the object or the class's average mask, its *template*
  (``mask_template_by_class``, :func:`class_templates`: what tells an MLP head from an FCN).

Rerunning the same command resumes from the run's last checkpoint (``--checkpoint-every N`` writes
them more often than ``--eval-at``'s). ``--start-from CKPT``
starts a new run folder from another probe's checkpoint: the same run continued on another
schedule, e.g. with the lr decayed from there on (``--decay-at``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from mrcnn_edu import ablations  # noqa: E402
from mrcnn_edu.boxes import box_iou  # noqa: E402
from mrcnn_edu.checkpoint import checkpoint_path, newest_checkpoint  # noqa: E402
from mrcnn_edu.data.coco import COCODataset, collate_fn  # noqa: E402
from mrcnn_edu.engine import train  # noqa: E402
from mrcnn_edu.model import MaskRCNN  # noqa: E402
from mrcnn_edu.predict import evaluate_model  # noqa: E402
from mrcnn_edu.roi_heads.mask_head import SOFTMAX_READOUTS, mask_targets, paste_masks_in_image  # noqa: E402


SIZES = {"small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, float("inf"))}  # COCO's areas


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of (N, ...) bool masks, a[i] with b[i] -> (N,); 0 where both are empty."""
    return (a & b).flatten(1).sum(1) / (a | b).flatten(1).sum(1).clamp(min=1)


@torch.no_grad()
def mask_given_box(model: MaskRCNN, image: torch.Tensor, target: dict,
                   softmax_readouts: tuple[str, ...] = (), cells: list | None = None) -> torch.Tensor:
    """The mask branch alone, for each ground-truth object of one image: (G, 4 + R) rows of
    (mask area in pixels, IoU of the predicted mask, IoU of the m x m training target, label),
    then the predicted mask's IoU under each of ``softmax_readouts`` (R of them, for a softmax
    head: ``MaskHeadConfig.softmax_readout``), from the same features.

    The branch is handed the object's true box and class, as if the box branch were perfect, so
    the IoU measures the mask branch and nothing before it. The training target (the ground
    truth RoIAligned to m x m, ``mask_targets``) pasted back with the same ``paste_masks_in_image``
    is the best an m x m mask can do: its IoU is the ceiling of the mask resolution.

    ``cells``, if given, gets the pair ((G, m, m) predicted mask >= 0.5, (G, m, m) target >= 0.5)
    appended, in the RoI's own m x m frame, for :func:`class_templates`.
    """
    device = next(model.parameters()).device
    height, width = image.shape[-2:]
    boxes, gt = target["boxes"].to(device), target["masks"].to(device).bool()  # (G, 4), (G, H, W)
    batch, sizes, _, scales = model.preprocess([image.to(device)], None)
    feature_maps = model.backbone(batch)
    roi_features = [feature_maps[k] for k in model.backbone.feature_names][: model.num_roi_levels]
    detections = [{"boxes": boxes * scales[0], "labels": target["labels"].to(device),
                   "scores": boxes.new_ones(len(boxes))}]

    def predicted() -> torch.Tensor:  # (G, H, W) bool, read as model.cfg.mask_head says
        model.predict_masks(roi_features, detections)
        return model.postprocess(detections, scales, [(height, width)], sizes)[0]["masks"][:, 0] >= 0.5

    own = predicted()
    own_cells = detections[0]["mask_probs"] >= 0.5  # (G, m, m), before pasting
    by_readout = []
    chosen = model.cfg.mask_head
    try:
        for readout in softmax_readouts:
            if readout == chosen.softmax_readout:
                by_readout.append(own)
                continue
            model.cfg.mask_head = dataclasses.replace(chosen, softmax_readout=readout)
            by_readout.append(predicted())
    finally:
        model.cfg.mask_head = chosen
    m = model.cfg.mask_head.resolution
    mode = model.cfg.transform.paste_mode
    target_cells = mask_targets(gt, torch.arange(len(gt), device=device), boxes, m)  # (G, m, m) in {0, 1}
    best = paste_masks_in_image(target_cells, boxes, (height, width), mode=mode)[:, 0] >= 0.5
    if cells is not None:
        cells.append((own_cells.cpu(), target_cells.bool().cpu()))

    labels = target["labels"].to(device).float()
    return torch.stack([gt.flatten(1).sum(1).float(), mask_iou(own, gt), mask_iou(best, gt), labels,
                        *(mask_iou(masks, gt) for masks in by_readout)], dim=1).cpu()


def _by_size(rows: torch.Tensor, column: int) -> dict:
    """Mean of ``rows[:, column]`` over all objects and per COCO size (only sizes present)."""
    means = {"all": rows[:, column].mean()}
    for name, (low, high) in SIZES.items():
        pick = (rows[:, 0] >= low) & (rows[:, 0] < high)
        if pick.any():
            means[name] = rows[pick, column].mean()
    return {k: round(float(v), 3) for k, v in means.items()}


def _by_class(rows: torch.Tensor, column: int, class_names: list[str]) -> dict:
    """Mean of ``rows[:, column]`` per class present (``rows[:, 3]`` the label, 1..K)."""
    labels = rows[:, 3].long()
    return {class_names[k]: round(float(rows[labels == k, column].mean()), 3)
            for k in sorted(set(labels.tolist()))}


def class_templates(cells: list[tuple[torch.Tensor, torch.Tensor]], labels: torch.Tensor,
                    class_names: list[str]) -> dict:
    """Does the mask branch draw the object, or its class's average mask?

    ``cells``: ``mask_given_box``'s (predicted, target) pairs of (G_i, m, m) bool grids;
    ``labels``: (sum G_i,) their classes 1..K. A class's *template* is its mean m x m target,
    thresholded at 0.5: the one mask that fits all its objects best on average, and what a head
    that cannot read where the object's pixels are learns first. Per class present: ``own``, the
    predictions' mean m x m IoU with their object's target; ``template``, with the template;
    ``template_vs_own``, the template's with each target (what drawing the template scores);
    ``empty``, the share of predictions with no cell >= 0.5. A head that reads the object has
    ``own`` above ``template``; one that draws the template has ``template`` near 1 and ``own``
    near ``template_vs_own``.
    """
    predicted = torch.cat([p for p, _ in cells])  # (N, m, m) bool
    target = torch.cat([t for _, t in cells])
    result = {}
    for k in sorted(set(labels.tolist())):
        pick = labels == k
        template = (target[pick].float().mean(0) >= 0.5).expand_as(target[pick])
        stats = {"objects": int(pick.sum()), "own": mask_iou(predicted[pick], target[pick]).mean(),
                 "template": mask_iou(predicted[pick], template).mean(),
                 "template_vs_own": mask_iou(template, target[pick]).mean(),
                 "empty": (predicted[pick].flatten(1).sum(1) == 0).float().mean()}
        result[class_names[k]] = {n: v if n == "objects" else round(float(v), 3) for n, v in stats.items()}
    return result


def class_of_found(gt_boxes: torch.Tensor, detections: dict) -> torch.Tensor:
    """What each ground-truth object is named: (G, 2) long rows of (the label of the
    highest-scoring detection that overlaps it at IoU >= 0.5, the label of the best-overlapping
    detection if that IoU >= 0.5); 0 where no detection overlaps it that much (not found).

    The highest-scoring one's label is what COCO's AP rewards. Per-class NMS keeps a box for
    every class that scores, so one object can have several near-identical detections, and the
    best-overlapping one may be a low-scoring duplicate of another class.
    gt_boxes: (G, 4) xyxy; detections: ``boxes`` (D, 4) in the same frame, ``scores``, ``labels``.
    """
    named = torch.zeros(len(gt_boxes), 2, dtype=torch.long)
    if len(gt_boxes) == 0 or len(detections["boxes"]) == 0:
        return named
    iou = box_iou(gt_boxes, detections["boxes"])  # (G, D)
    hit = iou >= 0.5
    found = hit.any(1)
    top = torch.where(hit, detections["scores"][None, :], torch.tensor(-math.inf)).argmax(1)
    best = iou.argmax(1)
    named[found, 0] = detections["labels"][top[found]].long()
    named[found, 1] = detections["labels"][best[found]].long()
    return named


@torch.no_grad()
def diagnose(model: MaskRCNN, dataset, n: int) -> dict:
    """The module docstring's diagnostics on the first ``n`` images of ``dataset`` (with masks)."""
    model.eval()
    found = total = 0
    mask_rows, name_rows, cells = [], [], []
    # a softmax head read every way: how much of its gap to the sigmoid is not finding the
    # object, and how much is its classes splitting the object's pixels
    softmax = model.mask_head is not None and model.cfg.mask_head.loss == "softmax"
    readouts = SOFTMAX_READOUTS if softmax else ()
    device = next(model.parameters()).device
    for index in range(min(n, len(dataset))):
        image, target = dataset[index]
        gt_boxes, gt_labels = target["boxes"], target["labels"]
        if len(gt_boxes) == 0:
            continue
        batch, sizes, _, scales = model.preprocess([image.to(device)], None)
        features = model.backbone(batch)
        proposals, _ = model.rpn([features[k] for k in model.backbone.feature_names], sizes, None)
        best = box_iou(gt_boxes.to(device) * scales[0], proposals[0]).max(1).values
        found += int((best >= 0.5).sum())
        total += len(gt_boxes)
        detections = {k: v.cpu() for k, v in model([image.to(device)])[0].items()}
        area = target["masks"].flatten(1).sum(1).float()
        name_rows.append(torch.cat([area[:, None], gt_labels[:, None].float(),
                                    class_of_found(gt_boxes, detections).float()], dim=1))  # (G, 4)
        if model.mask_head is not None:
            mask_rows.append(mask_given_box(model, image, target, readouts, cells))
    names = torch.cat(name_rows) if name_rows else torch.zeros(0, 4)
    detected = names[names[:, 2] > 0]  # (area, true label, top label, best-IoU label), found objects
    right = torch.stack([detected[:, 0], (detected[:, 2] == detected[:, 1]).float(),
                         (detected[:, 3] == detected[:, 1]).float()], dim=1)  # (area, top right, best right)
    by_size = _by_size(right, 1) if len(detected) else {"all": 0.0}
    confusion = {}  # true class -> {named as: count}, the highest-scoring detection's class
    for truth, named in detected[:, 1:3].long().tolist():
        row = confusion.setdefault(dataset.class_names[truth], {})
        row[dataset.class_names[named]] = row.get(dataset.class_names[named], 0) + 1
    result = {"images": min(n, len(dataset)), "objects": total, "rpn_recall@0.5": found / max(total, 1),
              "detected@0.5": len(detected), "class_right": by_size["all"], "class_right_by_size": by_size,
              "class_right_best_iou": round(float(right[:, 2].mean()), 3) if len(detected) else 0.0,
              "class_confusion": confusion}
    if mask_rows:
        rows = torch.cat(mask_rows)
        result["mask_iou_given_box"] = _by_size(rows, 1)
        result["mask_iou_ceiling"] = _by_size(rows, 2)
        # which shapes the branch fails on: thin parts (bar, crescent, limbs) need finer features
        result["mask_iou_given_box_by_class"] = _by_class(rows, 1, dataset.class_names)
        result["mask_iou_ceiling_by_class"] = _by_class(rows, 2, dataset.class_names)
        # an fc head (Table 2e) draws its class's average mask before it can read the object's
        result["mask_template_by_class"] = class_templates(cells, rows[:, 3].long(), dataset.class_names)
        if readouts:
            result["mask_iou_given_box_by_softmax_readout"] = {
                readout: {"all": _by_size(rows, 4 + j)["all"], **_by_class(rows, 4 + j, dataset.class_names)}
                for j, readout in enumerate(readouts)}
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, choices=list(ablations.RUNS), help="a Table 2 run")
    parser.add_argument("--iters", type=int, default=1000, help="training iterations")
    parser.add_argument("--eval-at", type=int, nargs="*", default=None,
                        help="iterations to evaluate at (default: the last); each a multiple of their gcd")
    parser.add_argument("--batch", type=int, default=4, help="images per batch")
    parser.add_argument("--lr", type=float, default=0.005, help="learning rate (not rescaled)")
    parser.add_argument("--warmup", type=int, default=200, help="linear warm-up iterations")
    parser.add_argument("--decay-at", type=int, nargs="*", default=(), help="lr x0.1 at these iterations")
    parser.add_argument("--weights", default=None,
                        help="pre-trained body (pretrain.py's file or torchvision layout); default: from scratch")
    parser.add_argument("--input-size", type=int, default=None, help="as ablate --input-size")
    parser.add_argument("--softmax-readout", default=None, choices=SOFTMAX_READOUTS,
                        help="a softmax-loss run's test-time readout (MaskHeadConfig.softmax_readout)")
    parser.add_argument("--blocks", default=None, help="blocks per stage of the body, e.g. 2,2,3,2 "
                                                       "(default: the run's stand-in)")
    parser.add_argument("--quick", action="store_true", help="the quick 64 px miniature (tests)")
    parser.add_argument("--data", default=None, help="dataset folder (default: ablate's)")
    parser.add_argument("--val-images", type=int, default=None, help="evaluate on the first N (default: all)")
    parser.add_argument("--diagnose", type=int, default=0,
                        help="RPN recall, class right and the mask branch alone on N images "
                             "(val, or train with --diagnose-split)")
    parser.add_argument("--diagnose-split", default="val", choices=("val", "train"),
                        help="the images --diagnose reads: val (default) or train, to tell "
                             "underfitting from overfitting")
    parser.add_argument("--no-eval", action="store_true",
                        help="skip COCOeval: train (or find the run finished) and --diagnose only")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--threads", type=int, default=1, help="CPU compute threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-from", default=None,
                        help="a checkpoint to start from while --out has none yet, e.g. another probe's "
                             "model_0001500.pth, to branch a schedule (--decay-at) off it")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="also checkpoint every N iterations, so that a probe killed mid-way resumes "
                             "from there (default: only at --eval-at, whose gcd N must divide)")
    parser.add_argument("--out", default=None, help="run folder (default runs/probe/RUN_ITERS_BATCH_SIZE)")
    args = parser.parse_args(argv)
    eval_at = sorted(set(args.eval_at or [args.iters]))
    if eval_at[0] < 1 or eval_at[-1] > args.iters:
        parser.error(f"--eval-at: iterations must lie in 1..{args.iters}, got {eval_at}")
    checkpoint_period = math.gcd(*eval_at)  # a checkpoint at every --eval-at
    if args.checkpoint_every is not None:
        if args.checkpoint_every < 1 or checkpoint_period % args.checkpoint_every:
            parser.error(f"--checkpoint-every {args.checkpoint_every} must divide the gcd of --eval-at "
                         f"({checkpoint_period}), or no checkpoint would exist to evaluate")
        checkpoint_period = args.checkpoint_every
    if args.start_from and not Path(args.start_from).is_file():
        parser.error(f"--start-from: no checkpoint file {args.start_from}")

    torch.set_num_threads(args.threads)
    dataset = "shapes"
    model_cfg = ablations.model_config(ablations.RUNS[args.run], dataset, args.quick, args.input_size)
    size = model_cfg.transform.min_size_test  # the input the model resizes to (default MINI_INPUT_SIZE)
    out = Path(args.out or f"runs/probe/{args.run}_{args.iters}_{args.batch}_{size}")
    if args.softmax_readout:
        if model_cfg.mask_head.loss != "softmax":
            parser.error(f"--softmax-readout: run {args.run} has no softmax mask loss")
        model_cfg.mask_head = dataclasses.replace(model_cfg.mask_head, softmax_readout=args.softmax_readout)
    if args.blocks:
        blocks = tuple(int(b) for b in args.blocks.split(","))
        model_cfg.backbone = dataclasses.replace(
            model_cfg.backbone, resnet=dataclasses.replace(model_cfg.backbone.resnet, depth=blocks))
    data_dir = args.data or ablations.DATA_DIRS["quick" if args.quick else dataset]
    ablations.prepare_data(dataset, args.quick, data_dir)
    train_set, val_set = ablations._datasets(dataset, data_dir)
    train_cfg = dataclasses.replace(
        ablations.train_config(dataset, args.quick, args.seed, str(out), max_iter=args.iters),
        device=args.device, amp="none", num_workers=0, images_per_batch=args.batch,
        reference_batch=args.batch, base_lr=args.lr, warmup_iters=min(args.warmup, args.iters),
        steps=tuple(args.decay_at) or (10**9,), log_period=min(50, args.iters),
        checkpoint_period=checkpoint_period, progress=False)
    if args.start_from and newest_checkpoint(out) is None:  # once out has its own, resume from those
        train_cfg = dataclasses.replace(train_cfg, resume=args.start_from)

    torch.manual_seed(args.seed)
    model = MaskRCNN(model_cfg)
    init = ablations.load_body(model, args.weights, args.run) if args.weights else {"weights": None}
    tic = time.perf_counter()
    trained = train(model, train_set, train_cfg, collate_fn)
    result = {"run": args.run, "init": init, "input_size": size,
              "train_s": round(time.perf_counter() - tic),
              "schedule": {k: getattr(trained["config"], k) for k in
                           ("max_iter", "images_per_batch", "base_lr", "warmup_iters", "steps")},
              "eval": {}}
    model.eval()
    for it in [] if args.no_eval else eval_at:  # checkpoints the training wrote (one at the end too)
        state = torch.load(checkpoint_path(out, it), map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        metrics = evaluate_model(model, val_set, ("bbox", "segm"), 2 if args.quick else 8, args.val_images)
        metrics = {t: {k: round(100 * v, 1) for k, v in m.items()} for t, m in metrics.items()}
        result["eval"][it] = metrics
        print(f"PROBE {args.run} iteration {it}: box AP {metrics['bbox']['AP']:.1f} "
              f"mask AP {metrics['segm']['AP']:.1f}  {json.dumps(metrics)}", flush=True)
    if args.diagnose:
        split = val_set if args.diagnose_split == "val" else train_set
        # val_set loads no masks; train_set flips: read either as the model sees a test image
        with_masks = COCODataset(split.image_dir, split.ann_file, train=False)
        result["diagnose"] = diagnose(model, with_masks, args.diagnose)  # at the last --eval-at (or the end)
        result["diagnose"]["split"] = args.diagnose_split
        print(f"PROBE {args.run} diagnose: {json.dumps(result['diagnose'])}", flush=True)
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
