"""Non-finite steps: train_step skips them; this counts them in a row and says when training has diverged."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from utils.engine import StepResult
from utils.logger import log


def describe_step(step: int, result: StepResult, lr: float) -> str:
    """'step 7: loss nan (xy 0.1 wh nan obj 2.3 cls 0.4), grad norm nan, lr 1.00e-03' for messages."""
    terms = " ".join(f"{k} {v:.4g}" for k, v in result.losses.items() if k != "total")
    return (f"step {step}: loss {result.losses['total']:.4g} ({terms}), grad norm {result.grad_norm:.4g}, "
            f"lr {lr:.2e}")


@dataclass
class BadStepCounter:
    """Counts consecutive skipped (non-finite) steps; `update` returns the stop message at `max_bad_steps` in a row.

    A skipped step leaves weights, optimiser and BatchNorm statistics as they were (utils/engine.py), so a few in a
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
