"""A synthetic COCO-format dataset: shapes with masks, a stick figure with 17 keypoints.

COCO itself (§4: "we train using the union of 80k train images and a 35k subset of val
images (trainval35k), and report ablations on the remaining 5k val images (minival)") needs
GPU-days per Table 2 row. This module writes a *research proxy* in the exact COCO format
(PNG images + ``instances_{train,val}.json``) so the same loader, model and ``COCOeval``
run on it, and so Table 2's effects can show in minutes. Each design choice has a reason:

- **Classes told apart by shape, not colour** (ellipse, triangle, star, ring, cross,
  crescent, bar, person): every object gets a random colour and texture, so the only cue
  for the class is the outline -- the mask and box heads must look at geometry.
- **Sizes from ~8 px to most of the image**: log-uniform between ``min_size_frac`` and
  ``max_size_frac`` of the image side, plus a few tiny objects (``tiny_prob``), so APs/APm/
  APl all have objects and a stride-16/32 feature map has to localise sub-cell objects --
  where RoIPool's quantisation hurts (Table 2c/d).
- **Thin and non-convex parts** (bars, star points, ring holes, crescents, stick limbs):
  a one-pixel misalignment changes the IoU of a thin part a lot, which is what AP75
  measures and what RoIAlign fixes.
- **Overlap and occlusion**: larger objects are drawn first, later objects occlude earlier
  ones, masks are the *visible* part, and objects left less than ``min_visible_frac``
  visible are removed from the scene (not just from the json).
- **Textured, noisy backgrounds** (smooth colour noise + gradient + pixel noise): the RPN
  cannot find objects by thresholding a flat background.
- **A person-like class with COCO's 17 keypoint names** (left/right pairs, COCO's skeleton),
  so ``COCOeval``'s hard-coded 17 keypoint sigmas apply unchanged (§5, Table 4-6).
- **Both COCO mask encodings and crowds**: unoccluded objects store the polygon they were
  rasterised from; occluded objects and rings (holes) store compressed RLE; a few
  ``iscrowd=1`` clusters of tiny objects store uncompressed RLE, as in real COCO.

Pixel-exactness: every object is rasterised *by pycocotools* from its (rounded) polygon,
so ``COCO.annToMask`` returns exactly the rendered visible pixels. Keypoints are written in
COCO's pixel-index convention: a keypoint at continuous position ``x`` (pixel ``i`` covers
``[i, i+1)``) is stored as ``x - 0.5`` (see ``coco.py``, ``COCO_KEYPOINT_OFFSET``).

Determinism: image ``j`` of split ``s`` draws from ``numpy.random.default_rng([seed, s, j])``;
PNGs are written by PIL with fixed parameters and the json with sorted keys and rounded floats,
so the same arguments give byte-identical files with the same numpy and Pillow versions on the
same machine (numpy keeps a generator's stream, and Pillow its resampling, only within a build;
another build may change a pixel or a json digit here and there). Each json's ``info`` records
what made it -- generator version, seed and the whole ``ShapesConfig`` -- so a reader can tell
two sets apart without comparing pixels.

Crash- and race-safety: every file is written under a temporary name and renamed into place, and
``instances_val.json`` is written last, so its presence means the whole set is there. Before the
first image, both jsons of a set already in the folder are deleted (val first): its PNGs are
about to be replaced, and an old json must not describe new pixels. So a killed generation
leaves no half-written PNG or json and no set that looks finished (the next run starts again),
and two processes that generate the same set at once (two trainings started side by side) write
the same bytes and never read half a file of the other's. (The trade-off: one that starts just
as its twin finishes removes the twin's jsons until it writes them again; a training opening
them in that moment stops on a missing file, never trains on other data.)

Usage: ``python -m mrcnn_edu.data.shapes --out data/generated/shapes --train 4000 --val 500
--size 192 --seed 0 [--preset default|tiny]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, replace

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

SHAPE_NAMES = ("ellipse", "triangle", "star", "ring", "cross", "crescent", "bar", "person")
PERSON = "person"
# a stick figure is drawn at least this many pixels tall: smaller, its limbs and keypoints merge
PERSON_MIN_SIDE = 20.0
# COCO's 17 person keypoints and skeleton (1-based, as in person_keypoints_*.json).
KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
    "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)
SKELETON = [
    [16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8],
    [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7],
]
# the generator's version, written into every json's "info": the same seed gives other data
# under another version. 2 (2026-12-01): crowd members pushed off the image are dropped, not
# piled onto its edge; keypoint visibility is read at the stored (rounded) point
GENERATOR_VERSION = 2
KEYPOINT_FLIP_MAP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
SPLITS = ("train", "val")


@dataclass
class ShapesConfig:
    image_size: int = 192  # square images; small enough to train from scratch in minutes
    min_objects: int = 2
    max_objects: int = 6
    min_size_frac: float = 0.12  # log-uniform object size, as a fraction of the image side
    max_size_frac: float = 0.75  # "most of the image"
    tiny_prob: float = 0.1  # extra tiny objects (8-14 px) for APs
    tiny_size: tuple[float, float] = (8.0, 14.0)
    min_visible_frac: float = 0.5  # drop objects occluded more than this
    min_visible_area: int = 12  # px; smaller visible remnants are dropped too
    crowd_prob: float = 0.08  # images with one iscrowd=1 cluster of tiny objects
    n_train: int = 4000
    n_val: int = 500


def default_config() -> ShapesConfig:
    """192 px, 2-6 objects, 4000/500 images: trains in minutes on one GPU."""
    return ShapesConfig()


def tiny_config() -> ShapesConfig:
    """64 px, 1-3 objects, 12/6 images: for CPU tests (generated in well under a second)."""
    return ShapesConfig(image_size=64, min_objects=1, max_objects=3, min_size_frac=0.25,
                        max_size_frac=0.7, tiny_prob=0.0, crowd_prob=0.3, n_train=12, n_val=6)


PRESETS = {"default": default_config, "tiny": tiny_config}


@dataclass
class SceneObject:
    category: str
    polygons: list[list[float]]  # outline(s), rounded; union = the full (unoccluded) mask
    holes: list[list[float]]  # polygons subtracted from the union (the ring's hole)
    full_mask: np.ndarray  # (H, W) bool
    iscrowd: int = 0
    keypoints: np.ndarray | None = None  # (17, 2) continuous pixel coordinates


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    instance_map: np.ndarray  # (H, W) int, index into objects of the visible object, -1 = bg
    objects: list[SceneObject]  # in drawing order


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of image ``index`` of ``split``: independent of all other images."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


# ---------------------------------------------------------------- outlines (unit size)
def _circle(n: int, rx: float, ry: float, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _segment(p: np.ndarray, q: np.ndarray, width: float) -> np.ndarray:
    """A rectangle around segment p-q, extended by width/2 at both ends so limbs join."""
    d = (q - p) / max(np.linalg.norm(q - p), 1e-6)
    n = np.array([-d[1], d[0]]) * width / 2
    p, q = p - d * width / 2, q + d * width / 2
    return np.stack([p + n, q + n, q - n, p - n])


def _outline(category: str, rng: np.random.Generator):
    """(polygons, holes, keypoints) of a shape of extent ~1 centred at 0 (y points down)."""
    if category == "ellipse":
        return [_circle(32, 0.5, 0.5 * rng.uniform(0.65, 1.0))], [], None
    if category == "triangle":
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.25, 0.25, 3)
        return [0.55 * np.stack([np.cos(t), np.sin(t)], 1)], [], None
    if category == "star":
        radius = np.where(np.arange(10) % 2 == 0, 0.5, 0.5 * rng.uniform(0.35, 0.5))
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        return [np.stack([radius * np.cos(t), radius * np.sin(t)], 1)], [], None
    if category == "ring":
        return [_circle(40, 0.5, 0.5)], [_circle(40, *(2 * [0.5 * rng.uniform(0.45, 0.65)]))], None
    if category == "cross":
        a = rng.uniform(0.11, 0.18)  # half arm thickness
        xs = [-a, a, a, 0.5, 0.5, a, a, -a, -a, -0.5, -0.5, -a]
        ys = [-0.5, -0.5, -a, -a, a, a, 0.5, 0.5, a, a, -a, -a]
        return [np.stack([xs, ys], 1)], [], None
    if category == "crescent":  # outer circle minus an offset inner circle, traced as one outline
        r1, r2, d = 0.5, 0.5 * rng.uniform(0.75, 0.9), 0.5 * rng.uniform(0.35, 0.6)
        x0 = (r1**2 - r2**2 + d**2) / (2 * d)
        y0 = np.sqrt(r1**2 - x0**2)
        phi1, phi2 = np.arctan2(y0, x0), np.arctan2(y0, x0 - d)
        outer = _circle_arc(r1, 0.0, phi1, 2 * np.pi - phi1, 24)
        inner = _circle_arc(r2, d, 2 * np.pi - phi2, phi2, 16)
        return [np.concatenate([outer, inner])], [], None
    if category == "bar":
        w = rng.uniform(0.06, 0.16)
        return [np.array([[-0.5, -w], [0.5, -w], [0.5, w], [-0.5, w]])], [], None
    if category == PERSON:
        return _stick_figure(rng)
    raise ValueError(f"category must be one of {SHAPE_NAMES}, got {category!r}")


def _circle_arc(r: float, cx: float, start: float, stop: float, n: int) -> np.ndarray:
    t = np.linspace(start, stop, n)
    return np.stack([cx + r * np.cos(t), r * np.sin(t)], 1)


def _stick_figure(rng: np.random.Generator):
    """A frontal stick figure of height ~1: the person's left is image right (+x), as in COCO."""
    def limb(origin, angle, length):  # angle measured from straight down
        return origin + length * np.array([np.sin(angle), np.cos(angle)])

    kp = {"nose": np.array([0.0, -0.38]), "left_eye": np.array([0.035, -0.42]),
          "right_eye": np.array([-0.035, -0.42]), "left_ear": np.array([0.08, -0.40]),
          "right_ear": np.array([-0.08, -0.40]), "left_shoulder": np.array([0.12, -0.27]),
          "right_shoulder": np.array([-0.12, -0.27]), "left_hip": np.array([0.07, 0.05]),
          "right_hip": np.array([-0.07, 0.05])}
    for side, sign in (("left", 1.0), ("right", -1.0)):
        kp[f"{side}_elbow"] = limb(kp[f"{side}_shoulder"], sign * rng.uniform(0.2, 1.6), 0.17)
        kp[f"{side}_wrist"] = limb(kp[f"{side}_elbow"], sign * rng.uniform(-0.4, 2.4), 0.16)
        kp[f"{side}_knee"] = limb(kp[f"{side}_hip"], sign * rng.uniform(0.0, 0.5), 0.22)
        kp[f"{side}_ankle"] = limb(kp[f"{side}_knee"], sign * rng.uniform(-0.3, 0.3), 0.22)
    width = 0.075  # limbs ~4 px wide on a 50 px figure: thin, yet wider than a pixel
    polys = [_circle(20, 0.09, 0.09, 0.0, -0.40),
             np.stack([kp["left_shoulder"], kp["left_hip"], kp["right_hip"], kp["right_shoulder"]])]
    for a, b in ((5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16)):
        polys.append(_segment(kp[KEYPOINT_NAMES[a]], kp[KEYPOINT_NAMES[b]], width))
    polys.append(_segment(np.array([0.0, -0.32]), np.array([0.0, -0.27]), 0.06))  # neck
    return polys, [], np.stack([kp[name] for name in KEYPOINT_NAMES])


