"""Tests for datasets.shapes: determinism, COCO validity, tight boxes on visible pixels, statistics, command line."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from datasets.shapes import SHAPE_CLASSES, Layout, generate_shapes, image_rng, main, render_sample

NUM_TRAIN, NUM_VAL, SIZE = 10, 4, 96


def files(root: Path) -> dict[str, bytes]:
    """Every file under root, by relative path -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "data"
    generate_shapes(out, NUM_TRAIN, NUM_VAL, seed=0, size=SIZE)
    return out


@pytest.fixture(scope="module")
def cocos(dataset) -> dict[str, COCO]:
    return {split: COCO(str(dataset / "annotations" / f"instances_{split}2017.json")) for split in ("train", "val")}


@pytest.fixture(scope="module")
def samples() -> list[tuple]:
    """200 rendered samples at the default size, with their visible masks."""
    return [render_sample(np.random.default_rng([123, i]), 256, return_masks=True) for i in range(200)]


# -- determinism ---------------------------------------------------------------------------------------------------
def test_same_seed_gives_byte_identical_files(dataset, tmp_path):
    generate_shapes(tmp_path, NUM_TRAIN, NUM_VAL, seed=0, size=SIZE)
    expected = files(dataset)
    assert len(expected) == NUM_TRAIN + NUM_VAL + 2
    assert files(tmp_path) == expected


def test_other_seed_gives_other_images(dataset, tmp_path):
    generate_shapes(tmp_path, NUM_TRAIN, NUM_VAL, seed=1, size=SIZE)
    for split in ("train2017", "val2017"):
        for name in sorted(p.name for p in (dataset / "images" / split).iterdir()):
            assert (tmp_path / "images" / split / name).read_bytes() != (dataset / "images" / split / name).read_bytes()


def test_image_does_not_depend_on_the_number_generated(dataset, tmp_path):
    generate_shapes(tmp_path, 5, 0, seed=0, size=SIZE)
    for image_id in range(1, 6):
        name = f"{image_id:012d}.jpg"
        assert (tmp_path / "images/train2017" / name).read_bytes() == (dataset / "images/train2017" / name).read_bytes()
    few = json.loads((tmp_path / "annotations/instances_train2017.json").read_text())
    many = json.loads((dataset / "annotations/instances_train2017.json").read_text())
    assert few["images"] == many["images"][:5]
    assert few["annotations"] == [a for a in many["annotations"] if a["image_id"] <= 5]


def test_train_and_val_streams_differ():
    train, val = render_sample(image_rng(0, "train", 0), SIZE)[0], render_sample(image_rng(0, "val", 0), SIZE)[0]
    assert train.shape != val.shape or not np.array_equal(train, val)


def test_render_sample_is_a_pure_function_of_the_generator():
    a = render_sample(np.random.default_rng(5), 128, return_masks=True)
    b = render_sample(np.random.default_rng(5), 128, return_masks=True)
    c = render_sample(np.random.default_rng(5), 128)  # asking for masks must not change the image or boxes
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a[:3], c, strict=True):
        np.testing.assert_array_equal(x, y)


# -- the COCO files --------------------------------------------------------------------------------------------------
def test_coco_files_load_with_exact_counts(dataset, cocos):
    train, val = cocos["train"], cocos["val"]
    assert sorted(train.getImgIds()) == list(range(1, NUM_TRAIN + 1))
    assert sorted(val.getImgIds()) == list(range(NUM_TRAIN + 1, NUM_TRAIN + NUM_VAL + 1))  # distinct from train's
    for coco, split in ((train, "train2017"), (val, "val2017")):
        ann_ids = [a["id"] for a in coco.dataset["annotations"]]
        assert ann_ids == list(range(1, len(ann_ids) + 1))  # unique, from 1
        assert coco.dataset["categories"] == [{"id": i + 1, "name": n, "supercategory": "shape"}
                                              for i, n in enumerate(SHAPE_CLASSES)]
        assert coco.dataset["licenses"][0]["id"] == 1
        assert sorted(p.name for p in (dataset / "images" / split).iterdir()) == \
            [f"{i:012d}.jpg" for i in sorted(coco.getImgIds())]


def test_images_match_their_records(dataset, cocos):
    for coco, split in ((cocos["train"], "train2017"), (cocos["val"], "val2017")):
        for img in coco.dataset["images"]:
            image = cv2.imread(str(dataset / "images" / split / img["file_name"]))
            assert image.shape == (img["height"], img["width"], 3)
            assert img["license"] == 1
            assert 0.75 * SIZE <= img["width"] <= 1.25 * SIZE and 0.75 * SIZE <= img["height"] <= 1.25 * SIZE


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools vs numpy 2
def test_boxes_inside_images_and_segmentations_usable(cocos):
    count = 0
    for coco in cocos.values():
        for ann in coco.dataset["annotations"]:
            img = coco.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= img["width"] and y + h <= img["height"]
            assert ann["iscrowd"] == 0 and 0 < ann["area"] <= w * h
            assert 1 <= ann["category_id"] <= len(SHAPE_CLASSES)
            # the polygon runs through the centres of the visible pixels: its raster lies in the box, covers most
            mask = coco.annToMask(ann)
            ys, xs = np.nonzero(mask)
            assert xs.min() >= x and ys.min() >= y and xs.max() < x + w and ys.max() < y + h
            assert mask.sum() >= 0.4 * ann["area"]
            count += 1
    assert count > 0


