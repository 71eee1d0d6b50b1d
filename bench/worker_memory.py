"""How much of COCO's annotations does each DataLoader worker copy: items reading the json's Python objects, or ``COCODataset``'s serialised records?

On Linux the training's loader workers are forked (``engine._build_loader``; the loader forks
them when the training calls ``iter()`` on it), so they start out sharing every page of the main
process, annotations included: real COCO's ``instances_train2017.json`` (~450 MB, ~860k
annotations) parses into several GB of Python dicts, lists and floats. A shared page is copied
into a process the first time that process writes to it, and CPython writes to objects it only
reads: their reference counts (each ``ann["bbox"]`` a worker looks up), and, in a full
``gc.collect()``, the GC header of every tracked container (dict, list) it traverses.
``gc.freeze()`` before the fork (the Python docs' advice) moves them to a permanent generation
no collection traverses; reference counts still change.

This makes a COCO-format json with the annotation make-up of COCO (about 50 polygon coordinates
per annotation) but few, tiny (32 x 32) images, sized by ``--objects-mb``; builds the training
set as ``python -m mrcnn_edu train`` does, in one of two versions:

    objects  ``ObjectsDataset`` below: each item reads the COCO object's image dict and the
             image's annotation dicts and lists (bbox, segmentation, ...), as ``COCODataset``
             did before 2026-12-02 (its code, kept here as the reference)
    buffer   ``COCODataset``: each item unpickles its image's record from one numpy byte buffer

and iterates a DataLoader built like ``engine._build_loader``'s (``InfiniteBatchSampler``,
``SeededSamples``, fork), each worker running a full ``gc.collect()`` every ``--gc-every`` items
(Python's own full collections are rarer in a worker, but a long training has many), the main
process one every ``--main-gc-every`` batches. The fork is wrapped as ``engine.train`` wraps it
(``gc.collect(); gc.freeze()`` before, ``gc.unfreeze()`` after), or not at all in the ``-plain``
runs. It reads each worker's private memory (USS: Private_Clean + Private_Dirty of
``/proc/PID/smaps_rollup``), the main process's RSS and USS, and everyone's PSS; each run in a
fresh process:

    nice -n 10 env OMP_NUM_THREADS=1 python bench/worker_memory.py --out /tmp/wm_bench
    nice -n 10 env OMP_NUM_THREADS=1 python bench/worker_memory.py --out /tmp/wm_bench \
        --runs objects,buffer --batches 4000 --gc-every 500 --main-gc-every 1000

The json and images are written once under ``--out`` and reused while their size matches.

Measured 2026-12-02 on a 2-core CPU VM (Python 3.11.7, torch 2.14.1, a training running
alongside), the first command above (300 items per worker; 3.5 min):

    227555 annotations on 2000 images: 626 MB of parsed objects (1.10 M gc-tracked); 2 workers x 300 items
    run                       worker USS MB  main RSS  main USS  PSS all  main full gc
                     after 1st batch -> end        MB        MB       MB       s (max)
    objects                19/18 -> 238/236      1152       162     1495         2.106
    buffer                   14/14 -> 15/15      1268       108     1225         1.675
    objects-plain          20/18 -> 275/273      1152       162     1552         0.891
    buffer-plain             14/14 -> 108/108      1268       108     1336         0.796
    per-worker USS, mean (gc.freeze() around the fork, as engine.train): 237 MB reading the objects, 15 MB reading the buffer (114 MB): x15.7
    per-worker USS, mean (no freeze): 274 MB reading the objects, 108 MB reading the buffer (114 MB): x2.5

and the second, a longer training (4000 items per worker, each image loaded about twice by
each; 3.5 min):

    objects                20/18 -> 482/482      1152       519     2005         0.829
    buffer                   14/14 -> 15/15      1268       108     1244         0.836
    per-worker USS, mean (gc.freeze() around the fork, as engine.train): 482 MB reading the objects, 15 MB reading the buffer (114 MB): x31.6

Reading the objects, each worker ends up with a private copy of most of the annotations, and
reference counts copy it, not the collector: an earlier version of this bench, with no forced
collection anywhere, copied as much as with ``gc.freeze()`` (234 MB per worker after 300 items);
what freezing saves there is ~40 MB per worker whatever the annotations' size (pages of torch's
and the interpreter's own objects). One image's annotations lie all over the json, so a few
hundred items' reads touch nearly every page; once both workers have copied a page, the main
process's original is private to it too (main USS 162 -> 519 MB): the annotations are then held
about three times over. Reading the serialised records, a worker copies nothing of them, however
long it runs: the buffer (114 MB, 18% of the objects) is only read, and its pages carry no
reference counts. The two fixes need each other: without ``gc.freeze()`` a worker's full
collection still traverses the json's objects, which stay in the main process for evaluation
(``buffer-plain``: 108 MB per worker after 300 items).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mrcnn_edu.data.coco import COCO_KEYPOINT_OFFSET, COCODataset, decode_mask, read_rgb  # noqa: E402

# dataset: "objects" reads the json's Python objects per item (ObjectsDataset, the code before
# 2026-12-02), "buffer" its serialised records (COCODataset); gc: as engine.train forks the
# workers (gc.collect(); gc.freeze(); fork; gc.unfreeze()), or "-plain": no freeze
RUNS = ("objects", "buffer", "objects-plain", "buffer-plain")
IMAGE_SIDE = 32  # px; COCODataset checks each file against the json's height / width
COORDS_PER_ANNOTATION = 50  # COCO: ~520 json bytes per annotation, most of them polygon numbers


def smaps_rollup(pid: int) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` in bytes: Rss, Pss, Private_Clean, Private_Dirty, ..."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return fields


def memory(pid: int) -> dict[str, int]:
    """RSS, PSS and USS (the pages no other process maps) of ``pid``, in bytes."""
    m = smaps_rollup(pid)
    return {"rss": m["Rss"], "pss": m["Pss"], "uss": m["Private_Clean"] + m["Private_Dirty"]}


def annotation(ann_id: int, image_id: int, rng: random.Random) -> dict:
    """One COCO-like instance: a polygon of ``COORDS_PER_ANNOTATION`` coordinates (2 decimals,
    as COCO's) inside the image, its bbox and area."""
    cx, cy, r = rng.uniform(8, 24), rng.uniform(8, 24), rng.uniform(3, 7)
    polygon = []
    for k in range(COORDS_PER_ANNOTATION // 2):
        angle = 6.2832 * k / (COORDS_PER_ANNOTATION // 2)
        rho = r * rng.uniform(0.7, 1.0)
        polygon += [round(cx + rho * math.cos(angle), 2), round(cy + rho * math.sin(angle), 2)]
    xs, ys = polygon[0::2], polygon[1::2]
    bbox = [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]
    return {"segmentation": [polygon], "area": round(bbox[2] * bbox[3] * 0.7, 4), "iscrowd": 0,
            "image_id": image_id, "bbox": bbox, "category_id": 1 + ann_id % 80, "id": ann_id}


def deep_size(obj) -> int:
    """Bytes of ``obj`` and everything in it, as json parses it (each float its own object)."""
    if isinstance(obj, dict):
        return sys.getsizeof(obj) + sum(deep_size(k) + deep_size(v) for k, v in obj.items())
    if isinstance(obj, list):
        return sys.getsizeof(obj) + sum(deep_size(v) for v in obj)
    if isinstance(obj, int) and -5 <= obj <= 256:
        return 0  # small ints are shared
    return sys.getsizeof(obj) if not isinstance(obj, str) else 0  # keys are interned


def make_data(out: Path, objects_mb: float, images: int, seed: int = 0) -> tuple[Path, Path, int]:
    """(image folder, json, annotation count): ``images`` 32 x 32 PNGs and as many annotations
    as make about ``objects_mb`` MB of parsed Python objects; reused if already there."""
    rng = random.Random(seed)
    per_annotation = deep_size(annotation(10**6, 10**6, rng))
    count = int(objects_mb * 2**20 / per_annotation)
    image_dir, ann_file, meta_file = out / "images", out / "annotations.json", out / "meta.json"
    meta = {"annotations": count, "images": images, "seed": seed, "coords": COORDS_PER_ANNOTATION}
    if meta_file.exists() and json.loads(meta_file.read_text()) == meta and ann_file.exists():
        return image_dir, ann_file, count
    import io

    import numpy as np
    from PIL import Image

    image_dir.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    Image.fromarray(np.full((IMAGE_SIDE, IMAGE_SIDE, 3), 128, np.uint8)).save(png, format="PNG")
    entries = []
    for i in range(1, images + 1):
        name = f"{i:06d}.png"
        (image_dir / name).write_bytes(png.getvalue())
        entries.append({"id": i, "file_name": name, "height": IMAGE_SIDE, "width": IMAGE_SIDE})
    with open(ann_file, "w", encoding="utf-8") as f:  # streamed: the whole list would double the peak
        f.write('{"images": ' + json.dumps(entries) + ', "categories": '
                + json.dumps([{"id": c, "name": f"class{c}"} for c in range(1, 81)])
                + ', "annotations": [')
        for ann_id in range(1, count + 1):
            f.write(("," if ann_id > 1 else "") + json.dumps(annotation(ann_id, 1 + ann_id % images, rng)))
        f.write("]}")
    meta_file.write_text(json.dumps(meta))
    return image_dir, ann_file, count


class ObjectsDataset(COCODataset):
    """``COCODataset`` reading items as it did before its records were serialised: each item
    reads the COCO object's own image dict, the image's annotation dicts (kept per image id, as
    ``_anns`` was) and their bbox, segmentation, ... lists, and the list of ids' int objects --
    the reference counts a fork worker writes. The code below is that version's, verbatim."""

    def _serialise_records(self, anns: dict[int, list[dict]], cleaned: dict[int, object]) -> None:
        self._anns, self._segmentation = anns, cleaned  # no buffer

    def load_image(self, image_id: int) -> torch.Tensor:
        info = self.coco.imgs[image_id]
        path = os.path.join(self.image_dir, info["file_name"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file {path} (image id {image_id}) not found")
        try:
            pixels = read_rgb(path)
        except (OSError, ValueError) as err:  # not an image, empty, truncated; a mode we cannot read
            raise ValueError(f"image file {path} (image id {image_id}) cannot be read: {err}") from err
        if pixels.shape[:2] != (info["height"], info["width"]):
            raise ValueError(f"image file {path} (image id {image_id}) is {pixels.shape[:2]}, "
                             f"but {self.ann_file} says {(info['height'], info['width'])}")
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # (3, H, W)

    def load_target(self, image_id: int) -> dict:
        info = self.coco.imgs[image_id]
        h, w = info["height"], info["width"]
        anns = [a for a in self._anns.get(image_id, [])
                if not (self.drop_crowd and a.get("iscrowd", 0))]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns],
                                   dtype=torch.int64),
            "image_id": int(image_id),
            "iscrowd": torch.tensor([a.get("iscrowd", 0) for a in anns], dtype=torch.int64),
            "area": torch.tensor([a.get("area", 0.0) for a in anns], dtype=torch.float32),
            "orig_size": (h, w),
        }
        if self.with_masks:
            masks = [decode_mask(self._segmentation.get(a["id"], a["segmentation"]), h, w)
                     for a in anns]
            target["masks"] = (torch.from_numpy(np.stack(masks)) if masks
                               else torch.zeros((0, h, w), dtype=torch.uint8))  # (N, H, W)
        if self.with_keypoints:
            n_kp = len(self.keypoint_names)
            kps = torch.zeros((len(anns), n_kp, 3), dtype=torch.float32)
            for i, a in enumerate(anns):
                if a.get("keypoints") is not None:
                    kps[i] = torch.tensor(a["keypoints"], dtype=torch.float32).reshape(n_kp, 3)
            labelled = kps[..., 2] > 0
            kps[..., :2] += COCO_KEYPOINT_OFFSET * labelled[..., None]  # index -> pixel centre
            kps[~labelled] = 0.0
            target["keypoints"] = kps
        return target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image_id = self.ids[index]
        image, target = self.load_image(image_id), self.load_target(image_id)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


class CollectEvery:
    """Wraps a dataset: every ``k``-th item a process loads ends with a full ``gc.collect()``
    (each worker counts its own: the counter is copied at the fork)."""

    def __init__(self, dataset, k: int) -> None:
        self.dataset, self.k, self.loaded = dataset, k, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        sample = self.dataset[index]
        self.loaded += 1
        if self.k and self.loaded % self.k == 0:
            gc.collect()
        return sample


def child(run: str, args: argparse.Namespace) -> dict:
    """One run in this (fresh) process; returns its figures."""
    from torch.utils.data import DataLoader

    from mrcnn_edu.data.coco import collate_fn
    from mrcnn_edu.data.transforms import RandomHorizontalFlip
    from mrcnn_edu.distributed import InfiniteBatchSampler, SeededSamples

    torch.set_num_threads(1)
    me = os.getpid()
    before = memory(me)["rss"]
    tic = time.perf_counter()
    dataset_class = ObjectsDataset if run.startswith("objects") else COCODataset
    dataset = dataset_class(str(args.image_dir), str(args.ann_file), train=True)  # as __main__._datasets
    dataset.transforms = RandomHorizontalFlip(0.5, dataset.keypoint_flip_map)
    load_s = time.perf_counter() - tic
    gc.collect()
    objects = memory(me)["rss"] - before
    tracked = len(gc.get_objects())
    tic = time.perf_counter()
    gc.collect()
    full_gc_s = time.perf_counter() - tic  # a full collection in the main process, unfrozen

    freeze = not run.endswith("-plain")
    if freeze:  # as engine.train does
        gc.collect()
        gc.freeze()
    # as engine._build_loader builds it (no pinning: no GPU here)
    sampler = InfiniteBatchSampler(len(dataset), args.batch, seed=0)
    loader = DataLoader(SeededSamples(CollectEvery(dataset, args.gc_every)),
                        batch_sampler=sampler, collate_fn=collate_fn, num_workers=args.workers,
                        multiprocessing_context="fork", generator=torch.Generator().manual_seed(0))
    batches = iter(loader)  # the workers fork here
    if freeze:
        gc.unfreeze()
    workers = [w.pid for w in batches._workers]
    next(batches)
    start = [memory(pid)["uss"] for pid in workers]
    main_gc_s, tic = [], time.perf_counter()
    for i in range(1, args.batches):
        next(batches)
        if args.main_gc_every and (i + 1) % args.main_gc_every == 0:
            t = time.perf_counter()
            gc.collect()
            main_gc_s.append(time.perf_counter() - t)
    loop_s = time.perf_counter() - tic
    ends = [memory(pid) for pid in workers]
    main = memory(me)
    del batches  # shuts the workers down
    return {"run": run, "objects_mb": objects / 2**20, "tracked_objects": tracked,
            "annotations": len(dataset.coco.anns), "images": len(dataset), "load_s": load_s,
            "buffer_mb": dataset._records.nbytes / 2**20 if hasattr(dataset, "_records") else 0.0,
            "full_gc_s": full_gc_s, "main_gc_s": max(main_gc_s, default=float("nan")),
            "loop_s": loop_s, "items_per_worker": args.batch * args.batches / args.workers,
            "worker_uss_start_mb": [u / 2**20 for u in start],
            "worker_uss_mb": [m["uss"] / 2**20 for m in ends],
            "main_rss_mb": main["rss"] / 2**20, "main_uss_mb": main["uss"] / 2**20,
            "total_pss_mb": (main["pss"] + sum(m["pss"] for m in ends)) / 2**20}


def table(results: dict[str, dict]) -> str:
    first = next(iter(results.values()))
    lines = [f"{first['annotations']} annotations on {first['images']} images: "
             f"{first['objects_mb']:.0f} MB of parsed objects ({first['tracked_objects'] / 1e6:.2f} M "
             f"gc-tracked); {len(first['worker_uss_mb'])} workers x {first['items_per_worker']:.0f} items",
             f"{'run':<16} {'worker USS MB':>22} {'main RSS':>9} {'main USS':>9} {'PSS all':>8} "
             f"{'main full gc':>13}",
             f"{'':<16} {'after 1st batch -> end':>22} {'MB':>9} {'MB':>9} {'MB':>8} {'s (max)':>13}"]
    for run, r in results.items():
        uss = "/".join(f"{u:.0f}" for u in r["worker_uss_start_mb"]) + " -> " + "/".join(
            f"{u:.0f}" for u in r["worker_uss_mb"])
        lines.append(f"{run:<16} {uss:>22} {r['main_rss_mb']:>9.0f} {r['main_uss_mb']:>9.0f} "
                     f"{r['total_pss_mb']:>8.0f} {r['main_gc_s']:>13.3f}")
    def mean_uss(run: str) -> float:
        return sum(results[run]["worker_uss_mb"]) / len(results[run]["worker_uss_mb"])

    for suffix, how in (("", "gc.freeze() around the fork, as engine.train"), ("-plain", "no freeze")):
        if "objects" + suffix in results and "buffer" + suffix in results:
            objects, buffer = mean_uss("objects" + suffix), mean_uss("buffer" + suffix)
            lines.append(f"per-worker USS, mean ({how}): {objects:.0f} MB reading the objects, "
                         f"{buffer:.0f} MB reading the buffer ({results['buffer' + suffix]['buffer_mb']:.0f} MB): "
                         f"x{objects / buffer:.1f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/worker_memory", help="folder for the json, images, results")
    parser.add_argument("--objects-mb", type=float, default=500, help="parsed annotations, MB (about)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="images per batch")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--gc-every", type=int, default=50, help="a worker's full gc.collect() every k items")
    parser.add_argument("--main-gc-every", type=int, default=100, help="the main process's, every k batches")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--child", choices=RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.image_dir, args.ann_file, _ = make_data(out, args.objects_mb, args.images)
    if args.child:
        result = child(args.child, args)
        print("RESULT " + json.dumps(result), flush=True)
        return result

    results = {}
    for run in args.runs.split(","):
        if run not in RUNS:
            parser.error(f"--runs: {run!r} is not one of {', '.join(RUNS)}")
        command = [sys.executable, __file__, "--child", run, *(sys.argv[1:] if argv is None else argv)]
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.exit(f"run {run} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
        results[run] = json.loads(lines[-1][len("RESULT "):])
        print(f"{run}: {results[run]['loop_s']:.0f} s loop, dataset built in {results[run]['load_s']:.0f} s",
              flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return results


if __name__ == "__main__":
    main()
