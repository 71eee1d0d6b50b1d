"""The training engine: the paper's schedule (§3.1), atomic checkpoints, exact resume, nan stops.

Every training run here uses the stand-in detector of ``_ddp_worker.py`` (same calling
convention as Mask R-CNN, a few hundred parameters) on 16×16 images.
"""
from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ddp_worker import TinyDetector, TinyShapes, collate, make_model  # noqa: E402

from mrcnn_edu import engine  # noqa: E402
from mrcnn_edu.checkpoint import (capture_rng_state, last_checkpoint, load_checkpoint,  # noqa: E402
                                  restore_rng_state, save_checkpoint)
from mrcnn_edu.engine import (NonFiniteGradientError, NonFiniteLossError, TrainConfig,  # noqa: E402
                              TrainingStopped, build_optimizer, describe_scaling, grad_norm, lr_at,
                              scale_for_batch, scaled_lr, to_device, train)


def tiny_config(output_dir: Path, **changes) -> TrainConfig:
    cfg = TrainConfig(base_lr=0.1, max_iter=8, steps=(6,), warmup_iters=3, images_per_batch=4,
                      reference_batch=4, device="cpu", num_workers=0, output_dir=str(output_dir),
                      checkpoint_period=4, log_period=1, progress=False, seed=3)
    return replace(cfg, **changes)


def final_state(output_dir: Path) -> dict:
    return load_checkpoint(last_checkpoint(output_dir))


