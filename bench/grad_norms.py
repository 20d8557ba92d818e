"""The gradient norm of training on real COCO images, with clipping off: its spread at the start and after training.

    .venv/bin/python bench/grad_norms.py --data DIR [--arch yolov3-tiny] [--size 320]
        [--batch 4] [--steps 200] [--window 20] [--weights FILE] [--set group.key=value ...]

What train.clip_grad_norm should be: the YOLOv3 loss is a sum over each image's predictions (models/loss.py), so
its gradient norm is in the hundreds or thousands, not near 1, and a limit of 10 rescales every update. This trains
as args.yaml says (optimiser, lr, burn-in, augmentation; `--set` changes any key) except: one input size (--size,
no multiscale), --batch images per step in one micro-batch, fp32, no EMA and no clipping, and records the norm that
engine.train.train_step returns (before clipping). It prints the norm's percentiles over the first and the last --window
steps, and how many of all steps each candidate limit would have clipped. --weights starts from a checkpoint or a
Darknet file (the official yolov3-tiny.weights: the norms of a trained model). The norms do not depend on timing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_data_argument, checked_data, emit, machine  # noqa: E402
from datasets.loader import build_dataset, build_loader  # noqa: E402
from engine.state import Trainer  # noqa: E402
from engine.train import micro_batches, train_step  # noqa: E402
from models import build_model  # noqa: E402
from models.transfer import start_from  # noqa: E402
from utils.config_load import load_config  # noqa: E402

PERCENTILES = (0, 10, 50, 90, 99, 100)  # min, p10, median, p90, p99, max
LIMITS = (10.0, 100.0, 1000.0, 10000.0)  # candidate train.clip_grad_norm values


def percentile_row(label: str, norms: np.ndarray, losses: np.ndarray) -> str:
    """'| label | mean loss | min | p10 | p50 | p90 | p99 | max |' of one window of steps."""
    values = " | ".join(f"{v:.4g}" for v in np.percentile(norms, PERCENTILES))
    return f"| {label} | {losses.mean():.4g} | {values} |"


def run(args: argparse.Namespace) -> tuple[list[str], dict[str, float]]:
    """Train args.steps steps without clipping; markdown lines and figures (the percentiles of both windows)."""
    overrides = [f"data.root={args.data}", f"model.arch={args.arch}", f"data.img_size={args.size}",
                 "data.multiscale=null", "data.workers=1", f"train.batch_size={args.batch}", "train.subdivisions=1",
                 f"train.steps={args.steps}", "train.amp=fp32", "train.ema=false", "train.clip_grad_norm=null",
                 *args.overrides]
    cfg = load_config(Path(__file__).resolve().parents[1] / "args.yaml", overrides)
    device = torch.device("cpu")
    dataset = build_dataset(cfg, "train")
    loader = build_loader(cfg, dataset, train=True, batch_size=cfg.train.micro_batch_size)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.arch, cfg.model.encoder, len(dataset.class_names), cfg.model.anchors,
                        cfg.model.pretrained, cfg.model.pretrained_path)
    if args.weights:
        print(start_from(model, args.weights, dataset.class_names))
    model.to(device, memory_format=torch.channels_last).train()
    trainer = Trainer.build(model, cfg, device, dataset.class_names)
    batches = micro_batches(loader, trainer.state, device)
    norms, losses, start = [], [], time.perf_counter()
    for _ in range(cfg.train.steps):
        result = train_step(model, trainer.loss_fn, [next(batches)], trainer.optimizer, trainer.scaler,
                            trainer.amp_dtype, None)
        trainer.scheduler.step()
        norms.append(result.grad_norm)
        losses.append(result.losses["total"])
    seconds = time.perf_counter() - start
    norms_a, losses_a = np.array(norms), np.array(losses)
    w = min(args.window, len(norms))
    start_weights = f"from {args.weights}" if args.weights else "from a seeded initialisation"
    lines = [f"Machine: {machine(device)}", "",
             f"{cfg.model.arch} {start_weights}, {len(dataset)} train images of {args.data} at {args.size}, batch "
             f"{args.batch}, {cfg.train.optimizer} lr {cfg.train.lr} burn-in {cfg.train.burn_in}, args.yaml's "
             f"augmentation, fp32, no clipping; {len(norms)} steps in {seconds:.0f} s", "",
             "| steps | mean loss | min | p10 | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|---|---|",
             percentile_row(f"1-{w}", norms_a[:w], losses_a[:w]),
             percentile_row(f"{len(norms) - w + 1}-{len(norms)}", norms_a[-w:], losses_a[-w:]), "",
             "| train.clip_grad_norm | steps it would clip |", "|---|---|"]
    lines += [f"| {limit:g} | {int((norms_a > limit).sum())} of {len(norms)} |" for limit in LIMITS]
    figures = {f"{phase}_p{p}": float(v) for phase, part in (("first", norms_a[:w]), ("last", norms_a[-w:]))
               for p, v in zip(PERCENTILES, np.percentile(part, PERCENTILES), strict=True)}
    return lines, figures


def main() -> None:
    """Parse arguments, run, print markdown (and write the figures as JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--arch", default="yolov3-tiny")
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--window", type=int, default=20, help="steps in each percentile row (first and last)")
    parser.add_argument("--weights", type=Path, help="start weights: a checkpoint or a Darknet file")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="args.yaml overrides (after the script's own)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    checked_data(args.data)
    lines, figures = run(args)
    emit(lines, figures, args.json)


if __name__ == "__main__":
    main()
