"""Your own data from trained weights, in the time you have: transfer between class counts, freezing, time-fitted
runs and schedules relative to the run (issue 15)."""
from __future__ import annotations

import json
import math
import re
import time

import numpy as np
import pytest
import torch
from test_train import ROOT, run_args, run_two_ranks

import engine.budget as budget_module
import main as train_main
from datasets.coco_names import COCO_NAMES
from datasets.shapes import SHAPE_CLASSES, generate_shapes
from engine.budget import TimeBudget
from engine.optim import lr_factor, resolve_schedule
from models import build_model
from models.transfer import Transfer, cut_prefix, normalize_name, start_from, transfer_state
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.config import Config, ConfigError, DataConfig, TrainConfig
from utils.config_load import build_config, config_to_dict, load_config


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=16, num_val=4, seed=0, size=96)
    return root


def random_model(num_classes: int, seed: int) -> torch.nn.Module:
    """A yolov3-tiny whose every tensor is random (biases and BN statistics too), so copies are recognisable."""
    torch.manual_seed(seed)
    model = build_model("yolov3-tiny", num_classes=num_classes)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.dtype.is_floating_point and value.ndim:
                value.copy_(torch.rand_like(value) + 0.5)
    return model


def head_rows(model: torch.nn.Module, head: str, kind: str = "weight") -> torch.Tensor:
    """(A, 5 + C, ...) view of a head's output conv."""
    out = getattr(model, head).out
    return getattr(out, kind).detach().view(out.num_anchors, 5 + out.num_classes, *getattr(out, kind).shape[1:])


def test_checkpoint_with_other_classes_keeps_box_rows_and_matches_names(tmp_path):
    source = random_model(5, seed=1)
    cfg = load_config(ROOT / "args.yaml", ["model.arch=yolov3-tiny", "model.num_classes=5"])
    path = tmp_path / "five.pt"
    save_checkpoint({"model": source.state_dict(), "config": config_to_dict(cfg),
                     "class_names": ["a", "b", "Traffic_Light", "d", "e"]}, path)
    torch.manual_seed(7)
    fresh = build_model("yolov3-tiny", num_classes=3)
    torch.manual_seed(7)
    target = build_model("yolov3-tiny", num_classes=3)
    summary = start_from(target, path, ["x", "traffic light", "a"])
    for head in ("head32", "head16"):
        for kind in ("weight", "bias"):
            new, old, init = head_rows(target, head, kind), head_rows(source, head, kind), head_rows(fresh, head, kind)
            assert torch.equal(new[:, :5], old[:, :5])  # box and objectness rows, bit for bit
            assert torch.equal(new[:, 6], old[:, 5 + 2])  # "traffic light" <- "Traffic_Light"
            assert torch.equal(new[:, 7], old[:, 5 + 0])  # "a" <- "a"
            assert torch.equal(new[:, 5], init[:, 5])  # "x": the model's own initialisation
    assert torch.equal(head_rows(fresh, "head32", "bias")[:, 5], torch.full((3,), -math.log(3)))  # prob. 1/(C+1)
    state, old_state = target.state_dict(), source.state_dict()
    others = [k for k in state if ".out." not in k and k != "anchors"]
    assert all(torch.equal(state[k], old_state[k]) for k in others)
    assert torch.equal(target.anchors, fresh.anchors)  # the config's anchors, not the file's
    assert (summary.loaded, summary.heads, summary.anchors) == (len(others), 2, 3)
    assert summary.from_old == {"traffic light": "Traffic_Light", "a": "a"} and summary.fresh_classes == ["x"]
    assert "2 classes from their old rows" in str(summary) and "1 started fresh (x)" in str(summary)


def test_darknet_file_of_coco_starts_coco_named_classes_from_their_rows(tmp_path):
    source = random_model(80, seed=2)
    path = tmp_path / "coco.weights"
    source.save_darknet_weights(path)
    target = build_model("yolov3-tiny", num_classes=3)
    summary = start_from(target, path, ["dog", "robot", "tvmonitor"], COCO_NAMES)
    new, old = head_rows(target, "head16"), head_rows(source, "head16")
    assert torch.equal(new[:, :5], old[:, :5])
    assert torch.equal(new[:, 5], old[:, 5 + COCO_NAMES.index("dog")])
    assert torch.equal(new[:, 7], old[:, 5 + COCO_NAMES.index("tv")])  # VOC's name for it
    assert summary.fresh_classes == ["robot"] and summary.loaded == 66  # every tensor but the 2 heads' 4


