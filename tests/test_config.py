"""Tests for utils.config: loading, overrides, validation messages, saving, devices."""

import argparse
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import BaseModel, Field, model_validator

from utils.cli import add_config_args, config_from_args, parse_cli, select_device
from utils.config import Config, ConfigError, DataConfig, ModelConfig, Section, fail
from utils.config_load import build_config, config_from_dict, config_to_dict, load_config, save_config, yaml_load

TINY_ANCHORS = [[10, 14], [23, 27], [37, 58], [81, 82], [135, 169], [344, 319]]


def write(tmp_path, text, name="args.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text", ["", "# only a comment\n", "model:\ndata:\n"])
def test_empty_file_or_groups_give_defaults(tmp_path, text):
    cfg = load_config(write(tmp_path, text))
    assert cfg == Config(model=ModelConfig(), data=DataConfig())
    assert cfg.model.arch == "yolov3"
    assert cfg.model.encoder == "darknet53"
    assert cfg.model.num_classes is None  # the data's class count, resolved by main.py
    assert cfg.model.anchors is None
    assert cfg.model.pretrained is False
    assert cfg.model.pretrained_path is None
    assert cfg.data.img_size == 416


def test_file_values_are_loaded(tmp_path):
    path = write(tmp_path, f"""
model:
  arch: yolov3-tiny
  num_classes: 3
  anchors: {TINY_ANCHORS}
data:
  img_size: 320
""")
    cfg = load_config(path)
    assert cfg.model == ModelConfig(arch="yolov3-tiny", num_classes=3, anchors=TINY_ANCHORS)
    assert cfg.data.img_size == 320


def test_set_overrides_file_values(tmp_path):
    weights = write(tmp_path, "", name="enc.pth")
    path = write(tmp_path, f"model:\n  pretrained: true\n  pretrained_path: {weights}\n  num_classes: 3\n")
    cfg = load_config(path, [
        "model.arch=yolov3-tiny",
        f"model.anchors={TINY_ANCHORS}",
        "model.pretrained=false",
        "model.pretrained_path=null",
        "data.img_size=320",
    ])
    assert cfg.model == ModelConfig(arch="yolov3-tiny", num_classes=3, anchors=TINY_ANCHORS)
    assert cfg.data.img_size == 320


def test_pretrained_darknet53_needs_a_path(tmp_path):
    with pytest.raises(ConfigError, match=r"args.yaml: model.pretrained_path=None: .*darknet53.conv.74"):
        load_config(write(tmp_path, ""), ["model.pretrained=true"])


def test_later_override_wins(tmp_path):
    cfg = load_config(write(tmp_path, ""), ["data.img_size=320", "data.img_size=608"])
    assert cfg.data.img_size == 608


def test_config_from_dict_applies_overrides_without_changing_input():
    d = {"model": {"num_classes": 5}}
    cfg = config_from_dict(d, "ckpt.pt", ["model.num_classes=7"])
    assert cfg.model.num_classes == 7
    assert d == {"model": {"num_classes": 5}}


@pytest.mark.parametrize("text, expected", [
    ("1e-3", 0.001), ("1E5", 100000.0), ("-2.5e-4", -0.00025), ("+3e2", 300.0),
    ("1.0e5", 100000.0), ("2.e1", 20.0), (".5e2", 50.0), ("1.5", 1.5),
])
def test_loader_reads_exponent_notation_as_float(text, expected):
    value = yaml_load(f"lr: {text}")["lr"]
    assert type(value) is float
    assert value == expected


@pytest.mark.parametrize("text, expected", [("123", 123), ("1e", "1e"), ("e5", "e5"), ("abc", "abc")])
def test_loader_leaves_non_floats_alone(text, expected):
    value = yaml_load(text)
    assert type(value) is type(expected)
    assert value == expected


class _ToyTrain(Section):
    lr: float = 0.1
    sizes: list[int] | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.lr <= 0:
            fail("lr", self.lr, "must be positive")
        return self


class _Toy(BaseModel):
    train: _ToyTrain = Field(default_factory=_ToyTrain)


def build_toy(text, from_set=False):
    """The toy's train section from `key: value` text, written in toy.yaml or given as --set train.key=value."""
    if from_set:
        return build_config(_Toy, {}, "toy.yaml", [f"train.{text.replace(': ', '=', 1)}"]).train
    return build_config(_Toy, {"train": yaml_load(text)}, "toy.yaml").train


def test_generic_checker_float_field():
    assert build_toy("lr: 1e-3").lr == 0.001
    toy = build_toy("lr: 2")
    assert type(toy.lr) is float
    assert toy.lr == 2.0
    assert build_toy("sizes: [320, 416]").sizes == [320, 416]


