"""The training loop: SGD with warm-up and step decay, AMP, DDP, checkpoints, progress, curves.

The paper's recipe (§3.1 "Training"): "We train on 8 GPUs (so effective minibatch size is 16)
for 160k iterations, with a learning rate of 0.02 which is decreased by 10 at the 120k
iteration. We use a weight decay of 0.0001 and momentum of 0.9." Keypoints (§5): 90k
iterations, lr ÷10 at 60k and 80k. :class:`TrainConfig` carries these defaults.

Two additions the paper inherits from its code base rather than states:

- **Warm-up.** Detectron (and maskrcnn-benchmark) raise the learning rate linearly from
  ``base_lr / 3`` to ``base_lr`` over the first 500 iterations (Goyal et al. 2017, "Accurate,
  Large Minibatch SGD"); large learning rates on a freshly initialised head otherwise diverge.
- **The linear scaling rule** (Goyal et al. 2017, used by Detectron): with ``k`` times fewer
  images per batch, use ``k`` times smaller learning rate and ``k`` times *more* iterations
  (steps and warm-up too), so that the model sees the same number of epochs. On 1 GPU with
  2 images: lr 0.0025, 1.28M iterations. :func:`scale_for_batch` applies it; turn it off
  with ``scale_schedule=False`` to use the numbers as written.

Weight decay: on every trained parameter, biases included, as detectron2 does. Detectron (the
paper's code base) and maskrcnn-benchmark exempt biases from it and give them twice the
learning rate (Detectron's ``BIAS_WEIGHT_DECAY: False``, ``BIAS_DOUBLE_LR: True``;
maskrcnn-benchmark's ``WEIGHT_DECAY_BIAS: 0``, ``BIAS_LR_FACTOR: 2``); we do neither. The
parameters of normalisation layers (GroupNorm / BatchNorm scales and shifts, present only in
miniature models: the paper's backbones use frozen BN) get ``weight_decay_norm`` (0 by default,
as in detectron2), because decaying a scale towards zero fights the normalisation.

What one iteration does (:func:`train` reads top to bottom): fetch a batch whose content is a
function of ``(seed, iteration)`` (``distributed.py``), set ``lr_at(iteration)``, forward under
autocast, backward, average the loss terms over processes, stop with :class:`NonFiniteLossError`
if one is nan/inf, or :class:`NonFiniteGradientError` if the losses are finite but a gradient is
not (both before the optimizer can spoil the weights), SGD step; then log, checkpoint
(``checkpoint.py``), evaluate. The loss terms and the gradient norm reach the host in one read,
after the backward pass has been queued: one synchronisation per step on a GPU in fp32 and bf16;
under ``amp="fp16"`` there is a second, as ``GradScaler.step`` reads its ``found_inf`` flag to
decide whether to skip the step. Resuming loads the model, optimizer, scaler and RNG states, and
the run continues exactly as if it had never stopped; an evaluation the checkpoint came before
but whose result never reached ``metrics.jsonl`` (it failed, or the run was stopped in it) runs
first.

A run never silently replaces another: a fresh run (``resume=False``) refuses an
``output_dir`` that already holds checkpoints or a ``last_checkpoint`` file, unless
``overwrite=True`` says to delete them and start afresh there.

Stopped politely, a run loses nothing: on ``SIGTERM`` (what a scheduler, ``timeout`` or a lent
machine's deadline sends before it kills) a single-process run finishes the iteration it is in,
writes a checkpoint and raises :class:`TrainingStopped`; the same call with ``resume=True``
continues from there. Under DDP the ranks would have to agree on the iteration to stop at, so
there SIGTERM keeps its default meaning and the last periodic checkpoint is what remains.
"""
from __future__ import annotations

import bisect
import contextlib
import ctypes
import gc
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .checkpoint import (LAST_CHECKPOINT_FILE, OVERWRITING, atomic_write_text, capture_rng_state,
                         checkpoint_files, checkpoint_path, last_checkpoint, load_checkpoint,
                         newest_checkpoint, point_last_checkpoint, preserved_rng, restore_rng_state,
                         save_checkpoint)
from .distributed import (DistInfo, InfiniteBatchSampler, SeededSamples, all_reduce_mean,
                          init_distributed)

