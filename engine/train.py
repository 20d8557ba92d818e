"""One optimiser step of the run, read top to bottom, and the counter that stops a run whose steps keep failing.

`micro_batches` feeds the loader's micro-batches to the device epoch after epoch; `train_one_step` is one optimiser
step: fetch -> freeze -> `train_step` (forward/backward -> skip/clip -> update) -> schedule -> EMA -> count, and
returns what it did; `BadStepCounter` says when non-finite steps in a row mean the run has diverged.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from datasets.loader import checked_batches
from engine.state import Trainer, TrainState
from models.forms import autocast
from models.loss import YOLOLoss
from utils.config import TrainConfig
from utils.distributed import all_reduce_mean, get_world_size
from utils.logger import log


@dataclass
class StepResult:
    """What one optimiser step did."""

    losses: dict[str, float]  # total, xy, wh, obj, cls: per image, averaged over the micro-batches
    grad_norm: float  # before clipping (inf / nan when the step was skipped)
    skipped: bool  # True when the loss or gradients were not finite: nothing changed (weights, BatchNorm statistics)
    clipped: bool = False  # True when grad_norm exceeded train.clip_grad_norm and the update was scaled down
    lr: float = 0.0  # the learning rate the update ran at
    size: int = 0  # the input side of the step's batches
    images: int = 0  # the step's images, over all ranks
    data_seconds: float = 0.0  # the time spent waiting for the step's micro-batches


def micro_batches(loader: DataLoader, state: TrainState, device: torch.device
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (images (b, 3, S, S) uint8, targets (K, 6)) micro-batches on the device, epoch after epoch, keeping
    state.epoch and state.batch_in_epoch current so a checkpoint knows where the data stands."""
    while True:
        loader.batch_sampler.set_epoch(state.epoch, start_batch=state.batch_in_epoch)
        for images, targets, _ in checked_batches(loader):
            state.batch_in_epoch += 1
            state.skipped_images += loader.batch_sampler.batch_size - len(images)
            if len(images):  # every image of the batch unreadable and skipped
                yield images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0


def train_one_step(trainer: Trainer, model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
                   ) -> StepResult:
    """One optimiser step of the run on `model` (trainer.model or its DDP wrapper): train.subdivisions micro-batches
    fetched, the encoder frozen or not, the update, the schedule's next lr, the EMA, the step counted."""
    train_cfg, state = trainer.cfg.train, trainer.state
    start = time.perf_counter()
    step_batches = [next(batches) for _ in range(train_cfg.subdivisions)]
    data_seconds = time.perf_counter() - start
    apply_freeze(trainer.model, train_cfg, state.step)
    lr = trainer.scheduler.get_last_lr()[0]
    update = train_step(model, trainer.loss_fn, step_batches, trainer.optimizer, trainer.scaler, trainer.amp_dtype,
                        train_cfg.clip_grad_norm)
    trainer.scheduler.step()  # the schedule counts every step, skipped or not (engine/__init__.py)
    if trainer.ema and not update.skipped:
        trainer.ema.update(trainer.model)
    state.step += 1
    state.skipped_steps += update.skipped
    images = sum(len(images) for images, _ in step_batches) * get_world_size()
    return replace(update, lr=lr, size=step_batches[0][0].shape[-1], images=images, data_seconds=data_seconds)


def apply_freeze(model: nn.Module, train_cfg: TrainConfig, step: int) -> None:
    """train.freeze for the first train.freeze_steps steps: the encoder gets no gradient (so no update) and its
    BatchNorm layers use and keep their running statistics; from step train.freeze_steps on everything trains."""
    if train_cfg.freeze == "none":
        return
    frozen = step < train_cfg.freeze_steps
    encoder = model.encoder
    for p in encoder.parameters():
        p.requires_grad_(not frozen)
    encoder.train(model.training and not frozen)


def train_step(model: nn.Module, loss_fn: YOLOLoss, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None,
               clip_grad_norm: float | None) -> StepResult:
    """Forward/backward each micro-batch (images (b, 3, S, S), targets (K, 6) on the device), then one update.

    Each micro-batch's loss is per image; dividing by the number of micro-batches makes the summed gradient the
    per-image mean over the whole batch, as one big batch would give. Under DDP the gradients are synchronised on
    the last micro-batch only (no_sync before), once per step.
    """
    device = micro_batches[0][0].device
    sums: dict[str, torch.Tensor] = {}
    saved = BufferSnapshot(model)  # BatchNorm statistics, restored if the step is skipped
    for i, (images, targets) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device, amp_dtype):
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
    clipped = not skipped and grad_norm > max_norm
    if skipped:  # a NaN forward pass has put NaN into the running statistics that evaluation uses
        saved.restore()
    if skipped and not scaler.is_enabled():
        optimizer.zero_grad(set_to_none=True)  # fp32 / bf16: nothing would catch the non-finite gradients
    else:
        scaler.step(optimizer)  # the fp16 scaler skips the update itself when it found inf / nan
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(totals, grad_norm, skipped, clipped)


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


# -- non-finite steps: train_step skips them; this counts them in a row and says when training has diverged -------


def describe_step(step: int, result: StepResult) -> str:
    """'step 7: loss nan (xy 0.1 wh nan obj 2.3 cls 0.4), grad norm nan, lr 1.00e-03' for messages."""
    terms = " ".join(f"{k} {v:.4g}" for k, v in result.losses.items() if k != "total")
    return (f"step {step}: loss {result.losses['total']:.4g} ({terms}), grad norm {result.grad_norm:.4g}, "
            f"lr {result.lr:.2e}")


@dataclass
class BadStepCounter:
    """Counts consecutive skipped (non-finite) steps; `update` returns the stop message at `max_bad_steps` in a row.

    A skipped step leaves weights, optimiser and BatchNorm statistics as they were (train_step), so a few in a
    row are harmless (the fp16 GradScaler skips some by design while it finds its scale); many in a row mean the
    data or the learning rate is broken and more steps only burn time.
    """

    max_bad_steps: int
    checkpoint: Path  # last.pt of the run: the stop message says whether it holds the last good state
    in_a_row: int = 0

    def update(self, step: int, result: StepResult) -> str | None:
        """Count `result` of optimiser step number `step` (1-based); None, or why training stops."""
        if not result.skipped:
            self.in_a_row = 0
            return None
        self.in_a_row += 1
        where = describe_step(step, result)
        log.warning("skipped %s (%d in a row; training stops at train.max_bad_steps=%d)", where, self.in_a_row,
                    self.max_bad_steps)
        if self.in_a_row < self.max_bad_steps:
            return None
        kept = f"{self.checkpoint} is left as the last good checkpoint" if self.checkpoint.is_file() else \
            f"no checkpoint had been written yet ({self.checkpoint})"
        return (f"{self.in_a_row} optimiser steps in a row had a non-finite loss or gradient "
                f"(train.max_bad_steps={self.max_bad_steps}); the last was {where}. {kept}. Look for NaN/Inf in the "
                "data, lower train.lr or set train.clip_grad_norm, then resume")
