"""Training on several GPUs or machines, and the sampler that makes every run repeatable.

The paper trains "on 8 GPUs (so effective minibatch size is 16)" with "2 images per GPU"
(§3.1 "Training"). We do what it did, with PyTorch's own tools and nothing home-made:
``torchrun`` starts one process per GPU (on one node or, through its rendezvous, on several)
and sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them, joins the process group (NCCL on GPUs, gloo on CPU) and
the engine wraps the model in ``DistributedDataParallel``, which averages gradients.

Notation: ``N`` images in the dataset, ``W`` processes (the world size), ``r`` this process's
rank, ``G`` images per *global* batch (``images_per_batch`` in the config), ``B = G / W`` per
process.

Sampling (why it looks like this). We want three things at once:

1. every process sees a different shard of the same global batch, like
   ``torch.utils.data.DistributedSampler`` (shard ``r`` takes positions ``r, r+W, r+2W ...``);
2. the global batches do not depend on ``W``: one process with ``G`` images sees exactly the
   images that ``W`` processes with ``G / W`` each see together. Their SGD steps agree where the
   loss is a mean over images of equal weight (the stand-in model of ``tests/_ddp_worker.py``,
   which ``tests/test_distributed.py`` checks to 1e-6). Mask R-CNN's losses are not: each is a
   mean over the RoIs, anchors or positives *this process* sampled, and DDP averages those
   per-process means, as Detectron does; a process with 10 positives weighs as much as one with
   100, so W processes take a step close to, not equal to, one process's on the whole batch;
3. a run resumed at iteration ``i`` sees exactly the batches an uninterrupted run would.

So the data order is a pure function of ``(seed, iteration)``: an endless *stream* of
per-epoch permutations (epoch ``e`` shuffled by a generator seeded from ``(seed, e)``); global
batch ``i`` is stream positions ``[i*G, (i+1)*G)``. Random augmentation gets the same
treatment: the sample at stream position ``p`` is loaded under RNGs seeded from
``(seed, p)`` (:class:`SeededSamples`), which also hands the model a seed of that sample's own
(``target["seed"]``) for the scale jitter it draws inside (``MaskRCNN.preprocess``, §5). So
flips and scale jitter do not depend on which process or DataLoader worker loads a sample, nor
on whether the run was interrupted. (The model's other random choice, which RoIs to sample,
comes from each process's own generator, seeded ``seed + rank`` by the engine.)

Optional aspect-ratio grouping (``group_ids``, as in Detectron): a global batch is filled
with images of one group only (e.g. landscape vs portrait), so padding wastes less memory;
batches are then found by walking the stream from the start, which is cheap bookkeeping.
"""
from __future__ import annotations

import importlib
import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

