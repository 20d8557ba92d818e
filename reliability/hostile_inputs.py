"""Hostile inputs for the data pipeline: broken, lying and oversized image files, and broken annotation files.

Each input is tried on its own; the table says what happened: the sample's shape and boxes, or the error (with
data.skip_bad_images: the warning and the count).

    python -m reliability.hostile_inputs                  # writes the inputs to a temporary folder, prints tables
"""
from __future__ import annotations

import argparse
import json
import struct
import tempfile
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from datasets.coco import CocoDetection, DatasetError
from datasets.transforms import Preprocess

Writer = Callable[[Path], Any]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def lying_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height RGB pixels, followed by one row of data only (a few hundred
    bytes): decoders that trust the header allocate width * height * 3 bytes first."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * (1 + 3 * min(width, 4096)))) + _png_chunk(b"IEND", b""))


def encoded(extension: str, width: int = 64, height: int = 48) -> bytes:
    """A grey-gradient image of this size encoded as `extension` (".jpg", ".png")."""
    image = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
    return cv2.imencode(extension, cv2.merge([image, image, image]))[1].tobytes()


def _bytes(data: bytes) -> Writer:
    return lambda path: path.write_bytes(data)


def _symlink(target: Path) -> Writer:
    return lambda path: path.symlink_to(target)


