"""Label files as exporters write them, read into COCO instances (datasets/formats.py finds and caches them).

Label conventions:
- YOLO: one line `class cx cy w h` per box, class a 0-based index into `names`, the rest normalised to 0..1 by the
  image's width and height (a line of more values is a segmentation polygon `class x1 y1 x2 y2 ...`: its box is
  used, as Ultralytics does). The size is read from the image header and, as Ultralytics' `exif_size` does,
  swapped when the EXIF orientation rotates the image by 90 degrees: YOLO tools label the image as displayed, and
  datasets/images.py applies the orientation when the annotation gives the displayed size.
- VOC: <bndbox> xmin ymin xmax ymax are 1-based pixel indices, inclusive; the box over pixels 1..W is [0, W] in
  COCO's continuous 0-based frame. So x = xmin - 1, y = ymin - 1, w = xmax - xmin + 1, h = ymax - ymin + 1
  (detectron2/data/datasets/pascal_voc.py does the same). <size> must match the image, in either orientation.
  <difficult>1</difficult> objects are kept as ordinary boxes (iscrowd 0) and counted.

Nothing is dropped silently: boxes partly outside the image are clipped to it and counted; boxes of zero size are
dropped and counted; an image without a label file is kept as a background image and counted. A malformed line or
file (a class out of range, a coordinate outside 0..1) is a LabelError naming the file, the line and what was
expected; with skip_bad (data.skip_bad_images) such a line is skipped and a bad file drops its image, each counted.

XML is parsed with the standard library's expat; expat >= 2.4.1 refuses entity-expansion bombs.
"""
from __future__ import annotations

import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from PIL import Image

from datasets.images import DatasetError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
EXIF_ORIENTATION = 0x0112  # EXIF tag; values 5..8 turn the stored image by 90 or 270 degrees for display
CLIP_TOLERANCE = 1e-3  # pixels: a box overshooting the image by less is float noise of the normalisation, not "clipped"
COORD_TOLERANCE = 1e-3  # normalised YOLO values this far outside 0..1 are exporters' rounding, not pixel coordinates
SPLITS = ("train", "val", "test")  # test is optional everywhere
YOLO_YAML_NAMES = ("data.yaml", "data.yml")
CACHE_VERSION = 1  # bump when the conversion's output changes, so that old cache entries are not reused

# Every key of the counts, with the meaning the summaries print.
COUNT_MEANINGS = {
    "images": "images written",
    "annotations": "annotations written",
    "clipped": "boxes partly outside the image, clipped to it (kept)",
    "difficult": "VOC objects marked difficult (kept as ordinary boxes)",
    "zero_size": "boxes of zero or negative width or height (dropped)",
    "outside_image": "boxes wholly outside the image (dropped)",
    "unknown_class": "boxes whose class is not in the names (dropped, skip_bad)",
    "bad_lines": "malformed label lines (skipped, skip_bad)",
    "bad_files": "malformed label files, unreadable or absent images (image dropped, skip_bad)",
    "images_without_labels": "images without a label file (kept, no boxes)",
    "labels_without_images": "label files without an image (ignored)",
}

T = TypeVar("T")
Box = tuple[int, float, float, float, float]  # class index, x1, y1, x2, y2 in pixels of the continuous 0-based frame


class LabelError(DatasetError):
    """A label, names, list or image file that cannot be read; the message names the file, line and what is right."""


def new_counts() -> dict[str, int]:
    """Counts with every key of COUNT_MEANINGS at 0."""
    return dict.fromkeys(COUNT_MEANINGS, 0)


