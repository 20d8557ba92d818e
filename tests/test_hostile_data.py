"""Hostile data: every broken, lying or oversized image and every broken annotation file gives a DatasetError naming
the file and the problem, or (data.skip_bad_images) a warning and a count, or a sample with the right targets; never
another exception, a hang or a silently wrong target. Known cases first, then hypothesis fuzzing."""
import json
import math
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datasets.coco import CocoDetection, DatasetError
from datasets.loader import LoaderError, build_loader, checked_batches
from datasets.transforms import Preprocess
from reliability.hostile_inputs import (
    BASE_ANNOTATIONS,
    annotation_cases,
    encoded,
    image_cases,
    try_annotations,
    write_annotation_case,
    write_image_case,
)
from utils.boxes import CROWD_CLASS
from utils.config import Config

DECODE = "cannot be decoded as an image"
TRUNCATED = "truncated JPEG: the data ends before the end-of-image marker"
IMAGE_OUTCOMES = {  # what each input of reliability/hostile_inputs.py gives, skip_bad_images false
    "valid JPEG": "sample [0 16 24 16 16]",
    "random bytes": DECODE,
    "zero-byte JPEG": "empty file (0 bytes)",
    "truncated JPEG (half)": TRUNCATED,
    "JPEG cut inside its header": TRUNCATED,
    "JPEG, 2 bytes": TRUNCATED,
    "truncated PNG": DECODE,
    "PNG data named .jpg": "sample [0 16 24 16 16]",
    "JPEG data named .png": "sample [0 16 24 16 16]",
    "text named .png": DECODE,
    "PNG declaring 100000x100000": "refused before decoding: its header declares 100000x100000 pixels, more than the "
                                   "134,217,728 this loader accepts",
    "PNG declaring 11000x11000, annotated 64x48": "its size 11000x11000 differs from the annotation's 64x48",
    "JPEG of another size than annotated": "decoded size 48x64 differs from the annotation's 64x48",
    # 1x1 -> 64x64; the box [0, 0, 10, 10] is clipped to the image, so it covers the whole input
    "1x1 image, box larger than the image": "sample [0 32 32 64 64]",
    # 20x10 -> 64x32 (scale 3.2), padded 16 rows on top; box [5, 2, 100, 50] -> [5, 2, 20, 10] -> [16, 22.4, 64, 48]
    "20x10 image, box larger than the image": "sample [0 40 35.2 48 25.6]",
    "missing file": "image not found",
    "a folder, not a file": "cannot be read: Is a directory",
    "symlink to a file outside the image folder": "file_name 'link.jpg' leads outside",
}


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    path = tmp_path_factory.mktemp("outside") / "secret.txt"
    path.write_text("not for the loader")
    return path


def open_one(root, annotations, skip=False):
    return CocoDetection(root / "images", annotations, Preprocess(), img_size=64, skip_bad_images=skip)


def describe(sample):
    return "sample " + " ".join("[" + " ".join(f"{v:g}" for v in row.tolist()) + "]" for row in sample[1])


def test_every_hostile_image_input_is_listed():
    assert [case[0] for case in image_cases(Path("/x"))] == list(IMAGE_OUTCOMES)


@pytest.mark.parametrize("case", list(IMAGE_OUTCOMES))
def test_hostile_image(case, tmp_path, outside, monkeypatch):
    spec = next(c for c in image_cases(outside) if c[0] == case)
    annotations = write_image_case(tmp_path, spec)
    decodes = []
    real_imdecode = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *a: decodes.append(1) or real_imdecode(*a))
    expected = IMAGE_OUTCOMES[case]
    if expected.startswith("sample "):
        sample = open_one(tmp_path, annotations)[0]
        assert describe(sample) == expected and sample[0].shape == (3, 64, 64)
        return
    with pytest.raises((DatasetError, FileNotFoundError), match=re.escape(expected)) as info:
        open_one(tmp_path, annotations)[0]
    assert spec[1] in str(info.value)  # names the file
    if "declar" in case:
        assert not decodes  # refused from the header alone, no pixel decoded
    with pytest.warns(UserWarning, match=rf"skipping an unreadable image \(1 so far in this process\): .*"
                      rf"{re.escape(expected)}"):
        dataset = open_one(tmp_path, annotations, skip=True)
        assert dataset[0] is None
    assert dataset.skipped == 1


