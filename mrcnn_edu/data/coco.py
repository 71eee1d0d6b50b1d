"""COCO detection / instance segmentation / keypoint data, read through pycocotools.

The paper trains and tests on COCO (§4: "trainval35k" for training, "minival" for ablations;
§5 keypoints: "trained on all COCO trainval35k images that contain annotated keypoints").
``COCODataset`` reads any COCO json + image folder -- real COCO 2017
(``instances_train2017.json``, ``person_keypoints_val2017.json``) or ``shapes.py``'s set --
and returns what the model consumes:

    image  (3, H, W) float32 in [0, 1]
    target {"boxes" (N, 4) float32 xyxy px, "labels" (N,) int64 in 1..K,
            "masks" (N, H, W) uint8, "keypoints" (N, Kp, 3) float32 (x, y, v),
            "image_id" int, "iscrowd" (N,) int64, "area" (N,) float32, "orig_size" (h, w)}

Conventions (project-wide): pixel ``i`` covers ``[i, i+1)``; COCO boxes ``[x, y, w, h]`` are
already continuous edges, so xyxy = ``[x, y, x + w, y + h]``. Labels: dataset category ids,
sorted, map to contiguous 1..K (0 is background); ``label_to_cat_id`` maps back for results.

Keypoints: COCO stores keypoints as pixel *indices* (mostly integers; ``[0, W-1]``). We read
index ``i`` as the centre of pixel ``i``, i.e. continuous ``x = i + 0.5``
(``COCO_KEYPOINT_OFFSET``, as detectron2 does; torchvision uses them as-is). With this, a
horizontal flip is exactly ``x' = W - x``. ``evaluation.py`` subtracts the offset again when it
writes results. Unlabelled keypoints (v = 0) are (0, 0, 0). Instances of categories without
keypoints get all-zero keypoints.

Bad input: malformed json (not UTF-8, or an id, file name or image size of the wrong type), a
missing or unreadable image or a mismatched image size raise a message naming the file and
image id; bad annotations (unknown image or category id, zero-area box, degenerate polygon,
malformed RLE, wrong keypoint count) are skipped, counted in ``skipped`` and summarised in one
warning, so they never stop a long training run. In training mode (``train=True``) images
without a usable annotation are skipped and counted too, and a json left with no image to train
on is an error naming the first reasons. Masks are decoded per item, lazily.

Memory: the loader's workers are forked and share the main process's pages until they write to
one, and CPython writes to every object it reads (its reference count). Items that read the
json's per-image dicts and lists would so copy nearly all of them into every worker
(``bench/worker_memory.py``: ~520 MB of 626 MB per worker after 4,000 items; several GB per
worker at COCO scale, times workers, times GPUs). So, as detectron2's
``DatasetFromList(serialize=True)``, ``__init__`` ends by pickling each image's record (file name,
size, its usable annotations with their cleaned segmentations) into one numpy byte buffer, found by
a sorted numpy array of image ids; an item unpickles its own record and reads nothing else that is
big. ``self.coco`` stays, for the main process (evaluation, aspect-ratio groups, categories), and
is left out of the pickle that spawned workers receive (``__getstate__``).
"""

from __future__ import annotations

import bisect
import contextlib
import io
import json
import math
import os
import pickle
import re
import warnings
from collections import Counter, defaultdict
from typing import Callable

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image, ImageOps
from pycocotools.coco import COCO
from torch.utils.data import Dataset

COCO_KEYPOINT_OFFSET = 0.5  # continuous x = COCO pixel index + 0.5