@pytest.mark.parametrize("text, parts", [
    ("lr: true", ["train.lr=True", "expected float"]),
    ("lr: fast", ["train.lr='fast'", "expected float"]),
    ("sizes: [320, 416.5]", ["train.sizes=[320, 416.5]", "expected list[int] or null"]),
    ("sizes: 320", ["train.sizes=320", "expected list[int] or null"]),
    ("lr: -1e-3", ["train.lr=-0.001", "must be positive"]),
])
def test_generic_checker_errors(text, parts):
    with pytest.raises(ConfigError) as e:
        build_toy(text)
    assert str(e.value).startswith("toy.yaml: ")
    for part in parts:
        assert part in str(e.value)


def test_generic_checker_names_set_for_overridden_key():
    with pytest.raises(ConfigError, match=r"^--set: train\.lr=True"):
        build_toy("lr: true", from_set=True)


def test_set_is_repeatable_and_extends():
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    args = parser.parse_args(["--set", "a.b=1", "c.d=2", "--set", "e.f=3"])
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=3"]
    assert args.config == "args.yaml"
    assert args.gpu is None
    assert parser.parse_args([]).overrides == []
    assert parser.parse_args(["--gpu", "-1"]).gpu == -1


def test_config_from_args(tmp_path):
    path = write(tmp_path, "data:\n  img_size: 320\n")
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    cfg = config_from_args(parser.parse_args(["--config", str(path), "--set", "model.num_classes=2"]))
    assert cfg.data.img_size == 320
    assert cfg.model.num_classes == 2


MISSING = "/nonexistent/encoder.pth"

BAD_FILES = [
    # (file text, parts the message must contain besides the file name)
    ("model:\n  num_clases: 3\n",
     ["model.num_clases=3", "did you mean 'num_classes'?", "arch, encoder, num_classes"]),
    ("modle:\n  arch: yolov3\n", ["modle=", "did you mean 'model'?", "model, data"]),
    ("model:\n  num_classes: ten\n", ["model.num_classes='ten'", "expected int"]),
    ("model:\n  num_classes: true\n", ["model.num_classes=True", "expected int"]),
    ("data:\n  img_size: 416.5\n", ["data.img_size=416.5", "expected int"]),
    ("data:\n  img_size: 416.0\n", ["data.img_size=416.0", "expected int"]),
    ("model:\n  num_classes: 0\n", ["model.num_classes=0", "at least 1"]),
    ("data:\n  img_size: 100\n", ["data.img_size=100", "multiple of 32", "use 96 or 128"]),
    ("data:\n  img_size: 0\n", ["data.img_size=0", "use 32"]),
    (f"model:\n  anchors: {[[10, 13]] * 8}\n", ["model.anchors=[[10, 13]", "expected 9", "yolov3", "found 8"]),
    (f"model:\n  arch: yolov3-tiny\n  anchors: {[[10, 13]] * 9}\n", ["model.anchors=", "expected 6", "found 9"]),
    (f"model:\n  anchors: {[[10, 13]] * 8 + [[-10, 13]]}\n", ["model.anchors=", "[-10, 13]", "positive"]),
    (f"model:\n  anchors: {[[10, 13]] * 8 + [[10, 13, 5]]}\n", ["model.anchors=", "[10, 13, 5]", "[w, h]"]),
    ("model:\n  anchors: [[10, a]]\n",
     ["model.anchors=[[10, 'a']]", "expected list[list[int or float]] or one of 'auto' or null"]),
    ("model:\n  anchors: autp\n", ["model.anchors='autp'", "one of 'auto' or null"]),
    ("model:\n  arch: yolov5\n", ["model.arch='yolov5'", "'yolov3', 'yolov3-tiny'"]),
    ("model:\n  encoder: resnet50\n", ["model.encoder='resnet50'", "'darknet53', 'mobilenet_v3_large'"]),
    ("model:\n  arch: yolov3-tiny\n  encoder: mobilenet_v3_small\n",
     ["model.encoder='mobilenet_v3_small'", "yolov3-tiny", "'darknet53'"]),
    (f"model:\n  pretrained: true\n  pretrained_path: {MISSING}\n",
     [f"model.pretrained_path='{MISSING}'", "no such file"]),
    ("model: 3\n", ["model=3", "expected a mapping of model keys"]),
    ("data: [320]\n", ["data=[320]", "expected a mapping of data keys (root, train_images"]),
    ("- model\n- data\n", ["['model', 'data']", "expected a mapping of groups"]),
]