def read_names(path: Path) -> list[str]:
    """Class names, one per line; trailing blank lines are ignored, empty or repeated names are errors."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LabelError(f"{path}: cannot read the names file: {e}") from e
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if not names:
        raise LabelError(f"{path}: no class names; expected one name per line")
    for number, name in enumerate(names, 1):
        if not name:
            raise LabelError(f"{path}: line {number}: empty class name; it would shift the ids of the names below")
        if names.index(name) + 1 < number:
            raise LabelError(f"{path}: line {number}: {name!r} repeats line {names.index(name) + 1}")
    return names


def find_files(root: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Files under `root` (recursively) with one of `suffixes`, keyed by relative path without suffix ('a/0001')."""
    if not root.is_dir():
        raise LabelError(f"{root}: not a directory")
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in suffixes or not path.is_file():
            continue
        key = path.relative_to(root).with_suffix("").as_posix()
        if key in found:
            raise LabelError(f"{path} and {found[key]}: two files with the same stem; keep one per image")
        found[key] = path
    return found


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as displayed, from its header: no pixels are decoded."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            rotated = image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise LabelError(f"{path}: cannot be read as an image: {e}") from e
    return (height, width) if rotated else (width, height)


def parse_yolo_line(line: str, where: str, num_classes: int) -> Box:
    """One `class cx cy w h` (or `class x1 y1 x2 y2 ...` polygon) line -> class index and normalised x1, y1, x2, y2."""
    fields = line.split()
    if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
        raise LabelError(f"{where}: {len(fields)} values {line.strip()!r}; expected 5: class cx cy w h (normalised "
                         "to 0..1), or a polygon: class x1 y1 x2 y2 x3 y3 ...")
    try:
        values = [float(v) for v in fields]
    except ValueError:
        raise LabelError(f"{where}: {line.strip()!r} is not {len(fields)} numbers; expected class cx cy w h") from None
    if not all(math.isfinite(v) for v in values) or not values[0].is_integer():
        raise LabelError(f"{where}: {line.strip()!r}; expected an integer class and finite cx cy w h in 0..1")
    if not 0 <= values[0] < num_classes:
        raise LabelError(f"{where}: class {int(values[0])} is out of range; the names hold {num_classes} classes, "
                         f"so expected 0..{num_classes - 1}")
    if not all(-COORD_TOLERANCE <= v <= 1 + COORD_TOLERANCE for v in values[1:]):
        raise LabelError(f"{where}: {line.strip()!r} has a coordinate outside 0..1; expected cx cy w h normalised by "
                         "the image's width and height (pixel coordinates are not YOLO labels)")
    cls = int(values[0])
    if len(values) > 5:  # a polygon: its box
        xs, ys = values[1::2], values[2::2]
        return cls, min(xs), min(ys), max(xs), max(ys)
    _, cx, cy, w, h = values
    return cls, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def read_yolo(path: Path, size: tuple[int, int], num_classes: int, counts: dict[str, int], skip_bad: bool
              ) -> list[Box]:
    """The boxes of one YOLO label file in pixels; bad lines raise or, with skip_bad, are counted."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LabelError(f"{path}: cannot be read as text: {e}") from e
    width, height = size
    boxes = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            cls, x1, y1, x2, y2 = parse_yolo_line(line, f"{path}: line {number}", num_classes)
        except LabelError:
            if not skip_bad:
                raise
            counts["bad_lines"] += 1
            continue
        boxes.append((cls, x1 * width, y1 * height, x2 * width, y2 * height))
    return boxes


def _number(element: ET.Element, tag: str, where: str) -> float:
    """The finite number in child `tag` of `element`."""
    text = element.findtext(tag)
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise LabelError(f"{where}: <{tag}> is {text!r}; expected a number") from None
    if not math.isfinite(value):
        raise LabelError(f"{where}: <{tag}> is {text!r}; expected a finite number")
    return value


def read_voc(path: Path) -> tuple[tuple[int, int] | None, list[tuple[str, float, float, float, float, bool]]]:
    """One VOC xml file -> its <size> (None when absent or 0) and objects (name, x1, y1, x2, y2, difficult), the box
    in the continuous 0-based frame."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise LabelError(f"{path}: line {e.position[0]}: not valid XML ({e})") from e
    except OSError as e:
        raise LabelError(f"{path}: cannot be read: {e}") from e
    size = None
    if root.find("size") is not None:
        width, height = (_number(root.find("size"), tag, f"{path}: <size>") for tag in ("width", "height"))
        if not (width.is_integer() and height.is_integer() and width >= 0 and height >= 0):
            raise LabelError(f"{path}: <size> {width} x {height}; expected whole numbers of pixels")
        size = (int(width), int(height)) if width and height else None
    objects = []
    for number, obj in enumerate(root.findall("object"), 1):
        name = (obj.findtext("name") or "").strip()
        where = f"{path}: object {number} ({name or 'no <name>'})"
        if not name:
            raise LabelError(f"{where}: missing or empty <name>; expected the class name")
        if obj.find("bndbox") is None:
            raise LabelError(f"{where}: no <bndbox>; expected <bndbox> with xmin ymin xmax ymax")
        xmin, ymin, xmax, ymax = (_number(obj.find("bndbox"), tag, where) for tag in ("xmin", "ymin", "xmax", "ymax"))
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        objects.append((name, xmin - 1, ymin - 1, xmax, ymax, difficult))  # 1-based inclusive -> 0-based continuous
    return size, objects


