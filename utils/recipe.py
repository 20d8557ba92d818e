"""Which recipe a new run trains with, chosen once before the data loaders are built.

`coco`: args.yaml's defaults, the recipe for training on COCO from scratch or from an ImageNet backbone
(darknet53.conv.74), as configs/darknet.yaml is the paper's. `transfer`: a start from trained weights on a small
set. Measured on four real dev sets (BENCHMARKS.md, "Your own data"): the COCO recipe's Adam at 1e-3 with batches
of 64 throws away what a COCO-trained start knows in a few dozen steps; SGD with momentum at 1e-3 and batches of 16
(more, smaller steps in the same minutes), warmed up over WARMUP_EPOCHS epochs as Ultralytics does, scored best on
every set or level with the best (Adam in batches of 16 levels with it where the data teaches much, and loses where
training hurts), and ending on the best mix of the start and the trained weights (train.keep_start) keeps a run from
ending below its start. The recipe changes only values left at their schema defaults and not named by --set, so
every value can still be set by hand; a resumed run keeps the values its first run resolved (they are in its
checkpoint's config).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from utils.config import Config
from utils.config_load import config_from_dict, config_to_dict

TRANSFER = {"train.optimizer": "sgd", "train.lr": 0.001, "train.momentum": 0.9, "train.batch_size": 16,
            "train.subdivisions": 1, "train.keep_start": True}
WARMUP_EPOCHS = 3  # burn-in of a transfer run, in passes over the training set (Ultralytics: 3 epochs)
LARGE_SET = 10_000  # training images from which a start from weights is a full training, with the COCO recipe


def _value(cfg: Config, key: str) -> object:
    group, name = key.split(".")
    return getattr(getattr(cfg, group), name)


def choose_recipe(cfg: Config, overrides: Sequence[str], from_weights: bool, train_images: int
                  ) -> tuple[Config, str]:
    """The config with train.recipe resolved (auto -> coco or transfer) and, for transfer, TRANSFER and the warm-up
    applied to every key left at its default; and the log line saying which recipe runs, why, and what it set."""
    if cfg.train.recipe == "auto":
        recipe = "transfer" if from_weights and train_images < LARGE_SET else "coco"
        why = (f"a start from trained weights on {train_images:,} training images (< {LARGE_SET:,})" if recipe ==
               "transfer" else "no start from trained weights" if not from_weights else
               f"{train_images:,} training images (>= {LARGE_SET:,}): a full training")
    else:
        recipe, why = cfg.train.recipe, "train.recipe"
    changes = [f"train.recipe={recipe}"]
    if recipe == "transfer":
        defaults = config_from_dict({})
        by_hand = {o.split("=", 1)[0].strip() for o in overrides}
        free = [k for k in (*TRANSFER, "train.burn_in") if k not in by_hand and _value(cfg, k) == _value(defaults, k)]
        changes += [f"{k}={TRANSFER[k]}" for k in free if k in TRANSFER]
        if "train.burn_in" in free:
            batch = TRANSFER["train.batch_size"] if "train.batch_size" in free else cfg.train.batch_size
            changes.append(f"train.burn_in={math.ceil(WARMUP_EPOCHS * train_images / batch)}")
        kept = [k for k in (*TRANSFER, "train.burn_in") if k not in free]
    resolved = config_from_dict(config_to_dict(cfg), "the recipe", changes)
    line = f"recipe: {recipe} ({why})"
    if recipe == "transfer":
        line += f": {' '.join(changes[1:]) or 'nothing left at its default'}" + (
            f"; set by hand, kept: {' '.join(f'{k}={_value(cfg, k)}' for k in kept)}" if kept else "")
    return resolved, line
