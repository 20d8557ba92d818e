"""Endurance: a long CPU training at a tiny size with periodic evaluation, run in this process and watched.

Reports the resident memory of the trainer and of its DataLoader workers over the run, and checks that after
main() returns no file descriptor it opened is still open and no worker process is left.

    python -m reliability.endurance                        # 2000 steps, evaluation every 200, 2 workers
    python -m reliability.endurance --steps 200 --eval-every 50
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path

from reliability.common import (
    STEP_LINE,
    child_pids,
    make_shapes,
    open_fds,
    pss_bytes,
    rss_bytes,
    run_main,
    tiny_run_args,
)

MB = 2**20


class MemoryAtSteps(logging.Handler):
    """Records (step, trainer RSS, workers' PSS) each time main.py logs a step line; children that existed before
    (`others`: e.g. multiprocessing's resource tracker, left by an earlier test) are not workers."""

    def __init__(self, others: set[int]) -> None:
        super().__init__()
        self.samples: list[tuple[int, int, int]] = []
        self.workers: set[int] = set()
        self.others = others

    def emit(self, record: logging.LogRecord) -> None:
        """Sample memory when the record is a step line."""
        if match := STEP_LINE.search(" " + record.getMessage()):
            workers = set(child_pids()) - self.others
            self.workers.update(workers)
            self.samples.append((int(match[1]), rss_bytes(), sum(_pss_or_zero(pid) for pid in workers)))


def _pss_or_zero(pid: int) -> int:
    """PSS of a process that may have just exited (then 0)."""
    try:
        return pss_bytes(pid)
    except (OSError, RuntimeError):
        return 0


def endurance(shapes: Path, out: Path, steps: int, eval_every: int, workers: int, *overrides: str,
              grace: float = 10.0) -> dict:
    """Train `steps` steps with an evaluation every `eval_every` and `workers` DataLoader workers (and --set
    `overrides`), in this process.

    Returns the memory samples, RSS at the first evaluation and at the end, the worker pids seen, the workers
    still alive and the file descriptors still open `grace` seconds after main() returned.
    """
    fds_before, children_before = Counter(open_fds()), set(child_pids())
    watcher = MemoryAtSteps(children_before)
    logger = logging.getLogger("yolov3")
    logger.addHandler(watcher)
    started = time.perf_counter()
    try:
        run_main(tiny_run_args(shapes, out, f"train.steps={steps}", f"eval.every={eval_every}",
                                      f"data.workers={workers}", f"train.checkpoint_every={eval_every}",
                                      "logging.every=10", "logging.images=2", *overrides))
    finally:
        logger.removeHandler(watcher)
    seconds = time.perf_counter() - started
    # Workers get their shutdown signal when the loaders are freed, and each index queue's two pipe ends are closed by
    # its feeder thread, asynchronously (multiprocessing's Queue.close()): what is still there after `grace` leaked.
    deadline = time.monotonic() + grace
    while True:
        left, leaked = set(child_pids()) - children_before, Counter(open_fds()) - fds_before
        if not (left or leaked) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    by_step = {step: (rss, workers_pss) for step, rss, workers_pss in watcher.samples}
    first_eval = min((s for s in by_step if s > eval_every), default=max(by_step))  # the first sample after it
    return {"steps": steps, "seconds": seconds, "samples": watcher.samples, "rss_start": watcher.samples[0][1],
            "rss_first_eval": by_step[first_eval][0], "rss_end": watcher.samples[-1][1],
            "workers_pss_first_eval": by_step[first_eval][1], "workers_pss_end": watcher.samples[-1][2],
            "first_eval_step": first_eval, "workers_seen": len(watcher.workers), "workers_left": sorted(left),
            "leaked_fds": sorted(leaked.elements())}


def print_table(r: dict) -> None:
    """The figures as a Markdown table."""
    print("| step | trainer RSS (MB) | workers PSS (MB) |\n|---|---|---|")
    every = max(1, len(r["samples"]) // 10)
    for step, rss, workers in r["samples"][::every] + r["samples"][-1:]:
        print(f"| {step} | {rss / MB:.0f} | {workers / MB:.0f} |")
    print(f"\n{r['steps']} steps in {r['seconds']:.0f} s; trainer RSS {r['rss_start'] / MB:.0f} MB at step "
          f"{r['samples'][0][0]}, "
          f"{r['rss_first_eval'] / MB:.0f} MB after the first evaluation (step {r['first_eval_step']}), "
          f"{r['rss_end'] / MB:.0f} MB at the end ({(r['rss_end'] - r['rss_first_eval']) / MB:+.0f} MB); workers' PSS "
          f"{r['workers_pss_first_eval'] / MB:.0f} -> {r['workers_pss_end'] / MB:.0f} MB; {r['workers_seen']} worker "
          f"processes seen, {len(r['workers_left'])} left after exit; {len(r['leaked_fds'])} file descriptors left "
          f"open {r['leaked_fds']}")


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, run, print the table; exits non-zero when a worker or descriptor is left behind."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2, help="data.workers")
    parser.add_argument("--out", type=Path, help="folder for the data and the run (default: a new temporary folder)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="endurance_"))
    result = endurance(make_shapes(out / "shapes", train=64, val=16), out / "runs", args.steps, args.eval_every,
                       args.workers)
    print_table(result)
    if result["workers_left"] or result["leaked_fds"]:
        raise SystemExit("FAILED: processes or file descriptors left behind")
    return result


if __name__ == "__main__":
    main()
