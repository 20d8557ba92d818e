"""Data as users have it: Ultralytics / Roboflow YOLO datasets and Pascal VOC folders, read into COCO instances.

`data.root` may name any of three layouts (`find_layout`):
- COCO 2017: images/{train,val}2017/ and annotations/instances_{train,val}2017.json (read as it is);
- Ultralytics / Roboflow YOLO: a data.yaml, or the folder holding one (`read_data_yaml`);
- Pascal VOC: JPEGImages/, Annotations/, ImageSets/Main/{train,val}.txt (`voc_splits`).
A YOLO or VOC dataset is converted once into one COCO json per split, cached outside the data folder in a
directory keyed by every file's size and modification time (`prepare_data`); the training and evaluation code
only ever sees COCO.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datasets.labels import (
    CACHE_VERSION,
    IMAGE_SUFFIXES,
    SPLITS,
    YOLO_YAML_NAMES,
    LabelError,
    build_coco,
    new_counts,
    parse_voc_images,
    voc_coco,
    voc_names,
    write_json,
    yolo_records,
)

log = logging.getLogger(__name__)


# -- Layouts ------------------------------------------------------------------------------------------------------
def find_layout(root: Path) -> str:
    """"yolo" (a data.yaml, or a folder holding one), "voc" (JPEGImages/ and Annotations/) or "coco" (the rest)."""
    if root.suffix.lower() in (".yaml", ".yml") or any((root / name).is_file() for name in YOLO_YAML_NAMES):
        return "yolo"
    if (root / "JPEGImages").is_dir() and (root / "Annotations").is_dir():
        return "voc"
    return "coco"


def yolo_label_path(image: Path) -> Path:
    """Ultralytics' rule (img2label_paths): the last /images/ of the path becomes /labels/, the suffix .txt."""
    text = image.as_posix()
    head, sep, tail = text.rpartition("/images/")
    return Path(f"{head}/labels/{tail}" if sep else text).with_suffix(".txt")


