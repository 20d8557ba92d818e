"""COCO-format detection dataset: validated annotations, robust image decoding, letterboxed samples."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import random
import reprlib
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torchvision.datasets import CocoDetection as TorchvisionCocoDetection
from torchvision.datasets import VisionDataset

from datasets.coco_names import COCO_CATEGORIES, COCO_CATEGORY_IDS, COCO_NAMES
from datasets.images import MAX_PIXELS, DatasetError, decode_image
from datasets.transforms import Preprocess
from utils.boxes import CROWD_CLASS

log = logging.getLogger(__name__)

# The keys every entry must have (COCO's "Data format", https://cocodataset.org/#format-data).
REQUIRED_KEYS = {"images": ("id", "file_name", "width", "height"),
                 "annotations": ("id", "image_id", "category_id", "bbox"),
                 "categories": ("id", "name")}

Sample = tuple[torch.Tensor, torch.Tensor, dict[str, Any]]


NUMBER_TYPES = (int, float)  # what json.loads gives for numbers; `type(v) in` leaves out bool, a subclass of int
LARGEST_FLOAT = 2**1023  # an int from the file beyond this does not become a finite float


def _check_entries(path: Path, data: dict) -> None:
    """Each section a list of objects with its REQUIRED_KEYS and an integer id, unique within the section."""
    for section, keys in REQUIRED_KEYS.items():
        entries = data.get(section)
        if type(entries) is not list:
            raise DatasetError(f"{path}: missing or not a list: key {section!r}")
        needed = set(keys)
        for i, entry in enumerate(entries):
            if type(entry) is not dict:
                raise DatasetError(f"{path}: {section}[{i}] is not an object: {reprlib.repr(entry)}")
            if not entry.keys() >= needed:
                missing = next(k for k in keys if k not in entry)
                raise DatasetError(f"{path}: {section}[{i}] (id {entry.get('id', '?')!r}) lacks key {missing!r}; "
                                   f"every entry of {section!r} needs {keys}")
            if type(entry["id"]) is not int:
                raise DatasetError(f"{path}: {section}[{i}] has id {entry['id']!r}; ids must be integers")
        ids = Counter(entry["id"] for entry in entries)
        if len(ids) < len(entries):
            raise DatasetError(f"{path}: duplicate {section} id(s) {[i for i, n in ids.items() if n > 1][:5]}")


def _check_images(path: Path, images: list[dict]) -> None:
    """A relative file_name inside the image folder, and a positive, finite size of at most MAX_PIXELS."""
    for entry in images:
        name, width, height = entry["file_name"], entry["width"], entry["height"]
        if type(name) is not str or not name or "\0" in name:
            raise DatasetError(f"{path}: image id {entry['id']}: file_name={name!r}, expected a non-empty string "
                               "without NUL characters")
        if name.startswith("/") or ".." in name.split("/"):
            raise DatasetError(f"{path}: image id {entry['id']} file_name {name!r} leads outside the image folder; "
                               "file names must be relative paths inside it")
        if not (type(width) in NUMBER_TYPES and type(height) in NUMBER_TYPES and 0 < width < LARGEST_FLOAT
                and 0 < height < LARGEST_FLOAT):  # NaN fails every comparison
            raise DatasetError(f"{path}: image id {entry['id']}: width={width!r} height={height!r}, expected positive "
                               "numbers")
        if width * height > MAX_PIXELS:
            raise DatasetError(f"{path}: image id {entry['id']}: {width}x{height} pixels, more than the "
                               f"{MAX_PIXELS:,} this loader accepts (datasets/images.py MAX_PIXELS)")


def _check_annotations(path: Path, annotations: list[dict]) -> None:
    """Integer image_id and category_id; bbox 4 numbers (NaN and infinity allowed here: image_boxes drops and counts
    them); iscrowd 0 or 1 and area a number (COCO's evaluation reads both)."""
    for entry in annotations:
        bbox, crowd, area = entry["bbox"], entry.get("iscrowd", 0), entry.get("area", 0)
        for key in ("image_id", "category_id"):
            if type(entry[key]) is not int:
                raise DatasetError(f"{path}: annotation id {entry['id']}: {key}={entry[key]!r}, expected an integer")
        if type(bbox) is not list or len(bbox) != 4 or not all(type(v) in NUMBER_TYPES for v in bbox):
            raise DatasetError(f"{path}: annotation id {entry['id']}: bbox must be 4 numbers [x, y, w, h], got "
                               f"{reprlib.repr(bbox)}")
        if not all(type(v) is float or -LARGEST_FLOAT < v < LARGEST_FLOAT for v in bbox):
            raise DatasetError(f"{path}: annotation id {entry['id']}: bbox {reprlib.repr(bbox)} holds a number too "
                               "large for a float")
        if crowd not in (0, 1) or type(crowd) is float:
            raise DatasetError(f"{path}: annotation id {entry['id']}: iscrowd={crowd!r}, expected 0 or 1")
        if type(area) not in NUMBER_TYPES:
            raise DatasetError(f"{path}: annotation id {entry['id']}: area={area!r}, expected a number")


def read_coco_json(path: Path) -> dict:
    """Load a COCO instances file and check its structure; errors name the file, the entry and the key."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON: {e}") from e
    except RecursionError as e:
        raise DatasetError(f"{path}: not valid JSON: nested too deeply") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: the top level must be an object with {', '.join(REQUIRED_KEYS)}")
    _check_entries(path, data)
    _check_images(path, data["images"])
    _check_annotations(path, data["annotations"])
    for entry in data["categories"]:
        if type(entry["name"]) is not str:
            raise DatasetError(f"{path}: category id {entry['id']}: name={entry['name']!r}, expected a string")
    return data


def fill_evaluation_keys(data: dict) -> int:
    """Give annotations without them COCO's `iscrowd` (0) and `area` (bbox w * h), which pycocotools' evaluation
    reads (else it fails at the first evaluation); returns how many annotations lacked either."""
    lacking = 0
    for a in data["annotations"]:
        lacking += "iscrowd" not in a or "area" not in a
        a.setdefault("iscrowd", 0)
        a.setdefault("area", float(a["bbox"][2]) * float(a["bbox"][3]))
    return lacking


def image_boxes(data: dict, path: Path, category_to_class: dict[int, int]
                ) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], Counter]:
    """Per image id: xyxy boxes (K, 4) clipped to the image and classes (K,); plus counts of what was dropped.

    Crowd regions (iscrowd=1) are kept, with class CROWD_CLASS (-1): the loss ignores predictions inside them.
    Dropped, crowd or not: non-finite or non-positive sizes, boxes with no area inside the image.
    """
    images = {img["id"]: img for img in data["images"]}
    anns = data["annotations"]
    for a in anns:
        if a["image_id"] not in images:
            raise DatasetError(f"{path}: annotation id {a['id']} refers to image_id {a['image_id']}, "
                               "which is not in 'images'")
        if a["category_id"] not in category_to_class:
            raise DatasetError(f"{path}: annotation id {a['id']} has category_id {a['category_id']}, which is not "
                               f"in 'categories' ({sorted(category_to_class)})")
    image_ids = np.array([a["image_id"] for a in anns], np.int64)
    xywh = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
    classes = np.array([CROWD_CLASS if a.get("iscrowd", 0) else category_to_class[a["category_id"]] for a in anns],
                       np.int64)
    sizes = np.array([(images[i]["width"], images[i]["height"]) for i in image_ids], np.float64).reshape(-1, 2)

    finite = np.isfinite(xywh).all(1)
    positive = finite & (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    xyxy = np.clip(np.nan_to_num(xyxy), 0, np.tile(sizes, 2))
    keep = positive & (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    dropped = Counter({"non-finite": int((~finite).sum()), "zero or negative size": int((finite & ~positive).sum()),
                       "outside the image": int((positive & ~keep).sum())})

    order = np.argsort(image_ids[keep], kind="stable")
    kept_ids, kept_boxes, kept_classes = image_ids[keep][order], xyxy[keep][order], classes[keep][order]
    starts = np.searchsorted(kept_ids, list(images))
    ends = np.searchsorted(kept_ids, list(images), side="right")
    per_image = {i: (kept_boxes[s:e].astype(np.float32), kept_classes[s:e])
                 for i, s, e in zip(images, starts, ends, strict=True)}
    return per_image, +dropped


class CocoDetection(TorchvisionCocoDetection):
    """torchvision's CocoDetection with validated annotations, contiguous classes and letterboxed samples.

    `dataset[i]` or `dataset[(i, size)]` -> (image (3, size, size) uint8, targets (K, 5) [class, cx, cy, w, h] in
    input pixels, class CROWD_CLASS (-1) for a crowd region, meta {image_id, orig_size (h, w), letterbox}); None for
    an unreadable image when `skip_bad_images` (the collate drops it). `targets[image_id]`: (xyxy boxes (K, 4) in
    original pixels, classes (K,)), crowd regions included; `object_boxes` leaves them out.
    """

    def __init__(self, img_folder: str | Path, ann_file: str | Path, preprocess: Preprocess, img_size: int,
                 skip_bad_images: bool = False) -> None:
        # CocoDetection.__init__ hands the file to pycocotools unchecked; we validate it first, then index it.
        VisionDataset.__init__(self, str(img_folder))
        self.ann_file = Path(ann_file)
        data = read_coco_json(self.ann_file)
        if lacking := fill_evaluation_keys(data):
            log.info("%s: %d annotation(s) without 'area' or 'iscrowd': using bbox w * h and 0", self.ann_file, lacking)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco.createIndex()
        self.ids = sorted(self.coco.imgs)
        if not self.ids:
            raise DatasetError(f"{self.ann_file}: 'images' is empty")
        self.category_ids = sorted(self.coco.cats)  # contiguous class i <-> category_ids[i]
        self.class_names = [self.coco.cats[c]["name"] for c in self.category_ids]
        self.category_to_class = {c: i for i, c in enumerate(self.category_ids)}
        self.targets, self.dropped = image_boxes(data, self.ann_file, self.category_to_class)
        self.preprocess, self.img_size, self.skip_bad_images = preprocess, img_size, skip_bad_images
        self.skipped = 0  # images skipped as unreadable by this process (each worker counts its own)
        self.root_path = Path(img_folder).resolve()
        if not self.root_path.is_dir():
            raise FileNotFoundError(f"image folder not found: {img_folder} (for {self.ann_file})")
        if self.dropped:
            log.warning("%s: dropped %s annotation(s): %s", self.ann_file, sum(self.dropped.values()),
                        ", ".join(f"{n} {why}" for why, n in self.dropped.items()))
        self.crowd_regions = sum(int((classes == CROWD_CLASS).sum()) for _, classes in self.targets.values())
        if self.crowd_regions:
            log.info("%s: %d crowd annotation(s) (iscrowd=1) kept as ignore regions: never positives, and no "
                     "objectness penalty for predictions inside them", self.ann_file, self.crowd_regions)

    def image_path(self, image_id: int) -> Path:
        """The file of an image id; a file_name that leads outside the image folder is an error."""
        name = self.coco.imgs[image_id]["file_name"]
        path = (self.root_path / name).resolve()
        if not path.is_relative_to(self.root_path):
            raise DatasetError(f"{self.ann_file}: image id {image_id} file_name {name!r} leads outside {self.root}")
        return path

    def load_image(self, id: int) -> np.ndarray:  # noqa: A002 (torchvision's signature)
        """Decode an image to (H, W, 3) uint8 RGB in the pixel frame its annotations use."""
        info = self.coco.imgs[id]
        return decode_image(self.image_path(id), info["width"], info["height"], f"image id {id} in {self.ann_file}")

    _load_image = load_image  # torchvision's name for it

    def _load_target(self, id: int) -> tuple[np.ndarray, np.ndarray]:  # noqa: A002
        """(K, 4) xyxy boxes in original pixels and (K,) contiguous classes (CROWD_CLASS for crowd regions),
        degenerate boxes removed."""
        return self.targets[id]

    def object_boxes(self, image_id: int) -> np.ndarray:
        """(K, 4) xyxy boxes in original pixels of the image's objects, crowd regions left out (for drawing)."""
        boxes, classes = self.targets[image_id]
        return boxes[classes != CROWD_CLASS]

    def __getitem__(self, key: int | tuple[int, int] | tuple[int, int, int]) -> Sample | None:
        """Sample `key` = index, (index, input size) or (index, input size, augmentation seed); see the class
        docstring. With a seed, the sample's augmentation depends on nothing else."""
        index, size, seed = (*key, None)[:3] if isinstance(key, tuple) else (key, self.img_size, None)
        if seed is not None and self.preprocess.augmentation is not None:
            self.preprocess.augmentation.set_random_state(np.random.default_rng(seed), random.Random(seed))
        image_id = self.ids[index]
        try:
            image = self.load_image(image_id)
        except (OSError, DatasetError) as e:
            if not self.skip_bad_images:
                raise
            self.skipped += 1
            warnings.warn(f"skipping an unreadable image ({self.skipped} so far in this process): {e}", stacklevel=2)
            return None
        boxes, classes = self._load_target(image_id)
        tensor, targets, letterbox = self.preprocess(image, boxes, classes, size)
        return tensor, targets, {"image_id": image_id, "orig_size": image.shape[:2], "letterbox": letterbox}


def collate(batch: list[Sample | None]) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """Samples -> images (B, 3, S, S) uint8, targets (K, 6) [batch_index, class, cx, cy, w, h], metas (B dicts).

    Skipped samples (None) are left out, so B can be smaller than the batch asked for (0 when all were skipped).
    """
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.zeros(0, 3, 0, 0, dtype=torch.uint8), torch.zeros(0, 6), []
    images = torch.stack([b[0] for b in batch])
    targets = torch.cat([torch.nn.functional.pad(b[1], (1, 0), value=float(i)) for i, b in enumerate(batch)])
    return images, targets, [b[2] for b in batch]



def class_table(ann_file: Path, num_classes: int, names: list[str] | None = None) -> tuple[list[str], list[int]]:
    """Names and annotation category ids of classes 0..C-1. With `names` (a checkpoint's): those, with the category
    ids of `ann_file` when it exists and holds the same names, COCO's for COCO's 80, else 1..C. Without: the
    categories of `ann_file` sorted by id (as CocoDetection orders them), or COCO's 80 when the file does not exist
    and the model has 80 classes."""
    if names is not None:
        if len(names) != num_classes:
            raise DatasetError(f"the checkpoint names {len(names)} classes but its model predicts {num_classes}")
        if ann_file.is_file():
            categories = sorted((c["id"], c["name"]) for c in read_coco_json(ann_file)["categories"])
            if [name for _, name in categories] == list(names):
                return list(names), [cat_id for cat_id, _ in categories]
        if list(names) == list(COCO_NAMES):
            return list(COCO_NAMES), list(COCO_CATEGORY_IDS)
        return list(names), list(range(1, len(names) + 1))
    if ann_file.is_file():
        categories = sorted((c["id"], c["name"]) for c in read_coco_json(ann_file)["categories"])
        if len(categories) != num_classes:
            raise DatasetError(f"{ann_file} has {len(categories)} categories but the model predicts {num_classes} "
                               "classes; point data.val_annotations (or data.root) at the model's annotation file")
        return [name for _, name in categories], [cat_id for cat_id, _ in categories]
    if num_classes == len(COCO_CATEGORIES):
        return list(COCO_NAMES), list(COCO_CATEGORY_IDS)
    raise DatasetError(f"no class names for a {num_classes}-class model: {ann_file} does not exist and the classes are "
                       f"not COCO's {len(COCO_CATEGORIES)}; point data.val_annotations (or data.root) at the "
                       "annotation file the model was trained with (a checkpoint of this version names its classes)")