def image_cases(outside: Path) -> list[tuple[str, str, int, int, Writer | None, list[float]]]:
    """(case, file name, annotated width, height, writer of the file or None for no file, one bbox [x, y, w, h]).

    `outside` is a file outside the image folder, the target of a symlink case."""
    rng = np.random.default_rng(0)
    jpeg, png = encoded(".jpg"), encoded(".png")
    return [
        ("valid JPEG", "ok.jpg", 64, 48, _bytes(jpeg), [8, 8, 16, 16]),
        ("random bytes", "random.jpg", 64, 48, _bytes(rng.bytes(3000)), [8, 8, 16, 16]),
        ("zero-byte JPEG", "empty.jpg", 64, 48, _bytes(b""), [8, 8, 16, 16]),
        ("truncated JPEG (half)", "half.jpg", 64, 48, _bytes(jpeg[:len(jpeg) // 2]), [8, 8, 16, 16]),
        ("JPEG cut inside its header", "header.jpg", 64, 48, _bytes(jpeg[:100]), [8, 8, 16, 16]),
        ("JPEG, 2 bytes", "two.jpg", 64, 48, _bytes(jpeg[:2]), [8, 8, 16, 16]),
        ("truncated PNG", "half.png", 64, 48, _bytes(png[:len(png) // 2]), [8, 8, 16, 16]),
        ("PNG data named .jpg", "png_inside.jpg", 64, 48, _bytes(png), [8, 8, 16, 16]),
        ("JPEG data named .png", "jpeg_inside.png", 64, 48, _bytes(jpeg), [8, 8, 16, 16]),
        ("text named .png", "text.png", 64, 48, _bytes(b"not an image\n" * 20), [8, 8, 16, 16]),
        ("PNG declaring 100000x100000", "huge.png", 64, 48, _bytes(lying_png(100_000, 100_000)), [8, 8, 16, 16]),
        ("PNG declaring 11000x11000, annotated 64x48", "bomb.png", 64, 48, _bytes(lying_png(11_000, 11_000)),
         [8, 8, 16, 16]),
        ("JPEG of another size than annotated", "other_size.jpg", 64, 48, _bytes(encoded(".jpg", 48, 64)),
         [8, 8, 16, 16]),
        ("1x1 image, box larger than the image", "one.png", 1, 1, _bytes(encoded(".png", 1, 1)), [0, 0, 10, 10]),
        ("20x10 image, box larger than the image", "small.png", 20, 10, _bytes(encoded(".png", 20, 10)),
         [5, 2, 100, 50]),
        ("missing file", "missing.jpg", 64, 48, None, [8, 8, 16, 16]),
        ("a folder, not a file", "folder.jpg", 64, 48, lambda path: path.mkdir(), [8, 8, 16, 16]),
        ("symlink to a file outside the image folder", "link.jpg", 64, 48, _symlink(outside), [8, 8, 16, 16]),
    ]


def write_image_case(root: Path, case: tuple) -> Path:
    """Write one image case into root/images and its one-image annotation file; returns the annotation file."""
    _, name, width, height, writer, bbox = case
    (root / "images").mkdir(parents=True, exist_ok=True)
    if writer is not None:
        writer(root / "images" / name)
    data = {"images": [{"id": 1, "file_name": name, "width": width, "height": height}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": bbox, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "thing"}]}
    path = root / f"{Path(name).stem}.json"
    path.write_text(json.dumps(data))
    return path


def try_image(root: Path, annotations: Path, skip: bool) -> str:
    """Load the one sample; describe the result: 'sample ...', 'skipped ...' or 'DatasetError: ...'."""
    try:
        dataset = CocoDetection(root / "images", annotations, Preprocess(), img_size=64, skip_bad_images=skip)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sample = dataset[0]
    except (DatasetError, FileNotFoundError) as e:
        return f"{type(e).__name__}: {e}"
    if sample is None:
        return f"skipped (count {dataset.skipped}): warning {caught[-1].message}"
    image, targets, _ = sample
    boxes = ", ".join("[" + " ".join(f"{v:g}" for v in row.tolist()) + "]" for row in targets)
    return f"sample {tuple(image.shape)}, targets [class cx cy w h] {boxes or 'none'}"


BASE_ANNOTATIONS = {
    "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [8, 8, 16, 16], "iscrowd": 0, "area": 256}],
    "categories": [{"id": 3, "name": "a"}],
}


def _set(path: tuple, value: Any) -> Callable[[dict], Any]:
    """A mutation that sets data[path...] = value."""
    def mutate(data: dict) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def annotation_cases() -> list[tuple[str, Callable[[dict], Any] | str]]:
    """(case, mutation of BASE_ANNOTATIONS, or the file's whole text)."""
    return [
        ("valid", lambda d: None),
        ("not JSON", "{images: oops"),
        ("top level is a list", "[]"),
        ("nested 100000 deep", "[" * 100_000 + "]" * 100_000),
        ("no 'images' key", lambda d: d.pop("images")),
        ("image without file_name", lambda d: d["images"][0].pop("file_name")),
        ("annotation without bbox", lambda d: d["annotations"][0].pop("bbox")),
        ("negative width", _set(("images", 0, "width"), -64)),
        ("zero height", _set(("images", 0, "height"), 0)),
        ("NaN width", _set(("images", 0, "width"), float("nan"))),
        ("width true", _set(("images", 0, "width"), True)),
        ("100000 x 100000 image", lambda d: d["images"][0].update(width=100_000, height=100_000)),
        ("unknown category id", _set(("annotations", 0, "category_id"), 99)),
        ("annotation of a missing image", _set(("annotations", 0, "image_id"), 9)),
        ("duplicate image ids", lambda d: d["images"].append(dict(d["images"][0], file_name="b.png"))),
        ("duplicate annotation ids", lambda d: d["annotations"].append(dict(d["annotations"][0]))),
        ("string id", _set(("images", 0, "id"), "1")),
        ("float image_id", _set(("annotations", 0, "image_id"), 1.0)),
        ("NaN coordinates", _set(("annotations", 0, "bbox"), [8, float("nan"), 16, 16])),
        ("infinite width", _set(("annotations", 0, "bbox"), [8, 8, float("inf"), 16])),
        ("negative box size", _set(("annotations", 0, "bbox"), [8, 8, -16, 16])),
        ("box outside the image", _set(("annotations", 0, "bbox"), [100, 100, 16, 16])),
        ("bbox of 5 numbers", _set(("annotations", 0, "bbox"), [8, 8, 16, 16, 1])),
        ("bbox with a string", _set(("annotations", 0, "bbox"), [8, "8", 16, 16])),
        ("bbox with 10**400", _set(("annotations", 0, "bbox"), [8, 8, 10**400, 16])),
        ("iscrowd 'yes'", _set(("annotations", 0, "iscrowd"), "yes")),
        ("area 'big'", _set(("annotations", 0, "area"), "big")),
        ("no area, no iscrowd", lambda d: [d["annotations"][0].pop(k) for k in ("area", "iscrowd")]),
        ("category name 5", _set(("categories", 0, "name"), 5)),
        ("file_name ../../etc/passwd", _set(("images", 0, "file_name"), "../../etc/passwd")),
        ("file_name /etc/passwd", _set(("images", 0, "file_name"), "/etc/passwd")),
        ("file_name sub/../../x.png", _set(("images", 0, "file_name"), "sub/../../x.png")),
        ("empty file_name", _set(("images", 0, "file_name"), "")),
        ("file_name with NUL", _set(("images", 0, "file_name"), "a\0.png")),
        ("no images at all", lambda d: (d["images"].clear(), d["annotations"].clear())),
    ]


def write_annotation_case(root: Path, case: tuple) -> Path:
    """Write one annotation case as root/<n>.json (and root/images); returns its path."""
    name, mutation = case
    (root / "images").mkdir(parents=True, exist_ok=True)
    path = root / f"{name.replace(' ', '_').replace('/', '_')}.json"
    if isinstance(mutation, str):
        path.write_text(mutation)
    else:
        data = json.loads(json.dumps(BASE_ANNOTATIONS))
        mutation(data)
        path.write_text(json.dumps(data))
    return path


def try_annotations(root: Path, path: Path) -> str:
    """Open the dataset; 'ok: N boxes kept, dropped {...}' or the error."""
    try:
        dataset = CocoDetection(root / "images", path, Preprocess(), img_size=64)
    except (DatasetError, FileNotFoundError) as e:
        return f"{type(e).__name__}: {e}"
    kept = sum(len(boxes) for boxes, _ in dataset.targets.values())
    return f"ok: {kept} box(es) kept, dropped {dict(dataset.dropped)}"


def main(argv: list[str] | None = None) -> list[tuple[str, str]]:
    """Write every case into a temporary folder, try it, print Markdown tables; returns (case, outcome) rows."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="hostile_"))
    outside = root / "secret.txt"
    outside.write_text("outside the image folder")
    rows = []
    print("| image input | data.skip_bad_images false | true |\n|---|---|---|")
    for case in image_cases(outside):
        folder = root / "images_" / case[1]
        annotations = write_image_case(folder, case)
        outcomes = [try_image(folder, annotations, skip).replace(str(root), "<tmp>") for skip in (False, True)]
        rows.append((case[0], outcomes[0]))
        print(f"| {case[0]} | {outcomes[0]} | {outcomes[1]} |")
    print("\n| annotation input | outcome |\n|---|---|")
    for case in annotation_cases():
        outcome = try_annotations(root, write_annotation_case(root, case)).replace(str(root), "<tmp>")
        rows.append((case[0], outcome))
        print(f"| {case[0]} | {outcome} |")
    return rows


if __name__ == "__main__":
    main()
