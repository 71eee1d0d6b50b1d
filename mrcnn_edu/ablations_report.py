"""Table 2's results: per-seed records -> mean ± std, gain rows, the paper's claims, markdown.

The paper prints one number per row (one training each, COCO minival). A miniature's numbers
move with the seed, so every figure here is a mean over seeds with its spread:

- a row: ``mean ± std`` over seeds (sample std, ``ddof=1``; one seed shows no spread);
- a gain or any comparison of runs: ``Δ ± s.e.``, the difference of the runs' means and its
  standard error ``sqrt(Σ c_i² s_i² / n_i)`` (different runs are independent trainings; no
  pairing by seed is assumed);
- a claim of the paper (§4.2) is judged by ``t = Δ / s.e.``, signed so that the paper's
  direction is positive, against Student's t with the Welch-Satterthwaite degrees of freedom
  (:func:`welch_df`; three seeds per run leave about 4, where the 97.5 % point is 2.78, not
  the normal 1.96): "agrees" when ``t > t_0.975``, "same direction, within noise" when
  ``0 < t <= t_0.975``, "opposite direction, within noise" down to ``-t_0.975``, "contradicts"
  below. "Close" claims (class-agnostic vs -specific, RoIWarp vs RoIPool, max vs average) are
  equivalence tests (two one-sided tests at 5 %): "agrees (close)" when the 90 % interval
  ``|Δ| + t_0.95 s.e.`` stays under :data:`CLOSE_AP`, "disagrees" when ``|Δ| - t_0.95 s.e.`` is
  over it, "undecided" between. A run of one seed, or with no spread, gives no verdict beyond
  the sign: "same direction (no spread: ...)"; "close" claims name the gap and say it is
  untested, e.g. "|Δ| 0.10 < 1 AP, untested (no spread: 1 seed)". A claim whose trainings
  differ in more than its runs' ablation (input size, init, schedule, data or model config:
  :func:`mismatches`; e.g. rows kept from a session with other flags) is "not comparable
  (mixed ...)", not tested, and such rows and gains are marked "[mixed ...]".
  Trainings of one table share a pre-trained body and the seeds, so these tests treat runs as
  independent where they may be positively correlated: conservative for a difference of two
  runs, not necessarily for a contrast of four (C5's gain minus C4's), where two of the pairs
  enter with the same sign.

Each claim is tested on its own at 5 % (two-sided for "greater"), with no correction for
testing nineteen, and claims that share a run (``r50_c4`` is in ten) are correlated: a verdict
near its threshold is marginal, and one of nineteen true-null claims passing by chance is not
unlikely.

Metrics are stored as COCOeval gives them (fractions, ``metrics[iou_type][AP...]``) in the
records and shown in percent, as the paper prints them; ``APbb*`` are box AP.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from mrcnn_edu.ablations import GAINS, ROWS, RUNS, SUBTABLES, Row, body_name, model_config, stand_in, train_config
from mrcnn_edu.config import config_differences

__all__ = ["write_json_atomic", "result_path", "git_commit", "device_name", "mean_std", "format_mean_std", "contrast",
           "format_gain", "percent_metrics", "load_records", "check_same_schedule", "mismatches", "CLAIMS",
           "judge_claims", "summarise", "data_digests", "markdown_table", "write_report"]

MASK_KEYS = ("AP", "AP50", "AP75")
BOX_KEYS = ("APbb", "APbb50", "APbb75")
CLOSE_AP = 1.0  # "close": the paper's class-agnostic gap is 0.6 AP, its RoIWarp / RoIPool and max / avg 0.1-0.3

# Student's t quantiles by degrees of freedom, for the verdicts (no scipy in the project's
# dependencies), each rounded *up* at the second decimal; between entries t_quantile
# interpolates linearly, which errs large too (the quantile is convex in df): conservative. The
# fractional entries below 2 are there because two seeds per run give Welch df of 1-2, where a
# line from 1 to 2 would ask for up to 2.7 more than the true 97.5 % point. Computed from the
# t distribution's CDF (regularised incomplete beta), checked against the printed tables at
# integer df. 0.975: "greater" claims; 0.95: "close" (TOST at 5 %).
_T_975 = {1: 12.71, 1.25: 8.03, 1.5: 6.02, 1.75: 4.95, 2: 4.31, 3: 3.19, 4: 2.78, 5: 2.58, 6: 2.45,
          7: 2.37, 8: 2.31, 10: 2.23, 15: 2.14, 20: 2.09, 30: 2.05, 60: 2.01}
_T_95 = {1: 6.32, 1.25: 4.55, 1.5: 3.71, 1.75: 3.23, 2: 2.92, 3: 2.36, 4: 2.14, 5: 2.02, 6: 1.95,
         7: 1.90, 8: 1.86, 10: 1.82, 15: 1.76, 20: 1.73, 30: 1.70, 60: 1.68}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``); nan std for fewer than 2 values.

    Identical values give a std of exactly 0: the float mean of ``[30.1] * 3`` is
    30.100000000000005, which would leave a std of 4e-15, and a t-test would read that as
    certainty where the verdicts' rule says "no spread"."""
    if not values:
        return math.nan, math.nan
    if len(values) < 2:
        return values[0], math.nan
    if max(values) == min(values):
        return values[0], 0.0
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def format_mean_std(values: list[float], digits: int = 1) -> str:
    """``"30.3 ± 0.4"``; one value: ``"30.3"``; none: ``"–"``."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def contrast(terms: list[tuple[float, list[float]]]) -> tuple[float, float]:
    """``Σ c_i mean(x_i)`` and its standard error ``sqrt(Σ c_i² var(x_i) / n_i)``.

    Each term is ``(c_i, per-seed values of one run)``; nan if any run has no value, nan
    standard error if any has a single one.
    """
    if any(not values for _, values in terms):
        return math.nan, math.nan
    estimate, variance = 0.0, 0.0
    for coef, values in terms:
        mean, std = mean_std(values)
        estimate += coef * mean
        variance += coef**2 * std**2 / len(values)
    return estimate, math.sqrt(variance)


def welch_df(terms: list[tuple[float, list[float]]]) -> float:
    """The Welch-Satterthwaite degrees of freedom of :func:`contrast`'s standard error:
    ``V² / Σ (c_i² s_i² / n_i)² / (n_i - 1)`` with ``V = Σ c_i² s_i² / n_i``; nan when a run has
    fewer than 2 values or the runs have no spread at all."""
    parts = []
    for coef, values in terms:
        if len(values) < 2:
            return math.nan
        parts.append((coef**2 * mean_std(values)[1] ** 2 / len(values), len(values) - 1))
    variance = sum(v for v, _ in parts)
    if variance == 0:
        return math.nan
    return variance**2 / sum(v**2 / dof for v, dof in parts)


def t_quantile(df: float, level: float = 0.975) -> float:
    """Student's t quantile (0.975 or 0.95) at ``df`` degrees of freedom (Welch's are fractional):
    from a table, linear between its entries, its first entry below 1 and its last above 60."""
    table = {0.975: _T_975, 0.95: _T_95}[level]
    points = sorted(table)
    df = min(max(df, points[0]), points[-1])
    upper = next(d for d in points if d >= df)
    lower = max(d for d in points if d <= df)
    if upper == lower:
        return table[lower]
    return table[lower] + (df - lower) / (upper - lower) * (table[upper] - table[lower])


def format_gain(delta: float, se: float, digits: int = 1) -> str:
    """``"+5.5 ± 0.7"`` (difference ± its standard error)."""
    if math.isnan(delta):
        return "–"
    return f"{delta:+.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def percent_metrics(record: dict) -> dict[str, float]:
    """``{"AP": 31.2, ..., "APbb75": 40.1}`` in percent, from a run record's COCOeval fractions."""
    out = {}
    for iou_type, keys in (("segm", MASK_KEYS), ("bbox", BOX_KEYS)):
        for key, name in zip(keys, MASK_KEYS):
            value = record["metrics"].get(iou_type, {}).get(name)
            out[key] = math.nan if value is None else 100.0 * value  # None: nan in the JSON
    return out


