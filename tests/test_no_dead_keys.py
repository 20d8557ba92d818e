"""Every key of args.yaml is read by code outside the config module (no dead keys), and args.yaml is complete."""
import re
from dataclasses import fields
from pathlib import Path

import yaml

from utils.config import Config, config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_args_yaml_lists_every_key_and_loads():
    raw = yaml.safe_load((ROOT / "args.yaml").read_text())
    defaults = config_to_dict(Config())
    assert {g: set(keys) for g, keys in raw.items()} == {g: set(keys) for g, keys in defaults.items()}
    load_config(ROOT / "args.yaml")


def test_every_key_is_read_somewhere():
    sources = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "tests" not in p.parts
               and p != ROOT / "utils" / "config.py"]
    code = "\n".join(p.read_text() for p in sources)
    for group in fields(Config):
        for key in fields(group.type if isinstance(group.type, type) else type(getattr(Config(), group.name))):
            assert re.search(rf"\b{group.name}\.{key.name}\b", code), f"{group.name}.{key.name} is read nowhere"
