"""train.time_limit: the run's step count fitted to the minutes it has (`TimeBudget`), from timed steps, one
evaluation's estimated time (`estimate_eval_seconds`) and one checkpoint's."""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from datasets.loader import train_sizes
from engine.evaluate import predict
from engine.state import Trainer
from utils.config import Config, EvalConfig
from utils.distributed import broadcast_object, is_main_process
from utils.logger import log


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

    def after_step(self, step: int, size: int, planned: bool) -> bool:
        """Record the step `step` (1-based) just finished at input side `size`; whether the run should be (re)fitted
        now (`planned`: it has been fitted before)."""
        self.record(step, size)
        return self.due(step, planned)

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
            current: int | None, final_evals: int = 1) -> int:
        """The step count that ends the run inside the limit (at least `step`), with `final_evals` evaluations at
        its end (up to 4 with train.keep_start: two mixes and the start again)."""
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
        total = before + final_evals * eval_seconds + 2 * checkpoint_seconds
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


PLOT_SECONDS = 1.5  # datasets/eval_curves.py write_evaluation_plots at each evaluation


def estimate_eval_seconds(model: nn.Module, loader: DataLoader, eval_cfg: EvalConfig, device: torch.device,
                          amp_dtype: torch.dtype | None = None) -> float:
    """Seconds one evaluation over `loader` will take: two batches timed, scaled to the loader, plus the COCO API's
    time (about 5 ms per image) and the evaluation's pictures (PLOT_SECONDS: PR and threshold curves, two confusion
    matrices; ~1 s for a few classes on 2 CPU cores, more for 80)."""
    start, batches = time.perf_counter(), min(2, len(loader))
    predict(model, loader, eval_cfg, device, amp_dtype, progress=False, max_batches=batches)
    return (time.perf_counter() - start) / batches * len(loader) + 0.005 * len(loader.dataset) + 0.5 + PLOT_SECONDS



def fit_to_time(budget: TimeBudget, trainer: Trainer, val_loader: DataLoader, device: torch.device,
                amp_dtype: torch.dtype | None, checkpoint_seconds: float, final_evals: int = 1) -> None:
    """Fit the run's length to the time left, `final_evals` evaluations at its end included (rank 0 decides, every
    rank follows): `trainer.plan` of the fit."""
    cfg, state = trainer.cfg, trainer.state
    eval_seconds = estimate_eval_seconds(trainer.eval_model, val_loader, cfg.eval, device, amp_dtype)
    steps = broadcast_object(budget.fit(state.step, eval_seconds, checkpoint_seconds, cfg, state.planned_steps,
                                        final_evals)
                             if is_main_process() else None)
    budget.planned(state.step, steps)
    trainer.plan(steps)
