"""What a training run is and what its checkpoint holds: `Trainer` (model, loss, optimiser, schedule, precision, EMA,
class names, `TrainState`) and the random generators' states.

A checkpoint (last.pt, best.pt; utils/checkpoint.py writes and reads it) is `Trainer.state_dict()`: model, ema
({module, updates} or None), optimizer, scheduler, scaler, state (TrainState as a dict), config (the resolved config),
class_names and rng. These keys are the format: runs resume from checkpoints written by earlier versions.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from engine.ema import ModelEMA
from engine.optim import build_optimizer, build_scheduler
from models.loss import YOLOLoss, build_loss
from utils.config import Config
from utils.config_load import config_to_dict
from utils.hardware import cpu_has_native_bf16


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""

    step: int = 0  # optimiser steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_metric: float = -1.0
    best_step: int = 0
    evals_without_improvement: int = 0
    skipped_steps: int = 0
    skipped_images: int = 0  # unreadable images left out of their batch (data.skip_bad_images)
    planned_steps: int | None = None  # the run's length as train.time_limit fitted it (None: train.steps)

    def record_evaluation(self, metric: float, patience: int | None) -> tuple[bool, bool]:
        """Count an evaluation's metric: (it is the best so far, patience is exhausted and training stops)."""
        if metric > self.best_metric:
            self.best_metric, self.best_step, self.evals_without_improvement = metric, self.step, 0
            return True, False
        self.evals_without_improvement += 1
        return False, bool(patience and self.evals_without_improvement >= patience)


def rng_state() -> dict:
    """Every random generator's state, in types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
            else [], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """train.amp -> the autocast dtype on this device, or None for fp32 (fp16 needs CUDA; bf16 works on both).

    auto: bf16 where it is native (a CPU with AVX512-BF16 / AMX-BF16, a GPU with bf16: no GradScaler, no skipped
    steps), fp16 on other GPUs, fp32 on other CPUs (emulated bf16 is slower than fp32). The rule is backed by
    bench/model.py's training-step rows (fp32 vs bf16 in alternating rounds) on each CPU kind: BENCHMARKS.md."""
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    if amp == "fp16" and device.type == "cuda":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    return None


@dataclass
class Trainer:
    """Everything a training run updates, built from the config; `state_dict` is one checkpoint's contents."""

    cfg: Config
    model: nn.Module  # unwrapped (not the DDP wrapper)
    loss_fn: YOLOLoss
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    ema: ModelEMA | None
    class_names: list[str]  # the training data's, in class order: a later --weights run matches classes by name
    state: TrainState = field(default_factory=TrainState)

    @classmethod
    def build(cls, model: nn.Module, cfg: Config, device: torch.device, class_names: list[str]) -> Trainer:
        """Loss, optimiser, schedule, precision and EMA for `model` (already on `device`)."""
        optimizer = build_optimizer(model, cfg.train)
        amp_dtype = autocast_dtype(cfg.train.amp, device)
        return cls(cfg, model, build_loss(model, cfg.loss), optimizer, build_scheduler(optimizer, cfg.train),
                   torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16), amp_dtype,
                   ModelEMA(model, cfg.train.ema_decay, cfg.train.ema_ramp) if cfg.train.ema else None,
                   list(class_names))

    @property
    def steps(self) -> int:
        """The run's length in optimiser steps: train.steps, or what train.time_limit fitted."""
        return self.state.planned_steps or self.cfg.train.steps

    def plan(self, steps: int) -> None:
        """Make the run `steps` steps long: the lr schedule is resolved anew for it, from the current step on."""
        self.state.planned_steps = steps
        position = self.scheduler.state_dict()
        self.scheduler = build_scheduler(self.optimizer, self.cfg.train, steps)
        self.scheduler.load_state_dict(position)  # same step; the optimiser's lr is the new schedule's

    def state_dict(self) -> dict[str, Any]:
        """model, EMA, optimiser, scheduler, scaler, state, the resolved config, class names and RNG states."""
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "state": asdict(self.state), "config": config_to_dict(self.cfg),
                "class_names": self.class_names, "rng": rng_state()}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Continue exactly where the checkpoint's run stopped (weights, optimiser, schedule and its fitted length,
        data position, RNGs)."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.state = TrainState(**checkpoint["state"])
        if self.state.planned_steps:
            self.scheduler = build_scheduler(self.optimizer, self.cfg.train, self.state.planned_steps)
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        if self.ema and checkpoint.get("ema"):
            self.ema.load_state_dict(checkpoint["ema"])
        set_rng_state(checkpoint["rng"])

    @property
    def eval_model(self) -> nn.Module:
        """The weights training evaluates: the EMA's when there is one."""
        return self.ema.module if self.ema else self.model