# ---------------------------------------------------------------- rasterising and painting
def _rasterise(polygons: list[list[float]], h: int, w: int) -> np.ndarray:
    """Union of polygons as pycocotools draws them (what ``annToMask`` gives back)."""
    if not polygons:
        return np.zeros((h, w), bool)
    rles = mask_utils.frPyObjects(polygons, h, w)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _place(category: str, size: float, rng: np.random.Generator, image_size: int,
           min_size: float = 4.0) -> SceneObject:
    polys, holes, keypoints = _outline(category, rng)
    angle = rng.uniform(-0.3, 0.3) if category == PERSON else rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = np.concatenate(polys)
    extent = (pts @ rot.T).max(0) - (pts @ rot.T).min(0)
    size = max(min(size, (image_size - 2) / extent.max()), min_size)  # keep it inside the image
    lo = -(pts @ rot.T).min(0) * size + 1
    hi = image_size - 1 - (pts @ rot.T).max(0) * size
    centre = rng.uniform(lo, np.maximum(hi, lo))

    def to_image(p: np.ndarray) -> list[float]:
        return [round(float(v), 2) for v in (p @ rot.T * size + centre).reshape(-1)]

    polygons, hole_polys = [to_image(p) for p in polys], [to_image(p) for p in holes]
    full = _rasterise(polygons, image_size, image_size) & ~_rasterise(hole_polys, image_size, image_size)
    kps = None if keypoints is None else keypoints @ rot.T * size + centre
    return SceneObject(category, polygons, hole_polys, full, 0, kps)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    grid = rng.uniform(0, 255, (cells, cells, channels)).astype(np.uint8)
    img = Image.fromarray(grid.squeeze(-1) if channels == 1 else grid)
    out = np.asarray(img.resize((size, size), Image.BICUBIC), np.float32)
    return out.reshape(size, size, channels)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = _smooth_noise(rng, size, int(rng.integers(3, 9)), 3) * rng.uniform(0.4, 0.9)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    gx, gy = rng.uniform(-40, 40, 2)
    base += (gx * ramp[None, :] + gy * ramp[:, None])[..., None]
    return base + rng.normal(0, 10, (size, size, 3)).astype(np.float32)