def load_coco(ann_file: str) -> COCO:
    """A pycocotools COCO object, with a clear error for a missing or malformed file."""
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    try:
        # json is UTF-8 (RFC 8259); the platform's default (cp1252 on Windows) would misread names
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"malformed json in {ann_file}: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{ann_file} is not a COCO json (needs an 'images' list)")
    data.setdefault("annotations", [])
    data.setdefault("categories", [])
    for key in ("annotations", "categories"):
        if not isinstance(data[key], list):
            raise ValueError(f"{ann_file}: '{key}' must be a list")
    for img in data["images"]:
        if not isinstance(img, dict) or not {"id", "file_name", "height", "width"} <= img.keys():
            raise ValueError(f"{ann_file}: image entry {img!r:.120} lacks id/file_name/height/width")
    for key, what, needs in (("annotations", "annotation", {"id", "image_id", "category_id"}),
                             ("categories", "category", {"id", "name"})):
        for entry in data[key]:
            if not isinstance(entry, dict) or not needs <= entry.keys():
                raise ValueError(f"{ann_file}: {what} entry {entry!r:.120} lacks {'/'.join(sorted(needs))}")
    _check_field_types(data, ann_file)
    # pycocotools indexes by id, one entry per id: a repeated id silently hands one entry's
    # segmentation to another's image (and mis-scores COCOeval)
    for key in ("images", "annotations", "categories"):
        repeated = sorted(i for i, n in Counter(entry["id"] for entry in data[key]).items() if n > 1)
        if repeated:
            raise ValueError(f"{ann_file}: {key} with repeated ids {repeated[:10]}")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _is_int(value) -> bool:
    """A json integer (``true`` is an int to Python, not to COCO)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_field_types(data: dict, ann_file: str) -> None:
    """ValueError naming the file and the entry's id for a field of the wrong type that
    pycocotools or the loader would otherwise trip over later with a bare TypeError: ids are
    integers (``[1]`` cannot index, ``"1"`` matches no image), ``file_name`` a string, the
    image's ``height`` / ``width`` positive integers (masks are decoded at that size)."""
    for img in data["images"]:
        if not _is_int(img["id"]):
            raise ValueError(f"{ann_file}: image id {img['id']!r} is not an integer")
        if not -2**63 <= img["id"] < 2**63:  # COCODataset finds records by an int64 array of ids
            raise ValueError(f"{ann_file}: image id {img['id']} does not fit in 64 bits")
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise ValueError(f"{ann_file}: image id {img['id']}: file_name {img['file_name']!r} "
                             "is not a file name")
        for side in ("height", "width"):
            if not (_is_int(img[side]) and img[side] > 0):
                raise ValueError(f"{ann_file}: image id {img['id']}: {side} {img[side]!r} "
                                 "is not a positive integer")
    for ann in data["annotations"]:
        for key in ("id", "image_id", "category_id"):
            if not _is_int(ann[key]):
                raise ValueError(f"{ann_file}: annotation id {ann['id']!r} (image id {ann['image_id']!r}): "
                                 f"{key} {ann[key]!r} is not an integer")
    for cat in data["categories"]:
        if not _is_int(cat["id"]):
            raise ValueError(f"{ann_file}: category id {cat['id']!r} ({cat['name']!r}) is not an integer")


_SIDES = {"left": "right", "right": "left", "l": "r", "r": "l"}


def _side_key(name: str) -> tuple[str | None, tuple[str, ...]]:
    """``"Left_Eye"`` -> ``("left", ("", "eye"))``: the side word of a keypoint name (a whole
    word between ``_``, ``-``, ``.``, spaces or a case change: ``leftEye``, OpenPose's
    ``RShoulder``; any case) and the name's words with it blanked; ``(None, words)`` if no word
    names a side."""
    words = tuple(w.lower() for w in re.split(r"[_\-.\s]+|(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", name)
                  if w)
    sides = [i for i, w in enumerate(words) if w in _SIDES]
    if len(sides) != 1:
        return None, words
    return words[sides[0]], words[:sides[0]] + ("",) + words[sides[0] + 1:]


def keypoint_flip_map(names: list[str]) -> list[int]:
    """The permutation a horizontal flip applies to keypoint types: each left one swaps with its
    right partner, the rest stay (COCO's ``left_eye`` / ``right_eye``; also ``eye_left``,
    ``L_Eye``, ``leftEye``, ``r-ear``).

    A name with a side and no partner raises ValueError: the flip would teach a mirrored left
    eye as a left eye (pass ``COCODataset(keypoint_flip_map=...)`` for a naming it cannot read).
    So does a name that becomes another of the names when "left" and "right" swap inside a word
    (``lefteye`` / ``righteye``): sides, but not words this reading can tell from ``upright`` or
    ``cleft``, which name none.
    """
    keys = [_side_key(name) for name in names]
    lowered = {name.lower() for name in names}
    perm = list(range(len(names)))
    for i, (side, rest) in enumerate(keys):
        if side is None:
            mirrored = re.sub("left|right", lambda m: _SIDES[m.group(0)], names[i].lower())
            if mirrored != names[i].lower() and mirrored in lowered:
                raise ValueError(f"keypoint {names[i]!r} seems to name a side, but not as a word of its own "
                                 f"(its mirror {mirrored!r} is a keypoint too): pass keypoint_flip_map explicitly")
            continue
        partners = [j for j, (other, other_rest) in enumerate(keys)
                    if other == _SIDES[side] and other_rest == rest]
        if len(partners) != 1:
            raise ValueError(f"keypoint {names[i]!r} names a side ({side!r}) but has "
                             f"{'no' if not partners else 'more than one'} partner among {names}: "
                             "pass keypoint_flip_map explicitly")
        perm[i] = partners[0]
    return perm


