"""Count what a training step and an inference ask of the device: ATen ops and host reads.

On a GPU, each ATen op the CPU dispatches is at least one kernel launch, but views (the ops
counted here include them; ``--sites`` says how many), and each op that
reads a device value on the host (``.item()``, ``bool(t)``, ``nonzero``, boolean masking
(``x[mask]``, counted as ``index (boolean mask)``),
``unique``, ``.tolist()``) is a synchronisation: the CPU waits until the GPU has drained its
queue. For small images (the Table 2 miniature) the time per iteration is set by these
counts rather than by arithmetic, so they are the first thing to compare -- and they are the
same on every machine, so they are measured here, on the CPU, in one run for both models.

Compared: our R-50-FPN Mask R-CNN and torchvision's ``maskrcnn_resnet50_fpn``, the same network
with the same weights and a few likely classes per proposal, as ``train_infer.py`` builds them,
on ``--size`` pixel images (default 192, the miniature's), ``--batches`` of images with 3-6
objects each; and our Table 2 miniature (``--mini``). RoIAlign is counted as one op for both (on a GPU
ours is one CuPy kernel launch, torchvision's one CUDA kernel; on this CPU our PyTorch path
would be counted op by op, which says nothing about the GPU).

    python bench/dispatch_counts.py                 # both R-50-FPN models, 2 and 16 images
    python bench/dispatch_counts.py --mini          # our miniature Table 2 default rows too
    python bench/dispatch_counts.py --sites r50_c4  # where one miniature's training ops come from
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback
import weakref
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mrcnn_edu.boxes as boxes_module  # noqa: E402
from mrcnn_edu.model import MaskRCNN  # noqa: E402,F401  (imports the module patched below)

# the modules, not the functions of the same name that mrcnn_edu.ops exports
roi_align_module = sys.modules["mrcnn_edu.ops.roi_align"]
roi_pool_module = sys.modules["mrcnn_edu.ops.roi_pool"]

# ops that make the host wait for the device
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
              "unique_consecutive", "equal", "is_nonzero", "bincount"}
# indexing ops that read the device when an index is a boolean mask (x[mask], x[mask] = v): the
# result's size is the mask's count. They dispatch as one op, whose nonzero runs inside it.
MASK_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


def host_read(func, args) -> str | None:
    """The name under which ``func(*args)`` counts as a host read, or None if it reads nothing."""
    name = func.__name__.split(".")[0]
    if name in HOST_READS:
        return name
    if name in MASK_INDEXING and len(args) > 1 and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ()):
        return f"{name} (boolean mask)"
    return None


def is_view(func) -> bool:
    """Whether an ATen op returns a view of its input (``detach``, ``select``, ``slice``,
    ``expand``...): on a GPU it launches no kernel, only host work."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


# random draws that land on the CPU whatever device the model is on, unless a device is named:
# reading one (``.tolist()``, ``int()``) is no sync on a GPU either, though every tensor of this
# CPU run looks alike (e.g. ``transforms.draw_min_sizes``'s scale jitter)
HOST_DRAWS = {torch.randint, torch.rand, torch.randn, torch.randperm}


def host_drawn(func, args, kwargs) -> bool:
    """Whether ``func(*args, **kwargs)`` draws a tensor on the host's generator, on the CPU."""
    return (func in HOST_DRAWS and (kwargs or {}).get("device") is None
            and not any(isinstance(a, torch.Tensor) for a in args))


class _ToListCounter(TorchFunctionMode):
    """``tensor.tolist()`` copies a device tensor to the host without dispatching an ATen op,
    so the dispatch counter alone would not see it: caught here, one level up. Also notes the
    tensors the host drew itself (:func:`host_drawn`), whose reads are no sync."""

    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist and not self.counter.is_host_drawn(args[0]):
            self.counter.record_read("tolist")
        out = func(*args, **(kwargs or {}))
        if host_drawn(func, args, kwargs) and isinstance(out, torch.Tensor):
            self.counter.host_tensors[id(out)] = out
        return out