__all__ = [
    "TrainConfig", "NonFiniteLossError", "NonFiniteGradientError", "TrainingStopped", "grad_norm", "train",
    "lr_at", "scaled_lr",
    "scale_for_batch", "describe_scaling", "build_optimizer", "to_device", "seed_everything",
    "plot_loss_curves", "keep_freed_memory", "resume_mismatch", "model_mismatch", "model_config_mismatch",
    "prune_checkpoints",
]

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """How to train; the defaults are the paper's COCO recipe (§3.1) for 16 images per batch."""

    base_lr: float = 0.02  # §3.1, for 16 images per batch ("ResNeXt ... 0.01" with 8)
    momentum: float = 0.9  # §3.1
    weight_decay: float = 1e-4  # §3.1
    weight_decay_norm: float = 0.0  # GN/BN scales and shifts; detectron2's default
    max_iter: int = 160_000  # §3.1 (keypoints §5: 90_000)
    steps: tuple[int, ...] = (120_000,)  # §3.1: lr ÷10 at 120k (keypoints: (60_000, 80_000))
    gamma: float = 0.1  # §3.1 "decreased by 10"
    warmup_iters: int = 500  # not in the paper: Detectron's default (Goyal et al. 2017)
    warmup_factor: float = 1.0 / 3.0  # Detectron's: start at base_lr / 3, rise linearly
    images_per_batch: int = 16  # total over all processes: §3.1 "8 GPUs ... 16"
    reference_batch: int = 16  # the batch size base_lr, max_iter, steps were written for
    scale_schedule: bool = True  # linear scaling rule when images_per_batch != reference
    clip_grad: float | None = None  # max gradient norm; the paper clips nothing
    amp: str = "none"  # "none" | "bf16" | "fp16" (fp16 with GradScaler, CUDA only)
    # NHWC weights and activations: what cuDNN's low-precision convolutions run natively (NCHW
    # ones are transposed around each call); the numbers are the same up to summation order
    channels_last: bool = False
    device: str = "auto"  # "auto" (CUDA if available) | "cuda" | "cpu"
    seed: int = 0  # data order, augmentation, dropout: all derive from it
    num_workers: int = 2  # DataLoader processes per training process
    output_dir: str = "runs/train"  # checkpoints, metrics.jsonl, loss_curves.png
    checkpoint_period: int = 5000  # iterations between checkpoints (0: only at the end)
    keep_checkpoints: int = 0  # the newest N model_*.pth stay, older ones are deleted (0: all)
    eval_period: int = 0  # iterations between evaluations (0: only at the end)
    log_period: int = 20  # iterations between metrics.jsonl lines
    resume: bool | str = False  # True: newest checkpoint in output_dir; or a path
    # a fresh run (resume False) in an output_dir holding another run's checkpoints: False
    # refuses (it would truncate that run's metrics and repoint its last_checkpoint); True
    # deletes them first, so that no later resume or pruning can mix the two runs
    overwrite: bool = False
    progress: bool | None = None  # tqdm bar; None: only when stderr is a terminal
    find_unused_parameters: bool = False  # DDP: set when some head gets no loss

    def __post_init__(self) -> None:
        # what needs no device or process count is checked when the config is made (an override
        # typed wrong fails at once, not after the data and the model are built); train() checks
        # the rest (_check_config)
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {list(AMP_DTYPES)}, got {self.amp!r}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {self.device!r}")
        if self.images_per_batch < 1:
            raise ValueError(f"images_per_batch={self.images_per_batch} must be >= 1")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")
        # each would train without an error and wrongly: clip_grad=-1 scales every gradient by
        # a negative factor (gradient ascent), gamma=0 sets the lr to 0 at the first step
        for name, ok, rule in (
                ("base_lr", self.base_lr > 0, "must be > 0"),
                ("momentum", 0 <= self.momentum < 1, "must be in [0, 1): at 1 or above the velocity never decays"),
                ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
                ("weight_decay_norm", self.weight_decay_norm >= 0, "must be >= 0"),
                ("gamma", 0 < self.gamma <= 1, "must be in (0, 1]: the factor each lr step multiplies by"),
                ("warmup_factor", 0 < self.warmup_factor <= 1, "must be in (0, 1]: the warm-up's first lr / base_lr"),
                ("clip_grad", self.clip_grad is None or self.clip_grad > 0, "must be None (no clipping) or > 0"),
                ("num_workers", self.num_workers >= 0, "must be >= 0 (0: load in the training process)"),
                ("reference_batch", self.reference_batch >= 1, "must be >= 1"),
                # a negative step divides the lr from iteration 0 on
                ("warmup_iters", self.warmup_iters >= 0, "must be >= 0 (0: no warm-up)"),
                ("steps", all(step > 0 for step in self.steps), "must be iterations > 0 (where the lr drops)")):
            if not ok:
                raise ValueError(f"train.{name}={getattr(self, name)!r} {rule}")


class NonFiniteLossError(RuntimeError):
    """A loss term became nan or inf; the run stopped before the weights were touched."""

    def __init__(self, iteration: int, bad_terms: dict[str, float],
                 last_good: Path | None = None) -> None:
        self.iteration, self.bad_terms, self.last_good = iteration, bad_terms, last_good
        terms = ", ".join(f"{name}={value}" for name, value in bad_terms.items())
        where = (f"the last good checkpoint, {last_good}, is untouched; resume from it"
                 if last_good else "no checkpoint had been written yet")
        super().__init__(
            f"{self.what} at iteration {iteration} ({iteration} iterations had completed): "
            f"{terms}. Training stopped before the optimizer step; {where}. Usual remedies: "
            "clip_grad (a resume accepts it), or check the data; a lower base_lr, a longer "
            "warm-up or amp='none' change the past a resume continues, so start a new run from "
            "the checkpoint's weights (init_weights=PATH).")

    what = "non-finite loss"


class NonFiniteGradientError(NonFiniteLossError):
    """Every loss term was finite but the gradient was not (a sqrt or log at 0 in some backward
    pass, an overflow); the run stopped before the weights were touched. Not raised under
    ``amp="fp16"``, whose loss scaler skips such a step by design (and lowers its scale)."""

    what = "non-finite gradient (the loss terms were finite)"


class TrainingStopped(RuntimeError):
    """SIGTERM arrived; the run finished its iteration and saved a checkpoint to resume from."""

    def __init__(self, iteration: int, checkpoint: Path) -> None:
        self.iteration, self.checkpoint = iteration, checkpoint
        super().__init__(f"stopped by SIGTERM after {iteration} iterations; {checkpoint} holds "
                         "the state: the same call with resume=True continues from it")


@contextlib.contextmanager
def sigterm_handled_by(handler):
    """While inside, SIGTERM goes to ``handler`` (a function or ``signal.SIG_IGN``); the previous
    handler comes back after. Only in the main thread, where Python runs signal handlers;
    elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    if previous is None:  # a handler installed outside Python: the default is what can be put back
        previous = signal.SIG_DFL
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sigterm_sets(flag: threading.Event, world_size: int):
    """While training, SIGTERM sets ``flag`` instead of ending the process (one process: under
    DDP the ranks would first have to agree on where to stop)."""
    if world_size > 1:
        return contextlib.nullcontext()
    return sigterm_handled_by(lambda signum, frame: flag.set())


def _sigterm_from_parent_only(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a loader worker ends on its parent's SIGTERM alone.

    ``timeout``, Slurm and ``kill -- -PGID`` signal the whole process group; a worker killed by
    that fails the main process on its dead worker before it can save. Ignoring SIGTERM
    outright is worse: the loader's shutdown, and ``multiprocessing`` at the interpreter's exit,
    end a worker that does not stop by itself with ``terminate()`` (a SIGTERM) and then wait
    for it, forever. So SIGTERM is blocked and a thread takes each one with its sender:
    the parent's ends the worker, anyone else's is dropped (the main process decides when to
    stop). Without ``sigwaitinfo`` (macOS) the sender cannot be told, and the default stays."""
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = os.getppid()
    # before any other thread of the worker starts: they inherit the mask, so every SIGTERM
    # waits for the watcher (SIG_IGN instead would discard it before anyone could look)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def watch() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(128 + signal.SIGTERM)  # as a shell reports death by SIGTERM

    threading.Thread(target=watch, name="sigterm_from_parent", daemon=True).start()


