"""validation.py end to end on the COCO fixture, with a checkpoint and with a Darknet .weights file."""
import json
import os
import pickle
import shutil

import pytest
import torch
from conftest import DATA

import validation
from models import build_model, forms
from models.packed import pack_conv_weights, packing_available
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from utils.config_load import config_to_dict, load_config

ROOT = DATA.parent.parent
DATA_ARGS = ["--config", str(ROOT / "args.yaml"), "--set", f"data.root={DATA / 'coco'}", "data.workers=0",
             "eval.batch_size=2"]


def tiny_checkpoint(path, num_classes=80):
    cfg = load_config(ROOT / "args.yaml", ["model.arch=yolov3-tiny", f"model.num_classes={num_classes}"])
    torch.manual_seed(0)
    model = build_model("yolov3-tiny", num_classes=num_classes)
    save_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg), "step": 0}, path)
    return model


def test_checkpoint_table_thresholds_json(tmp_path, capsys):
    weights = tmp_path / "run" / "last.pt"
    weights.parent.mkdir()
    tiny_checkpoint(weights)
    validation.main(["--weights", str(weights), *DATA_ARGS, "--img-size", "128", "--subset", "4",
                     "--conf", "0.00005", "0.3", "--per-class", "--save-json"])  # untrained scores ~1e-4
    out = capsys.readouterr().out
    assert out.count("Average Precision") == 6 and out.count("Average Recall") == 6
    assert "yolov3-tiny/darknet53 @ 128 | 4 images | conf 5e-05 | AP " in out
    assert "\n   5e-05 " in out and "\n     0.3 " in out  # one table row per threshold
    assert "toothbrush" in out  # per-class table lists every class
    metrics = json.loads((weights.parent / "last_val128.json").read_text())
    assert set(metrics["stats"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs",
                                     "ARm", "ARl"}
    assert metrics["images"] == 4 and metrics["config"]["model"]["arch"] == "yolov3-tiny"
    detections = json.loads((weights.parent / "last_val128_detections.json").read_text())
    assert 0 < len(detections) <= 4 * 100
    assert {d["image_id"] for d in detections} <= {6818, 58636, 226111, 252219, 303818, 397133, 456496, 565778}
    from datasets.coco import CocoDetection  # the results load with the COCO API against the annotations
    from datasets.transforms import Preprocess
    gt = CocoDetection(DATA / "coco/images/val2017", DATA / "coco/annotations/instances_val2017.json",
                       Preprocess(), 128).coco
    assert len(gt.loadRes(str(weights.parent / "last_val128_detections.json")).anns) == len(detections)


def test_darknet_weights_file(tmp_path, capsys):
    weights = tmp_path / "yolov3-tiny.weights"
    torch.manual_seed(0)
    build_model("yolov3-tiny").save_darknet_weights(weights)
    validation.main(["--weights", str(weights), *DATA_ARGS, "model.arch=yolov3-tiny", "--img-size", "96",
                     "--subset", "2", "--out", str(tmp_path / "results")])
    assert "yolov3-tiny/darknet53 @ 96 | 2 images" in capsys.readouterr().out
    assert (tmp_path / "results" / "yolov3-tiny_val96.json").is_file()


def test_errors_are_one_line(tmp_path):
    weights = tmp_path / "six.pt"
    tiny_checkpoint(weights, num_classes=6)
    with pytest.raises(SystemExit, match=r"predicts 6 classes but .*instances_val2017.json has 80 categories"):
        validation.main(["--weights", str(weights), *DATA_ARGS])
    with pytest.raises(SystemExit, match=r"config error: --set: data.img_size=100: must be a positive multiple"):
        validation.main(["--weights", str(weights), *DATA_ARGS, "--img-size", "100"])
    with pytest.raises(SystemExit, match=r"--conf 1.5: thresholds must be in \[0, 1\)"):
        validation.main(["--weights", str(weights), *DATA_ARGS, "--conf", "0.1", "1.5"])
    with pytest.raises(SystemExit, match="checkpoint not found: .*nothere.pt"):
        validation.main(["--weights", str(tmp_path / "nothere.pt"), *DATA_ARGS])


class Exploit:
    def __reduce__(self):
        return (print, ("this ran while unpickling",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match="evil.pt: refused to load"):
        load_checkpoint(path)
    assert "this ran" not in capsys.readouterr().out
    path.write_bytes(pickle.dumps({"model": Exploit()}))
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "config": {}}, path)
    assert load_checkpoint(path)["model"]["w"].tolist() == [1.0, 1.0]
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    with pytest.raises(Exception):  # noqa: B017 (torch raises its own error type for an unpicklable object)
        save_checkpoint({"model": {}, "config": {}, "bad": lambda: 0}, path)
    assert load_checkpoint(path)["model"]["w"].tolist() == [1.0, 1.0]  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # and no temporary file is left


@pytest.mark.slow
def test_packed_and_compiled_models_give_the_same_detections(tmp_path, monkeypatch):
    """fp32 forms: --pack (the conv weights packed, models/packed.py), --no-pack and --compile (where a C++ compiler
    is at hand) give the same detections (bf16 against fp32: tests/test_forms.py)."""
    weights = tmp_path / "last.pt"
    tiny_checkpoint(weights)
    packed_counts = []

    def counting_pack(*args):
        packed_counts.append(pack_conv_weights(*args))
        return packed_counts[-1]
    monkeypatch.setattr(forms, "pack_conv_weights", counting_pack)
    variants = [("unpacked", ["--no-amp", "--no-pack"])]
    if packing_available():
        variants.append(("packed", ["--no-amp", "--pack"]))
    if shutil.which(os.environ.get("CXX") or "g++"):
        variants.append(("compiled", ["--no-amp", "--compile"]))
    results = {}
    for name, extra in variants:
        validation.main(["--weights", str(weights), *DATA_ARGS, "--img-size", "64", "--subset", "4", "--conf",
                         "0.00005", "--save-json", "--out", str(tmp_path / name), *extra])
        results[name] = json.loads((tmp_path / name / "last_val64_detections.json").read_text())
    assert packed_counts == ([13] if packing_available() else [])  # yolov3-tiny's 13 convs, by --pack only
    plain = results.pop("unpacked")
    assert len(plain) > 0
    for other in results.values():
        assert [(d["image_id"], d["category_id"]) for d in plain] == [(d["image_id"], d["category_id"]) for d in other]
        assert max(abs(a - b) for p, c in zip(plain, other, strict=True)
                   for a, b in zip(p["bbox"], c["bbox"], strict=True)) < 1e-3


def test_compile_without_a_cpp_compiler_says_what_to_install(tmp_path, monkeypatch):
    weights = tmp_path / "last.pt"
    tiny_checkpoint(weights)
    monkeypatch.setenv("CXX", "no-such-compiler++")
    with pytest.raises(SystemExit, match=r"error: --compile: torch.compile needs a C\+\+ compiler: "
                                         r"'no-such-compiler\+\+' .* is not on the PATH; install one"):
        validation.main(["--weights", str(weights), *DATA_ARGS, "--img-size", "64", "--subset", "2",
                         "--out", str(tmp_path / "out"), "--compile"])
    assert not (tmp_path / "out").exists()  # stopped before evaluating: nothing half-written