ANNOTATION_OUTCOMES = {
    "valid": "ok: 1 box(es) kept, dropped {}",
    "not JSON": "not valid JSON: Expecting property name",
    "top level is a list": "the top level must be an object with images, annotations, categories",
    "nested 100000 deep": "not valid JSON: nested too deeply",
    "no 'images' key": "missing or not a list: key 'images'",
    "image without file_name": "images[0] (id 1) lacks key 'file_name'",
    "annotation without bbox": "annotations[0] (id 1) lacks key 'bbox'",
    "negative width": "image id 1: width=-64 height=48, expected positive numbers",
    "zero height": "image id 1: width=64 height=0, expected positive numbers",
    "NaN width": "image id 1: width=nan height=48, expected positive numbers",
    "width true": "image id 1: width=True height=48, expected positive numbers",
    "100000 x 100000 image": "image id 1: 100000x100000 pixels, more than the 134,217,728",
    "unknown category id": "annotation id 1 has category_id 99, which is not in 'categories' ([3])",
    "annotation of a missing image": "annotation id 1 refers to image_id 9, which is not in 'images'",
    "duplicate image ids": "duplicate images id(s) [1]",
    "duplicate annotation ids": "duplicate annotations id(s) [1]",
    "string id": "images[0] has id '1'; ids must be integers",
    "float image_id": "annotation id 1: image_id=1.0, expected an integer",
    "NaN coordinates": "ok: 0 box(es) kept, dropped {'non-finite': 1}",
    "infinite width": "ok: 0 box(es) kept, dropped {'non-finite': 1}",
    "negative box size": "ok: 0 box(es) kept, dropped {'zero or negative size': 1}",
    "box outside the image": "ok: 0 box(es) kept, dropped {'outside the image': 1}",
    "bbox of 5 numbers": "annotation id 1: bbox must be 4 numbers [x, y, w, h], got [8, 8, 16, 16, 1]",
    "bbox with a string": "bbox must be 4 numbers [x, y, w, h], got [8, '8', 16, 16]",
    "bbox with 10**400": "annotation id 1: bbox [8, 8, 100000000000000000...0000000000000000000, 16] holds a number",
    "iscrowd 'yes'": "annotation id 1: iscrowd='yes', expected 0 or 1",
    "area 'big'": "annotation id 1: area='big', expected a number",
    "no area, no iscrowd": "ok: 1 box(es) kept, dropped {}",
    "category name 5": "category id 3: name=5, expected a string",
    "file_name ../../etc/passwd": "image id 1 file_name '../../etc/passwd' leads outside the image folder",
    "file_name /etc/passwd": "image id 1 file_name '/etc/passwd' leads outside the image folder",
    "file_name sub/../../x.png": "image id 1 file_name 'sub/../../x.png' leads outside the image folder",
    "empty file_name": "image id 1: file_name='', expected a non-empty string",
    "file_name with NUL": "image id 1: file_name='a\\x00.png', expected a non-empty string without NUL characters",
    "no images at all": "'images' is empty",
}


def test_every_hostile_annotation_input_is_listed():
    assert [name for name, _ in annotation_cases()] == list(ANNOTATION_OUTCOMES)


@pytest.mark.parametrize("case", list(ANNOTATION_OUTCOMES))
def test_hostile_annotation_file(case, tmp_path):
    path = write_annotation_case(tmp_path, next(c for c in annotation_cases() if c[0] == case))
    outcome = try_annotations(tmp_path, path)
    expected = ANNOTATION_OUTCOMES[case]
    if expected.startswith("ok: "):
        assert outcome == expected
    else:
        assert outcome.startswith(f"DatasetError: {path}: ") and expected in outcome, outcome


def test_missing_area_and_iscrowd_still_evaluate(tmp_path):
    from datasets.coco_eval import coco_evaluate

    path = write_annotation_case(tmp_path, next(c for c in annotation_cases() if c[0] == "no area, no iscrowd"))
    dataset = CocoDetection(tmp_path / "images", path, Preprocess(), img_size=64)
    rows = np.array([[1, 8, 8, 16, 16, 0.9, 3]])  # the ground-truth box itself: [image, x, y, w, h, score, category]
    stats, _, _, _ = coco_evaluate(dataset.coco, rows, dataset.ids, dataset.class_names)
    assert stats["AP50"] == pytest.approx(1.0) and stats["AP"] == pytest.approx(1.0)


