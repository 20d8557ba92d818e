"""The transfer recipe (utils/recipe.py) and the end-of-run mix with the start (train.keep_start): which recipe a
run gets and why, what it sets and what it leaves to the user, and a run from a trained model that ends no lower
than its start."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from test_fine_tune import shapes  # noqa: F401 (a fixture)
from test_train import ROOT

import main as train_main
from reliability.common import tiny_run_args
from utils.checkpoint import load_checkpoint
from utils.config_load import load_config
from utils.recipe import LARGE_SET, TRANSFER, choose_recipe


def config(*overrides: str):
    return load_config(ROOT / "args.yaml", list(overrides))


def test_no_start_from_weights_keeps_the_coco_recipe():
    cfg, line = choose_recipe(config(), [], False, 87)
    assert cfg.train.recipe == "coco" and line == "recipe: coco (no start from trained weights)"
    assert (cfg.train.optimizer, cfg.train.batch_size, cfg.train.burn_in, cfg.train.keep_start) == ("adam", 64, 1000,
                                                                                                     False)


def test_a_start_from_weights_on_a_small_set_gets_the_transfer_recipe():
    cfg, line = choose_recipe(config(), [], True, 87)
    t = cfg.train
    assert (t.recipe, t.optimizer, t.lr, t.momentum, t.batch_size, t.subdivisions, t.keep_start) == (
        "transfer", "sgd", 0.001, 0.9, 16, 1, True)
    assert t.burn_in == math.ceil(3 * 87 / 16) == 17  # three epochs of 87 images in steps of 16
    assert line.startswith("recipe: transfer (a start from trained weights on 87 training images (< 10,000)): "
                           "train.optimizer=sgd train.lr=0.001")
    assert "train.burn_in=17" in line and "set by hand" not in line
    assert set(TRANSFER) <= {k.split("=")[0] for k in line.split(": ", 2)[2].split()}


def test_values_set_by_hand_are_kept_and_named():
    # --set wins even where it names the default; a file's value that differs from the default wins too
    cfg, line = choose_recipe(config("train.lr=0.001", "train.batch_size=8"), ["train.lr=0.001", "train.batch_size=8"],
                              True, 87)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.optimizer) == (0.001, 8, "sgd")
    assert cfg.train.burn_in == math.ceil(3 * 87 / 8) == 33  # the warm-up follows the batch the user chose
    assert "set by hand, kept: train.lr=0.001 train.batch_size=8" in line
    # a value equal to its default counts as set by hand only when --set names it (a file cannot tell)
    cfg, line = choose_recipe(config("train.optimizer=adam", "train.burn_in=5"), ["train.optimizer=adam"], True, 87)
    assert (cfg.train.optimizer, cfg.train.burn_in, cfg.train.batch_size) == ("adam", 5, 16)
    assert "kept: train.optimizer=adam train.burn_in=5" in line


def test_large_sets_and_explicit_recipes():
    cfg, line = choose_recipe(config(), [], True, LARGE_SET)
    assert cfg.train.recipe == "coco" and "10,000 training images (>= 10,000): a full training" in line
    assert choose_recipe(config(), [], True, LARGE_SET - 1)[0].train.recipe == "transfer"
    cfg, line = choose_recipe(config("train.recipe=coco"), ["train.recipe=coco"], True, 87)
    assert (cfg.train.recipe, cfg.train.optimizer, line) == ("coco", "adam", "recipe: coco (train.recipe)")
    cfg, _ = choose_recipe(config("train.recipe=transfer"), ["train.recipe=transfer"], False, 87)
    assert (cfg.train.recipe, cfg.train.optimizer) == ("transfer", "sgd")


@pytest.mark.slow
def test_a_run_from_a_trained_model_ends_on_the_best_mix(shapes, tmp_path, capfd):  # noqa: F811
    # the start: a short run from scratch; then a run from its best.pt that keeps the start
    first = train_main.main(tiny_run_args(shapes, tmp_path / "a", "train.steps=12", "train.lr=0.003"))
    start_file = first["run_dir"] / "last.pt"
    capfd.readouterr()
    run = train_main.main(tiny_run_args(shapes, tmp_path / "b", "train.steps=6", "eval.every=1000") +
                          ["--weights", str(start_file)])
    log = capfd.readouterr().out
    assert "recipe: transfer (a start from trained weights on 16 training images" in log
    assert "set by hand, kept: train.batch_size=4 train.subdivisions=2 train.burn_in=2" in log
    run_dir = run["run_dir"]
    evals = [json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines()]
    alpha = float(re.search(r"keep_start: last\.pt holds [\d.]+ x start \+ ([\d.]+) x trained", log)[1])
    mixes = re.findall(r"keep_start: [\d.]+ x start \+ [\d.]+ x trained weights \| AP [\d.]+ AP50 [\d.]+\n", log)
    assert len(mixes) == 2
    assert all(evals[-1]["stats"][k] >= evals[0]["stats"][k] for k in ("AP", "AP50"))  # never below the start
    last, start = load_checkpoint(run_dir / "last.pt"), load_checkpoint(run_dir / "start.pt")
    assert last["config"]["train"]["recipe"] == "transfer" and last["config"]["train"]["optimizer"] == "sgd"
    held = last["ema"]["module"]
    same = all(torch.equal(held[k], v) for k, v in start["model"].items() if v.is_floating_point())
    assert same == (alpha == 0.0)  # the start itself, or a mix that moved from it
    assert (run_dir / "best.pt").is_file() and start["stats"]["AP50"] == evals[0]["stats"]["AP50"]
