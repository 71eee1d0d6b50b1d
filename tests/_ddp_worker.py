"""A stand-in detector for the engine's tests, and the script the DDP test runs under torchrun.

The engine only relies on the calling convention of the real Mask R-CNN: ``model(images,
targets) -> dict of scalar losses`` in train mode and ``model(images) -> list of dicts`` in
eval mode. ``TinyDetector`` keeps that convention at the size of a unit test: one conv, a
GroupNorm (batch-independent, so DDP and one process agree), optional dropout (so the RNG
state matters on resume), a classifier and a box regressor. ``TinyShapes`` has random
augmentation (flip, noise) drawn from the global RNGs, as real transforms do.

Usage (the DDP test does this):
    torchrun --nproc_per_node 2 tests/_ddp_worker.py --output-dir DIR --iters 4 --images-per-batch 8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for mrcnn_edu

from mrcnn_edu.distributed import (gather_predictions, get_dist_info,  # noqa: E402
                                   leaving_process_group, shard_indices)
from mrcnn_edu.engine import TrainConfig, train  # noqa: E402

NUM_CLASSES = 3
IMAGE_SIZE = 16


class TinyShapes(Dataset):
    """``num_images`` random 16×16 images, each with one box and a label in 1..3."""

    def __init__(self, num_images: int = 24, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        corners = torch.randint(0, IMAGE_SIZE // 2, (num_images, 2), generator=generator)
        sizes = torch.randint(2, IMAGE_SIZE // 2, (num_images, 2), generator=generator)
        self.boxes = torch.cat([corners, corners + sizes], dim=1).float()  # (N, 4) xyxy
        self.labels = torch.randint(1, NUM_CLASSES + 1, (num_images,), generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image, box = self.images[index].clone(), self.boxes[index].clone()
        if torch.rand(()) < 0.5:  # horizontal flip, from the global RNG like real transforms
            image = image.flip(-1)
            box = torch.stack([IMAGE_SIZE - box[2], box[1], IMAGE_SIZE - box[0], box[3]])
        image = image + 0.05 * torch.randn(image.shape)
        return image, {"boxes": box[None], "labels": self.labels[index][None],
                       "image_id": torch.tensor(index)}


def collate(batch):
    images, targets = zip(*batch)
    return list(images), list(targets)


class TinyDetector(nn.Module):
    """conv → GroupNorm → ReLU → dropout → pool → (class logits, box); losses are per-image means."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.dropout = nn.Dropout(dropout)
        self.cls_score = nn.Linear(8, NUM_CLASSES + 1)
        self.bbox_pred = nn.Linear(8, 4)
        self.feature_dtype: torch.dtype | None = None  # the conv's output dtype (autocast test)

    def forward(self, images, targets=None):
        features = self.conv(torch.stack(images))  # (B, 8, H, W)
        self.feature_dtype = features.dtype
        features = self.dropout(F.relu(self.norm(features)))
        pooled = features.float().mean(dim=(2, 3))  # (B, 8)
        logits, boxes = self.cls_score(pooled), self.bbox_pred(pooled) * IMAGE_SIZE  # (B, 4)
        if not self.training:
            scores, labels = logits.softmax(-1).max(-1)
            return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]
        gt_labels = torch.cat([t["labels"] for t in targets])  # (B,)
        gt_boxes = torch.cat([t["boxes"] for t in targets])  # (B, 4)
        return {"loss_classifier": F.cross_entropy(logits, gt_labels),
                "loss_box_reg": F.smooth_l1_loss(boxes / IMAGE_SIZE, gt_boxes / IMAGE_SIZE)}


def make_model(dropout: float = 0.0) -> TinyDetector:
    torch.manual_seed(0)  # the same initial weights in every process and every test
    return TinyDetector(dropout)


def make_evaluate_fn(dataset: TinyShapes):
    """Each process predicts its shard of the images; rank 0 gets them all and scores them."""

    def evaluate(model: nn.Module) -> dict:
        info = get_dist_info()
        local = {}
        for index in shard_indices(len(dataset), info.rank, info.world_size):
            prediction = model([dataset.images[index]])[0]
            local[index] = int(prediction["labels"])
        predictions = gather_predictions(local)
        if not info.is_main:
            return {}
        correct = sum(int(label == dataset.labels[i]) for i, label in predictions.items())
        return {"num_images": len(predictions), "accuracy": correct / len(predictions),
                "labels": [predictions[i] for i in sorted(predictions)]}

    return evaluate


def ddp_test_config(output_dir: str, iters: int, images_per_batch: int) -> TrainConfig:
    return TrainConfig(base_lr=0.2, max_iter=iters, steps=(iters - 1,), warmup_iters=2,
                       images_per_batch=images_per_batch, reference_batch=images_per_batch,
                       device="cpu", num_workers=0, output_dir=output_dir,
                       checkpoint_period=iters, log_period=1, progress=False, seed=1)


def run(output_dir: str, iters: int, images_per_batch: int, resume: bool = False) -> dict:
    """Train the stand-in; rank 0 writes the final weights and the evaluation it gathered."""
    dataset = TinyShapes()
    cfg = replace(ddp_test_config(output_dir, iters, images_per_batch), resume=resume)
    result = train(make_model(), dataset, cfg, collate, evaluate_fn=make_evaluate_fn(dataset))
    if get_dist_info().is_main:
        model_state = torch.load(result["checkpoint"], weights_only=True)["model"]
        torch.save(model_state, Path(output_dir) / "final_weights.pt")
        (Path(output_dir) / "eval.json").write_text(json.dumps(result["eval"]))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--images-per-batch", type=int, default=8)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--rank1-output-dir", help="rank 1's output_dir: a node that does not share "
                        "rank 0's folder")
    args = parser.parse_args()
    output_dir = args.output_dir
    if args.rank1_output_dir and os.environ.get("RANK") == "1":  # torchrun's; before train() joins
        output_dir = args.rank1_output_dir
    with leaving_process_group():  # at a barrier: rank 0 still writes files when rank 1 is done
        run(output_dir, args.iters, args.images_per_batch, args.resume)
    if os.path.isdir("/proc/self/task"):  # Linux: the threads left, for the test to see none is gloo's
        names = [Path(f"/proc/self/task/{task}/comm").read_text().strip() for task in os.listdir("/proc/self/task")]
        Path(output_dir, f"threads_after_leaving_rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(names))