def test_backbone_prefix_loads_the_backbone_only(tmp_path):
    source = random_model(80, seed=3)
    full, prefix = tmp_path / "tiny.weights", tmp_path / "yolov3-tiny.conv.15"
    source.save_darknet_weights(full)
    assert cut_prefix(full, prefix, "yolov3-tiny") == "yolov3-tiny.conv.15"
    assert prefix.stat().st_size == 20 + 4 * sum(t.numel() for layer in source.darknet_layers()[:9]
                                                 for t in (*layer.parameters(), *layer.buffers()) if t.ndim)
    torch.manual_seed(0)
    target = build_model("yolov3-tiny", num_classes=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    summary = start_from(target, prefix, ["a", "b"], COCO_NAMES)
    assert torch.equal(target.darknet_layers()[0].conv.weight, source.darknet_layers()[0].conv.weight)
    assert torch.equal(target.darknet_layers()[8].bn.running_var, source.darknet_layers()[8].bn.running_var)
    assert torch.equal(target.state_dict()["head32.out.weight"], before["head32.out.weight"])  # heads fresh
    assert str(summary).endswith("every layer after its 9 convs started fresh")


def test_other_architecture_or_anchor_count_is_refused_naming_both(tmp_path):
    path = tmp_path / "tiny.weights"
    random_model(80, seed=4).save_darknet_weights(path)
    with pytest.raises(ValueError, match=r"tiny.weights is Darknet's full yolov3-tiny \(80 classes\), but this "
                       r"config builds yolov3/darknet53 with 3 classes"):
        start_from(build_model("yolov3", num_classes=3), path, ["a", "b", "c"], COCO_NAMES)
    cfg = load_config(ROOT / "args.yaml", ["model.arch=yolov3-tiny", "model.num_classes=5"])
    pt = tmp_path / "tiny.pt"
    save_checkpoint({"model": random_model(5, seed=5).state_dict(), "config": config_to_dict(cfg)}, pt)
    with pytest.raises(Exception, match=r"tiny.pt holds a yolov3-tiny/darknet53 model, but this config builds "
                       r"yolov3/mobilenet_v3_small"):
        start_from(build_model("yolov3", "mobilenet_v3_small", num_classes=3), pt, ["a", "b", "c"])
    source = random_model(4, seed=6).state_dict()
    two_anchors = {k: v[:2 * 9] if ".out." in k else v for k, v in source.items()}  # 2 anchors x (5 + 4) rows
    with pytest.raises(ValueError, match=r"head32.out: the source has 2 anchors per head .* this model 3"):
        transfer_state(build_model("yolov3-tiny", num_classes=4), two_anchors, 4, None, None, Transfer("x"))


def test_names_normalise_and_voc_aliases():
    assert normalize_name("Dining_Table") == normalize_name("dining table") == "diningtable"
    assert normalize_name("sofa") == normalize_name("couch") and normalize_name("tvmonitor") == "tv"


def test_training_starts_from_a_checkpoint_of_other_classes(shapes, tmp_path):
    first = train_main.main(run_args(shapes, tmp_path / "a", "train.steps=2"))
    last = first["run_dir"] / "last.pt"
    assert load_checkpoint(last)["class_names"] == list(SHAPE_CLASSES)  # a checkpoint knows its classes
    second = train_main.main(run_args(shapes, tmp_path / "b", "train.steps=1", "--weights", str(last)))
    assert second["state"]["step"] == 1
    steps = [json.loads(line)["step"] for line in (second["run_dir"] / "evals.jsonl").read_text().splitlines()]
    assert steps[:2] == [0, 1] and steps[2:] in ([], [1])  # the start first; keep_start records a mix it chose again


# ---- freezing ----


def test_frozen_encoder_and_its_batchnorm_statistics_stay_then_train(shapes, tmp_path):
    torch.manual_seed(0)
    initial = build_model("yolov3-tiny", num_classes=6).state_dict()
    args = run_args(shapes, tmp_path, "train.steps=5", "train.freeze=encoder", "train.freeze_steps=3",
                    "train.checkpoint_every=3", "train.ema=false", "train.burn_in=0", "train.lr=0.01")
    states = {}
    real = train_main.save_checkpoint

    def keep(state, path):
        states[state["state"]["step"]] = {k: v.clone() for k, v in state["model"].items()}
        real(state, path)

    train_main.save_checkpoint = keep
    try:
        train_main.main(args)
    finally:
        train_main.save_checkpoint = real
    encoder = [k for k in initial if k.startswith("encoder.")]
    assert any("running_mean" in k for k in encoder) and any("weight" in k for k in encoder)
    assert all(torch.equal(states[3][k], initial[k]) for k in encoder)  # weights and BN statistics unchanged
    assert not torch.equal(states[3]["head32.out.weight"], initial["head32.out.weight"])  # the rest trained
    changed = [k for k in encoder if not torch.equal(states[5][k], states[3][k])]
    assert len(changed) > len(encoder) // 2  # and then the encoder trains too


def test_freezing_resumes_exactly(shapes, tmp_path):
    settings = ["train.freeze=encoder", "train.freeze_steps=2", "train.checkpoint_every=2"]
    straight = train_main.main(run_args(shapes, tmp_path / "a", "train.steps=4", *settings))
    cut = train_main.main(run_args(shapes, tmp_path / "b", "train.steps=2", *settings))
    resumed = train_main.main(["--resume", str(cut["run_dir"] / "last.pt"), "--device", "cpu",
                               "--set", "train.steps=4"])
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- time limits ----


@pytest.mark.slow
class VirtualClock:
    """`time` for main.py and engine/budget.py, reading a virtual clock that only training steps and evaluations move:
    a time-limited run's plan is then the same on any machine under any load (no test depends on timing)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)  # strftime for the run folder's name


def test_time_limited_run_ends_in_time_with_its_whole_schedule_and_resumes_its_plan(shapes, tmp_path, monkeypatch):
    limit, clock = 0.3, VirtualClock()  # 18 virtual seconds
    step_seconds = {64: 0.25, 96: 0.25 * (96 / 64) ** 2}  # a step costs its input's area, 1 s per evaluation
    train_one_step, evaluate = train_main.train_one_step, train_main.evaluate

    def timed_step(*args):
        result = train_one_step(*args)
        clock.now += step_seconds[result.size]
        return result

    def timed_evaluate(*args, **kwargs):
        clock.now += 1.0
        return evaluate(*args, **kwargs)

    for module, name, value in ((train_main, "time", clock), (budget_module, "time", clock),
                                (train_main, "train_one_step", timed_step), (train_main, "evaluate", timed_evaluate)):
        monkeypatch.setattr(module, name, value)
    run = train_main.main(run_args(shapes, tmp_path, f"train.time_limit={limit}", "train.lr_steps=[0.5,0.75]",
                                   "train.lr_scales=[0.1,0.1]", "train.lr=0.002", "eval.every=25"))
    seconds = clock.now - 1000.0
    # the run ends inside the limit and uses most of it (the fit's estimates: 2.2 s an evaluation, which costs 1 s)
    assert 0.75 * 60 * limit < seconds <= 60 * limit
    state = load_checkpoint(run["run_dir"] / "last.pt")
    steps = state["state"]["planned_steps"]
    assert steps >= TimeBudgetProbe and state["state"]["step"] == steps and run["state"]["step"] == steps
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.002 * 0.01)  # the schedule's final lr
    monkeypatch.undo()
    resumed = train_main.main(["--resume", str(run["run_dir"] / "last.pt"), "--device", "cpu"])
    assert resumed["state"]["step"] == steps  # the fitted plan, not train.steps (500,200)


TimeBudgetProbe = 12  # engine/budget.py TimeBudget.PROBE_STEPS: a fitted run is at least that long


def alternating_sizes(start: int, stop: int) -> np.ndarray:
    """A stand-in multi-scale draw: steps 0-9 at 320, 10-19 at 480, 20-29 at 320, ..."""
    return np.where(np.arange(start, stop) // 10 % 2 == 0, 320, 480)


def timed_budget(minutes: float) -> TimeBudget:
    """A budget that has timed 12 steps: 2 warm-up steps (10 s), 8 at 320 (1 s), the first at 480 (5 s: kernels for
    a new size), one more at 480 (2.25 s: (480 / 320)^2 x 1 s, the area law)."""
    budget = TimeBudget(minutes, time.perf_counter(), alternating_sizes)
    times = [10, 10] + [1.0] * 8 + [5.0, 2.25]
    budget.samples = [(k + 1, t, int(alternating_sizes(k, k + 1)[0])) for k, t in enumerate(times)]
    return budget


def test_time_budget_adds_up_the_sizes_the_run_will_train_at():
    cfg = load_config(ROOT / "args.yaml", ["data.img_size=384", "data.multiscale=[320,480]", "eval.every=1000",
                                           "train.checkpoint_every=1000"])
    budget = timed_budget(40 / 60 / (1 - TimeBudget.MARGIN) + 1e-4)  # 40 s left
    seconds = budget.seconds_at()
    # one-off steps left out: 320 costs its 1 s, 480 its 2.25 s; 400 is scaled from 480, by the fitted exponent 2
    assert seconds(np.array([320.0, 480.0, 400.0])) == pytest.approx([1.0, 2.25, 2.25 * (400 / 480) ** 2])
    # steps 13-20 at 480 (18 s), 21-30 at 320 (10 s), 31-34 at 480 (9 s): 37 s, + the last evaluation (1 s), best.pt
    # and last.pt (0.5 s each) = 39 s; step 35 would end at 41.25 s
    assert budget.fit(12, 1.0, 0.5, cfg, None) == 34
    # a refit stays within REFIT_RANGE of the plan it replaces
    assert budget.fit(12, 1.0, 0.5, cfg, 100) == 50
    assert budget.fit(12, 1.0, 0.5, cfg, 20) == 34


def test_time_budget_refits_at_a_quarter_half_and_three_quarters_of_the_plan():
    budget = timed_budget(5)
    budget.planned(12, 76)
    assert budget.refit_at == 19 and budget.due(19, True) and not budget.due(12, True)
    budget.planned(19, 64)
    assert budget.refit_at == 32
    budget.planned(32, 80)
    assert budget.refit_at == 60
    budget.planned(60, 61)
    assert budget.refit_at is None  # every refit done


def test_time_budget_with_one_size_timed_scales_by_the_area():
    budget = timed_budget(5)
    budget.samples = budget.samples[:10]  # steps 1-10, all at 320
    assert budget.seconds_at()(np.array([480.0, 160.0])) == pytest.approx([2.25, 0.25])


# ---- schedules relative to the run ----


def test_lr_steps_as_fractions_and_burn_in_capped_at_a_tenth():
    plan = resolve_schedule(TrainConfig(steps=1000, burn_in=1000, lr_steps=[0.8, 0.9]))
    assert (plan.steps, plan.burn_in, plan.lr_steps) == (1000, 100, (800, 900))
    coco = resolve_schedule(TrainConfig())  # args.yaml's COCO schedule is what it was
    assert (coco.steps, coco.burn_in, coco.lr_steps, coco.cosine_t0) == (500200, 1000, (400000, 450000), 10000)
    fitted = resolve_schedule(TrainConfig(), steps=1000)  # a time-fitted run scales absolute steps with it
    assert (fitted.burn_in, fitted.lr_steps, fitted.cosine_t0) == (100, (800, 900), 20)
    cfg = TrainConfig(steps=1000, burn_in=1000, lr_steps=[0.8, 0.9], lr_scales=[0.1, 0.5])
    assert [lr_factor(s, cfg) for s in (99, 799, 800, 899, 900)] == pytest.approx([1, 1, 0.1, 0.1, 0.05])
    assert lr_factor(0, cfg) == pytest.approx((1 / 100) ** 4)


def test_multiscale_relative_to_img_size():
    assert DataConfig().train_size_range() == (320, 608)  # Darknet's range at 416, as shipped
    assert DataConfig(img_size=320).train_size_range() == (256, 480)
    assert DataConfig(img_size=608).train_size_range() == (480, 896)
    assert DataConfig(multiscale=[320, 352]).train_size_range() == (320, 352)  # pixels
    assert DataConfig(multiscale=None).train_size_range() == (416, 416)


@pytest.mark.parametrize("overrides, message", [
    (["data.multiscale=[0.5, 640]"], "both as factors of data.img_size (below 8) or both as pixels"),
    (["data.img_size=32", "data.multiscale=[0.9, 0.95]"], "holds no multiple of 32"),
    (["train.lr_steps=[0.5, 900]"], "all steps (integers >= 0) or all fractions"),
    (["train.time_limit=0"], "train.time_limit=0.0: must be a positive number of minutes"),
    (["train.freeze=heads"], "unknown freeze 'heads'"),
])
def test_bad_relative_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(Config, {}, "<test>", overrides)


@pytest.mark.slow
def test_every_ddp_rank_follows_the_fitted_plan(shapes, tmp_path):
    run, ranks = run_two_ranks(tmp_path, run_args(shapes, tmp_path / "logs", "train.time_limit=0.3"), "result['state']")
    assert ranks[0]["planned_steps"] == ranks[1]["planned_steps"] == ranks[0]["step"] == ranks[1]["step"]
    assert "fitted" in run.stdout
