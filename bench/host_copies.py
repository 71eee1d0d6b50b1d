"""Count, by call site, the tensors one training step builds on the host and sends to the device.

Each of those copies used to be a blocking ``.to(device)``, which on a GPU waits for the stream
to drain; ``mrcnn_edu.device.host_to_device`` now queues them without a wait. This counts the
calls of ``host_to_device`` in one training step of Table 2 miniature runs on the CPU (where the
function is a plain ``.to``), so it needs no GPU: the count is the same on any device.

    python bench/host_copies.py                   # r50_c4 and r50_fpn, 2 images
    python bench/host_copies.py --runs r50_c5_roialign --images 4
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dispatch_counts import synthetic_batch  # noqa: E402

import mrcnn_edu.device  # noqa: E402
from mrcnn_edu import ablations  # noqa: E402
from mrcnn_edu.model import MaskRCNN  # noqa: E402

# the modules that call host_to_device in a training step (each imported it by name)
CALLERS = ("mrcnn_edu.boxes", "mrcnn_edu.roi_heads.box_head", "mrcnn_edu.roi_heads.mask_head",
           "mrcnn_edu.ops.roi_align", "mrcnn_edu.model", "mrcnn_edu.data.transforms")


def count_host_copies(run: str, images: int = 2, size: int = 192) -> Counter:
    """The host_to_device calls of one training step of ``run``, by the calling function's name."""
    copies = Counter()
    real = mrcnn_edu.device.host_to_device

    def counting(tensor, device):
        copies[sys._getframe(1).f_code.co_name] += 1
        return real(tensor, device)

    modules = [sys.modules[name] for name in CALLERS]
    try:
        for module in modules:
            module.host_to_device = counting
        torch.manual_seed(0)
        model = MaskRCNN(ablations.model_config(ablations.RUNS[run])).train()
        batch, targets = synthetic_batch(images, size, torch.Generator().manual_seed(0))
        sum(model(batch, targets).values()).backward()
    finally:
        for module in modules:
            module.host_to_device = real
    return copies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="r50_c4,r50_fpn", help="comma-separated ablations.RUNS names")
    parser.add_argument("--images", type=int, default=2)
    args = parser.parse_args(argv)
    for run in args.runs.split(","):
        if run not in ablations.RUNS:
            parser.error(f"unknown run {run!r}; choose from {sorted(ablations.RUNS)}")
        copies = count_host_copies(run, args.images)
        print(f"{run}: {sum(copies.values())} host-to-device copies per training step "
              f"({', '.join(f'{k} {v}' for k, v in sorted(copies.items()))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
