"""One optimiser step: Darknet's batch of `subdivisions` micro-batches, mixed precision, clipping, skipped steps."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from utils.distributed import all_reduce_mean
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


class BufferSnapshot:
    """A copy of a module's buffers (BatchNorm statistics) in one flat tensor per dtype, restorable in place.

    One concatenation per dtype instead of a clone per buffer: YOLOv3 has ~225 buffers, each clone a kernel launch
    on CUDA, every step; the restore (rare: skipped steps only) copies them back one by one.
    """

    def __init__(self, module: nn.Module) -> None:
        self.buffers = list(module.buffers())
        dtypes = sorted({b.dtype for b in self.buffers}, key=str)
        self.flat = {dtype: torch.cat([b.detach().reshape(-1) for b in self.buffers if b.dtype == dtype])
                     for dtype in dtypes}

    def restore(self) -> None:
        """Copy the saved values back into the module's buffers."""
        for dtype, flat in self.flat.items():
            group = [b for b in self.buffers if b.dtype == dtype]
            for buffer, part in zip(group, flat.split([b.numel() for b in group]), strict=True):
                buffer.copy_(part.view_as(buffer))


def train_step(model: nn.Module, loss_fn: YOLOLoss, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None,
               clip_grad_norm: float | None) -> StepResult:
    """Forward/backward each micro-batch (images (b, 3, S, S), targets (K, 6) on the device), then one update.

    Each micro-batch's loss is per image; dividing by the number of micro-batches makes the summed gradient the
    per-image mean over the whole batch, as one big batch would give. Under DDP the gradients are synchronised on
    the last micro-batch only (no_sync before), once per step.
    """
    device_type = micro_batches[0][0].device.type
    sums: dict[str, torch.Tensor] = {}
    saved = BufferSnapshot(model)  # BatchNorm statistics, restored if the step is skipped
    for i, (images, targets) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                outputs = model(images)
            loss, terms = loss_fn([o.float() for o in outputs], targets)
            scaler.scale(loss / len(micro_batches)).backward()
        for key, value in {"total": loss.detach(), **terms}.items():  # summed on the device: no sync per term
            sums[key] = sums[key] + value if key in sums else value
    # averaged over ranks as well: every rank logs the same loss and takes the same decision to skip (a non-finite
    # loss on one rank with finite gradients would otherwise skip the step there only, and the weights would part)
    means = all_reduce_mean({key: value / len(micro_batches) for key, value in sums.items()})
    totals = dict(zip(means, torch.stack(list(means.values())).tolist(), strict=True))
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    max_norm = clip_grad_norm if clip_grad_norm is not None else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    skipped = not math.isfinite(grad_norm) or not math.isfinite(totals["total"])
    if skipped:  # a NaN forward pass has put NaN into the running statistics that evaluation uses
        saved.restore()
    if skipped and not scaler.is_enabled():
        optimizer.zero_grad(set_to_none=True)  # fp32 / bf16: nothing would catch the non-finite gradients
    else:
        scaler.step(optimizer)  # the fp16 scaler skips the update itself when it found inf / nan
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(totals, grad_norm, skipped)