def test_results_in_the_annotation_format_load_as_detections(cocos):
    coco = cocos["val"]
    results = [dict(ann, score=0.9) for ann in coco.dataset["annotations"]]
    for r in results:
        del r["id"]
    detections = coco.loadRes(results)
    assert len(detections.getAnnIds()) == len(results)


# -- render_sample -------------------------------------------------------------------------------------------------
def test_boxes_are_tight_around_visible_pixels(samples):
    for image, boxes, classes, masks in samples:
        height, width = image.shape[:2]
        assert image.dtype == np.uint8 and image.shape[2] == 3
        assert 0.75 * 256 <= width <= 1.25 * 256 and 0.75 * 256 <= height <= 1.25 * 256
        assert boxes.shape == (len(classes), 4) and classes.dtype == np.int64
        assert masks.shape == (len(classes), height, width) and masks.dtype == bool
        assert masks.sum(0).max(initial=0) <= 1  # a pixel shows one object at most
        for box, mask in zip(boxes, masks, strict=True):
            ys, xs = np.nonzero(mask)
            np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()])


def rect(x0, y0, x1, y1):
    """Polygon (4, 2) whose filled pixels are columns x0..x1 and rows y0..y1, inclusive."""
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


def test_layout_box_shrinks_to_the_visible_part():
    layout = Layout(50, 60)
    assert layout.try_add(rect(0, 0, 20, 20)) is not None  # 21 x 21 = 441 pixels
    # covers columns 14..20 of the first: 147 pixels (a third), box IoU 147 / 861 = 0.17: allowed
    mask, x0, y0 = layout.try_add(rect(14, 0, 40, 20))
    assert (x0, y0, mask.shape, mask.sum()) == (14, 0, (21, 27), 21 * 27)
    np.testing.assert_array_equal(layout.visible_boxes_xywh(), [[0, 0, 14, 21], [14, 0, 27, 21]])
    assert layout.visible == [14 * 21, 27 * 21]
    masks = layout.visible_masks()
    assert masks.shape == (2, 50, 60) and masks[0].sum() == 14 * 21 and not (masks[0] & masks[1]).any()


def test_layout_rejects_heavy_overlaps_and_slivers():
    layout = Layout(50, 60)
    layout.try_add(rect(0, 0, 20, 20))
    owner = layout.owner.copy()
    assert layout.try_add(rect(2, 2, 22, 22)) is None  # box IoU 0.69 > MAX_BOX_IOU
    assert layout.try_add(rect(4, 4, 16, 16)) is None  # box IoU 0.38, and would hide 169 of 441 pixels
    assert layout.try_add(rect(5, -1, 12, 21)) is None  # clipped to rows 0..21: IoU 168 / 449 = 0.37
    assert layout.try_add(rect(30, 30, 30, 33)) is None  # 4 pixels: a sliver
    np.testing.assert_array_equal(layout.owner, owner)  # a rejected candidate changes nothing
    assert len(layout.areas) == 1


def test_layout_rejects_hiding_more_than_half():
    layout = Layout(100, 100)
    layout.try_add(rect(0, 0, 9, 9))  # 100 pixels
    assert layout.try_add(rect(0, 0, 99, 99)) is None  # IoU 0.01 but hides all of it
    assert layout.try_add(rect(0, 5, 40, 60)) is not None  # IoU 50 / 2346: hides rows 5..9, exactly half
    np.testing.assert_array_equal(layout.visible_boxes_xywh()[0], [0, 0, 10, 5])


def test_statistics_over_200_samples(samples):
    classes = np.concatenate([s[2] for s in samples])
    areas = np.concatenate([s[3].sum((1, 2)) for s in samples])
    empty = sum(len(s[2]) == 0 for s in samples)
    assert 2 <= empty <= 30  # about 5%
    assert set(classes.tolist()) == set(range(len(SHAPE_CLASSES)))
    assert np.bincount(classes).min() > 0.5 * len(classes) / len(SHAPE_CLASSES)  # roughly balanced
    assert 0.2 < (areas < 32 ** 2).mean() < 0.7  # a good share of COCO-small objects, but not all
    assert (areas >= 96 ** 2).sum() > 0  # and some COCO-large ones
    assert max(len(s[2]) for s in samples) == 8
    overlapping = 0
    for _, boxes, _, _ in samples:
        xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1)
        for i in range(len(xyxy)):
            for j in range(i + 1, len(xyxy)):
                wh = np.minimum(xyxy[i, 2:], xyxy[j, 2:]) - np.maximum(xyxy[i, :2], xyxy[j, :2])
                overlapping += bool((wh > 0).all())
    assert overlapping > 0