_inferred_flip_map = keypoint_flip_map  # COCODataset's argument of the same name hides it there


def check_flip_map(flip_map, num_keypoints: int, what: str = "keypoint_flip_map") -> list[int]:
    """``flip_map`` (a permutation or (i, j) pairs, as ``transforms.hflip`` takes it) as a
    permutation of ``range(num_keypoints)`` of integers that undoes itself (flipping twice is no
    flip); else ValueError naming ``what``."""
    from mrcnn_edu.data.transforms import _flip_permutation

    try:
        perm = _flip_permutation(flip_map, num_keypoints)
    except (ValueError, IndexError, TypeError):
        perm = None
    if perm is None or not all(isinstance(i, int) and not isinstance(i, bool) for i in perm) \
            or any(perm[j] != i for i, j in enumerate(perm)):
        raise ValueError(f"{what} must be a permutation of 0..{num_keypoints - 1} that is its own inverse "
                         f"(left <-> right pairs, the rest fixed), got {list(flip_map)}")
    return perm


def _coordinate(value, bound: float) -> bool:
    """A polygon coordinate pycocotools can rasterise: a finite real number near the image (a NaN
    or a huge value makes it allocate without limit, and the process dies)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and -bound <= value <= bound)


def _keypoints_problem(kps, num_keypoints: int) -> str | None:
    """Why a COCO ``keypoints`` list is unusable -- not ``num_keypoints`` (x, y, v) triples of
    finite numbers with v in {0, 1, 2} -- or None."""
    if not isinstance(kps, list) or len(kps) != 3 * num_keypoints:
        count = len(kps) if isinstance(kps, list) else type(kps).__name__
        return f"{count} keypoint values, expected {3 * num_keypoints}"
    if not all(_coordinate(v, math.inf) for v in kps):
        return "a keypoint value is not a finite number"
    if any(v not in (0, 1, 2) for v in kps[2::3]):
        return f"keypoint visibilities {sorted(set(kps[2::3]))} (COCO's v is 0, 1 or 2)"
    return None


def rle_counts(counts: str) -> list[int]:
    """The run lengths of a compressed RLE string (pycocotools' LEB128-like code: 5 bits per
    character, offset by 48, a run after the second stored as a difference to the one two back)."""
    runs, position = [], 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                raise ValueError("compressed RLE ends inside a run")
            char = ord(counts[position]) - 48
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            position, shift = position + 1, shift + 5
            if not more and char & 0x10:
                value |= -1 << shift  # negative
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def clean_segmentation(segm, h: int, w: int) -> tuple[object | None, str | None]:
    """(segmentation with degenerate polygons removed, or None, and why)."""
    if isinstance(segm, list):
        bound = 2.0 * max(h, w)
        if any(isinstance(p, list) and not all(_coordinate(v, bound) for v in p) for p in segm):
            return None, "polygon coordinate not a finite number near the image"
        polys = [p for p in segm if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not polys:
            return None, "degenerate polygon (< 3 points)"
        return polys, None
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        size = segm["size"]
        if not (isinstance(size, (list, tuple)) and len(size) == 2
                and all(_coordinate(v, math.inf) for v in size)):  # e.g. 5: list(5) raised TypeError
            return None, f"RLE size {size!r} is not [height, width]"
        if list(size) != [h, w]:
            return None, f"RLE size {size} != image size {[h, w]}"
        counts = segm["counts"]
        try:  # pycocotools decodes a corrupt RLE into uninitialised memory: check the runs first
            runs = rle_counts(counts.decode() if isinstance(counts, bytes) else counts) if isinstance(
                counts, (str, bytes)) else counts
        except ValueError as err:
            return None, f"corrupt RLE ({err})"
        if not (isinstance(runs, list) and all(isinstance(r, int) and not isinstance(r, bool) and r >= 0
                                               for r in runs) and sum(runs) == h * w):
            return None, f"corrupt RLE (its runs must be counts >= 0 summing to {h} x {w} pixels)"
        return segm, None
    return None, "segmentation is neither polygons nor RLE"


def decode_mask(segm, h: int, w: int) -> np.ndarray:
    """(h, w) uint8 mask from cleaned polygons (their union), compressed or uncompressed RLE."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = segm
    return mask_utils.decode(rle)