__all__ = [
    "DistInfo",
    "init_distributed",
    "cleanup_distributed",
    "leaving_process_group",
    "get_dist_info",
    "all_reduce_mean",
    "gather_predictions",
    "shard_indices",
    "derive_seed",
    "InfiniteBatchSampler",
    "SeededSamples",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among ``world_size`` and its GPU index on the node."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def get_dist_info() -> DistInfo:
    """The current process group's ranks, or a single process if none was started."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size())


def init_distributed(device_type: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` prepared, if ``WORLD_SIZE > 1``.

    NCCL when the processes train on CUDA GPUs, gloo on CPU. Each process takes the GPU
    ``LOCAL_RANK`` of its node. Calling it again is harmless. Several nodes need nothing
    more: run ``torchrun --nnodes M --node_rank j --rdzv_endpoint HOST:PORT ...`` on each, with
    the data and ``output_dir`` on a file system they share (rank 0 writes the synthetic set and
    the checkpoints; every process reads them).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        return get_dist_info()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    use_cuda = torch.cuda.is_available() and device_type in ("auto", "cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():  # else "CUDA error: invalid device ordinal"
            raise ValueError(f"process of local rank {local_rank} has no GPU: this machine has "
                             f"{torch.cuda.device_count()}; start at most that many per node (torchrun "
                             "--nproc_per_node)")
        torch.cuda.set_device(local_rank)
    # Before the group exists: torch.distributed.nn binds ``group.WORLD`` as the default argument
    # of its functions when first imported, and DDP imports it. Imported after this point, those
    # defaults hold the default group for good, so destroy_process_group cannot free it: gloo's
    # threads then live on into the interpreter's exit. That is the likeliest cause of the rare
    # "terminate called without an active exception" after a finished run (twice in this
    # project's CI; not reproduced in 180 runs here, so not proven).
    importlib.import_module("torch.distributed.nn")  # (a plain import would make torch local here)
    # init_method env:// reads MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE set by torchrun.
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return get_dist_info()


def cleanup_distributed(wait: bool = True) -> None:
    """Leave the process group (call once, at the very end of a torchrun script).

    ``wait``: first meet the other processes at a barrier, so that none tears its connections
    down while another is still using them (rank 0 saving the last checkpoint, say). Pass
    ``False`` on the way out of an error, where the others may never reach the barrier. The
    group is freed here only if nothing else holds it (see :func:`init_distributed` for what did).
    """
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


@contextmanager
def leaving_process_group() -> Iterator[None]:
    """Run the body of a torchrun script, then leave the process group as
    :func:`cleanup_distributed` says: at a barrier when the body finished, at once when it raised.
    A no-op without a process group (a single process).
    """
    try:
        yield
    except BaseException:
        cleanup_distributed(wait=False)  # the other processes may never reach a barrier
        raise
    cleanup_distributed()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over all processes (a copy; identity for a single process)."""
    values = values.detach().clone()
    info = get_dist_info()
    if info.world_size > 1:
        dist.all_reduce(values)
        values /= info.world_size
    return values


def gather_predictions(local: dict) -> dict:
    """Merge every process's ``{image_id: prediction}`` dict; the result lives on rank 0.

    Evaluation shards the images across processes (:func:`shard_indices`); COCOeval must see
    them all, so rank 0 receives the union and the other ranks get ``{}``. Values must be
    picklable (move tensors to the CPU first).
    """
    info = get_dist_info()
    if info.world_size == 1:
        return dict(local)
    gathered: list[dict | None] = [None] * info.world_size
    dist.all_gather_object(gathered, local)
    if not info.is_main:
        return {}
    merged: dict = {}
    for part in gathered:
        merged.update(part or {})
    return merged


def shard_indices(num_items: int, rank: int, world_size: int) -> list[int]:
    """Evaluation shard of process ``rank``: items ``rank, rank + W, ...`` (no padding, no repeats)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return list(range(rank, num_items, world_size))


def derive_seed(*numbers: int) -> int:
    """A well-mixed 63-bit seed from a tuple of integers, e.g. ``(seed, epoch)``."""
    state = np.random.SeedSequence([int(n) for n in numbers]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class InfiniteBatchSampler:
    """Endless per-process batches of ``(dataset index, sample seed)``, a function of the iteration.

    Args:
        num_items: ``N``, the dataset's length.
        images_per_batch: ``G``, images per global batch (all processes together).
        seed: the run's seed; the data order and augmentation derive from it.
        rank, world_size: this process's shard, ``r`` of ``W``; ``G`` must divide by ``W``.
        start_iter: the first batch to yield (``i`` for a run resumed after ``i`` iterations).
        group_ids: optional ``(N,)`` group of each image; a batch then holds one group only.
    """

    def __init__(self, num_items: int, images_per_batch: int, seed: int, rank: int = 0,
                 world_size: int = 1, start_iter: int = 0,
                 group_ids: Sequence[int] | None = None) -> None:
        if num_items <= 0:
            raise ValueError(f"the dataset is empty (num_items={num_items})")
        if images_per_batch % world_size != 0:
            raise ValueError(f"images_per_batch={images_per_batch} must be divisible by "
                             f"the number of processes ({world_size})")
        if group_ids is not None and len(group_ids) != num_items:
            raise ValueError(f"group_ids has {len(group_ids)} entries, dataset has {num_items}")
        self.num_items, self.images_per_batch, self.seed = num_items, images_per_batch, seed
        self.rank, self.world_size, self.start_iter = rank, world_size, start_iter
        self.group_ids = None if group_ids is None else [int(g) for g in group_ids]

    def stream(self, start_position: int = 0) -> Iterator[tuple[int, int]]:
        """Endless ``(index, position)`` pairs: epoch ``e`` is a permutation seeded by ``(seed, e)``."""
        epoch, offset = divmod(start_position, self.num_items)
        while True:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            permutation = torch.randperm(self.num_items, generator=generator).tolist()
            for k in range(offset, self.num_items):
                yield permutation[k], epoch * self.num_items + k
            epoch, offset = epoch + 1, 0

    def global_batches(self) -> Iterator[list[tuple[int, int]]]:
        """Global batches ``start_iter, start_iter + 1, ...`` as lists of ``(index, position)``."""
        size = self.images_per_batch
        if self.group_ids is None:
            stream = self.stream(self.start_iter * size)
            while True:
                yield [next(stream) for _ in range(size)]
        buffers: dict[int, list[tuple[int, int]]] = {}
        batches_done = 0
        for index, position in self.stream(0):
            buffer = buffers.setdefault(self.group_ids[index], [])
            buffer.append((index, position))
            if len(buffer) == size:
                if batches_done >= self.start_iter:
                    yield list(buffer)
                batches_done += 1
                buffer.clear()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.global_batches():
            shard = batch[self.rank::self.world_size]  # (B,) like DistributedSampler's stride
            yield [(index, derive_seed(self.seed, position)) for index, position in shard]


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run a block under python / numpy / torch-CPU RNGs seeded with ``seed``, then restore them."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        # the CPU generator only: torch.manual_seed would also reseed every GPU's, which
        # fork_rng(devices=[]) does not put back (the model's samplers draw from it)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class SeededSamples(Dataset):
    """Wraps a dataset so ``samples[(index, seed)]`` loads ``dataset[index]`` under that seed.

    The dataset's own random augmentation (``torch.rand``, ``random.random``,
    ``np.random``) then repeats exactly, wherever and whenever the sample is loaded; the
    caller's RNGs are left as they were. An ``(image, target dict)`` sample also gets
    ``target["seed"]`` (an int), for the model's own random draw on that image, its train scale.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with seeded_rng(seed):
            sample = self.dataset[index]
        return _with_model_seed(sample, seed)


def _with_model_seed(sample, seed: int):
    """``(image, target)`` -> ``(image, {**target, "seed": s})``; any other sample as it is.

    ``s`` is derived from ``seed``, not ``seed`` itself: a generator seeded alike would repeat
    the dataset's first draws (its flip, say) and tie the model's scale to them. The target is
    a new dict: a dataset that keeps its targets in memory keeps them unchanged.
    """
    if isinstance(sample, tuple) and len(sample) == 2 and isinstance(sample[1], dict):
        image, target = sample
        return image, {**target, "seed": derive_seed(seed, 1)}
    return sample
