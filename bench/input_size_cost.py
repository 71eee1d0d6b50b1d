"""What a larger ``ablate --input-size`` costs on a GPU, bounded on the CPU: FLOPs, bytes, launches.

The Table 2 miniature's images are 192 px; its default ``--input-size 384`` upsamples them 2x
inside the model, so that the stride-16 C4 features resolve the shapes' thin parts
(docs/training.md). What that costs on a GPU depends on what bounds a training step there:

- **arithmetic** (large images, wide models): time grows with the FLOPs of the convolutions and
  matrix products, counted here by ``torch.utils.flop_counter.FlopCounterMode`` (forward and
  backward of one training step);
- **memory traffic** (normalisations, activations, additions): time grows with the bytes the ops
  write, counted here as the size of every op's outputs;
- **kernel launches** (tiny models, small images: the miniature): time grows with the number of
  ATen ops dispatched, each at least one launch on a GPU (``dispatch_counts.py``), and hardly
  with the pixels.

So the GPU's time ratio between 384 and 192 px lies between the launch ratio (the lowest it can
be) and the larger of the FLOP and bytes ratios. All three counts are the same on every machine,
so they are measured here, on a synthetic batch of 192 px images with 3-6 boxes each (the model
resizes them). RoI pooling is one op for every variant (as in ``dispatch_counts.py``) and no
FLOPs, so each run is counted as its RoIAlign-avg twin (the 15 runs of the table have 10
distinct costs), and the table's total weights each by the number of runs it stands for.

    python bench/input_size_cost.py                      # every run, 8 images, 192 vs 384
    python bench/input_size_cost.py --runs r50_c4 r50_fpn --batch 16 --sizes 192 288 384
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dispatch_counts import DispatchCounter, as_on_a_gpu, synthetic_batch  # noqa: E402
from mrcnn_edu import ablations  # noqa: E402
from mrcnn_edu.model import MaskRCNN  # noqa: E402


class ByteCounter(DispatchCounter):
    """Counts ATen ops, as ``DispatchCounter``, and the bytes of the tensors they return.

    Views (``reshape``, ``permute``, slicing) write nothing and are not counted; in-place ops
    count the tensor they write.
    """

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.bytes += t.numel() * t.element_size()
        return out


def step_cost(model: MaskRCNN, images, targets) -> tuple[float, float, int]:
    """(GFLOPs, GB written, ATen ops) of one training step: forward, losses, backward."""
    model.train()
    with FlopCounterMode(display=False) as flops, ByteCounter() as ops:
        losses = model(images, targets)
        sum(losses.values()).backward()
    model.zero_grad(set_to_none=True)
    return flops.get_total_flops() / 1e9, ops.bytes / 1e9, ops.ops


def cost_twin(run: str) -> str:
    """The run whose training step costs what ``run``'s does: the same with RoIAlign avg."""
    twin = dataclasses.replace(ablations.RUNS[run], pooler="roi_align", pool_mode="avg", note="")
    return next(name for name, spec in ablations.RUNS.items()
                if dataclasses.replace(spec, note="") == twin)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=list(ablations.RUNS), choices=list(ablations.RUNS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[192, 384],
                        help="input sizes; the first is the reference")
    parser.add_argument("--batch", type=int, default=8, help="images per training step")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    as_on_a_gpu()
    images, targets = synthetic_batch(args.batch, ablations.MINI_IMAGE_SIZE, torch.Generator().manual_seed(0))

    stands_for = collections.Counter(cost_twin(run) for run in args.runs)
    ref = args.sizes[0]
    print(f"one training step of {args.batch} images of {ablations.MINI_IMAGE_SIZE} px, resized to each "
          f"size by the model: GFLOPs (forward + backward), GB the ops write, ATen ops (each >= 1 GPU launch)")
    header = "".join(f"{f'{s}: GFLOP':>12}{'GB':>6}{'ops':>7}" for s in args.sizes)
    ratios = "".join(f"{f'{s}/{ref}: flop':>14}{'GB':>6}{'ops':>6}" for s in args.sizes[1:])
    print(f"{'run (runs it stands for)':<26}{header}{ratios}")

    def cells(row: dict) -> str:
        counts = "".join(f"{row[s][0]:>12.1f}{row[s][1]:>6.1f}{row[s][2]:>7.0f}" for s in args.sizes)
        return counts + "".join(f"{row[s][0] / row[ref][0]:>14.2f}{row[s][1] / row[ref][1]:>6.2f}"
                                f"{row[s][2] / row[ref][2]:>6.2f}" for s in args.sizes[1:])

    costs = {}
    for run in stands_for:
        row = {}
        for size in args.sizes:
            torch.manual_seed(0)  # the same weights at every size: the same proposals to sample from
            cfg = ablations.model_config(ablations.RUNS[run], input_size=size)
            row[size] = step_cost(MaskRCNN(cfg), images, targets)
        costs[run] = row
        print(f"{f'{run} ({stands_for[run]})':<26}{cells(row)}", flush=True)
    total = {s: tuple(sum(stands_for[run] * costs[run][s][k] for run in costs) for k in range(3))
             for s in args.sizes}
    print(f"{f'table ({len(args.runs)} runs)':<26}{cells(total)}")
    return {"costs": costs, "total": total}


if __name__ == "__main__":
    main()