def _texture(rng: np.random.Generator, size: int, colour: np.ndarray) -> np.ndarray:
    """A random colour with flat, striped, noisy or blotchy texture (never a class cue)."""
    kind = rng.integers(4)
    tex = np.zeros((size, size, 1), np.float32)
    if kind == 1:  # stripes
        yy, xx = np.mgrid[:size, :size].astype(np.float32)
        t = rng.uniform(0, np.pi)
        tex = 35 * np.sin((xx * np.cos(t) + yy * np.sin(t)) * rng.uniform(0.4, 1.2))[..., None]
    elif kind == 2:
        tex = rng.normal(0, 25, (size, size, 1)).astype(np.float32)
    elif kind == 3:
        tex = _smooth_noise(rng, size, int(rng.integers(4, 12)), 1) * 0.4 - 50
    return colour[None, None, :] + tex


def _drop_occluded(objects: list[SceneObject], cfg: ShapesConfig, size: int) -> np.ndarray:
    """Remove mostly hidden objects (in place); return the instance map of the rest."""
    while True:
        instance_map = np.full((size, size), -1, np.int64)
        for k, obj in enumerate(objects):
            instance_map[obj.full_mask] = k
        visible = np.bincount(instance_map.ravel() + 1, minlength=len(objects) + 1)[1:]
        full = np.array([o.full_mask.sum() for o in objects])
        ok = (visible >= cfg.min_visible_frac * full) & (visible >= cfg.min_visible_area)
        if ok.all():
            return instance_map
        # drop the worst one only: removing it can only make the others more visible
        objects.pop(int(np.argmin(np.where(ok, np.inf, visible / np.maximum(full, 1)))))