def assert_same_tensors(a, b) -> None:
    """Recursively: equal structure and bit-identical tensors."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tensors(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y)
    else:
        assert a == b


# --- the schedule (§3.1) ---------------------------------------------------------------------

def test_paper_schedule_warms_up_then_divides_by_ten_at_120k():
    cfg = TrainConfig()  # the paper's recipe: 0.02, ÷10 at 120k; Detectron's warm-up 500 × 1/3
    assert math.isclose(lr_at(0, cfg), 0.02 / 3, rel_tol=1e-12)
    assert math.isclose(lr_at(250, cfg), 0.02 * (1 / 3 * 0.5 + 0.5), rel_tol=1e-12)
    assert math.isclose(lr_at(500, cfg), 0.02, rel_tol=1e-12)
    assert math.isclose(lr_at(119_999, cfg), 0.02, rel_tol=1e-12)
    assert math.isclose(lr_at(120_000, cfg), 0.002, rel_tol=1e-12)
    assert math.isclose(lr_at(159_999, cfg), 0.002, rel_tol=1e-12)
    keypoints = replace(cfg, max_iter=90_000, steps=(60_000, 80_000))  # §5
    assert math.isclose(lr_at(70_000, keypoints), 0.002, rel_tol=1e-12)
    assert math.isclose(lr_at(80_000, keypoints), 0.0002, rel_tol=1e-12)
    with pytest.raises(ValueError, match="iteration"):
        lr_at(-1, cfg)


def test_linear_scaling_rule_keeps_the_number_of_epochs():
    assert scaled_lr(0.02, 16, 2) == pytest.approx(0.0025, rel=1e-12)
    one_gpu = replace(TrainConfig(), images_per_batch=2)
    scaled = scale_for_batch(one_gpu)
    assert scaled.base_lr == pytest.approx(0.0025, rel=1e-12)
    assert (scaled.max_iter, scaled.steps, scaled.warmup_iters) == (1_280_000, (960_000,), 4000)
    assert scaled.max_iter * scaled.images_per_batch == 160_000 * 16  # same images seen
    assert scale_for_batch(scaled) == scaled  # applying it twice changes nothing
    line = describe_scaling(one_gpu)
    assert "lr 0.02 @ 16 images -> 0.0025 @ 2 images" in line and "x8 longer" in line
    assert scale_for_batch(replace(one_gpu, scale_schedule=False)).base_lr == 0.02


def test_norm_layers_get_no_weight_decay_and_everything_else_does():
    model = TinyDetector()
    optimizer = build_optimizer(model, TrainConfig())
    decayed, not_decayed = optimizer.param_groups
    assert decayed["weight_decay"] == 1e-4 and not_decayed["weight_decay"] == 0.0
    assert {id(p) for p in not_decayed["params"]} == {id(model.norm.weight), id(model.norm.bias)}
    assert len(decayed["params"]) == 6  # conv, cls_score, bbox_pred: weights and biases
    assert optimizer.defaults["momentum"] == 0.9


def test_bad_settings_are_refused_with_the_setting_named(tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        train(make_model(), TinyShapes(), tiny_config(tmp_path, amp="fp16"), collate)
    with pytest.raises(ValueError, match="amp"):
        train(make_model(), TinyShapes(), tiny_config(tmp_path, amp="fp8"), collate)
    with pytest.raises(ValueError, match="steps"):
        train(make_model(), TinyShapes(), tiny_config(tmp_path, steps=(6, 2)), collate)


@pytest.mark.parametrize("change, message", [
    ({"base_lr": -0.1}, r"train.base_lr=-0.1 must be > 0"),
    ({"base_lr": 0.0}, r"train.base_lr=0.0 must be > 0"),
    ({"clip_grad": -1.0}, r"train.clip_grad=-1.0 must be None \(no clipping\) or > 0"),  # was gradient ascent
    ({"momentum": 1.5}, r"train.momentum=1.5 must be in \[0, 1\)"),
    ({"momentum": -0.1}, r"train.momentum=-0.1 must be in \[0, 1\)"),
    ({"weight_decay": -1.0}, r"train.weight_decay=-1.0 must be >= 0"),
    ({"weight_decay_norm": -1e-4}, r"train.weight_decay_norm=-0.0001 must be >= 0"),
    ({"gamma": 0.0}, r"train.gamma=0.0 must be in \(0, 1\]"),
    ({"gamma": 10.0}, r"train.gamma=10.0 must be in \(0, 1\]"),
    ({"warmup_factor": 0.0}, r"train.warmup_factor=0.0 must be in \(0, 1\]"),
    ({"warmup_factor": 2.0}, r"train.warmup_factor=2.0 must be in \(0, 1\]"),
    ({"num_workers": -1}, r"train.num_workers=-1 must be >= 0"),
    ({"reference_batch": 0}, r"train.reference_batch=0 must be >= 1"),
    ({"warmup_iters": -5}, r"train.warmup_iters=-5 must be >= 0"),
    ({"steps": (-2, 5)}, r"train.steps=\(-2, 5\) must be iterations > 0"),  # divided the lr from iteration 0
])
def test_settings_that_would_train_wrongly_are_refused_with_the_field_named(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        replace(tiny_config(tmp_path), **change)  # when the config is made: before any data or model
    assert not any(tmp_path.iterdir())


def test_an_empty_output_dir_is_refused_not_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the run's files went
    with pytest.raises(ValueError, match=r"train.output_dir='' must name a folder"):
        train(make_model(), TinyShapes(), tiny_config(""), collate)
    assert not any(tmp_path.iterdir())
    tiny_config(tmp_path, momentum=0.0, weight_decay=0.0, gamma=1.0, warmup_factor=1.0, clip_grad=1.0)  # the edges


def test_to_device_moves_every_tensor_and_keeps_the_structure():
    batch = ([torch.zeros(2)], [{"boxes": torch.ones(1, 4), "name": "a", "ids": (torch.ones(1),)}])
    moved = to_device(batch, "meta")
    assert moved[0][0].device.type == "meta" and moved[1][0]["boxes"].device.type == "meta"
    assert moved[1][0]["ids"][0].device.type == "meta" and moved[1][0]["name"] == "a"
    assert isinstance(moved, tuple) and isinstance(moved[1][0]["ids"], tuple)


# --- checkpoints --------------------------------------------------------------------------

def test_a_crash_in_the_middle_of_a_save_leaves_the_previous_checkpoint_intact(tmp_path,
                                                                                monkeypatch):
    good = save_checkpoint(tmp_path / "model_0000001.pth", {"weights": torch.arange(5.0)})
    good_bytes = good.read_bytes()

    def crash_after_partial_write(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")
        raise OSError("simulated crash: disk full")

    monkeypatch.setattr(torch, "save", crash_after_partial_write)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path / "model_0000002.pth", {"weights": torch.zeros(5)})
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(good, {"weights": torch.zeros(5)})  # even when overwriting it
    monkeypatch.undo()

    assert good.read_bytes() == good_bytes
    assert last_checkpoint(tmp_path) == good
    assert torch.equal(load_checkpoint(good)["weights"], torch.arange(5.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000001.pth"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_a_save_killed_outright_leaves_a_leftover_that_the_next_save_removes(tmp_path):
    good = save_checkpoint(tmp_path / "model_0000001.pth", {"weights": torch.arange(5.0)})
    # a process SIGKILLed in the middle of torch.save: no except clause, no clean-up runs
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, torch\n"
        "from mrcnn_edu.checkpoint import save_checkpoint\n"
        "def die(obj, file, *a, **k):\n"
        "    file.write(b'half a checkpoint'); file.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = die\n"
        f"save_checkpoint({str(tmp_path / 'model_0000002.pth')!r}, {{}})\n")],
        capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    leftovers = [p.name for p in tmp_path.glob(".model_0000002.pth.tmp*")]
    assert len(leftovers) == 1 and last_checkpoint(tmp_path) == good  # the crash lost nothing
    (tmp_path / ".notes.tmp1").write_text("not ours")  # other hidden files stay
    save_checkpoint(tmp_path / "model_0000003.pth", {"weights": torch.ones(5)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".notes.tmp1", "last_checkpoint", "model_0000001.pth", "model_0000003.pth"]


def test_rng_states_survive_a_round_trip_through_a_checkpoint_file(tmp_path):
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    path = save_checkpoint(tmp_path / "rng.pth", {"rng": capture_rng_state()})
    first = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
             np.random.randn(), torch.rand(3))
    restore_rng_state(load_checkpoint(path)["rng"])
    second = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
              np.random.randn(), torch.rand(3))
    assert first[:4] == second[:4] and torch.equal(first[4], second[4])


# --- exact resume -----------------------------------------------------------------------------

class Killed(Exception):
    """Stands for the job being killed."""


def kill_at(iteration: int):
    def hook(done: int, state: dict) -> None:
        if done == iteration:
            raise Killed(f"killed after {done} iterations")
    return hook


def test_kill_and_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch):
    dataset = TinyShapes()  # random flips and noise: the augmentation must repeat too
    train(make_model(dropout=0.5), dataset, tiny_config(tmp_path / "whole"), collate)

    killed_cfg = tiny_config(tmp_path / "killed")
    with pytest.raises(Killed):  # checkpoint at 4, killed at 6: iterations 5, 6 are lost
        train(make_model(dropout=0.5), dataset, killed_cfg, collate, hooks=[kill_at(6)])
    assert last_checkpoint(killed_cfg.output_dir).name == "model_0000004.pth"
    train(make_model(dropout=0.5), dataset, replace(killed_cfg, resume=True), collate)

    whole, resumed = final_state(tmp_path / "whole"), final_state(tmp_path / "killed")
    assert_same_tensors(whole["model"], resumed["model"])
    assert_same_tensors(whole["optimizer"], resumed["optimizer"])  # momentum buffers too
    logged = [r["iteration"] for r in engine._read_metrics(tmp_path / "killed" / "metrics.jsonl")]
    assert logged == list(range(1, 9))  # the lost iterations 5, 6 are logged once, not twice
    assert (tmp_path / "killed" / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The RNG states in the checkpoint matter: resuming without them changes the weights.
    monkeypatch.setattr(engine, "restore_rng_state", lambda state: None)
    torch.manual_seed(12345)
    train(make_model(dropout=0.5), dataset,
          replace(killed_cfg, resume=str(tmp_path / "killed" / "model_0000004.pth"),
                  output_dir=str(tmp_path / "no_rng")), collate)
    assert not torch.equal(final_state(tmp_path / "no_rng")["model"]["conv.weight"],
                           whole["model"]["conv.weight"])


def sigterm_at(iteration: int):
    def hook(done: int, state: dict) -> None:
        if done == iteration:  # what `timeout`, a scheduler or a lease's deadline sends
            os.kill(os.getpid(), signal.SIGTERM)
    return hook


def test_sigterm_saves_the_iteration_it_arrives_in_and_resuming_ends_as_an_uninterrupted_run(tmp_path, monkeypatch):
    dataset = TinyShapes()
    whole = train(make_model(dropout=0.5), dataset, tiny_config(tmp_path / "whole"), collate)
    before = signal.getsignal(signal.SIGTERM)
    stopped_cfg = tiny_config(tmp_path / "stopped", checkpoint_period=0)  # no periodic checkpoint
    plotted = []
    monkeypatch.setattr(engine, "plot_loss_curves", lambda path: plotted.append(path))
    with pytest.raises(TrainingStopped, match="after 5 iterations") as stopped:
        train(make_model(dropout=0.5), dataset, stopped_cfg, collate, hooks=[sigterm_at(5)])
    assert stopped.value.iteration == 5 and stopped.value.checkpoint.name == "model_0000005.pth"
    assert plotted == []  # the deadline's few seconds go to the checkpoint, not to matplotlib
    monkeypatch.undo()
    assert last_checkpoint(stopped_cfg.output_dir) == stopped.value.checkpoint  # nothing lost
    assert signal.getsignal(signal.SIGTERM) is before  # the process's own handler is back
    first = load_checkpoint(stopped.value.checkpoint)["train_seconds"]
    resumed = train(make_model(dropout=0.5), dataset, replace(stopped_cfg, resume=True), collate)
    assert_same_tensors(final_state(tmp_path / "whole")["model"], final_state(tmp_path / "stopped")["model"])
    assert_same_tensors(final_state(tmp_path / "whole")["optimizer"],
                        final_state(tmp_path / "stopped")["optimizer"])
    # the loop's time adds up over the two calls: more than the first part's alone
    assert 0 < first < resumed["train_seconds"] and whole["train_seconds"] > 0
    assert final_state(tmp_path / "stopped")["train_seconds"] <= resumed["train_seconds"]
    # a SIGTERM in the last iteration changes nothing: the run ends as usual
    last = train(make_model(dropout=0.5), dataset, tiny_config(tmp_path / "last"), collate, hooks=[sigterm_at(8)])
    assert last["iteration"] == 8 and signal.getsignal(signal.SIGTERM) is before


_GROUP_SIGTERM_CHILD = """
import pathlib, sys, time
sys.path[:0] = sys.argv[2:4]
from _ddp_worker import TinyShapes, collate, make_model
from mrcnn_edu.engine import TrainConfig, TrainingStopped, train
out = pathlib.Path(sys.argv[1])
cfg = TrainConfig(base_lr=0.1, max_iter=8, steps=(6,), warmup_iters=3, images_per_batch=4, reference_batch=4,
                  device="cpu", num_workers=1, checkpoint_period=0, log_period=1, progress=False, seed=3,
                  output_dir=str(out))
