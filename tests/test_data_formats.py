"""data.root as users have it (datasets/formats.py): a Roboflow export and a VOC folder train and validate with only
data.root set; conversions round-trip, are cached outside the data folder and never write into it; the dataset
report counts by hand; the anchors' recall on boxes built to fit or miss them; class names from the checkpoint."""
import json
import shutil
import xml.sax.saxutils
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, grid_model
from PIL import Image

import detect
import main as train_main
import validation
from datasets.anchors import AUTO_RECALL, anchor_fit, check_anchors
from datasets.coco import CocoDetection, class_table
from datasets.coco_names import COCO_CATEGORY_IDS, COCO_NAMES
from datasets.formats import data_paths, find_layout, prepare_data, yolo_label_path
from datasets.labels import LabelError
from datasets.report import LABELS_FILE, REPORT_FILE, dataset_report
from datasets.shapes import SHAPE_CLASSES, generate_shapes
from datasets.transforms import Preprocess
from models.tables import DARKNET_ANCHORS
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.config_load import config_to_dict, load_config

ROOT = DATA.parent.parent


def coco_split(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())


def roboflow_export(shapes: Path, out: Path) -> Path:
    """The shapes set as Roboflow's "YOLOv8" zip unpacks: train/ and valid/ with images/ and labels/ (an empty .txt
    for an image without boxes), and a data.yaml written for a folder one level down."""
    for split, folder in (("train", "train"), ("val", "valid")):
        data = coco_split(shapes, split)
        (out / folder / "images").mkdir(parents=True)
        (out / folder / "labels").mkdir(parents=True)
        for image in data["images"]:
            shutil.copy(shapes / "images" / f"{split}2017" / image["file_name"], out / folder / "images")
            w, h = image["width"], image["height"]
            lines = [f"{a['category_id'] - 1} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}"
                     for a in data["annotations"] if a["image_id"] == image["id"] for x, y, bw, bh in [a["bbox"]]]
            (out / folder / "labels" / Path(image["file_name"]).with_suffix(".txt")).write_text(
                "".join(line + "\n" for line in lines))
    (out / "data.yaml").write_text(
        "train: ../train/images\nval: ../valid/images\ntest: ../test/images\n\nnc: 6\n"
        f"names: {json.dumps(list(SHAPE_CLASSES))}\n\nroboflow:\n  workspace: me\n  project: shapes\n  version: 1\n"
        "  license: CC BY 4.0\n  url: https://universe.roboflow.com/me/shapes/dataset/1\n")
    return out


def voc_export(shapes: Path, out: Path) -> Path:
    """The shapes set as a Pascal VOC folder: JPEGImages/, Annotations/ (1-based inclusive pixels), ImageSets/Main."""
    for name in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (out / name).mkdir(parents=True)
    for split in ("train", "val"):
        data = coco_split(shapes, split)
        ids = []
        for image in data["images"]:
            stem = f"{split}_{Path(image['file_name']).stem}"
            ids.append(stem)
            shutil.copy(shapes / "images" / f"{split}2017" / image["file_name"], out / "JPEGImages" / f"{stem}.jpg")
            objects = "".join(
                f"<object><name>{xml.sax.saxutils.escape(SHAPE_CLASSES[a['category_id'] - 1])}</name>"
                f"<difficult>0</difficult><bndbox><xmin>{a['bbox'][0] + 1:g}</xmin><ymin>{a['bbox'][1] + 1:g}</ymin>"
                f"<xmax>{a['bbox'][0] + a['bbox'][2]:g}</xmax><ymax>{a['bbox'][1] + a['bbox'][3]:g}</ymax></bndbox>"
                "</object>" for a in data["annotations"] if a["image_id"] == image["id"])
            (out / "Annotations" / f"{stem}.xml").write_text(
                f"<annotation><size><width>{image['width']}</width><height>{image['height']}</height><depth>3</depth>"
                f"</size>{objects}</annotation>\n")
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return out


