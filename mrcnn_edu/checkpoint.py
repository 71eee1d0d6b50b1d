"""Checkpoints that survive a crash, and everything needed to resume a run exactly.

The paper's models train for 160k iterations, a day or two on 8 GPUs (§3.1, §4); machines
fail, jobs get pre-empted. Two rules make a stop harmless:

1. **Atomic writes.** A checkpoint is written to a temporary file in the same directory,
   flushed and ``fsync``-ed, then renamed over the final name with ``os.replace`` (atomic on
   POSIX and Windows). A crash mid-save leaves the previous checkpoint as it was. The small
   text file ``last_checkpoint`` naming the newest ``.pth`` is updated the same way, after it.
2. **Complete state.** Model (unwrapped from DDP), optimizer (momentum buffers), GradScaler,
   the iteration (the learning rate is a pure function of it, see ``engine.lr_at``), and the
   random number generators of *every* process: python, numpy, torch CPU and its GPU. The data
   order needs no state: it is a function of ``(seed, iteration)`` (``distributed.py``).

Only rank 0 writes; every process reads the file when resuming, so on several nodes
``output_dir`` must be on a file system they share.

Checkpoints hold only tensors, numbers, strings, lists and dicts, so they load with
``torch.load(weights_only=True)``: opening one never runs pickled code.
"""
from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "atomic_save",
    "atomic_write_text",
    "save_checkpoint",
    "load_checkpoint",
    "last_checkpoint",
    "checkpoint_files",
    "newest_checkpoint",
    "checkpoint_path",
    "capture_rng_state",
    "restore_rng_state",
    "preserved_rng",
]

LAST_CHECKPOINT_FILE = "last_checkpoint"
# what the pointer holds while ``train.overwrite=True`` deletes an earlier run's checkpoints: a
# crash half-way leaves it, so no resume takes a survivor of the run being deleted for this one's
OVERWRITING = "(overwriting: train.overwrite=True was deleting this folder's earlier run)"


def checkpoint_path(output_dir: str | os.PathLike, iteration: int) -> Path:
    """``output_dir/model_0001000.pth``: the state after ``iteration`` completed iterations."""
    return Path(output_dir) / f"model_{iteration:07d}.pth"


def _atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary sibling of ``path``, then rename it onto ``path``."""
    tmp_path = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp_path, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_save(state: Any, path: str | os.PathLike) -> Path:
    """``torch.save(state, path)``, atomically: a crash leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda file: torch.save(state, file))
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a crash leaves the old file or the new one, never a
    cut-off one (``metrics.jsonl`` rewritten on a resume, ``experiment.json``)."""
    path = Path(path)
    _atomic_write(path, lambda file: file.write(text.encode("utf-8")))
    return path


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically and record it in ``last_checkpoint`` beside it.

    A save killed outright (SIGKILL, the out-of-memory killer, a pre-empted node) runs no
    clean-up and leaves its hidden temporary file, as big as a checkpoint. One process writes a
    run's checkpoints, so once this save is whole such files beside it are leftovers: removed.
    """
    path = point_last_checkpoint(atomic_save(state, path))
    for pattern in (".model_[0-9]*.pth.tmp[0-9]*", f".{LAST_CHECKPOINT_FILE}.tmp[0-9]*"):
        for leftover in path.parent.glob(pattern):
            leftover.unlink(missing_ok=True)
    return path


def point_last_checkpoint(path: str | os.PathLike) -> Path:
    """Make ``last_checkpoint`` beside ``path`` name it (atomically): a resume from an older
    checkpoint of the folder (a rollback) is the branch a later plain resume must continue."""
    path = Path(path)
    _atomic_write(path.parent / LAST_CHECKPOINT_FILE, lambda file: file.write(path.name.encode() + b"\n"))
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors only, no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # not a torch file, a truncated one, or pickled objects beyond tensors
        raise ValueError(f"{path} is not a checkpoint (torch.load with weights_only=True failed: "
                         f"{type(err).__name__}: {str(err)[:200]})") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a checkpoint: it holds a {type(state).__name__}, not a dict")
    return state


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ``output_dir`` (from its ``last_checkpoint`` file), or None."""
    pointer = Path(output_dir) / LAST_CHECKPOINT_FILE
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as err:
        raise ValueError(f"{pointer} is corrupt: it should hold one checkpoint file name "
                         f"({err})") from err
    if name == OVERWRITING:
        raise ValueError(f"{pointer}: a run started with train.overwrite=True was stopped while it deleted "
                         f"the earlier run in {Path(output_dir)}, whose remaining checkpoints are not to be "
                         "resumed; start the run again with train.overwrite=True to finish, or delete the folder")
    if not name:  # save_checkpoint never leaves it empty; a cut-off copy of the folder can
        raise ValueError(f"{pointer} is empty: it should name the newest checkpoint, e.g. "
                         f"{checkpoint_path(output_dir, 0).name}")
    path = Path(output_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist")
    return path


def checkpoint_files(output_dir: str | os.PathLike) -> list[Path]:
    """The run's own ``model_NNNNNNN.pth`` files in ``output_dir``, oldest first; a user's
    ``model_0000400 (copy).pth`` is none of them."""
    saved = (p for p in Path(output_dir).glob("model_*.pth") if re.fullmatch(r"model_\d+\.pth", p.name))
    return sorted(saved, key=lambda p: int(p.stem.split("_")[1]))


def newest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a resume continues from: the one ``last_checkpoint`` names, or, without
    that file, the highest-numbered ``model_NNNNNNN.pth`` (a run killed between its first
    checkpoint's rename and the pointer's, or a folder copied without the pointer); None if the
    folder holds neither."""
    named = last_checkpoint(output_dir)
    if named is not None:
        return named
    saved = checkpoint_files(output_dir)
    return saved[-1] if saved else None


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain numbers (loadable with weights_only)."""
    numpy_state = np.random.get_state(legacy=False)
    python_version, python_internal, python_gauss = random.getstate()
    return {
        "python": [python_version, torch.tensor(python_internal, dtype=torch.int64), python_gauss],
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": numpy_state["state"]["pos"],
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        },
        "torch": torch.get_rng_state(),
        # The current GPU only: touching the others would start a CUDA context on each of them.
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the RNG states returned by :func:`capture_rng_state`."""
    python_version, python_internal, python_gauss = state["python"]
    random.setstate((python_version, tuple(python_internal.tolist()), python_gauss))
    numpy_state = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
        "has_gauss": numpy_state["has_gauss"],
        "gauss": numpy_state["gauss"],
    })
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0].cpu())


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (e.g. an evaluation) without it changing any RNG the training uses."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)
