"""detect.py: folders with unreadable files, COCO JSON that pycocotools loads, YOLO labels at known positions,
videos; and the input discovery it relies on."""
import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import DATA, grid_model
from pycocotools.coco import COCO

import detect
from datasets.coco import DatasetError, class_table
from datasets.sources import Source, find_sources, glob_root
from models.packed import packing_available
from utils.checkpoint import save_checkpoint
from utils.cli import device_to_gpu
from utils.config import ConfigError
from utils.config_load import config_to_dict, load_config

ROOT = DATA.parent.parent
VAL = DATA / "coco" / "images" / "val2017"
ANNOTATIONS = DATA / "coco" / "annotations" / "instances_val2017.json"
# fp32 (--no-amp): these tests check geometry to 1e-5; the forms are compared in tests/test_forms.py
ARGS = ["--config", str(ROOT / "args.yaml"), "--set", f"data.root={DATA / 'coco'}", "--img-size", "64",
        "--device", "cpu", "--no-amp"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The grid model (class 2, COCO's car, category id 3) as a checkpoint."""
    path = tmp_path_factory.mktemp("weights") / "grid.pt"
    cfg = load_config(ROOT / "args.yaml", ["model.arch=yolov3-tiny"])
    save_checkpoint({"model": grid_model(cls=2).state_dict(), "config": config_to_dict(cfg)}, path)
    return path


def test_folder_with_corrupt_and_non_image_files(tmp_path, weights, capsys):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(VAL / "000000006818.jpg", folder / "sub" / "000000006818.jpg")  # 427 x 640, in the annotations
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)  # a JPEG header, then noise
    (folder / "page.png").write_text("<html>404 Not Found</html>")  # not an image, under an image's name
    (folder / "notes.txt").write_text("not an input")  # left out of a folder by its extension
    out = tmp_path / "out"
    with pytest.warns(UserWarning) as caught:
        result = detect.main(["--weights", str(weights), "--source", str(folder), *ARGS, "--out", str(out)])
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(messages) == 2 and "corrupt.jpg: cannot be decoded" in messages[0] and "page.png" in messages[1]
    assert result["skipped"] == [str(folder / "corrupt.jpg"), str(folder / "page.png")]
    assert result["ignored"] == [str(folder / "notes.txt")] and result["images"] == 1
    printed = capsys.readouterr().out
    assert f"skipped 2 unreadable file(s): {folder / 'corrupt.jpg'}, {folder / 'page.png'}" in printed
    assert f"wrote {out / 'detections.json'}" in printed
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "detections.json", "sub/000000006818.jpg"]
    assert cv2.imread(str(out / "sub" / "000000006818.jpg")).shape == (640, 427, 3)

    rows = json.loads((out / "detections.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = COCO(str(ANNOTATIONS)).loadRes(str(out / "detections.json"))
    assert len(loaded.anns) == len(rows) > 0
    assert {r["image_id"] for r in rows} == {6818} and {r["category_id"] for r in rows} == {3}
    assert {r["file_name"] for r in rows} == {"sub/000000006818.jpg"}
    boxes = np.array([r["bbox"] for r in rows])  # x, y, w, h inside the 427 x 640 image
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 427).all()
    assert (boxes[:, 1] + boxes[:, 3] <= 640).all()


def test_yolo_labels_are_at_the_known_boxes(tmp_path, weights, capsys):
    image = tmp_path / "wide.png"  # 256 x 192 -> letterboxed to 64 at scale 0.25, 8 px of grey above and below
    cv2.imwrite(str(image), np.zeros((192, 256, 3), np.uint8))
    out = tmp_path / "out"
    detect.main(["--weights", str(weights), "--source", str(image), *ARGS, "--format", "txt", "--no-draw",
                 "--out", str(out)])
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["labels/wide.txt"]
    labels = np.loadtxt(out / "labels" / "wide.txt", ndmin=2)  # class cx cy w h score
    # the 2 x 2 cells of the 64 px input hold 16 px boxes centred at x, y = 16 or 48; in the original image
    # x = input x / 0.25 (centres 64 and 192, width 64) and y = (input y - 8) / 0.25 (centres 32 and 160, height 64)
    expected = [[2, cx / 256, cy / 192, 64 / 256, 64 / 192, 1.0] for cx in (64, 192) for cy in (32, 160)]
    np.testing.assert_allclose(labels[np.lexsort((labels[:, 2], labels[:, 1]))], expected, atol=1e-5)
    assert "wrote 1 YOLO label files" in capsys.readouterr().out


def test_video_frames(tmp_path, weights):
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"mp4v"), 10, (96, 64))
    for k in range(3):
        writer.write(np.full((64, 96, 3), 60 * k, np.uint8))
    writer.release()
    out = tmp_path / "out"
    result = detect.main(["--weights", str(weights), "--source", str(video), *ARGS, "--batch-size", "2",
                          "--out", str(out)])
    assert result["frames"] == 3 and result["videos"] == 1 and result["images"] == 0
    capture = cv2.VideoCapture(str(out / "clip.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 3 and int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)) == 96
    rows = json.loads((out / "detections.json").read_text())
    assert {(r["image_id"], r["frame"]) for r in rows} == {(0, 0), (1, 1), (2, 2)}


def test_errors_name_the_input(tmp_path, weights):
    with pytest.raises(SystemExit, match=r"--source '.*nothere': no such file or folder"):
        detect.main(["--weights", str(weights), "--source", str(tmp_path / "nothere"), *ARGS])
    with pytest.raises(SystemExit, match=r"matches no file"):
        detect.main(["--weights", str(weights), "--source", str(tmp_path / "*.jpg"), *ARGS])
    shutil.copy(VAL / "000000006818.jpg", tmp_path / "a.jpg")
    with pytest.raises(SystemExit, match=r"--out .* would overwrite the input .*a.jpg"):
        detect.main(["--weights", str(weights), "--source", str(tmp_path / "a.jpg"), *ARGS, "--out", str(tmp_path)])


def test_find_sources_names_relative_to_folder_and_glob_root(tmp_path):
    for name in ("a/1.jpg", "b/1.JPG", "b/clip.MP4", "b/x.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    sources, ignored = find_sources([str(tmp_path)])
    assert [s.name.as_posix() for s in sources] == ["a/1.jpg", "b/1.JPG", "b/clip.MP4"]
    assert ignored == [tmp_path / "b" / "x.txt"] and sources[2].is_video and not sources[0].is_video
    sources, _ = find_sources([str(tmp_path / "*" / "1.*")])
    assert [s.name.as_posix() for s in sources] == ["a/1.jpg", "b/1.JPG"]
    assert glob_root("data/*/x*.jpg").as_posix() == "data" and glob_root("*.png").as_posix() == "."
    with pytest.raises(ValueError, match=r"a/1.jpg lies outside the folder its glob pattern starts from"):
        find_sources([str(tmp_path / "*" / ".." / "a" / "1.jpg")])
    with pytest.raises(ValueError, match=r"a/1.jpg and .*c/1.jpg would both be written as 1.jpg"):
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "1.jpg").write_bytes(b"")
        find_sources([str(tmp_path / "a" / "1.jpg"), str(tmp_path / "c" / "1.jpg")])


def test_image_ids_numbers_or_above_them():
    sources = [Source(Path(name), Path(name)) for name in ("7.jpg", "x/7.jpg", "cat.jpg")]
    ids = detect.ImageIds(sources)
    frames = [detect.Frame(s, None, np.zeros((1, 1, 3), np.uint8)) for s in sources]
    assert [ids(f) for f in frames] == [7, 8, 9]  # the second 7 is taken: it and cat.jpg get 8, 9


def test_class_table_and_device_option(tmp_path):
    names, ids = class_table(ANNOTATIONS, 80)
    assert names[2] == "car" and ids[2] == 3 and ids[-1] == 90
    assert class_table(tmp_path / "none.json", 80)[0] == names  # COCO's own when the file is missing
    with pytest.raises(DatasetError, match=r"instances_val2017.json has 80 categories but the model predicts 6"):
        class_table(ANNOTATIONS, 6)
    with pytest.raises(DatasetError, match=r"none.json does not exist"):
        class_table(tmp_path / "none.json", 6)
    assert [device_to_gpu(d) for d in ("cpu", "cuda", "cuda:1", "2", " CUDA:0 ")] == [-1, 0, 1, 2, 0]
    with pytest.raises(ConfigError, match="--device 'mps'"):
        device_to_gpu("mps")
    with pytest.raises(ConfigError, match=r"detect.conf_threshold=1.5: must be in \[0, 1\)"):
        load_config(ROOT / "args.yaml", ["detect.conf_threshold=1.5"])


@pytest.mark.slow
def test_packed_and_compiled_models_give_the_same_detections(tmp_path, weights):
    """fp32 forms (ARGS has --no-amp): --no-pack, --pack (conv weights packed on a CPU) and --compile (where a C++
    compiler is at hand) give the same detections."""
    variants = [("unpacked", ["--no-pack"])] + ([("packed", ["--pack"])] if packing_available() else [])
    if shutil.which(os.environ.get("CXX") or "g++"):
        variants.append(("compiled", ["--compile"]))
    rows = {}
    for name, extra in variants:
        detect.main(["--weights", str(weights), "--source", str(VAL), *ARGS, "--batch-size", "4", "--no-draw",
                     "--out", str(tmp_path / name), *extra])
        rows[name] = json.loads((tmp_path / name / "detections.json").read_text())
    plain = rows.pop("unpacked")
    assert len(plain) > 0
    for other in rows.values():
        assert [(r["file_name"], r["category_id"]) for r in plain] == [(r["file_name"], r["category_id"])
                                                                       for r in other]
        assert max(abs(a - b) for p, c in zip(plain, other, strict=True)
                   for a, b in zip(p["bbox"], c["bbox"], strict=True)) < 1e-3


def test_compile_without_a_cpp_compiler_says_what_to_install(tmp_path, weights, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler++")
    with pytest.raises(SystemExit, match=r"error: --compile: torch.compile needs a C\+\+ compiler: "
                                         r"'no-such-compiler\+\+'"):
        detect.main(["--weights", str(weights), "--source", str(VAL), *ARGS, "--out", str(tmp_path / "out"),
                     "--compile"])
    assert not (tmp_path / "out").exists()