def hook(done, state):
    if done == 3:  # tell the test, then give its signal time to arrive inside this iteration
        (out / "at_3").touch()
        time.sleep(3)
try:
    train(make_model(), TinyShapes(), cfg, collate, hooks=[hook])
except TrainingStopped as stopped:
    print("STOPPED", stopped.iteration, stopped.checkpoint.name)
    sys.exit(75)
"""


def test_a_sigterm_to_the_whole_process_group_spares_the_loader_workers_and_saves(tmp_path):
    """``timeout``, Slurm and ``kill -- -PGID`` signal every process of the group, loader
    workers included; a worker killed by it would fail the run before it saved."""
    import subprocess
    import time

    tests = Path(__file__).resolve().parent
    child = subprocess.Popen([sys.executable, "-c", _GROUP_SIGTERM_CHILD, str(tmp_path), str(tests),
                              str(tests.parent)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # its own group: the signal reaches no one else
    deadline = time.monotonic() + 120
    while not (tmp_path / "at_3").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGTERM)  # sent from outside the group: not the workers' parent
    out, err = child.communicate(timeout=120)
    assert child.returncode == 75, err[-2000:]
    assert "STOPPED 3 model_0000003.pth" in out and (tmp_path / "model_0000003.pth").is_file()


_LOADER_AT_EXIT_CHILD = """
import sys
import torch
sys.path.insert(0, sys.argv[1])
from mrcnn_edu import engine
init = engine._sigterm_from_parent_only if sys.argv[2] == "fixed" else (
    lambda worker_id: engine.signal.signal(engine.signal.SIGTERM, engine.signal.SIG_IGN))
