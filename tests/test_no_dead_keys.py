"""Every key of args.yaml is read by code outside the config module (no dead keys), and args.yaml is complete."""
import re
from dataclasses import fields
from pathlib import Path

import yaml

from utils.config import Config, config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]

# Keys read through a helper of their section rather than as `<group>.<key>`: the helper must be called somewhere.
READ_THROUGH = {
    **{f"data.{key}": "split_paths(" for key in
       ("root", "train_images", "train_annotations", "val_images", "val_annotations")},
    **{f"augment.{f.name}": "asdict(cfg.augment)" for f in fields(Config().augment)},
    "train.batch_size": "micro_batch_size", "train.subdivisions": "micro_batch_size",
}


def test_args_yaml_lists_every_key_and_loads():
    raw = yaml.safe_load((ROOT / "args.yaml").read_text())
    defaults = config_to_dict(Config())
    assert {g: set(keys) for g, keys in raw.items()} == {g: set(keys) for g, keys in defaults.items()}
    assert load_config(ROOT / "args.yaml") == Config()  # the dataclass defaults are args.yaml's values


def test_every_key_is_read_somewhere():
    sources = [p for p in ROOT.rglob("*.py") if not {".venv", "tests"} & set(p.parts)
               and p != ROOT / "utils" / "config.py"]
    code = "\n".join(p.read_text() for p in sources)
    for group, keys in config_to_dict(Config()).items():
        for key in keys:
            name = f"{group}.{key}"  # read as cfg.<group>.<key> or, by a function given the section, <group>_cfg.<key>
            assert re.search(rf"\b{group}(_cfg)?\.{key}\b", code) or READ_THROUGH.get(name, "@@") in code, \
                f"{name} is read nowhere"