def snapshot(folder: Path) -> dict:
    """Every file and folder under `folder` with its size and modification time."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=8, num_val=4, seed=0, size=96)
    return root


def boxes_by_name(data: dict) -> dict[str, list]:
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {i["id"]: Path(i["file_name"]).stem.split("_")[-1] for i in data["images"]}
    result: dict[str, list] = {stem: [] for stem in files.values()}
    for a in data["annotations"]:
        result[files[a["image_id"]]].append((names[a["category_id"]], a["bbox"]))
    return result


@pytest.mark.parametrize("layout", ["yolo", "voc"])
def test_conversion_round_trips_and_is_cached_outside_the_data(shapes, tmp_path, layout, monkeypatch):
    monkeypatch.setenv("YOLOV3_DATA_CACHE", str(tmp_path / "cache"))
    export = roboflow_export if layout == "yolo" else voc_export
    root = export(shapes, tmp_path / "data")
    before = snapshot(root)
    assert find_layout(root) == layout
    prepared = prepare_data(root)
    assert prepared.layout == layout and set(prepared.splits) == {"train", "val"}
    assert prepared.names == (list(SHAPE_CLASSES) if layout == "yolo" else sorted(SHAPE_CLASSES))
    for split in ("train", "val"):
        images, annotations = prepared.splits[split]
        assert annotations.is_relative_to(tmp_path / "cache") and images.is_relative_to(root.resolve())
        converted, original = json.loads(annotations.read_text()), coco_split(shapes, split)
        got, want = boxes_by_name(converted), boxes_by_name(original)
        assert got.keys() == want.keys()
        for stem, boxes in want.items():
            assert [n for n, _ in got[stem]] == [n for n, _ in boxes]
            for (_, a), (_, b) in zip(got[stem], boxes, strict=True):
                assert a == pytest.approx(b, abs=1e-3 if layout == "yolo" else 1e-9)  # 6 decimals of 96 px
        assert len(CocoDetection(images, annotations, Preprocess(), 64)) == len(original["images"])
    # a second call reuses the cache; a changed label file makes a new entry
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.json")}
    assert prepare_data(root).splits == prepared.splits
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.json")} == written
    label = next((root / ("train/labels" if layout == "yolo" else "Annotations")).iterdir())
    label.write_text(label.read_text() + ("\n" if layout == "yolo" else " "))
    assert prepare_data(root).splits["train"][1] != prepared.splits["train"][1]
    before[label.relative_to(root).as_posix()] = snapshot(root)[label.relative_to(root).as_posix()]
    assert snapshot(root) == before  # nothing else in the data folder was written


def test_the_cache_never_goes_into_the_data_folder(shapes, tmp_path, monkeypatch):
    root = roboflow_export(shapes, tmp_path / "data")
    monkeypatch.setenv("YOLOV3_DATA_CACHE", str(root / "cache"))
    with pytest.raises(LabelError, match=r"lies inside the data folder .*set YOLOV3_DATA_CACHE"):
        prepare_data(root)
    assert not (root / "cache").exists()


TRAIN_ARGS = ["--device", "cpu", "--set", "model.arch=yolov3-tiny", "data.img_size=64", "data.multiscale=null",
              "data.workers=0", "train.batch_size=4", "train.subdivisions=2", "train.steps=2", "train.burn_in=1",
              "train.amp=fp32", "eval.amp=fp32", "eval.every=2", "eval.batch_size=4", "logging.images=0"]


@pytest.mark.parametrize("layout", ["yolo", "voc"])
def test_an_export_trains_and_validates_with_only_data_root(shapes, tmp_path, layout, monkeypatch, capsys):
    monkeypatch.setenv("YOLOV3_DATA_CACHE", str(tmp_path / "cache"))
    root = (roboflow_export if layout == "yolo" else voc_export)(shapes, tmp_path / "data")
    before = snapshot(root)
    data_root = root / "data.yaml" if layout == "yolo" else root  # the yaml itself, or the folder
    result = train_main.main(["--config", str(ROOT / "args.yaml"), *TRAIN_ARGS, f"data.root={data_root}",
                              f"logging.dir={tmp_path / 'logs'}"])
    run = result["run_dir"]
    assert (run / LABELS_FILE).is_file() and Image.open(run / LABELS_FILE).size[0] > 500
    report = (run / REPORT_FILE).read_text()
    train_boxes = len(coco_split(shapes, "train")["annotations"])
    rows = {line[:12].strip(): line[12:].split() for line in report.splitlines()[2:7]}
    assert rows["boxes"] == [str(train_boxes), str(len(coco_split(shapes, "val")["annotations"]))]
    state = load_checkpoint(run / "last.pt")
    names = list(SHAPE_CLASSES) if layout == "yolo" else sorted(SHAPE_CLASSES)
    assert state["class_names"] == names and state["config"]["model"]["num_classes"] == 6
    validation.main(["--weights", str(run / "last.pt"), "--config", str(ROOT / "args.yaml"), "--set",
                     f"data.root={data_root}", "eval.amp=fp32", "data.workers=0", "--img-size", "64", "--per-class"])
    printed = capsys.readouterr().out
    assert all(name in printed for name in names)
    assert snapshot(root) == before


def test_a_set_num_classes_that_differs_from_the_data_names_both(shapes, tmp_path, monkeypatch):
    monkeypatch.setenv("YOLOV3_DATA_CACHE", str(tmp_path / "cache"))
    root = roboflow_export(shapes, tmp_path / "data")
    with pytest.raises(SystemExit, match=r"predicts 5 classes but .* has 6 categories; set --set model.num_classes=6"):
        train_main.main(["--config", str(ROOT / "args.yaml"), *TRAIN_ARGS, f"data.root={root}",
                         "model.num_classes=5", f"logging.dir={tmp_path / 'logs'}"])


def test_detect_names_classes_from_the_checkpoint_without_data(tmp_path):
    names = ["ball", "cup", "car"]
    cfg = load_config(ROOT / "args.yaml", ["model.arch=yolov3-tiny", "model.num_classes=3"])
    weights = tmp_path / "three.pt"
    save_checkpoint({"model": grid_model(num_classes=3, cls=2).state_dict(), "config": config_to_dict(cfg),
                     "class_names": names}, weights)
    image = tmp_path / "in" / "a.jpg"
    image.parent.mkdir()
    Image.new("RGB", (64, 64), (90, 120, 150)).save(image)
    result = detect.main(["--weights", str(weights), "--source", str(image), "--config", str(ROOT / "args.yaml"),
                          "--set", f"data.root={tmp_path / 'no_data'}", "--img-size", "64", "--device", "cpu",
                          "--no-amp", "--out", str(tmp_path / "out")])
    rows = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert result["images"] == 1 and rows and {r["category_id"] for r in rows} == {3}  # class 2 -> id 3 of 1..3
    assert class_table(tmp_path / "none.json", 3, names) == (names, [1, 2, 3])
    assert class_table(tmp_path / "none.json", 80, list(COCO_NAMES)) == (list(COCO_NAMES), list(COCO_CATEGORY_IDS))


# -- dataset report: counts by hand ----------------------------------------------------------------------------------
def small_yolo(root: Path, lines: dict[str, list[str]], yaml_text: str | None = None) -> Path:
    """images/{train,val}/<name>.png (64 x 48) with labels/{train,val}/<name>.txt from `lines` (None: no file)."""
    for key, content in lines.items():
        split, name = key.split("/")
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), (90, 120, 150)).save(root / "images" / split / f"{name}.png")
        if content is not None:
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"{name}.txt").write_text("".join(f"{line}\n" for line in content))
    (root / "data.yaml").write_text(yaml_text or "path: .\ntrain: images/train\nval: images/val\n"
                                    "names: {0: cat, 1: dog}\n")
    return root


def test_dataset_report_counts_by_hand(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLOV3_DATA_CACHE", str(tmp_path / "cache"))
    root = small_yolo(tmp_path / "data", {
        "train/a": ["0 0.5 0.5 0.5 0.5", "1 0.25 0.5 0.25 0.5", "1 0.5 0.5 0.02 0.5"],  # the last 1.28 px wide
        "train/b": ["0 0.0 0.5 0.25 0.5", "0 0.5 0.5 0 0.5"],  # clipped (x -8..8); zero width: dropped
        "train/c": [],  # an empty label file: a background image
        "train/d": None,  # no label file: a background image, counted
        "val/e": ["1 0.5 0.5 0.5 0.5"]})
    cfg = load_config(ROOT / "args.yaml", [f"data.root={root}", "data.img_size=64", "data.min_box_size=2"])
    sets = {split: CocoDetection(*data_paths(cfg.data, split), Preprocess(), 64) for split in ("train", "val")}
    text, image = dataset_report(sets, np.array(DARKNET_ANCHORS["yolov3"]), 64, 2.0, tmp_path / "run")
    lines = text.splitlines()
    table = {line[:12].strip(): line[12:].split() for line in lines[2:7] + lines[8:10]}
    assert table == {"images": ["4", "1"], "boxes": ["4", "1"], "no boxes": ["2", "0"], "< 2 px": ["1", "0"],
                     "crowd": ["0", "0"], "cat": ["2", "0"], "dog": ["2", "1"]}
    assert "train: 1 boxes partly outside the image, clipped to it (kept)" in text
    assert "train: 1 boxes of zero or negative width or height (dropped)" in text
    assert "train: 1 images without a label file (kept, no boxes)" in text
    assert image.ndim == 3 and (tmp_path / "run" / LABELS_FILE).is_file()
    assert (tmp_path / "run" / REPORT_FILE).read_text() == text + "\n"


# -- anchors: recall on boxes built to fit or miss them ---------------------------------------------------------------
def test_anchor_recall_by_hand():
    # yolov3-tiny's heads use anchors 1..5: (23,27) (37,58) (81,82) (135,169) (344,319); anchor 0 (10,14) none
    boxes = np.array([[23, 27], [81, 82], [10, 14], [400, 20]], np.float64)
    # (10,14) vs (23,27): 140 / (140 + 621 - 140) = 0.2254 (it would be 1 with the unused anchor 0): a miss;
    # (400,20) at best vs (81,82): 81*20 / (8000 + 6642 - 1620) = 1620 / 13022 = 0.1244: a miss
    fit = anchor_fit(boxes, np.array(DARKNET_ANCHORS["yolov3-tiny"]), "yolov3-tiny")
    assert fit.recall == 0.5 and fit.boxes == 4
    assert fit.mean_iou == pytest.approx((1 + 1 + 140 / 621 + 1620 / 13022) / 4, abs=1e-12)
    # yolov3 uses all 9: (10,13) is anchor 0; (400,20) at best vs (116,90): 2320 / (8000 + 10440 - 2320) = 0.1439
    fit = anchor_fit(np.array([[10, 13], [400, 20]], np.float64), np.array(DARKNET_ANCHORS["yolov3"]), "yolov3")
    assert fit.recall == 0.5 and fit.mean_iou == pytest.approx((1 + 2320 / 16120) / 2, abs=1e-12)


def test_auto_anchors_refit_only_when_recall_is_low():
    darknet = np.array(DARKNET_ANCHORS["yolov3-tiny"], np.float64)
    fitting = np.repeat(darknet[1:], 20, axis=0)  # every box exactly a used anchor: recall 1
    assert check_anchors(fitting, "yolov3-tiny", "auto") == darknet.tolist()  # kept, as a list for the checkpoint
    assert check_anchors(fitting, "yolov3-tiny", None) is None  # not auto: only printed
    rng = np.random.default_rng(0)
    flat = np.stack([rng.uniform(300, 500, 200), rng.uniform(8, 12, 200)], 1)  # wide, flat boxes: no anchor fits
    assert anchor_fit(flat, darknet, "yolov3-tiny").recall < AUTO_RECALL
    new = np.array(check_anchors(flat, "yolov3-tiny", "auto"))
    assert new[0].tolist() == darknet[0].tolist()  # no head uses anchor 0: kept
    assert (np.diff(new[1:].prod(1)) >= 0).all()  # ascending area: the stride-16 head gets the small ones
    after = anchor_fit(flat, new, "yolov3-tiny")
    assert after.recall == 1.0 and after.mean_iou > 0.6


# -- bad input: a clear error naming the file (and line), or a counted skip -----------------------------------------
def test_yolo_label_path_follows_ultralytics_rule():
    assert yolo_label_path(Path("/d/images/x/images/train/a.b.jpg")) == Path("/d/images/x/labels/train/a.b.txt")
    assert yolo_label_path(Path("/d/pics/a.png")) == Path("/d/pics/a.txt")


YAML_CASES = {
    "missing": (None, r"data\.yaml: data\.yaml not found|no 'train'"),
    "not yaml": ("train: [a\nval: b\n", r"data\.yaml: not readable YAML"),
    "a list": ("- a\n- b\n", r"data\.yaml: expected a mapping with train, val and names keys, found list"),
    "no val": ("train: images/train\nnames: [cat, dog]\n", r"data\.yaml: no 'val' key; expected val: an image folder"),
    "missing split folder": ("train: images/train\nval: images/valid\nnames: [cat, dog]\n",
                             r"data\.yaml: val: 'images/valid' -> .*images/valid does not exist"),
    "nc mismatch": ("train: images/train\nval: images/val\nnc: 3\nnames: [cat, dog]\n",
                    r"data\.yaml: nc is 3 but names holds 2 classes"),
    "names dict with a gap": ("train: images/train\nval: images/val\nnames: {0: cat, 2: dog}\n",
                              r"data\.yaml: names has keys \[0, 2\]; expected the class indices 0\.\.1"),
    "list file naming an absent image": ("train: train.txt\nval: images/val\nnames: [cat, dog]\n",
                                         r"train\.txt: line 2: 'images/train/zz\.png' is not a file"),
}


@pytest.mark.parametrize("case", YAML_CASES)
def test_bad_data_yaml(case, tmp_path, monkeypatch):
    monkeypatch.setenv("YOLOV3_DATA_CACHE", str(tmp_path / "cache"))
    text, message = YAML_CASES[case]
    root = small_yolo(tmp_path / "data", {"train/a": ["0 0.5 0.5 0.5 0.5"], "val/b": ["1 0.5 0.5 0.5 0.5"]}, text)
    (root / "train.txt").write_text("images/train/a.png\nimages/train/zz.png\n")
    if text is None:
        (root / "data.yaml").unlink()
        with pytest.raises(LabelError, match=r"data\.yaml not found"):
            prepare_data(root / "data.yaml")
        return
    with pytest.raises(LabelError, match=message):
        prepare_data(root)


LABEL_CASES = {  # label lines of train/a -> the error, and the counts with skip_bad
    "class out of range": (["0 0.5 0.5 0.5 0.5", "2 0.5 0.5 0.2 0.2"],
                           r"a\.txt: line 2: class 2 is out of range; the names hold 2 classes, so expected 0\.\.1"),
    "pixel coordinates": (["0 32 24 16 16"], r"a\.txt: line 1: '0 32 24 16 16' has a coordinate outside 0\.\.1"),
    "four values": (["0 0.5 0.5 0.5"], r"a\.txt: line 1: 4 values '0 0\.5 0\.5 0\.5'; expected 5"),
}


@pytest.mark.parametrize("case", LABEL_CASES)
def test_bad_label_line_names_file_and_line_or_is_a_counted_skip(case, tmp_path, monkeypatch):
    monkeypatch.setenv("YOLOV3_DATA_CACHE", str(tmp_path / "cache"))
    lines, message = LABEL_CASES[case]
    root = small_yolo(tmp_path / "data", {"train/a": lines, "train/c": ["1 0.5 0.5 0.5 0.5"],
                                          "val/b": ["1 0.5 0.5 0.5 0.5"]})
    with pytest.raises(LabelError, match=message):
        prepare_data(root)
    counts = json.loads(prepare_data(root, skip_bad=True).splits["train"][1].read_text())["info"]["counts"]
    assert counts["bad_lines"] == 1 and counts["images"] == 2


def test_a_split_without_any_label_file_says_where_labels_were_expected(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLOV3_DATA_CACHE", str(tmp_path / "cache"))
    root = small_yolo(tmp_path / "data", {"train/a": None, "train/c": None, "val/b": ["1 0.5 0.5 0.5 0.5"]})
    with pytest.raises(LabelError, match=r"train: no label file for any of its 2 images; expected YOLO .txt labels "
                                         r"where Ultralytics' rule puts them .* e\.g\. .*/labels/train/a\.txt"):
        prepare_data(root)


def test_voc_list_naming_an_absent_image_or_a_missing_split(shapes, tmp_path, monkeypatch):
    monkeypatch.setenv("YOLOV3_DATA_CACHE", str(tmp_path / "cache"))
    root = voc_export(shapes, tmp_path / "voc")
    val_list = root / "ImageSets" / "Main" / "val.txt"
    val_list.write_text(val_list.read_text() + "nothere\n")
    with pytest.raises(LabelError, match=r"val\.txt: line 5: image id 'nothere' has no file JPEGImages/nothere\.jpg"):
        prepare_data(root)
    counts = json.loads(prepare_data(root, skip_bad=True).splits["val"][1].read_text())["info"]["counts"]
    assert counts["bad_files"] == 1 and counts["images"] == 4
    val_list.unlink()
    with pytest.raises(LabelError, match=r"val\.txt: not found; a VOC folder needs ImageSets/Main/train\.txt and "
                                         r"val\.txt"):
        prepare_data(root)
