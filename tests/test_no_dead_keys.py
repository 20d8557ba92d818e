"""Every key of args.yaml is read by code outside the config module (no dead keys), and args.yaml is complete.

"Read" means an attribute load in the syntax tree, `cfg.<group>.<key>` or, in a function given the section,
`<group>_cfg.<key>` / `<group>.<key>`: a key that appears only in a comment, a string, or a message (the exception of a
`raise`, an assert's message, a log / warnings / print call) is read nowhere: nothing it says changes what runs.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from utils.config import Config
from utils.config_load import config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "utils" / "config.py"  # the schema reads its own keys (defaults, checks): not a use
MESSAGE_CALLS = {"debug", "info", "warning", "error", "exception", "critical", "warn", "print"}

# Keys read through a helper of their section rather than as `<group>.<key>`: the helper must be read somewhere
# (`cfg.data.split_paths(...)`, `cfg.train.micro_batch_size`). The augment: section is read whole (`cfg.augment`
# handed to the augmentation builder), each of its keys an Albumentations transform.
READ_THROUGH = {
    **{f"data.{key}": "split_paths" for key in
       ("root", "train_images", "train_annotations", "val_images", "val_annotations")},
    **{f"augment.{key}": "augment" for key in config_to_dict(Config())["augment"]},
    "train.batch_size": "micro_batch_size", "train.subdivisions": "micro_batch_size",
    "data.multiscale": "train_size_range",
}


def messages(node: ast.AST) -> list[ast.AST]:
    """The parts of `node` whose only job is to say something: the exception of a `raise`, an assert's message, the
    arguments of log.info / logging.warning / warnings.warn / print ... (f-strings elsewhere build values: kept)."""
    if isinstance(node, ast.Raise):
        return [node.exc] if node.exc else []
    if isinstance(node, ast.Assert):
        return [node.msg] if node.msg else []
    if isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in MESSAGE_CALLS:
            return [*node.args, *(k.value for k in node.keywords)]
    return []


def attribute_reads(source: str) -> set[tuple[str, str]]:
    """(owner, attr) of every attribute load outside messages: `cfg.train.lr` gives ("train", "lr") and ("cfg",
    "train"), `train_cfg.lr` ("train_cfg", "lr"), `f(x).lr` ("", "lr"). Stores, strings and messages give nothing."""
    tree = ast.parse(source)
    said = {id(part) for node in ast.walk(tree) for part in messages(node)}
    reads: set[tuple[str, str]] = set()

    def visit(node: ast.AST) -> None:
        if id(node) in said:
            return
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            owner = node.value
            reads.add((owner.attr if isinstance(owner, ast.Attribute) else owner.id if isinstance(owner, ast.Name)
                       else "", node.attr))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return reads


def is_read(reads: set[tuple[str, str]], group: str, key: str) -> bool:
    """Whether `<group>.<key>` is read: as cfg.<group>.<key>, <group>_cfg.<key> or <group>.<key>, or through its
    helper (READ_THROUGH)."""
    helper = READ_THROUGH.get(f"{group}.{key}")
    return bool({(group, key), (f"{group}_cfg", key)} & reads) or any(attr == helper for _, attr in reads)


def code_reads() -> set[tuple[str, str]]:
    """attribute_reads over every Python file of ours except tests and the schema."""
    sources = [p for p in ROOT.rglob("*.py") if not {".venv", "tests"} & set(p.relative_to(ROOT).parts)
               and p != SCHEMA]
    return set().union(*(attribute_reads(p.read_text()) for p in sources))


def test_args_yaml_lists_every_key_and_loads():
    raw = yaml.safe_load((ROOT / "args.yaml").read_text())
    defaults = config_to_dict(Config())
    assert {g: set(keys) for g, keys in raw.items()} == {g: set(keys) for g, keys in defaults.items()}
    assert load_config(ROOT / "args.yaml") == Config()  # the schema's defaults are args.yaml's values


def test_every_key_is_read_somewhere():
    reads = code_reads()
    dead = [f"{group}.{key}" for group, keys in config_to_dict(Config()).items() for key in keys
            if not is_read(reads, group, key)]
    assert dead == [], f"read nowhere (as an attribute outside messages): {dead}"


@pytest.mark.parametrize("source, read", [
    ("def f(cfg):\n    return cfg.train.lr * 2\n", True),
    ("def f(train_cfg):\n    return train_cfg.lr\n", True),
    ("def f(cfg):\n    g(lr=cfg.train.lr)\n", True),
    ("def f(cfg):\n    return Path(f'run_{cfg.train.lr}')\n", True),  # an f-string that builds a value
    # the case the text search let through: the key appears only in an error message
    ("def f(cfg):\n    raise ValueError(f'train.lr is {cfg.train.lr}')\n", False),
    ("def f(cfg):\n    raise ValueError('train.lr is %s' % cfg.train.lr)\n", False),
    ("def f(cfg):\n    raise ValueError('train.lr is {}'.format(cfg.train.lr))\n", False),
    ("def f(cfg):\n    log.info('lr %s', cfg.train.lr)\n", False),
    ("def f(cfg):\n    print(cfg.train.lr)\n", False),
    ("# cfg.train.lr\nNOTE = 'cfg.train.lr and train_cfg.lr'\n", False),  # a comment, a string
    ("def f(cfg):\n    cfg.train.lr = 3\n", False),  # written, not read
    ("def f(cfg):\n    return cfg.eval.lr\n", False),  # another group's key of that name
])
def test_the_checker_counts_only_real_reads(source, read):
    assert is_read(attribute_reads(source), "train", "lr") is read


def test_a_key_read_only_in_a_message_fails_the_check():
    """The old text search passed this module; the syntax tree does not."""
    source = "def check(cfg):\n    if cfg.train.steps < 0:\n        raise SystemExit(f'bad train.lr {cfg.train.lr}')\n"
    reads = attribute_reads(source)
    assert is_read(reads, "train", "steps") and not is_read(reads, "train", "lr")