def test_objects_stand_out_from_the_background(samples):
    # mean colour inside each object differs clearly from the ring of pixels around its box: learnable
    distances = []
    for image, boxes, _, masks in samples[:50]:
        for (x, y, w, h), mask in zip(boxes.astype(int), masks, strict=True):
            if mask.sum() < 100:
                continue
            inside = image[mask].astype(float).mean(0)
            ring = np.zeros_like(mask)
            ring[max(y - 3, 0):y + h + 3, max(x - 3, 0):x + w + 3] = True
            ring[y:y + h, x:x + w] = False
            distances.append(np.linalg.norm(inside - image[ring].astype(float).mean(0)))
    assert np.median(distances) > 40


# -- command line --------------------------------------------------------------------------------------------------
def test_cli_writes_coco_layout_and_reports(tmp_path, capsys):
    out = tmp_path / "shapes"
    main(["--out", str(out), "--train", "3", "--val", "2", "--size", "64", "--seed", "7"])
    assert sorted(p.name for p in (out / "images/train2017").iterdir()) == [f"{i:012d}.jpg" for i in (1, 2, 3)]
    assert sorted(p.name for p in (out / "images/val2017").iterdir()) == [f"{i:012d}.jpg" for i in (4, 5)]
    assert sorted(p.name for p in (out / "annotations").iterdir()) == ["instances_train2017.json",
                                                                      "instances_val2017.json"]
    printed = capsys.readouterr().out
    train = json.loads((out / "annotations/instances_train2017.json").read_text())
    assert "train2017: 3 images" in printed and f"{len(train['annotations'])} boxes" in printed
    assert "val2017: 2 images" in printed and str(out / "annotations/instances_val2017.json") in printed
    assert "per class: circle" in printed


def test_cli_refuses_existing_output_without_overwrite(tmp_path, capsys):
    main(["--out", str(tmp_path), "--train", "4", "--val", "1", "--size", "64"])
    before = files(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), "--train", "2", "--val", "1", "--size", "64"])
    assert exit_info.value.code != 0
    error = capsys.readouterr().err
    assert str(tmp_path / "images") in error and "--overwrite" in error
    assert files(tmp_path) == before  # nothing touched
    main(["--out", str(tmp_path), "--train", "2", "--val", "1", "--size", "64", "--overwrite"])
    assert len(list((tmp_path / "images/train2017").iterdir())) == 2  # no leftovers of the bigger run
    assert [p.name for p in (tmp_path / "images/val2017").iterdir()] == ["000000000003.jpg"]


def test_cli_refuses_non_empty_annotations_folder(tmp_path, capsys):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "other.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), "--train", "1", "--val", "1"])
    assert exit_info.value.code != 0 and str(tmp_path / "annotations") in capsys.readouterr().err


@pytest.mark.parametrize(("args", "named"), [
    (["--train", "-1", "--val", "1"], ["--train", "'-1'", ">= 0"]),
    (["--train", "1", "--val", "x"], ["--val", "'x'"]),
    (["--train", "1", "--val", "1", "--size", "32"], ["--size", "'32'", "[64, 4096]"]),
    (["--train", "1", "--val", "1", "--size", "5000"], ["--size", "'5000'"]),
    (["--train", "1", "--val", "1", "--seed", "-3"], ["--seed", "'-3'"]),
    (["--val", "1"], ["--train"]),
])
def test_cli_bad_arguments_name_argument_and_value(tmp_path, capsys, args, named):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "d"), *args])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert all(text in error for text in named), error
    assert not (tmp_path / "d").exists()


def test_generate_shapes_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_val must be an integer >= 0, got -2"):
        generate_shapes(tmp_path, 1, -2)
    with pytest.raises(ValueError, match=r"size must be an integer in \[64, 4096\], got 10"):
        generate_shapes(tmp_path, 1, 1, size=10)
    with pytest.raises(ValueError, match="num_train must be an integer >= 0, got 1.5"):
        generate_shapes(tmp_path, 1.5, 1)
    assert not any(tmp_path.iterdir())


def test_module_runs_as_a_script_and_matches_another_process(tmp_path):
    result = subprocess.run([sys.executable, "-m", "datasets.shapes", "--out", str(tmp_path / "cli"), "--train", "2",
                             "--val", "1", "--size", "64", "--seed", "3"], capture_output=True, text=True,
                            cwd=Path(__file__).parents[1], check=False)
    assert result.returncode == 0, result.stderr
    assert "train2017: 2 images" in result.stdout
    assert (tmp_path / "cli/images/val2017/000000000003.jpg").is_file()
    generate_shapes(tmp_path / "here", 2, 1, seed=3, size=64)  # no per-process state (e.g. str hash salt) leaks in
    assert files(tmp_path / "cli") == files(tmp_path / "here")
