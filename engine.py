"""The training engine and the one evaluation: what main.py runs between loading the data and writing the run.

One training image: the loader's micro-batch (datasets/loader.py) -> `micro_batches` (on the device) -> `train_step`
(forward, models/loss.py, backward, one optimiser update with the lr of `lr_factor`) -> EMA of the weights.
One validation image: `evaluate` -> the model in eval mode (decoded boxes) -> models/postprocess.py (NMS, back to
original pixels) -> COCO rows, gathered from every rank -> datasets/coco_eval.py (pycocotools' 12 numbers).
validation.py calls the same `evaluate`. The run's state (`Trainer`) is saved and restored whole by checkpoints.

Step convention used throughout: `step` is the 0-based index of an optimiser update, so step 0 is the very first
update. The training loop calls `optimizer.step()` and then `scheduler.step()` once per optimiser step, so
`scheduler.last_epoch` is always the index of the next update and its lr is `train_cfg.lr * lr_factor(that index)`.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
import random
import resource
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.coco_eval import coco_evaluate, to_coco_rows
from datasets.loader import checked_batches, train_sizes
from models.forms import Form, choose_form
from models.loss import YOLOLoss, build_loss
from models.postprocess import postprocess, to_original_pixels
from utils.config import OPTIMIZERS, Config, EvalConfig, TrainConfig, config_to_dict
from utils.distributed import all_gather_rows, all_reduce_mean, broadcast_object, get_world_size, is_main_process
from utils.hardware import cpu_has_native_bf16
from utils.logger import RunLogger, log
from utils.plots import draw_detections, image_grid

# -- the run's state --------------------------------------------------------------------------------------------


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
                   ModelEMA(model, cfg.train.ema_decay) if cfg.train.ema else None, list(class_names))

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

    def apply_freeze(self) -> None:
        """train.freeze for the first train.freeze_steps steps: the encoder gets no gradient (so no update) and its
        BatchNorm layers use and keep their running statistics; from then on everything trains."""
        if self.cfg.train.freeze == "none":
            return
        frozen = self.state.step < self.cfg.train.freeze_steps
        encoder = self.model.encoder
        for p in encoder.parameters():
            p.requires_grad_(not frozen)
        encoder.train(self.model.training and not frozen)

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

    def step(self, model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], window: ProgressWindow
             ) -> StepResult:
        """One optimiser step of `model` (the model or its DDP wrapper) on train.subdivisions micro-batches: the
        update, the schedule's next lr, the EMA; the step's data wait and images go into `window`."""
        start = time.perf_counter()
        step_batches = [next(batches) for _ in range(self.cfg.train.subdivisions)]
        window.data += time.perf_counter() - start
        window.images += sum(len(images) for images, _ in step_batches) * get_world_size()
        self.apply_freeze()
        result = train_step(model, self.loss_fn, step_batches, self.optimizer, self.scaler, self.amp_dtype,
                            self.cfg.train.clip_grad_norm)
        result.size = step_batches[0][0].shape[-1]
        return result

    def finish_step(self, result: StepResult) -> None:
        """After a step that did not stop the run: the schedule moves on, the EMA takes the new weights."""
        self.scheduler.step()
        if self.ema and not result.skipped:
            self.ema.update(self.model)
        self.state.step += 1
        self.state.skipped_steps += result.skipped

    @property
    def eval_model(self) -> nn.Module:
        """The weights training evaluates: the EMA's when there is one."""
        return self.ema.module if self.ema else self.model


