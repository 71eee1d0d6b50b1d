"""The command line: train writes checkpoints and metrics, eval prints AP, predict draws, resume.

Every run uses the ``tiny`` recipe (64 px synthetic images, a width-8 R-mini-FPN, 3 iterations)
in-process, so the whole file takes seconds, not minutes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mrcnn_edu.__main__ import build_parser, main
from mrcnn_edu.checkpoint import load_checkpoint
from mrcnn_edu.data import shapes


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Bit-identical runs need one CPU thread: multi-threaded conv backward sums in varying order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_tiny")
    shapes.generate(str(out), preset="tiny", seed=0)
    return out


def data_overrides(data_dir) -> list[str]:
    return [f"data.train_images={data_dir}/train",
            f"data.train_annotations={data_dir}/annotations/instances_train.json",
            f"data.val_images={data_dir}/val",
            f"data.val_annotations={data_dir}/annotations/instances_val.json",
            "data.synthetic=None"]


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    """``train --config tiny``: 3 iterations, uninterrupted."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--config", "tiny", f"train.output_dir={out}",
                 *data_overrides(data_dir)]) == 0
    return out


def test_train_writes_a_checkpoint_metrics_curves_and_its_experiment(trained_run):
    state = load_checkpoint(trained_run / "model_0000003.pth")
    assert state["iteration"] == 3 and "model" in state and "optimizer" in state
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in losses] == [1, 2, 3]
    for record in losses:
        assert {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
                "loss_mask"} <= record.keys()
        assert math.isfinite(record["loss"])
    (evaluation,) = [r["eval"] for r in records if "eval" in r]
    assert set(evaluation) == {"bbox", "segm"}
    assert Image.open(trained_run / "loss_curves.png").size[0] > 0
    run = json.loads((trained_run / "experiment.json").read_text())
    assert run["recipe"] == "tiny" and run["overrides"]["train.output_dir"] == str(trained_run)
    assert run["class_names"][1:] == list(shapes.SHAPE_NAMES)
    assert run["skeleton"] == shapes.SKELETON  # the person category's, for predict to draw


def test_eval_prints_the_ap_table_the_training_run_computed(trained_run, capsys, tmp_path):
    capsys.readouterr()
    metrics_path = tmp_path / "metrics.json"
    assert main(["eval", "--weights", str(trained_run / "model_0000003.pth"),
                 "--out", str(metrics_path)]) == 0
    printed = capsys.readouterr().out
    assert "| bbox |" in printed and "| segm |" in printed
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    (at_training,) = [r["eval"] for r in records if "eval" in r]
    again = json.loads(metrics_path.read_text())
    # the same weights on the same images: the same numbers, whichever command computed them
    for iou_type in ("bbox", "segm"):
        for name, value in at_training[iou_type].items():
            assert (math.isnan(value) and again[iou_type][name] is None) or \
                value == again[iou_type][name]  # --out writes nan as null (strict JSON)


def test_predict_writes_one_picture_per_image(trained_run, data_dir, tmp_path, capsys):
    images = [str(data_dir / "val" / "000000.png"), str(data_dir / "val" / "000001.png")]
    assert main(["predict", *images, "--weights", str(trained_run / "model_0000003.pth"),
                 "--out", str(tmp_path), "--score-threshold", "0.0"]) == 0
    for name in ("000000.png", "000001.png"):
        picture = np.asarray(Image.open(tmp_path / name))
        assert picture.ndim == 3 and picture.shape[0] > 64 and picture.std() > 0
    assert "detections with score >= 0.0" in capsys.readouterr().out


def test_predict_copies_masks_off_the_device_binarised_as_evaluation_scores_them(trained_run, data_dir, tmp_path,
                                                                                 monkeypatch):
    import mrcnn_edu.predict
    from mrcnn_edu.evaluation import SEGM_MASK_THRESHOLD

    asked = []
    real = mrcnn_edu.predict.predict_images
    monkeypatch.setattr(mrcnn_edu.predict, "predict_images",
                        lambda *a, **k: asked.append(k.get("mask_threshold")) or real(*a, **k))
    assert main(["predict", str(data_dir / "val" / "000000.png"), "--weights", str(trained_run / "model_0000003.pth"),
                 "--out", str(tmp_path)]) == 0
    assert asked == [SEGM_MASK_THRESHOLD]


