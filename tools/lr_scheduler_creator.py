"""Plot the configured learning rate against the optimiser step, to check a schedule before training with it.

    python -m tools.lr_scheduler_creator                                   # args.yaml's schedule
    python -m tools.lr_scheduler_creator --set train.scheduler=cosine --log
    python -m tools.lr_scheduler_creator --steps 5000 --out logs/warmup.png
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from engine.optim import lr_factor
from utils.cli import add_config_args, parse_cli
from utils.config import TrainConfig

matplotlib.use("Agg")  # files only, no display needed (pyplot picks its backend at the first figure)

UNIFORM_POINTS = 5000  # evenly spaced samples over the whole run
BURN_IN_POINTS = 500  # extra samples over the warm-up, which is short next to the run
MAX_RESTARTS = 1000  # cosine restarts whose exact edges are added (t_mult = 1 with a small t0 has very many)


def change_points(train_cfg: TrainConfig, steps: int) -> list[int]:
    """Steps where the curve changes slope or jumps: burn-in end, each lr_step, each cosine restart."""
    points = [train_cfg.burn_in]
    if train_cfg.scheduler == "steps":
        points += train_cfg.lr_steps
    elif train_cfg.scheduler == "cosine":
        start, length = train_cfg.burn_in, train_cfg.cosine_t0
        while start < steps and len(points) < MAX_RESTARTS:
            start += length
            length *= train_cfg.cosine_t_mult
            points.append(start)
    return [p for p in points if 0 < p < steps]


def sample_steps(train_cfg: TrainConfig, steps: int) -> list[int]:
    """Sorted steps to evaluate: a uniform grid, a denser one over burn-in, and both sides of every change point."""
    grid = {round(i * (steps - 1) / (UNIFORM_POINTS - 1)) for i in range(UNIFORM_POINTS)}
    burn_in = min(train_cfg.burn_in, steps)
    grid |= {round(i * burn_in / BURN_IN_POINTS) for i in range(BURN_IN_POINTS + 1)} if burn_in else set()
    for p in change_points(train_cfg, steps):
        grid |= {p - 1, p}
    return sorted(s for s in grid if 0 <= s < steps)


def plot_schedule(train_cfg: TrainConfig, steps: int, out: Path, log_y: bool) -> None:
    """Draw lr against step for steps 0 .. steps-1 to out (PNG), with burn-in end and lr_steps marked."""
    xs = sample_steps(train_cfg, steps)
    ys = [train_cfg.lr * lr_factor(s, train_cfg) for s in xs]
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    ax.plot(xs, ys, lw=1.2, color="tab:blue")
    if 0 < train_cfg.burn_in < steps:
        ax.axvline(train_cfg.burn_in, color="tab:orange", ls="--", lw=1, label=f"burn-in end ({train_cfg.burn_in})")
    if train_cfg.scheduler == "steps":
        for i, at in enumerate(s for s in train_cfg.lr_steps if s < steps):
            ax.axvline(at, color="tab:red", ls=":", lw=1, label="lr_steps" if i == 0 else None)
    if log_y:
        ax.set_yscale("log")
        # The warm-up starts near lr / burn_in ** 4 (1e-15 for Darknet's): cut it a decade below the schedule's floor.
        after_burn_in = [y for x, y in zip(xs, ys, strict=True) if x >= train_cfg.burn_in] or ys
        ax.set_ylim(bottom=min(after_burn_in) / 10)
    ax.set(xlabel="optimiser step", ylabel="learning rate", xlim=(0, steps - 1),
           title=f"{train_cfg.optimizer}, lr {train_cfg.lr:g}, scheduler {train_cfg.scheduler}, {steps:,} steps")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="center right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> Path:
    """Parse arguments, plot the schedule, print the file and the lr at step 0, burn-in, each lr_step and the end."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--out", type=Path, default=Path("logs/lr_schedule.png"), help="PNG to write")
    parser.add_argument("--steps", type=int, default=None, help="steps to plot (default: train.steps)")
    parser.add_argument("--log", action="store_true", help="log-scale learning-rate axis")
    args, cfg, _ = parse_cli(parser, argv)
    steps = args.steps if args.steps is not None else cfg.train.steps
    if steps < 1:
        parser.error(f"--steps {steps}: must be at least 1")
    plot_schedule(cfg.train, steps, args.out, args.log)
    print(f"wrote {args.out}")
    marks = [("start", 0), ("burn-in end", cfg.train.burn_in)]
    if cfg.train.scheduler == "steps":
        marks += [("lr_step", s) for s in cfg.train.lr_steps]
    marks.append(("last", steps - 1))
    for name, step in marks:
        if step < steps:
            print(f"  step {step:>9,} ({name}): lr {cfg.train.lr * lr_factor(step, cfg.train):.6g}")
    return args.out


if __name__ == "__main__":
    main()