class TimeBudget:
    """train.time_limit: the run's step count fitted to the minutes it has.

    The first PROBE_STEPS steps are timed, one evaluation's time is estimated from two validation batches and one
    last.pt write is timed; then the run is made as many steps long as fit in the limit less MARGIN of it, with every
    evaluation (eval.every and the last) and checkpoint it will make. The input size of every future step is known
    in advance (`step_sizes`, the multi-scale draw is a function of the seed), so the plan adds up each one's own
    time: a size already trained at costs the median of its timed steps (one-off costs left out: the WARMUP_STEPS
    first steps, the first step at each new size); another size is scaled from the nearest timed one by the power
    law the timed sizes follow (time ~ side^b, b fitted on two or more sizes, clamped to 1-3; b = 2, the area, from
    one size). The step time grows faster than the area on a CPU (b ~ 2.3 measured: BENCHMARKS.md, Your own data),
    so the first fit errs long; at REFITS of the run it is fitted again from all steps timed so far (within
    REFIT_RANGE of the plan before, so that burn-in, over by then, cannot come back). The limit counts from the
    start of main.py (set-up included); a resumed run keeps its plan and has no limit of its own.
    """

    PROBE_STEPS, WARMUP_STEPS, MARGIN, REFIT_RANGE, REFITS = 12, 2, 0.03, (0.5, 2.0), (0.25, 0.5, 0.75)
    MAX_STEPS = 10_000_000

    def __init__(self, minutes: float, started: float, step_sizes: Callable[[int, int], np.ndarray]) -> None:
        self.limit, self.started, self.step_sizes = 60 * minutes, started, step_sizes
        self.samples: list[tuple[int, float, int]] = []  # (step, seconds, input side)
        self.refit_at: int | None = None
        self.refits_left = list(self.REFITS)
        self.last = time.perf_counter()

    def record(self, step: int, size: int) -> None:
        """Time the step `step` (1-based) just finished, at input side `size`."""
        now = time.perf_counter()
        self.samples.append((step, now - self.last, size))
        self.last = now

    def planned(self, step: int, steps: int) -> None:
        """The run is now `steps` long (fitted at step `step`, on every rank alike): the next refit is at the next
        of REFITS of it still ahead."""
        while self.refits_left and self.refits_left[0] * steps <= step:
            self.refits_left.pop(0)
        at = int(self.refits_left.pop(0) * steps) if self.refits_left else steps
        self.refit_at = at if at < steps else None
        self.last = time.perf_counter()  # the fit's own work (an evaluation timed, a checkpoint) is no step's time

    def due(self, step: int, planned: bool) -> bool:
        """Whether the run should be (re)fitted after step `step`."""
        return (not planned and step == self.PROBE_STEPS) or step == self.refit_at

    def seconds_at(self) -> Callable[[np.ndarray], np.ndarray]:
        """Seconds per step as a function of the input side (vectorised), from the steps timed so far."""
        timed: dict[int, list[float]] = defaultdict(list)
        previous = None
        for k, t, s in self.samples:
            if k > self.WARMUP_STEPS and s == previous:
                timed[s].append(t)
            previous = s
        if not timed:  # every timed step was a first one at its size: take them as they are
            for _, t, s in self.samples[self.WARMUP_STEPS:] or self.samples:
                timed[s].append(t)
        sides = np.array(sorted(timed), dtype=np.float64)
        medians = np.array([statistics.median(timed[int(s)]) for s in sides])
        exponent = 2.0
        if len(sides) > 1:
            exponent = float(np.clip(np.polyfit(np.log(sides), np.log(medians), 1)[0], 1.0, 3.0))

        def seconds(side: np.ndarray) -> np.ndarray:
            nearest = np.abs(np.log(side[:, None] / sides[None, :])).argmin(1)
            return medians[nearest] * (side / sides[nearest]) ** exponent

        return seconds

    def fit(self, step: int, eval_seconds: float, checkpoint_seconds: float, cfg: Config,
            current: int | None) -> int:
        """The step count that ends the run inside the limit (at least `step`)."""
        seconds = self.seconds_at()
        left = self.limit * (1 - self.MARGIN) - (time.perf_counter() - self.started)
        lo, hi = (step, step + self.MAX_STEPS) if current is None else (int(self.REFIT_RANGE[0] * current),
                                                                         int(self.REFIT_RANGE[1] * current))
        # every step the run could still make: no step is quicker than the quickest size's
        quickest = float(seconds(np.array(train_sizes(cfg))).min())
        upper = max(min(step + int(max(left, 0) / quickest) + 1, hi + 1), lo, step + 1)
        k = np.arange(step + 1, upper + 1)  # 1-based numbers of the steps it could end after (lo's included)
        sizes = self.step_sizes(step, upper)
        step_time = seconds(sizes)
        periodic = (k % cfg.eval.every == 0) * (eval_seconds + checkpoint_seconds) + \
            (k % cfg.train.checkpoint_every == 0) * checkpoint_seconds  # an evaluation writes best.pt too
        before = np.cumsum(step_time + periodic) - periodic  # all up to step k, k's own evaluation not yet
        # ending after step k: its evaluation (at a multiple of eval.every or as the last), best.pt and last.pt
        total = before + eval_seconds + 2 * checkpoint_seconds
        fits = np.nonzero(total <= left)[0]
        n = max(min(max(int(k[fits[-1]]) if len(fits) else step, lo), hi), step)
        planned = slice(0, n - step) if n > step else slice(0, 1)
        log.info("fitted %d steps to %.1f min (%.3f s per step over sizes %d-%d, one evaluation ~%.1f s, one "
                 "checkpoint %.1f s; %.1f min used so far)%s", n, self.limit / 60,
                 float(step_time[planned].mean()), sizes[planned].min(), sizes[planned].max(),
                 eval_seconds, checkpoint_seconds, (time.perf_counter() - self.started) / 60,
                 "" if current is None else f", re-fitted from {current}")
        if n == step:
            log.warning("train.time_limit %.1f min leaves no time for more than the %d timed steps", self.limit / 60,
                        step)
        return n