def paste_shifted(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray, shift) -> None:
    """Set ``mask`` at pixels ``(ys + dy, xs + dx)`` for ``shift = (dx, dy)``; a pixel moved off
    the image is dropped (clipping it would pile it onto the image's edge)."""
    ys, xs = ys + shift[1], xs + shift[0]
    inside = (ys >= 0) & (ys < mask.shape[0]) & (xs >= 0) & (xs < mask.shape[1])
    mask[ys[inside], xs[inside]] = True


def render_scene(cfg: ShapesConfig, rng: np.random.Generator) -> Scene:
    """Sample and paint one image; deterministic in ``rng``."""
    size = cfg.image_size
    image = _background(rng, size)
    objects: list[SceneObject] = []
    if rng.uniform() < cfg.crowd_prob:  # a crowd: a cluster of tiny objects of one class
        category = SHAPE_NAMES[int(rng.integers(len(SHAPE_NAMES) - 1))]
        centre, spread = rng.uniform(0.3, 0.7, 2) * size, 0.12 * size
        members = [_place(category, rng.uniform(5, 9), rng, size) for _ in range(int(rng.integers(5, 11)))]
        union = np.zeros((size, size), bool)
        for m in members:  # re-centre each member around the cluster centre
            ys, xs = np.nonzero(m.full_mask)
            if ys.size == 0:  # a member too small to cover any pixel centre
                continue
            shift = np.round(centre + rng.normal(0, spread, 2) - [xs.mean(), ys.mean()]).astype(int)
            paste_shifted(union, ys, xs, shift)
        objects.append(SceneObject(category, [], [], union, iscrowd=1))
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    sizes = np.exp(rng.uniform(np.log(cfg.min_size_frac), np.log(cfg.max_size_frac), n)) * size
    sizes = np.where(rng.uniform(size=n) < cfg.tiny_prob, rng.uniform(*cfg.tiny_size, n), sizes)
    categories = rng.integers(len(SHAPE_NAMES), size=n)
    for k in np.argsort(-sizes, kind="stable"):  # large first: small ones sit on top
        category = SHAPE_NAMES[int(categories[k])]
        objects.append(_place(category, max(sizes[k], PERSON_MIN_SIDE) if category == PERSON else sizes[k], rng, size))
    instance_map = _drop_occluded(objects, cfg, size)
    for k, obj in enumerate(objects):
        region = instance_map == k
        bg_colour = image[region].mean(0)
        colour = rng.uniform(0, 255, 3)
        for _ in range(10):  # contrast with the background, so objects are findable
            if np.linalg.norm(colour - bg_colour) > 80:
                break
            colour = rng.uniform(0, 255, 3)
        image[region] = _texture(rng, size, colour.astype(np.float32))[region]
    image += rng.normal(0, 4, image.shape).astype(np.float32)
    return Scene(np.clip(np.round(image), 0, 255).astype(np.uint8), instance_map, objects)


