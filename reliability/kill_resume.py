"""Kill -9 a CPU training at random moments, and inside checkpoint writes, resuming it each time with --resume.

After every kill each checkpoint on disk must load, at most train.checkpoint_every completed steps may be lost,
and at the end the weights must equal those of the same training run without interruption.

    python -m reliability.kill_resume                                # 200 steps, 10 random kills, 3 inside writes
    python -m reliability.kill_resume --steps 30 --every 2 --kills 3 --save-kills 1 --out /tmp/kr
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from reliability.common import ROOT, STEP_LINE, make_shapes, run_main, tiny_run_args
from utils.checkpoint import load_checkpoint


@dataclass
class Kill:
    """One killed run and what it left on disk."""

    how: str  # "random" (SIGKILL after a random step and delay) or "in save N" (inside the N-th checkpoint write)
    resumed_from: int  # the step the run started at
    last_logged: int  # the last step the run reported as done before it died
    checkpoint_step: int  # the step last.pt holds after the kill
    lost: int  # completed steps not in last.pt
    cut_write: bool  # this run left a partly written .last.pt.tmp: it was killed inside a checkpoint write
    loadable: int  # checkpoint files on disk, all of them loaded


def run_until(command: list[str], kill_after_step: int | None, delay: float, timeout: float) -> tuple[int, str, int]:
    """Run `command` from the repository root; SIGKILL it `delay` s after it logs step `kill_after_step` (None: let
    it run). Returns (last step logged, output, return code); a run that outlives `timeout` seconds is an error."""
    # the same number of threads as this process, whose uninterrupted run the weights are compared with
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    lines, last = [], 0
    try:
        for line in process.stdout:
            lines.append(line)
            if match := STEP_LINE.search(line):
                last = int(match[1])
                if kill_after_step is not None and last >= kill_after_step:
                    time.sleep(delay)
                    process.send_signal(signal.SIGKILL)
                    break
        lines.extend(process.stdout)  # the rest, up to the process's death
        code = process.wait()
        # steps logged during the delay before the kill count too: the run may have checkpointed them
        last = max([last, *(int(m[1]) for m in map(STEP_LINE.search, lines) if m)])
    finally:
        timed_out = not watchdog.is_alive()
        watchdog.cancel()
    if timed_out:
        raise TimeoutError(f"{command} ran for more than {timeout} s:\n{''.join(lines)[-3000:]}")
    return last, "".join(lines), code


def inspect_run(run_dir: Path, since: float) -> tuple[int, int, bool]:
    """Load every checkpoint of a run folder (CheckpointError if one is unreadable); returns (last.pt's step, files
    loaded, whether a temporary file was written after time `since` and left)."""
    files = sorted(run_dir.glob("*.pt"))
    states = {p.name: load_checkpoint(p) for p in files}
    temp = run_dir / ".last.pt.tmp"
    return states["last.pt"]["state"]["step"], len(files), temp.exists() and temp.stat().st_mtime >= since


def kill_and_resume(shapes: Path, out: Path, steps: int, every: int, kills: int, save_kills: int, *overrides: str,
                    seed: int = 0, timeout: float = 600) -> dict:
    """Train `steps` steps with checkpoint_every `every` (and --set `overrides`), killed `kills` times at random and
    `save_kills` times inside a checkpoint write, resumed after each (the last resume runs to the end in this
    process); then compare with an uninterrupted run. Returns the kills, the final step and whether the final
    weights are equal."""
    rng = random.Random(seed)
    events = ["random"] * kills + ["save"] * save_kills
    rng.shuffle(events)
    settings = (f"train.steps={steps}", f"train.checkpoint_every={every}", *overrides)
    args = tiny_run_args(shapes, out / "killed", *settings)
    run_dir, step, rows = None, 0, []
    for number, how in enumerate(events):
        if how == "save":  # the first write of a fresh run must succeed, or there is nothing to resume from
            nth = rng.randint(2 if run_dir is None else 1, 3)
            command = [sys.executable, "-u", "-m", "reliability.kill_during_save", str(nth)]
            kill_after, delay, how = None, 0.0, f"in save {nth}"
        else:
            command = [sys.executable, "-u", "main.py"]
            spread = 2 * (steps - step) // (len(events) - number + 1)  # the kills spread over the whole run
            kill_after = min(steps - 1, step + rng.randint(every + 1 if run_dir is None else 1, max(spread, every + 2)))
            delay = rng.uniform(0.0, 0.5)  # lands anywhere in the next step, a checkpoint write included
        resume = ["--resume", str(run_dir / "last.pt"), "--device", "cpu"] if run_dir else args
        started = time.time()
        last, output, code = run_until(command + resume, kill_after, delay, timeout)
        if code != -signal.SIGKILL:
            if code == 0 and step < steps:  # finished before its kill: nothing more to kill
                break
            raise RuntimeError(f"run exited with {code}, not killed:\n{output[-3000:]}")
        run_dir = run_dir or next((out / "killed").iterdir())
        checkpoint_step, loaded, cut_write = inspect_run(run_dir, started)
        rows.append(Kill(how, step, last, checkpoint_step, last - checkpoint_step, cut_write, loaded))
        step = checkpoint_step
    run_main(["--resume", str(run_dir / "last.pt"), "--device", "cpu"])
    final = load_checkpoint(run_dir / "last.pt")
    run_main(tiny_run_args(shapes, out / "uninterrupted", *settings))
    expected = load_checkpoint(next((out / "uninterrupted").iterdir()) / "last.pt")
    equal = all(torch.equal(v, final["model"][k]) for k, v in expected["model"].items())
    return {"kills": rows, "final_step": final["state"]["step"], "weights_equal": equal, "run_dir": run_dir}


def print_table(result: dict, every: int) -> None:
    """The figures as a Markdown table."""
    print(f"| # | killed | resumed from step | last step logged | last.pt step | steps lost (max {every}) | "
          "cut a checkpoint write | checkpoints loaded |")
    print("|---|---|---|---|---|---|---|---|")
    for i, k in enumerate(result["kills"], 1):
        print(f"| {i} | {k.how} | {k.resumed_from} | {k.last_logged} | {k.checkpoint_step} | {k.lost} | "
              f"{'yes' if k.cut_write else 'no'} | {k.loadable} |")
    print(f"\nfinal step {result['final_step']}; weights equal to the uninterrupted run: {result['weights_equal']}")


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, run, print the table; exits non-zero when a check fails."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=5, help="train.checkpoint_every")
    parser.add_argument("--kills", type=int, default=10, help="kills at random moments")
    parser.add_argument("--save-kills", type=int, default=3, help="kills inside a checkpoint write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="folder for the data and runs (default: a new temporary folder)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="kill_resume_"))
    result = kill_and_resume(make_shapes(out / "shapes"), out, args.steps, args.every, args.kills, args.save_kills,
                             seed=args.seed)
    print_table(result, args.every)
    if not result["weights_equal"] or any(k.lost > args.every for k in result["kills"]):
        raise SystemExit("FAILED: see the table")
    return {**result, "kills": [asdict(k) for k in result["kills"]]}


if __name__ == "__main__":
    main()
