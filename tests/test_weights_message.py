"""A Darknet .weights file that fits no model says so once, naming what was tried (issue 21, item 6).

The files are written in Darknet's format by test_darknet_weights.write_weights, their sizes counted from Darknet's
own cfg files (conftest.darknet_float_count), not from our models."""
import argparse
from pathlib import Path

import pytest
import torch
from conftest import darknet_float_count
from test_darknet_weights import random_floats, state, write_weights

import main as train_main
from datasets.coco_names import COCO_NAMES
from models import build_model
from models.transfer import start_from
from utils.config_load import load_config

ROOT = Path(__file__).resolve().parents[1]


def sizes(cfg_convs, num_classes):
    """Float32 values of yolov3-tiny with `num_classes`, its conv.15 prefix (9 convs), yolov3 with 80 classes and
    darknet53.conv.74 (52 convs), from the cfg files (whose output convs have 255 = 3 x (5 + 80) filters)."""
    tiny = [dict(c, filters=3 * (5 + num_classes)) if c["filters"] == 255 else c for c in cfg_convs["yolov3-tiny"]]
    return (darknet_float_count(tiny), darknet_float_count(tiny[:9]), darknet_float_count(cfg_convs["yolov3"]),
            darknet_float_count(cfg_convs["yolov3"][:52]))


@pytest.fixture
def truncated(cfg_convs, tmp_path):
    """A yolov3-tiny.weights cut after 9/16 of its values, as an interrupted download leaves it."""
    n = darknet_float_count(cfg_convs["yolov3-tiny"])
    return write_weights(tmp_path / "yolov3-tiny.weights", random_floats(n)[:n * 9 // 16])


def test_truncated_file_says_so_once(truncated, cfg_convs):
    full80, prefix, yolov3, darknet53 = sizes(cfg_convs, 80)
    full3 = sizes(cfg_convs, 3)[0]
    model = build_model("yolov3-tiny", num_classes=3)
    before = state(model)
    with pytest.raises(ValueError) as err:
        start_from(model, truncated, ["a", "b", "c"], COCO_NAMES)
    assert str(err.value) == (
        f"{truncated}: its {full80 * 9 // 16:,} float32 weights fit no Darknet file this config can start from. "
        f"Tried, with the float32 weights each holds: yolov3-tiny with COCO's 80 classes {full80:,}, with this "
        f"config's 3 classes {full3:,}, its backbone yolov3-tiny.conv.15 {prefix:,}; another architecture: yolov3 "
        f"with COCO's 80 classes {yolov3:,}, its backbone darknet53.conv.74 {darknet53:,}. The file is smaller than "
        "all of them: truncated (an interrupted download or copy?)")
    assert all(torch.equal(v, state(model)[k]) for k, v in before.items())


def test_main_prints_it_once(truncated):
    """Through main.py's --weights: one `error:` line holding the one message."""
    cfg = load_config(ROOT / "args.yaml", ["model.arch=yolov3-tiny", "model.num_classes=3"])
    with pytest.raises(SystemExit) as err:
        train_main.build_start_model(cfg, argparse.Namespace(weights=str(truncated)), False, 1, ["a", "b", "c"])
    message = str(err.value)
    assert message.startswith(f"error: --weights: {truncated}: its ") and message.count(str(truncated)) == 1
    assert message.count("fit no Darknet file") == 1 and "\n" not in message


def test_file_of_another_model_and_a_broken_file(cfg_convs, tmp_path):
    n = darknet_float_count(cfg_convs["yolov3-tiny"])
    longer = write_weights(tmp_path / "longer.weights", random_floats(n + 1000))
    with pytest.raises(ValueError, match=r"fit no Darknet file .* Is it the file of another model \(model.arch, "
                       r"model.num_classes\), or damaged\?$"):
        start_from(build_model("yolov3-tiny", num_classes=3), longer, ["a", "b", "c"], COCO_NAMES)
    odd = write_weights(tmp_path / "odd.weights", random_floats(100))
    with open(odd, "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(ValueError) as err:  # a fault of the file itself: said once, not once per class count
        start_from(build_model("yolov3-tiny", num_classes=3), odd, ["a", "b", "c"], COCO_NAMES)
    assert str(err.value) == f"{odd}: 402 bytes after the header is not a whole number of float32 values"


def test_own_class_count_without_coco_names(truncated, cfg_convs):
    """Without Darknet's class names (bench/grad_norms.py), only this config's class count is tried and named."""
    with pytest.raises(ValueError) as err:
        start_from(build_model("yolov3-tiny", num_classes=3), truncated, ["a", "b", "c"])
    assert f"yolov3-tiny with this config's 3 classes {sizes(cfg_convs, 3)[0]:,}, its backbone" in str(err.value)
    assert "COCO's" not in str(err.value) and "yolov3 with this config's 3 classes" in str(err.value)