def estimate_eval_seconds(model: nn.Module, loader: DataLoader, eval_cfg: EvalConfig, device: torch.device,
                          amp_dtype: torch.dtype | None = None) -> float:
    """Seconds one evaluation over `loader` will take: two batches timed, scaled to the loader, plus the COCO API's
    time (about 5 ms per image)."""
    start, training, batches = time.perf_counter(), model.training, min(2, len(loader))
    predict(model, loader, eval_cfg, device, amp_dtype, progress=False, max_batches=batches)
    model.train(training)
    return (time.perf_counter() - start) / batches * len(loader) + 0.005 * len(loader.dataset) + 0.5


# -- data -------------------------------------------------------------------------------------------------------


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


# -- one optimiser step -----------------------------------------------------------------------------------------


@dataclass
class StepResult:
    """What one optimiser step did."""

    losses: dict[str, float]  # total, xy, wh, obj, cls: per image, averaged over the micro-batches
    grad_norm: float  # before clipping (inf / nan when the step was skipped)
    skipped: bool  # True when the loss or gradients were not finite: nothing changed (weights, BatchNorm statistics)
    clipped: bool = False  # True when grad_norm exceeded train.clip_grad_norm and the update was scaled down
    size: int = 0  # the input side of the step's batches (set by Trainer.step)


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


# -- non-finite steps: train_step skips them; this counts them in a row and says when training has diverged -------


def describe_step(step: int, result: StepResult, lr: float) -> str:
    """'step 7: loss nan (xy 0.1 wh nan obj 2.3 cls 0.4), grad norm nan, lr 1.00e-03' for messages."""
    terms = " ".join(f"{k} {v:.4g}" for k, v in result.losses.items() if k != "total")
    return (f"step {step}: loss {result.losses['total']:.4g} ({terms}), grad norm {result.grad_norm:.4g}, "
            f"lr {lr:.2e}")


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

    def update(self, step: int, result: StepResult, lr: float) -> str | None:
        """Count `result` of optimiser step number `step` (1-based), run at learning rate `lr`; None, or why training
        stops."""
        if not result.skipped:
            self.in_a_row = 0
            return None
        self.in_a_row += 1
        where = describe_step(step, result, lr)
        log.warning("skipped %s (%d in a row; training stops at train.max_bad_steps=%d)", where, self.in_a_row,
                    self.max_bad_steps)
        if self.in_a_row < self.max_bad_steps:
            return None
        kept = f"{self.checkpoint} is left as the last good checkpoint" if self.checkpoint.is_file() else \
            f"no checkpoint had been written yet ({self.checkpoint})"
        return (f"{self.in_a_row} optimiser steps in a row had a non-finite loss or gradient "
                f"(train.max_bad_steps={self.max_bad_steps}); the last was {where}. {kept}. Look for NaN/Inf in the "
                "data, lower train.lr or set train.clip_grad_norm, then resume")


# -- progress ---------------------------------------------------------------------------------------------------


