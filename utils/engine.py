"""One optimiser step: Darknet's batch of `subdivisions` micro-batches, mixed precision, clipping, skipped steps."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from utils.loss import YOLOLoss


@dataclass
class StepResult:
    """What one optimiser step did."""

    losses: dict[str, float]  # total, xy, wh, obj, cls: per image, averaged over the micro-batches
    grad_norm: float  # before clipping (inf / nan when the step was skipped)
    skipped: bool  # True when the loss or gradients were not finite: nothing changed (weights, BatchNorm statistics)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """train.amp -> the autocast dtype on this device, or None for fp32 (fp16 needs CUDA; bf16 works on both)."""
    if amp == "fp16" and device.type == "cuda":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    return None


def train_step(model: nn.Module, loss_fn: YOLOLoss, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None,
               clip_grad_norm: float | None) -> StepResult:
    """Forward/backward each micro-batch (images (b, 3, S, S), targets (K, 6) on the device), then one update.

    Each micro-batch's loss is per image; dividing by the number of micro-batches makes the summed gradient the
    per-image mean over the whole batch, as one big batch would give. Under DDP the gradients are synchronised on
    the last micro-batch only (no_sync before), once per step.
    """
    device_type = micro_batches[0][0].device.type
    totals: dict[str, float] = {}
    buffers = [b.clone() for b in model.buffers()]  # BatchNorm statistics, restored if the step is skipped
    for i, (images, targets) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                outputs = model(images)
            loss, terms = loss_fn([o.float() for o in outputs], targets)
            scaler.scale(loss / len(micro_batches)).backward()
        for key, value in {"total": loss.detach(), **terms}.items():
            totals[key] = totals.get(key, 0.0) + float(value) / len(micro_batches)
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    max_norm = clip_grad_norm if clip_grad_norm is not None else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    skipped = not math.isfinite(grad_norm) or not math.isfinite(totals["total"])
    if skipped:  # a NaN forward pass has put NaN into the running statistics that evaluation uses
        for buffer, saved in zip(model.buffers(), buffers, strict=True):
            buffer.copy_(saved)
    if skipped and not scaler.is_enabled():
        optimizer.zero_grad(set_to_none=True)  # fp32 / bf16: nothing would catch the non-finite gradients
    else:
        scaler.step(optimizer)  # the fp16 scaler skips the update itself when it found inf / nan
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(totals, grad_norm, skipped)
