"""Config fuzz (hypothesis): random keys and values give a config that training can build, or a ConfigError that
names the key; and main.py turns a bad --set into one line, never a traceback from inside training."""
import functools
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import DATA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import main as train_main
from datasets.loader import MultiScaleBatchSampler, train_sizes
from datasets.transforms import Preprocess, build_augmentation
from engine.optim import build_optimizer, build_scheduler, lr_factor
from models import DARKNET_ANCHORS, build_model
from models.loss import build_loss
from utils.config import Config, ConfigError
from utils.config_load import config_from_dict, config_to_dict

ROOT = DATA.parent.parent
DEFAULTS = config_to_dict(Config())
KEYS = [(group, key) for group, keys in DEFAULTS.items() for key in keys]
AUGMENT_ARGS = [(key, arg) for key, kwargs in DEFAULTS["augment"].items() for arg in kwargs]

EDGES = [0, 1, -1, 2, 3, 31, 33, 64, 10**6, 2**63, 10**400, 0.5, -0.5, 1e-12, 1e308, -1e308, math.nan, math.inf,
         -math.inf]
edges = st.sampled_from(EDGES) | st.integers() | st.floats()
anything = st.recursive(st.none() | st.booleans() | edges | st.text(max_size=8),
                        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                    max_size=3), max_leaves=6)


def near(default: object) -> st.SearchStrategy:
    """Values a user might write for a key with this default: edge numbers of its type, lists of them, any text,
    and anything at all."""
    if isinstance(default, list):
        typed = st.lists(edges | st.lists(edges, max_size=3), max_size=10)
    elif isinstance(default, str):
        typed = st.text(max_size=12) | st.sampled_from(["", "\0", "../x", "yolov3-tiny", "cosine", "bf16", "AP"])
    elif isinstance(default, bool):
        typed = st.booleans()
    else:  # numbers and null
        typed = edges
    return typed | anything


# a known key with a value near its type, an unknown key, or one argument of an augmentation
key_mutations = st.sampled_from(KEYS).flatmap(lambda gk: st.tuples(st.just(f"{gk[0]}.{gk[1]}"),
                                                                   near(DEFAULTS[gk[0]][gk[1]])))
unknown_keys = st.tuples(st.tuples(st.sampled_from(list(DEFAULTS)), st.text(st.characters(exclude_characters="."),
                                                                            min_size=1, max_size=10))
                         .map(lambda gk: f"{gk[0]}.{gk[1]}"), anything)
augment_args = st.sampled_from(AUGMENT_ARGS).flatmap(lambda ka: st.tuples(
    st.just(f"augment.{ka[0]}.{ka[1]}"), near(DEFAULTS["augment"][ka[0]][ka[1]])))
mutations = st.lists(key_mutations | unknown_keys | augment_args, min_size=1, max_size=3)


def apply(mutations: list) -> dict:
    raw = config_to_dict(Config())
    for name, value in mutations:
        group, key, *arg = name.split(".", 2)
        if arg and isinstance(raw[group].get(key), dict):
            raw[group][key][arg[0]] = value
        else:
            raw[group][key] = value
    return raw


@functools.lru_cache(maxsize=8)
def meta_model(arch: str, encoder: str, num_classes: int, anchors: tuple | None) -> torch.nn.Module:
    with torch.device("meta"):  # any number of classes, no memory
        return build_model(arch, encoder, num_classes, None if anchors is None else [list(a) for a in anchors])