def test_a_loader_with_workers_goes_through_every_hostile_image(tmp_path, outside):
    """All cases in one dataset behind 2 workers: skipping delivers exactly the good ones, without skipping the
    first bad one stops the loader with its file name."""
    cases = image_cases(outside)
    (tmp_path / "images").mkdir()
    entries, annotations = [], []
    for i, case in enumerate(cases, start=1):
        one = write_image_case(tmp_path / f"case{i}", case)
        if case[4] is not None:
            (tmp_path / "case" f"{i}" / "images" / case[1]).rename(tmp_path / "images" / case[1])
        entry = json.loads(one.read_text())
        entries.append({**entry["images"][0], "id": i})
        annotations.append({**entry["annotations"][0], "id": i, "image_id": i})
    path = tmp_path / "all.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations,
                                "categories": [{"id": 1, "name": "thing"}]}))
    good = sum(expected.startswith("sample ") for expected in IMAGE_OUTCOMES.values())
    cfg = Config()
    cfg.data.workers, cfg.data.timeout, cfg.data.img_size = 2, 60.0, 64
    dataset = CocoDetection(tmp_path / "images", path, Preprocess(), img_size=64, skip_bad_images=True)
    delivered = [len(images) for images, _, _ in checked_batches(build_loader(cfg, dataset, False, 4))]
    assert sum(delivered) == good and len(delivered) == math.ceil(len(cases) / 4)
    dataset.skip_bad_images = False
    with pytest.raises(LoaderError, match=r"random.jpg: cannot be decoded as an image .* \(in DataLoader worker "
                       r"process \d\)\. Fix or remove that image, or set data.skip_bad_images=true"):
        list(checked_batches(build_loader(cfg, dataset, False, 4)))


# -- hypothesis: random and mutated files ------------------------------------------------------------------------

JPEG = encoded(".jpg")
mutated_jpegs = st.one_of(
    st.integers(0, len(JPEG)).map(lambda n: JPEG[:n]),  # cut anywhere
    st.tuples(st.integers(0, len(JPEG) - 1), st.integers(0, 255)).map(  # one byte changed
        lambda iv: JPEG[:iv[0]] + bytes([iv[1]]) + JPEG[iv[0] + 1:]),
    st.tuples(st.integers(0, len(JPEG)), st.binary(min_size=1, max_size=64)).map(  # bytes inserted
        lambda ib: JPEG[:ib[0]] + ib[1] + JPEG[ib[0]:]),
    st.binary(max_size=4096),  # random bytes
    st.binary(max_size=64).map(lambda b: b"\xff\xd8" + b),  # a JPEG start, then anything
    st.binary(max_size=64).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),  # a PNG signature, then anything
)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutated_jpegs)
def test_fuzzed_image_bytes_give_a_sample_or_an_error_naming_the_file(data, tmp_path):
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / "f.jpg").write_bytes(data)
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "f.jpg", "width": 64, "height": 48}],
                                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 8, 16, 16]}],
                                "categories": [{"id": 1, "name": "thing"}]}))
    try:
        image, targets, meta = open_one(tmp_path, path)[0]
    except DatasetError as e:
        assert str(e).startswith(f"{tmp_path / 'images' / 'f.jpg'}: ")
        return
    assert image.shape == (3, 64, 64) and meta["orig_size"] == (48, 64)  # decoded at the annotated size ...
    assert targets.tolist() == [[0, 16, 24, 16, 16]]  # ... so the box is where the annotation says


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from([0, -1, 10**30, 2**63]) | st.floats()
    | st.text(max_size=8) | st.sampled_from(["../x", "/etc/passwd", "a.png", ""]),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


def mutations():
    """(section, index, key or None to delete the entry, value or None to delete the key) on BASE_ANNOTATIONS with a
    second image and annotation."""
    keys = {"images": ["id", "file_name", "width", "height"],
            "annotations": ["id", "image_id", "category_id", "bbox", "iscrowd", "area"],
            "categories": ["id", "name"]}
    return st.sampled_from(list(keys)).flatmap(lambda section: st.tuples(
        st.just(section), st.integers(0, 1), st.sampled_from(keys[section] + ["extra"]),
        st.one_of(st.just("<delete>"), json_values)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(mutations(), min_size=1, max_size=4))
def test_fuzzed_annotation_files_give_an_error_or_valid_targets(changes, tmp_path):
    data = json.loads(json.dumps(BASE_ANNOTATIONS))
    data["images"].append({"id": 2, "file_name": "b.png", "width": 30, "height": 20})
    data["annotations"].append({"id": 2, "image_id": 2, "category_id": 3, "bbox": [20, 10, 30, 30]})
    for section, index, key, value in changes:
        entry = data[section][min(index, len(data[section]) - 1)] if data[section] else {}
        if value == "<delete>":
            entry.pop(key, None)
        else:
            entry[key] = value
    (tmp_path / "images").mkdir(exist_ok=True)
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(data))
    try:
        dataset = CocoDetection(tmp_path / "images", path, Preprocess(), img_size=64)
    except DatasetError as e:
        assert str(e).startswith(f"{path}: ")
        return
    sizes = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
    kept = 0
    for image_id, (boxes, classes) in dataset.targets.items():
        width, height = sizes[image_id]
        assert np.isfinite(boxes).all() and (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (((classes >= 0) & (classes < len(dataset.class_names))) | (classes == CROWD_CLASS)).all()
        kept += len(boxes)
    assert kept + sum(dataset.dropped.values()) == len(data["annotations"])  # every box kept or counted