@pytest.mark.parametrize("text, parts", BAD_FILES)
def test_bad_file_values_raise_with_file_key_and_value(tmp_path, text, parts):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ")
    for part in parts:
        assert part in message


@pytest.mark.parametrize("override, parts", [
    ("data.img_sise=320", ["data.img_sise=320", "did you mean 'img_size'?", "valid data keys: root, train_images"]),
    ("modle.arch=yolov3", ["modle.arch='yolov3'", "did you mean 'model'?"]),
    ("data.img_size=abc", ["data.img_size='abc'", "expected int"]),
    ("data.img_size=1e3", ["data.img_size=1000.0", "expected int"]),
    ("model.anchors=[[10,13]]", ["model.anchors=[[10, 13]]", "expected 9", "found 1"]),
    ("model.anchors=[[10,13]", ["model.anchors='[[10,13]'", "not valid YAML"]),
])
def test_bad_overrides_name_set(tmp_path, override, parts):
    path = write(tmp_path, "data:\n  img_size: 416\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, [override])
    message = str(e.value)
    assert message.startswith("--set: ")
    assert str(path) not in message
    for part in parts:
        assert part in message


@pytest.mark.parametrize("override", ["lr=1", "model.arch", "=3", ".arch=x", "model.=x"])
def test_malformed_override(tmp_path, override):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, ""), [override])
    assert str(e.value).startswith("--set: ")
    assert repr(override) in str(e.value)
    assert "group.key=value" in str(e.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_yaml_syntax_error(tmp_path):
    path = write(tmp_path, "model:\n  arch: [yolov3\n")
    with pytest.raises(ConfigError, match="invalid YAML") as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: ")
    assert isinstance(e.value.__cause__, yaml.YAMLError)


def test_pretrained_path_checked_only_when_pretrained(tmp_path):
    assert load_config(write(tmp_path, f"model:\n  pretrained_path: {MISSING}\n")).model.pretrained_path == MISSING
    weights = write(tmp_path, "", name="enc.pth")
    cfg = load_config(write(tmp_path, f"model:\n  pretrained: true\n  pretrained_path: {weights}\n"))
    assert cfg.model.pretrained_path == str(weights)


def test_round_trip(tmp_path):
    weights = write(tmp_path, "", name="enc.pth")
    cfg = Config(
        model=ModelConfig(arch="yolov3-tiny", num_classes=3, anchors=[[10.5, 14], *TINY_ANCHORS[1:]],
                          pretrained=True, pretrained_path=str(weights)),
        data=DataConfig(img_size=608),
    )
    d = config_to_dict(cfg)
    assert d["model"]["anchors"][0] == [10.5, 14]
    assert d["data"]["img_size"] == 608 and d["augment"]["affine"]["p"] == 0.5
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(d))) == cfg
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_select_device_cpu():
    assert select_device(-1) == torch.device("cpu")
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert select_device(None) == torch.device(expected)


@pytest.mark.skipif(torch.cuda.device_count() > 5, reason="cuda:5 exists here")
def test_select_device_missing_gpu():
    with pytest.raises(ConfigError) as e:
        select_device(5)
    assert "--gpu 5" in str(e.value)
    assert f"this machine has {torch.cuda.device_count()} CUDA device(s)" in str(e.value)


