"""Shared by the bench/ scripts: timing with warm-up, median and spread, the machine line, the convolution ceiling.

Every speed figure of the suite is also given as a ratio to the machine's own throughput on one 3x3 convolution,
256 -> 512 channels at 52x52 (YOLOv3's most common layer shape at 416), measured just before each timed call.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

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


def cpu_features() -> list[str]:
    """The vector ISA extensions that decide CPU conv speed (avx2, avx512f, avx512_bf16, amx_*), as /proc/cpuinfo
    lists them; empty where it cannot be read."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return []
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("flags")), [])
    return sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))


def machine(device: torch.device) -> str:
    """One line naming what the figures were measured on: CPU or GPU, cores, ISA, torch, threads, malloc pins."""
    pinned = all(os.environ.get(name) for name in MALLOC_PINS)
    line = (f"{cpu_model()}, {os.cpu_count()} cores ({', '.join(cpu_features()) or 'no AVX2'}), torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads, glibc malloc "
            f"{'pinned (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_)' if pinned else 'NOT pinned'}")
    if device.type == "cuda":
        line = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host {line}"
    return line


def bf16_supported() -> bool:
    """True when this CPU has native bf16 arithmetic (avx512_bf16 or AMX); without it bf16 is emulated and slow."""
    return any(f in cpu_features() for f in ("avx512_bf16", "amx_bf16"))


class CeilingProbe:
    """The machine's conv ceiling (GFLOP/s of one 3x3 conv, 256 -> 512 at 52x52, batch 1, fp32, in the faster of
    NCHW and NHWC, decided once), measured again on demand, just before each timed call of a bench: ratios of
    paired measurements survive the machine's speed drifting during a run (a shared cloud CPU drifts by 30% or more
    over minutes, which a ceiling measured once at the start turns into false ratios)."""

    def __init__(self, device: torch.device, runs: int = 3) -> None:
        cin, cout, side = CEILING_SHAPE
        self.gflop, self.runs, self.device = 2 * cin * cout * 9 * side * side / 1e9, runs, device
        candidates = []
        for fmt in (torch.contiguous_format, torch.channels_last):
            self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False).to(device).to(memory_format=fmt)
            self.x = torch.randn(1, cin, side, side, device=device).contiguous(memory_format=fmt)
            candidates.append((statistics.median(self() for _ in range(3)), self.conv, self.x))
        _, self.conv, self.x = max(candidates, key=lambda c: c[0])

    @torch.inference_mode()
    def __call__(self) -> float:
        """GFLOP/s of the ceiling conv now (median of `runs` calls)."""
        return self.gflop / statistics.median(time_runs(functools.partial(self.conv, self.x), self.runs, warmup=1,
                                                        device=self.device))


def time_paired(fn: Callable[[], object], repeats: int, probe: CeilingProbe, warmup: int = 1,
                device: torch.device | None = None) -> tuple[list[float], list[float]]:
    """time_runs(fn), and the ceiling (GFLOP/s) that `probe` measures just before each timed call."""
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