class DispatchCounter(TorchDispatchMode):
    """Counts every ATen op dispatched inside the ``with`` block, the views among them, and
    those that read values (``.tolist()`` too, which dispatches no op)."""

    def __init__(self):
        super().__init__()
        self.ops, self.views, self.reads = 0, 0, collections.Counter()
        self.host_tensors: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> tensor
        self._tolist = _ToListCounter(self)

    def is_host_drawn(self, tensor) -> bool:
        return self.host_tensors.get(id(tensor)) is tensor

    def read_of(self, func, args) -> str | None:
        """:func:`host_read`, less ``int()`` / ``.item()`` of a tensor the host drew itself."""
        name = host_read(func, args)
        return None if name == "_local_scalar_dense" and self.is_host_drawn(args[0]) else name

    def record_read(self, name: str) -> None:
        self.reads[name] += 1

    def __enter__(self):
        self._tolist.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._tolist.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.views += is_view(func)
        name = self.read_of(func, args)
        if name is not None:
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))


def _site() -> str:
    """The innermost ``mrcnn_edu`` function on the stack, as ``file.py:function``."""
    for frame in reversed(traceback.extract_stack(limit=40)):
        if "mrcnn_edu" + os.sep in frame.filename:
            return f"{frame.filename.split('mrcnn_edu' + os.sep)[-1]}:{frame.name}"
    return "<autograd>"


class SiteCounter(DispatchCounter):
    """Also counts each op against the innermost ``mrcnn_edu`` function that called it
    (``"<autograd>"``: the backward pass, which runs no Python of ours)."""

    def __init__(self):
        super().__init__()
        self.sites, self.site_reads = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        site = _site()
        self.sites[site] += 1
        if self.read_of(func, args) is not None:
            self.site_reads[site] += 1
        return super().__torch_dispatch__(func, types, args, kwargs)

    def record_read(self, name: str) -> None:
        super().record_read(name)
        self.site_reads[_site()] += 1


def print_sites(run: str, batch: int, size: int, top: int = 15) -> None:
    """The call sites that dispatch the most ops in one training step of a miniature run."""
    from mrcnn_edu import ablations

    model = MaskRCNN(ablations.model_config(ablations.RUNS[run])).train()
    images, targets = synthetic_batch(batch, size, torch.Generator().manual_seed(batch))
    with SiteCounter() as counter:
        sum(model(images, targets).values()).backward()
    print(f"ours mini {run}, training step on {batch} images of {size} px: {counter.ops} ops "
          f"({counter.views} of them views, which launch no kernel on a GPU), "
          f"{sum(counter.reads.values())} host reads; the top {top} call sites (ops, host reads):")
    for site, ops in counter.sites.most_common(top):
        print(f"{ops:7d} {counter.site_reads[site]:5d}  {site}")


def as_on_a_gpu():
    """Make this CPU run dispatch what a CUDA run would.

    - Our PyTorch RoIAlign becomes torchvision's single op (see the module docstring).
    - ``check_boxes`` reads coordinates on the host only for CPU tensors (on a GPU the model
      checks its targets once per batch); here every tensor is on the CPU, so the calls that
      leave ``values`` to its default are made to skip it, as they would on a GPU; so are the
      mask head's value checks (``mask_head._check_values``).
    - NMS builds the whole overlap matrix and decides in rounds (``greedy_keep_in_rounds``, one
      host read per 4 rounds) as it does on CUDA tensors, instead of the CPU's blocks of boxes
      (``greedy_keep_by_blocks``), each read on the host; IoUs take ``boxes.py``'s GPU way
      (``boxes._takes_the_cpu_way``).
    """
    check_boxes = boxes_module.check_boxes
    boxes_module._takes_the_cpu_way = lambda device: False
    boxes_module.greedy_keep = boxes_module.greedy_keep_in_rounds

    def check_boxes_as_on_a_gpu(boxes, name="boxes", allow_empty_size=True, values=None, batched=False):
        check_boxes(boxes, name, allow_empty_size, values=bool(values), batched=batched)

    boxes_module.check_boxes = check_boxes_as_on_a_gpu
    sys.modules["mrcnn_edu.model"].check_boxes = check_boxes_as_on_a_gpu
    sys.modules["mrcnn_edu.roi_heads.mask_head"]._check_values = lambda tensor: False
    from torchvision.ops import roi_align as tv_roi_align

    def one_op(input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode):
        if mode != "avg":
            raise ValueError("the stand-in counts avg RoIAlign only")
        return tv_roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)

    roi_align_module.roi_align_torch = one_op
    roi_pool_module.roi_align_torch = one_op
    roi_align_module.cupy_available = lambda: False