# --- records: per-run files and a previous summary ----------------------------------------------


def _finite(obj):
    """nan -> None, so that the file is strict JSON (a std over one seed is nan)."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    return obj


def as_stored(obj):
    """``obj`` as a results file holds it after reading back (nan as None, tuples as lists)."""
    return json.loads(json.dumps(_finite(obj), sort_keys=True, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, synced, then rename: readers never see half
    a file, nor, after a power loss, an empty one (a record may be the table's only copy)."""
    from mrcnn_edu.checkpoint import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(_finite(data), indent=1, sort_keys=True, default=str) + "\n")


def result_path(workdir: str | Path, run: str, seed: int) -> Path:
    return Path(workdir) / "results" / f"{run}__seed{seed}.json"


# tracked folders that hold what the code produced, not code: a table's own summary
# (results/, --out's default) or an edited notebook must not make its next record "+dirty"
NOT_CODE = ("results", "notebooks")


def git_commit(folder: str | Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the checkout holding ``folder`` (default: this package's),
    "+dirty" if a tracked file outside :data:`NOT_CODE` differs from it; None outside git.

    The question it answers: was the code that produced a number the commit's code? Untracked
    files (new notes, a half-finished table's JSON) and the outputs in ``NOT_CODE`` do not
    change that answer, so they are not looked at.
    """
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/"]
    status += [f":(top,exclude){name}" for name in NOT_CODE]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=folder, timeout=10)
        dirty = subprocess.run(status, capture_output=True, text=True, cwd=folder, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("+dirty" if dirty else "")) if out.returncode == 0 else None


def device_name() -> str:
    """The GPU's name, or the CPU's."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def read_json(path: str | Path, advice: str):
    """The JSON in ``path``; ValueError naming the file and ``advice`` (what to do) if it does
    not parse: a cut-off or corrupt file stopped the whole table with a bare decoder message."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))  # as atomic_write_text writes it
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): {advice}") from err


SUMMARY_ADVICE = ("restore it (it is the file carried between leases) or move it aside; the records in the "
                  "workdir's results/ are read again either way")
RECORD_ADVICE = "restore it, or delete it to train that run and seed again"


def load_records(workdir: str | Path, summary_path: str | Path | None = None) -> dict:
    """``{(run, seed): record}`` from an earlier summary JSON, then the per-run files (newer)."""
    records = {}
    if summary_path and Path(summary_path).is_file():
        summary = read_json(summary_path, SUMMARY_ADVICE)
        for run, entry in summary.get("runs", {}).items():
            for seed, record in entry.get("seeds", {}).items():
                records[(run, int(seed))] = record
    folder = Path(workdir) / "results"
    for path in sorted(folder.glob("*__seed*.json")) if folder.is_dir() else []:
        record = read_json(path, RECORD_ADVICE)
        if not isinstance(record, dict) or not {"run", "seed"} <= record.keys():
            raise ValueError(f"{path} is no training record (it needs 'run' and 'seed'): {RECORD_ADVICE}")
        records[(record["run"], int(record["seed"]))] = record
    return records


SCHEDULE_KEYS = ("max_iter", "images_per_batch", "base_lr", "steps", "warmup_iters")  # as the records hold it


def _forget_advice(record: dict) -> str:
    """How to drop a refused record: it is kept in two places, and load_records reads both."""
    return (f"use another --workdir/--out, or delete its record from both places it is kept: "
            f"{result_path('<--workdir>', record['run'], record['seed'])} and its entry under \"runs\" in the "
            "summary JSON of --out (table2_<mode>.json)")


def check_same_schedule(record: dict, planned, pretrained: bool | None = None,
                        input_size: int | None = None) -> None:
    """ValueError if a finished run used another schedule than ``planned`` (a TrainConfig),
    started from scratch where ``pretrained`` is True (pre-trained where False), or was
    trained on other than ``input_size`` px inputs (the model's ``min_size_test``)."""
    from mrcnn_edu.engine import scale_for_batch

    where = _forget_advice(record)
    done_size = record_input_size(record)
    if input_size is not None and done_size is not None and done_size != input_size:
        raise ValueError(f"{record['run']} seed {record['seed']} was trained on {done_size} px inputs "
                         f"but this command plans {input_size} px (--input-size); {where}")
    was_pretrained = bool(record.get("init", {}).get("weights"))
    if pretrained is not None and was_pretrained != pretrained:
        how = {True: "from pre-trained weights", False: "from scratch"}
        raise ValueError(
            f"{record['run']} seed {record['seed']} was trained {how[was_pretrained]} but this command "
            f"plans {how[pretrained]} (--pretrain / --no-pretrain / --imagenet); {where}")

    planned = scale_for_batch(planned)  # records hold the schedule as it ran
    done = record.get("train_config", {})
    for key in SCHEDULE_KEYS:
        same = (tuple(done[key]) == tuple(getattr(planned, key)) if key == "steps"
                else done[key] == getattr(planned, key)) if key in done else True
        if not same:
            raise ValueError(
                f"{record['run']} seed {record['seed']} finished with {key}={done[key]} but this "
                f"command plans {key}={getattr(planned, key)}; {where}")


def check_same_model(record: dict, planned: dict) -> None:
    """ValueError if a finished run's ``model_config`` differs from ``planned`` (the run's
    ``dataclasses.asdict(model_config(...))`` through JSON, as records hold it): a changed
    head, pooler or body must not be averaged with the rest of its row."""
    differ = sorted(config_differences(record.get("model_config", {}), planned))
    if differ:
        raise ValueError(f"{record['run']} seed {record['seed']} was trained as another model: "
                         f"{'; '.join(differ[:6])}{' ...' if len(differ) > 6 else ''}; {_forget_advice(record)}")


# --- comparability: what the trainings of one row, gain or claim must share ------------------------
#
# `pending` checks the records of the runs and seeds a session selects against its plan. A
# summary also keeps other sessions' runs and seeds (`write_report`), made with other flags,
# maybe: the helpers below compare the records that meet in a row, a gain or a claim with
# each other instead.


def record_input_size(record: dict) -> int | None:
    """The shorter side the model resized the images to (``--input-size``); None if unrecorded."""
    return record.get("model_config", {}).get("transform", {}).get("min_size_test")


def init_kind(record: dict) -> str | None:
    """How a training's body started: "scratch", "pre-trained here" (``pretrain.py``'s body,
    which records its top-1) or "brought weights" (a file the user brought, e.g. ImageNet's);
    None for a record without an ``init`` (older files)."""
    if "init" not in record:
        return None
    init = record["init"]
    if not init.get("weights"):
        return "scratch"
    return "pre-trained here" if init.get("top1") is not None else "brought weights"


def record_schedule(record: dict) -> dict:
    """The record's :data:`SCHEDULE_KEYS` as it ran (lr steps as a tuple; JSON gives a list)."""
    ran = record.get("train_config", {})
    return {key: tuple(ran[key]) if isinstance(ran[key], list) else ran[key] for key in SCHEDULE_KEYS if key in ran}


@functools.lru_cache(maxsize=None)
def _recipe(run: str, dataset: str, quick: bool) -> tuple:
    """The run's own schedule before any flag: one for the miniature, ResNeXt's own on COCO (§3.1)."""
    plan = train_config(dataset, quick, 0, "", run=run)
    return tuple(getattr(plan, key) for key in SCHEDULE_KEYS)


@functools.lru_cache(maxsize=None)
def _ablated(run: str, dataset: str, quick: bool, size: int | None) -> frozenset[str]:
    """The model-config settings (dotted paths) in which ``run`` differs from the baseline
    ResNet-50-C4 by design: the settings its ablation changes, which its records may not share
    with another run's."""
    size = size if dataset != "coco" else None  # COCO's configs resize to 800 (model_config)
    mine, base = (as_stored(dataclasses.asdict(model_config(RUNS[name], dataset, quick, size)))
                  for name in (run, "r50_c4"))
    return frozenset(difference.split("=", 1)[0] for difference in config_differences(mine, base))


def mismatches(records: list[dict], dataset: str = "shapes", quick: bool = False) -> list[str]:
    """What the trainings ``records`` (of one row, gain or claim) differ in beyond their runs'
    own ablations: any of "input size", "init" (:func:`init_kind`), "schedule", "data" and
    "model" (the model config but the settings each run ablates); [] when they are comparable.

    A value a record does not hold (older files) is no difference. Schedules are compared
    between runs of one recipe (:func:`_recipe`): COCO's ResNeXt trains on its own, as the
    paper's did. Another input size is another model too; it is named once, as "input size".
    """

    def differ(values) -> bool:
        return len({value for value in values if value is not None}) > 1

    found = []
    if differ(record_input_size(r) for r in records):
        found.append("input size")
    if differ(init_kind(r) for r in records):
        found.append("init")
    recipes = collections.defaultdict(list)
    for r in records:
        recipes[_recipe(r["run"], dataset, quick)].append(record_schedule(r))
    if any(differ(schedule.get(key) for schedule in group) for group in recipes.values() for key in SCHEDULE_KEYS):
        found.append("schedule")
    if differ(r.get("data_digest") for r in records):
        found.append("data")
    if "input size" not in found and records:
        first = records[0]
        for r in records[1:]:
            skip = _ablated(r["run"], dataset, quick, record_input_size(r)) | \
                _ablated(first["run"], dataset, quick, record_input_size(first))
            if config_differences(r.get("model_config", {}), first.get("model_config", {}), skip=tuple(skip)):
                found.append("model")
                break
    return found


# --- the paper's claims (§4.2), as contrasts between runs ---------------------------------------

# (claim, [(coefficient, run, {metric: weight})], kind); kind "greater" or "close". "(2c)" and
# the like name the table a claim reads; claims the paper states only through its numbers are
# marked "as read from the table" (§4.2 says "much of the gain coming at high IoU (AP75)", and
# "a massive 7.3 points" for C5 against "about 3 points" for C4, not the contrasts themselves)
CLAIMS = [
    # §4.2: "It benefits from deeper networks (50 vs. 101) and advanced designs including FPN and ResNeXt"
    ("deeper: ResNet-101-C4 beats ResNet-50-C4 (2a)", [(1, "r101_c4", {"AP": 1}), (-1, "r50_c4", {"AP": 1})], "greater"),
    ("deeper: ResNet-101-FPN beats ResNet-50-FPN (2a)",
     [(1, "r101_fpn", {"AP": 1}), (-1, "r50_fpn", {"AP": 1})], "greater"),
    ("FPN beats C4, ResNet-50 (2a)", [(1, "r50_fpn", {"AP": 1}), (-1, "r50_c4", {"AP": 1})], "greater"),
    ("ResNeXt-101-FPN beats ResNet-101-FPN (2a)",
     [(1, "x101_fpn", {"AP": 1}), (-1, "r101_fpn", {"AP": 1})], "greater"),
    ("sigmoid beats softmax (2b)", [(1, "r50_c4", {"AP": 1}), (-1, "r50_c4_softmax", {"AP": 1})], "greater"),
    ("class-agnostic is close to class-specific (2b text)",
     [(1, "r50_c4", {"AP": 1}), (-1, "r50_c4_agnostic", {"AP": 1})], "close"),
    ("RoIAlign beats RoIPool on C4 (2c)", [(1, "r50_c4", {"AP": 1}), (-1, "r50_c4_roipool", {"AP": 1})], "greater"),
    ("RoIAlign beats RoIWarp, avg (2c)",
     [(1, "r50_c4", {"AP": 1}), (-1, "r50_c4_roiwarp_avg", {"AP": 1})], "greater"),
    ("RoIAlign beats RoIWarp, max (2c)",
     [(1, "r50_c4_roialign_max", {"AP": 1}), (-1, "r50_c4_roiwarp_max", {"AP": 1})], "greater"),
    ("RoIWarp is on par with RoIPool (2c text)",
     [(1, "r50_c4_roiwarp_max", {"AP": 1}), (-1, "r50_c4_roipool", {"AP": 1})], "close"),
    ("RoIAlign is insensitive to max vs average pooling (2c text)",
     [(1, "r50_c4", {"AP": 1}), (-1, "r50_c4_roialign_max", {"AP": 1})], "close"),
    ("RoIAlign's C4 gain over RoIPool is larger at AP75 than at AP50 (2c, as read from the table)",
     [(1, "r50_c4", {"AP75": 1, "AP50": -1}), (-1, "r50_c4_roipool", {"AP75": 1, "AP50": -1})], "greater"),
    ("RoIAlign's gain on C5 (stride 32) exceeds its gain on C4 (2c vs 2d, as read from the table)",
     [(1, "r50_c5_roialign", {"AP": 1}), (-1, "r50_c5_roipool", {"AP": 1}),
      (-1, "r50_c4", {"AP": 1}), (1, "r50_c4_roipool", {"AP": 1})], "greater"),
    ("RoIAlign beats RoIPool on C5 (2d)",
     [(1, "r50_c5_roialign", {"AP": 1}), (-1, "r50_c5_roipool", {"AP": 1})], "greater"),
    ("RoIAlign beats RoIPool on C5 at AP75 (2d)",
     [(1, "r50_c5_roialign", {"AP75": 1}), (-1, "r50_c5_roipool", {"AP75": 1})], "greater"),
    ("RoIAlign beats RoIPool on C5 in box AP (2d)",
     [(1, "r50_c5_roialign", {"APbb": 1}), (-1, "r50_c5_roipool", {"APbb": 1})], "greater"),
    ("with RoIAlign, stride-32 C5 beats stride-16 C4 (2c vs 2d)",
     [(1, "r50_c5_roialign", {"AP": 1}), (-1, "r50_c4", {"AP": 1})], "greater"),
    ("FCN beats the 2-fc MLP mask head (2e)", [(1, "r50_fpn", {"AP": 1}), (-1, "r50_fpn_mlp2", {"AP": 1})], "greater"),
    ("FCN beats the 3-fc MLP mask head (2e)", [(1, "r50_fpn", {"AP": 1}), (-1, "r50_fpn_mlp3", {"AP": 1})], "greater"),
]


def _paper_value(run: str, metric: str) -> float:
    for row in ROWS:
        if row.run == run and metric in row.paper:
            return row.paper[metric]
    return math.nan


def _verdict(kind: str, sign: float, delta: float, se: float, df: float) -> str:
    """The verdict of one claim (see the module docstring); ``sign`` is the paper's direction."""
    no_spread = " (no spread: 1 seed)" if math.isnan(se) else " (no spread: the seeds agree exactly)"
    if kind == "close":
        if math.isnan(se) or se == 0:  # the gap, and no test of it
            relation = "<" if abs(delta) < CLOSE_AP else "≥"
            return f"|Δ| {abs(delta):.2f} {relation} {CLOSE_AP:g} AP, untested" + no_spread
        margin = t_quantile(df, 0.95) * se
        if abs(delta) + margin < CLOSE_AP:
            return "agrees (close)"
        if abs(delta) - margin >= CLOSE_AP:
            return f"disagrees (|Δ| ≥ {CLOSE_AP:g} AP)"
        return f"undecided (|Δ| ± t·s.e. straddles {CLOSE_AP:g} AP)"
    signed = sign * delta
    if math.isnan(se) or se == 0:
        if signed == 0:
            return "no difference" + no_spread
        return ("same direction" if signed > 0 else "opposite direction") + no_spread
    t = signed / se
    k = t_quantile(df, 0.975)
    if t > k:
        return "agrees"
    if t > 0:
        return "same direction, within noise"
    if t == 0:
        return "no difference"
    return "opposite direction, within noise" if t >= -k else "contradicts"


def judge_claims(values: dict[str, list[dict[str, float]]]) -> list[dict]:
    """Each claim of :data:`CLAIMS` with the paper's Δ, ours (± s.e., its degrees of freedom and
    seeds per run) and a verdict.

    ``values[run]`` is the list of per-seed percent metrics (:func:`percent_metrics`). A seed
    whose metric COCOeval could not compute (nan) is left out of that metric, not of the run.
    """
    judged = []
    for text, terms, kind in CLAIMS:
        paper = sum(c * w * _paper_value(run, m) for c, run, weights in terms for m, w in weights.items())
        per_run = [(c, [x for x in (sum(w * seed[m] for m, w in weights.items()) for seed in values.get(run, []))
                        if math.isfinite(x)])
                   for c, run, weights in terms]
        delta, se = contrast(per_run)
        df = welch_df(per_run)
        if any(not values.get(run) for _, run, _ in terms):
            verdict = "not run"
        elif math.isnan(delta):
            verdict = "no score"  # trained, but COCOeval gave no value for the metric
        else:
            verdict = _verdict(kind, math.copysign(1.0, paper) if paper == paper else 1.0, delta, se, df)
        judged.append({"claim": text, "kind": kind, "paper_delta": round(paper, 2), "delta": delta, "se": se,
                       "df": df, "n": {run: len(xs) for (_, xs), (_, run, _) in zip(per_run, terms)},
                       "verdict": verdict, "runs": sorted({run for _, run, _ in terms})})
    return judged


# --- the summary and its markdown ---------------------------------------------------------------


def summarise(rows: list[Row], runs: list[str], records: dict, seeds: int, mode: str = "miniature",
              dataset: str = "shapes") -> dict:
    """Per run: configs and per-seed records; per row: the paper's figures and ours (mean, std).

    Each row, gain and claim also says what its trainings differ in beyond the runs' ablations
    (``"mixed"``, :func:`mismatches`); a claim over such trainings is "not comparable", not tested.
    """
    values = {run: [percent_metrics(records[(run, s)]) for s in range(seeds) if (run, s) in records]
              for run in runs}
    trainings = {run: [records[(run, s)] for s in range(seeds) if (run, s) in records] for run in runs}

    def mixed(*names: str) -> list[str]:
        return mismatches([r for name in names for r in trainings.get(name, [])], dataset, mode == "quick")

    run_entries = {}
    for run in runs:
        seeds_done = {str(s): records[(run, s)] for s in range(seeds) if (run, s) in records}
        run_entries[run] = {"paper_model": RUNS[run].paper_name(), "stand_in": stand_in(RUNS[run], mode),
                            "note": RUNS[run].note, "seeds": seeds_done}
    row_entries = []
    for row in rows:
        ours = {}
        for key in MASK_KEYS + (BOX_KEYS if row.table == "2d" else ()):
            per_seed = [v[key] for v in values[row.run] if math.isfinite(v[key])]  # n: seeds with a score
            mean, std = mean_std(per_seed)
            ours[key] = {"mean": mean, "std": std, "n": len(per_seed), "values": per_seed}
        row_entries.append({"table": row.table, "label": row.label, "run": row.run,
                            "stand_in": stand_in(RUNS[row.run], mode), "paper": row.paper, "ours": ours,
                            "mixed": mixed(row.run)})
    gains = []
    for table, label, better, worse in GAINS:
        if better in values and worse in values:
            keys = MASK_KEYS + (BOX_KEYS if table == "2d" else ())
            cells = {k: contrast([(c, [v[k] for v in values[run] if math.isfinite(v[k])])
                                  for c, run in ((1, better), (-1, worse))])
                     for k in keys}
            paper = {k: round(_paper_value(better, k) - _paper_value(worse, k), 1) for k in keys}
            gains.append({"table": table, "label": label, "paper": paper,
                          "ours": {k: {"delta": d, "se": s} for k, (d, s) in cells.items()},
                          "mixed": mixed(better, worse)})
    claims = [c for c in judge_claims(values) if set(c["runs"]) <= set(runs)]
    for claim in claims:  # trainings that differ in more than the ablation: no test
        claim["mixed"] = mixed(*claim["runs"])
        if claim["mixed"] and claim["verdict"] not in ("not run", "no score"):
            claim["verdict"] = f"not comparable (mixed {', '.join(claim['mixed'])})"
    return {"runs": run_entries, "rows": row_entries, "gains": gains, "claims": claims,
            "bodies": body_digests(records, runs, seeds), "scratch": scratch_trainings(records, runs, seeds)}


def body_digests(records: dict, runs: list[str], seeds: int) -> dict[str, dict[str, list[str]]]:
    """``{body: {digest: ["run seed s", ...]}}``: which trainings started from which pre-trained
    weights (``ablations.weights_digest``). One digest per body: every row started from the same
    body; more: sessions that pre-trained it anew got other weights. Records without a digest
    (from scratch: :func:`scratch_trainings`; or older files) are left out."""
    bodies: dict[str, dict[str, list[str]]] = {}
    for run in runs:
        for seed in range(seeds):
            digest = records.get((run, seed), {}).get("init", {}).get("digest")
            if digest:
                bodies.setdefault(body_name(RUNS[run]), {}).setdefault(digest, []).append(f"{run} seed {seed}")
    return bodies


def scratch_trainings(records: dict, runs: list[str], seeds: int) -> dict[str, list[str]]:
    """``{body: ["run seed s", ...]}``: the trainings whose body started from scratch, by the
    body their run would have been pre-trained as."""
    scratch: dict[str, list[str]] = {}
    for run in runs:
        for seed in range(seeds):
            if (run, seed) in records and init_kind(records[(run, seed)]) == "scratch":
                scratch.setdefault(body_name(RUNS[run]), []).append(f"{run} seed {seed}")
    return scratch


def _nan(value) -> float:
    """A summary's number, None (a nan written to JSON) read back as nan."""
    return math.nan if value is None else value


def _cell(entry: dict | None) -> str:
    return "–" if entry is None else format_mean_std(entry["values"])


def _mixed(entry: dict) -> str:
    """The mark of a row or gain whose trainings differ in more than the ablation, e.g. " **[mixed schedule]**"."""
    return f" **[mixed {', '.join(entry['mixed'])}]**" if entry.get("mixed") else ""


def _runs_by_input_size(summary: dict) -> dict[int, list[str]]:
    """``{size: [runs with a training at that size]}``, from the summary's records."""
    by_size: dict[int, list[str]] = {}
    for run, entry in summary.get("runs", {}).items():
        if not entry.get("in_table", True):  # a run no longer in RUNS
            continue
        for record in entry["seeds"].values():
            runs = by_size.setdefault(record_input_size(record), [])
            if run not in runs:
                runs.append(run)
    return by_size


def _trainings_across_setups(summary: dict) -> list[str]:
    """``["r50_c4 seed 0: NVIDIA H100 80GB HBM3 from iteration 0, NVIDIA H200 from 1200", ...]``:
    the trainings whose sessions (``ablations.log_session``) ran on more than one device, commit
    or torch."""
    spanning = []
    for run, entry in summary.get("runs", {}).items():
        for seed, record in entry.get("seeds", {}).items():
            sessions = record.get("sessions", [])
            setups = [(s.get("device"), s.get("git_commit"), s.get("torch")) for s in sessions]
            if len(set(setups)) > 1:
                spanning.append(f"{run} seed {seed}: " + ", ".join(
                    f"{s.get('device')} (commit {str(s.get('git_commit'))[:12]}, torch {s.get('torch')}) from "
                    f"iteration {s.get('from_iteration')}" for s in sessions))
    return spanning


def markdown_table(summary: dict) -> str:
    """Every sub-table with the paper's figures beside ours, the gain rows and the claims."""
    mode = summary.get("mode", "")
    lines = [f"# Table 2 of Mask R-CNN, reproduced ({mode}, dataset {summary.get('dataset', '?')})", "",
             "Ours: mean ± std over seeds (n = the seeds with a mask AP; a seed COCOeval gave no AP is left "
             "out); gains: Δ ± standard error. "
             "Paper: COCO minival, one training per row. Mask AP unless noted; APbb = box AP.", ""]
    sizes = summary.get("input_size", [])
    if len(sizes) == 1 and summary.get("dataset") == "shapes":
        lines += [f"Inputs: the synthetic images resized to {sizes[0]} px (shorter side) "
                  "in the model (`--input-size`).", ""]
    elif len(sizes) > 1:
        by_size = _runs_by_input_size(summary)
        lines += [f"**Inputs: the trainings ran at {len(sizes)} sizes** (shorter side, `--input-size`): "
                  + "; ".join(f"{size} px: {', '.join(by_size.get(size, []))}" for size in sizes)
                  + ". Rows, gains and claims that mix them are marked.", ""]
    schedules = summary.get("schedules", [])
    for plan in schedules:
        lines += [f"Schedule: {plan['max_iter']} iterations of {plan['images_per_batch']} images "
                  f"({plan['max_iter'] * plan['images_per_batch']:,} images), lr {plan['base_lr']:g}, "
                  f"÷10 at {', '.join(map(str, plan['steps']))}, warm-up {plan['warmup_iters']} "
                  f"(`--images-per-batch`, `--max-iter`); {plan['trainings']} training(s)"
                  + (f" of {', '.join(plan['runs'])}." if len(schedules) > 1 and plan.get("runs") else "."), ""]
    if summary.get("channels_last"):
        lines += [f"Convolutions in NHWC (`--channels-last`) in {summary['channels_last']} training(s): "
                  "the same arithmetic in another summation order.", ""]
    if summary.get("dataset") == "coco":
        lines += ["The RPN trains jointly with the heads, sharing the body's features (approximate joint "
                  "training, as the released code); the paper's ablations trained it separately, not sharing "
                  "features (§3.1, \"for convenient ablation\").", ""]
    if mode == "quick":
        lines += ["**Quick mode: a few CPU iterations on 64 px images. These numbers mean nothing;**",
                  "**they only show that the code path runs.**", ""]
    for table, title in SUBTABLES.items():
        rows = [r for r in summary["rows"] if r["table"] == table]
        if not rows:
            continue
        keys = MASK_KEYS + (BOX_KEYS if table == "2d" else ())
        lines += [f"## ({table[1]}) {title}", "",
                  "| paper row | model trained here | n (seeds with AP) | " + " | ".join(f"{k} ours" for k in keys)
                  + " | " + " | ".join(f"{k} paper" for k in keys) + " |",
                  "|---" * (3 + 2 * len(keys)) + "|"]
        for r in rows:
            n = r["ours"]["AP"]["n"]
            ours = " | ".join(_cell(r["ours"].get(k)) for k in keys)
            paper = " | ".join(f"{r['paper'][k]:.1f}" if k in r["paper"] else "–" for k in keys)
            lines.append(f"| {r['label']}{_mixed(r)} | {r['stand_in']} | {n} | {ours} | {paper} |")
        gains = [g for g in summary["gains"] if g["table"] == table]
        for g in gains:
            ours = " | ".join(format_gain(g["ours"][k]["delta"], g["ours"][k]["se"]) for k in keys)
            paper = " | ".join(f"{g['paper'][k]:+.1f}" for k in keys)
            lines.append(f"| **{g['label']}**{_mixed(g)} | | | {ours} | {paper} |")
        lines.append("")
        if any(entry.get("mixed") for entry in rows + gains):
            lines += ["**[mixed ...]**: the row averages (the gain compares) trainings that differ in more than "
                      "the ablation (input size, init, schedule, data or model config), e.g. from sessions run "
                      "with other flags; each training's record is in the JSON under \"runs\".", ""]
    if summary["claims"]:
        lines += ["## The paper's claims, judged against the spread over seeds", "",
                  "| claim | paper Δ | ours Δ ± s.e. | seeds per run | verdict |", "|---|---|---|---|---|"]
        lines += [f"| {c['claim']} | {c['paper_delta']:+.1f} | {format_gain(_nan(c['delta']), _nan(c['se']))} | "
                  f"{'/'.join(str(n) for n in c.get('n', {}).values()) or '–'} | {c['verdict']} |"
                  for c in summary["claims"]]
        lines += ["", "Verdict rule: t = Δ / s.e., signed so that the paper's direction is positive, against "
                  "Student's t with Welch's degrees of freedom: agrees if t > t_0.975, "
                  "within noise if |t| <= t_0.975, contradicts if t < -t_0.975. 'Close' claims: agrees if the 90 % "
                  f"interval |Δ| + t_0.95 s.e. stays under {CLOSE_AP:g} AP, disagrees if |Δ| - t_0.95 s.e. is over it, "
                  "else undecided. Runs are treated as independent trainings. t_0.975 is 2.78 when both runs "
                  "have 3 seeds of equal spread (4 df), up to 4.31 when their spreads differ (2 df); 2 seeds per "
                  "run give 1-2 df (4.31-12.71). Each claim is tested on its own, with no correction for "
                  "testing several: a verdict near its threshold is marginal. A run of 1 seed, or with no "
                  "spread, gives the sign only ('close' claims: the gap against "
                  f"{CLOSE_AP:g} AP), untested. Trainings that differ in more than the runs' ablation (input "
                  "size, init, schedule, data or model config) are 'not comparable', not tested.", ""]
    bodies, scratch = summary.get("bodies", {}), summary.get("scratch", {})
    if bodies or scratch:
        lines += ["## Pre-trained bodies", ""]
        for body in dict.fromkeys([*bodies, *scratch]):
            digests, from_scratch = bodies.get(body, {}), scratch.get(body, [])
            trainings, digest = sum(len(v) for v in digests.values()), next(iter(digests), None)
            scratch_text = f"{len(from_scratch)} training(s) started from scratch"
            if not digests:
                line = f"- {body}: {scratch_text}"
            elif len(digests) > 1:
                line = (f"- **{body}: {len(digests)} different pre-trained bodies** (a session re-made it with "
                        "other weights): " + "; ".join(f"{d}: {', '.join(v)}" for d, v in digests.items()))
            elif from_scratch:
                line = f"- {body}: {trainings} training(s) started from the weights with digest {digest}"
            elif trainings == 1:
                line = f"- {body}: one training, from the weights with digest {digest}"
            else:
                line = f"- {body}: all {trainings} trainings started from the same weights (digest {digest})"
            if digests and from_scratch:  # a mix: name the trainings from scratch
                line += f"; **{scratch_text}**: {', '.join(from_scratch)}"
            lines.append(line + ".")
        lines.append("")
    data = summary.get("data", {})
    recorded = {digest: trainings for digest, trainings in data.items() if digest != "unrecorded"}
    if len(recorded) > 1:
        lines += ["## Data", "", f"**The trainings ran on {len(recorded)} different data sets**: "
                  + "; ".join(f"{d}: {', '.join(v)}" for d, v in recorded.items())
                  + ". Rows that mix them compare more than the ablation.", ""]
    elif recorded:
        (digest, trainings), = recorded.items()
        unrecorded = len(data.get("unrecorded", []))
        saw = (f"The training saw the data with digest {digest}" if len(trainings) == 1 else
               f"All {len(trainings)} trainings with a record of it saw the same data (digest {digest})")
        lines += ["## Data", "", saw + (f"; {unrecorded} older record(s) do not say." if unrecorded else "."), ""]
    retired = {run: entry for run, entry in summary.get("runs", {}).items() if not entry.get("in_table", True)}
    if retired:
        lines += ["## Records not in this table", "", "Kept in the JSON (under \"runs\") but not part of the "
                  "current table, its rows or its claims: their run names are no longer in `ablations.RUNS` "
                  "(renamed or removed): " + ", ".join(f"{run} ({len(entry['seeds'])} seed(s))"
                                                        for run, entry in retired.items()) + ".", ""]
    spanning = _trainings_across_setups(summary)
    if spanning:
        lines += ["## Trainings resumed on another device, commit or torch", "",
                  "Stopped at one session's deadline and resumed in another; each record's own device and "
                  "commit are its last session's, its \"sessions\" list has them all: " + "; ".join(spanning) + ".", ""]
    sessions = summary.get("sessions", [])
    if sessions:
        lines += ["## Runs", ""] + [
            f"- {s['started']}: {s['trained']} trainings, {s['elapsed_s']:.0f} s wall, {s['jobs']} at a time "
            f"on {s['device']}, commit {s['git_commit']}" + (f", bodies {s['init']}" if s.get("init") else "")
            + (f", failed {s['failed']}" if s["failed"] else "")
            + (f", given up after failing in earlier sessions {s['given_up']}" if s.get("given_up") else "")
            + (f", {len(s['left'])} left at the deadline" if s.get("left") else "")
            + (" (" + ", ".join(f"{name} saved at iteration {at}" for name, at in s["saved"].items())
               + ", resumed from there)" if s.get("saved") else "")
            for s in sessions] + [""]
        total = sum(s["elapsed_s"] for s in sessions)
        lines += [f"Wall time over all sessions: {total / 60:.1f} min.", ""]
    return "\n".join(lines)


def write_report(rows: list[Row], runs: list[str], seeds: int, mode: str, dataset: str, records: dict,
                 summary_path: str | Path, session: dict | None = None) -> dict:
    """Write ``table2_<mode>.json`` (everything) and ``.md`` (the tables) beside each other.

    The summary keeps every training it knows of, not only this session's selection: a session
    run with ``--rows 2b`` or ``--seeds 1`` beside an earlier, fuller table must not drop that
    table's other rows and seeds (the summary may be their only copy: a lease's per-run files
    stay on its machine). So rows of other runs that have records, and seeds beyond ``seeds``,
    stay in it. Those were made by other sessions, maybe with other flags: the rows, gains and
    claims whose trainings differ in more than the ablation are marked (:func:`summarise`).
    Records of runs no longer in :data:`RUNS` (renamed, removed) are kept too, marked
    ``"in_table": false``, and left out of the table.
    """
    summary_path = Path(summary_path)
    previous = read_json(summary_path, SUMMARY_ADVICE) if summary_path.is_file() else {}
    known = {run for run, _ in records if run in RUNS}
    rows = list(rows) + [row for row in ROWS if row.run in known and row not in rows]
    runs = list(runs) + [run for run in RUNS if run in known and run not in runs]
    retired = {key: r for key, r in records.items() if key[0] not in RUNS}
    records = {key: r for key, r in records.items() if key[0] in runs}
    seeds = max([seeds, *(seed + 1 for _, seed in records)])
    sizes = {record_input_size(r) for r in records.values()}
    # one schedule, unless the summary keeps trainings that other sessions made with another
    schedules: dict[tuple, list[str]] = collections.defaultdict(list)  # schedule -> "run" per training
    for (run, _), record in sorted(records.items()):
        schedule = record_schedule(record)
        if len(schedule) == len(SCHEDULE_KEYS):
            schedules[tuple(schedule[k] for k in SCHEDULE_KEYS)].append(run)
    summary = {"table": "2", "mode": mode, "dataset": dataset, "seeds": seeds,
               "input_size": sorted(sizes - {None}),  # more than one: the rows that mix them are marked
               "schedules": [dict(zip(SCHEDULE_KEYS, key), trainings=len(ran), runs=sorted(set(ran)))
                             for key, ran in sorted(schedules.items())],
               # trainings with NHWC convolutions (--channels-last): the same numbers, other timings
               "channels_last": sum(bool(r.get("train_config", {}).get("channels_last")) for r in records.values()),
               "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "sessions": previous.get("sessions", []) + ([session] if session else []),
               **summarise(rows, runs, records, seeds, mode, dataset)}
    for run in dict.fromkeys(run for run, _ in sorted(retired)):  # kept: the summary may be their only copy
        summary["runs"][run] = {"in_table": False, "note": "not in ablations.RUNS: not part of this table",
                                "seeds": {str(seed): r for (name, seed), r in sorted(retired.items()) if name == run}}
    summary["data"] = data_digests(records)
    if len(set(summary["data"]) - {"unrecorded"}) > 1:  # run_table refuses this only for what it trains
        print(f"warning: {summary_path}: the trainings ran on {len(set(summary['data']) - {'unrecorded'})} "
              f"different data sets (digests {', '.join(sorted(set(summary['data']) - {'unrecorded'}))}); "
              "their rows mix them", file=sys.stderr)
    write_json_atomic(summary_path, summary)
    write_text_atomic(summary_path.with_suffix(".md"), markdown_table(summary))
    return summary


def data_digests(records: dict) -> dict[str, list[str]]:
    """``{data_digest: ["run seed s", ...]}`` over the records ("unrecorded" for records from
    before the digest existed): one key when every training saw the same data."""
    seen: dict[str, list[str]] = {}
    for (run, seed), record in sorted(records.items()):
        seen.setdefault(record.get("data_digest") or "unrecorded", []).append(f"{run} seed {seed}")
    return seen