def test_predict_runs_on_train_device_and_refuses_cuda_it_does_not_have(trained_run, data_dir, tmp_path,
                                                                        capsys):
    """predict ran on the CPU even with a GPU; it now moves the model to train.device as eval does."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal below cannot happen")
    image = str(data_dir / "val" / "000000.png")
    assert main(["predict", image, "--weights", str(trained_run / "model_0000003.pth"),
                 "--out", str(tmp_path), "--set", "train.device=cuda"]) != 0
    assert "train.device='cuda' but this machine has no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "000000.png").exists()


def test_demo_draws_its_predictions_beside_the_weights_in_train_output_dir(data_dir, tmp_path, capsys):
    """--out is train.output_dir's default: a train.output_dir given too moved the weights and
    curves there but left predictions.png in --out."""
    run = tmp_path / "run"
    assert main(["demo", "--out", str(tmp_path / "default"), f"train.output_dir={run}",
                 "train.max_iter=1", *data_overrides(data_dir)]) == 0
    assert (run / "predictions.png").is_file() and (run / "model_0000001.pth").is_file()
    assert not (tmp_path / "default").exists()
    assert f"predictions: {run / 'predictions.png'}" in capsys.readouterr().out
    # `make demo` again: the demo starts afresh in its folder, which a plain fresh run refuses
    assert main(["demo", f"train.output_dir={run}", "train.max_iter=1", *data_overrides(data_dir)]) == 0
    printed = capsys.readouterr()
    assert "train.overwrite: deleted last_checkpoint, model_0000001.pth" in printed.out + printed.err


def _tiny_with_5_keypoints():
    """The tiny recipe with a keypoint head of K = 5 keypoints (not COCO's 17)."""
    from mrcnn_edu.recipes import tiny
    from mrcnn_edu.roi_heads.keypoint_head import KeypointHeadConfig

    experiment = tiny()
    experiment.model.keypoint_head = KeypointHeadConfig(num_keypoints=5, conv_dims=(32,) * 2)
    return dataclasses.replace(experiment, name="tiny_kp5")


@pytest.fixture
def five_keypoint_weights(tmp_path, monkeypatch):
    """An (untrained) K = 5 keypoint model's checkpoint, with no experiment.json yet."""
    from mrcnn_edu import recipes
    from mrcnn_edu.model import MaskRCNN

    monkeypatch.setitem(recipes.RECIPES, "tiny_kp5", _tiny_with_5_keypoints)
    torch.manual_seed(0)
    weights = tmp_path / "run" / "model_0000001.pth"
    weights.parent.mkdir()
    torch.save({"model": MaskRCNN(_tiny_with_5_keypoints().model).state_dict()}, weights)
    return weights


@pytest.mark.parametrize("skeleton", [[[1, 2], [2, 3], [3, 4], [4, 5]], [], None])
def test_predict_draws_a_5_keypoint_model_with_its_categorys_skeleton_or_none(
        five_keypoint_weights, data_dir, tmp_path, capsys, skeleton):
    """predict passed COCO's 17-point skeleton to every keypoint model: K = 5 gave an IndexError."""
    run_info = {"recipe": "tiny_kp5", "overrides": {}, "class_names": ["__background__", *shapes.SHAPE_NAMES]}
    if skeleton is not None:  # None: an experiment.json from before it held the skeleton
        run_info["skeleton"] = skeleton
    (five_keypoint_weights.parent / "experiment.json").write_text(json.dumps(run_info))
    image = str(data_dir / "val" / "000000.png")
    assert main(["predict", image, "--weights", str(five_keypoint_weights), "--out", str(tmp_path / "out"),
                 "--score-threshold", "0.0", "--set", *data_overrides(data_dir)]) == 0
    kept = int(capsys.readouterr().out.split(": ")[1].split()[0])
    assert kept > 0  # there were keypoints to draw
    assert np.asarray(Image.open(tmp_path / "out" / "000000.png")).std() > 0


def test_keypoint_skeleton_is_the_categorys_else_cocos_for_17_keypoints_else_none(data_dir):
    from mrcnn_edu.__main__ import keypoint_skeleton
    from mrcnn_edu.recipes import apply_overrides, get_recipe

    five = apply_overrides(_tiny_with_5_keypoints(), data_overrides(data_dir))
    seventeen = apply_overrides(five, ["model.keypoint_head.num_keypoints=17"])
    assert keypoint_skeleton(five, {"skeleton": [[1, 5]]}) == [[1, 5]]  # experiment.json's
    assert keypoint_skeleton(get_recipe("tiny"), {"skeleton": [[1, 5]]}) is None  # no keypoint head
    # an older experiment.json without one: COCO's person skeleton fits 17 keypoints, nothing fits 5
    assert keypoint_skeleton(seventeen, {}) == shapes.SKELETON
    assert keypoint_skeleton(five, {}) is None
    assert keypoint_skeleton(seventeen, {"skeleton": []}) == shapes.SKELETON
    assert keypoint_skeleton(five, {"skeleton": []}) is None


def test_a_skeleton_pair_outside_the_keypoints_is_named_not_an_index_error(five_keypoint_weights, data_dir,
                                                                         tmp_path, capsys):
    from mrcnn_edu.visualize import draw_keypoints

    keypoints = torch.rand(2, 5, 3) * 10  # 2 people, K = 5
    with pytest.raises(ValueError, match=r"skeleton pair \[16, 14\] does not join two of the 5 keypoints"):
        draw_keypoints(keypoints, skeleton=shapes.SKELETON)
    with pytest.raises(ValueError, match=r"skeleton pair \[0, 1\] .* \(indices 1..5, 1-based\)"):
        draw_keypoints(keypoints, skeleton=[[0, 1]])  # 0 in a 1-based skeleton is not the last point
    with pytest.raises(ValueError, match=r"skeleton pair \[4, 5\] .* \(indices 0..4, 0-based\)"):
        draw_keypoints(keypoints, skeleton=[[4, 5]], one_based_skeleton=False)
    draw_keypoints(keypoints, skeleton=[[1, 5], [4, 5]])  # fits
    with pytest.raises(ValueError, match=r"skeleton pair \[16, 14\]"):  # an array names it alike
        draw_keypoints(keypoints, skeleton=np.array(shapes.SKELETON))
    # through predict: a message and exit 2, not a traceback
    (five_keypoint_weights.parent / "experiment.json").write_text(json.dumps(
        {"recipe": "tiny_kp5", "overrides": {}, "skeleton": [[1, 2], [5, 6]]}))
    assert main(["predict", str(data_dir / "val" / "000000.png"), "--weights", str(five_keypoint_weights),
                 "--out", str(tmp_path / "out"), "--score-threshold", "0.0", "--set", *data_overrides(data_dir)]) == 2
    assert "error: skeleton pair [5, 6] does not join two of the 5 keypoints" in capsys.readouterr().err


def test_ablate_errors_are_messages_and_its_exit_codes_pass_through(capsys, monkeypatch, tmp_path):
    """`ablate` went to ablations.main outside the handler: --rows 2z was a traceback and exit 1."""
    from mrcnn_edu import ablations

    monkeypatch.chdir(tmp_path)  # nothing is written, but nowhere near the repository if it were
    assert main(["ablate", "--rows", "2z"]) == 2
    err = capsys.readouterr().err
    assert "error: --rows: unknown '2z'" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors: its usage line and exit 2
        main(["ablate", "--seeds", "many"])
    assert exit_info.value.code == 2
    for code in (0, 1, 75):  # all done / some trainings failed / stopped, resumable
        monkeypatch.setattr(ablations, "main", lambda argv, code=code: code)
        assert main(["ablate", "--rows", "2a"]) == code


def test_resume_continues_to_the_same_weights_as_an_uninterrupted_run(trained_run, data_dir,
                                                                     tmp_path, capsys):
    settings = [f"train.output_dir={tmp_path}", *data_overrides(data_dir),
                "train.checkpoint_period=1", "data.eval_images=1"]
    assert main(["train", "--config", "tiny", *settings, "train.max_iter=2"]) == 0  # "killed" at 2
    # max_iter back to 3; a key=value right after --resume is an override, not a checkpoint
    capsys.readouterr()
    assert main(["train", "--config", "tiny", "--resume", *settings]) == 0
    printed = capsys.readouterr()
    assert "training iterations 2..3" in printed.out + printed.err  # it did not start over
    resumed = load_checkpoint(tmp_path / "model_0000003.pth")["model"]
    uninterrupted = load_checkpoint(trained_run / "model_0000003.pth")["model"]
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key


def test_a_synthetic_set_already_there_must_be_the_one_asked_for(tmp_path, capsys):
    # another n_train after an earlier run trained on the old set without a word; another
    # out_dir generated into one folder and loaded from the recipe's
    from mrcnn_edu.__main__ import prepare_data
    from mrcnn_edu.recipes import load_experiment

    root = tmp_path / "shapes"
    paths = [f"data.synthetic.out_dir={root}", f"data.train_images={root}/train",
             f"data.train_annotations={root}/annotations/instances_train.json", f"data.val_images={root}/val",
             f"data.val_annotations={root}/annotations/instances_val.json"]
    prepare_data(load_experiment("tiny", paths)[0])  # generates it
    prepare_data(load_experiment("tiny", paths)[0])  # the same set: nothing to say
    with pytest.raises(ValueError, match=rf"{root} holds another shapes set: n_train 12 \(asked 20\), "
                                         r"seed 0 \(asked 3\)"):
        prepare_data(load_experiment("tiny", [*paths, "data.synthetic.n_train=20", "data.synthetic.seed=3"])[0])
    with pytest.raises(ValueError, match=rf"data.synthetic.out_dir={root} but data.train_images="
                                         r"data/generated/shapes_tiny/train"):
        prepare_data(load_experiment("tiny", [f"data.synthetic.out_dir={root}"])[0])


def test_another_node_without_rank_0s_synthetic_set_is_told_so_and_checks_the_one_it_has(tmp_path):
    # only global rank 0 generates; another node without a shared folder read none, or an old set
    import socket

    from mrcnn_edu.__main__ import _check_synthetic_elsewhere, prepare_data
    from mrcnn_edu.recipes import load_experiment

    root = tmp_path / "shapes"
    experiment = load_experiment("tiny", _synthetic_paths(root))[0]
    with pytest.raises(ValueError, match=rf"rank 3 on {re.escape(socket.gethostname())}: the synthetic set "
                                         rf"{root} that rank 0 generated is not there"):
        _check_synthetic_elsewhere(experiment, 3)
    prepare_data(experiment)
    _check_synthetic_elsewhere(experiment, 3)  # there, and the one asked for
    reseeded = load_experiment("tiny", [*_synthetic_paths(root), "data.synthetic.seed=3"])[0]
    with pytest.raises(ValueError, match=rf"{root} holds another shapes set: seed 0 \(asked 3\)"):
        _check_synthetic_elsewhere(reseeded, 3)


def _synthetic_paths(root) -> list[str]:
    return [f"data.synthetic.out_dir={root}", f"data.train_images={root}/train",
            f"data.train_annotations={root}/annotations/instances_train.json", f"data.val_images={root}/val",
            f"data.val_annotations={root}/annotations/instances_val.json"]


def test_a_synthetic_set_of_another_preset_is_refused_and_one_without_its_config_warned_about(tmp_path):
    # the tiny preset's set was taken for the default preset's at the same size and counts (only
    # counts, size and seed were compared), and the Table 2 runner digested both alike
    from mrcnn_edu.__main__ import prepare_data
    from mrcnn_edu.ablations import data_digest
    from mrcnn_edu.recipes import load_experiment

    root, other = tmp_path / "shapes", tmp_path / "default_at_64"
    paths = _synthetic_paths(root)
    as_default = [*paths, "data.synthetic.preset=default", "data.synthetic.n_train=12", "data.synthetic.n_val=6",
                  "data.synthetic.image_size=64"]
    prepare_data(load_experiment("tiny", paths)[0])  # generates the tiny preset's
    prepare_data(load_experiment("tiny", paths)[0])  # the same set: nothing to say
    with pytest.raises(ValueError, match=rf"{root} holds another shapes set: generator config \['crowd_prob', "
                                         r"'max_objects', 'max_size_frac', 'min_objects', 'min_size_frac', "
                                         r"'tiny_prob'\] \(asked preset 'default'\)"):
        prepare_data(load_experiment("tiny", as_default)[0])
    shapes.generate(str(other), n_train=12, n_val=6, size=64, seed=0, preset="default")
    assert data_digest("shapes", str(root)) != data_digest("shapes", str(other))
    # a set from code that did not record its config cannot show which preset made it: kept, said
    for split in ("train", "val"):
        spec = root / "annotations" / f"instances_{split}.json"
        older = json.loads(spec.read_text())
        del older["info"]["config"]
        spec.write_text(json.dumps(older))
    with pytest.warns(UserWarning, match=rf"{root}: its json does not record the generator config"):
        prepare_data(load_experiment("tiny", paths)[0])
    with pytest.raises(ValueError, match=r"image_size 64 \(asked 80\)"):  # what it records is still checked
        prepare_data(load_experiment("tiny", [*paths, "data.synthetic.image_size=80"])[0])


def test_warnings_while_generating_the_synthetic_set_reach_the_user(tmp_path, monkeypatch):
    # every RuntimeWarning was silenced for an empty crowd cluster that render_scene now skips
    # (default and tiny presets, 300 images each, raise none under -W error::RuntimeWarning)
    from mrcnn_edu.__main__ import prepare_data
    from mrcnn_edu.recipes import load_experiment

    def warning_generate(*args, **kwargs):
        warnings.warn("overflow in a new code path", RuntimeWarning)

    monkeypatch.setattr(shapes, "generate", warning_generate)
    with pytest.warns(RuntimeWarning, match="overflow in a new code path"):
        prepare_data(load_experiment("tiny", _synthetic_paths(tmp_path / "shapes"))[0])


def test_resume_refuses_another_model_of_the_same_shapes_but_not_other_test_settings(data_dir, tmp_path, capsys):
    # RoIPool instead of RoIAlign, another RPN NMS: every tensor still fits, so the checkpoint
    # loaded and the run went on as a mix of two models
    settings = [f"train.output_dir={tmp_path}", *data_overrides(data_dir), "train.checkpoint_period=1",
                "data.eval_images=1", "train.max_iter=1"]
    assert main(["train", "--config", "tiny", *settings]) == 0
    capsys.readouterr()
    assert main(["train", "--config", "tiny", "--resume", *settings, "train.max_iter=2",
                 "model.pooler.kind=roi_pool", "model.rpn.nms_thresh=0.5"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume from" in err and "model.pooler.kind='roi_align' (now 'roi_pool')" in err
    assert "model.rpn.nms_thresh=0.7 (now 0.5)" in err
    # what only inference reads may change
    assert main(["train", "--config", "tiny", "--resume", *settings, "train.max_iter=2",
                 "model.box_head.score_thresh=0.3"]) == 0
    assert load_checkpoint(tmp_path / "model_0000002.pth")["model_config"]["box_head"]["score_thresh"] == 0.3


def test_a_refused_start_leaves_the_runs_experiment_json_as_it_was(data_dir, tmp_path, capsys):
    """experiment.json was rewritten before train() judged the resume: a refused one left the
    rejected config there, so `--config R/experiment.json --resume` failed ever after."""
    settings = [f"train.output_dir={tmp_path}", *data_overrides(data_dir), "data.eval_images=1", "train.max_iter=1"]
    assert main(["train", "--config", "tiny", *settings]) == 0
    written = (tmp_path / "experiment.json").read_bytes()
    capsys.readouterr()
    assert main(["train", "--config", "tiny", "--resume", *settings, "train.max_iter=2",
                 "model.pooler.kind=roi_pool"]) == 2
    assert "model.pooler.kind='roi_align' (now 'roi_pool')" in capsys.readouterr().err
    assert (tmp_path / "experiment.json").read_bytes() == written
    # a fresh run into the same folder: refused too, the run there named
    assert main(["train", "--config", "tiny", *settings, "model.pooler.kind=roi_pool"]) == 2
    err = capsys.readouterr().err
    assert f"train.output_dir={tmp_path} already holds a run (last_checkpoint, model_0000001.pth)" in err
    assert "--resume" in err and "train.overwrite=True" in err
    assert (tmp_path / "experiment.json").read_bytes() == written
    assert not list(tmp_path.glob(".experiment.json.tmp*"))
    # the documented way on still works
    assert main(["train", "--config", str(tmp_path / "experiment.json"), "--resume", "train.max_iter=2"]) == 0
    assert load_checkpoint(tmp_path / "model_0000002.pth")["model_config"]["pooler"]["kind"] == "roi_align"
    # afresh, when asked: the old run's files go; experiment.json does not keep the request, so
    # that re-creating the run from it without --resume is refused, not a second deletion
    assert main(["train", "--config", "tiny", *settings, "train.overwrite=True"]) == 0
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == ["model_0000001.pth"]
    assert "train.overwrite" not in json.loads((tmp_path / "experiment.json").read_text())["overrides"]


def test_eval_and_predict_refuse_an_experiment_of_another_model_than_the_checkpoints(
        trained_run, data_dir, tmp_path, capsys):
    """RoIPool for RoIAlign loads every tensor: eval scored, predict drew, a model never trained."""
    weights = str(trained_run / "model_0000003.pth")
    capsys.readouterr()
    assert main(["eval", "--weights", weights, "--config", "tiny", *data_overrides(data_dir),
                 "model.pooler.kind=roi_pool", "model.mask_head.class_agnostic=True"]) == 2
    err = capsys.readouterr().err
    assert f"{weights} was trained with another model than tiny" in err
    assert "model.pooler.kind='roi_align' (now 'roi_pool')" in err and "model.mask_head.class_agnostic" in err
    # another test scale, NMS and the training-only samplers leave the weights' meaning alone
    assert main(["eval", "--weights", weights, "--config", "tiny", *data_overrides(data_dir),
                 "model.transform.min_size_test=96", "model.transform.max_size=192", "model.rpn.nms_thresh=0.6",
                 "model.box_head.batch_size_per_image=32", "data.eval_images=1"]) == 0
    image = str(data_dir / "val" / "000000.png")
    assert main(["predict", image, "--weights", weights, "--out", str(tmp_path),
                 "--set", "model.pooler.kind=roi_pool"]) == 2
    assert "model.pooler.kind='roi_align' (now 'roi_pool')" in capsys.readouterr().err
    assert not (tmp_path / "000000.png").exists()
    # what only inference reads may differ
    assert main(["predict", image, "--weights", weights, "--out", str(tmp_path),
                 "--set", "model.box_head.score_thresh=0.3"]) == 0


def test_sigterm_saves_the_iteration_and_resume_ends_with_the_uninterrupted_weights(
        trained_run, data_dir, tmp_path, capsys, monkeypatch):
    from mrcnn_edu import engine

    reduced, calls = engine._reduced_losses, []

    def sigterm_in_second_iteration(*args):  # as `timeout` or a scheduler would, mid-step
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return reduced(*args)

    monkeypatch.setattr(engine, "_reduced_losses", sigterm_in_second_iteration)
    settings = [f"train.output_dir={tmp_path}", *data_overrides(data_dir), "train.checkpoint_period=0",
                "data.eval_images=1"]
    assert main(["train", "--config", "tiny", *settings]) == 75  # sysexits' TEMPFAIL: not a failure
    assert "stopped by SIGTERM after 2 iterations" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == ["model_0000002.pth"]
    monkeypatch.undo()
    assert main(["train", "--config", "tiny", "--resume", *settings]) == 0
    resumed = load_checkpoint(tmp_path / "model_0000003.pth")["model"]
    uninterrupted = load_checkpoint(trained_run / "model_0000003.pth")["model"]
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key


def test_bad_override_stops_with_the_key_named(capsys, data_dir, tmp_path):
    assert main(["train", "--config", "tiny", "train.base_lrr=0.1"]) == 2
    assert "unknown key train.base_lrr" in capsys.readouterr().err
    assert main(["train", "--config", "tiny", "train.max_iter=many"]) == 2
    assert "bad value for train.max_iter" in capsys.readouterr().err
    assert main(["train", "--config", "tiny", *data_overrides(data_dir), "model.num_classes=3",
                 f"train.output_dir={tmp_path}"]) == 2
    assert "model.num_classes=8" in capsys.readouterr().err


def test_eval_without_an_experiment_asks_for_config(tmp_path, capsys):
    weights = tmp_path / "model.pth"
    torch.save({}, weights)
    assert main(["eval", "--weights", str(weights)]) == 2
    assert "--config" in capsys.readouterr().err


def test_help_shows_every_command_and_worked_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("demo", "train", "eval", "predict", "anchors", "torchrun", "r50_fpn_coco",
                 "key=value"):
        assert word in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "--resume" in capsys.readouterr().out


def test_weights_that_are_not_a_checkpoint_and_clashing_image_names_are_named(tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match=r"notes.pth is not a checkpoint \(torch.load"):
        load_checkpoint(tmp_path / "notes.pth")
    with pytest.raises(ValueError, match="tensor.pth is not a checkpoint: it holds a Tensor, not a dict"):
        load_checkpoint(tmp_path / "tensor.pth")
    assert main(["eval", "--weights", str(tmp_path / "missing.pth"), "--config", "tiny"]) == 2
    assert "missing.pth: no such file" in capsys.readouterr().err  # a message, not a traceback
    assert main(["predict", "a/x.png", "b/x.png", "--weights", str(tmp_path / "notes.pth")]) == 2
    assert "images with the same name ['x'] would overwrite" in capsys.readouterr().err


def test_train_refuses_train_and_val_sets_whose_categories_differ(data_dir, tmp_path, capsys):
    val = json.loads((data_dir / "annotations" / "instances_val.json").read_text())
    val["categories"][0]["name"] = "renamed"  # label 1 would mean another class in evaluation
    renamed = tmp_path / "instances_val.json"
    renamed.write_text(json.dumps(val))
    settings = [*data_overrides(data_dir), f"data.val_annotations={renamed}", f"train.output_dir={tmp_path / 'run'}"]
    assert main(["train", "--config", "tiny", *settings]) == 2
    assert "have different categories" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model_0000003.pth").exists()


def test_init_weights_take_an_imagenet_resnet_and_refuse_a_file_that_fits_nothing(tmp_path, capsys):
    """``init_weights`` was loaded by our keys alone: an ImageNet ResNet in torchvision's layout
    (what docs/training.md tells a COCO user to bring) loaded 0 tensors, and the run trained
    from scratch without a word."""
    from mrcnn_edu.__main__ import build_model
    from mrcnn_edu.backbone.resnet import ResNet
    from mrcnn_edu.recipes import get_recipe

    experiment = get_recipe("tiny")
    resnet_cfg = experiment.model.backbone.resnet
    torch.manual_seed(7)
    imagenet = ResNet(dataclasses.replace(resnet_cfg, num_classes=10))  # with its fc
    for param in imagenet.parameters():  # unlike any initialisation build_model could draw
        param.data.uniform_(-1, 1)
    state = {f"module.{k}": v for k, v in imagenet.state_dict().items()}  # saved from DDP, too
    torch.save(state, tmp_path / "r_imagenet.pth")
    model = build_model(experiment, str(tmp_path / "r_imagenet.pth"), strict=False)
    body = model.backbone.body.state_dict()
    for key, value in imagenet.state_dict().items():
        if not key.startswith("fc.") and not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(body[key], value, rtol=0, atol=0, msg=key)
    assert "ImageNet-layout ResNet" in capsys.readouterr().err

    torch.save({"head.weight": torch.zeros(3)}, tmp_path / "unrelated.pth")
    with pytest.raises(ValueError, match=r"no tensor of .*unrelated.pth fits the tiny model"):
        build_model(experiment, str(tmp_path / "unrelated.pth"), strict=False)


def test_a_torchvision_detector_through_the_cli_is_told_every_setting_torchvision_runs_it_with(tmp_path, capsys):
    """eval / predict --weights keypointrcnn.pth load through build_model into the recipe's config.
    Every tensor fits keypoint_r50_fpn_coco, whose anchors, RoIAlign, resize, paste and frozen-BN
    eps differ from torchvision's; only the keypoints' half pixel was named, as if the rest matched."""
    models = pytest.importorskip("torchvision.models.detection")
    from mrcnn_edu.__main__ import build_model
    from mrcnn_edu.recipes import apply_overrides, get_recipe

    torch.save(models.keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict(), tmp_path / "kp.pth")
    experiment = get_recipe("keypoint_r50_fpn_coco")
    overrides = ["model.anchors.offset=0.0", "model.anchors.round_cell=True", "model.anchors.stride_mode=torchvision",
                 "model.pooler.aligned=False", "model.transform.resize_mode=torchvision",
                 "model.transform.paste_mode=torchvision", "model.keypoint_head.coordinate_offset=0.5",
                 "model.backbone.resnet.bn_eps=0.0"]
    build_model(experiment, str(tmp_path / "kp.pth"))
    err = capsys.readouterr().err
    assert "torchvision runs these weights with other settings than this experiment" in err, err
    told = err.split("as torchvision does, add ")[1].split(" (bn_eps 0 is for torchvision's COCO_V1 files")[0]
    assert sorted(shlex.split(told)) == sorted(overrides)  # not box_head.smooth_l1_beta: only training reads it
    build_model(apply_overrides(experiment, overrides), str(tmp_path / "kp.pth"))  # given: nothing to tell
    assert "other settings" not in capsys.readouterr().err
    build_model(experiment, str(tmp_path / "kp.pth"), strict=False)  # training on from them: its recipe's choice
    assert "other settings" not in capsys.readouterr().err


def test_init_weights_take_a_torchvision_mask_rcnn_state_dict_by_its_own_key_names(tmp_path, capsys):
    # torchvision names its RPN conv, FPN and RoI heads otherwise: loaded by our keys alone,
    # only the body and two RPN layers fitted, and the message gave counts, not names
    models = pytest.importorskip("torchvision.models.detection")
    from mrcnn_edu.__main__ import build_model
    from mrcnn_edu.recipes import get_recipe
    from mrcnn_edu.weights import load_torchvision_maskrcnn, torchvision_maskrcnn_config

    torch.manual_seed(3)
    theirs = models.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4)
    torch.save(theirs.state_dict(), tmp_path / "tv.pth")
    experiment = dataclasses.replace(get_recipe("tiny"), model=torchvision_maskrcnn_config(num_classes=3))
    model = build_model(experiment, str(tmp_path / "tv.pth"), strict=False)
    assert "a torchvision detector's state dict, renamed" in capsys.readouterr().err
    expected = load_torchvision_maskrcnn(theirs.state_dict()).state_dict()  # the strict loader's renaming
    got = model.state_dict()
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)

    # Faster R-CNN weights start a Mask R-CNN: all but the mask head, which is named
    faster = models.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4)
    torch.save(faster.state_dict(), tmp_path / "faster.pth")
    model = build_model(experiment, str(tmp_path / "faster.pth"), strict=False)
    err = capsys.readouterr().err
    assert "missing (initialised afresh) [mask_head." in err and "0 unexpected" in err
    box = model.box_branch.predictor.cls_score.weight
    torch.testing.assert_close(box, faster.roi_heads.box_predictor.cls_score.weight, rtol=0, atol=0)

    # fine-tuning to other classes, from a file saved under DDP: the class-sized predictors are
    # left out by name, everything else loads
    torch.save({f"module.{k}": v for k, v in theirs.state_dict().items()}, tmp_path / "ddp.pth")
    other = dataclasses.replace(experiment, model=torchvision_maskrcnn_config(num_classes=6))
    model = build_model(other, str(tmp_path / "ddp.pth"), strict=False)
    err = capsys.readouterr().err
    assert "6 tensor(s) of another shape than the model's left out" in err
    assert "box_branch.predictor.cls_score.weight" in err and "mask_head.predictor.weight" in err
    got = model.state_dict()
    for key, value in expected.items():
        if "predictor" not in key:
            torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


