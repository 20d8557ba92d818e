"""Optimiser parameter groups, the lr schedule against hand-computed values, exact resume, and the plotting tool."""
import copy
import math
import warnings

import cv2
import pytest
import torch
from torch import nn

from engine.optim import build_optimizer, build_scheduler, fused_update, lr_factor
from models import build_model
from tools.lr_scheduler_creator import main as plot_main
from tools.lr_scheduler_creator import sample_steps
from utils.config import TrainConfig


def small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1), nn.Flatten(), nn.LazyLinear(2))


def advance(optimizer, scheduler, n):
    for _ in range(n):
        optimizer.step()  # no gradients: changes nothing, but keeps the usual optimizer-then-scheduler order
        scheduler.step()


# ---- parameter groups and optimisers ----

def test_weight_decay_groups_on_tiny():
    model = build_model("yolov3-tiny", num_classes=2)
    optimizer = build_optimizer(model, TrainConfig(weight_decay=5e-4))
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (5e-4, 0.0)
    decay_ids, no_decay_ids = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    convs = bns = 0
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            bns += 1
            assert {id(m.weight), id(m.bias)} <= no_decay_ids
        elif isinstance(m, nn.Conv2d):
            convs += 1
            assert id(m.weight) in decay_ids
            if m.bias is not None:
                assert id(m.bias) in no_decay_ids
    assert convs == 13 and bns == 11  # yolov3-tiny.cfg: 13 convolutional layers, 2 of them (outputs) without BN
    assert not decay_ids & no_decay_ids
    all_params = list(model.parameters())
    assert len(decay_ids) + len(no_decay_ids) == len(all_params) == len(decay["params"]) + len(no_decay["params"])
    assert decay_ids | no_decay_ids == {id(p) for p in all_params}


def test_adam_hyper_parameters():
    cfg = TrainConfig(optimizer="adam", lr=0.002, momentum=0.8, weight_decay=1e-4)
    optimizer = build_optimizer(small_model(), cfg)
    assert type(optimizer) is torch.optim.Adam
    for group in optimizer.param_groups:
        assert group["betas"] == (0.8, 0.999)
        assert group["lr"] == 0.002
        assert not group["decoupled_weight_decay"]  # L2 through the gradient, not AdamW
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 0.0]


def test_sgd_hyper_parameters():
    cfg = TrainConfig(optimizer="sgd", lr=0.01, momentum=0.95, weight_decay=5e-4)
    optimizer = build_optimizer(small_model(), cfg)
    assert type(optimizer) is torch.optim.SGD
    for group in optimizer.param_groups:
        assert (group["momentum"], group["nesterov"], group["lr"]) == (0.95, False, 0.01)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0.0]


def test_encoder_lr_scale_moves_the_encoder_by_that_share_at_every_step():
    """SGD without momentum or decay: one update moves each weight by lr * factor * its gradient, so the encoder's by
    encoder_lr_scale times as much; the ratio holds through the schedule (burn-in here) and the two extra groups
    exist only when asked for."""
    torch.manual_seed(0)
    model = build_model("yolov3-tiny", num_classes=2).double()  # float64: the update is exact to 1e-12
    cfg = TrainConfig(optimizer="sgd", lr=0.01, momentum=0.0, weight_decay=0.0, encoder_lr_scale=0.1, burn_in=4,
                      steps=40)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01 / 256] * 2 + [0.001 / 256] * 2)
    encoder = {id(p) for p in model.encoder.parameters()}
    assert {id(p) for g in optimizer.param_groups[2:] for p in g["params"]} == encoder
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    scheduler.step()
    for p, old in zip(model.parameters(), before, strict=True):
        lr = 0.01 * (0.1 if id(p) in encoder else 1.0) / 256  # burn-in factor (1 / 4) ** 4 at step 0
        torch.testing.assert_close(old - p.detach(), torch.full_like(p, lr), rtol=1e-9, atol=1e-15)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01 / 16] * 2 + [0.001 / 16] * 2)
    assert len(build_optimizer(model, TrainConfig()).param_groups) == 2  # the default: two groups, as checkpoints hold


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_fused_update_on_cpu_computes_what_the_foreach_update_does(name):
    """build_optimizer takes the fused kernels on a CPU (fused_update) and they give the foreach update's weights
    over three steps, in both groups (weight decay on the convs' weights, none on the rest), with momentum; elsewhere
    (a meta device here) torch's choice."""
    torch.manual_seed(0)
    start = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    models = [copy.deepcopy(start), copy.deepcopy(start)]
    x = torch.randn(2, 3, 6, 6)
    cfg = TrainConfig(optimizer=name, lr=0.01, weight_decay=5e-4)
    optimizers = [build_optimizer(m, cfg) for m in models]
    assert all(g["fused"] is True for g in optimizers[0].param_groups)
    for group in optimizers[1].param_groups:  # the same optimiser, told to take torch's foreach path
        group.update(fused=None, foreach=True)
    for _ in range(3):
        for model, optimizer in zip(models, optimizers, strict=True):
            optimizer.zero_grad()
            model(x).square().sum().backward()
            optimizer.step()
    for fused, foreach in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(fused, foreach, rtol=1e-6, atol=1e-7)
    assert not torch.equal(models[0][0].weight, start[0].weight)  # it moved
    assert fused_update(nn.Linear(2, 2, device="meta")) is None