# ---------------------------------------------------------------- COCO json
def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (used for crowds): run lengths in column-major order, zeros first."""
    flat = mask.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"counts": runs, "size": list(mask.shape)}


def scene_annotations(scene: Scene, image_id: int, first_ann_id: int,
                      cat_ids: dict[str, int]) -> list[dict]:
    """COCO annotations of a scene's visible objects (polygon if unoccluded, else RLE)."""
    anns = []
    for k, obj in enumerate(scene.objects):
        visible = scene.instance_map == k
        rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        ann = {"id": first_ann_id + len(anns), "image_id": image_id, "iscrowd": obj.iscrowd,
               "category_id": cat_ids[obj.category], "area": float(mask_utils.area(rle)),
               "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)]}
        if obj.iscrowd:
            ann["segmentation"] = _uncompressed_rle(visible)
        elif obj.holes or not np.array_equal(visible, obj.full_mask):
            ann["segmentation"] = {"counts": rle["counts"].decode("ascii"), "size": rle["size"]}
        else:
            ann["segmentation"] = obj.polygons
        if obj.keypoints is not None:
            kps = []
            for x, y in obj.keypoints:  # COCO stores pixel indices: continuous x - 0.5
                h, w = scene.instance_map.shape
                # v from the pixel of the point as stored (rounded), the one a reader gets back
                sx, sy = round(float(x) - 0.5, 2), round(float(y) - 0.5, 2)
                ix, iy = min(max(int(np.floor(sx + 0.5)), 0), w - 1), min(max(int(np.floor(sy + 0.5)), 0), h - 1)
                # 1: labelled, hidden by a later object; 2: not hidden (COCO's "visible"), which
                # includes a limb's end just past its drawn pixels
                v = 1 if scene.instance_map[iy, ix] > k else 2
                kps += [sx, sy, v]
            ann["keypoints"], ann["num_keypoints"] = kps, len(KEYPOINT_NAMES)
        anns.append(ann)
    return anns


def categories() -> list[dict]:
    cats = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_NAMES)]
    cats[-1].update(supercategory="person", keypoints=list(KEYPOINT_NAMES), skeleton=SKELETON)
    return cats


def _render_in_processes(jobs: list, workers: int) -> list:
    """``_write_image`` of every job, in ``workers`` spawned processes, in order.

    Spawned processes import the caller's script again: a script that calls :func:`generate`
    outside ``if __name__ == "__main__":`` would start it again in each. There a
    ``multiprocessing.Pool`` replaced its failing workers forever; an executor reports them."""
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            return list(pool.map(_write_image, jobs, chunksize=32))
    except BrokenProcessPool as err:
        raise RuntimeError("generate(workers > 1): a render process died before its work was done. "
                           "Called from a script, put the call under `if __name__ == \"__main__\":` "
                           "(the processes are spawned and import the script again), or pass workers=1") from err


