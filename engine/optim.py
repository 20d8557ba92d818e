"""Optimiser and learning-rate schedule: Darknet's burn-in, then steps, cosine with restarts, or constant.

`lr_factor(step)` is the multiplier of train.lr for the optimiser update of 0-based index `step`; `build_scheduler`
steps it once per optimiser step (engine/__init__.py: the step convention).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from utils.config import OPTIMIZERS, TrainConfig

BURN_IN_POWER = 4  # Darknet's `power=4` for burn_in (network.c, get_current_rate)
BURN_IN_SHARE = 0.1  # burn-in takes at most this share of a run's steps


def parameter_groups(model: nn.Module, weight_decay: float, lr: float = 0.0, encoder_lr_scale: float = 1.0
                     ) -> list[dict[str, Any]]:
    """[decay group, no-decay group]: weight decay on conv / linear weights only; with encoder_lr_scale != 1, the
    encoder's parameters in two more groups (decay, no decay) whose lr is lr * encoder_lr_scale (the schedule
    multiplies every group's own lr, so the ratio holds at every step).

    A parameter with ndim <= 1 gets no decay: BatchNorm weights and biases and every bias are vectors, while
    conv (4-d) and linear (2-d) weights are not. Testing the shape, not the module type, also covers the
    norm layers of torchvision encoders and any layer added later (YOLO practice: decay only the weights).
    """
    params = list(model.parameters())  # shared parameters appear once
    encoder = {id(p) for p in model.encoder.parameters()} if encoder_lr_scale != 1.0 else set()
    parts = [([p for p in params if id(p) not in encoder], {})]
    if encoder:  # two groups more only when asked for: a checkpoint's optimiser state keeps its two groups otherwise
        parts.append(([p for p in params if id(p) in encoder], {"lr": lr * encoder_lr_scale}))
    return [{"params": [p for p in part if (p.ndim > 1) == decay], "weight_decay": weight_decay if decay else 0.0,
             **extra} for part, extra in parts for decay in (True, False)]


def fused_update(model: nn.Module) -> bool | None:
    """True where every parameter lives on a CPU or a CUDA GPU, for which torch's optimisers have fused kernels (one
    kernel per parameter dtype and device instead of foreach's chain of them: 1.02-1.09x per YOLOv3(-tiny) training
    step on a 2-core CPU, BENCHMARKS.md); None elsewhere (torch's own choice, foreach)."""
    return True if all(p.device.type in ("cpu", "cuda") for p in model.parameters()) else None


def build_optimizer(model: nn.Module, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (betas (momentum, 0.999), L2 weight decay) or SGD (momentum, no Nesterov) over `parameter_groups`, with
    fused updates where `fused_update` says so."""
    groups = parameter_groups(model, train_cfg.weight_decay, train_cfg.lr, train_cfg.encoder_lr_scale)
    fused = fused_update(model)
    if train_cfg.optimizer == "adam":
        # Adam's own weight_decay adds decay * w to the gradient (L2, as the seed did), not AdamW's decoupled decay.
        return torch.optim.Adam(groups, lr=train_cfg.lr, betas=(train_cfg.momentum, 0.999), fused=fused)
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train_cfg.lr, momentum=train_cfg.momentum, nesterov=False, fused=fused)
    raise ValueError(f"train.optimizer={train_cfg.optimizer!r}: unknown optimizer; use one of {OPTIMIZERS}")


def cosine_restart_position(t: int, t0: int, t_mult: int) -> tuple[int, int]:
    """(t_cur, T): position in, and length of, the SGDR cycle holding step t >= 0; cycles last t0, t0*t_mult, ..."""
    if t_mult == 1:
        return t % t0, t0
    length = t0
    while t >= length:  # integer arithmetic: exact at cycle boundaries, where a log formula can round wrongly
        t -= length
        length *= t_mult
    return t, length


@dataclass(frozen=True)
class Schedule:
    """The lr schedule of one run in absolute optimiser steps: train.* resolved for a run of `steps` steps."""

    steps: int
    burn_in: int
    lr_steps: tuple[int, ...]
    cosine_t0: int


def resolve_schedule(train_cfg: TrainConfig, steps: int | None = None) -> Schedule:
    """train_cfg's schedule for a run of `steps` optimiser steps (default train.steps; a time-limited run passes its
    fitted count). Fractional lr_steps (all below 1) are fractions of `steps`; absolute lr_steps and cosine_t0 scale
    by steps / train.steps, so a fitted run keeps the schedule's shape. Burn-in is at most BURN_IN_SHARE of the run
    (rounded down), so that a short run is not all warm-up; COCO's 1000 of 500,200 is untouched."""
    steps = train_cfg.steps if steps is None else steps
    scale = steps / train_cfg.steps
    fractions = all(v < 1 for v in train_cfg.lr_steps)
    lr_steps = tuple(round(v * steps) if fractions else round(v * scale) for v in train_cfg.lr_steps)
    return Schedule(steps, min(train_cfg.burn_in, int(BURN_IN_SHARE * steps)), lr_steps,
                    max(1, round(train_cfg.cosine_t0 * scale)))


def lr_factor(step: int, train_cfg: TrainConfig, steps: int | None = None) -> float:
    """Multiplier of train_cfg.lr for the optimiser update of 0-based index `step` (step 0: the first update) in a
    run of `steps` steps (default train.steps; see resolve_schedule).

    Burn-in (Darknet's warm-up, network.c get_current_rate): ((step + 1) / burn_in) ** 4 for step < burn_in.
    Darknet counts `batch_num` after adding the current batch to `seen` (train_network_datum increments `seen`
    before update_network), so its first update uses (1 / burn_in) ** 4, not 0; step + 1 is that count.
    The ramp reaches exactly 1 at step burn_in - 1 and joins the schedule without a jump.

    After burn-in:
    - steps: the product of lr_scales[i] over every lr_steps[i] <= step (Darknet's `policy=steps`; it compares
      with its 1-based count, so Darknet switches one update earlier than this, which is negligible).
    - cosine: SGDR (Loshchilov & Hutter 2017, eq. 5) over t = step - burn_in with cycles cosine_t0,
      cosine_t0 * cosine_t_mult, ...: eta_min + (lr - eta_min) * (1 + cos(pi * t_cur / T)) / 2, divided by lr.
    - constant: 1.
    """
    plan = resolve_schedule(train_cfg, steps)
    if step < plan.burn_in:
        return ((step + 1) / plan.burn_in) ** BURN_IN_POWER
    if train_cfg.scheduler == "steps":
        return math.prod(scale for at, scale in zip(plan.lr_steps, train_cfg.lr_scales, strict=True) if at <= step)
    if train_cfg.scheduler == "cosine":
        t_cur, length = cosine_restart_position(step - plan.burn_in, plan.cosine_t0, train_cfg.cosine_t_mult)
        floor = train_cfg.cosine_eta_min / train_cfg.lr
        return floor + (1 - floor) * (1 + math.cos(math.pi * t_cur / length)) / 2
    if train_cfg.scheduler == "constant":
        return 1.0
    raise ValueError(f"train.scheduler={train_cfg.scheduler!r}: unknown scheduler; use steps, cosine or constant")


class ResumableLambdaLR(LambdaLR):
    """LambdaLR whose load_state_dict also sets the optimiser's lr to the resumed step's.

    Plain LambdaLR only restores `last_epoch`, so the update right after a resume would use whatever lr the
    optimiser held (the step-0 warm-up lr when the scheduler is built after the optimiser state was loaded).
    """

    def step(self, epoch: int | None = None) -> None:
        """LambdaLR.step without torch's warning that it came before optimizer.step(): the schedule is indexed by
        optimiser step, skipped or not, and fp16 runs skip their first update(s) while GradScaler finds its scale
        (every AMP run on a GPU printed the warning, which also claims, falsely here, that a value was skipped)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before "
                                    r"`optimizer\.step\(\)`")
            super().step(epoch)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore last_epoch and base_lrs, then write base_lr * factor(last_epoch) into each param group."""
        super().load_state_dict(state_dict)
        lrs = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas, strict=True)]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = lrs


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig, steps: int | None = None) -> LambdaLR:
    """LambdaLR of `lr_factor` for a run of `steps` steps (default train.steps), stepped once per optimiser step;
    on return the groups hold step 0's lr.

    The schedule itself is not in the state_dict (only last_epoch and base_lrs are): a resumed run follows the
    schedule of the train_cfg (and step count) it is built with.
    """
    plan = resolve_schedule(train_cfg, steps)  # resolved once: lr_factor's own resolution gives the same numbers
    return ResumableLambdaLR(optimizer, lambda step: lr_factor(step, train_cfg, plan.steps))
