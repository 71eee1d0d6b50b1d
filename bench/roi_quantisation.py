"""How far RoIPool's quantisation moves a dataset's boxes, at a given input size and stride.

Mask R-CNN §3: "RoIPool first quantizes a floating-number RoI to the discrete granularity of
the feature map ... These quantizations introduce misalignments between the RoI and the
extracted features." How much they matter depends on the boxes' size *in feature cells*: the
same rounding is a small share of a 300 px object and a large one of a 30 px one. Table 2d's
larger gain for RoIAlign on C5 (stride 32) than on C4 (stride 16) is this ratio doubling.

For every (non-crowd) annotation of a COCO-format json this script resizes the box as the model
would (shorter side to ``--input-size``, longer side at most ``--max-size``), quantises it as
RoIPool does (``mrcnn_edu.ops.roi_pool.quantise_rois``, step 1: the RoI, not yet the bins) and
measures the IoU between the true box and the quantised one, per COCO size group (the groups
COCOeval uses: the annotation's ``area`` in the original image). RoIAlign's IoU is 1 by
construction: it does not quantise.

    python bench/roi_quantisation.py                                   # the Table 2 miniature's val set, 384 px
    python bench/roi_quantisation.py --annotations data/coco/annotations/instances_val2017.json \\
        --input-size 800 --max-size 1333                               # COCO at the paper's scale

Needs no model and no GPU; seconds on COCO's 36k val boxes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mrcnn_edu import ablations  # noqa: E402
from mrcnn_edu.boxes import matched_box_iou  # noqa: E402
from mrcnn_edu.ops.roi_pool import quantise_rois  # noqa: E402

# COCOeval's area ranges (pycocotools: small < 32², medium < 96², large the rest)
SIZE_GROUPS = (("all", 0.0, float("inf")), ("small", 0.0, 32.0**2),
               ("medium", 32.0**2, 96.0**2), ("large", 96.0**2, float("inf")))


def boxes_at_input_size(annotations: dict, input_size: int, max_size: int | None,
                        source: str = "annotations") -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, 4)`` xyxy boxes in the model's input pixels, and ``(A,)`` COCO areas (original
    image). Crowd annotations are skipped, as COCOeval ignores them."""
    images = {img["id"]: img for img in annotations["images"]}
    boxes, areas = [], []
    for ann in annotations["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        img = images.get(ann["image_id"])
        if img is None:
            raise ValueError(f"{source}: annotation {ann.get('id')} names image_id "
                             f"{ann['image_id']}, which is not in its 'images'")
        short, long = min(img["width"], img["height"]), max(img["width"], img["height"])
        scale = input_size / short
        if max_size is not None and long * scale > max_size:
            scale = max_size / long  # the paper's 1333 px cap on the longer side
        x, y, w, h = ann["bbox"]
        boxes.append([x * scale, y * scale, (x + w) * scale, (y + h) * scale])
        areas.append(float(ann["area"]))
    return (torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
            torch.tensor(areas, dtype=torch.float64))


def quantised_boxes(boxes: torch.Tensor, stride: int) -> torch.Tensor:
    """``(A, 4)`` xyxy boxes -> the boxes RoIPool pools from at this stride, in input pixels:
    cells ``start .. end`` inclusive (``quantise_rois``), scaled back by the stride."""
    rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], 1)
    x0, y0, w, h = quantise_rois(rois, 1.0 / stride)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1) * stride


def measure(boxes: torch.Tensor, areas: torch.Tensor, strides: Sequence[int]) -> list[dict]:
    """One record per (stride, size group): count, mean and 10th-percentile IoU between each true
    box and its quantised RoI, and the mean distance its four edges move (input pixels)."""
    records = []
    for stride in strides:
        q = quantised_boxes(boxes, stride)
        iou = matched_box_iou(boxes, q)  # (A,): each box with its own RoI
        shift = (q - boxes).abs().mean(1)
        for name, lo, hi in SIZE_GROUPS:
            m = (areas >= lo) & (areas < hi)
            n = int(m.sum())
            records.append({"stride": stride, "group": name, "boxes": n,
                            "iou_mean": float(iou[m].mean()) if n else float("nan"),
                            "iou_p10": float(iou[m].quantile(0.1)) if n else float("nan"),
                            "edge_shift_px": float(shift[m].mean()) if n else float("nan")})
    return records


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(ablations.DATA_DIRS["shapes"]) / "annotations" / "instances_val.json"
    parser.add_argument("--annotations", type=Path, default=default,
                        help=f"a COCO-format json (default: {default}, `ablate` makes it)")
    parser.add_argument("--input-size", type=int, default=ablations.MINI_INPUT_SIZE,
                        help="the shorter side the model resizes each image to")
    parser.add_argument("--max-size", type=int, default=None,
                        help="cap on the longer side (the paper: 1333); default none")
    parser.add_argument("--strides", type=int, nargs="+", default=[16, 32],
                        help="feature strides: 16 = C4 (res4), 32 = C5 (res5)")
    parser.add_argument("--json", action="store_true", help="print the records as JSON")
    args = parser.parse_args(argv)
    if not args.annotations.is_file():
        parser.error(f"--annotations {args.annotations}: no such file (the miniature's is made by "
                     "`python -m mrcnn_edu ablate` or `python -m mrcnn_edu.data.shapes`)")
    boxes, areas = boxes_at_input_size(json.loads(args.annotations.read_text()), args.input_size,
                                       args.max_size, str(args.annotations))
    records = measure(boxes, areas, args.strides)
    if args.json:
        print(json.dumps(records, indent=1))
        return records
    print(f"{args.annotations}: {len(boxes)} boxes, shorter side {args.input_size} px"
          + (f", longer at most {args.max_size}" if args.max_size else ""))
    print("stride  group    boxes  IoU(true box, RoIPool's RoI): mean / 10th pct  mean edge shift")
    for r in records:
        print(f"{r['stride']:6d}  {r['group']:7s} {r['boxes']:6d}  {r['iou_mean']:29.3f} / "
              f"{r['iou_p10']:.3f}  {r['edge_shift_px']:9.1f} px")
    return records


if __name__ == "__main__":
    main()
