"""Table 2's runner: every row a valid model, the paper's figures, the statistics, resumption."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mrcnn_edu import ablations
from mrcnn_edu import ablations_report as report
from mrcnn_edu.ablations import ROWS, RUNS, model_config, pending, select_runs, train_config
from mrcnn_edu.checkpoint import load_checkpoint
from mrcnn_edu.engine import scale_for_batch
from mrcnn_edu.model import MaskRCNN


@pytest.mark.parametrize("dataset,quick", [("shapes", False), ("shapes", True), ("coco", False)])
def test_every_table2_run_builds_a_mask_rcnn(dataset, quick):
    for name, spec in RUNS.items():
        cfg = model_config(spec, dataset, quick)
        with torch.device("meta"):  # structure only: no memory, no initialisation cost
            model = MaskRCNN(cfg)
        assert cfg.backbone.features == spec.features, name
        assert (cfg.pooler.kind, cfg.pooler.mode) == (spec.pooler, spec.pool_mode), name
        assert (cfg.mask_head.loss, cfg.mask_head.class_agnostic) == (spec.mask_loss, spec.class_agnostic), name
        assert cfg.mask_head.head == ("mlp" if spec.mlp_dims else ("res5_deconv" if spec.features == "C4" else "fcn"))
        assert len(cfg.mask_head.mlp_dims) == len(spec.mlp_dims) or not spec.mlp_dims
        assert model.backbone.strides[model.backbone.feature_names[0]] == {"C4": 16, "C5": 32, "FPN": 4}[spec.features]


def test_the_101_stand_in_deepens_res4_only_and_the_resnext_one_groups_its_convolutions():
    r50, r101, x101 = (model_config(RUNS[n]).backbone.resnet for n in ("r50_fpn", "r101_fpn", "x101_fpn"))
    assert r50.blocks == (1, 1, 1, 1) and r101.blocks == (1, 1, 3, 1)  # R-50 (3,4,6,3) vs R-101 (3,4,23,3)
    assert r50.groups == 1 and x101.groups > 1 and x101.blocks == r101.blocks
    coco = model_config(RUNS["x101_fpn"], "coco").backbone.resnet
    assert (coco.groups, coco.width_per_group, coco.blocks) == (32, 8, (3, 4, 23, 3))


def test_coco_mode_uses_the_papers_recipe_160k_iterations_lr_002_16_images():
    cfg = train_config("coco", False, seed=1, output_dir="x")
    assert (cfg.base_lr, cfg.max_iter, cfg.steps, cfg.images_per_batch) == (0.02, 160_000, (120_000,), 16)
    assert (cfg.checkpoint_period, cfg.keep_checkpoints) == (5000, 1)  # not 32 files of up to 1.3 GB each
    assert model_config(RUNS["r50_c4"], "coco").num_classes == 80
    with pytest.raises(ValueError, match="quick"):
        model_config(RUNS["r50_c4"], "coco", quick=True)


def test_coco_mode_trains_resnext_with_1_image_per_gpu_at_lr_001_as_the_recipe():
    """§3.1: "With ResNeXt [45], we train with 1 image per GPU and the same number of
    iterations, with a starting learning rate of 0.01" -- the table gave it ResNet's 16 at 0.02."""
    from mrcnn_edu.recipes import get_recipe

    resnext = train_config("coco", False, 0, "x", run="x101_fpn")
    assert (resnext.images_per_batch, resnext.reference_batch, resnext.base_lr) == (8, 8, 0.01)
    assert (resnext.max_iter, resnext.steps) == (160_000, (120_000,))
    recipe = get_recipe("x101_fpn_coco").train
    for key in ("images_per_batch", "reference_batch", "base_lr", "max_iter", "steps", "warmup_iters"):
        assert getattr(resnext, key) == getattr(recipe, key), key
    for name, spec in RUNS.items():
        if not spec.resnext:
            resnet = train_config("coco", False, 0, "x", run=name)
            assert (resnet.images_per_batch, resnet.base_lr, resnet.max_iter) == (16, 0.02, 160_000), name
    # --max-iter and --images-per-batch count from ResNeXt's own 8 images
    short = scale_for_batch(train_config("coco", False, 0, "x", max_iter=1600, images_per_batch=16, run="x101_fpn"))
    assert (short.base_lr, short.max_iter, short.steps) == (pytest.approx(0.02), 800, (600,))
    # the miniature keeps one schedule for every run
    assert train_config("shapes", False, 0, "x", run="x101_fpn") == train_config("shapes", False, 0, "x")


def test_run_one_and_the_table_give_coco_resnext_its_own_schedule(tmp_path, monkeypatch, capsys):
    planned = []
    real = ablations.train_config
    monkeypatch.setattr(ablations, "train_config", lambda *a, **k: planned.append(real(*a, **k)) or planned[-1])
    with pytest.raises(ValueError, match="not found"):  # no COCO here: it stops at the data, planned
        ablations.run_one("x101_fpn", 0, "coco", workdir=tmp_path / "work", data_dir=str(tmp_path / "coco"))
    assert (planned[-1].images_per_batch, planned[-1].base_lr) == (8, 0.01)
    monkeypatch.undo()
    # a COCO table whose ResNet and ResNeXt rows each finished with their own schedule: nothing
    # to train, and neither refused for the other's schedule
    for run in ("r50_fpn", "x101_fpn"):
        ran = scale_for_batch(train_config("coco", False, 0, "", run=run))
        record = dict(_fake_record(run, 0, 30, 50, 30), init={"weights": f"imagenet/{run}.pth"},
                      model_config={"transform": {"min_size_test": 800}},
                      train_config={k: getattr(ran, k) for k in report.SCHEDULE_KEYS})
        report.write_json_atomic(report.result_path(tmp_path / "work", run, 0), record)
    args = ["--dataset", "coco", "--imagenet", str(tmp_path / "imagenet"), "--rows", "r50_fpn,x101_fpn",
            "--seeds", "1", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
            "--data", str(tmp_path / "coco")]
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert ablations.main(args) == 0
    printed = capsys.readouterr().out
    assert "0 to train" in printed
    assert "schedule of r50_fpn: lr 0.02 @ 16 images; 160000 iterations" in printed
    assert "schedule of x101_fpn: lr 0.01 @ 8 images; 160000 iterations" in printed