def test_parse_cli_turns_config_errors_into_one_line_exit(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    path = write(tmp_path, "data:\n  img_size: 320\n")
    args, cfg, device = parse_cli(parser, ["--config", str(path), "--gpu", "-1"])
    assert (cfg.data.img_size, device.type) == (320, "cpu")
    message = r"config error: --set: data.img_size=321: must be a positive multiple of 32; use 320 or 352"
    with pytest.raises(SystemExit, match=message):
        parse_cli(parser, ["--config", str(path), "--set", "data.img_size=321"])
    if torch.cuda.device_count() <= 7:
        with pytest.raises(SystemExit, match="config error: --gpu 7: no such CUDA device"):
            parse_cli(parser, ["--config", str(path), "--gpu", "7"])


def test_data_paths_default_from_root_and_can_be_set_one_by_one(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  root: /d/coco\n  val_images: /elsewhere/val\n"))
    assert cfg.data.split_paths("train") == (Path("/d/coco/images/train2017"),
                                             Path("/d/coco/annotations/instances_train2017.json"))
    assert cfg.data.split_paths("val") == (Path("/elsewhere/val"), Path("/d/coco/annotations/instances_val2017.json"))


def test_nested_set_changes_one_augment_entry(tmp_path):
    path = write(tmp_path, "augment:\n  affine: {p: 0.3, scale: [0.5, 1.5]}\n")
    cfg = load_config(path, ["augment.affine.p=0", "augment.clahe.clip_limit=2.0"])
    # a file's entry changes the arguments it names (configs/ overlays); translate_percent keeps the default's
    assert cfg.augment.affine == {"p": 0, "scale": [0.5, 1.5], "translate_percent": [-0.1, 0.1]}
    assert cfg.augment.clahe == {"p": 0.1, "clip_limit": 2.0}  # the default entry, one argument changed
    with pytest.raises(ConfigError, match=r"--set: data.img_size=416: is not a mapping"):
        load_config(path, ["data.img_size.x=1"])


@pytest.mark.parametrize("override, parts", [
    ("augment.affine={p: 1.5}", ["augment.affine", "p=1.5 must be a probability"]),
    ("augment.affine.scales=[1,2]", ["augment.affine", "unknown argument(s) ['scales'] for Albumentations Affine"]),
    ("augment.gauss_noise.std_range=[0.5,0.1]", ["augment.gauss_noise", "Albumentations GaussNoise rejects"]),
    ("augment.mosaic={p: 1}", ["augment.mosaic", "unknown augment key 'mosaic'"]),
    ("data.multiscale=[320,600]", ["data.multiscale=[320, 600]", "entry 600 must be a positive multiple of 32"]),
    ("data.multiscale=[608,320]", ["data.multiscale", "min <= max"]),
    ("train.subdivisions=3", ["train.subdivisions=3", "divide train.batch_size (64)"]),
    ("data.workers=-1", ["data.workers=-1"]),
])
def test_bad_data_augment_train_values(tmp_path, override, parts):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, ""), [override])
    message = str(info.value)
    assert message.startswith("--set: ")
    for part in parts:
        assert part in message


ROOT = Path(__file__).resolve().parents[1]
DARKNET_RECIPE = ROOT / "configs" / "darknet.yaml"


def test_darknet_recipe_holds_the_papers_numbers(tmp_path):
    raw = yaml.safe_load(DARKNET_RECIPE.read_text())  # an overlay: test_config_files.py checks it holds no default
    backbone = write(tmp_path, "", name="darknet53.conv.74")
    cfg = load_config(DARKNET_RECIPE, [f"model.pretrained_path={backbone}"])
    train = cfg.train  # yolov3.cfg [net]: batch, momentum, decay, learning_rate, burn_in, max_batches, steps, scales
    assert (train.optimizer, train.lr, train.momentum, train.weight_decay, train.burn_in) == ("sgd", 1e-3, 0.9, 5e-4,
                                                                                              1000)
    assert (train.batch_size, train.subdivisions, train.steps, train.scheduler) == (64, 16, 500200, "steps")
    assert (train.lr_steps, train.lr_scales) == ([400000, 450000], [0.1, 0.1])
    assert train.clip_grad_norm is None and not train.ema  # Darknet neither clips nor averages
    assert raw["model"]["pretrained"] and raw["model"]["pretrained_path"].endswith("darknet53.conv.74")
    assert (cfg.model.arch, cfg.model.encoder) == ("yolov3", "darknet53")
    # random=1: 320..608 every 10 optimiser steps; multiscale_every counts micro-batches
    assert cfg.data.multiscale == [320, 608] and cfg.data.multiscale_every == 10  # optimiser steps
    aug = cfg.augment  # jitter=.3 hue=.1 saturation=1.5 exposure=1.5 and Darknet's flip; nothing else
    assert aug.color_jitter == {"p": 1.0, "brightness": [0.6667, 1.5], "contrast": [1.0, 1.0],
                                "saturation": [0.6667, 1.5], "hue": 0.1}
    assert aug.affine == {"p": 1.0, "scale": {"x": [0.7, 1.3], "y": [0.7, 1.3]}, "translate_percent": [-0.2, 0.2]}
    assert aug.horizontal_flip == {"p": 0.5}
    assert {k for k, v in config_to_dict(cfg)["augment"].items() if v["p"] > 0} == {"color_jitter", "affine",
                                                                                     "horizontal_flip"}


def test_darknet_recipe_without_the_backbone_names_the_download_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # models/weights/darknet53.conv.74 is relative: absent here even after a download
    with pytest.raises(ConfigError, match=r"configs/darknet.yaml: model.pretrained_path='models/weights/darknet53.conv."
                       r"74': no such file .*download_darknet_weights.sh"):
        load_config(DARKNET_RECIPE)