loader = torch.utils.data.DataLoader(list(range(64)), batch_size=2, num_workers=2, worker_init_fn=init)
batches = iter(loader)  # alive until the interpreter's exit, as any global or cycle keeps one
print(next(batches).tolist(), flush=True)
"""


def test_loader_workers_still_end_at_their_parents_sigterm(tmp_path):
    """At exit ``multiprocessing`` ends the workers still running with ``terminate()`` and waits
    for them; a worker that ignored every SIGTERM made that wait last forever."""
    import subprocess

    root = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run([sys.executable, "-c", _LOADER_AT_EXIT_CHILD, root, "fixed"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[0, 1]", done.stderr[-2000:]
    # the SIG_IGN workers this replaced: past its last line, the child still waits 10 s later
    child = subprocess.Popen([sys.executable, "-c", _LOADER_AT_EXIT_CHILD, root, "ignored"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout.readline().strip() == "[0, 1]"
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=10)
    finally:
        child.kill()  # its workers follow: they watch their parent
        child.wait()


def test_sigterm_handler_set_outside_python_gives_way_to_the_default_after(monkeypatch):
    calls = []

    def fake_signal(signum, handler):  # as if a C library had installed the handler before
        calls.append(handler)
        return None if len(calls) == 1 else signal.SIG_DFL

    monkeypatch.setattr(engine.signal, "signal", fake_signal)
    with engine._sigterm_sets(engine.threading.Event(), world_size=1):
        pass
    assert len(calls) == 2 and calls[1] is signal.SIG_DFL  # never signal(SIGTERM, None): a TypeError


def test_config_edge_cases_fail_clearly_or_train(tmp_path):
    dataset = TinyShapes()
    # log_period 0: only the last iteration is logged, as for the other periods
    train(make_model(), dataset, tiny_config(tmp_path / "log0", max_iter=3, log_period=0), collate)
    logged = [r["iteration"] for r in engine._read_metrics(tmp_path / "log0" / "metrics.jsonl") if "loss" in r]
    assert logged == [3]
    with pytest.raises(ValueError, match="checkpoint_period=-1 must be >= 0"):
        train(make_model(), dataset, tiny_config(tmp_path / "neg", checkpoint_period=-1), collate)
    # the linear scaling rule never leaves zero iterations or an lr step at iteration 0
    scaled = engine.scale_for_batch(TrainConfig(max_iter=3, steps=(2,), warmup_iters=0, images_per_batch=16,
                                                reference_batch=2))
    assert scaled.max_iter == 1 and scaled.steps == (1,)
    with pytest.raises(ValueError, match="train.reference_batch=0 must be >= 1"):
        engine.scale_for_batch(TrainConfig(images_per_batch=4, reference_batch=0))
    with pytest.raises(ValueError, match="batch sizes must be positive"):
        engine.scaled_lr(0.02, 0, 4)
    # paths as Path objects: saved, and resumed from
    first = train(make_model(), dataset, tiny_config(tmp_path / "p", max_iter=4, checkpoint_period=2), collate)
    cfg = replace(tiny_config(tmp_path / "p"), output_dir=tmp_path / "p", resume=tmp_path / "p" / "model_0000002.pth")
    again = train(make_model(), dataset, cfg, collate)
    assert first["iteration"] == 4 and again["start_iteration"] == 2 and again["iteration"] == 8
    # a file that is not a training checkpoint is named
    torch.save({"weights": {}}, tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="cannot resume from .*weights.pth"):
        train(make_model(), dataset, tiny_config(tmp_path / "w", resume=str(tmp_path / "weights.pth")), collate)


def test_resume_refuses_a_config_that_would_have_trained_the_past_differently(tmp_path):
    dataset = TinyShapes()
    cfg = tiny_config(tmp_path / "r", max_iter=5, checkpoint_period=5)  # warm-up 3, step at 6
    train(make_model(), dataset, cfg, collate)
    resume = replace(cfg, resume=True)
    for change, named in [({"base_lr": 0.05}, "lr at iteration 0"),
                          ({"warmup_iters": 2}, r"lr at iteration 1 0.0555556 \(now 0.0666667"),  # 0.1 (1/3 · 2/3 + 1/3), 0.1 (1/3 · 1/2 + 1/2)
                          ({"steps": (4,)}, "lr at iteration 4"),
                          ({"seed": 4}, r"seed=3 \(now 4\)"),
                          ({"momentum": 0.8}, r"momentum=0.9 \(now 0.8\)"),
                          # another batch: the scaled schedule differs (lr ×2 from iteration 0)
                          ({"images_per_batch": 8}, r"images_per_batch=4 \(now 8\)")]:
        with pytest.raises(ValueError, match=rf"cannot resume from .*model_0000005.pth: .*{named}"):
            train(make_model(), dataset, replace(resume, **change), collate)
    # the future may change: a longer schedule, its step moved but still ahead
    longer = train(make_model(), dataset, replace(resume, max_iter=7, steps=(5,)), collate)
    assert longer["start_iteration"] == 5 and longer["iteration"] == 7
    # hand-checked against lr_at: equal pasts, one step apart
    base = tiny_config(tmp_path)
    assert engine.resume_mismatch(vars(base), replace(base, steps=(7,)), 6) == []
    assert engine.resume_mismatch(vars(base), replace(base, steps=(7,)), 7) != []
    assert engine.resume_mismatch({}, base, 6) == []  # a checkpoint without a config: nothing to compare


def test_keep_checkpoints_deletes_all_but_the_newest_and_resume_still_works(tmp_path):
    dataset = TinyShapes()
    cfg = tiny_config(tmp_path / "k", max_iter=6, checkpoint_period=1, keep_checkpoints=2)
    train(make_model(), dataset, cfg, collate)
    assert sorted(p.name for p in (tmp_path / "k").glob("model_*.pth")) == [
        "model_0000005.pth", "model_0000006.pth"]
    again = train(make_model(), dataset, replace(cfg, resume=True, max_iter=8), collate)
    assert again["start_iteration"] == 6
    assert sorted(p.name for p in (tmp_path / "k").glob("model_*.pth")) == [
        "model_0000007.pth", "model_0000008.pth"]
    with pytest.raises(ValueError, match="keep_checkpoints=-1 must be >= 0"):
        train(make_model(), dataset, replace(cfg, keep_checkpoints=-1), collate)
    with pytest.raises(ValueError, match="keep=0"):
        engine.prune_checkpoints(tmp_path / "k", 0)
    # a file of a higher iteration left from before a crash never costs the one to resume from
    stale = tmp_path / "stale"
    stale.mkdir()
    for name in ("model_0000100.pth", "model_0000200.pth", "model_0000300.pth"):
        (stale / name).write_bytes(b"x")
    (stale / "last_checkpoint").write_text("model_0000200.pth")
    assert [p.name for p in engine.prune_checkpoints(stale, 1)] == ["model_0000100.pth"]
    assert last_checkpoint(stale).name == "model_0000200.pth"
    (stale / "model_0000100 (copy).pth").write_bytes(b"x")  # a user's copy: not ours to parse or delete
    (stale / "model_0000050.pth").write_bytes(b"x")
    assert [p.name for p in engine.prune_checkpoints(stale, 1)] == ["model_0000050.pth"]
    assert (stale / "model_0000100 (copy).pth").exists()


def test_a_fresh_run_refuses_a_folder_holding_another_run_unless_told_to_overwrite_it(tmp_path):
    """A fresh run there truncated the other run's metrics.jsonl and took over its last_checkpoint;
    pruning then kept the other run's model_0000008.pth and deleted this run's model_0000004.pth."""
    dataset = TinyShapes()
    cfg = tiny_config(tmp_path / "a")  # checkpoints at 4 and 8
    train(make_model(), dataset, cfg, collate)
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    other = replace(cfg, max_iter=6, checkpoint_period=2, keep_checkpoints=2)
    with pytest.raises(ValueError, match=rf"train.output_dir={tmp_path / 'a'} already holds a run "
                                         r"\(last_checkpoint, model_0000004.pth, model_0000008.pth\).*--resume.*"
                                         r"another train.output_dir.*train.overwrite=True"):
        train(make_model(), dataset, other, collate)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before  # nothing touched
    # told to: the other run's files go, and this run's are all there is
    train(make_model(), dataset, replace(other, overwrite=True), collate)
    assert sorted(p.name for p in (tmp_path / "a").glob("model_*.pth")) == ["model_0000004.pth", "model_0000006.pth"]
    assert last_checkpoint(tmp_path / "a").name == "model_0000006.pth"
    assert [r["iteration"] for r in engine._read_metrics(tmp_path / "a" / "metrics.jsonl")] == list(range(1, 7))
    # overwrite does not stop a resume: it only matters to a fresh start
    resumed = train(make_model(), dataset, replace(other, overwrite=True, resume=True, max_iter=7), collate)
    assert resumed["start_iteration"] == 6


def test_a_rollback_killed_before_its_first_save_is_what_a_plain_resume_continues(tmp_path, capsys):
    """resume=PATH of an older checkpoint left last_checkpoint naming the newer one: a crash
    before the rolled-back run's first save, then resume=True, went on with the abandoned run
    (while metrics.jsonl already held the rolled-back one's records)."""
    dataset = TinyShapes()
    cfg = tiny_config(tmp_path / "r")
    train(make_model(dropout=0.5), dataset, cfg, collate)  # checkpoints 4 and 8
    rollback = replace(cfg, resume=str(tmp_path / "r" / "model_0000004.pth"), clip_grad=1.0)
    capsys.readouterr()
    with pytest.raises(Killed):
        train(make_model(dropout=0.5), dataset, rollback, collate, hooks=[kill_at(6)])
    assert "last_checkpoint now names model_0000004.pth, not model_0000008.pth" in capsys.readouterr().err
    assert last_checkpoint(cfg.output_dir).name == "model_0000004.pth"
    resumed = train(make_model(dropout=0.5), dataset, replace(cfg, resume=True, clip_grad=1.0), collate)
    assert resumed["start_iteration"] == 4
    assert [r["iteration"] for r in engine._read_metrics(tmp_path / "r" / "metrics.jsonl")] == list(range(1, 9))
    # the same as the rolled-back run never killed
    whole = tiny_config(tmp_path / "w")
    train(make_model(dropout=0.5), dataset, whole, collate)
    train(make_model(dropout=0.5), dataset, replace(whole, resume=str(tmp_path / "w" / "model_0000004.pth"),
                                                    clip_grad=1.0), collate)
    assert_same_tensors(final_state(tmp_path / "r")["model"], final_state(tmp_path / "w")["model"])
    # a checkpoint from another folder is no rollback of this one: its pointer stays
    with pytest.raises(Killed):
        train(make_model(dropout=0.5), dataset, replace(whole, resume=str(tmp_path / "r" / "model_0000004.pth"),
                                                        clip_grad=1.0), collate, hooks=[kill_at(5)])
    assert last_checkpoint(whole.output_dir).name == "model_0000008.pth"


def test_a_resume_that_finds_checkpoints_but_no_last_checkpoint_file_continues_from_the_newest(tmp_path, capsys):
    """A run killed between its first checkpoint's rename and the pointer's (or a folder copied
    without the pointer). It used to warn, start at 0, truncate metrics.jsonl and overwrite the
    checkpoints one by one; then it refused, and a pre-empted job's automatic --resume failed."""
    dataset = TinyShapes()
    cfg = tiny_config(tmp_path)
    uninterrupted = tmp_path / "uninterrupted"
    train(make_model(), dataset, replace(cfg, output_dir=str(uninterrupted)), collate)
    train(make_model(), dataset, replace(cfg, max_iter=4), collate)
    (tmp_path / "last_checkpoint").unlink()  # as if killed right after model_0000004.pth's rename
    with pytest.raises(ValueError, match="already holds a run"):  # a fresh run may not start there
        train(make_model(), dataset, cfg, collate)
    capsys.readouterr()
    resumed = train(make_model(), dataset, replace(cfg, resume=True), collate)
    assert resumed["start_iteration"] == 4
    assert ("has no last_checkpoint file; resuming from the newest checkpoint there, model_0000004.pth"
            in capsys.readouterr().err)
    assert last_checkpoint(tmp_path).name == "model_0000008.pth"
    # exactly the run that was never interrupted: the newest checkpoint was this run's own
    assert_same_tensors(final_state(tmp_path)["model"], final_state(uninterrupted)["model"])
    assert [r["iteration"] for r in engine._read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 9))

    # the newest of several; another run's checkpoint is still refused by the config check
    (tmp_path / "last_checkpoint").unlink()
    with pytest.raises(ValueError, match=r"cannot resume from .*model_0000008\.pth: .*seed"):
        train(make_model(), dataset, replace(cfg, resume=True, seed=4, max_iter=10), collate)
    again = train(make_model(), dataset, replace(cfg, resume=True, max_iter=10), collate)
    assert again["start_iteration"] == 8
    # an explicit path still wins
    older = train(make_model(), dataset, replace(cfg, resume=str(tmp_path / "model_0000004.pth")), collate)
    assert older["start_iteration"] == 4