# Pillow's modes for one 16-bit channel (a 16-bit greyscale PNG opens as one of them); its
# convert("RGB") clips these to 8 bits, so every pixel above 255 would read as white. "I" is
# 32-bit signed: read only where its values fit in 16 bits (Pillow opens 16-bit PNGs so)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# 8-bit modes convert("RGB") turns into 0..255 RGB as a viewer shows them: bilevel, greyscale,
# palette, colour, CMYK (JPEG), with or without alpha (dropped). Others -- "F" (float:
# convert("RGB") makes it all zeros), LAB, HSV, signed 16-bit -- are refused by name
_EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")


def read_rgb(path: str | os.PathLike, upright: bool = False) -> np.ndarray:
    """The image at ``path`` as (H, W, 3) float32 in [0, 1]: 8-bit images ÷ 255, 16-bit
    greyscale ÷ 65535 (repeated over the three channels). ``upright``: apply the file's EXIF
    orientation, as viewers do (not for a dataset whose annotations are of the stored pixels).

    ValueError naming the file for a mode without a known [0, 1] reading (``_EIGHT_BIT_MODES``
    and ``_SIXTEEN_BIT_MODES`` are read): a float image, or 32-bit integers beyond 0..65535,
    would otherwise reach the model as all zeros or far outside [0, 1]. ValueError too for an
    image beyond Pillow's guard against decompression bombs (neither its error nor its warning,
    an error under ``-W error``, is an OSError: the file went unnamed in a traceback)."""
    try:
        return _read_rgb(path, upright)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"image file {path} is too large for Pillow's guard against decompression bombs "
                         f"({err}); if you trust it, raise PIL.Image.MAX_IMAGE_PIXELS or shrink the image") from err


def _read_rgb(path: str | os.PathLike, upright: bool) -> np.ndarray:
    with Image.open(path) as img:
        if upright:
            img = ImageOps.exif_transpose(img)
        if img.mode in _SIXTEEN_BIT_MODES:
            levels = np.asarray(img)  # (H, W)
            if levels.size and (levels.min() < 0 or levels.max() > 65535):
                raise ValueError(f"image file {path} holds levels {levels.min()}..{levels.max()} "
                                 f"(Pillow mode {img.mode!r}); only 0..65535 (16-bit) is read")
            grey = levels.astype(np.float32) / np.float32(65535.0)  # (H, W)
            return np.repeat(grey[:, :, None], 3, axis=2)
        if img.mode not in _EIGHT_BIT_MODES:
            raise ValueError(f"image file {path} has Pillow mode {img.mode!r}, which is not read as RGB "
                             f"in [0, 1] (modes read: {', '.join(_EIGHT_BIT_MODES + _SIXTEEN_BIT_MODES)}); "
                             "convert it to 8-bit RGB or 16-bit greyscale")
        return np.asarray(img.convert("RGB")).astype(np.float32) / np.float32(255.0)