def scaled_lr(base_lr: float, base_batch: int, batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): the learning rate is proportional to the batch."""
    if base_batch <= 0 or batch <= 0:
        raise ValueError(f"batch sizes must be positive, got base_batch={base_batch}, batch={batch}")
    return base_lr * batch / base_batch


def scale_for_batch(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` for ``images_per_batch``: lr × k, iterations ÷ k, k = batch / reference_batch."""
    if not cfg.scale_schedule or cfg.images_per_batch == cfg.reference_batch:
        return cfg
    base_lr = scaled_lr(cfg.base_lr, cfg.reference_batch, cfg.images_per_batch)  # checks both sizes
    k = cfg.images_per_batch / cfg.reference_batch
    return replace(
        cfg,
        base_lr=base_lr,
        # at least one iteration, and no lr step at iteration 0 (round() takes 0.5 to 0)
        max_iter=max(1, round(cfg.max_iter / k)),
        steps=tuple(max(1, round(step / k)) for step in cfg.steps),
        warmup_iters=round(cfg.warmup_iters / k),
        reference_batch=cfg.images_per_batch,  # applying it again changes nothing
    )


def describe_scaling(cfg: TrainConfig) -> str:
    """One line for the start of a run, e.g. "lr 0.02 @ 16 images -> 0.0025 @ 2 images; ..."."""
    scaled = scale_for_batch(cfg)
    if scaled is cfg:
        return (f"lr {cfg.base_lr:g} @ {cfg.images_per_batch} images; {cfg.max_iter} iterations, "
                f"lr x{cfg.gamma:g} at {cfg.steps}, warm-up {cfg.warmup_iters}")
    k = cfg.reference_batch / cfg.images_per_batch
    how = f"x{k:g} longer" if k > 1 else f"x{1 / k:g} shorter"
    return (f"lr {cfg.base_lr:g} @ {cfg.reference_batch} images -> {scaled.base_lr:g} @ "
            f"{cfg.images_per_batch} images; schedule {how}: {scaled.max_iter} iterations, "
            f"lr x{cfg.gamma:g} at {scaled.steps}, warm-up {scaled.warmup_iters} "
            "(linear scaling rule, Goyal et al. 2017)")


