"""Small tensors the host builds, on the GPU without making the host wait for it.

A training step builds a few index tensors on the host from shapes it already knows (which row
of a padded batch is real, which image each RoI belongs to, each mask's offset). Copying such a
tensor to a CUDA device with a plain ``tensor.to(device)`` or ``torch.tensor(values,
device=device)`` is a *synchronising* copy: PyTorch copies from pageable host memory and then
waits on the stream, so the host stops until every kernel queued before the copy has run, and the
GPU then idles while the host launches the next ones. A miniature training step launches
thousands of small kernels, and eight trainings share one GPU, so each such wait costs far more
than its bytes. ``torch.cuda.set_sync_debug_mode("warn")`` reports these copies, which a CPU
run cannot see; :func:`count_syncs` counts them.

The remedy is standard: stage the tensor in pinned (page-locked) host memory and copy it with
``non_blocking=True``. The copy is then queued on the stream like a kernel, in order with the
kernels that read it; PyTorch's caching host allocator keeps the pinned block alive until the
copy has run. A constant needs no copy at all: ``torch.full`` fills it on the device.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor


def host_to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """``tensor`` (built on the host) on ``device``, without a host-device synchronisation.

    On a CUDA device the copy is queued asynchronously from pinned memory; anywhere else this is
    ``tensor.to(device)``. Values, dtype and shape are unchanged.
    """
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def count_syncs(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``(fn(), how many times it made the host wait for the GPU)``: reads of a value
    (``.item()``, ``bool(tensor)``, ``nonzero``), blocking copies, stream synchronisations, as
    ``torch.cuda.set_sync_debug_mode("warn")`` reports them. CUDA only."""
    torch.cuda.synchronize()  # what was queued before is not fn's
    before = torch.cuda.get_sync_debug_mode()  # restored after: the caller's, not "default"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode(before)
    return out, sum("synchroniz" in str(w.message) for w in caught)
