"""The GPU training-speed goal as one prepared run: tests/test_cuda.py, then the training step's images/s in each
way of running it, alternating rounds, and whether the loader keeps up. Made to fit one lent GPU machine's call.

    .venv/bin/python bench/train_speed.py --device cuda --data tests/data/coco --tests   # YOLOv3 at 416, batch 64
    .venv/bin/python bench/train_speed.py --device cpu --data tests/data/coco --arch yolov3-tiny --size 64 --batch 2 \\
        --variants main other-amp nchw foreach                                            # a smoke run on a CPU

Each variant is the real optimiser step (engine/train.py train_step: forward under autocast, YOLOLoss, backward,
clipping, Adam over main.py's parameter groups; bench/model.py train_step_fn), batch --batch, 20 random boxes per
image, changed in one thing from "main" (what main.py trains with today: train.amp auto, channels_last model and
input, Adam's fused update, nothing compiled):

- other-amp: the other precision (fp16 with GradScaler where auto picks bf16, bf16 where it picks fp16; on a CPU,
  fp32 where auto picks bf16 and bf16 where it picks fp32)
- nchw: model and input in the default memory format
- foreach: Adam's foreach update instead of the fused kernels (main.py's before 2026-12-07)
- compile: the model under torch.compile (inductor, default mode)
- cudagraphs: the model under torch.compile(mode="reduce-overhead"): CUDA graphs for the launch-bound parts
- compile-loss: the loss under torch.compile (shapes dynamic: the targets' count varies), for its ~200 small ops
- all: compile + compile-loss together

Every variant is built and warmed first (compilation and cuDNN's choices happen there; their seconds are reported),
then --rounds rounds time --steps steps of each variant in turn, so a drift of the machine's speed hits all alike;
"vs main" is the median over rounds of that round's ratio. --budget bounds the rounds' wall time (at least one
round runs). A variant that fails to build is reported with its error and left out; the others go on.

The loader: training images/s that build_loader delivers on --data at --size with the full augmentation, with
data.workers auto (datasets/loader.py auto_workers for --device) and with every core but one, against the fastest
variant's step: if the loader is slower, decoding on the GPU (torchvision.io.decode_jpeg on CUDA) is the next thing
to try. Progress goes to stderr as it happens (a run cut short still says what it measured); the table to stdout.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_data_argument, checked_data, emit, machine, spread, time_runs  # noqa: E402
from bench.data_pipeline import loader_rate  # noqa: E402
from bench.model import train_step_fn  # noqa: E402
from datasets.loader import auto_workers, build_dataset, usable_cores  # noqa: E402
from engine.state import autocast_dtype  # noqa: E402
from utils.config_load import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# variant key -> (what changes from "main", train_step_fn options besides the precision)
VARIANTS: dict[str, tuple[str, dict]] = {
    "main": ("main.py today: amp auto, channels_last, Adam fused", {}),
    "other-amp": ("the other precision (bf16 <-> fp16; on a CPU bf16 <-> fp32)", {}),
    "nchw": ("NCHW instead of channels_last", {"channels_last": False}),
    "foreach": ("Adam foreach instead of fused", {"foreach": True}),
    "compile": ("torch.compile(model)", {"compile_model": "default"}),
    "cudagraphs": ("torch.compile(model, mode=reduce-overhead): CUDA graphs", {"compile_model": "reduce-overhead"}),
    "compile-loss": ("torch.compile(loss, dynamic=True)", {"compile_loss": True}),
    "all": ("compile + compile-loss", {"compile_model": "default", "compile_loss": True}),
}


def log(message: str) -> None:
    """A progress line on stderr, at once."""
    print(message, file=sys.stderr, flush=True)


def variant_dtype(key: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a variant: main.py's train.amp auto, or for other-amp the other half precision."""
    dtype = autocast_dtype("auto", device)
    if key != "other-amp":
        return dtype
    if device.type == "cuda":
        return torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    return None if dtype == torch.bfloat16 else torch.bfloat16  # a CPU: fp32 against bf16


