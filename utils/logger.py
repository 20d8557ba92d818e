"""Run output: plain log lines (good in nohup_0.out), TensorBoard scalars and images, a JSON line per evaluation."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger("yolov3")


def setup_console_logging(main_process: bool) -> None:
    """Timestamped lines on stdout from rank 0; other ranks only warn."""
    logging.basicConfig(stream=sys.stdout, format="%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S",
                        level=logging.INFO if main_process else logging.WARNING, force=True)


class RunLogger:
    """Writes a run folder's TensorBoard events and evals.jsonl; a no-op on ranks other than 0.

    `start_step` > 0 (a resumed run) purges events logged after that step by the interrupted run, so the curves
    continue without a fork.
    """

    def __init__(self, run_dir: Path, enabled: bool, start_step: int = 0) -> None:
        self.run_dir, self.enabled = run_dir, enabled
        self.writer = SummaryWriter(str(run_dir), purge_step=start_step or None) if enabled else None
        self.started = time.time()

    def scalars(self, values: dict[str, float], step: int) -> None:
        """One TensorBoard scalar per key (tags like "loss/obj")."""
        if self.writer:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """A (H, W, 3) uint8 RGB image."""
        if self.writer:
            self.writer.add_image(tag, torch.from_numpy(image).permute(2, 0, 1), step)

    def text(self, tag: str, text: str, step: int) -> None:
        """Preformatted text (a table), shown as such in TensorBoard's text tab."""
        if self.writer:
            self.writer.add_text(tag, "\n".join(f"    {line}" for line in text.splitlines()), step)

    def evaluation(self, record: dict, step: int) -> None:
        """Append one machine-readable line per evaluation to evals.jsonl."""
        if self.enabled:
            with (self.run_dir / "evals.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, **record}) + "\n")

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer:
            self.writer.close()