def _image_list(list_file: Path) -> list[Path]:
    """The image paths of a list file, one per line; relative ones are relative to the list file's folder."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LabelError(f"{list_file}: cannot read the image list: {e}") from e
    paths = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        path = Path(line.strip())
        path = path if path.is_absolute() else list_file.parent / path
        if not path.is_file():
            raise LabelError(f"{list_file}: line {number}: {line.strip()!r} is not a file; expected one image path "
                             "per line (relative to the list file's folder, or absolute)")
        paths.append(path)
    return paths


def _resolve_entry(base: Path, entry: str) -> Path:
    """A train/val/test entry relative to the dataset path; Roboflow's `../train/images` (written for a data.yaml
    one folder down) is tried without its `../` when it does not exist, as Ultralytics does."""
    path = Path(entry).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.exists() and entry.startswith("../") and (base / entry[3:]).exists():
        return base / entry[3:]
    return path


@dataclass
class YoloSpec:
    """A parsed data.yaml: class names, and the image files of each split present."""

    path: Path
    names: list[str]
    images: dict[str, list[Path]] = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)  # the yaml and list files (their changes void the cache)


def _yaml_names(path: Path, raw: dict) -> list[str]:
    """`names` as a list, or a dict {0: name, 1: ...}; checked against `nc` when given."""
    names = raw.get("names")
    if isinstance(names, dict):
        if not all(type(k) is int for k in names) or sorted(names) != list(range(len(names))):
            raise LabelError(f"{path}: names has keys {sorted(names, key=str)[:10]}; expected the class indices "
                             f"0..{len(names) - 1}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names or not all(isinstance(n, str | int) for n in names):
        raise LabelError(f"{path}: names is {names!r}; expected a list of class names (or a dict index: name)")
    names = [str(n).strip() for n in names]
    if len(set(names)) < len(names) or not all(names):
        raise LabelError(f"{path}: names {names} holds an empty or repeated name; expected distinct names")
    nc = raw.get("nc")
    if nc is not None and nc != len(names):
        raise LabelError(f"{path}: nc is {nc!r} but names holds {len(names)} classes; make them agree (or drop nc)")
    return names


def read_data_yaml(root: Path) -> YoloSpec:
    """An Ultralytics / Roboflow data.yaml (or the folder holding one) -> names and image files per split.

    `path` (default: the yaml's folder; relative: to the yaml's folder) is the base of train/val/test, each an image
    folder (searched recursively), a .txt list of image paths, or a list of either. Other keys (roboflow:, download:)
    are ignored."""
    path = root if root.suffix.lower() in (".yaml", ".yml") else next(
        root / n for n in YOLO_YAML_NAMES if (root / n).is_file())
    if not path.is_file():
        raise LabelError(f"{path}: data.yaml not found; expected an Ultralytics/Roboflow data.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise LabelError(f"{path}: not readable YAML: {' '.join(str(e).split())}") from e
    if not isinstance(raw, dict):
        raise LabelError(f"{path}: expected a mapping with train, val and names keys, found {type(raw).__name__}")
    for key in ("train", "val"):
        if not raw.get(key):
            raise LabelError(f"{path}: no {key!r} key; expected {key}: an image folder, a list file or a list of "
                             "them (relative to `path`, or to the yaml's folder)")
    spec = YoloSpec(path, _yaml_names(path, raw), sources=[path])
    base = path.parent / Path(str(raw.get("path") or ".")).expanduser()
    for split in SPLITS:
        entries = raw.get(split)
        if not entries:
            continue
        files: list[Path] = []
        for entry in entries if isinstance(entries, list) else [entries]:
            if not isinstance(entry, str):
                raise LabelError(f"{path}: {split} entry {entry!r}; expected a folder or list-file path")
            where = _resolve_entry(base, entry)
            if where.is_dir():
                files += [p for p in sorted(where.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
            elif where.is_file():
                spec.sources.append(where)
                files += _image_list(where)
            elif split == "test":  # optional: Roboflow writes test: even for an export without one
                log.info("%s: test: %r -> %s does not exist; no test split", path, entry, where)
            else:
                raise LabelError(f"{path}: {split}: {entry!r} -> {where} does not exist; expected an image folder "
                                 f"or a list file (paths are relative to {base})")
        if not files and split != "test":
            raise LabelError(f"{path}: {split}: {entries!r} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        if files:
            spec.images[split] = files
    return spec


def voc_splits(root: Path, skip_bad: bool = False) -> tuple[dict[str, list[tuple[Path, Path | None]]], dict[str, int]]:
    """(image, xml or None) pairs of each split listed in ImageSets/Main/{train,val,test}.txt (test optional), and
    per split the listed ids without an image (an error, or with skip_bad skipped and counted here)."""
    images = {p.stem: p for p in sorted((root / "JPEGImages").iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    splits, absent = {}, {}
    for split in SPLITS:
        list_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not list_file.is_file():
            if split == "test":
                continue
            raise LabelError(f"{list_file}: not found; a VOC folder needs ImageSets/Main/train.txt and val.txt, one "
                             "image id (file name without suffix) per line")
        pairs, absent[split] = [], 0
        try:
            lines = list_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise LabelError(f"{list_file}: cannot read the image id list: {e}") from e
        for number, line in enumerate(lines, 1):
            image_id = line.split()[0] if line.strip() else ""  # VOC's per-class lists add a 1/-1 column
            if not image_id:
                continue
            if image_id not in images and skip_bad:
                absent[split] += 1
                continue
            if image_id not in images:
                raise LabelError(f"{list_file}: line {number}: image id {image_id!r} has no file "
                                 f"JPEGImages/{image_id}.jpg (or another image suffix); expected an existing image")
            xml = root / "Annotations" / f"{image_id}.xml"
            pairs.append((images[image_id], xml if xml.is_file() else None))
        if not pairs:
            raise LabelError(f"{list_file}: lists no image id; expected one per line")
        splits[split] = pairs
    return splits, absent


# -- Conversion, cached ---------------------------------------------------------------------------------------------
@dataclass
class PreparedData:
    """A dataset as COCO: per split (image folder, annotation json), the class names, and how it was read."""

    layout: str
    root: Path
    splits: dict[str, tuple[Path, Path]]
    names: list[str] | None = None  # None for COCO (read from its json by CocoDetection)


def cache_dir() -> Path:
    """Where converted datasets go: $YOLOV3_DATA_CACHE, else $XDG_CACHE_HOME/yolov3/data, else ~/.cache/yolov3/data."""
    if os.environ.get("YOLOV3_DATA_CACHE"):
        return Path(os.environ["YOLOV3_DATA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "yolov3" / "data"


def fingerprint(layout: str, root: Path, files: list[Path], skip_bad: bool) -> str:
    """A key of the dataset as it is on disk: every file's path, size and modification time (nanoseconds)."""
    digest = hashlib.sha256(f"{CACHE_VERSION} {layout} {root.resolve()} {skip_bad}".encode())
    for path in sorted(set(files)):
        stat = path.stat()
        digest.update(f"\n{path} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def _common_root(paths: list[Path]) -> Path:
    """The deepest folder holding every path (COCO file names are relative to one image folder)."""
    return Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))


# (image, label file or None) per split, class names (None: found while reading), files read, images skipped per split
Plan = tuple[dict[str, list[tuple[Path, Path | None]]], list[str] | None, list[Path], dict[str, int]]