def cuda_tests() -> str:
    """Run tests/test_cuda.py in a child process; its summary line (and the failures' lines, if any)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    lines = done.stdout.strip().splitlines()
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return "; ".join([*(lines[-1:] or [f"pytest exit {done.returncode}, no output: {done.stderr.strip()[-300:]}"]),
                      *failed])


def build_variants(keys: list[str], args: argparse.Namespace, device: torch.device
                   ) -> tuple[dict[str, Callable[[], object]], dict[str, float], dict[str, str]]:
    """Each variant's step function, built and warmed (--warmup steps); the seconds that took; the errors of those
    that failed (exception type and message; the traceback goes to stderr)."""
    steps, seconds, errors = {}, {}, {}
    for key in keys:
        start = time.perf_counter()
        try:
            step = train_step_fn(args.size, args.batch, device, variant_dtype(key, device), args.arch,
                                 **VARIANTS[key][1])
            time_runs(step, 0, warmup=args.warmup, device=device)
        except Exception as e:  # noqa: BLE001 - one variant's failure is a result to report, not the end of the run
            traceback.print_exc()
            errors[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            log(f"{key}: failed to build: {errors[key]}")
            continue
        steps[key], seconds[key] = step, time.perf_counter() - start
        log(f"{key}: built and warmed in {seconds[key]:.1f} s")
    return steps, seconds, errors


def timed_rounds(steps: dict[str, Callable[[], object]], args: argparse.Namespace, device: torch.device
                 ) -> dict[str, list[float]]:
    """Images/s of each variant per round (--steps steps each, the variants in turn), --rounds rounds or fewer
    when --budget seconds would be passed."""
    rates: dict[str, list[float]] = {key: [] for key in steps}
    started = time.perf_counter()
    for round_index in range(args.rounds):
        round_start = time.perf_counter()
        for key, step in steps.items():
            seconds = time_runs(step, args.steps, warmup=0, device=device)
            rates[key].append(args.batch * len(seconds) / sum(seconds))
        log(f"round {round_index + 1}: " + ", ".join(f"{key} {r[-1]:.0f}" for key, r in rates.items()) + " images/s")
        took = time.perf_counter() - round_start
        if time.perf_counter() - started + took > args.budget:
            log(f"stopping after {round_index + 1} rounds: another would pass --budget {args.budget:g} s")
            break
    return rates


def loader_rows(args: argparse.Namespace, device: torch.device) -> tuple[list[str], dict[str, float]]:
    """Rows of the loader's images/s at data.workers auto and with all cores but one."""
    cfg = load_config(ROOT / "args.yaml", [f"data.root={args.data}", f"data.img_size={args.size}",
                                           "data.multiscale=null"])
    dataset = build_dataset(cfg, "train")
    auto = auto_workers(device)
    counts = sorted({auto, max(1, usable_cores() - 1)})
    rows, figures = [], {}
    for workers in counts:
        rate = loader_rate(cfg, dataset, workers)
        figures[f"loader_{workers}_workers"] = rate
        note = " (data.workers auto here)" if workers == auto else ""
        rows.append(f"| {workers}{note} | {rate:.0f} |")
        log(f"loader, {workers} workers: {rate:.0f} images/s")
    return rows, figures


def run(args: argparse.Namespace) -> tuple[list[str], dict[str, float]]:
    """Everything: tests, variants, rounds, loader; markdown lines and the headline figures."""
    device = torch.device(args.device)
    lines = [f"Machine: {machine(device)}", ""]
    if args.tests:
        summary = cuda_tests()
        log(f"tests/test_cuda.py: {summary}")
        lines += [f"`pytest tests/test_cuda.py`: {summary}", ""]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # as main.py (BENCHMARKS.md: it gained nothing on the H200)
    steps, build_seconds, errors = build_variants(args.variants, args, device)
    if "main" not in steps:
        raise SystemExit(f"error: the reference variant 'main' did not build: {errors.get('main', 'not asked for')}")
    rates = timed_rounds(steps, args, device)
    amp = {key: str(variant_dtype(key, device) or "fp32").removeprefix("torch.") for key in args.variants}
    lines += [f"{args.arch} at {args.size}, batch {args.batch}, {len(rates['main'])} alternating rounds of "
              f"{args.steps} steps", "",
              "| variant | changes | autocast | images/s, median (min-max) | vs main, paired | build + warm-up s |",
              "|---|---|---|---|---|---|"]
    figures = {}
    for key in args.variants:
        if key in errors:
            lines.append(f"| {key} | {VARIANTS[key][0]} | {amp[key]} | failed: {errors[key]} | | |")
            continue
        ratio = statistics.median(a / b for a, b in zip(rates[key], rates["main"], strict=True))
        figures[f"train_images_per_s_{key}"] = statistics.median(rates[key])
        lines.append(f"| {key} | {VARIANTS[key][0]} | {amp[key]} | {spread(rates[key], '.4g')} | **{ratio:.2f}x** | "
                     f"{build_seconds[key]:.0f} |")
    best = max(rates, key=lambda key: statistics.median(rates[key]))
    loader, loader_figures = loader_rows(args, device)
    figures.update(loader_figures)
    fastest_loader = max(loader_figures.values())
    lines += ["", f"Loader on {args.data} at {args.size} (full augmentation, batch 16, steady state):", "",
              "| workers | images/s |", "|---|---|", *loader, "",
              f"Fastest step: {best}, {statistics.median(rates[best]):.0f} images/s; the loader "
              + ("keeps up" if fastest_loader >= statistics.median(rates[best]) else
                 "does NOT keep up (try GPU JPEG decoding)") + f" at {fastest_loader:.0f} images/s."]
    return lines, figures


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run, print markdown (and the figures as JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--arch", default="yolov3")
    parser.add_argument("--size", type=int, default=416)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                        help=f"which to time (default: all): {', '.join(VARIANTS)}; 'main' is the reference")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant after building it")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=240.0, help="seconds the timed rounds may take")
    parser.add_argument("--tests", action="store_true", help="first run tests/test_cuda.py")
    parser.add_argument("--json", help="also write the headline figures to this JSON file")
    args = parser.parse_args(argv)
    if "main" not in args.variants:
        args.variants.insert(0, "main")
    checked_data(args.data)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: torch sees no CUDA device on this machine (torch.cuda.is_available() "
                         "is False); run it on a GPU machine, or time the CPU with --device cpu")
    lines, figures = run(args)
    emit(lines, figures, args.json)


if __name__ == "__main__":
    main()
