"""What the current shapes generator would write differently into a shapes set made earlier.

A set written by an older generator version (its json ``info``) is compared, scene by scene,
with what this version renders from the same seed: the number of images whose annotations
differ, and of which kind. docs/training.md quotes it for the Table 2 set (version 1 against 2):

    python bench/shapes_version_diff.py data/generated/shapes   # a set ablate made earlier

It renders every scene again (no files written): about a minute per 1000 images on one core.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from mrcnn_edu.data import shapes  # noqa: E402


def compare_split(root: Path, split: str) -> dict:
    """Counts of images and annotations of ``root``'s ``split`` that this generator writes otherwise."""
    data = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    seed = int(re.search(r"seed (\d+)", data["info"]["description"]).group(1))
    sizes = {(image["width"], image["height"]) for image in data["images"]}
    if len(sizes) != 1 or len(set(sizes.pop())) != 1:
        raise ValueError(f"{root}: expected square images of one size, got {sorted(sizes)}")
    size = data["images"][0]["width"]
    cfg = shapes.default_config() if size == shapes.default_config().image_size else shapes.tiny_config()
    if cfg.image_size != size:
        raise ValueError(f"{root}: {size} px images are neither preset's ({shapes.default_config().image_size}, "
                         f"{shapes.tiny_config().image_size})")
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    cat_ids = {c["name"]: c["id"] for c in data["categories"]}
    counts: Counter = Counter(images=len(data["images"]))
    for image in data["images"]:
        image_id = image["id"]
        scene = shapes.render_scene(cfg, shapes.scene_rng(seed, split, image_id - 1))
        now = shapes.scene_annotations(scene, image_id, 1, cat_ids)
        then = by_image.get(image_id, [])
        changed = len(now) != len(then)
        for old, new in zip(then, now):
            old, new = ({k: v for k, v in a.items() if k != "id"} for a in (old, new))  # ids are global
            if json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):
                changed = True
                counts["crowd annotations" if old.get("iscrowd") else
                       "keypoint annotations" if old.get("keypoints") != new.get("keypoints") else
                       "other annotations"] += 1
        counts["images changed"] += changed
    return {"version then": data["info"].get("generator_version", 1), **counts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", help="a shapes set: ROOT/annotations/instances_{train,val}.json")
    args = parser.parse_args(argv)
    for split in ("train", "val"):
        print(f"{split}: version now {shapes.GENERATOR_VERSION},", compare_split(Path(args.root), split))


if __name__ == "__main__":
    main()