class COCODataset(Dataset):
    def __init__(self, image_dir: str, ann_file: str, transforms: Callable | None = None,
                 train: bool = True, with_masks: bool = True, with_keypoints: bool = False,
                 drop_crowd: bool = True, keypoint_flip_map: list[int] | None = None):
        self.image_dir, self.ann_file, self.transforms = image_dir, ann_file, transforms
        self.train, self.with_masks, self.with_keypoints = train, with_masks, with_keypoints
        self.drop_crowd = drop_crowd
        self._coco: COCO | None = load_coco(ann_file)
        cats = self.coco.dataset["categories"]
        self.cat_ids = sorted(c["id"] for c in cats)
        self.cat_id_to_label = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}
        self.label_to_cat_id = {label: cid for cid, label in self.cat_id_to_label.items()}
        self.class_names = ["__background__"] + [self.coco.cats[c]["name"] for c in self.cat_ids]
        kp_cats = [c for c in cats if c.get("keypoints")]
        self.keypoint_names = list(kp_cats[0]["keypoints"]) if kp_cats else []
        self.skeleton = [list(e) for e in kp_cats[0].get("skeleton", [])] if kp_cats else []
        if with_keypoints and not kp_cats:
            raise ValueError(f"with_keypoints=True but no category in {ann_file} has 'keypoints'")
        # a naming the inference cannot read matters only where keypoints are loaded (and flipped)
        if keypoint_flip_map is not None:
            self.keypoint_flip_map = check_flip_map(keypoint_flip_map, len(self.keypoint_names))
        elif with_keypoints:
            try:
                self.keypoint_flip_map = _inferred_flip_map(self.keypoint_names)
            except ValueError as err:
                raise ValueError(f"{ann_file}: {err}") from None
        else:
            self.keypoint_flip_map = list(range(len(self.keypoint_names)))
        self.skipped: Counter = Counter()
        self.problems: list[str] = []  # the first few messages, for the person reading logs
        self._first: dict[str, str] = {}  # reason -> its first message
        anns, cleaned = self._check_annotations()
        # ints made anew, together: the json's own id objects sit among its other objects, and an
        # item reading one would copy that page into a forked worker (module docstring, "Memory")
        self.ids = np.array(self._select_images(anns), dtype=np.int64).tolist()
        if train and not self.ids:  # else training stops later on "the dataset is empty", naming nothing
            reasons = "; ".join(self._examples()) or "it lists no images"
            raise ValueError(f"{ann_file}: no image is left to train on (skipped {dict(self.skipped)}); "
                             f"e.g. {reasons}")
        if self.skipped:
            warnings.warn(f"{ann_file}: skipped {dict(self.skipped)}; e.g. " + "; ".join(self._examples()),
                          stacklevel=2)
        self._serialise_records(anns, cleaned)

    @property
    def coco(self) -> COCO:
        """The json as pycocotools reads it, for the main process: categories, evaluation,
        aspect-ratio groups. Items never read it (the records, module docstring "Memory")."""
        if self._coco is None:  # a pickled copy (__getstate__) that is asked for it after all
            self._coco = load_coco(self.ann_file)
        return self._coco

    def __getstate__(self) -> dict:
        """Everything but ``coco``: a loader whose workers are *spawned* (macOS's and Windows'
        default start method; forkserver, Python 3.14's on Linux) pickles the dataset into each,
        and the COCO object is as big as the records again and more. A copy reads the json
        again if something asks it for ``coco``."""
        state = self.__dict__.copy()
        state["_coco"] = None
        return state

    def _skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        self._first.setdefault(reason, message)
        if len(self.problems) < 20:
            self.problems.append(message)

    def _examples(self, count: int = 5) -> list[str]:
        """The first problem of each reason, then the next ones, ``count`` in all: a few missing
        image files after many bad annotations are still named."""
        firsts = list(self._first.values())
        return (firsts + [p for p in self.problems if p not in firsts])[:max(count, len(firsts))]

    def _check_annotations(self) -> tuple[dict[int, list[dict]], dict[int, object]]:
        """Per image id, the annotations we can use (the COCO object's own dicts, not copies); and
        per annotation id, its cleaned segmentation where cleaning changed it (the gt stays as is)."""
        anns, cleaned = defaultdict(list), {}
        n_kp = len(self.keypoint_names)
        for ann in self.coco.dataset["annotations"]:
            aid, iid = ann.get("id"), ann.get("image_id")
            where = f"annotation id {aid} (image id {iid})"
            if iid not in self.coco.imgs:
                self._skip("unknown image id", f"{where}: image id not in 'images'")
                continue
            if ann.get("category_id") not in self.cat_id_to_label:
                self._skip("unknown category id",
                           f"{where}: unknown category id {ann.get('category_id')!r}")
                continue
            bbox = ann.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_coordinate(v, math.inf) for v in bbox)
                    and bbox[2] > 0 and bbox[3] > 0):
                self._skip("zero-area box", f"{where}: zero-area or malformed bbox {bbox!r}")
                continue
            img = self.coco.imgs[iid]
            # in float32, as load_target makes the target: a box narrower than a float32 step at
            # its coordinate would pass in float64 and reach the model as x1 == x2, which it refuses
            x, y, bw, bh = (np.float32(v) for v in bbox)
            if min(x + bw, np.float32(img["width"])) <= max(x, np.float32(0)) or \
                    min(y + bh, np.float32(img["height"])) <= max(y, np.float32(0)):
                # clamped to the image (load_target), it would be a zero-area target
                self._skip("box outside the image", f"{where}: bbox {bbox!r} lies outside the "
                           f"{img['width']} x {img['height']} image")
                continue
            if self.with_masks:
                img = self.coco.imgs[iid]
                segm, why = clean_segmentation(ann.get("segmentation"), img["height"], img["width"])
                if segm is None:
                    self._skip("bad segmentation", f"{where}: {why}")
                    continue
                if segm is not ann["segmentation"] and len(segm) != len(ann["segmentation"]):
                    cleaned[aid] = segm  # some degenerate polygons dropped
            kps = ann.get("keypoints")
            if self.with_keypoints and kps is not None:
                why = _keypoints_problem(kps, n_kp)
                if why:
                    self._skip("bad keypoints", f"{where}: {why}")
                    continue
            # load_target reads both for every annotation: a bad one would stop training there
            area, crowd = ann.get("area", 0.0), ann.get("iscrowd", 0)
            if not (_coordinate(area, math.inf) and area >= 0) or crowd not in (0, 1):
                self._skip("bad area or iscrowd", f"{where}: area {area!r} (a number >= 0) or iscrowd "
                           f"{crowd!r} (0 or 1)")
                continue
            anns[iid].append(ann)
        return anns, cleaned

    def _select_images(self, anns: dict[int, list[dict]]) -> list[int]:
        listing = set(os.listdir(self.image_dir)) if os.path.isdir(self.image_dir) else set()
        ids, missing = [], []
        for iid in sorted(self.coco.imgs):
            name = self.coco.imgs[iid]["file_name"]
            # a name in a subfolder ("sub/a.jpg": "/" on every OS) is not in the folder's listing
            found = name in listing if "/" not in name and os.sep not in name else os.path.exists(
                os.path.join(self.image_dir, name))
            if not found:
                self._skip("missing image file",
                           f"image id {iid}: {os.path.join(self.image_dir, name)} not found")
                missing.append(os.path.join(self.image_dir, name))
                continue
            if self.train and not self._usable(anns.get(iid, [])):
                self._skip("no usable annotations", f"image id {iid}: no usable annotations")
                continue
            ids.append(iid)
        if missing and not self.train:  # an evaluation on a subset would print AP for the whole json
            raise FileNotFoundError(f"{len(missing)} of {len(self.coco.imgs)} images of {self.ann_file} are "
                                    f"not in {self.image_dir}, e.g. {missing[:3]}")
        if missing and len(missing) == len(self.coco.imgs):  # a wrong folder, not a partial download
            raise FileNotFoundError(f"none of the {len(missing)} images of {self.ann_file} is in "
                                    f"{self.image_dir} (e.g. {missing[0]}): is it the json's image folder?")
        return ids

    def _usable(self, anns: list[dict]) -> bool:
        objects = [a for a in anns if not a.get("iscrowd", 0)]
        if self.with_keypoints:  # §5: "images that contain annotated keypoints"
            return any(any(v > 0 for v in (a.get("keypoints") or [])[2::3]) for a in objects)
        return bool(objects)

    def _serialise_records(self, anns: dict[int, list[dict]], cleaned: dict[int, object]) -> None:
        """Pickle each image of the json (not only ``ids``: ``load_target`` takes any) into one
        buffer, I images in id order:

            _record_ids      (I,) int64, sorted
            _record_offsets  (I + 1,) int64: record i is _records[offsets[i]:offsets[i + 1]]
            _records         (offsets[-1],) uint8, one pickle per image

        A record is ``{"id", "file_name", "height", "width", "annotations"}``, each annotation
        only what ``load_target`` reads: ``bbox``, ``label``, ``iscrowd``, ``area``, and
        ``segmentation`` (cleaned) with masks, ``keypoints`` (or None) with keypoints."""
        image_ids = sorted(self.coco.imgs)
        pickles = []
        for image_id in image_ids:
            info = self.coco.imgs[image_id]
            record = {key: info[key] for key in ("id", "file_name", "height", "width")}
            record["annotations"] = []
            for ann in anns.get(image_id, []):
                kept = {"bbox": ann["bbox"], "label": self.cat_id_to_label[ann["category_id"]],
                        "iscrowd": ann.get("iscrowd", 0), "area": ann.get("area", 0.0)}
                if self.with_masks:
                    kept["segmentation"] = cleaned.get(ann["id"], ann["segmentation"])
                if self.with_keypoints:
                    kept["keypoints"] = ann.get("keypoints")
                record["annotations"].append(kept)
            pickles.append(pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))
        lengths = np.array([len(p) for p in pickles], dtype=np.int64)  # (I,)
        self._record_offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])  # (I + 1,)
        self._records = np.frombuffer(b"".join(pickles), dtype=np.uint8)  # read-only, never written
        self._record_ids = np.array(image_ids, dtype=np.int64)  # (I,)

    def _record(self, image_id: int) -> dict:
        """The image's record (``_serialise_records``), unpickled from the buffer; KeyError for
        an id the json does not list, as ``coco.imgs[image_id]`` did."""
        position = int(np.searchsorted(self._record_ids, image_id))
        if position == len(self._record_ids) or self._record_ids[position] != image_id:
            raise KeyError(f"image id {image_id!r} is not in {self.ann_file}")
        start, end = self._record_offsets[position], self._record_offsets[position + 1]
        return pickle.loads(self._records[start:end])

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: int) -> torch.Tensor:
        """(3, H, W) float32 in [0, 1]; checks the file against the json's height/width."""
        record = self._record(image_id)
        path = os.path.join(self.image_dir, record["file_name"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file {path} (image id {image_id}) not found")
        try:
            pixels = read_rgb(path)
        except (OSError, ValueError) as err:  # not an image, empty, truncated; a mode we cannot read
            raise ValueError(f"image file {path} (image id {image_id}) cannot be read: {err}") from err
        if pixels.shape[:2] != (record["height"], record["width"]):
            raise ValueError(f"image file {path} (image id {image_id}) is {pixels.shape[:2]}, "
                             f"but {self.ann_file} says {(record['height'], record['width'])}")
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # (3, H, W)

    def load_target(self, image_id: int) -> dict:
        """The image's usable annotations as a target: ``boxes`` (N, 4) xyxy in pixels, clamped
        to the image; ``labels`` (N,) contiguous 1..K; ``iscrowd``, ``area`` (N,); ``masks`` (N, H, W)
        uint8 with masks; ``keypoints`` (N, K, 3) at pixel centres with keypoints."""
        record = self._record(image_id)
        h, w = record["height"], record["width"]
        anns = [a for a in record["annotations"] if not (self.drop_crowd and a["iscrowd"])]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([a["label"] for a in anns], dtype=torch.int64),
            "image_id": int(image_id),
            "iscrowd": torch.tensor([a["iscrowd"] for a in anns], dtype=torch.int64),
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
            "orig_size": (h, w),
        }
        if self.with_masks:
            masks = [decode_mask(a["segmentation"], h, w) for a in anns]
            target["masks"] = (torch.from_numpy(np.stack(masks)) if masks
                               else torch.zeros((0, h, w), dtype=torch.uint8))  # (N, H, W)
        if self.with_keypoints:
            n_kp = len(self.keypoint_names)
            kps = torch.zeros((len(anns), n_kp, 3), dtype=torch.float32)
            for i, a in enumerate(anns):
                if a["keypoints"] is not None:
                    kps[i] = torch.tensor(a["keypoints"], dtype=torch.float32).reshape(n_kp, 3)
            labelled = kps[..., 2] > 0
            kps[..., :2] += COCO_KEYPOINT_OFFSET * labelled[..., None]  # index -> pixel centre
            kps[~labelled] = 0.0
            target["keypoints"] = kps
        return target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image_id = self.ids[index]  # a fresh int (see __init__), not one of the json's objects
        # through the public methods, which a subclass may override; each unpickles the image's
        # record (tens of microseconds, next to decoding the image)
        image, target = self.load_image(image_id), self.load_target(image_id)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate_fn(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Images differ in size: keep lists; ``transforms.batch_images`` pads them later."""
    return [image for image, _ in batch], [target for _, target in batch]


def aspect_ratio_group_ids(coco: COCO, image_ids: list[int],
                           bins: tuple[float, ...] = (1.0,)) -> list[int]:
    """Group of each image by width / height, from the json alone (no image is opened).

    The default splits portrait (< 1) from landscape (>= 1), so batches pad little.
    """
    ratios = [coco.imgs[i]["width"] / coco.imgs[i]["height"] for i in image_ids]
    return [bisect.bisect_right(sorted(bins), r) for r in ratios]
