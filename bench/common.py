"""Shared by the bench/ scripts: timing with warm-up, median and spread, the machine line, the convolution ceiling.

Every speed figure of the suite is also given as a ratio to the machine's own throughput on one 3x3 convolution,
256 -> 512 channels at 52x52 (YOLOv3's most common layer shape at 416), measured just before each timed call: in
fp32, and where bf16 is native (a CPU with AVX512-BF16 / AMX, a GPU with bf16) also under bf16 autocast.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from models.forms import autocast
from utils.hardware import cpu_features, cpu_has_native_bf16, isa_class

CEILING_SHAPE = (256, 512, 52)  # in channels, out channels, side: 2 * 256 * 512 * 9 * 52 * 52 = 3.19 GFLOP per image
MALLOC_PINS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU has nothing to wait for)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], object], repeats: int, warmup: int = 2, device: torch.device | None = None
              ) -> list[float]:
    """Seconds of each of `repeats` calls of fn() after `warmup` untimed calls (synchronised on `device`)."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    sync(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def spread(values: list[float], fmt: str = ".3g") -> str:
    """'median (min-max)' of a list of figures."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    """One line naming what the figures were measured on: CPU or GPU, cores, ISA class and flags, native bf16,
    torch, threads, malloc pins."""
    pinned = all(os.environ.get(name) for name in MALLOC_PINS)
    line = (f"{cpu_model()}, {os.cpu_count()} cores, {isa_class()} ({', '.join(cpu_features()) or 'no AVX2'}; "
            f"native bf16: {'yes' if cpu_has_native_bf16() else 'no'}), torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads, glibc malloc "
            f"{'pinned (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_)' if pinned else 'NOT pinned'}")
    if device.type == "cuda":
        line = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host {line}"
    return line


def machine_kind(device: torch.device) -> str:
    """The stable name of this kind of machine, the heading of its section in BENCHMARKS.md: the CPU's model
    (trademarks and clock left out), cores and ISA class ('AMD EPYC, 2 cores, AVX-512 + AVX512-BF16 (no AMX)'), or
    the GPU's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = re.sub(r"\((R|TM)\)|\bCPU\b|\bProcessor\b|@.*$", "", cpu_model(), flags=re.IGNORECASE)
    return f"{' '.join(model.split())}, {os.cpu_count()} cores, {isa_class()}"


def bf16_supported(device: torch.device) -> bool:
    """True where bf16 runs natively: a CPU with avx512_bf16 or AMX (without them it is emulated and slower than
    fp32), a GPU with bf16."""
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()


class CeilingProbe:
    """The machine's conv ceiling (GFLOP/s of one 3x3 conv, 256 -> 512 at 52x52, batch 1, fp32 or under `dtype`
    autocast, in the faster of NCHW and NHWC, decided once), measured again on demand, just before each timed call
    of a bench: ratios of paired measurements survive the machine's speed drifting during a run (a shared cloud CPU
    drifts by 30% or more over minutes, which a ceiling measured once at the start turns into false ratios)."""

    def __init__(self, device: torch.device, runs: int = 3, dtype: torch.dtype | None = None) -> None:
        cin, cout, side = CEILING_SHAPE
        self.gflop, self.runs, self.device, self.dtype = 2 * cin * cout * 9 * side * side / 1e9, runs, device, dtype
        candidates = []
        for fmt in (torch.contiguous_format, torch.channels_last):
            self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False).to(device).to(memory_format=fmt)
            self.x = torch.randn(1, cin, side, side, device=device).contiguous(memory_format=fmt)
            candidates.append((statistics.median(self() for _ in range(3)), self.conv, self.x))
        _, self.conv, self.x = max(candidates, key=lambda c: c[0])

    @torch.inference_mode()
    def __call__(self) -> float:
        """GFLOP/s of the ceiling conv now (median of `runs` calls)."""
        with autocast(self.device, self.dtype):
            return self.gflop / statistics.median(time_runs(functools.partial(self.conv, self.x), self.runs,
                                                            warmup=1, device=self.device))


class Ceilings:
    """The fp32 ceiling and, where bf16 is native (`bf16_supported`), the bf16 one, measured together on demand:
    a call returns {"fp32": GFLOP/s, "bf16": GFLOP/s}."""

    def __init__(self, device: torch.device) -> None:
        self.probes = {"fp32": CeilingProbe(device)}
        if bf16_supported(device):
            self.probes["bf16"] = CeilingProbe(device, dtype=torch.bfloat16)

    def __call__(self) -> dict[str, float]:
        """Each ceiling now, GFLOP/s."""
        return {name: probe() for name, probe in self.probes.items()}


def time_paired(fn: Callable[[], object], repeats: int, probe: Callable[[], object], warmup: int = 1,
                device: torch.device | None = None) -> tuple[list[float], list]:
    """time_runs(fn), and the ceiling(s) that `probe` (a CeilingProbe or Ceilings) measures just before each timed
    call."""
    seconds, ceilings = [], []
    for i in range(repeats):
        ceilings.append(probe())
        seconds += time_runs(fn, 1, warmup=warmup if i == 0 else 0, device=device)
    return seconds, ceilings


def paired_ratio(gflop: float, seconds: list[float], ceilings: list[float]) -> float:
    """Median over the pairs of (gflop / seconds) / ceiling: the fraction of the ceiling reached."""
    return statistics.median(gflop / s / c for s, c in zip(seconds, ceilings, strict=True))


def emit(lines: list[str], figures: dict[str, float], json_path: str | None) -> None:
    """Print a script's markdown lines; with --json, also write its headline figures there for bench/run.py."""
    print("\n".join(lines))
    if json_path:
        Path(json_path).write_text(json.dumps(figures))


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    """--data DIR, required (--root, its earlier name, still works): the COCO-format folder a bench reads."""
    parser.add_argument("--data", "--root", dest="data", required=True, metavar="DIR",
                        help="COCO-format data: images/{train,val}2017/ and annotations/ as datasets/get_coco.sh "
                        "writes them (the figures in BENCHMARKS.md used a 50 + 50 image COCO subset)")


def checked_data(path: str) -> str:
    """`path` if it is a folder; else stop with a message that names --data (before any heavy work)."""
    if not Path(path).is_dir():
        raise SystemExit(f"error: --data {path}: no such folder; point it at a COCO-format set (images/ and "
                         "annotations/ as datasets/get_coco.sh writes them)")
    return path