def test_an_overwrite_stopped_half_way_is_neither_resumed_nor_silently_started_beside(tmp_path, monkeypatch):
    """train.overwrite=True deletes an earlier run's files; stopped after the first deletion, the
    survivors sat without a pointer, and a resume (which now continues from the newest
    model_NNNNNNN.pth without one) would have continued the run being deleted (review finding)."""
    from pathlib import Path as RealPath

    dataset = TinyShapes()
    cfg = tiny_config(tmp_path)
    train(make_model(), dataset, cfg, collate)  # the earlier run: model_0000004, model_0000008
    unlink, calls = RealPath.unlink, []

    def dies_on_the_second(self, missing_ok=False):
        calls.append(self.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("stopped half-way")
        return unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(RealPath, "unlink", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        engine._clear_earlier_run(tmp_path)
    monkeypatch.undo()
    assert calls[0] == "model_0000004.pth" and (tmp_path / "model_0000008.pth").is_file()
    with pytest.raises(ValueError, match="was stopped while it deleted the earlier run"):
        train(make_model(), dataset, replace(cfg, resume=True, max_iter=10), collate)
    with pytest.raises(ValueError, match="already holds a run"):
        train(make_model(), dataset, cfg, collate)
    again = train(make_model(), dataset, replace(cfg, overwrite=True), collate)  # finishes the deletion
    assert again["start_iteration"] == 0 and last_checkpoint(tmp_path).name == "model_0000008.pth"


def test_a_sigterm_saves_and_stops_before_an_evaluation_due_in_its_iteration(tmp_path):
    """The stop came after the evaluation: a COCO evaluation (minutes) ran inside the scheduler's
    grace with the iteration unsaved, and a kill during it lost every iteration since the last
    checkpoint. Now the iteration is saved and the run stops; the resume evaluates it first."""
    dataset = TinyShapes()
    seen = []

    def evaluate(model):
        seen.append(sorted(p.name for p in (tmp_path / "s").glob("model_*.pth")))
        return {"accuracy": 1.0}

    cfg = tiny_config(tmp_path / "s", checkpoint_period=0, eval_period=3)  # evaluations at 3, 6, 8
    with pytest.raises(TrainingStopped, match="after 6 iterations"):
        train(make_model(dropout=0.5), dataset, cfg, collate, evaluate_fn=evaluate, hooks=[sigterm_at(6)])
    assert seen == [[]]  # iteration 3's only; none at 6
    assert last_checkpoint(cfg.output_dir).name == "model_0000006.pth"
    resumed = train(make_model(dropout=0.5), dataset, replace(cfg, resume=True), collate, evaluate_fn=evaluate)
    assert seen[1:] == [["model_0000006.pth"], ["model_0000006.pth", "model_0000008.pth"]]  # 6 first, then 8
    records = engine._read_metrics(tmp_path / "s" / "metrics.jsonl")
    assert [r["iteration"] for r in records if "eval" in r] == [3, 6, 8] and resumed["iteration"] == 8


def test_an_evaluation_that_failed_after_its_checkpoint_runs_first_when_the_run_resumes(tmp_path):
    """The checkpoint is saved before the evaluation: a resume started after the iteration and
    its evaluation never ran. It runs first now, leaving every RNG as the loop's evaluation does."""
    dataset = TinyShapes()
    calls = []

    def evaluate(model):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("evaluation crashed")
        torch.rand(3), np.random.rand(), random.random()  # draws nothing from the training's streams
        return {"accuracy": 1.0}

    cfg = tiny_config(tmp_path / "e", eval_period=4)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        train(make_model(dropout=0.5), dataset, cfg, collate, evaluate_fn=evaluate)
    assert last_checkpoint(cfg.output_dir).name == "model_0000004.pth"
    resumed = train(make_model(dropout=0.5), dataset, replace(cfg, resume=True), collate, evaluate_fn=evaluate)
    records = engine._read_metrics(tmp_path / "e" / "metrics.jsonl")
    assert [r["iteration"] for r in records if "eval" in r] == [4, 8] and len(calls) == 3
    whole = train(make_model(dropout=0.5), dataset, tiny_config(tmp_path / "whole", eval_period=4), collate,
                  evaluate_fn=lambda model: {"accuracy": 1.0})
    assert_same_tensors(final_state(tmp_path / "whole")["model"], final_state(tmp_path / "e")["model"])
    assert resumed["eval"] == whole["eval"]
    # the final evaluation failed: the resume has nothing left to train but still evaluates, once
    calls.clear()
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        train(make_model(), dataset, tiny_config(tmp_path / "f"), collate, evaluate_fn=evaluate)
    done = train(make_model(), dataset, tiny_config(tmp_path / "f", resume=True), collate, evaluate_fn=evaluate)
    assert done["start_iteration"] == 8 and done["eval"] == {"accuracy": 1.0} and len(calls) == 2
    train(make_model(), dataset, tiny_config(tmp_path / "f", resume=True), collate, evaluate_fn=evaluate)
    assert len(calls) == 2  # recorded now: not again


def test_a_kill_while_metrics_jsonl_is_rewritten_on_resume_leaves_the_history_whole(tmp_path, monkeypatch):
    """A resume rewrites metrics.jsonl without the records past its checkpoint; written in place,
    a kill in the middle left it truncated. The kill is simulated where an atomic write has
    written the new file but not yet put it in the old one's place."""
    dataset = TinyShapes()
    cfg = tiny_config(tmp_path)
    with pytest.raises(Killed):
        train(make_model(), dataset, cfg, collate, hooks=[kill_at(6)])  # checkpoint 4, metrics 1..6
    history = (tmp_path / "metrics.jsonl").read_text()

    def killed(fd):
        raise Killed("killed while writing")

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(Killed):
        train(make_model(), dataset, replace(cfg, resume=True), collate)
    assert (tmp_path / "metrics.jsonl").read_text() == history
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    monkeypatch.undo()
    train(make_model(), dataset, replace(cfg, resume=True), collate)
    assert [r["iteration"] for r in engine._read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 9))


def test_metrics_file_cut_off_mid_line_by_a_crash_still_reads(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1, "loss": 2.0}\n{"iteration": 2, "loss": 1.5}\n{"iteration": 3, "lo')
    assert [r["iteration"] for r in engine._read_metrics(path)] == [1, 2]
    path.write_text('{"iteration": 1}\nnot json\n{"iteration": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON"):
        engine._read_metrics(path)


def test_augmentation_does_not_depend_on_the_number_of_loader_workers(tmp_path):
    dataset = TinyShapes()
    for workers in (0, 2):
        cfg = tiny_config(tmp_path / f"w{workers}", max_iter=2, num_workers=workers)
        train(make_model(), dataset, cfg, collate)
    assert_same_tensors(final_state(tmp_path / "w0")["model"], final_state(tmp_path / "w2")["model"])


def test_objects_are_frozen_for_the_worker_fork_only(tmp_path, monkeypatch):
    # frozen before the fork, the workers' collections leave the shared pages alone
    # (bench/worker_memory.py); unfrozen after it, later train() calls here still collect
    import gc

    frozen_when_forked = []
    build_loader = engine._build_loader

    def spy(*args, **kwargs):
        frozen_when_forked.append(gc.get_freeze_count())  # iter() on the loader forks just after
        return build_loader(*args, **kwargs)

    monkeypatch.setattr(engine, "_build_loader", spy)
    train(make_model(), TinyShapes(), tiny_config(tmp_path / "w1", max_iter=1, num_workers=1), collate)
    train(make_model(), TinyShapes(), tiny_config(tmp_path / "w0", max_iter=1, num_workers=0), collate)
    assert frozen_when_forked[0] > 0 and frozen_when_forked[1] == 0 and gc.get_freeze_count() == 0
    gc.freeze()  # a caller's own freeze is left as it was, not unfrozen with ours
    try:
        train(make_model(), TinyShapes(), tiny_config(tmp_path / "w2", max_iter=1, num_workers=1), collate)
        assert gc.get_freeze_count() > 0  # our unfreeze would have emptied the permanent generation
    finally:
        gc.unfreeze()


# --- non-finite losses ----------------------------------------------------------------------

class PoisonedDetector(TinyDetector):
    """The stand-in, whose mask and keypoint losses turn nan / inf at one iteration."""

    def __init__(self, poisoned_iteration: int) -> None:
        super().__init__()
        self.poisoned_iteration, self.calls = poisoned_iteration, 0

    def forward(self, images, targets=None):
        losses = super().forward(images, targets)
        bad = self.calls == self.poisoned_iteration
        losses["loss_mask"] = torch.tensor(math.nan if bad else 0.0)
        losses["loss_keypoint"] = torch.tensor(math.inf if bad else 0.0)
        self.calls += 1
        return losses


def test_a_nan_loss_stops_the_run_naming_iteration_and_term_and_spares_the_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, checkpoint_period=2)
    good = tmp_path / "model_0000002.pth"
    written: list[bytes] = []

    def remember_checkpoint(done: int, state: dict) -> None:
        if done == 2:
            written.append(good.read_bytes())

    torch.manual_seed(0)
    with pytest.raises(NonFiniteLossError) as caught:
        train(PoisonedDetector(poisoned_iteration=3), TinyShapes(), cfg, collate,
              hooks=[remember_checkpoint])
    error = caught.value
    assert error.iteration == 3
    assert set(error.bad_terms) == {"loss_mask", "loss_keypoint"}
    message = str(error)
    assert "iteration 3" in message and "loss_mask=nan" in message and "loss_keypoint=inf" in message
    assert "model_0000002.pth" in message
    assert last_checkpoint(tmp_path) == good
    assert good.read_bytes() == written[0]  # untouched since it was written
    assert load_checkpoint(good)["iteration"] == 2
    assert not (tmp_path / "model_0000004.pth").exists()


class GradientPoisonedDetector(TinyDetector):
    """The stand-in with one more loss term, sqrt(|0 * w|): its value is 0 (finite) but its
    gradient is 0 * inf = nan, from the iteration given on."""

    def __init__(self, poisoned_iteration: int) -> None:
        super().__init__()
        self.poisoned_iteration, self.calls = poisoned_iteration, 0

    def forward(self, images, targets=None):
        losses = super().forward(images, targets)
        weight = next(self.parameters())
        poisoned = self.calls >= self.poisoned_iteration
        losses["loss_sqrt"] = (weight * 0.0).abs().sqrt().sum() if poisoned else (weight * 0.0).sum()
        self.calls += 1
        return losses


@pytest.mark.parametrize("clip_grad", [None, 1.0])
def test_a_nan_gradient_behind_a_finite_loss_stops_the_run_before_the_step(tmp_path, clip_grad):
    # without a loss scaler nothing else would stop it: SGD would write nan into every weight,
    # the next checkpoint would hold them, and the next iteration's nan loss would call that
    # checkpoint "good"
    cfg = tiny_config(tmp_path, checkpoint_period=1, keep_checkpoints=1, clip_grad=clip_grad)
    seen: list[dict] = []
    torch.manual_seed(0)
    model = GradientPoisonedDetector(poisoned_iteration=2)
    with pytest.raises(NonFiniteGradientError) as caught:
        train(model, TinyShapes(), cfg, collate,
              hooks=[lambda done, state: seen.append({k: v.clone() for k, v in model.state_dict().items()})])
    error = caught.value
    assert isinstance(error, NonFiniteLossError)  # what callers that catch divergence catch
    assert error.iteration == 2 and math.isnan(error.bad_terms["gradient norm"])
    assert "non-finite gradient (the loss terms were finite) at iteration 2" in str(error)
    assert "model_0000002.pth" in str(error) and last_checkpoint(tmp_path) == tmp_path / "model_0000002.pth"
    saved = load_checkpoint(tmp_path / "model_0000002.pth")["model"]
    assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())
    assert_same_tensors(model.state_dict(), seen[-1])  # no step was taken after iteration 2's


def test_the_gradient_norm_is_clip_grad_norms_and_sees_nan_and_inf():
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5)),
              torch.nn.Parameter(torch.randn(2))]  # the last one gets no gradient
    for p in params[:2]:
        p.grad = torch.randn_like(p)
    by_hand = math.sqrt(sum(float((p.grad ** 2).sum()) for p in params[:2]))
    assert grad_norm(params).item() == pytest.approx(by_hand, rel=1e-6)
    for bad in (math.nan, math.inf):
        params[1].grad[3] = bad
        assert not math.isfinite(grad_norm(params).item())