def test_unknown_optimizer_names_the_key():
    with pytest.raises(ValueError, match=r"train\.optimizer.*rmsprop"):
        # past the schema (which refuses it first): build_optimizer's own check
        bad = TrainConfig.model_construct(**{**TrainConfig().model_dump(), "optimizer": "rmsprop"})
        build_optimizer(small_model(), bad)


# ---- lr_factor by hand ----

def test_burn_in_is_darknets_power_4_counting_the_current_update():
    cfg = TrainConfig(burn_in=100, scheduler="constant")
    assert lr_factor(0, cfg) == pytest.approx(1e-8)  # (1 / 100) ** 4: the first update already learns a little
    assert lr_factor(50, cfg) == pytest.approx(0.06765201)  # 0.51 ** 4
    assert lr_factor(99, cfg) == 1.0  # (100 / 100) ** 4: the ramp ends on the peak
    assert lr_factor(100, cfg) == 1.0
    assert lr_factor(100, TrainConfig(burn_in=100, scheduler="steps", lr_steps=[200], lr_scales=[0.1])) == 1.0


def test_steps_schedule():
    cfg = TrainConfig(burn_in=100, scheduler="steps", lr_steps=[200, 300], lr_scales=[0.1, 0.5])
    assert lr_factor(199, cfg) == 1.0
    assert lr_factor(200, cfg) == pytest.approx(0.1)
    assert lr_factor(299, cfg) == pytest.approx(0.1)
    assert lr_factor(300, cfg) == pytest.approx(0.05)
    assert lr_factor(10**6, cfg) == pytest.approx(0.05)  # stays at the full product past the last step


def test_cosine_with_warm_restarts():
    # eta_min / lr = 0.1, so the middle of a cycle is 0.1 + 0.9 * (1 + cos(pi / 2)) / 2 = 0.55
    cfg = TrainConfig(lr=0.001, burn_in=100, scheduler="cosine", cosine_t0=10, cosine_t_mult=2, cosine_eta_min=1e-4)
    assert lr_factor(100, cfg) == 1.0
    assert lr_factor(105, cfg) == pytest.approx(0.55)
    assert lr_factor(109, cfg) == pytest.approx(0.1 + 0.9 * (1 + math.cos(0.9 * math.pi)) / 2)
    assert lr_factor(110, cfg) == 1.0  # restart; the next cycle is 20 long
    assert lr_factor(120, cfg) == pytest.approx(0.55)
    assert lr_factor(129, cfg) == pytest.approx(0.1 + 0.9 * (1 + math.cos(19 / 20 * math.pi)) / 2)
    assert lr_factor(130, cfg) == 1.0  # restart; the next cycle is 40 long
    assert lr_factor(150, cfg) == pytest.approx(0.55)


def test_cosine_without_growth_repeats():
    cfg = TrainConfig(lr=0.001, burn_in=0, scheduler="cosine", cosine_t0=10, cosine_t_mult=1, cosine_eta_min=1e-4)
    assert [lr_factor(s, cfg) for s in (0, 10, 10**6)] == [1.0, 1.0, 1.0]
    assert lr_factor(10**6 + 5, cfg) == pytest.approx(0.55)


def test_no_burn_in():
    assert lr_factor(0, TrainConfig(burn_in=0, scheduler="constant")) == 1.0
    assert lr_factor(0, TrainConfig(burn_in=0, scheduler="steps", lr_steps=[0], lr_scales=[0.1])) == pytest.approx(0.1)
    cfg = TrainConfig(lr=0.001, burn_in=0, scheduler="cosine", cosine_t0=10, cosine_eta_min=1e-4)
    assert lr_factor(0, cfg) == 1.0
    assert lr_factor(5, cfg) == pytest.approx(0.55)


# ---- the scheduler on a real optimiser ----

