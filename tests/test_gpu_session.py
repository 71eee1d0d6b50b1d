"""bench/gpu_session.sh, the one command a lent GPU runs, driven here on the CPU.

A lease is minutes long and a fresh machine each time: a shell mistake in the table phase (a
wrong batch size or layout passed to ``ablate``, a deadline past the budget, bodies not kept for
the next lease) costs the lease. These tests run the script's ``mini_step`` and ``table`` phases
for real, with ``$PYTHON`` a stand-in that answers for ``bench/mini_step.py`` and ``ablate``
(whose numbers only a GPU gives) and passes everything else -- ``bench/pick_batch.py``,
``check_pretrained_body`` -- to this Python. What the script decided is read from the
command line it gave ``ablate``.
"""
import dataclasses
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from mrcnn_edu.ablations import pretrain_config

ROOT = Path(__file__).resolve().parents[1]

# answers for the two GPU-only commands; everything else runs in this Python with the package
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
if [ "$1" = bench/mini_step.py ]; then
    while [ $# -gt 0 ]; do [ "$1" = --json ] && cp "$FAKE_MINI_STEP" "$2"; shift; done
    exit 0
fi
if [ "$1 $2" = "-m pip" ]; then  # installing the carried wheels: never this machine's pip
    echo "${FAKE_PIP_ERROR:-installed}" >&2
    [ -z "${FAKE_PIP_ERROR:-}" ]; exit
fi
if [ "$1 $2 $3" = "-m mrcnn_edu ablate" ]; then
    w=runs/table2_miniature
    mkdir -p $w/pretrain $w/logs $w/results results
    ls $w/pretrain/*.pth >/dev/null 2>&1 || echo body > $w/pretrain/R-mini-50.pth
    ls $w/train/ > "$CALLS.trainings_found" 2>/dev/null
    # four trainings as a deadline leaves them: three stopped (one too big to carry), one finished
    for t in r50_fpn__seed0:900:1 r50_c5_roialign__seed0:700:17000 r50_c4__seed0:500:1 r50_c4_softmax__seed0:3000:1; do
        IFS=: read -r name at kib <<< "$t"
        mkdir -p $w/train/$name
        head -c "${kib}k" /dev/zero > $w/train/$name/model_0000$at.pth
        # FAKE_NO_POINTER: killed between its first checkpoint's rename and the pointer's
        [ "$name" = "${FAKE_NO_POINTER:-}" ] || echo "model_0000$at.pth" > $w/train/$name/last_checkpoint
        echo '{"iteration": 20, "seconds_per_iter": 0.7}' > $w/train/$name/metrics.jsonl
        [ "$name" = r50_fpn__seed0 ] && echo '[]' > $w/train/$name/sessions.json  # today's ablate writes it
        echo "trained" > $w/logs/$name.log
    done
    echo '{}' > $w/results/r50_c4_softmax__seed0.json
    if [ -n "${FAKE_REPORT:-}" ]; then cp "$FAKE_REPORT" results/table2_miniature.json
    else echo '{"runs": {}}' > results/table2_miniature.json; fi
    echo '| table |' > results/table2_miniature.md
    exit 0
fi
PYTHONPATH="$PYTHONPATH:$REPO" exec "$REAL_PYTHON" "$@"
"""


def mini_step_json(c4_32_ms: float, nhwc_factor: float, peak_mib: float = 4000.0) -> dict:
    """What ``bench/mini_step.py --images 16,32,64 --channels-last --json`` writes on an H200
    (made-up timings: 16 images 200 ms per step, 32 images ``c4_32_ms``, 64 images 600 ms)."""
    def size(n, ms, peak):
        return {"ms_per_step": ms, "schedule_s": round(ms * 48000 / n / 1000, 1), "peak_mib": peak,
                "channels_last_ms_per_step": ms * nhwc_factor}

    by_size = {"16": size(16, 200.0, peak_mib / 2), "32": size(32, c4_32_ms, peak_mib),
               "64": size(64, 600.0, peak_mib * 2)}
    return {"device": "NVIDIA H200", "device_mib": 143_000, "images": [16, 32, 64],
            "runs": {"r50_c4": by_size, "r50_fpn": by_size}}


def committed(images_per_batch: int, channels_last: bool) -> dict:
    """A results JSON holding one finished training, as ``ablate`` writes it."""
    record = {"train_config": {"images_per_batch": images_per_batch, "channels_last": channels_last}}
    return {"runs": {"r50_c4": {"seeds": {"0": record}}}}


def body(path: Path, **changes) -> None:
    """A pre-trained body's file with the ``info`` ``check_pretrained_body`` reads."""
    config = dict(dataclasses.asdict(pretrain_config()), **changes)
    torch.save({"model": {}, "info": {"config": config}}, path)


@pytest.fixture
def lease(tmp_path):
    """A copy of the scripts in a working tree of its own, and a function that runs phases."""
    if shutil.which("timeout") is None or shutil.which("tar") is None:
        pytest.skip("needs coreutils' timeout and tar, as the device machine has")
    tree = tmp_path / "tree"
    (tree / "bench").mkdir(parents=True)
    (tree / "results").mkdir()
    for name in ("gpu_session.sh", "pick_batch.py"):
        shutil.copy(ROOT / "bench" / name, tree / "bench" / name)
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)

    # budget: far more than the phases' own work, whose python calls (torch imports) can take
    # tens of seconds each on a loaded CI machine; the table phase starts only with >= 120 s left
    def run(*phases: str, timings: dict, budget: int = 600, **env: str):
        (tmp_path / "mini_step.json").write_text(json.dumps(timings))
        calls = tmp_path / "calls.txt"
        calls.unlink(missing_ok=True)
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        environ = dict(os.environ, PYTHON=str(fake), REAL_PYTHON=sys.executable, REPO=str(ROOT),
                       CALLS=str(calls), FAKE_MINI_STEP=str(tmp_path / "mini_step.json"), OUT=str(out),
                       BUDGET=str(budget), **env)
        environ.pop("PYTHONPATH", None)
        done = subprocess.run(["bash", "bench/gpu_session.sh", *phases], cwd=tree, env=environ,
                              capture_output=True, text=True, timeout=400)
        log = (out / "session.log").read_text()
        assert done.returncode == 0, done.stderr + log
        ablate = [shlex.split(line) for line in calls.read_text().splitlines() if "mrcnn_edu ablate" in line]
        return ablate, out, log

    run.tree = tree
    return run


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_a_first_lease_trains_the_table_at_the_batch_and_layout_mini_step_timed_cheapest(lease):
    # 32 images per step cost 260 ms against 200 at 16: the schedule 0.65x, so 32; NHWC 10 % faster
    called = time.time()
    [argv], out, log = lease("mini_step", "table", timings=mini_step_json(260.0, 0.9), budget=600)
    ended = time.time()
    assert argv[argv.index("ablate"):argv.index("ablate") + 5] == ["ablate", "--table", "2", "--seeds", "3"]
    assert option(argv, "--jobs") == "8" and option(argv, "--images-per-batch") == "32"
    assert "--channels-last" in argv
    # the trainings stop 60 s before the budget ends (30 s for one evaluating to finish, then the
    # report and the packing), as a wall-clock time: the script's START (whole seconds, between
    # `called` and `ended`) + 600 - 60, give or take the second two `date` calls may straddle
    deadline_at = float(option(argv, "--deadline-at"))
    assert math.floor(called) + 539 <= deadline_at <= ended + 541
    assert "=== TABLE_BATCH=auto: 32" in log and "=== TABLE_CHANNELS_LAST=auto: yes" in log
    # what the next lease needs comes back: the results, the bodies, the rates of every training
    assert json.loads((out / "table2_miniature.json").read_text()) == {"runs": {}}
    with tarfile.open(out / "table2_bodies.tar") as tar:
        assert tar.getnames() == ["R-mini-50.pth"]
    assert '"seconds_per_iter": 0.7' in (out / "table2_logs.txt").read_text()
    # two file slots are left (mini_step.json took one): as many trainings may overrun, and the
    # two furthest along that fit in a file come back; the finished one and C5's 17 MiB do not
    assert option(argv, "--may-overrun") == "2" and option(argv, "--overrun-max-mib") == "15.5"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("table2_train_")) == [
        "table2_train_r50_c4__seed0.tar", "table2_train_r50_fpn__seed0.tar"]
    with tarfile.open(out / "table2_train_r50_fpn__seed0.tar") as tar:
        assert sorted(tar.getnames()) == ["r50_fpn__seed0/last_checkpoint", "r50_fpn__seed0/metrics.jsonl",
                                          "r50_fpn__seed0/model_0000900.pth", "r50_fpn__seed0/sessions.json"]
    with tarfile.open(out / "table2_train_r50_c4__seed0.tar") as tar:  # a training of older code: none
        assert "r50_c4__seed0/sessions.json" not in tar.getnames()
    assert "=== not carried (over 16 MiB): r50_c5_roialign__seed0" in log
    assert len(list(out.iterdir())) == 8  # all a lease's files: none left behind for lack of a slot


def test_without_a_clear_saving_the_table_keeps_16_images_nchw_and_the_jobs_asked(lease):
    # 32 images at 390 ms: 0.975x the schedule at 16, no real saving; NHWC only 2 % faster
    [argv], _, log = lease("mini_step", "table", timings=mini_step_json(390.0, 0.98), TABLE_JOBS="6")
    assert option(argv, "--images-per-batch") == "16" and "--channels-last" not in argv
    assert option(argv, "--jobs") == "6"
    # eight trainings of 32 that do not fit (8 x 20 GB x 1.15 > 0.85 x 140 GB) are not taken
    [argv], _, _ = lease("mini_step", "table", timings=mini_step_json(260.0, 0.9, peak_mib=20_000.0))
    assert option(argv, "--images-per-batch") == "16"


def stopped_training(tar_path: Path, name: str, iteration: int, images_per_batch: int, pointer: bool = True) -> None:
    """A training's folder as a deadline leaves it, packed as the table phase packs it
    (``pointer=False``: killed between its first checkpoint's rename and the pointer's)."""
    from mrcnn_edu.ablations import train_config
    from mrcnn_edu.engine import scale_for_batch

    folder = tar_path.parent / name
    folder.mkdir()
    planned = scale_for_batch(train_config("shapes", False, 0, "", None, images_per_batch))
    torch.save({"config": dataclasses.asdict(planned), "iteration": iteration}, folder / f"model_{iteration:07d}.pth")
    if pointer:
        (folder / "last_checkpoint").write_text(f"model_{iteration:07d}.pth\n")
    (folder / "metrics.jsonl").write_text("")
    with tarfile.open(tar_path, "w") as tar:
        tar.add(folder, arcname=name)
    shutil.rmtree(folder)


def test_a_later_lease_resumes_with_the_committed_batch_layout_and_carried_bodies(lease):
    tree = lease.tree
    (tree / "results" / "table2_miniature.json").write_text(json.dumps(committed(16, False)))
    carried = tree / ".carry"
    carried.mkdir()
    good, other = tree / "R-mini-50.pth", tree / "R-mini-101.pth"
    body(good)
    body(other, image_size=64)  # pre-trained for another input size: not this table's body
    with tarfile.open(carried / "table2_bodies.tar", "w") as tar:
        tar.add(good, arcname=good.name)
        tar.add(other, arcname=other.name)
    # trainings the last lease stopped: one of this table's schedule, one of another batch size
    stopped_training(carried / "table2_train_r50_c4__seed1.tar", "r50_c4__seed1", 1200, 16)
    stopped_training(carried / "table2_train_r50_c4__seed2.tar", "r50_c4__seed2", 600, 32)
    # mini_step would now favour 32 and NHWC; the committed trainings decide
    [argv], out, log = lease("table", timings=mini_step_json(260.0, 0.9))
    assert option(argv, "--images-per-batch") == "16" and "--channels-last" not in argv
    assert "=== carried training: r50_c4__seed1" in log
    assert "=== carried training dropped (another schedule): r50_c4__seed2" in log
    found = (tree.parent / "calls.txt.trainings_found").read_text().split()
    assert found == ["r50_c4__seed1"]  # what ablate found to resume
    assert option(argv, "--may-overrun") == "3"  # no mini_step.json this time: one slot more
    pretrain = tree / "runs" / "table2_miniature" / "pretrain"
    assert "=== carried body: runs/table2_miniature/pretrain/R-mini-50.pth" in log
    assert "=== carried body dropped (another pre-training): runs/table2_miniature/pretrain/R-mini-101.pth" in log
    assert sorted(p.name for p in pretrain.glob("*.pth")) == ["R-mini-50.pth"]
    # the kept body goes back out, for the lease after this one
    with tarfile.open(out / "table2_bodies.tar") as tar:
        assert tar.getnames() == ["R-mini-50.pth"]


def test_table_batch_set_by_hand_wins_and_a_spent_budget_starts_nothing(lease):
    [argv], _, _ = lease("mini_step", "table", timings=mini_step_json(260.0, 0.9), TABLE_BATCH="64",
                         TABLE_CHANNELS_LAST="no")
    assert option(argv, "--images-per-batch") == "64" and "--channels-last" not in argv
    calls, out, log = lease("table", timings=mini_step_json(260.0, 0.9), budget=10)
    assert calls == [] and "=== table: skipped, budget spent" in log
    with tarfile.open(out / "table2_bodies.tar") as tar:  # the bodies it holds still go back out
        assert tar.getnames() == ["R-mini-50.pth"]


def test_only_the_trainings_the_report_leaves_are_carried_out(lease, tmp_path):
    # r50_fpn seed 0 was finished in an earlier lease (its result is in the committed report, not
    # on this machine): carried in again by mistake, it must not take a file slot
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"runs": {}, "sessions": [{"left": [["r50_c4", 0]]}]}))
    _, out, log = lease("table", timings=mini_step_json(260.0, 0.9), FAKE_REPORT=str(report))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("table2_train_")) == [
        "table2_train_r50_c4__seed0.tar"]
    assert "=== carried out: r50_fpn__seed0" not in log


def test_a_training_killed_before_its_first_pointer_is_carried_out_with_its_newest_checkpoint(lease):
    """Its checkpoint is whole (renamed into place) but ``last_checkpoint`` was never written:
    ``engine`` resumes from the newest ``model_*.pth`` then, so the lease must carry that file."""
    _, out, log = lease("table", timings=mini_step_json(260.0, 0.9), FAKE_NO_POINTER="r50_fpn__seed0")
    assert "=== carried out: r50_fpn__seed0 at model_0000900.pth" in log, log
    with tarfile.open(out / "table2_train_r50_fpn__seed0.tar") as tar:
        assert sorted(tar.getnames()) == ["r50_fpn__seed0/metrics.jsonl", "r50_fpn__seed0/model_0000900.pth",
                                          "r50_fpn__seed0/sessions.json"]


def test_a_carried_wheel_that_does_not_install_is_in_the_log_and_the_phases_still_run(lease):
    # pip's answer went to the terminal alone: session.log, the file that comes back and is kept
    # in results/gpu/, said only "pycocotools missing", not why
    wheels = lease.tree / ".whl"
    wheels.mkdir()
    (wheels / "pycocotools-2.0.10-cp312-abi3-manylinux_2_17_x86_64.whl").write_bytes(b"")
    [argv], out, log = lease("mini_step", "table", timings=mini_step_json(260.0, 0.9),
                             FAKE_PIP_ERROR="ERROR: not a supported wheel on this platform.")
    assert "ERROR: not a supported wheel on this platform." in log
    assert "=== carried wheels NOT installed" in log
    assert (out / "mini_step.json").is_file() and option(argv, "--images-per-batch") == "32"


def test_the_log_names_the_code_that_ran(lease):
    # the device gets the working tree, often with uncommitted changes, and maybe no .git: the
    # log carries a digest of the sources that the CPU machine can recompute (docs/gpu.md)
    import hashlib

    tree = lease.tree
    (tree / "mrcnn_edu").mkdir()
    (tree / "mrcnn_edu" / "x.py").write_text("print(1)\n")
    (tree / "mrcnn_edu" / "k.cu").write_text("// kernel\n")
    _, _, log = lease("table", timings=mini_step_json(260.0, 0.9), budget=10)
    files = sorted(str(p.relative_to(tree)) for d in ("bench", "mrcnn_edu", "tests") if (tree / d).is_dir()
                   for p in (tree / d).rglob("*") if p.suffix in (".py", ".cu", ".sh") and p.is_file())
    listing = "".join(f"{hashlib.sha256((tree / f).read_bytes()).hexdigest()}  {f}\n" for f in files)
    digest = hashlib.sha256(listing.encode()).hexdigest()[:16]
    assert f"source digest {digest}" in log


def test_a_lease_without_the_committed_report_keeps_the_batch_of_the_trainings_it_resumes(lease):
    # the first lease trained in steps of 32 and carried two trainings out; its report was not
    # copied into results/ (or it never wrote one): the batch came out as the schedule's 16, and
    # both carried trainings were dropped as "another schedule", a lease's training thrown away
    carried = lease.tree / ".carry"
    carried.mkdir()
    stopped_training(carried / "table2_train_r50_c4__seed0.tar", "r50_c4__seed0", 400, 32)
    # (this one without its last_checkpoint: its batch was read as "unreadable" and ignored)
    stopped_training(carried / "table2_train_r50_fpn__seed0.tar", "r50_fpn__seed0", 300, 32, pointer=False)
    [argv], _, log = lease("table", timings=mini_step_json(390.0, 0.98))
    assert "unreadable" not in log
    assert option(argv, "--images-per-batch") == "32" and "--channels-last" not in argv
    assert "=== carried training: r50_c4__seed0" in log and "=== carried training: r50_fpn__seed0" in log
    found = (lease.tree.parent / "calls.txt.trainings_found").read_text().split()
    assert found == ["r50_c4__seed0", "r50_fpn__seed0"]