# --- mixed precision --------------------------------------------------------------------------

def test_bf16_autocast_runs_the_convolutions_in_bfloat16_on_cpu(tmp_path):
    for amp, dtype in (("bf16", torch.bfloat16), ("none", torch.float32)):
        model = make_model()
        train(model, TinyShapes(), tiny_config(tmp_path / amp, max_iter=1, amp=amp), collate)
        assert model.feature_dtype == dtype
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_channels_last_trains_nhwc_convolutions_to_the_same_weights(tmp_path):
    weights = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = make_model()
        train(model, TinyShapes(), tiny_config(tmp_path / str(channels_last), max_iter=3,
                                               channels_last=channels_last), collate)
        assert model.conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        weights[channels_last] = {k: v.contiguous() for k, v in model.state_dict().items()}
    for name, value in weights[False].items():  # only the summation order differs
        torch.testing.assert_close(weights[True][name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_stops_the_page_faults_of_large_tensors_reallocated():
    # in a fresh process (the setting is process-wide): 64 MB tensors made and freed again and
    # again fault in their pages every time under glibc's defaults, and only once when kept
    import subprocess

    script = """
import resource, torch
from mrcnn_edu.engine import keep_freed_memory
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        x = torch.ones(16 * 2**20)  # 64 MB: above glibc's largest mmap threshold (32 MB)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
default = faults()
applied = keep_freed_memory()
faults()  # the first round after it grows the heap once
print(applied, default, faults())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    applied, default, kept = done.stdout.split()
    if applied != "True":
        pytest.skip("this C library has no glibc mallopt")
    pages = 10 * 64 * 2**20 // 4096  # every page of every tensor, at 4 KB pages
    assert int(default) >= pages // 2, (default, pages)  # faulted in again each time
    assert int(kept) < pages // 20, (kept, pages)  # reused: no new pages


def test_asking_for_cuda_without_a_gpu_is_an_error_that_says_so(monkeypatch):
    from mrcnn_edu.distributed import DistInfo
    from mrcnn_edu.engine import _pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="train.device='cuda' but this machine has no CUDA device"):
        _pick_device("cuda", DistInfo())
    assert _pick_device("auto", DistInfo()) == torch.device("cpu")
    # more processes on a node than GPUs: named, not a CUDA "invalid device ordinal" later
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _pick_device("auto", DistInfo(rank=1, local_rank=1, world_size=2)) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="local rank 2 has no GPU: this machine has 2"):
        _pick_device("cuda", DistInfo(rank=2, local_rank=2, world_size=3))