def clip_xyxy(box: tuple[float, float, float, float], width: int, height: int
              ) -> tuple[str | None, tuple[float, float, float, float] | None]:
    """Clip an x1, y1, x2, y2 box to the image -> (count key or None, clipped box or None when dropped)."""
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        return "zero_size", None
    clipped = (max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height)))
    if not (clipped[2] > clipped[0] and clipped[3] > clipped[1]):
        return "outside_image", None
    moved = max(abs(a - b) for a, b in zip(box, clipped, strict=True)) > CLIP_TOLERANCE
    return ("clipped" if moved else None), clipped


def build_coco(records: list[tuple[str, tuple[int, int], list[Box]]], names: list[str], counts: dict[str, int],
               source: str) -> dict:
    """COCO instances dict from (file_name, (width, height), boxes) per image; boxes clipped, drops counted. The
    counts are kept in info["counts"] for the dataset report."""
    images, annotations = [], []
    for image_id, (file_name, (width, height), boxes) in enumerate(records, 1):
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for cls, *xyxy in boxes:
            reason, clipped = clip_xyxy(tuple(xyxy), width, height)
            if reason:
                counts[reason] += 1
            if clipped is None:
                continue
            x1, y1, x2, y2 = clipped
            w, h = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls + 1,
                                "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0})
    counts["images"], counts["annotations"] = len(images), len(annotations)
    categories = [{"id": i, "name": name, "supercategory": "none"} for i, name in enumerate(names, 1)]
    return {"info": {"description": f"converted from {source} by datasets/formats.py", "counts": dict(counts)},
            "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def _pair(images: Path, labels: Path, suffix: str, counts: dict[str, int]) -> list[tuple[Path, Path | None]]:
    """(image path, label path or None) per image under `images`, sorted; label files without an image counted."""
    found = find_files(images, IMAGE_SUFFIXES)
    if not found:
        raise LabelError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)}) found; expected the image folder")
    label_files = find_files(labels, (suffix,))
    counts["labels_without_images"] = len(label_files.keys() - found.keys())
    return [(path, label_files.get(key)) for key, path in found.items()]


def per_image(pairs: list[tuple[Path, Path | None]], image_root: Path, counts: dict[str, int], skip_bad: bool,
              read: Callable[[Path, Path | None], T]) -> list[tuple[str, T]]:
    """(file_name relative to image_root, read(image, label file or None)) per pair; a LabelError raises or, with
    skip_bad, drops the image and counts a bad file."""
    done = []
    for path, label in pairs:
        try:
            value = read(path, label)
        except LabelError:
            if not skip_bad:
                raise
            counts["bad_files"] += 1
            continue
        counts["images_without_labels"] += label is None
        done.append((path.relative_to(image_root).as_posix(), value))
    return done


