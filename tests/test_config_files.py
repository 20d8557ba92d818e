"""The config files: args.yaml is the schema's defaults, configs/*.yaml are overlays holding only what differs, and
the overlays resolve to exactly what the files they replaced resolved to (args_darknet.yaml, the Makefile's DEMO_SET),
so that the demo trains bit-identically and checkpoints written before the overlays load and resume."""
from pathlib import Path

import pytest
import yaml

from utils.config import Config, ConfigError
from utils.config_load import config_from_dict, config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = sorted((ROOT / "configs").glob("*.yaml"))
# The Makefile's demo settings before configs/demo.yaml (commit 801c329), with DEMO_AMP's default
DEMO_SET = ("data.root=data/shapes model.num_classes=6 model.arch=yolov3-tiny data.img_size=224 "
            "data.multiscale=[160,160] data.workers=2 train.batch_size=16 train.subdivisions=1 train.steps=900 "
            "train.lr=0.002 train.burn_in=50 train.lr_steps=[750,850] train.amp=auto train.checkpoint_every=100 "
            "eval.every=450 logging.every=50 logging.name=demo augment.multiplicative_noise.p=0 augment.clahe.p=0 "
            "augment.posterize.p=0 augment.to_gray.p=0 augment.gauss_noise.p=0 augment.coarse_dropout.p=0 "
            "augment.affine.p=0.3 train.clip_grad_norm=10").split()


def dumped(cfg: Config | dict) -> str:
    """The YAML a run folder's args.yaml and a checkpoint hold: equal text means equal values and types (1 != 1.0)."""
    return yaml.safe_dump(cfg if isinstance(cfg, dict) else config_to_dict(cfg), sort_keys=False)


def stored(name: str) -> dict:
    """A config resolved and dumped by the code before pydantic (tests/data/config_*_801c329.yaml)."""
    return yaml.safe_load((ROOT / "tests" / "data" / f"config_{name}_801c329.yaml").read_text())


# keys added since (issues 21, 23), with the defaults an old checkpoint's config takes; and the defaults that changed
ADDED = {"train": {"recipe": "auto", "keep_start": False, "encoder_lr_scale": 1.0, "ema_ramp": 2000.0}}
CHANGED = {"data": {"workers": "auto"}, "train": {"amp": "auto"}, "model": {"num_classes": None}}  # None: the data's


def today(old: dict, *changes: dict) -> dict:
    """`old` as today's schema resolves it: the keys added since with their defaults, in the schema's order, and
    `changes` (a file that left a changed default unset now gets the new default)."""
    merged = {group: dict(body) for group, body in old.items()}
    for change in (ADDED, *changes):
        for group, body in change.items():
            merged[group].update(body)
    order = config_to_dict(Config())
    return {group: {key: merged[group][key] for key in order[group]} for group in order}


@pytest.fixture
def darknet_backbone(tmp_path, monkeypatch):
    """A working directory holding models/weights/darknet53.conv.74, the file configs/darknet.yaml names."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "weights").mkdir(parents=True)
    (tmp_path / "models" / "weights" / "darknet53.conv.74").write_bytes(b"")


def test_args_yaml_is_the_schemas_defaults_exactly():
    assert dumped(load_config(ROOT / "args.yaml")) == dumped(Config())
    raw = yaml.safe_load((ROOT / "args.yaml").read_text())
    assert dumped(raw) == dumped(Config())  # every key written out, in the schema's order, with its default's type


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: p.name)
def test_overlays_hold_only_what_differs(path):
    defaults = config_to_dict(Config())
    same = []
    for group, body in yaml.safe_load(path.read_text()).items():
        for key, value in body.items():
            if isinstance(value, dict):  # an augment entry: the arguments it names
                same += [f"{group}.{key}.{k}" for k, v in value.items() if defaults[group][key].get(k) == v]
            elif defaults[group][key] == value:
                same.append(f"{group}.{key}")
    assert same == [], f"{path.name} repeats defaults: {same}"
    assert [p.name for p in OVERLAYS] == ["darknet.yaml", "demo.yaml"]


def test_demo_overlay_is_the_old_demo_set_exactly():
    new = load_config(ROOT / "configs" / "demo.yaml", ["train.amp=auto"])
    assert dumped(new) == dumped(load_config(ROOT / "args.yaml", DEMO_SET))  # the old command line, today's code
    assert dumped(new) == dumped(today(stored("demo")))  # what the old code resolved and stored in the checkpoint
    assert (new.model.arch, new.data.multiscale, new.train.clip_grad_norm, new.augment.affine) == (
        "yolov3-tiny", [160, 160], 10.0, {"p": 0.3, "scale": [0.75, 1.25], "translate_percent": [-0.1, 0.1]})


def test_the_makefile_trains_the_demo_overlay():
    makefile = (ROOT / "Makefile").read_text()
    assert "main.py --device cpu --config configs/demo.yaml --set train.amp=$(DEMO_AMP)" in makefile
    assert "DEMO_SET" not in makefile


def test_darknet_overlay_is_the_old_args_darknet_yaml_exactly(darknet_backbone):
    new = load_config(ROOT / "configs" / "darknet.yaml")
    assert dumped(new) == dumped(today(stored("darknet"), CHANGED))  # workers and amp: today's defaults
    assert (new.train.optimizer, new.train.subdivisions, new.augment.horizontal_flip) == ("sgd", 16, {"p": 0.5})


@pytest.mark.parametrize("name", ["demo", "darknet"])
def test_a_checkpoint_config_written_before_pydantic_loads_unchanged(name, darknet_backbone):
    old = stored(name)  # what engine's state_dict held as "config" then
    assert dumped(config_from_dict(old, "last.pt")) == dumped(today(old))
    assert config_from_dict(old, "last.pt", ["train.steps=1000"]).train.steps == 1000  # --resume with --set


def test_overlay_rules(tmp_path):
    """A key left out keeps its default, an augment entry changes only the arguments it names, later files win,
    --set comes last, and each error names the file that gave the value."""
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("data:\n  img_size: 320\naugment:\n  affine: {p: 0.1}\ntrain:\n  lr: 0.01\n")
    second.write_text("data:\n  img_size: 608\n")
    cfg = load_config([first, second], ["train.lr=0.02"])
    assert (cfg.data.img_size, cfg.train.lr, cfg.data.workers) == (608, 0.02, "auto")
    assert cfg.augment.affine == {"p": 0.1, "scale": [0.75, 1.25], "translate_percent": [-0.1, 0.1]}
    first.write_text("train:\n  subdivisions: 3\n")
    with pytest.raises(ConfigError, match=r"^.*a\.yaml: train\.subdivisions=3: must be >= 1 and divide"):
        load_config([first, second])
    # a key no file set is named with the last file
    with pytest.raises(ConfigError, match=r"^.*b\.yaml: model\.pretrained_path=None"):
        load_config([first, second], ["train.subdivisions=4", "model.pretrained=true"])