def build_what_training_builds(cfg: Config) -> None:
    """Everything main.py makes from the config before it reads data or weights files, and the first lrs."""
    build_augmentation(cfg.augment.model_dump(), cfg.data.min_box_size, cfg.train.seed)
    always = {key: {**kwargs, "p": 1.0} if kwargs.get("p", 0.5) > 0 else kwargs  # every transform on: exercise it
              for key, kwargs in cfg.augment.model_dump().items()}
    augmentation = build_augmentation(always, cfg.data.min_box_size, cfg.train.seed)
    image, boxes = np.full((48, 64, 3), 100, np.uint8), np.array([[4.0, 5.0, 40.0, 30.0]], np.float32)
    for size in (min(train_sizes(cfg)), cfg.data.img_size):
        if size <= 640:
            tensor, targets, _ = Preprocess(augmentation)(image, boxes, np.array([0]), size)
            assert tensor.shape == (3, size, size) and torch.isfinite(targets).all()
    sampler = MultiScaleBatchSampler(range(8), cfg.train.micro_batch_size, train_sizes(cfg), cfg.data.multiscale_every,
                                     seed=cfg.train.seed)
    assert sum(len(b) for b in sampler) == 8
    torch.Generator().manual_seed(cfg.train.seed)
    # num_classes null and anchors "auto" are resolved from the data (main.fit_to_data): 80 and Darknet's stand in
    given = None if isinstance(cfg.model.anchors, str) else cfg.model.anchors
    model = meta_model(cfg.model.arch, cfg.model.encoder, cfg.model.num_classes or 80,
                       None if given is None else tuple(map(tuple, given)))
    anchors = torch.tensor(given or DARKNET_ANCHORS[cfg.model.arch], dtype=torch.float32)
    build_loss(SimpleNamespace(anchors=anchors, masks=model.masks, strides=model.strides,
                               num_classes=model.num_classes), cfg.loss)  # the meta model's anchors hold no data
    build_scheduler(build_optimizer(model, cfg.train), cfg.train)
    for step in {0, cfg.train.burn_in, *cfg.train.lr_steps, cfg.train.steps - 1}:
        lr = cfg.train.lr * lr_factor(step, cfg.train)
        assert math.isfinite(lr) and lr >= 0, (step, lr)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations)
def test_random_values_give_a_buildable_config_or_an_error_naming_the_key(mutations):
    names = [name.rsplit(".", 1)[0] if name.startswith("augment.") else name for name, _ in mutations]
    try:
        cfg = config_from_dict(apply(mutations), "fuzz.yaml")
    except ConfigError as e:
        message = str(e)
        assert message.startswith("fuzz.yaml: ") and any(name in message for name in names), message
        return
    build_what_training_builds(cfg)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40))
def test_random_set_text_gives_a_config_or_an_error(text):
    try:
        config_from_dict({}, "fuzz.yaml", [text])
    except ConfigError as e:
        assert str(e).startswith(("--set: ", "fuzz.yaml: ")), str(e)


@pytest.mark.parametrize("override, named", [
    ("train.lr=.nan", "train.lr=nan"),
    ("train.lr_scales=[0.1, -1]", "train.lr_scales"),
    ("train.seed=-1", "train.seed=-1"),
    ("data.timeout=0", "data.timeout=0"),
    ("train.max_bad_steps=0", "train.max_bad_steps=0"),
    ('logging.dir="a\\0b"', "logging.dir='a\\x00b': contains a NUL character"),
    ("logging.dir=a\0b", "logging.dir='a\\x00b': value is not valid YAML"),
    ("augment.affine.scale=[.inf, 2]", "augment.affine"),
    ("model.pretrained=true", "model.pretrained"),
    ("trian.lr=0.1", "unknown group 'trian'; did you mean 'train'?"),
])
def test_training_stops_with_one_line_naming_the_key(override, named, tmp_path):
    with pytest.raises(SystemExit) as info:
        train_main.main(["--config", str(ROOT / "args.yaml"), "--device", "cpu", "--set", f"logging.dir={tmp_path}",
                         override])
    message = str(info.value)
    assert message.startswith("error: ") and named in message and "\n" not in message, message
    assert not list(tmp_path.iterdir())  # stopped before creating a run folder


@pytest.mark.slow
def test_bad_set_on_the_command_line_prints_no_traceback(tmp_path):
    run = subprocess.run([sys.executable, "main.py", "--device", "cpu", "--set", "data.img_size=100",
                          "train.subdivisions=3", f"logging.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip() == "error: --set: data.img_size=100: must be a positive multiple of 32; use 96 or 128"


def test_a_key_hypothesis_found_names_itself():
    """A lone surrogate in a key (YAML can carry one as an escape): pydantic names only the group; ours the key."""
    with pytest.raises(ConfigError, match=r"^fuzz.yaml: model.\ud800=1: unknown model key"):
        config_from_dict({"model": {"\ud800": 1}}, "fuzz.yaml")