class ProgressWindow:
    """Images, data-wait time, wall time, and optimiser steps taken and clipped since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new window now."""
        self.start, self.data, self.images, self.steps, self.clipped = time.perf_counter(), 0.0, 0, 0, 0

    def count(self, result: StepResult) -> None:
        """Count one optimiser step into the window (whether its gradient norm was clipped)."""
        self.steps += 1
        self.clipped += result.clipped

    def log(self, logger: RunLogger, trainer: Trainer, result: StepResult, steps: int, device: torch.device) -> None:
        """One log line and the TensorBoard scalars for the step just taken; the window starts again."""
        state, seconds = trainer.state, time.perf_counter() - self.start
        memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        lr = trainer.scheduler.get_last_lr()[0]
        scalars = {**{f"loss/{k}": v for k, v in result.losses.items()}, "lr": lr,
                   "grad_norm": result.grad_norm, "speed/images_per_s": self.images / seconds,
                   "speed/data_fraction": self.data / seconds, "memory_gb": memory / 2**30,
                   "skipped_steps": state.skipped_steps, "skipped_images": state.skipped_images,
                   "clip_fraction": self.clipped / max(self.steps, 1)}
        logger.scalars(scalars, state.step)
        losses = result.losses
        # a clip that fires on most steps rescales every update: the lr is then not what train.lr says
        log.info("step %d/%d | loss %.4f (xy %.3f wh %.3f obj %.3f cls %.3f) | lr %.2e | grad %.2f, clipped %d of "
                 "the last %d steps | %.1f img/s, data %.0f%% | skipped %d steps, %d images", state.step, steps,
                 losses["total"], losses["xy"], losses["wh"], losses["obj"], losses["cls"], lr, result.grad_norm,
                 self.clipped, self.steps, scalars["speed/images_per_s"], 100 * scalars["speed/data_fraction"],
                 state.skipped_steps, state.skipped_images)
        self.reset()


# -- optimiser and learning-rate schedule: Darknet's burn-in, then steps, cosine with restarts, or constant ------