def generate(out_dir: str, n_train: int | None = None, n_val: int | None = None,
             size: int | None = None, seed: int = 0, preset: str = "default",
             config: ShapesConfig | None = None, workers: int = 1) -> dict[str, str]:
    """Write ``out_dir/{train,val}/*.png`` and ``out_dir/annotations/instances_{split}.json``.

    Arguments left as None come from the preset (or ``config``); ``workers`` > 1 renders in
    parallel processes with identical output (spawned: a script calling this with workers > 1
    needs ``if __name__ == "__main__":`` around the call). Returns split -> json path. Each file appears
    whole or not at all, ``instances_val.json`` last: callers test it to skip a finished set.
    A set already in ``out_dir`` loses both jsons before the first image is replaced.
    """
    if config is None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        config = PRESETS[preset]()
    cfg = replace(config, **{k: v for k, v in (("image_size", size), ("n_train", n_train),
                                                 ("n_val", n_val)) if v is not None})
    if cfg.image_size < 32:
        raise ValueError(f"size must be >= 32 px, got {cfg.image_size}")
    for name, value in (("n_train", cfg.n_train), ("n_val", cfg.n_val), ("seed", seed)):
        if value < 0:  # a negative count would write an empty split; numpy refuses a negative seed unnamed
            raise ValueError(f"{name} must be >= 0, got {value}")
    cat_ids = {c["name"]: c["id"] for c in categories()}
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    _unmark_finished(out_dir)
    paths = {}
    for split, count in (("train", cfg.n_train), ("val", cfg.n_val)):
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        jobs = [(cfg, seed, split, index, out_dir, cat_ids) for index in range(count)]
        if workers > 1 and count > 1:  # images are independent streams: order-free, same bytes
            per_image = _render_in_processes(jobs, workers)
        else:
            per_image = [_write_image(job) for job in jobs]
        images, anns = [], []
        for image, image_anns in per_image:
            for ann in image_anns:
                ann["id"] = len(anns) + 1
                anns.append(ann)
            images.append(image)
        data = {"info": {"description": f"mrcnn_edu synthetic shapes, seed {seed}, split {split}",
                         "generator_version": GENERATOR_VERSION, "config": asdict(cfg)},
                "licenses": [], "categories": categories(), "images": images, "annotations": anns}
        paths[split] = os.path.join(out_dir, "annotations", f"instances_{split}.json")
        _write_atomically(paths[split], json.dumps(data, sort_keys=True, separators=(",", ":")).encode())
    return paths


def _unmark_finished(out_dir: str) -> None:
    """Delete ``out_dir``'s ``instances_val.json`` (the mark of a finished set), then
    ``instances_train.json``: a run killed while it replaces a set's PNGs must not leave the old
    annotations over new pixels, looking finished."""
    for split in ("val", "train"):  # val first: a kill between the two leaves no finished set
        with contextlib.suppress(FileNotFoundError):  # none there, or a twin process took it
            os.remove(os.path.join(out_dir, "annotations", f"instances_{split}.json"))


def _write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary sibling (named per process), then rename it onto ``path``.

    A reader sees the old file or the new one, never part of one. No ``fsync``: thousands of
    small files would each wait for the disk. So a kill is safe; after a power cut, delete the
    folder to have the set written again. (``checkpoint._atomic_write`` is the durable twin;
    not called here because that module imports torch, which the render workers never load.)
    """
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_image(job) -> tuple[dict, list[dict]]:
    cfg, seed, split, index, out_dir, cat_ids = job
    scene = render_scene(cfg, scene_rng(seed, split, index))
    file_name = f"{index:06d}.png"
    # fixed PNG parameters and no metadata: the same pixels give the same bytes
    png = io.BytesIO()
    Image.fromarray(scene.image).save(png, format="PNG", compress_level=1)
    _write_atomically(os.path.join(out_dir, split, file_name), png.getvalue())
    image = {"id": index + 1, "file_name": file_name,
             "height": cfg.image_size, "width": cfg.image_size}
    return image, scene_annotations(scene, index + 1, 0, cat_ids)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, default=None, help="number of train images")
    parser.add_argument("--val", type=int, default=None, help="number of val images")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                        help="parallel processes (output does not depend on it)")
    args = parser.parse_args(argv)
    paths = generate(args.out, args.train, args.val, args.size, args.seed, args.preset,
                     workers=args.workers)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