def test_predict_refuses_to_draw_over_its_own_input_image(trained_run, data_dir, tmp_path, capsys):
    """`predict photo.png --out .` replaced the photo by its drawing, without a word."""
    import shutil

    weights = str(trained_run / "model_0000003.pth")
    photo = tmp_path / "photo.png"
    shutil.copy(data_dir / "val" / "000000.png", photo)
    original = photo.read_bytes()
    (tmp_path / "sub").mkdir()
    link_dir = tmp_path / "links"
    link_dir.mkdir()
    (link_dir / "link.png").symlink_to(photo)
    for image, out in ((photo, tmp_path), (photo, tmp_path / "sub" / ".."), (link_dir / "link.png", link_dir)):
        assert main(["predict", str(image), "--weights", weights, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"would overwrite the input image {image} (the same file)" in err, err
        assert f"{Path(out) / (image.stem + '.png')}" in err
        assert photo.read_bytes() == original
    assert main(["predict", str(photo), "--weights", weights, "--out", str(tmp_path / "drawn")]) == 0
    assert photo.read_bytes() == original and (tmp_path / "drawn" / "photo.png").is_file()


def _val_json_with(data_dir, tmp_path, change) -> str:
    val = json.loads((data_dir / "annotations" / "instances_val.json").read_text())
    change(val)
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(val))
    return str(path)


def test_eval_refuses_a_val_json_whose_categories_are_not_the_runs(trained_run, data_dir, tmp_path, capsys):
    """Labels are mapped through the val json's own sorted ids: the same 8 shapes numbered
    otherwise were scored against the wrong categories (a perfect model: AP 1.0 -> 0.0), rc 0."""
    weights = str(trained_run / "model_0000003.pth")

    def swap_first_two(val):  # ellipse <-> triangle: label 1 would be scored as triangles
        swap = {1: 2, 2: 1}
        for category in val["categories"]:
            category["id"] = swap.get(category["id"], category["id"])
        for ann in val["annotations"]:
            ann["category_id"] = swap.get(ann["category_id"], ann["category_id"])

    renumbered = _val_json_with(data_dir, tmp_path, swap_first_two)
    assert main(["eval", "--weights", weights, f"data.val_annotations={renumbered}"]) == 2
    err = capsys.readouterr().err
    assert f"{renumbered} has other categories than the run the weights come from" in err
    assert ("label 1: 'ellipse' in the run, 'triangle' (category id 1) in the json; "
            "label 2: 'triangle' in the run, 'ellipse' (category id 2) in the json)") in err
    renamed = _val_json_with(data_dir, tmp_path, lambda val: val["categories"][2].update(name="asterisk"))
    assert main(["eval", "--weights", weights, f"data.val_annotations={renamed}"]) == 2
    assert "label 3: 'star' in the run, 'asterisk' (category id 3) in the json)" in capsys.readouterr().err

    def shift_ids(val):  # other ids, the same names in the same order: each label means its class
        for category in val["categories"]:
            category["id"] += 10
        for ann in val["annotations"]:
            ann["category_id"] += 10

    shifted = _val_json_with(data_dir, tmp_path, shift_ids)
    assert main(["eval", "--weights", weights, f"data.val_annotations={shifted}", "data.eval_images=1"]) == 0


def test_a_val_json_without_images_is_refused_before_any_training_or_evaluation(trained_run, data_dir, tmp_path,
                                                                                 capsys):
    """It trained to the end, then failed at the final evaluation, and again on each resume."""
    def no_images(val):
        val["images"], val["annotations"] = [], []

    empty = _val_json_with(data_dir, tmp_path, no_images)
    out = tmp_path / "run"
    assert main(["train", "--config", "tiny", f"train.output_dir={out}", *data_overrides(data_dir),
                 f"data.val_annotations={empty}"]) == 2
    assert f"{empty} lists no image" in capsys.readouterr().err
    assert not list(out.glob("model_*.pth"))  # refused before the first iteration
    assert main(["eval", "--weights", str(trained_run / "model_0000003.pth"), f"data.val_annotations={empty}"]) == 2
    assert f"{empty} lists no image" in capsys.readouterr().err


def test_eval_with_fewer_categories_than_the_checkpoint_gives_advice_that_works(trained_run, data_dir, tmp_path,
                                                                                  capsys):
    """It said "add model.num_classes=7", which the checkpoint's recorded model then refused."""
    import shutil

    def drop_person(val):
        person = next(c["id"] for c in val["categories"] if c["name"] == "person")
        val["categories"] = [c for c in val["categories"] if c["id"] != person]
        val["annotations"] = [a for a in val["annotations"] if a["category_id"] != person]

    fewer = _val_json_with(data_dir, tmp_path, drop_person)
    assert main(["eval", "--weights", str(trained_run / "model_0000003.pth"), f"data.val_annotations={fewer}"]) == 2
    assert "label 8: 'person' in the run, nothing in the json" in capsys.readouterr().err
    # no experiment.json to name the classes: the count, and advice that is not the refused override
    alone = tmp_path / "alone" / "model_0000003.pth"
    alone.parent.mkdir()
    shutil.copy(trained_run / "model_0000003.pth", alone)
    settings = ["--config", "tiny", *data_overrides(data_dir), f"data.val_annotations={fewer}"]
    assert main(["eval", "--weights", str(alone), *settings]) == 2
    err = capsys.readouterr().err
    assert f"{fewer} has 7 categories but the model has model.num_classes=8; the weights predict 8 classes" in err
    assert "add model.num_classes" not in err
    assert main(["eval", "--weights", str(alone), *settings, "model.num_classes=7"]) == 2  # why it must not say so
    assert "model.num_classes=8 (now 7)" in capsys.readouterr().err


def test_eval_labels_category_ids_scores_weights_whose_labels_are_the_jsons_ids(trained_run, data_dir, tmp_path,
                                                                                capsys):
    """torchvision's COCO weights (labels 1..90, COCO's ids) on COCO's 80-category json: the class
    count check refused them and no option could say what their labels are. Here: weights of 8
    labels without an experiment.json, on a json of 5 categories with ids among 1..8."""
    import shutil

    def five_of_eight(val):  # ids 2, 4, 5, 7, 8: gaps, as COCO's
        kept = {2, 4, 5, 7, 8}
        val["categories"] = [c for c in val["categories"] if c["id"] in kept]
        val["annotations"] = [a for a in val["annotations"] if a["category_id"] in kept]

    gaps = _val_json_with(data_dir, tmp_path, five_of_eight)
    alone = tmp_path / "alone" / "model_0000003.pth"
    alone.parent.mkdir()
    shutil.copy(trained_run / "model_0000003.pth", alone)
    settings = ["--config", "tiny", *data_overrides(data_dir), f"data.val_annotations={gaps}"]
    assert main(["eval", "--weights", str(alone), *settings]) == 2
    assert "if their labels are category ids (torchvision's COCO weights" in capsys.readouterr().err
    out = tmp_path / "metrics.json"
    assert main(["eval", "--weights", str(alone), *settings, "--labels", "category-ids", "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())) == {"bbox", "segm"}
    # ids beyond the model's labels cannot be named by them
    beyond = _val_json_with(data_dir, tmp_path, lambda val: [c.update(id=c["id"] + 10) for c in val["categories"]])
    # (an override after an option: argparse alone left it over as "unrecognized arguments")
    assert main(["eval", "--weights", str(alone), "--config", "tiny", *data_overrides(data_dir),
                 "--labels", "category-ids", f"data.val_annotations={beyond}"]) == 2
    assert "has category ids [11, 12, 13, 14, 15, 16, 17, 18] beyond the model's labels 1..8" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # what is no key=value is still refused
        main(["eval", "--weights", str(alone), "--labels", "category-ids", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    # our own run's weights number labels in json order: refused, not silently mis-scored
    assert main(["eval", "--weights", str(trained_run / "model_0000003.pth"), "--labels", "category-ids"]) == 2
    assert "the weights come from a run of this package" in capsys.readouterr().err


def test_eval_out_makes_its_folder_first_and_writes_strict_json_fractions(trained_run, tmp_path, capsys,
                                                                          monkeypatch):
    """--out nodir/x.json failed after the whole evaluation; the file held bare NaN tokens."""
    weights = str(trained_run / "model_0000003.pth")
    out = tmp_path / "new" / "deeper" / "metrics.json"
    capsys.readouterr()
    assert main(["eval", "--weights", weights, "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    def no_nan(constant):
        raise AssertionError(f"{constant} is not JSON")

    metrics = json.loads(out.read_text(), parse_constant=no_nan)
    assert metrics["bbox"]["APl"] is None  # 64-px images hold no large object: nothing to score
    for iou_type in ("bbox", "segm"):  # fractions: the table's percent / 100
        row = next(line for line in printed.splitlines() if line.startswith(f"| {iou_type} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")[1:]]
        values = [metrics[iou_type][name] for name in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        assert cells == ["-" if v is None else f"{100 * v:.1f}" for v in values]
        assert all(v is None or 0.0 <= v <= 1.0 for v in values)
    # a folder that cannot be made is named before anything is evaluated
    import mrcnn_edu.predict

    monkeypatch.setattr(mrcnn_edu.predict, "evaluate_model", lambda *a, **k: pytest.fail("evaluated first"))
    (tmp_path / "a_file").write_text("")
    assert main(["eval", "--weights", weights, "--out", str(tmp_path / "a_file" / "metrics.json")]) == 2
    assert f"--out {tmp_path / 'a_file' / 'metrics.json'}: its folder cannot be made" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    assert "fractions in [0, 1]" in " ".join(capsys.readouterr().out.split())


def test_eval_on_a_subset_says_how_many_images_it_scored(trained_run, data_dir, capsys):
    weights = str(trained_run / "model_0000003.pth")
    val = data_dir / "annotations" / "instances_val.json"
    assert main(["eval", "--weights", weights, "data.eval_images=2"]) == 0
    assert f"COCO AP (%) of {weights} on 2 of 6 images of {val} (" in capsys.readouterr().out
    assert main(["eval", "--weights", weights]) == 0
    assert f"COCO AP (%) of {weights} on {val} (" in capsys.readouterr().out  # all 6


def test_predict_names_an_image_too_large_for_pillows_decompression_bomb_guard(trained_run, data_dir, tmp_path,
                                                                               capsys, monkeypatch):
    """DecompressionBombError is no OSError: it was a traceback that did not name the file."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the 64 x 64 image is over twice that
    image = data_dir / "val" / "000000.png"
    assert main(["predict", str(image), "--weights", str(trained_run / "model_0000003.pth"),
                 "--out", str(tmp_path)]) == 2
    assert f"error: image file {image} is too large for Pillow's guard" in capsys.readouterr().err