BURN_IN_POWER = 4  # Darknet's `power=4` for burn_in (network.c, get_current_rate)
BURN_IN_SHARE = 0.1  # burn-in takes at most this share of a run's steps


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """[decay group, no-decay group]: weight decay on conv / linear weights only.

    A parameter with ndim <= 1 gets no decay: BatchNorm weights and biases and every bias are vectors, while
    conv (4-d) and linear (2-d) weights are not. Testing the shape, not the module type, also covers the
    norm layers of torchvision encoders and any layer added later (YOLO practice: decay only the weights).
    """
    params = list(model.parameters())  # shared parameters appear once
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (betas (momentum, 0.999), L2 weight decay) or SGD (momentum, no Nesterov) over `parameter_groups`."""
    groups = parameter_groups(model, train_cfg.weight_decay)
    if train_cfg.optimizer == "adam":
        # Adam's own weight_decay adds decay * w to the gradient (L2, as the seed did), not AdamW's decoupled decay.
        return torch.optim.Adam(groups, lr=train_cfg.lr, betas=(train_cfg.momentum, 0.999))
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train_cfg.lr, momentum=train_cfg.momentum, nesterov=False)
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


# -- exponential moving average of the weights, evaluated and saved instead of the raw weights -------------------


class ModelEMA:
    """ema = d * ema + (1 - d) * weights after every optimiser step, with d ramped from 0 to `decay` over the first
    few thousand updates (d = decay * (1 - exp(-updates / ramp))), so early weights are not averaged in for long.
    BatchNorm running statistics (buffers) are averaged too."""

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


# -- evaluation: batched inference -> COCO rows (gathered over ranks) -> the COCO API's numbers ------------------


@dataclass
class EvalResult:
    """Everything one evaluation produced."""

    stats: dict[str, float]  # COCO_STATS -> value (0.0 for everything when there is no detection)
    per_class_ap50: dict[str, float]  # class name -> AP50 (nan for classes without ground truth in the images)
    table: str  # the COCO API's printed summary
    rows: np.ndarray  # (M, 7) [image_id, x, y, w, h, score, category_id], original pixels and category ids
    seconds: dict[str, float] = field(default_factory=dict)  # data, model, postprocess, cocoeval
    pr50: np.ndarray | None = None  # (101 recall points, K) COCOeval precision at IoU 0.5, -1: no ground truth (rank 0)


@torch.inference_mode()
def predict(model: torch.nn.Module, loader: DataLoader, eval_cfg: EvalConfig, device: torch.device,
            amp_dtype: torch.dtype | None = None, progress: bool = True, max_batches: int | None = None
            ) -> tuple[np.ndarray, dict[str, float]]:
    """Run the model over the loader (its first max_batches batches only, if given; under autocast of `amp_dtype`:
    models/forms.py Form.dtype; None: as it is); returns COCO rows (M, 7) at eval_cfg.conf_threshold and seconds per
    stage."""
    model.eval()
    category_ids = loader.dataset.category_ids
    seconds: dict[str, float] = defaultdict(float)
    rows = [np.zeros((0, 7))]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    batches = itertools.islice(checked_batches(loader), max_batches)
    for images, _, metas in tqdm(batches, total=min(len(loader), max_batches or len(loader)), desc="evaluating",
                                 unit="batch", disable=not progress, leave=False):
        seconds["data"] += time.perf_counter() - start
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            pred = model(images.to(device, non_blocking=True)).float()
        sync()
        seconds["model"] += time.perf_counter() - start
        start = time.perf_counter()
        detections = postprocess(pred, eval_cfg.conf_threshold, eval_cfg.nms_iou, eval_cfg.max_det,
                                 eval_cfg.max_candidates, eval_cfg.multi_label)
        rows.append(to_coco_rows(to_original_pixels(detections.cpu(), metas), metas, category_ids))
        seconds["postprocess"] += time.perf_counter() - start
        start = time.perf_counter()
    return np.concatenate(rows), dict(seconds)


def evaluate(model: torch.nn.Module, loader: DataLoader, eval_cfg: EvalConfig, device: torch.device,
             amp_dtype: torch.dtype | None = None, progress: bool = True) -> EvalResult:
    """Predict over the loader's dataset (this rank's shard under DDP, the rows gathered from all ranks) and score
    it with the COCO API (eval_cfg.backend) on rank 0; every rank returns the stats, rank 0 the per-class AP50 and
    the table too."""
    rows, seconds = predict(model, loader, eval_cfg, device, amp_dtype, progress)
    rows = all_gather_rows(rows)  # every rank predicted its shard (datasets/loader.py ShardSampler)
    dataset = loader.dataset
    start = time.perf_counter()
    stats, per_class, table, pr50 = {}, {}, "", None
    if is_main_process():
        stats, per_class, table, pr50 = coco_evaluate(dataset.coco, rows, dataset.ids, dataset.class_names,
                                                      eval_cfg.backend)
    seconds["cocoeval"] = time.perf_counter() - start
    return EvalResult(broadcast_object(stats), per_class, table, rows, seconds, pr50)


def evaluation_form(model: nn.Module, amp: str, size: int, device: torch.device) -> Form:
    """The form training evaluates `model` in (eval.amp `amp`; never packed: its weights go on changing), probed at
    (1, 3, size, size) on rank 0 and the same on every rank; the model's train / eval mode is left as it was."""
    training = model.training
    _, form = choose_form(model, device, size, amp, pack=False)
    model.train(training)
    return broadcast_object(form)


def prediction_grid(dataset, rows: np.ndarray, count: int, min_score: float = 0.3) -> np.ndarray:  # noqa: ANN001
    """The first `count` images of a CocoDetection with their true boxes (white; crowd regions left out) and the
    COCO rows (M, 7) above min_score (class colours), as one (H, W, 3) uint8 grid."""
    tiles = []
    for image_id in dataset.ids[:count]:
        mine = rows[(rows[:, 0] == image_id) & (rows[:, 5] >= min_score)]
        xyxy = np.concatenate([mine[:, 1:3], mine[:, 1:3] + mine[:, 3:5]], 1)
        classes = np.array([dataset.category_to_class[int(c)] for c in mine[:, 6]], int)
        tiles.append(draw_detections(dataset.load_image(image_id), xyxy, classes, dataset.class_names, mine[:, 5],
                                     dataset.object_boxes(image_id)))
    return image_grid(tiles)
