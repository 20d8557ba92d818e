"""Progress: one log line and the TensorBoard scalars every logging.every steps, over the steps since the last line."""
from __future__ import annotations

import resource
import time

import torch
from tqdm import tqdm

from engine.state import Trainer
from engine.train import StepResult
from utils.logger import RunLogger, log


class ProgressWindow:
    """Images, data-wait time, wall time, and optimiser steps taken and clipped since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new window now."""
        self.start, self.data, self.images, self.steps, self.clipped = time.perf_counter(), 0.0, 0, 0, 0

    def count(self, result: StepResult) -> None:
        """Count one optimiser step into the window: its images, its wait for data, whether it was clipped."""
        self.steps += 1
        self.clipped += result.clipped
        self.images += result.images
        self.data += result.data_seconds

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



class Progress:
    """What a run shows while it trains: a bar on a terminal (in a file, nohup_0.out, the log lines are the progress)
    and, every logging.every steps and at the last, ProgressWindow's log line and TensorBoard scalars."""

    def __init__(self, trainer: Trainer, logger: RunLogger, device: torch.device, bar: bool) -> None:
        self.trainer, self.logger, self.device, self.window = trainer, logger, device, ProgressWindow()
        self.bar = tqdm(total=trainer.steps, initial=trainer.state.step, disable=not bar, desc="train", unit="step",
                        dynamic_ncols=True)

    def update(self, result: StepResult) -> None:
        """Count the step just taken (`result`) into the bar and the window; log when it is time."""
        trainer, step = self.trainer, self.trainer.state.step
        self.bar.total = trainer.steps  # train.time_limit may have fitted the run anew
        self.bar.update()
        self.bar.set_postfix(loss=f"{result.losses['total']:.3f}", lr=f"{trainer.scheduler.get_last_lr()[0]:.2e}")
        self.window.count(result)
        if step % trainer.cfg.logging.every == 0 or step == trainer.steps:
            self.window.log(self.logger, trainer, result, trainer.steps, self.device)

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()