def yolo_records(pairs: list[tuple[Path, Path | None]], image_root: Path, names: list[str], counts: dict[str, int],
                 skip_bad: bool) -> list[tuple[str, tuple[int, int], list[Box]]]:
    """(file_name relative to image_root, size, boxes) per (image, YOLO label file or None)."""
    def read(path: Path, label: Path | None) -> tuple[tuple[int, int], list[Box]]:
        size = image_size(path)
        return size, read_yolo(label, size, len(names), counts, skip_bad) if label else []

    return [(name, size, boxes) for name, (size, boxes) in per_image(pairs, image_root, counts, skip_bad, read)]


def yolo_to_coco(images: Path, labels: Path, names: list[str], skip_bad: bool = False
                 ) -> tuple[dict, dict[str, int]]:
    """COCO instances dict and counts (COUNT_MEANINGS) from YOLO txt labels (labels/<same relative path>.txt) of the
    images under `images`."""
    counts = new_counts()
    records = yolo_records(_pair(images, labels, ".txt", counts), images, names, counts, skip_bad)
    return build_coco(records, names, counts, "YOLO labels"), counts


VocParsed = tuple[str, tuple[int, int], Path | None, list]  # file_name, size, xml path, objects


def parse_voc_images(pairs: list[tuple[Path, Path | None]], image_root: Path, counts: dict[str, int],
                     skip_bad: bool) -> list[VocParsed]:
    """Read the VOC xml of each (image, xml or None): size checked against the image, objects in pixels."""
    def read(path: Path, xml: Path | None) -> tuple[tuple[int, int], Path | None, list]:
        size = image_size(path)
        xml_size, objects = read_voc(xml) if xml else (None, [])
        if xml_size and xml_size not in (size, size[::-1]):
            raise LabelError(f"{xml}: <size> {xml_size[0]} x {xml_size[1]} but {path} is {size[0]} x {size[1]}; "
                             "expected the image's size")
        # either orientation is the image; the file's own says which frame its boxes are in
        return xml_size or size, xml, objects

    return [(name, *read_back) for name, read_back in per_image(pairs, image_root, counts, skip_bad, read)]


def voc_coco(parsed: list[VocParsed], names: list[str], counts: dict[str, int], skip_bad: bool) -> dict:
    """COCO instances dict of parsed VOC images, categories in the order of `names`."""
    index = {name: i for i, name in enumerate(names)}
    records = []
    for file_name, size, xml, objects in parsed:
        boxes = []
        for name, x1, y1, x2, y2, difficult in objects:
            if name not in index:
                if not skip_bad:
                    raise LabelError(f"{xml}: class name {name!r} is not in the names file; expected one of "
                                     f"{names[:10]}{' ...' if len(names) > 10 else ''}")
                counts["unknown_class"] += 1
                continue
            counts["difficult"] += difficult
            boxes.append((index[name], x1, y1, x2, y2))
        records.append((file_name, size, boxes))
    return build_coco(records, names, counts, "Pascal VOC annotations")


def voc_names(parsed: list[VocParsed]) -> list[str]:
    """The class names found in parsed VOC files, sorted alphabetically (VOC has no names file)."""
    return sorted({obj[0] for *_, objects in parsed for obj in objects})


def voc_to_coco(images: Path, annotations: Path, names: list[str] | None = None, skip_bad: bool = False
                ) -> tuple[dict, dict[str, int]]:
    """COCO instances dict and counts (COUNT_MEANINGS) from Pascal VOC xml files of the images under `images`;
    categories in the order of `names`, or the names found sorted alphabetically."""
    counts = new_counts()
    parsed = parse_voc_images(_pair(images, annotations, ".xml", counts), images, counts, skip_bad)
    return voc_coco(parsed, names if names is not None else voc_names(parsed), counts, skip_bad), counts


def write_json(data: dict, path: Path) -> None:
    """Write `data` to `path` through a temporary file and a rename, so a failed run leaves no partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: DDP ranks may convert at once
    temporary.write_text(json.dumps(data))
    temporary.replace(path)