def synthetic_batch(batch: int, size: int, generator: torch.Generator):
    images, targets = [], []
    for _ in range(batch):
        n = int(torch.randint(3, 7, (), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * size * 0.7
        wh = torch.rand(n, 2, generator=generator) * size * 0.25 + size * 0.05
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
        masks = torch.zeros(n, size, size, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.round().int().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        images.append(torch.rand(3, size, size, generator=generator))
        targets.append({"boxes": boxes, "labels": torch.randint(1, 9, (n,), generator=generator),
                        "masks": masks})
    return images, targets


def count(model, images, targets, train: bool) -> tuple[int, int]:
    model.train(train)
    with DispatchCounter() as counter:
        if train:
            losses = model(images, targets)
            sum(losses.values()).backward()
        else:
            with torch.no_grad():
                model(images)
    return counter.ops, sum(counter.reads.values())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--mini", action="store_true", help="also our Table 2 miniature rows")
    parser.add_argument("--sites", metavar="RUN", help="only: the call sites of one miniature "
                        "run's training ops (a Table 2 run name, e.g. r50_c4), at the largest batch")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    as_on_a_gpu()
    if args.sites:
        print_sites(args.sites, max(args.batches), args.size)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_infer import build_ours, build_torchvision

    torch.manual_seed(0)
    theirs = build_torchvision(args.size, args.size * 2, all_classes=False)
    models = {"ours R-50-FPN": build_ours(theirs, args.size, args.size * 2, all_classes=False),
              "torchvision R-50-FPN": theirs}
    if args.mini:
        from mrcnn_edu import ablations
        for run in ("r50_fpn", "r50_c4"):
            models[f"ours mini {run}"] = MaskRCNN(ablations.model_config(ablations.RUNS[run]))
    print(f"{args.size} px images; per call: ATen ops (views included, which launch no kernel; each other "
          f">= 1 kernel launch on a GPU) and host reads (each a GPU sync)")
    print(f"{'model':<26}{'images':>7}{'train ops':>11}{'syncs':>7}{'/image':>8}"
          f"{'infer ops':>11}{'syncs':>7}")
    rows = {}
    for batch in args.batches:
        images, targets = synthetic_batch(batch, args.size, torch.Generator().manual_seed(batch))
        for name, model in models.items():
            train_ops, train_reads = count(model, images, targets, True)
            infer_ops, infer_reads = count(model, images, None, False)
            rows[(name, batch)] = (train_ops, train_reads, infer_ops, infer_reads)
            print(f"{name:<26}{batch:>7}{train_ops:>11}{train_reads:>7}{train_ops / batch:>8.0f}"
                  f"{infer_ops:>11}{infer_reads:>7}", flush=True)
    for batch in args.batches:
        ours, theirs = rows[("ours R-50-FPN", batch)], rows[("torchvision R-50-FPN", batch)]
        print(f"ratio ours / torchvision at {batch} images: train ops {ours[0] / theirs[0]:.2f}, "
              f"syncs {ours[1] / max(theirs[1], 1):.2f}; inference ops {ours[2] / theirs[2]:.2f}, "
              f"syncs {ours[3] / max(theirs[3], 1):.2f}")


if __name__ == "__main__":
    main()
