"""Exponential moving average of the weights: what training evaluates and checkpoints save beside the raw weights."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA:
    """ema = d * ema + (1 - d) * weights after every optimiser step, with d ramped from 0 to `decay` over the first
    few thousand updates (d = decay * (1 - exp(-updates / ramp))), so early weights are not averaged in for long.
    BatchNorm running statistics (buffers) are averaged too.

    The ramp is Ultralytics YOLOv5's ModelEMA (utils/torch_utils.py: `decay * (1 - math.exp(-x / tau))` with
    tau = 2000, which averages the whole state_dict, buffers included, as here)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, ramp: float = 2000.0) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.ramp, self.updates = decay, ramp, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average."""
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.ramp))
        current = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(current[name].detach(), alpha=1 - d)
            else:
                value.copy_(current[name])

    def state_dict(self) -> dict:
        """The averaged weights and the update count."""
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]