def lr_at(iteration: int, cfg: TrainConfig) -> float:
    """Learning rate of (0-based) ``iteration``: linear warm-up, then ÷10 at each step."""
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    warmup = 1.0
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        warmup = cfg.warmup_factor * (1 - alpha) + alpha
    return cfg.base_lr * warmup * cfg.gamma ** bisect.bisect_right(cfg.steps, iteration)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum; weight decay on all trained parameters but norm layers' (see top)."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    norm_params, other_params = [], []
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                (norm_params if isinstance(module, norm_types) else other_params).append(param)
    groups = [{"params": other_params, "weight_decay": cfg.weight_decay}]
    if norm_params:
        groups.append({"params": norm_params, "weight_decay": cfg.weight_decay_norm})
    return torch.optim.SGD(groups, lr=lr_at(0, cfg), momentum=cfg.momentum)


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor inside (lists, tuples, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {key: to_device(value, device) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(value, device) for value in obj)
    return obj


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_config(cfg: TrainConfig, device: torch.device, world_size: int) -> None:
    if cfg.amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {list(AMP_DTYPES)}, got {cfg.amp!r}")
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device; on CPU use amp='bf16' or 'none'")
    if list(cfg.steps) != sorted(cfg.steps):
        raise ValueError(f"steps must increase, got {cfg.steps}")
    if cfg.max_iter < 1:
        raise ValueError(f"max_iter={cfg.max_iter} (after the linear scaling rule) must be >= 1")
    for name in ("log_period", "checkpoint_period", "eval_period", "keep_checkpoints"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 0")
    if not cfg.output_dir.strip():  # checked here, not in __post_init__: a plan (ablations) may leave it empty
        raise ValueError(f"train.output_dir={cfg.output_dir!r} must name a folder (empty: the current "
                         "directory would take the run's files)")
    if cfg.images_per_batch <= 0 or cfg.images_per_batch % world_size:
        raise ValueError(f"images_per_batch={cfg.images_per_batch} must be a positive "
                         f"multiple of the number of processes ({world_size})")


def _pick_device(name: str, info: DistInfo) -> torch.device:
    if name not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():  # else torch fails at the first copy
        raise ValueError("train.device='cuda' but this machine has no CUDA device (torch "
                         f"{torch.__version__}, CUDA build: {torch.version.cuda}); use 'auto' or 'cpu'")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if info.local_rank >= torch.cuda.device_count():
            raise ValueError(f"process of local rank {info.local_rank} has no GPU: this machine has "
                             f"{torch.cuda.device_count()}; start at most that many per node (torchrun "
                             "--nproc_per_node)")
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def _autocast(device: torch.device, amp: str):
    """Mixed precision for the forward pass (the backward follows the forward's dtypes)."""
    if AMP_DTYPES[amp] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def _build_loader(dataset: Dataset, cfg: TrainConfig, collate_fn: Callable, start_iter: int,
                  info: DistInfo, group_ids: Sequence[int] | None, pin: bool) -> DataLoader:
    sampler = InfiniteBatchSampler(len(dataset), cfg.images_per_batch, cfg.seed, info.rank,
                                   info.world_size, start_iter, group_ids)
    # Its own generator, so that making the loader never draws from the global RNG.
    return DataLoader(SeededSamples(dataset), batch_sampler=sampler, collate_fn=collate_fn,
                      num_workers=cfg.num_workers, pin_memory=pin,
                      worker_init_fn=_sigterm_from_parent_only if cfg.num_workers else None,
                      generator=torch.Generator().manual_seed(cfg.seed))


def _reduced_losses(loss_dict: dict[str, torch.Tensor],
                    grad_norm: torch.Tensor | None = None) -> tuple[dict[str, float], float]:
    """Each loss term averaged over processes (what DDP's gradient corresponds to), and the
    gradient norm (the same on every process: DDP averaged the gradients); one host read."""
    names = sorted(loss_dict)
    device = loss_dict[names[0]].device
    norm = torch.zeros((), device=device) if grad_norm is None else grad_norm  # no host-to-device copy
    values = torch.stack([loss_dict[name].detach().float() for name in names] + [norm.detach().float().to(device)])
    *losses, norm_value = all_reduce_mean(values).tolist()
    return dict(zip(names, losses)), (math.nan if grad_norm is None else norm_value)


def grad_norm(parameters) -> torch.Tensor:
    """The 2-norm of all gradients together, as ``clip_grad_norm_`` computes it (nan or inf if
    any gradient holds one); a 0-d tensor on the gradients' device, read by no one here."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    # one op for all the per-tensor norms (clip_grad_norm_ uses it too), not two per parameter
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())


# what, besides the learning rate, shaped the iterations a checkpoint has done
_PAST_KEYS = ("images_per_batch", "momentum", "weight_decay", "weight_decay_norm", "gamma", "seed", "amp")


def resume_mismatch(saved: dict, cfg: TrainConfig, iteration: int) -> list[str]:
    """How ``cfg`` would have trained the first ``iteration`` iterations differently from the
    run that saved ``saved`` (its checkpoint's ``config``): ``["base_lr=0.02 (now 0.01)", ...]``.

    Resuming continues *that* run, so its past must be this config's past too: the same batch,
    optimizer, seed and learning rate at every iteration done. What lies ahead may change:
    ``max_iter`` and lr steps still to come (extending a schedule is a resume). Both configs are
    compared after the linear scaling rule, as they run."""
    differ = [f"{key}={saved[key]!r} (now {getattr(cfg, key)!r})" for key in _PAST_KEYS
              if key in saved and saved[key] != getattr(cfg, key)]
    known = {f.name for f in fields(TrainConfig)}
    then = replace(cfg, **{k: tuple(v) if k == "steps" else v for k, v in saved.items()
                           if k in known and k in ("base_lr", "steps", "gamma", "warmup_iters",
                                                   "warmup_factor")})
    # lr is constant between the starts of warm-up's iterations and of each step's: compare there
    starts = set(range(min(iteration, max(then.warmup_iters, cfg.warmup_iters) + 1)))
    starts |= {s for s in (*then.steps, *cfg.steps) if s < iteration}
    for i in sorted(starts):
        if not math.isclose(lr_at(i, then), lr_at(i, cfg), rel_tol=1e-9):
            differ.append(f"lr at iteration {i} {lr_at(i, then):.6g} (now {lr_at(i, cfg):.6g}; "
                          f"base_lr {then.base_lr:g}, steps {then.steps}, warm-up "
                          f"{then.warmup_iters} then; {cfg.base_lr:g}, {cfg.steps}, {cfg.warmup_iters} now)")
            break
    return differ


# MaskRCNNConfig settings read only at inference: a resumed training may change them
INFERENCE_ONLY = ("transform.min_size_test", "transform.paste_mode", "rpn.pre_nms_top_n_test",
                  "rpn.post_nms_top_n_test", "box_head.score_thresh", "box_head.nms_thresh",
                  "box_head.detections_per_img", "mask_head.softmax_readout", "keypoint_head.coordinate_offset")
# ... read only in training (targets, samplers, losses, train scales)
TRAINING_ONLY = ("transform.min_size_train", "rpn.pre_nms_top_n_train", "rpn.post_nms_top_n_train",
                 "rpn.fg_iou_thresh", "rpn.bg_iou_thresh", "rpn.batch_size_per_image", "rpn.positive_fraction",
                 "rpn.smooth_l1_beta", "box_head.fg_iou_thresh", "box_head.bg_iou_thresh",
                 "box_head.batch_size_per_image", "box_head.positive_fraction", "box_head.smooth_l1_beta")
# ... and those that change neither the weights nor what they mean: evaluating or predicting with a
# checkpoint may set these freely too (another test scale, NMS, the training-only samplers)
WEIGHTS_FREE = INFERENCE_ONLY + TRAINING_ONLY + (
    "transform.max_size", "transform.resize_mode", "transform.size_divisible",
    "rpn.nms_thresh", "rpn.min_size", "rpn.score_thresh", "box_head.min_size")


def _model_config(model: nn.Module) -> dict | None:
    """``asdict(model.cfg)`` as plain JSON values (tuples as lists), or None for a model without
    a dataclass config (a stand-in in a test)."""
    cfg = getattr(model, "cfg", None)
    return json.loads(json.dumps(asdict(cfg))) if is_dataclass(cfg) else None


def model_mismatch(saved: dict | None, model: nn.Module) -> list[str]:
    """``["model.pooler.kind='roi_align' (now 'roi_pool')", ...]``: how ``model``'s config differs
    from the one a checkpoint's iterations ran with (``saved``), outside :data:`INFERENCE_ONLY`. A
    setting in one of them only (added to the code since) is not a difference."""
    return model_config_mismatch(saved, getattr(model, "cfg", None))


def model_config_mismatch(saved: dict | None, model_cfg: Any, free: Sequence[str] = INFERENCE_ONLY) -> list[str]:
    """:func:`model_mismatch` for a model config (a ``MaskRCNNConfig``) not yet built into a
    model, leaving out the settings in ``free``: ``eval`` and ``predict`` check a checkpoint
    against it before they build one, with ``free=WEIGHTS_FREE``."""
    from .config import config_differences

    if saved is None or not is_dataclass(model_cfg):  # a stand-in model in a test has no config
        return []
    now = json.loads(json.dumps(asdict(model_cfg)))  # as the checkpoint holds it: tuples as lists
    return sorted(config_differences(saved, now, "model", skip=tuple(f"model.{k}" for k in free),
                                     word="now"))


def _resume(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, info: DistInfo) -> tuple[int, Path | None, float]:
    """Load the checkpoint ``cfg.resume`` asks for; return (iteration to start at, its path,
    the seconds of training loop that led to it).

    Under DDP every process loads on its own, from its own view of ``output_dir``, and only
    rank 0 writes checkpoints. On nodes that do not share that folder, rank 0 would resume at
    iteration k and the others at 0 (or at a stale copy): DDP's broadcast of the weights hides
    it, while their momentum, lr schedule and data stream run from another past. So the
    processes compare what they loaded (:func:`_resume_agreement`) and all stop if they differ,
    or if any of them failed to load."""
    try:
        loaded = _load_resume_state(cfg, model, optimizer, scaler, info)
    except Exception as err:  # the other processes would wait for this one in the gather below
        if info.world_size == 1:
            raise
        _resume_agreement(None, f"{type(err).__name__}: {err}", info)
        raise
    _resume_agreement(loaded, None, info)
    _follow_a_rollback(cfg, loaded[1], info)
    return loaded


def _follow_a_rollback(cfg: TrainConfig, path: Path | None, info: DistInfo) -> None:
    """After ``resume=PATH`` of an older checkpoint in ``output_dir`` (say from a
    NonFiniteLossError's advice, with clip_grad), ``last_checkpoint`` still named the newer one:
    a crash before this run's first save, then a plain resume, silently went on with the
    abandoned branch (``metrics.jsonl`` already cut back to this one). Rank 0 points it here."""
    if path is None or not isinstance(cfg.resume, str) or not info.is_main:
        return
    if path.resolve() not in {saved.resolve() for saved in checkpoint_files(cfg.output_dir)}:
        return  # a checkpoint from elsewhere: this folder's own history stays as it is
    named = last_checkpoint(cfg.output_dir)
    if named is not None and named.resolve() != path.resolve():
        point_last_checkpoint(path)
        print(f"resume: {LAST_CHECKPOINT_FILE} now names {path.name}, not {named.name}: a later plain resume "
              f"continues this run, not the one {named.name} ended", file=sys.stderr)


def _resume_agreement(loaded: tuple[int, Path | None, float] | None, error: str | None,
                      info: DistInfo) -> None:
    """ValueError on every process unless every process loaded the same checkpoint (the same
    iteration and training time; paths may differ between nodes) or all started afresh."""
    if info.world_size == 1:
        return
    mine = (None, None, None, error) if loaded is None else (
        loaded[0], None if loaded[1] is None else os.fspath(loaded[1]), loaded[2], None)
    everyone: list = [None] * info.world_size
    torch.distributed.all_gather_object(everyone, mine)
    failed = [f"rank {rank}: {e[3]}" for rank, e in enumerate(everyone) if e[3] is not None]
    if failed:
        if error is None:  # the ranks that did fail raise their own error
            raise ValueError("resume failed on other processes: " + "; ".join(failed))
        return
    if len({(e[0], e[2]) for e in everyone}) > 1:
        told = "; ".join(f"rank {rank}: " + (f"iteration {e[0]} from {e[1]}" if e[1] else "no checkpoint, iteration 0")
                         for rank, e in enumerate(everyone))
        raise ValueError(f"the processes would resume from different checkpoints ({told}). Only "
                         "rank 0 writes checkpoints: put train.output_dir on a file system every node "
                         "sees, or copy rank 0's checkpoint and last_checkpoint to each node's output_dir")


def _load_resume_state(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                       scaler: torch.amp.GradScaler, info: DistInfo) -> tuple[int, Path | None, float]:
    if not cfg.resume:
        _check_fresh_start(cfg)
        return 0, None, 0.0
    path = Path(cfg.resume) if isinstance(cfg.resume, str) else newest_checkpoint(cfg.output_dir)
    if path is None:
        if info.is_main:  # say so: a mistyped output_dir would otherwise retrain from scratch unseen
            print(f"resume: no checkpoint in {cfg.output_dir}; starting at iteration 0", file=sys.stderr)
        return 0, None, 0.0
    if not isinstance(cfg.resume, str) and info.is_main and last_checkpoint(cfg.output_dir) is None:
        # a run killed between its first checkpoint's rename and the pointer's, or a folder
        # copied without it: the config check below still refuses another run's checkpoint
        print(f"resume: train.output_dir={cfg.output_dir} has no {LAST_CHECKPOINT_FILE} file; resuming "
              f"from the newest checkpoint there, {path.name} (of {_name_files(checkpoint_files(cfg.output_dir))}; "
              "another: --resume PATH)", file=sys.stderr)
    state = load_checkpoint(path)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        rng_states = state["rng"]  # one per process of the run that wrote it
    except (KeyError, RuntimeError, ValueError) as err:  # a weights-only file, another model
        raise ValueError(f"cannot resume from {path}: not a training checkpoint of this model "
                         f"and optimizer ({type(err).__name__}: {err})") from err
    differ = resume_mismatch(state.get("config", {}), cfg, int(state["iteration"]))
    differ += model_mismatch(state.get("model_config"), model)  # same shapes, another model
    if differ:
        raise ValueError(f"cannot resume from {path}: its {state['iteration']} iterations ran with "
                         f"{'; '.join(differ)}. Resume with its settings, or start a new run from "
                         "its weights (init_weights=PATH) instead of resuming")
    if len(rng_states) != info.world_size and info.is_main:
        print(f"warning: {path} was written by {len(rng_states)} processes, this run has "
              f"{info.world_size}; dropout/augmentation streams will differ", file=sys.stderr)
    restore_rng_state(rng_states[info.rank % len(rng_states)])
    return int(state["iteration"]), path, float(state.get("train_seconds", 0.0))


def _name_files(paths: Sequence[Path]) -> str:
    """``"model_0005000.pth, ..., model_0160000.pth (32 files)"``: a list short enough to read."""
    names = [p.name for p in paths]
    if len(names) <= 4:
        return ", ".join(names)
    return f"{names[0]}, {names[1]}, ..., {names[-1]} ({len(names)} files)"


def _earlier_run_files(output_dir: str | os.PathLike) -> list[Path]:
    """What marks ``output_dir`` as another run's: its ``last_checkpoint`` and checkpoints."""
    pointer = Path(output_dir) / LAST_CHECKPOINT_FILE
    return ([pointer] if pointer.is_file() else []) + checkpoint_files(output_dir)


def _check_fresh_start(cfg: TrainConfig) -> None:
    """A fresh run may start in ``output_dir`` only if no other run's checkpoints are there, or
    ``cfg.overwrite`` says to delete them (``train`` does, once every process agreed to start).

    Starting beside them would truncate that run's ``metrics.jsonl``, point ``last_checkpoint``
    at the new run's files and leave the old ones among them, where a resume or
    :func:`prune_checkpoints` would take a higher-numbered file of the old run for this one's."""
    found = _earlier_run_files(cfg.output_dir)
    if found and not cfg.overwrite:
        raise ValueError(
            f"train.output_dir={cfg.output_dir} already holds a run ({_name_files(found)}); a new run "
            "there would truncate its metrics.jsonl and take over its last_checkpoint. Pass --resume "
            "(train.resume=True) to continue it, choose another train.output_dir, or set "
            "train.overwrite=True to delete its checkpoints and start afresh there")


def _clear_earlier_run(output_dir: str | os.PathLike) -> list[Path]:
    """Delete another run's ``last_checkpoint``, checkpoints and loss curves (``overwrite=True``;
    rank 0). The pointer first says so (``checkpoint.OVERWRITING``) and goes last: a crash
    half-way leaves some of that run's checkpoints behind a pointer that a resume refuses (it
    would otherwise continue the run being deleted from its newest survivor) and a fresh run
    without ``overwrite`` refuses too, until this is done again."""
    pointer = Path(output_dir) / LAST_CHECKPOINT_FILE
    deleted = _earlier_run_files(output_dir) + [p for p in [Path(output_dir) / "loss_curves.png"] if p.is_file()]
    if deleted:
        atomic_write_text(pointer, OVERWRITING + "\n")
    for path in [p for p in deleted if p != pointer] + [pointer]:
        path.unlink(missing_ok=True)
    return deleted


def _save(cfg: TrainConfig, iteration: int, model: nn.Module, optimizer, scaler,
          info: DistInfo, train_seconds: float = 0.0, plot: bool = True) -> Path:
    """Every process contributes its RNG state; rank 0 alone writes the file. ``plot=False``
    (the save a SIGTERM asks for): no loss curves, whose first drawing imports matplotlib
    (~1-3 s on a busy CPU) inside the few seconds a deadline leaves; the next save draws them."""
    rng_states = [capture_rng_state()]
    if info.world_size > 1:
        rng_states = [None] * info.world_size
        torch.distributed.all_gather_object(rng_states, capture_rng_state())
    path = checkpoint_path(cfg.output_dir, iteration)
    if info.is_main:
        save_checkpoint(path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "iteration": iteration, "rng": rng_states,
            "world_size": info.world_size, "config": asdict(cfg), "model_config": _model_config(model),
            "train_seconds": train_seconds,  # the loop's time up to here, over every resume
        })
        if plot:
            plot_loss_curves(Path(cfg.output_dir) / "metrics.jsonl")
        if cfg.keep_checkpoints:
            prune_checkpoints(cfg.output_dir, cfg.keep_checkpoints)
    return path


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` ``model_*.pth`` of ``output_dir``; return the deleted.

    160k iterations checkpointed every 5000 are 32 files of the whole model and its momentum;
    only the newest is needed to resume. Called after the newest is whole and named in
    ``last_checkpoint``, so a crash at any point leaves a checkpoint to resume from."""
    if keep < 1:
        raise ValueError(f"keep={keep}: at least the newest checkpoint must stay")
    # the one last_checkpoint names stays, whatever lies beside it: a file of a higher iteration
    # can be left over from before a crash that the run resumed from an earlier checkpoint
    current = last_checkpoint(output_dir)
    # only the run's own names: a stray "model_0000400 (copy).pth" must not stop the run here
    saved = checkpoint_files(output_dir)
    deleted = [path for path in saved[:-keep] if current is None or path.name != current.name]
    for path in deleted:
        path.unlink(missing_ok=True)
    return deleted


def _evaluate(evaluate_fn: Callable[[nn.Module], dict], model: nn.Module) -> dict:
    """Run the user's evaluation in eval mode, leaving every training RNG as it was."""
    model.eval()
    with preserved_rng(), torch.no_grad():
        results = evaluate_fn(model)
    model.train()
    return results


def _evaluation_due(cfg: TrainConfig, done: int) -> bool:
    """Whether the loop evaluates after ``done`` iterations: every ``eval_period``, and at the end."""
    return done > 0 and (bool(cfg.eval_period and done % cfg.eval_period == 0) or done == cfg.max_iter)


def _evaluation_missing(cfg: TrainConfig, start_iter: int, history: list[dict], info: DistInfo) -> bool:
    """Whether a resumed run owes the evaluation of ``start_iter``: due there, but not in
    ``history`` (``metrics.jsonl``). The checkpoint is saved before the evaluation, so an
    evaluation that failed or was stopped would otherwise never run. Rank 0's file decides for
    every process (each runs its share of the evaluation)."""
    if not _evaluation_due(cfg, start_iter):
        return False
    missing = [not any(r["iteration"] == start_iter and "eval" in r for r in history)]
    if info.world_size > 1:
        torch.distributed.broadcast_object_list(missing, src=0)
    return missing[0]


def _evaluate_and_log(evaluate_fn: Callable[[nn.Module], dict], model: nn.Module, done: int,
                      metrics_path: Path, progress, info: DistInfo) -> dict:
    """:func:`_evaluate`, then rank 0 appends the results to ``metrics.jsonl`` and prints them."""
    results = _evaluate(evaluate_fn, model)
    if info.is_main:
        _log(metrics_path, {"iteration": done, "eval": results})
        progress.write(f"evaluation at iteration {done}: {results}")
    return results


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as file:
        file.write(json.dumps(record, default=lambda o: o.tolist() if hasattr(o, "tolist")
                              else str(o)) + "\n")


def _read_metrics(path: Path, up_to: int | None = None) -> list[dict]:
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) - 1:  # a line cut off by a crash mid-write: the rest is whole
                break
            raise ValueError(f"{path}: line {number + 1} is not JSON") from None
    return [r for r in records if up_to is None or r["iteration"] <= up_to]


def plot_loss_curves(metrics_path: str | Path, png_path: str | Path | None = None) -> Path | None:
    """Draw every loss term and the learning rate against the iteration, from metrics.jsonl."""
    from matplotlib.figure import Figure  # no pyplot: never changes the user's backend

    metrics_path = Path(metrics_path)
    records = [r for r in _read_metrics(metrics_path) if "loss" in r]
    if not records:
        return None
    png_path = Path(png_path) if png_path else metrics_path.with_name("loss_curves.png")
    iterations = [r["iteration"] for r in records]
    fig = Figure(figsize=(9, 3.5))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, wspace=0.3)
    loss_ax, lr_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    for name in ["loss"] + sorted(k for k in records[-1] if k.startswith("loss_")):
        loss_ax.plot(iterations, [r.get(name, math.nan) for r in records], label=name,
                     linewidth=2 if name == "loss" else 1)
    loss_ax.set(yscale="log", xlabel="iteration", title="training losses")
    loss_ax.legend(fontsize=7)
    lr_ax.plot(iterations, [r["lr"] for r in records])
    lr_ax.set(xlabel="iteration", title="learning rate")
    fig.savefig(png_path, dpi=80)
    return png_path


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's <malloc.h>


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse; ``True`` if it could (Linux, glibc).

    Why it matters on the CPU: every training step allocates and frees the same large tensors
    (the RoI features of 512 RoIs, their gradients, ...). glibc serves each allocation above its
    mmap threshold (32 MB at most) with fresh pages from the kernel and hands them back on
    ``free``, so the next step page-faults and zero-fills them all again. Measured in two 384 px
    C5 miniature trainings (docs/training.md, "CPU training and glibc's allocator"): 36-42 % of
    each process's CPU time was the kernel's, 1.2-1.5 billion page faults in 1350-1500
    iterations; ``bench/cpu_malloc.py`` trains 20 such iterations 1.7x faster with it. With
    ``M_MMAP_MAX = 0`` every allocation comes from the heap, and a 2 GB ``M_TRIM_THRESHOLD``
    keeps its freed top for the next step. Same results, to the bit: only where the bytes live
    changes. The cost: the process keeps its peak memory instead of returning it.
    Process-wide and not undone; ``train`` calls it when it trains on the CPU.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the running process's own C library
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def train(model: nn.Module, dataset: Dataset, cfg: TrainConfig, collate_fn: Callable,
          evaluate_fn: Callable[[nn.Module], dict] | None = None,
          hooks: Sequence[Callable[[int, dict], None]] = (),
          group_ids: Sequence[int] | None = None,
          on_start: Callable[[int], None] | None = None) -> dict:
    """Train ``model`` on ``dataset`` as ``cfg`` says; returns the final iteration, losses, eval.

    ``model(images, targets)`` returns a dict of scalar losses (summed for the gradient);
    ``evaluate_fn(model)`` runs on every process, gathers to rank 0 (``gather_predictions``)
    and returns a dict of metrics; each hook is called as ``hook(iterations_done, state)``
    after every iteration. Under ``torchrun`` the same call trains with DDP. ``on_start(iteration)``
    is called on every process once the run's start is settled (a resume accepted, or a fresh
    start allowed), before the first iteration: what the caller writes beside the checkpoints
    (``experiment.json``) is then never the config of a run that was refused.

    ``train_seconds`` in the result is the training loop's time summed over this call and the
    ones whose checkpoints it resumed from (``earlier_train_seconds``, up to
    ``start_iteration``). Raises :class:`TrainingStopped` after a SIGTERM (one process; see the
    module's docstring).
    """
    # paths as strings: a Path would be pickled into the checkpoint's config (which a
    # weights-only load refuses), and resume=Path(...) would not read as a file to resume from
    cfg = replace(cfg, output_dir=os.fspath(cfg.output_dir),
                  resume=cfg.resume if isinstance(cfg.resume, bool) or cfg.resume is None else os.fspath(cfg.resume))
    info = init_distributed(cfg.device)
    device = _pick_device(cfg.device, info)
    requested, cfg = cfg, scale_for_batch(cfg)  # the log says what was asked and what it became
    _check_config(cfg, device, info.world_size)
    seed_everything(cfg.seed + info.rank)
    output_dir, metrics_path = Path(cfg.output_dir), Path(cfg.output_dir) / "metrics.jsonl"
    output_dir.mkdir(parents=True, exist_ok=True)

    if device.type == "cpu":
        keep_freed_memory()  # a third of a CPU step went to page faults without it
    model.to(device).train()
    if cfg.channels_last:  # 4-d weights NHWC; convolutions then hand NHWC activations on
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    start_iter, last_good, earlier_seconds = _resume(cfg, model, optimizer, scaler, info)
    trained_model = model
    if info.world_size > 1:
        trained_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters)
    # the workers fork in iter() and share this process's pages until they write to them; a full
    # collection in a worker writes the GC header of every object it traverses, so move them all to
    # the permanent generation first (~40 MB less per worker, bench/worker_memory.py). Not where
    # the caller froze objects itself: unfreezing after the fork would unfreeze theirs too
    freeze = cfg.num_workers > 0 and gc.get_freeze_count() == 0
    if freeze:
        gc.collect()
        gc.freeze()
    try:
        batches = iter(_build_loader(dataset, cfg, collate_fn, start_iter, info, group_ids,
                                     pin=device.type == "cuda"))
    finally:
        if freeze:
            gc.unfreeze()  # the workers keep theirs frozen; this process collects as before
    show_bar = info.is_main and (sys.stderr.isatty() if cfg.progress is None else cfg.progress)
    progress = _progress_bar(cfg.max_iter, start_iter, show_bar)
    history: list[dict] = []  # metrics.jsonl up to start_iter (rank 0 reads it)
    if info.is_main:
        if not cfg.resume and cfg.overwrite:  # every process agreed to start afresh (_resume)
            cleared = _clear_earlier_run(output_dir)
            if cleared:
                progress.write(f"train.overwrite: deleted {_name_files(cleared)} of an earlier run in {output_dir}")
        history = _read_metrics(metrics_path, start_iter)
        # the records past the checkpoint belong to iterations about to run again; atomically,
        # as a kill in the middle of a plain rewrite would lose the whole history
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
        progress.write(f"{describe_scaling(requested)}\ntraining iterations {start_iter}..{cfg.max_iter}"
                       f" on {device} x{info.world_size}, amp={cfg.amp}, output {output_dir}")
    if on_start is not None:
        on_start(start_iter)

    results = {}
    if evaluate_fn and _evaluation_missing(cfg, start_iter, history, info):
        if info.is_main:
            progress.write(f"iteration {start_iter} has no evaluation in {metrics_path}: evaluating it first")
        results = _evaluate_and_log(evaluate_fn, model, start_iter, metrics_path, progress, info)
    losses, tic, stop = {}, time.perf_counter(), threading.Event()  # the clock starts after it
    with _sigterm_sets(stop, info.world_size):  # SIGTERM: finish the iteration, save, stop
        for iteration in range(start_iter, cfg.max_iter):
            images, targets = to_device(next(batches), device)
            lr = lr_at(iteration, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with _autocast(device, cfg.amp):
                loss_dict = trained_model(images, targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(sum(loss_dict.values())).backward()
            norm = None
            if cfg.clip_grad is not None:
                scaler.unscale_(optimizer)
                norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            elif not scaler.is_enabled():
                norm = grad_norm(model.parameters())
            # fp16's scaler skips a step with inf/nan gradients (it is how it finds its scale)
            losses, norm_value = _reduced_losses(loss_dict, None if scaler.is_enabled() else norm)
            bad_terms = {name: value for name, value in losses.items() if not math.isfinite(value)}
            if bad_terms:
                raise NonFiniteLossError(iteration, bad_terms, last_good)
            if not scaler.is_enabled() and not math.isfinite(norm_value):
                raise NonFiniteGradientError(iteration, {"gradient norm": norm_value}, last_good)
            scaler.step(optimizer)
            scaler.update()

            done = iteration + 1
            finished = done == cfg.max_iter
            progress.update(1)
            if info.is_main and ((cfg.log_period and done % cfg.log_period == 0) or finished):
                seconds = (time.perf_counter() - tic) / (done - start_iter)
                _log(metrics_path, {"iteration": done, "lr": lr, "loss": sum(losses.values()),
                                    **losses, "seconds_per_iter": seconds})
                progress.set_postfix_str(f"loss {sum(losses.values()):.3f} lr {lr:.2g}")
            elapsed = earlier_seconds + time.perf_counter() - tic
            # saved before the evaluation: a long evaluation that fails, or a SIGTERM during it,
            # loses no training (the evaluation leaves every RNG as it was), and a resume from
            # this checkpoint runs the evaluation first (_evaluation_missing)
            if (cfg.checkpoint_period and done % cfg.checkpoint_period == 0) or finished:
                last_good = _save(cfg, done, model, optimizer, scaler, info, elapsed)
                if finished and info.world_size > 1:  # no rank returns before the file is whole
                    torch.distributed.barrier()
            for hook in hooks:
                hook(done, {"model": model, "losses": losses, "lr": lr, "optimizer": optimizer})
            # SIGTERM: save this iteration (if not yet) and leave, before an evaluation due here
            # (minutes on COCO, inside the scheduler's grace): the resume runs it first
            if stop.is_set() and not finished:
                if last_good != checkpoint_path(cfg.output_dir, done):
                    last_good = _save(cfg, done, model, optimizer, scaler, info, elapsed, plot=False)
                progress.close()
                raise TrainingStopped(done, last_good)
            if evaluate_fn and _evaluation_due(cfg, done):
                results = _evaluate_and_log(evaluate_fn, model, done, metrics_path, progress, info)
    progress.close()
    curves = output_dir / "loss_curves.png"  # drawn at each checkpoint but a SIGTERM's, the last one included
    return {"iteration": max(start_iter, cfg.max_iter), "losses": losses, "eval": results,
            "checkpoint": last_good, "loss_curves": curves if curves.is_file() else None,
            "config": cfg, "train_seconds": earlier_seconds + time.perf_counter() - tic,
            "start_iteration": start_iter, "earlier_train_seconds": earlier_seconds}


def _progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar with ETA (rank 0, terminals); disabled elsewhere, its ``write`` still prints."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train",
                dynamic_ncols=True, file=sys.stderr)