def test_coco_needs_imagenet_weights_unless_from_scratch_is_asked_for(monkeypatch, capsys, tmp_path):
    """Every row of the paper starts from ImageNet weights; `--dataset coco` without --imagenet
    trained from random ones without a word."""
    seen = []  # the table itself does not run here: main's arguments are what is checked
    monkeypatch.setattr(ablations, "run_table",
                        lambda args: seen.append(args) or {"sessions": [{"failed": []}]})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        ablations.main(["--dataset", "coco"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--dataset coco needs --imagenet DIR" in err and "--from-scratch" in err
    with pytest.raises(SystemExit):
        ablations.main(["--dataset", "coco", "--from-scratch", "--imagenet", "weights"])
    assert "--from-scratch starts from random weights" in capsys.readouterr().err
    assert not seen
    assert ablations.main(["--dataset", "coco", "--from-scratch"]) == 0
    assert (seen[-1].imagenet, seen[-1].pretrain) == (None, False)
    assert ablations.main(["--dataset", "coco", "--imagenet", "weights"]) == 0
    assert (seen[-1].imagenet, seen[-1].pretrain) == ("weights", False)
    assert ablations.main(["--from-scratch"]) == 0 and seen[-1].pretrain is False  # = --no-pretrain
    assert ablations.main([]) == 0 and seen[-1].pretrain is True  # the miniature's default


def test_max_iter_override_keeps_the_lr_steps_at_the_same_fractions():
    cfg = train_config("shapes", False, 0, "x", max_iter=1500)
    full = train_config("shapes", False, 0, "x")
    assert cfg.max_iter == 1500 and cfg.steps == tuple(round(s / 2) for s in full.steps)


def test_images_per_batch_trains_on_the_same_images_by_the_linear_scaling_rule():
    from mrcnn_edu.engine import scale_for_batch

    # the miniature's 3000 x 16 images in batches of 64: lr x4, iterations, steps and warm-up / 4
    ran = scale_for_batch(train_config("shapes", False, 0, "x", images_per_batch=64))
    assert (ran.images_per_batch, ran.base_lr, ran.max_iter, ran.steps, ran.warmup_iters) == (
        64, 0.08, 750, (562, 688), 50)  # 2250 / 4 = 562.5 rounds to even
    assert ran.max_iter * ran.images_per_batch == 3000 * 16
    # with --max-iter (counted in 16-image iterations) first: 1500 x 16 = 375 x 64
    short = scale_for_batch(train_config("shapes", False, 0, "x", max_iter=1500, images_per_batch=64))
    assert (short.max_iter, short.steps, short.warmup_iters) == (375, (281, 344), 50)
    # COCO on one GPU with 2 images: §3.1's 160k x 16 become 1.28M x 2 at lr 0.0025
    coco = scale_for_batch(train_config("coco", False, 0, "x", images_per_batch=2))
    assert (coco.base_lr, coco.max_iter, coco.steps) == (0.0025, 1_280_000, (960_000,))
    assert scale_for_batch(train_config("shapes", False, 0, "x", images_per_batch=16)) == train_config(
        "shapes", False, 0, "x")  # the schedule's own batch changes nothing
    with pytest.raises(ValueError, match="--images-per-batch must be >= 1, got 0"):
        train_config("shapes", False, 0, "x", images_per_batch=0)


def test_a_table_keeps_one_batch_size_and_times_trainings_by_their_own_schedule():
    planned16 = train_config("shapes", True, 0, "x")  # quick: 3 iterations of 2 images
    planned4 = train_config("shapes", True, 0, "x", images_per_batch=4)  # 2 iterations of 4, lr x2
    record = _fake_record("r50_c4", 0, 1, 2, 3)  # finished with the quick schedule's 2 images
    with pytest.raises(ValueError, match="r50_c4 seed 0 finished with max_iter=3 but this command plans max_iter=2"):
        pending(["r50_c4"], 1, {("r50_c4", 0): record}, {"r50_c4": planned4})
    # every key of the schedule counts, the lr steps and the warm-up too (records hold steps as a list)
    planned = ablations.train_config("shapes", True, 0, "x")
    same = dict(record, train_config=dict(record["train_config"], steps=list(planned.steps),
                                          warmup_iters=planned.warmup_iters))
    report.check_same_schedule(same, planned)
    moved = dict(same, train_config=dict(same["train_config"], steps=[1]))
    with pytest.raises(ValueError, match=r"r50_c4 seed 0 finished with steps=\[1\] but this command plans steps=\(2,\)"):
        report.check_same_schedule(moved, planned)
    warmed = dict(same, train_config=dict(same["train_config"], warmup_iters=planned.warmup_iters + 1))
    with pytest.raises(ValueError, match="finished with warmup_iters="):
        report.check_same_schedule(warmed, planned)
    # expected durations come only from trainings of the same schedule on the same device
    other = dict(_fake_record("r50_c4", 1, 1, 2, 3), wall_time_s=50.0)
    other["train_config"] = dict(other["train_config"], max_iter=2, images_per_batch=4)
    elsewhere = dict(_fake_record("r50_c4", 2, 1, 2, 3), wall_time_s=7.0, device="NVIDIA H200")
    done = {("r50_c4", 0): record, ("r50_c4", 1): other, ("r50_c4", 2): elsewhere}
    assert ablations.earlier_durations(done, "cpu", planned16) == {"ResNet-50-C4": [1.0]}
    assert ablations.earlier_durations(done, "cpu", planned4) == {"ResNet-50-C4": [50.0]}
    assert ablations.earlier_durations(done, "NVIDIA H200", planned16) == {"ResNet-50-C4": [7.0]}
    # and the children are told the batch size
    args = ablations.build_parser().parse_args(["--images-per-batch", "64", "--workdir", "w", "--data", "d"])
    command = ablations._child_command("r50_c4", 1, args)
    assert command[command.index("--images-per-batch") + 1] == "64" and "--channels-last" not in command
    args = ablations.build_parser().parse_args(["--channels-last", "--workdir", "w", "--data", "d"])
    assert "--channels-last" in ablations._child_command("r50_c4", 1, args)
    assert ablations.train_config("shapes", False, 0, "", channels_last=True).channels_last
    assert not ablations.train_config("shapes", False, 0, "").channels_last


def test_gain_rows_match_the_papers_printed_gains():
    """The encoded rows reproduce the gains the paper prints in Table 2b and 2d."""
    paper = {row.run: row.paper for row in ROWS}
    sigmoid, softmax = paper["r50_c4"], paper["r50_c4_softmax"]
    assert [round(sigmoid[k] - softmax[k], 1) for k in ("AP", "AP50", "AP75")] == [5.5, 7.1, 6.4]
    align, pool = paper["r50_c5_roialign"], paper["r50_c5_roipool"]
    keys = ("AP", "AP50", "AP75", "APbb", "APbb50", "APbb75")
    assert [round(align[k] - pool[k], 1) for k in keys] == [7.3, 5.3, 10.5, 5.8, 2.6, 9.5]
    # rows sharing a model print the same figures, as in the paper (30.3 in 2a, 2b, 2c)
    for run in {r.run for r in ROWS}:
        figures = [r.paper for r in ROWS if r.run == run and "AP50" in r.paper]
        assert all(f == figures[0] for f in figures), run


def test_rows_select_by_subtable_or_run_name():
    rows, runs = select_runs("2b,r50_c5_roipool")
    assert [r.label for r in rows] == ["softmax", "sigmoid", "class-agnostic (§4.2 text, AP only)", "RoIPool"]
    assert runs == ["r50_c4_softmax", "r50_c4", "r50_c4_agnostic", "r50_c5_roipool"]
    assert len(select_runs(None)[1]) == 15 and len(select_runs(None)[0]) == 18
    with pytest.raises(ValueError, match="2z"):
        select_runs("2z")


def test_mean_std_and_standard_error_on_hand_made_numbers():
    assert report.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std: sqrt((1 + 0 + 1) / 2)
    assert report.format_mean_std([29.0, 31.0, 30.0, 30.0]) == "30.0 ± 0.8"  # sqrt(2 / 3) = 0.816
    assert report.format_mean_std([30.25]) == "30.2"  # one seed: no spread shown
    assert report.format_mean_std([]) == "–"
    # Δ = 2 - 0 = 2, s.e. = sqrt(1 / 3 + 0) for runs [1, 2, 3] and [0, 0, 0]
    delta, se = report.contrast([(1, [1.0, 2.0, 3.0]), (-1, [0.0, 0.0, 0.0])])
    assert delta == 2.0 and se == pytest.approx(math.sqrt(1 / 3), abs=1e-12)
    assert report.format_gain(delta, se) == "+2.0 ± 0.6"
    # a difference of differences: (4 - 1) - (3 - 2) = 2; s.e. sqrt(4 * 1 / 3) with each std 1
    runs = [(1, [3.0, 4.0, 5.0]), (-1, [0.0, 1.0, 2.0]), (-1, [2.0, 3.0, 4.0]), (1, [1.0, 2.0, 3.0])]
    delta, se = report.contrast(runs)
    assert delta == 2.0 and se == pytest.approx(math.sqrt(4 / 3), abs=1e-12)


def every_run(value) -> dict:
    """``value`` for every run name: the per-run plans and iteration counts the runner passes."""
    return {name: value for name in ablations.RUNS}


EVERY_RUN_3000 = every_run(3000)


def _fake_record(run: str, seed: int, ap: float, ap50: float, ap75: float, box: float = 40.0) -> dict:
    """A run record as ``run_one`` writes it, with hand-made COCOeval fractions."""
    segm = {"AP": ap / 100, "AP50": ap50 / 100, "AP75": ap75 / 100, "APs": math.nan, "APm": 0.1, "APl": 0.2}
    bbox = {"AP": box / 100, "AP50": (box + 20) / 100, "AP75": (box + 5) / 100, "APs": 0.1, "APm": 0.1, "APl": 0.1}
    planned = train_config("shapes", True, seed, "x")
    return {"run": run, "seed": seed, "metrics": {"segm": segm, "bbox": bbox}, "wall_time_s": 1.0,
            "device": "cpu", "git_commit": "abc", "train_config": {"max_iter": planned.max_iter,
            "images_per_batch": planned.images_per_batch, "base_lr": planned.base_lr}}


def test_identical_seeds_have_no_spread_and_their_claims_only_a_sign():
    """A float mean of [30.1] * 3 is 30.100000000000005: its std came out 4e-15, not 0, and a
    t-test read that as certainty ("agrees") where the rule says "no spread"."""
    assert report.mean_std([30.1] * 3) == (30.1, 0.0)
    assert report.mean_std([100 * 0.301] * 3)[1] == 0.0  # as percent_metrics gives a COCOeval fraction
    assert report.format_mean_std([30.1] * 3) == "30.1 ± 0.0"
    assert report.contrast([(1, [30.1] * 3), (-1, [27.0] * 3)]) == (pytest.approx(3.1), 0.0)
    judged = {c["claim"]: c for c in report.judge_claims({
        run: [{"AP": ap, "AP50": 0.0, "AP75": 0.0}] * 3
        for run, ap in (("r50_c4", 30.1), ("r50_c4_softmax", 27.0), ("r50_c4_agnostic", 29.5))})}
    assert judged["sigmoid beats softmax (2b)"]["verdict"] == "same direction (no spread: the seeds agree exactly)"
    assert (judged["class-agnostic is close to class-specific (2b text)"]["verdict"]
            == "|Δ| 0.60 < 1 AP, untested (no spread: the seeds agree exactly)")


def test_welch_degrees_of_freedom_and_t_quantiles_by_hand():
    # two runs of 3 seeds with std 1: V = 1/3 + 1/3, df = V² / (2 (1/3)² / 2) = 4
    assert report.welch_df([(1, [30.0, 31.0, 32.0]), (-1, [24.0, 25.0, 26.0])]) == pytest.approx(4.0)
    # stds 1 and 0.5: V = 1/3 + 1/12 = 5/12, df = (5/12)² / ((1/3)² / 2 + (1/12)² / 2) = 50/17 = 2.94
    assert report.welch_df([(1, [30.0, 31.0, 32.0]), (-1, [30.5, 31.0, 31.5])]) == pytest.approx(50 / 17, rel=1e-12)
    assert math.isnan(report.welch_df([(1, [30.0]), (-1, [29.0, 30.0])]))  # one seed: no spread to count
    assert math.isnan(report.welch_df([(1, [30.0, 30.0]), (-1, [29.0, 29.0])]))  # no spread at all
    # printed tables (4 decimals): 2.7764 and 2.1318 at 4 df, 12.7062 at 1, 4.3027 at 2; rounded up
    assert report.t_quantile(4) == 2.78 and report.t_quantile(4, 0.95) == 2.14
    assert report.t_quantile(2) == 4.31 and report.t_quantile(1) == 12.71
    # between entries: linear, above the true quantile (2.67 at 4.5 df) as the curve is convex
    assert report.t_quantile(4.5) == pytest.approx((2.78 + 2.58) / 2) and report.t_quantile(4.5) > 2.67
    assert report.t_quantile(9) == pytest.approx((2.31 + 2.23) / 2)
    # two seeds per run: Welch df 1.6 (RoIWarp avg) asks for about 5.5, not a line from 1 to 2's 7.6
    assert 5.46 < report.t_quantile(1.6) < 5.7
    assert report.t_quantile(0.3) == 12.71 and report.t_quantile(500) == 2.01  # the table's ends


def test_claims_are_judged_against_the_spread_over_seeds():
    def values(aps):
        return [{"AP": ap, "AP50": 0.0, "AP75": 0.0} for ap in aps]

    def verdict(claim_start, **runs):
        judged = report.judge_claims({run: values(aps) for run, aps in runs.items()})
        return next(c for c in judged if c["claim"].startswith(claim_start))

    # Δ = 6, s.e. sqrt(2/3) = 0.82, df 4: t = 7.3 > 2.78
    sigmoid = verdict("sigmoid", r50_c4=[30, 31, 32], r50_c4_softmax=[24, 25, 26])
    assert sigmoid["verdict"] == "agrees" and sigmoid["delta"] == 6.0 and sigmoid["paper_delta"] == 5.5
    assert sigmoid["df"] == pytest.approx(4.0) and sigmoid["n"] == {"r50_c4": 3, "r50_c4_softmax": 3}
    # Δ = 1, s.e. 2.9: same sign, t = 0.34; the reverse: the other sign, inside the noise
    assert verdict("sigmoid", r50_c4=[30, 35, 25], r50_c4_softmax=[28, 29, 30])["verdict"] == "same direction, within noise"
    assert (verdict("sigmoid", r50_c4=[28, 29, 30], r50_c4_softmax=[30, 35, 25])["verdict"]
            == "opposite direction, within noise")
    assert verdict("sigmoid", r50_c4=[24, 25, 26], r50_c4_softmax=[30, 31, 32])["verdict"] == "contradicts"
    assert verdict("sigmoid", r50_c4=[30, 31, 32], r50_c4_softmax=[30, 31, 32])["verdict"] == "no difference"
    # t = 2.5: over the normal 1.96, under Student's 2.78 at 4 degrees of freedom
    assert (verdict("sigmoid", r50_c4=[31.0413, 32.0413, 33.0413], r50_c4_softmax=[29, 30, 31])["verdict"]
            == "same direction, within noise")
    # no spread: the sign and nothing more, however small Δ
    assert (verdict("sigmoid", r50_c4=[30.01] * 3, r50_c4_softmax=[30.0] * 3)["verdict"]
            == "same direction (no spread: the seeds agree exactly)")
    assert verdict("sigmoid", r50_c4=[30.5], r50_c4_softmax=[30.0])["verdict"] == "same direction (no spread: 1 seed)"
    # close: the 90 % interval |Δ| ± t_0.95 s.e. against CLOSE_AP (1 AP)
    tight = verdict("class-agnostic", r50_c4=[30.0, 30.1, 30.2], r50_c4_agnostic=[30.05, 30.15, 30.25])
    assert tight["verdict"] == "agrees (close)"  # 0.05 + 2.13 x 0.082 = 0.22 < 1
    wide = verdict("class-agnostic", r50_c4=[30, 31, 32], r50_c4_agnostic=[30.5, 31.0, 31.5])
    assert wide["verdict"].startswith("undecided")  # 0 ± 2.38 x 0.65 (df 2.94) straddles 1
    far = verdict("class-agnostic", r50_c4=[30.0, 30.1, 30.2], r50_c4_agnostic=[27.0, 27.1, 27.2])
    assert far["verdict"].startswith("disagrees")  # 3 - 0.17 >= 1
    # close, one seed: the gap, said to be untested (a bare "close" would read like a pass)
    assert (verdict("class-agnostic", r50_c4=[30.0], r50_c4_agnostic=[29.9])["verdict"]
            == "|Δ| 0.10 < 1 AP, untested (no spread: 1 seed)")
    assert (verdict("class-agnostic", r50_c4=[30.0], r50_c4_agnostic=[28.5])["verdict"]
            == "|Δ| 1.50 ≥ 1 AP, untested (no spread: 1 seed)")
    assert verdict("RoIWarp is on par", r50_c4_roiwarp_max=[27.0, 27.1, 27.2],
                   r50_c4_roipool=[26.9, 27.0, 27.1])["verdict"] == "agrees (close)"
    # a run not trained, and a run trained whose metric COCOeval could not compute in one seed
    assert verdict("sigmoid", r50_c4=[30, 31, 32])["verdict"] == "not run"
    assert verdict("sigmoid", r50_c4=[math.nan], r50_c4_softmax=[24.0])["verdict"] == "no score"
    partial = verdict("sigmoid", r50_c4=[30, math.nan, 32], r50_c4_softmax=[20, 21, 22])
    assert partial["n"] == {"r50_c4": 2, "r50_c4_softmax": 3} and partial["delta"] == 10.0
    # t = 10 / sqrt(2/2 + 1/3) = 8.7; df (4/3)² / (1² / 1 + (1/3)² / 2) = 32/19 = 1.68, where
    # the table's line gives 6.99
    assert partial["df"] == pytest.approx(32 / 19, rel=1e-12) and partial["verdict"] == "agrees"


def test_every_claim_holds_on_the_papers_own_figures():
    """The claims, evaluated on the paper's numbers: every "greater" difference positive, every
    "close" one under CLOSE_AP (a claim mis-specified against the paper would fail here)."""
    for claim in report.judge_claims({}):
        assert claim["verdict"] == "not run"
        if claim["kind"] == "close":
            assert abs(claim["paper_delta"]) < report.CLOSE_AP, claim
        else:
            assert claim["paper_delta"] > 0, claim


def test_markdown_table_puts_the_papers_figures_beside_mean_and_std(tmp_path):
    records = {}
    for seed, (a, b) in enumerate([(30.0, 25.0), (31.0, 24.0), (32.0, 26.0)]):
        records[("r50_c4", seed)] = _fake_record("r50_c4", seed, a, a + 20, a + 2)
        records[("r50_c4_softmax", seed)] = _fake_record("r50_c4_softmax", seed, b, b + 20, b + 1)
    for record in records.values():
        record["model_config"] = {"transform": {"min_size_test": 384}}
    rows, runs = select_runs("r50_c4_softmax,r50_c4")
    summary = report.write_report(rows, runs, 3, "miniature", "shapes", records, tmp_path / "t.json")
    text = (tmp_path / "t.md").read_text()
    assert summary["input_size"] == [384] and "resized to 384 px (shorter side) in the model" in text
    assert "| paper row | model trained here | n (seeds with AP) |" in text  # what n counts
    assert "| softmax | R-mini-C4, blocks (1,1,1,1), width 16 | 3 | 25.0 ± 1.0 | 45.0 ± 1.0 | 26.0 ± 1.0 | 24.8 | 44.1 | 25.1 |" in text
    assert "| ResNet-50-C4 |" in text and "| 31.0 ± 1.0 | 51.0 ± 1.0 | 33.0 ± 1.0 | 30.3 | 51.2 | 31.5 |" in text
    # the gain row: Δ = 31 - 25 = 6, s.e. = sqrt(1/3 + 1/3) = 0.816
    assert "| **gain (sigmoid − softmax)** | | | +6.0 ± 0.8 | +6.0 ± 0.8 | +7.0 ± 0.8 | +5.5 | +7.1 | +6.4 |" in text
    assert summary["rows"][0]["ours"]["AP"]["values"] == pytest.approx([25.0, 24.0, 26.0])
    stored = json.loads((tmp_path / "t.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert stored["runs"]["r50_c4"]["seeds"]["0"]["metrics"]["segm"]["APs"] is None  # nan -> null
    assert summary["bodies"] == {} and "Pre-trained bodies" not in text  # fakes carry no digest
    assert summary["channels_last"] == 0 and "NHWC" not in text
    for seed in (0, 1):  # two of the trainings ran with --channels-last
        records[("r50_c4", seed)]["train_config"]["channels_last"] = True
    summary = report.write_report(rows, runs, 3, "miniature", "shapes", records, tmp_path / "t.json")
    assert summary["channels_last"] == 2
    assert "Convolutions in NHWC (`--channels-last`) in 2 training(s)" in (tmp_path / "t.md").read_text()
    assert "resumed on another device" not in (tmp_path / "t.md").read_text()
    # a training stopped on one GPU and resumed on another: named, with both
    one = {"from_iteration": 0, "device": "NVIDIA H100", "git_commit": "abc", "torch": "2.11"}
    records[("r50_c4", 1)]["sessions"] = [one, {**one, "from_iteration": 1200, "device": "NVIDIA H200"}]
    records[("r50_c4", 2)]["sessions"] = [one, {**one, "from_iteration": 600}]  # the same setup: not named
    report.write_report(rows, runs, 3, "miniature", "shapes", records, tmp_path / "t.json")
    text = (tmp_path / "t.md").read_text()
    assert ("r50_c4 seed 1: NVIDIA H100 (commit abc, torch 2.11) from iteration 0, NVIDIA H200 (commit abc, "
            "torch 2.11) from iteration 1200.") in text and "seed 2:" not in text


def test_a_session_on_fewer_rows_or_seeds_keeps_the_rest_of_the_table(tmp_path):
    # the committed summary may be the only copy of a lease's results: a later `--rows 2b` or
    # `--seeds 1` session rewrites it, and must keep what it did not run
    records = {(run, seed): _fake_record(run, seed, 30.0 + seed, 50.0, 31.0)
               for run in ("r50_c4", "r50_fpn") for seed in range(3)}
    rows, runs = select_runs("2a,2b")
    full = report.write_report(rows, runs, 3, "miniature", "shapes", records, tmp_path / "t.json")
    for selection, seeds in (("r50_c4", 3), ("2a,2b", 1), ("r50_c4_softmax", 2)):
        rows, runs = select_runs(selection)
        again = report.write_report(rows, runs, seeds, "miniature", "shapes",
                                    report.load_records(tmp_path / "no_workdir", tmp_path / "t.json"), tmp_path / "t.json")
        assert {run: sorted(entry["seeds"]) for run, entry in again["runs"].items() if entry["seeds"]} == \
            {"r50_c4": ["0", "1", "2"], "r50_fpn": ["0", "1", "2"]}, selection
        kept = {(row["run"], row["ours"]["AP"]["n"]) for row in again["rows"]}
        assert {("r50_c4", 3), ("r50_fpn", 3)} <= kept, selection
    trained = {row["label"] for row in full["rows"] if row["ours"]["AP"]["n"]}
    assert {"ResNet-50-C4", "ResNet-50-FPN", "sigmoid"} <= trained and trained <= {row["label"] for row in again["rows"]}
    with pytest.raises(ValueError, match="no rows given"):
        select_runs(" , ")


def test_the_report_says_when_rows_started_from_different_bodies(tmp_path):
    records = {}
    for seed, digest in enumerate(["aaaa", "aaaa", "bbbb"]):  # seed 2: a session that re-made the body
        for run in ("r50_c4", "r50_c4_softmax"):
            records[(run, seed)] = _fake_record(run, seed, 30.0, 50.0, 31.0)
            records[(run, seed)]["init"] = {"weights": "w/ResNet-50.pth", "digest": digest}
    rows, runs = select_runs("r50_c4_softmax,r50_c4")
    summary = report.write_report(rows, runs, 3, "miniature", "shapes", records, tmp_path / "t.json")
    assert summary["bodies"] == {"ResNet-50": {"aaaa": ["r50_c4_softmax seed 0", "r50_c4_softmax seed 1",
                                                        "r50_c4 seed 0", "r50_c4 seed 1"],
                                               "bbbb": ["r50_c4_softmax seed 2", "r50_c4 seed 2"]}}
    assert "**ResNet-50: 2 different pre-trained bodies**" in (tmp_path / "t.md").read_text()
    for run in ("r50_c4", "r50_c4_softmax"):
        records[(run, 2)]["init"]["digest"] = "aaaa"
    report.write_report(rows, runs, 3, "miniature", "shapes", records, tmp_path / "t.json")
    assert "- ResNet-50: all 6 trainings started from the same weights (digest aaaa)." in (tmp_path / "t.md").read_text()
    for record in records.values():  # a --no-pretrain table: said so, not "pre-trained" silence
        record["init"] = {"weights": None}
    report.write_report(rows, runs, 3, "miniature", "shapes", records, tmp_path / "t.json")
    text = (tmp_path / "t.md").read_text()
    assert "- ResNet-50: 6 training(s) started from scratch." in text and "same weights" not in text


def test_the_report_says_when_trainings_ran_on_different_data_even_with_nothing_left_to_train(tmp_path, capsys):
    """run_table checks the data digest only of what it trains: a finished table merged from
    sessions on different data was reported as one."""
    records = {}
    for seed, digest in enumerate(["d1", "d1", "d2"]):
        for run in ("r50_c4", "r50_c4_softmax"):
            records[(run, seed)] = dict(_fake_record(run, seed, 30.0, 50.0, 31.0), data_digest=digest)
    rows, runs = select_runs("r50_c4_softmax,r50_c4")
    summary = report.write_report(rows, runs, 3, "miniature", "shapes", records, tmp_path / "t.json")
    assert summary["data"] == {"d1": ["r50_c4 seed 0", "r50_c4 seed 1", "r50_c4_softmax seed 0",
                                      "r50_c4_softmax seed 1"], "d2": ["r50_c4 seed 2", "r50_c4_softmax seed 2"]}
    assert "**The trainings ran on 2 different data sets**" in (tmp_path / "t.md").read_text()
    assert "2 different data sets (digests d1, d2)" in capsys.readouterr().err
    for run in ("r50_c4", "r50_c4_softmax"):
        records[(run, 2)]["data_digest"] = "d1"
    del records[("r50_c4", 0)]["data_digest"]  # a record from before the digest
    report.write_report(rows, runs, 3, "miniature", "shapes", records, tmp_path / "t.json")
    assert "All 5 trainings with a record of it saw the same data (digest d1); 1 older record(s) do not say." \
        in (tmp_path / "t.md").read_text()
    assert capsys.readouterr().err == ""


def _stored_config(run: str, size: int = 384) -> dict:
    """``run``'s miniature model config as a record holds it."""
    return report.as_stored(dataclasses.asdict(model_config(RUNS[run], "shapes", False, size)))


def _full_schedule(record: dict, max_iter: int = 3, steps: tuple = (2,)) -> dict:
    """``record`` with every key of report.SCHEDULE_KEYS in its train_config (the fakes hold three)."""
    record["train_config"].update(max_iter=max_iter, steps=list(steps), warmup_iters=1)
    return record


def test_claims_over_trainings_of_other_input_sizes_inits_or_schedules_are_not_tested(tmp_path):
    """A `--rows r50_fpn_mlp2 --no-pretrain --input-size 192` session beside a pre-trained 384 px
    table: write_report keeps both, and the FCN-vs-MLP claim compared them as if one ablation."""
    records = {}
    for seed in range(3):
        fcn = _full_schedule(_fake_record("r50_fpn", seed, 30.0 + seed, 50.0, 31.0))
        fcn.update(model_config=_stored_config("r50_fpn", 384),
                   init={"weights": "w/pretrain/ResNet-50.pth", "top1": 0.99, "digest": "aaaa"})
        mlp = _full_schedule(_fake_record("r50_fpn_mlp2", seed, 20.0 + seed, 40.0, 21.0), max_iter=1, steps=(1,))
        mlp.update(model_config=_stored_config("r50_fpn_mlp2", 192), init={"weights": None})
        records[("r50_fpn", seed)], records[("r50_fpn_mlp2", seed)] = fcn, mlp
    summary = report.write_report(*select_runs("r50_fpn_mlp2"), 3, "miniature", "shapes", records, tmp_path / "t.json")
    text = (tmp_path / "t.md").read_text()
    claims = {c["claim"]: c for c in summary["claims"]}
    verdict = claims["FCN beats the 2-fc MLP mask head (2e)"]["verdict"]
    assert verdict == "not comparable (mixed input size, init, schedule)"
    assert ("| FCN beats the 2-fc MLP mask head (2e) | +2.1 | +10.0 ± 0.8 | 3/3 | "
            "not comparable (mixed input size, init, schedule) |") in text
    assert all(not row["mixed"] for row in summary["rows"]) and "**[mixed" not in text  # each row is one kind
    # both sizes, with their runs, not the first one alone
    assert summary["input_size"] == [192, 384] and "resized to 192 px" not in text
    assert ("**Inputs: the trainings ran at 2 sizes** (shorter side, `--input-size`): "
            "192 px: r50_fpn_mlp2; 384 px: r50_fpn.") in text
    assert "warm-up 1 (`--images-per-batch`, `--max-iter`); 3 training(s) of r50_fpn_mlp2." in text
    assert "warm-up 1 (`--images-per-batch`, `--max-iter`); 3 training(s) of r50_fpn." in text
    # the trainings from scratch are named, not left out of "all ... from the same weights"
    assert summary["scratch"] == {"ResNet-50": ["r50_fpn_mlp2 seed 0", "r50_fpn_mlp2 seed 1", "r50_fpn_mlp2 seed 2"]}
    assert ("- ResNet-50: 3 training(s) started from the weights with digest aaaa; **3 training(s) started "
            "from scratch**: r50_fpn_mlp2 seed 0, r50_fpn_mlp2 seed 1, r50_fpn_mlp2 seed 2.") in text
    assert "same weights" not in text


def test_a_row_that_mixes_schedules_or_models_is_marked_and_its_claims_are_not_tested(tmp_path):
    records = {}
    for seed, (a, b) in enumerate([(30.0, 25.0), (31.0, 24.0), (32.0, 26.0)]):
        for run, ap in (("r50_c4", a), ("r50_c4_softmax", b), ("r50_fpn", a + 3)):
            record = _full_schedule(_fake_record(run, seed, ap, ap + 20, ap + 2))
            record["model_config"] = _stored_config(run)
            records[(run, seed)] = record
    rows, runs = select_runs("2a,2b")
    summary = report.write_report(rows, runs, 3, "miniature", "shapes", records, tmp_path / "t.json")
    claims = {c["claim"]: c["verdict"] for c in summary["claims"]}
    # what the runs ablate (the mask loss; C4 vs FPN: features, poolers, heads) is no difference
    assert claims["sigmoid beats softmax (2b)"] == "agrees" and claims["FPN beats C4, ResNet-50 (2a)"] == "agrees"
    assert not any(row["mixed"] for row in summary["rows"]) and not summary["gains"][0]["mixed"]
    records[("r50_c4", 2)]["train_config"]["max_iter"] = 999  # a seed from a session with another --max-iter
    records[("r50_c4_softmax", 1)]["model_config"]["rpn"]["post_nms_top_n_test"] += 1  # a setting no run ablates
    summary = report.write_report(rows, runs, 3, "miniature", "shapes", records, tmp_path / "t.json")
    text = (tmp_path / "t.md").read_text()
    mixed = {row["label"]: row["mixed"] for row in summary["rows"]}
    assert mixed["ResNet-50-C4"] == mixed["sigmoid"] == ["schedule"] and mixed["softmax"] == ["model"]
    assert mixed["ResNet-50-FPN"] == []
    assert "| ResNet-50-C4 **[mixed schedule]** |" in text and "| softmax **[mixed model]** |" in text
    assert "| **gain (sigmoid − softmax)** **[mixed schedule, model]** |" in text
    assert "**[mixed ...]**: the row averages (the gain compares) trainings that differ" in text
    claims = {c["claim"]: c["verdict"] for c in summary["claims"]}
    assert claims["sigmoid beats softmax (2b)"] == "not comparable (mixed schedule, model)"
    assert claims["FPN beats C4, ResNet-50 (2a)"] == "not comparable (mixed schedule)"
    assert claims["deeper: ResNet-101-C4 beats ResNet-50-C4 (2a)"] == "not run"


def test_records_of_a_run_no_longer_in_the_table_are_kept_but_left_out_of_it(tmp_path):
    """A renamed run: the summary may be its records' only copy, so a rewrite keeps them, marked."""
    records = {("r50_c4", 0): _fake_record("r50_c4", 0, 30, 50, 31),
               ("r50_c4_old_name", 0): _fake_record("r50_c4_old_name", 0, 29, 50, 31)}
    rows, runs = select_runs("r50_c4")
    for _ in range(2):  # written, read back, written again
        summary = report.write_report(rows, runs, 1, "miniature", "shapes", records, tmp_path / "t.json")
        records = report.load_records(tmp_path / "no_workdir", tmp_path / "t.json")
        assert set(records) == {("r50_c4", 0), ("r50_c4_old_name", 0)}
    assert summary["runs"]["r50_c4_old_name"]["in_table"] is False
    assert {row["run"] for row in summary["rows"]} == {"r50_c4"}
    assert summary["data"] == {"unrecorded": ["r50_c4 seed 0"]}  # the table's trainings only
    text = (tmp_path / "t.md").read_text()
    assert "## Records not in this table" in text and "(renamed or removed): r50_c4_old_name (1 seed(s))." in text


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_is_dirty_only_when_tracked_code_differs_from_the_commit(tmp_path):
    """The table's own summary (results/), an edited notebook or an untracked file must not make
    the next training's record say its code was not the commit's."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    for path, text in (("pkg/model.py", "x = 1\n"), ("results/README.md", "tables\n"), ("notebooks/09.ipynb", "{}\n")):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text(text)
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "code")
    sha = git("rev-parse", "HEAD")
    assert report.git_commit(tmp_path / "pkg") == sha
    (tmp_path / "results" / "table2_miniature.json").write_text("{}\n")
    (tmp_path / "results" / "README.md").write_text("tables, edited\n")
    (tmp_path / "notebooks" / "09.ipynb").write_text('{"cells": []}\n')
    (tmp_path / "pkg" / "notes.txt").write_text("untracked\n")
    assert report.git_commit(tmp_path / "pkg") == sha
    (tmp_path / "pkg" / "model.py").write_text("x = 2\n")
    assert report.git_commit(tmp_path / "pkg") == sha + "+dirty"
    assert report.git_commit(tmp_path / "results") == sha + "+dirty"  # from any folder of the checkout


def test_weights_digest_tells_bit_identical_weights_apart_from_others():
    state = {"conv.weight": torch.randn(4, 3, 3, 3), "bn.num_batches_tracked": torch.tensor(7),
             "fc.bias": torch.randn(8).bfloat16()}
    same = {key: value.clone() for key, value in reversed(list(state.items()))}  # order does not matter
    assert ablations.weights_digest(state) == ablations.weights_digest(same)
    assert len(ablations.weights_digest(state)) == 16
    nudged = dict(same, **{"conv.weight": same["conv.weight"].clone()})
    nudged["conv.weight"].view(-1)[5] = torch.nextafter(nudged["conv.weight"].view(-1)[5], torch.tensor(math.inf))
    assert ablations.weights_digest(nudged) != ablations.weights_digest(state)  # one ulp
    renamed = {("head." + k if k == "fc.bias" else k): v for k, v in state.items()}
    assert ablations.weights_digest(renamed) != ablations.weights_digest(state)


def test_resumption_skips_finished_entries_and_refuses_another_schedule():
    planned = train_config("shapes", True, 0, "x")
    done = {("r50_c4", 0): _fake_record("r50_c4", 0, 1, 2, 3), ("r50_c4_roipool", 1): _fake_record("r50_c4_roipool", 1, 1, 2, 3)}
    todo = pending(["r50_c4", "r50_c4_roipool"], 2, done, every_run(planned))
    assert todo == [("r50_c4_roipool", 0), ("r50_c4", 1)]  # seed-major, finished ones left out
    # by body first, R-50's runs before R-101's and ResNeXt's, seed-major within each body
    assert pending(["r101_c4", "r50_c4", "x101_fpn", "r50_fpn"], 2, {}, every_run(planned)) == [
        ("r50_c4", 0), ("r50_fpn", 0), ("r50_c4", 1), ("r50_fpn", 1),
        ("r101_c4", 0), ("r101_c4", 1), ("x101_fpn", 0), ("x101_fpn", 1)]
    other = _fake_record("r50_c4", 0, 1, 2, 3)
    other["train_config"]["max_iter"] = 999
    with pytest.raises(ValueError, match="max_iter=999"):
        pending(["r50_c4"], 1, {("r50_c4", 0): other}, every_run(planned))
    # a table is all pre-trained or all from scratch
    scratch, pretrained = _fake_record("r50_c4", 0, 1, 2, 3), _fake_record("r50_c4", 0, 1, 2, 3)
    pretrained["init"] = {"weights": "runs/x/pretrain/ResNet-50.pth", "top1": 0.99}
    assert pending(["r50_c4"], 1, {("r50_c4", 0): pretrained}, every_run(planned), pretrained=True) == []
    assert pending(["r50_c4"], 1, {("r50_c4", 0): scratch}, every_run(planned), pretrained=False) == []
    with pytest.raises(ValueError, match="from pre-trained weights but this command plans from scratch"):
        pending(["r50_c4"], 1, {("r50_c4", 0): pretrained}, every_run(planned), pretrained=False)
    with pytest.raises(ValueError, match="from scratch but this command plans from pre-trained"):
        pending(["r50_c4"], 1, {("r50_c4", 0): scratch}, every_run(planned), pretrained=True)
    # and one model per row: a record of another pooler (or head, or body) is refused
    models = {"r50_c4": report.as_stored(dataclasses.asdict(model_config(RUNS["r50_c4"], "shapes", True)))}
    same = _fake_record("r50_c4", 0, 1, 2, 3)
    same["model_config"] = json.loads(json.dumps(models["r50_c4"]))
    same["model_config"]["a_setting_added_since"] = 1  # a key only one side has is no difference
    assert pending(["r50_c4"], 1, {("r50_c4", 0): same}, every_run(planned), models=models) == []
    same["model_config"]["pooler"]["kind"] = "roi_pool"
    with pytest.raises(ValueError, match=r"another model: pooler.kind='roi_pool' \(planned 'roi_align'\)"):
        pending(["r50_c4"], 1, {("r50_c4", 0): same}, every_run(planned), models=models)


def test_quick_mode_trains_one_row_end_to_end_then_a_rerun_trains_nothing(tiny_shapes, tmp_path, capsys):
    args = ["--table", "2", "--rows", "r50_c4_roipool", "--seeds", "1", "--quick", "--jobs", "1",
            "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work"), "--data", str(tiny_shapes["root"])]
    assert ablations.main(args) == 0
    summary_path = tmp_path / "out" / "table2_quick.json"
    summary = json.loads(summary_path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    record = summary["runs"]["r50_c4_roipool"]["seeds"]["0"]
    assert record["iterations"] == 3 and record["model_config"]["pooler"]["kind"] == "roi_pool"
    assert {"git_commit", "device", "wall_time_s", "train_config"} <= set(record)
    # the body started from its single-shape classifier, pre-trained once before the trainings
    weights = tmp_path / "work" / "pretrain" / "ResNet-50.pth"
    assert record["init"]["weights"] == str(weights) and 0.0 <= record["init"]["top1"] <= 1.0
    assert record["init"]["tensors"] > 0 and "pre-trained on single shapes" in summary["sessions"][0]["init"]
    body = torch.load(weights, map_location="cpu", weights_only=True)["model"]
    assert record["init"]["digest"] == ablations.weights_digest(body)
    assert summary["bodies"] == {"ResNet-50": {record["init"]["digest"]: ["r50_c4_roipool seed 0"]}}
    pretrained_at = weights.stat().st_mtime_ns
    assert set(record["metrics"]) == {"bbox", "segm"}
    assert all(0.0 <= record["metrics"]["segm"][k] <= 1.0 for k in ("AP", "AP50", "AP75"))
    row = next(r for r in summary["rows"] if r["label"] == "RoIPool (max)")
    assert row["ours"]["AP"]["n"] == 1 and row["paper"]["AP"] == 26.9
    assert "Quick mode" in summary_path.with_suffix(".md").read_text()
    # the schedule as it ran, from QUICK_SCHEDULE: 3 iterations of 2 images, lr 0.01, ÷10 at 2
    assert summary["schedules"] == [{"max_iter": 3, "images_per_batch": 2, "base_lr": 0.01, "steps": [2],
                                     "warmup_iters": 1, "trainings": 1, "runs": ["r50_c4_roipool"]}]
    assert row["mixed"] == []  # a real record compares with itself: nothing flagged
    assert ("Schedule: 3 iterations of 2 images (6 images), lr 0.01, ÷10 at 2, warm-up 1"
            in summary_path.with_suffix(".md").read_text())
    assert summary["input_size"] == [64]  # quick: the tiny set's own size
    per_run = tmp_path / "work" / "results" / "r50_c4_roipool__seed0.json"
    before = per_run.stat().st_mtime_ns
    capsys.readouterr()
    assert ablations.main(args) == 0  # resumes: everything is there already
    assert "0 to train" in capsys.readouterr().out
    assert per_run.stat().st_mtime_ns == before and weights.stat().st_mtime_ns == pretrained_at
    assert len(json.loads(summary_path.read_text())["sessions"]) == 2
    with pytest.raises(ValueError, match="from scratch"):  # the same table from scratch: refused
        ablations.main(args + ["--no-pretrain"])
    # a body cached with another pre-training (e.g. an older MINI_PRETRAIN) is refused, not reused
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    saved["info"]["config"]["min_size_frac"] = 0.5
    torch.save(saved, weights)
    per_run.unlink()  # (and its copy in the summary) so that there is a training to start from it
    summary_path.unlink()
    with pytest.raises(ValueError, match=r"ResNet-50.pth was pre-trained with min_size_frac=0.5 \(planned"):
        ablations.main(args)


def test_may_start_expects_the_slowest_finished_training():
    assert ablations.may_start(1e6, None, [5.0])  # no deadline
    assert ablations.may_start(10.0, 60.0, [])  # nothing finished yet: no estimate
    assert ablations.may_start(10.0, 60.0, [20.0, 45.0])  # 10 + 45 < 60
    assert not ablations.may_start(20.0, 60.0, [20.0, 45.0])  # 20 + 45 > 60


def test_deadline_stops_running_trainings_and_leaves_the_rest_for_the_next_session(
        tiny_shapes, tmp_path, capsys):
    args = ["--table", "2", "--rows", "r50_c4_roipool", "--seeds", "2", "--quick", "--jobs", "1",
            "--deadline", "0.5", "--no-pretrain", "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work"),
            "--data", str(tiny_shapes["root"])]
    assert ablations.main(args) == 0  # running out of time is not a failure
    out = capsys.readouterr().out
    assert "r50_c4_roipool seed 0: stopped at the deadline, before its first iteration" in out
    assert "2 training(s) left for the next session" in out
    summary = json.loads((tmp_path / "out" / "table2_quick.json").read_text())
    assert summary["sessions"][-1]["left"] == [["r50_c4_roipool", 0], ["r50_c4_roipool", 1]]
    assert summary["sessions"][-1]["trained"] == 0 and summary["runs"]["r50_c4_roipool"]["seeds"] == {}
    assert not list((tmp_path / "work" / "results").glob("*.json"))  # nothing half-written
    assert "2 left at the deadline" in (tmp_path / "out" / "table2_quick.md").read_text()


def test_a_session_starts_no_training_that_earlier_sessions_say_it_cannot_finish(tiny_shapes, tmp_path, capsys):
    # session 1 trains one row and records its wall time on this device; session 2 has half
    # that time left: it starts nothing (and pre-trains no body for it) rather than kill it
    base = ["--table", "2", "--seeds", "1", "--quick", "--jobs", "1", "--out", str(tmp_path / "out"),
            "--workdir", str(tmp_path / "work"), "--data", str(tiny_shapes["root"])]
    assert ablations.main(base + ["--rows", "r50_c4_roipool"]) == 0
    record = json.loads((tmp_path / "work" / "results" / "r50_c4_roipool__seed0.json").read_text())
    capsys.readouterr()
    assert ablations.main(base + ["--rows", "r50_c4_roipool,r101_c4",
                                  "--deadline", str(record["wall_time_s"] / 2)]) == 0
    out = capsys.readouterr().out
    assert "1 to train" in out and "1 training(s) left for the next session" in out
    assert "stopped at the deadline" not in out and "pre-training" not in out
    assert not (tmp_path / "work" / "pretrain" / "ResNet-101.pth").exists()
    assert json.loads((tmp_path / "out" / "table2_quick.json").read_text())["sessions"][-1]["left"] == [["r101_c4", 0]]


def test_may_start_counts_only_what_a_resumed_training_has_left():
    assert not ablations.may_start(20.0, 60.0, [50.0])  # 20 + 50 > 60
    assert ablations.may_start(20.0, 60.0, [50.0], remaining=0.4)  # 20 + 0.4 x 50 < 60
    # before any training finished, stopped ones tell the pace: 500 of 3000 steps in 100 s
    assert ablations.durations_at_pace([(500, 100.0), (0, 0.0)], 3000) == [600.0]


def test_trainings_longer_than_a_session_start_only_as_many_as_may_overrun_and_can_be_carried():
    args = ablations.build_parser().parse_args(["--may-overrun", "1", "--overrun-max-mib", "15"])
    todo = [("r50_c5_roialign", 0), ("r50_c4", 0), ("r50_fpn", 0)]
    saved = {key: 0 for key in todo}
    # a lease of 500 s, trainings of 2000 s: none will finish; the first that may overrun and
    # whose checkpoint can come back (C5's 75 MiB cannot) starts
    assert ablations.checkpoint_mib("r50_c5_roialign") > 15 > ablations.checkpoint_mib("r50_c4")
    assert ablations.next_to_start(todo, saved, EVERY_RUN_3000, 10.0, 500.0, {"ResNet-50-C4": [2000.0]}, 0, args) == (("r50_c4", 0), True)
    assert ablations.next_to_start(todo, saved, EVERY_RUN_3000, 10.0, 500.0, {"ResNet-50-C4": [2000.0]}, 1,
                                   args) is None  # one at a time
    # one resumed 4/5 of the way (400 s left) is expected to finish: it starts whatever overruns
    saved[("r50_fpn", 0)] = 2400
    assert ablations.next_to_start(todo, saved, EVERY_RUN_3000, 10.0, 500.0, {"ResNet-50-C4": [2000.0]}, 1,
                                   args) == (("r50_fpn", 0), False)
    # without --may-overrun (the default) nothing expected to overrun starts
    plain = ablations.build_parser().parse_args([])
    assert ablations.next_to_start(todo[:2], saved, EVERY_RUN_3000, 10.0, 500.0, {"ResNet-50-C4": [2000.0]}, 0, plain) is None
    assert ablations.next_to_start(todo, saved, EVERY_RUN_3000, 10.0, None, {"ResNet-50-C4": [2000.0]}, 0, plain) == (todo[0], False)


def test_a_lease_without_an_estimate_starts_only_what_it_can_carry_and_nothing_too_late():
    args = ablations.build_parser().parse_args(["--may-overrun", "1", "--overrun-max-mib", "15"])
    todo, saved = [("r50_c4", 0), ("r50_c4", 1)], {("r50_c4", 0): 0, ("r50_c4", 1): 0}
    # no duration yet in a first lease, whose checkpoints must travel: each counts as overrunning
    assert ablations.next_to_start(todo, saved, EVERY_RUN_3000, 10.0, 500.0, {}, 0, args) == (("r50_c4", 0), True)
    assert ablations.next_to_start(todo, saved, EVERY_RUN_3000, 10.0, 500.0, {}, 1, args) is None
    assert ablations.next_to_start(todo, saved, EVERY_RUN_3000, 10.0, None, {}, 1, args) == (("r50_c4", 0), False)
    # on a machine that keeps its checkpoints, a stopped training loses nothing: anything may start
    local = ablations.build_parser().parse_args([])
    assert ablations.next_to_start(todo, saved, EVERY_RUN_3000, 10.0, 500.0, {}, 0, local) == (("r50_c4", 0), False)
    # under a minute to the deadline, nothing starts, whatever it would take
    quick = {"ResNet-50-C4": [10.0]}
    assert ablations.next_to_start(todo, saved, EVERY_RUN_3000, 450.0, 500.0, quick, 0, args, min_start=60.0) is None
    assert ablations.next_to_start(todo, saved, EVERY_RUN_3000, 430.0, 500.0, quick, 0, args, min_start=60.0) == (todo[0], False)
    # a resumed training pays its start-up and evaluation in full: 20 + 40 + 0.4 x (50 - 40) > 60
    assert ablations.may_start(20.0, 60.0, [50.0], remaining=0.4)
    assert not ablations.may_start(20.0, 60.0, [50.0], remaining=0.4, overhead=40.0)
    assert ablations.durations_at_pace([(500, 100.0)], 3000, overhead=40.0) == [640.0]


def test_each_training_is_expected_to_take_as_long_as_its_own_family_not_the_fastest_one():
    # the poolers and mask losses of Table 2b/c share a family; backbones and MLP heads do not
    assert ablations.cost_family("r50_c4_roipool") == ablations.cost_family("r50_c4_softmax") == "ResNet-50-C4"
    assert len({ablations.cost_family(name) for name in ablations.RUNS}) == 7
    assert ablations.cost_family("r50_fpn_mlp2") == ablations.cost_family("r50_fpn_mlp3") != "ResNet-50-FPN"
    # C4's trainings took 100 s, ResNeXt's 400 s: with 200 s left, C4 may start and ResNeXt may not
    durations = {"ResNet-50-C4": [90.0, 100.0], "ResNeXt-101-FPN": [400.0]}
    args = ablations.build_parser().parse_args([])
    todo = [("x101_fpn", 0), ("r50_c4_roipool", 1)]
    saved = {key: 0 for key in todo}
    assert ablations.expected_durations(durations, "r50_c4_softmax") == [90.0, 100.0]
    assert ablations.next_to_start(todo, saved, EVERY_RUN_3000, 300.0, 500.0, durations, 0, args) == (("r50_c4_roipool", 1), False)
    # a family none of which has a duration yet goes by the slowest of all, not by C4's alone
    assert ablations.expected_durations(durations, "r101_fpn") == [90.0, 100.0, 400.0]
    assert ablations.next_to_start([("r101_fpn", 0)], {("r101_fpn", 0): 0}, EVERY_RUN_3000, 300.0, 500.0, durations, 0,
                                   args) is None
    # and a session's durations are read per family from the records of finished trainings
    planned = ablations.train_config("shapes", True, 0, "x")
    done = {(name, 0): dict(_fake_record(name, 0, 1, 2, 3), wall_time_s=seconds)
            for name, seconds in [("r50_c4", 5.0), ("r50_c4_roipool", 6.0), ("x101_fpn", 40.0)]}
    assert ablations.earlier_durations(done, "cpu", planned) == {"ResNet-50-C4": [5.0, 6.0], "ResNeXt-101-FPN": [40.0]}


def test_stop_at_deadline_lets_an_evaluating_training_finish_and_kills_the_rest_after_their_grace():
    ignores = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
               "time.sleep(float(sys.argv[1]))")
    evaluating, stuck = (subprocess.Popen([sys.executable, "-c", ignores, seconds], stdout=subprocess.PIPE, text=True)
                         for seconds in ("1.5", "60"))
    for child in (evaluating, stuck):
        assert child.stdout.readline().strip() == "ready"  # its SIG_IGN is in place
    ablations.stop_at_deadline({"a": (evaluating,), "b": (stuck,)}, grace=0.3, finishing={"a"}, finish_grace=10.0)
    assert evaluating.returncode == 0  # it ended on its own, inside its finish grace
    assert stuck.returncode == -signal.SIGKILL  # ignored SIGTERM, outlived its grace


def test_sigterm_to_the_table_stops_its_trainings_and_still_writes_the_report(tiny_shapes, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    table = subprocess.Popen([sys.executable, "-m", "mrcnn_edu", "ablate", "--table", "2", "--rows", "r50_c4",
                              "--seeds", "1", "--quick", "--jobs", "1", "--max-iter", "100000", "--no-pretrain",
                              "--out", str(out), "--workdir", str(work), "--data", str(tiny_shapes["root"]),
                              # the mechanism, not the 5 s: a step on a loaded CI machine can take that
                              "--terminated-grace", "60"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    metrics = work / "train" / "r50_c4__seed0" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while table.poll() is None and time.monotonic() < deadline and not (
            metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.1)
    table.send_signal(signal.SIGTERM)  # e.g. `timeout` around the table ran out: the parent alone here
    output = table.communicate(timeout=120)[0]
    assert table.returncode == 0, output
    assert "r50_c4 seed 0: stopped by SIGTERM to the table, saved at iteration" in output
    session = json.loads((out / "table2_quick.json").read_text())["sessions"][-1]
    assert session["left"] == [["r50_c4", 0]] and session["saved"]["r50_c4__seed0"] >= 2
    assert session["images_per_batch"] == 2 and session["channels_last"] is False  # what resumes it
    with pytest.raises(ValueError, match="--deadline and --deadline-at both"):
        ablations.main(["--deadline", "5", "--deadline-at", "1e10"])
    assert ablations.build_parser().parse_args([]).terminated_grace == ablations.TERMINATED_GRACE_S == 5.0


def test_evaluation_after_training_ignores_the_deadlines_sigterm(tiny_shapes, tmp_path, monkeypatch):
    import mrcnn_edu.predict

    def evaluate(model, dataset, iou_types, batch_size):  # the deadline's SIGTERM comes mid-evaluation
        os.kill(os.getpid(), signal.SIGTERM)
        return {"bbox": {"AP": 0.1}, "segm": {"AP": 0.1}}

    monkeypatch.setattr(mrcnn_edu.predict, "evaluate_model", evaluate)
    before = signal.getsignal(signal.SIGTERM)
    record = ablations.run_one("r50_c4", 0, quick=True, workdir=tmp_path / "work", data_dir=str(tiny_shapes["root"]))
    assert record["metrics"]["segm"]["AP"] == 0.1 and (tmp_path / "work" / "results" / "r50_c4__seed0.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_training_stopped_at_the_deadline_saves_its_step_and_the_next_session_resumes_it(
        tiny_shapes, tmp_path, capsys):
    work, data = tmp_path / "work", str(tiny_shapes["root"])
    args = ablations.build_parser().parse_args(["--quick", "--max-iter", "12", "--workdir", str(work),
                                                "--data", data, "--no-pretrain"])
    args.pretrain, args.imagenet = False, None
    metrics = work / "train" / "r50_c4__seed0" / "metrics.jsonl"
    child = subprocess.Popen(ablations._child_command("r50_c4", 0, args), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    # the deadline falls inside the loop: after its second logged iteration (quick logs each one)
    while child.poll() is None and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    ablations.stop_at_deadline({("r50_c4", 0): (child,)})
    output = child.stdout.read()
    assert child.returncode == ablations.STOPPED_EXIT, output
    planned = train_config("shapes", True, 0, "", max_iter=12)
    at, seconds = ablations.saved_progress(work, "r50_c4", 0, planned)
    assert 2 <= at < 12 and f"stopped by SIGTERM after {at} iterations" in output and seconds > 0
    # a checkpoint of another schedule is not resumed into this one
    with pytest.raises(ValueError, match=r"model_\d{7}.pth was trained with max_iter=12 \(planned 6\)"):
        ablations.saved_progress(work, "r50_c4", 0, train_config("shapes", True, 0, "", max_iter=6))
    # the next session (here: the same machine) starts it first, from there
    assert ablations.main(["--table", "2", "--rows", "r50_c4,r50_c4_roipool", "--seeds", "1", "--quick",
                           "--jobs", "1", "--max-iter", "12", "--no-pretrain", "--out", str(tmp_path / "out"),
                           "--workdir", str(work), "--data", data]) == 0
    out = capsys.readouterr().out
    assert "2 to train (1 resuming from a checkpoint)" in out
    assert out.index("r50_c4 seed 0: done") < out.index("r50_c4_roipool seed 0: done")
    record = json.loads((work / "results" / "r50_c4__seed0.json").read_text())
    assert record["resumed_from"] == at and record["iterations"] == 12
    # both sessions are in the record, the first one's too (another GPU or commit, between leases)
    assert [s["from_iteration"] for s in record["sessions"]] == [0, at]
    assert all(s["git_commit"] == record["git_commit"] and s["torch"] == record["torch"] for s in record["sessions"])
    assert f"training iterations {at}..12" in (work / "logs" / "r50_c4__seed0.log").read_text()
    # the first session's loop time is in the record's: more than the resumed part alone
    first = load_checkpoint(work / "train" / "r50_c4__seed0" / f"model_{at:07d}.pth")["train_seconds"]
    assert record["train_time_s"] > first > 0


def test_pretrain_is_the_miniatures_and_refused_with_coco_or_imagenet_weights():
    with pytest.raises(ValueError, match="--pretrain is the miniature's"):
        ablations.main(["--dataset", "coco", "--pretrain"])
    with pytest.raises(ValueError, match="--pretrain is the miniature's"):
        ablations.main(["--imagenet", "somewhere", "--pretrain"])


def test_input_size_resizes_the_miniature_and_a_table_keeps_one_size(tmp_path):
    cfg = model_config(RUNS["r50_c4"], "shapes", input_size=384)
    assert cfg.transform.min_size_train == (384,) and cfg.transform.min_size_test == 384
    assert cfg.transform.max_size == 768
    default = model_config(RUNS["r50_c4"], "shapes").transform  # the 192 px set, upsampled 2x
    assert default.min_size_test == ablations.MINI_INPUT_SIZE == 2 * ablations.MINI_IMAGE_SIZE
    assert model_config(RUNS["r50_c4"], "shapes", input_size=192).transform.min_size_train == (192,)
    assert model_config(RUNS["r50_c4"], "shapes", quick=True).transform.min_size_test == 64
    with pytest.raises(ValueError, match="--input-size is the miniature's"):
        model_config(RUNS["r50_c4"], "coco", input_size=384)
    with pytest.raises(ValueError, match="--input-size must be >= 16"):
        model_config(RUNS["r50_c4"], "shapes", input_size=8)
    # a finished record made at 64 px (quick's size) and a command planning 96 px: refused, by name
    record = _fake_record("r50_c4", 0, 1, 2, 3)
    record["model_config"] = {"transform": {"min_size_test": 64}}
    report.write_json_atomic(report.result_path(tmp_path / "work", "r50_c4", 0), record)
    args = ["--rows", "r50_c4", "--seeds", "1", "--quick", "--out", str(tmp_path / "out"),
            "--workdir", str(tmp_path / "work"), "--data", str(tmp_path / "data")]
    with pytest.raises(ValueError, match="r50_c4 seed 0 was trained on 64 px inputs but this command plans 96 px"):
        ablations.main(args + ["--input-size", "96"])
    assert not (tmp_path / "data").exists()  # refused before anything was generated or trained


def _quick_table(tiny_shapes, tmp_path, *extra):
    return ["--table", "2", "--rows", "r50_c4_roipool", "--seeds", "1", "--quick", "--jobs", "1",
            "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work"),
            "--data", str(tiny_shapes["root"]), *extra]


def test_a_training_that_fails_in_two_sessions_is_not_tried_again_unless_asked(tiny_shapes, tmp_path,
                                                                                monkeypatch, capsys):
    # a deterministic failure would otherwise take a job slot (and be packed for the next lease)
    # in every session
    launched = []
    monkeypatch.setattr(ablations, "_child_command", lambda run, seed, args: launched.append((run, seed)) or
                        [sys.executable, "-c", "import sys; sys.exit(3)"])
    args = _quick_table(tiny_shapes, tmp_path, "--no-pretrain")
    assert ablations.main(args) == 1 and ablations.main(args) == 1  # two sessions, two failures
    assert launched == [("r50_c4_roipool", 0)] * 2
    capsys.readouterr()
    assert ablations.main(args) == 0 and len(launched) == 2  # the third session does not start it
    out = capsys.readouterr().out
    assert "r50_c4_roipool seed 0: failed in 2 earlier sessions; not tried again" in out
    summary = json.loads((tmp_path / "out" / "table2_quick.json").read_text())
    assert summary["sessions"][-1]["given_up"] == [["r50_c4_roipool", 0]]
    assert summary["sessions"][-1]["left"] == []  # so the lease script does not pack it
    assert "given up after failing in earlier sessions" in (tmp_path / "out" / "table2_quick.md").read_text()
    assert ablations.main(args + ["--retry-failed"]) == 1 and len(launched) == 3
    assert ablations.main(args + ["--max-failures", "4"]) == 1 and len(launched) == 4


def test_an_error_in_the_table_stops_its_trainings_and_still_writes_the_report(tiny_shapes, tmp_path, monkeypatch):
    children = []

    marker = f"sleeper {tmp_path}"  # pgrep must see this test's children only, not another run's

    def sleeper(run, seed, args):
        children.append(run)
        return [sys.executable, "-c", f"import time; time.sleep(120)  # {marker}"]

    real_sleep = time.sleep

    def interrupted(seconds):
        if children and not interrupted.done:  # Ctrl-C, or any bug in the loop, while a training runs
            interrupted.done = True
            raise KeyboardInterrupt
        real_sleep(seconds)
    interrupted.done = False

    monkeypatch.setattr(ablations, "_child_command", sleeper)
    monkeypatch.setattr(ablations.time, "sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ablations.main(_quick_table(tiny_shapes, tmp_path, "--no-pretrain"))
    monkeypatch.undo()
    assert children == ["r50_c4_roipool"]
    leftover = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    assert not leftover, f"training processes left running: {leftover}"
    session = json.loads((tmp_path / "out" / "table2_quick.json").read_text())["sessions"][-1]
    assert session["left"] == [["r50_c4_roipool", 0]]  # stopped, resumable by the next session


def _fake_pretraining(monkeypatch, code: str):
    """Pre-training children that run ``code`` instead, with the real file and log paths."""
    real = ablations.pretrain_command

    def fake(name, args):
        command, out, log_path = real(name, args)
        return [sys.executable, "-c", code], out, log_path
    monkeypatch.setattr(ablations, "pretrain_command", fake)


def test_a_body_whose_pretraining_fails_fails_its_trainings_and_the_table_carries_on(tiny_shapes, tmp_path,
                                                                                  monkeypatch, capsys):
    _fake_pretraining(monkeypatch, "import sys; print('out of memory'); sys.exit(1)")
    assert ablations.main(_quick_table(tiny_shapes, tmp_path)) == 1
    assert ("pre-training ResNet-50 failed (exit 1); see " in (out := capsys.readouterr().out)
            and "pretrain_ResNet-50.log: its 1 training(s) count as failed" in out)
    assert (tmp_path / "work" / "logs" / "pretrain_ResNet-50.log").read_text() == "out of memory\n"
    session = json.loads((tmp_path / "out" / "table2_quick.json").read_text())["sessions"][-1]
    assert session["failed"] == [["r50_c4_roipool", 0]] and session["trained"] == 0


def test_a_table_refuses_to_add_trainings_on_other_data_than_its_records(tiny_shapes, tmp_path, monkeypatch):
    # e.g. a later lease's fresh machine generating the shapes with a newer generator: its
    # seeds would be averaged with the earlier ones as if they were one experiment
    launched = []
    monkeypatch.setattr(ablations, "_child_command", lambda run, seed, args: launched.append(run) or
                        [sys.executable, "-c", "import sys; sys.exit(3)"])
    data = str(tiny_shapes["root"])
    digest = ablations.data_digest("shapes", data)
    assert len(digest) == 16 and digest == ablations.data_digest("shapes", data)  # a pure function of the files
    # the shapes' digest is what made them (generator version, seed, counts, sizes), not bytes
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    val = copy / "annotations" / "instances_val.json"
    meta = json.loads(val.read_text())
    meta["annotations"][0]["area"] += 0.01  # a last-digit change of another machine's rounding
    val.write_text(json.dumps(meta))
    assert ablations.data_digest("shapes", str(copy)) == digest
    meta["info"]["generator_version"] -= 1
    val.write_text(json.dumps(meta))
    assert ablations.data_digest("shapes", str(copy)) != digest
    results = tmp_path / "work" / "results"
    for seed, record_digest in ((0, digest), (1, "0123456789abcdef")):
        record = dict(_fake_record("r50_c4", seed, 30.0, 50.0, 30.0), data_digest=record_digest)
        report.write_json_atomic(report.result_path(tmp_path / "work", "r50_c4", seed), record)
    assert len(list(results.glob("*.json"))) == 2
    with pytest.raises(ValueError, match=rf"r50_c4 seed 1 were trained on other data than {data} holds "
                                         rf"\(data digest {digest}\)"):
        ablations.main(_quick_table(tiny_shapes, tmp_path, "--no-pretrain"))
    assert launched == []
    # a training stopped on other data is not resumed on this one either
    started = tmp_path / "work" / "train" / "r50_c4_roipool__seed0"
    ablations.check_data_digest(started, "fedcba9876543210")
    with pytest.raises(ValueError, match="r50_c4 seed 1, r50_c4_roipool seed 0 \\(stopped at iteration 0\\)"):
        ablations.main(_quick_table(tiny_shapes, tmp_path, "--no-pretrain"))
    with pytest.raises(ValueError, match="was trained on other data \\(digest fedcba9876543210\\)"):
        ablations.check_data_digest(started, digest)  # run-one's own check, in the child
    (started / "data_digest").unlink()
    # the same records on the same data (seed 1's digest agreeing) let the table go on
    record["data_digest"] = digest
    report.write_json_atomic(report.result_path(tmp_path / "work", "r50_c4", 1), record)
    assert ablations.main(_quick_table(tiny_shapes, tmp_path, "--no-pretrain")) == 1  # the stand-in child fails
    assert launched == ["r50_c4_roipool"]


def test_a_shapes_set_of_an_older_generator_is_kept_with_a_warning(tiny_shapes, tmp_path, capsys):
    root = tmp_path / "shapes"
    shutil.copytree(tiny_shapes["root"], root)
    ablations.prepare_data("shapes", True, str(root))
    assert "WARNING" not in capsys.readouterr().out  # this version's set: nothing to say
    val = root / "annotations" / "instances_val.json"
    data = json.loads(val.read_text())
    del data["info"]["generator_version"]  # as version 1 wrote it
    val.write_text(json.dumps(data))
    ablations.prepare_data("shapes", True, str(root))
    assert "was written by shapes generator version 1; this code writes version 2" in capsys.readouterr().out
    assert json.loads(val.read_text()) == data  # kept, not rewritten


def _cached_body(tmp_path, name):
    """A body file that passes check_pretrained_body for the quick table (its weights unused)."""
    path = tmp_path / "work" / "pretrain" / f"{name}.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "info": {"config": dataclasses.asdict(ablations.pretrain_config(quick=True))}}, path)
    return path


def test_trainings_go_on_while_a_body_is_pre_trained_and_the_deadline_stops_both(tiny_shapes, tmp_path,
                                                                                  monkeypatch, capsys):
    # ResNet-50 is cached, ResNet-101's pre-training runs long: the R-50 training is started,
    # and its end seen, while it runs (the loop once waited on the pre-training); at the
    # deadline the pre-training is stopped too, writing no body, and nothing is left running
    _cached_body(tmp_path, "ResNet-50")
    _fake_pretraining(monkeypatch, f"import time; time.sleep(120)  # pretrain-one {tmp_path}")
    monkeypatch.setattr(ablations, "_child_command",
                        lambda run, seed, args: [sys.executable, "-c", "import sys; sys.exit(3)"])
    args = _quick_table(tiny_shapes, tmp_path, "--jobs", "2", "--deadline", "4")
    args[args.index("r50_c4_roipool")] = "r50_c4_roipool,r101_c4"
    assert ablations.main(args) == 1  # the R-50 training failed
    out = capsys.readouterr().out
    order = [out.index(line) for line in ("pre-training the ResNet-101 stand-in", "r50_c4_roipool seed 0: FAILED",
                                          "pre-training ResNet-101: stopped at the deadline")]
    assert order == sorted(order), out
    assert not (tmp_path / "work" / "pretrain" / "ResNet-101.pth").exists()
    leftover = subprocess.run(["pgrep", "-f", f"pretrain-one {tmp_path}"], capture_output=True, text=True).stdout.split()
    assert not leftover, f"pre-training left running: {leftover}"
    session = json.loads((tmp_path / "out" / "table2_quick.json").read_text())["sessions"][-1]
    assert session["failed"] == [["r50_c4_roipool", 0]] and session["left"] == [["r101_c4", 0]]


def test_one_pre_training_at_a_time_and_it_holds_a_job_slot(tiny_shapes, tmp_path, monkeypatch, capsys):
    # two bodies to make and two job slots: the second waits for the first (each spreads its
    # shape drawing over every core), and no training of theirs starts before its body exists
    launched = []
    monkeypatch.setattr(ablations, "_child_command", lambda run, seed, args: launched.append(run) or
                        [sys.executable, "-c", "import sys; sys.exit(3)"])
    _fake_pretraining(monkeypatch, f"import time; time.sleep(120)  # pretrain-one {tmp_path}")
    args = _quick_table(tiny_shapes, tmp_path, "--jobs", "2", "--deadline", "3")
    args[args.index("r50_c4_roipool")] = "r50_c4_roipool,r101_c4"
    assert ablations.main(args) == 0  # nothing failed: both left for the next session
    out = capsys.readouterr().out
    assert out.count("pre-training the ") == 1 and "pre-training the ResNet-50 stand-in" in out
    assert launched == []
    session = json.loads((tmp_path / "out" / "table2_quick.json").read_text())["sessions"][-1]
    assert sorted(session["left"]) == [["r101_c4", 0], ["r50_c4_roipool", 0]]


@pytest.mark.parametrize("flag, value", [("--max-iter", "0"), ("--images-per-batch", "-2"), ("--nproc-per-run", "0"),
                                         ("--input-size", "0"), ("--deadline", "0"), ("--max-failures", "0")])
def test_ablate_refuses_non_positive_counts_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit):
        ablations.main(["--table", "2", flag, value])
    assert f"{flag} must be" in capsys.readouterr().err


def test_ablate_refuses_several_multi_gpu_jobs_that_would_share_their_gpus(capsys):
    with pytest.raises(SystemExit):
        ablations.main(["--table", "2", "--dataset", "coco", "--from-scratch", "--jobs", "2", "--nproc-per-run", "4"])
    assert "every job would train on the same GPUs" in capsys.readouterr().err


def test_the_mlp_rows_say_what_head_the_miniature_trains_not_the_papers():
    # the paper's row reads "fc 1024 → 1024 → 80·28²"; the miniature's FPN is 64 wide, 8 classes
    cfg = model_config(RUNS["r50_fpn_mlp3"])
    assert cfg.mask_head.mlp_dims == (256, 256, 256) and cfg.num_classes == 8
    assert ablations.stand_in(RUNS["r50_fpn_mlp3"]).endswith(", mask head fc 256 → 256 → 256 → 8·28²")
    assert "mask head" not in ablations.stand_in(RUNS["r50_fpn"])


def test_torchrun_reads_a_multi_gpu_trainings_command_whole_and_its_stop_is_no_failure():
    """With --nproc-per-run > 1 each training runs under torchrun, whose parser also reads the
    words after the module: run-one's "--run" was an ambiguous abbreviation of its --run-path
    and --run_path (exit 2 before training). And torchrun ends on the deadline's SIGTERM with 1."""
    run = pytest.importorskip("torch.distributed.run")
    args = ablations.build_parser().parse_args(["--nproc-per-run", "2", "--jobs", "1", "--quick"])
    command = ablations._child_command("r50_c4_roipool", 1, args)
    launcher_args = command[command.index("torch.distributed.run") + 1:]
    parsed = run.get_args_parser().parse_args(launcher_args)
    assert parsed.module and parsed.training_script == "mrcnn_edu.ablations" and parsed.nproc_per_node == "2"
    assert parsed.training_script_args == command[command.index("mrcnn_edu.ablations") + 1:]
    assert ablations.stopped_exit_codes(2) == ablations.stopped_exit_codes(1) | {1}
    assert 1 not in ablations.stopped_exit_codes(1)  # one process: 1 is an uncaught error


def test_a_table_trains_each_run_in_two_processes_under_torchrun(tiny_shapes, tmp_path, capsys):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    args = ["--table", "2", "--rows", "r50_c4_roipool", "--seeds", "1", "--quick", "--jobs", "1",
            "--nproc-per-run", "2", "--no-pretrain", "--out", str(tmp_path / "out"),
            "--workdir", str(tmp_path / "work"), "--data", str(tiny_shapes["root"])]
    assert ablations.main(args) == 0
    assert "r50_c4_roipool seed 0: done" in capsys.readouterr().out
    log = (tmp_path / "work" / "logs" / "r50_c4_roipool__seed0.log").read_text()
    assert "on cpu x2" in log  # really two processes
    record = json.loads((tmp_path / "work" / "results" / "r50_c4_roipool__seed0.json").read_text())
    assert record["run"] == "r50_c4_roipool" and record["seed"] == 0


def test_a_cut_off_summary_or_record_is_named_with_what_to_do(tmp_path):
    """A bare json.loads stopped the whole table with "Unterminated string ..." naming no file."""
    from mrcnn_edu import ablations_report as report

    results = tmp_path / "work" / "results"
    results.mkdir(parents=True)
    summary = tmp_path / "table2_quick.json"
    summary.write_text('{"runs": {"r50_c4": {"se')
    with pytest.raises(ValueError, match=rf"{re.escape(str(summary))} is not valid JSON .*carried between leases"):
        report.load_records(tmp_path / "work", summary)
    summary.unlink()
    record = results / "r50_c4__seed0.json"
    record.write_text('{"run": "r50_c4", "seed": ')
    with pytest.raises(ValueError, match=rf"{re.escape(str(record))} is not valid JSON .*delete it to train"):
        report.load_records(tmp_path / "work", summary)
    record.write_text('{"seed": 0}')
    with pytest.raises(ValueError, match=rf"{re.escape(str(record))} is no training record .*'run' and 'seed'"):
        report.load_records(tmp_path / "work", summary)
    record.write_text(json.dumps(_fake_record("r50_c4", 0, 1, 2, 3)))
    assert list(report.load_records(tmp_path / "work", summary)) == [("r50_c4", 0)]


def test_a_resumed_trainings_record_names_the_weights_its_first_session_started_from(tmp_path):
    """run_one recorded the body of the session that finished a training; a resumed one loads its
    checkpoint over that body, so a table finished across leases could name a pre-trained body
    for a training that started from scratch (and check_same_schedule trusted it)."""
    folder = tmp_path / "train" / "r50_c4__seed0"
    body = {"weights": "pretrain/ResNet-50.pth", "digest": "4a08d2e4343e485f", "top1": 0.97}
    first = ablations.log_session(folder, "cpu", "abc", "2.14.1", {"weights": None})  # from scratch
    assert ablations.started_from(first, {"weights": None}) == {"weights": None}
    (folder / "model_0000003.pth").write_bytes(b"")  # its checkpoint, as the lease left it
    second = ablations.log_session(folder, "NVIDIA H200", "def", "2.11.0", body)  # the next lease has a body
    assert [s["from_iteration"] for s in second] == [0, 3] and second[1]["init"] == body
    assert ablations.started_from(second, body) == {"weights": None}
    # a folder whose sessions.json is lost (or older, without "init"): this session's, as before
    (folder / ablations.SESSIONS_FILE).unlink()
    alone = ablations.log_session(folder, "cpu", "abc", "2.14.1", body)
    assert alone[0]["from_iteration"] == 3 and ablations.started_from(alone, body) == body