@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_scheduler_sets_each_updates_lr(optimizer):
    cfg = TrainConfig(optimizer=optimizer, lr=0.01, burn_in=10, scheduler="steps", lr_steps=[15], lr_scales=[0.1])
    opt = build_optimizer(small_model(), cfg)
    scheduler = build_scheduler(opt, cfg)
    assert all(group["initial_lr"] == 0.01 for group in opt.param_groups)
    # Before any update the groups hold step 0's lr: the warm-up's, not the peak.
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 1e-4)
    for k in range(20):
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(0.01 * lr_factor(k, cfg))
        assert scheduler.last_epoch == k
        advance(opt, scheduler, 1)


@pytest.mark.parametrize("scheduler_name", ["steps", "cosine", "constant"])
@pytest.mark.parametrize("load_optimizer_state", [False, True])
def test_resume_is_exact(tmp_path, scheduler_name, load_optimizer_state):
    # burn-in ends at 30, lr_steps at 40 and 45, and the first cosine restart at 40: all inside steps 37..47
    cfg = TrainConfig(lr=0.01, burn_in=30, scheduler=scheduler_name, lr_steps=[40, 45], lr_scales=[0.1, 0.5],
                      cosine_t0=10, cosine_eta_min=1e-4)

    def lrs_from(opt, scheduler, n):
        lrs = []
        for _ in range(n):
            lrs.append([g["lr"] for g in opt.param_groups])  # the lr of the coming update
            advance(opt, scheduler, 1)
        return lrs

    opt = build_optimizer(small_model(), cfg)
    scheduler = build_scheduler(opt, cfg)
    unbroken = lrs_from(opt, scheduler, 47)[37:]

    opt = build_optimizer(small_model(), cfg)
    scheduler = build_scheduler(opt, cfg)
    advance(opt, scheduler, 37)
    torch.save({"optimizer": opt.state_dict(), "scheduler": scheduler.state_dict()}, tmp_path / "last.pt")

    state = torch.load(tmp_path / "last.pt", weights_only=True)
    opt = build_optimizer(small_model(), cfg)
    if load_optimizer_state:
        opt.load_state_dict(state["optimizer"])
    scheduler = build_scheduler(opt, cfg)
    scheduler.load_state_dict(state["scheduler"])
    assert scheduler.last_epoch == 37
    assert lrs_from(opt, scheduler, 10) == unbroken


# ---- tools/lr_scheduler_creator.py ----

def test_tool_writes_png(tmp_path, capsys):
    config = tmp_path / "args.yaml"
    config.write_text("train:\n  lr: 0.001\n")
    out = tmp_path / "plots" / "lr.png"
    path = plot_main(["--config", str(config), "--out", str(out), "--steps", "500", "--log",
                      "--set", "train.burn_in=50", "train.lr_steps=[300,400]", "train.steps=500"])
    assert path == out
    image = cv2.imread(str(out))
    assert image is not None and image.ndim == 3 and min(image.shape[:2]) > 100
    printed = capsys.readouterr().out
    assert str(out) in printed
    for step, lr in ((0, 0.001 * (1 / 50) ** 4), (50, 0.001), (300, 0.0001), (400, 0.00001), (499, 0.00001)):
        assert f"step {step:>9,}" in printed and f"lr {lr:.6g}" in printed


def test_tool_sampling_is_bounded_and_keeps_change_points():
    cfg = TrainConfig()  # 500200 steps, burn-in 1000, lr_steps 400000 and 450000
    xs = sample_steps(cfg, cfg.steps)
    assert len(xs) < 6000
    assert xs[0] == 0 and xs[-1] == cfg.steps - 1
    assert {999, 1000, 399999, 400000, 449999, 450000} <= set(xs)


def test_a_skipped_first_step_raises_no_scheduler_order_warning():
    # the fp16 scaler skips the first update(s) while it finds its scale; the schedule is indexed by step, skipped or
    # not, so torch's "lr_scheduler.step() before optimizer.step()" warning would be false (it was printed by every
    # AMP run on a GPU)
    cfg = TrainConfig(lr=0.01, burn_in=0, scheduler="steps", lr_steps=[1], lr_scales=[0.1])
    opt = build_optimizer(small_model(), cfg)
    scheduler = build_scheduler(opt, cfg)
    with warnings.catch_warnings(record=True) as caught:
        scheduler.step()  # no optimizer.step() before: the step was skipped
    assert [str(w.message) for w in caught] == []
    assert scheduler.last_epoch == 1 and opt.param_groups[0]["lr"] == pytest.approx(0.001)  # step 1's lr