def _plan_yolo(root: Path) -> Plan:
    """(image, label file or None) per split of a YOLO dataset, its names, and every file it is read from."""
    spec = read_data_yaml(root)
    splits, files = {}, list(spec.sources)
    for split, images in spec.images.items():
        pairs = [(p.resolve(), label if (label := yolo_label_path(p.resolve())).is_file() else None) for p in images]
        if all(label is None for _, label in pairs):
            raise LabelError(f"{spec.path}: {split}: no label file for any of its {len(pairs)} images; expected "
                             f"YOLO .txt labels where Ultralytics' rule puts them (the last /images/ of the path "
                             f"becomes /labels/), e.g. {yolo_label_path(pairs[0][0])}")
        splits[split] = pairs
        files += [p for pair in pairs for p in pair if p]
    return splits, spec.names, files, {}


def _plan_voc(root: Path, skip_bad: bool) -> Plan:
    """(image, xml or None) per split of a VOC folder (names: None, found while reading), every file read."""
    splits, absent = voc_splits(root, skip_bad)
    files = [root / "ImageSets" / "Main" / f"{s}.txt" for s in splits]
    for split, pairs in splits.items():
        if all(xml is None for _, xml in pairs):
            raise LabelError(f"{root}: {split}: no annotation for any of its {len(pairs)} images; expected "
                             f"Annotations/<image id>.xml, e.g. {root / 'Annotations' / (pairs[0][0].stem + '.xml')}")
        files += [p for pair in pairs for p in pair if p]
    return {s: [(p.resolve(), x) for p, x in pairs] for s, pairs in splits.items()}, None, files, absent


def _convert(layout: str, plan: Plan, source: Path, skip_bad: bool) -> tuple[dict[str, tuple[Path, dict]], list[str]]:
    """Each split as (image folder, COCO dict), and the class names (VOC: sorted over all splits)."""
    splits, names, _, absent = plan
    counts = {split: {**new_counts(), "bad_files": absent.get(split, 0)} for split in splits}
    roots = {split: _common_root([p for p, _ in pairs]) for split, pairs in splits.items()}
    if layout == "yolo":
        return {split: (roots[split], build_coco(yolo_records(pairs, roots[split], names, counts[split], skip_bad),
                                                 names, counts[split], f"YOLO labels of {source}"))
                for split, pairs in splits.items()}, names
    parsed = {split: parse_voc_images(pairs, roots[split], counts[split], skip_bad) for split, pairs in splits.items()}
    names = voc_names([record for records in parsed.values() for record in records])
    if not names:
        raise LabelError(f"{source}: no <object> in any annotation; expected objects with <name> and <bndbox>")
    return {split: (roots[split], voc_coco(records, names, counts[split], skip_bad))
            for split, records in parsed.items()}, names


def prepare_data(root: str | Path, skip_bad: bool = False) -> PreparedData:
    """The dataset at `root` as COCO: COCO as it is; YOLO and VOC converted once into cache_dir()/<fingerprint>/
    (never into the data folder), then reused while no file changes size or time."""
    root = Path(root).expanduser()
    layout = find_layout(root)
    if layout == "coco":
        return PreparedData("coco", root, {s: (root / "images" / f"{s}2017",
                                               root / "annotations" / f"instances_{s}2017.json") for s in SPLITS})
    data_root = root.parent if root.is_file() else root
    cache = cache_dir().resolve()
    if cache.is_relative_to(data_root.resolve()):
        raise LabelError(f"the data cache {cache} lies inside the data folder {data_root}; nothing is written there: "
                         "set YOLOV3_DATA_CACHE (or XDG_CACHE_HOME) to a folder outside it")
    plan = _plan_yolo(root) if layout == "yolo" else _plan_voc(root, skip_bad)
    folder = cache / fingerprint(layout, root, plan[2], skip_bad)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        converted, names = _convert(layout, plan, root, skip_bad)
        for split, (_, coco) in converted.items():
            write_json(coco, folder / f"{split}.json")
        write_json({"layout": layout, "root": str(root.resolve()), "names": names,
                    "images": {s: str(images) for s, (images, _) in converted.items()}}, meta_path)  # last: complete
    meta = json.loads(meta_path.read_text())
    splits = {s: (Path(meta["images"][s]), folder / f"{s}.json") for s in meta["images"]}
    return PreparedData(layout, root, splits, meta["names"])


def data_paths(data: Any, split: str) -> tuple[Path, Path]:
    """(image folder, COCO annotation file) of `split` for a DataConfig: data.{split}_images/_annotations when set,
    else what data.root holds in any layout (YOLO and VOC converted and cached by prepare_data)."""
    images, annotations = (getattr(data, f"{split}_images", None), getattr(data, f"{split}_annotations", None))
    if images and annotations:
        return Path(images), Path(annotations)
    prepared = prepare_data(data.root, data.skip_bad_images)
    if split not in prepared.splits:
        raise LabelError(f"{prepared.root}: the {prepared.layout} dataset has no {split} split; expected one of "
                         f"{sorted(prepared.splits)}")
    default_images, default_annotations = prepared.splits[split]
    return Path(images) if images else default_images, Path(annotations) if annotations else default_annotations
