"""What this machine's CPU can do: the ISA flags that decide convolution speed, and whether bf16 is native.

Read from /proc/cpuinfo (Linux; x86 `flags`, ARM `Features`). torch has no public flag for native bf16:
`torch.ops.mkldnn._is_mkldnn_bf16_supported()` (torch 2.x) asks oneDNN, and on x86 it answers True for any AVX-512
core (ideep's has_bf16_type_support: isa >= avx512_core), where bf16 is emulated and slower than fp32. So the CPU's
own flags decide, and oneDNN's answer, where this torch has the op, must agree.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
CONV_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # the flags bench/ reports
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX512-BF16 / AMX-BF16; ARMv8.6 BF16
# x86 int8 dot products (AVX512-VNNI, AVX-VNNI, AMX-INT8): without them int8 kernels sum pairs of u8 x s8 products in
# 16 bits (VPMADDUBSW), which can saturate unless weights are quantised to 7 bits (bench/deploy.py, tests)
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (first core); empty where it cannot be read."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_features() -> list[str]:
    """The vector ISA extensions that decide CPU conv speed (avx2, avx512f, avx512_bf16, amx_*), sorted."""
    return sorted(f for f in cpu_flags() if f in CONV_FLAGS)


def onednn_bf16_check() -> bool | None:
    """oneDNN's own answer to "can you run bf16" (`torch.ops.mkldnn._is_mkldnn_bf16_supported`, torch 2.x; True on
    any AVX-512 core, emulated or not), or None where this torch has no such op."""
    if not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported"):
        return None
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16 on x86, BF16 on ARM) and oneDNN runs it
    (where torch can say); without them bf16 is emulated and slower than fp32. False where /proc/cpuinfo cannot be
    read: an unknown CPU gets fp32."""
    if not NATIVE_BF16_FLAGS & cpu_flags():
        return False
    return onednn_bf16_check() is not False


def isa_class() -> str:
    """The CPU's class for conv speed, in words: 'AVX-512 + AVX512-BF16 (no AMX)', 'AVX2 (no AVX-512)', ..."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "AVX-512 + AVX512-BF16 + AMX-BF16"
    if "avx512_bf16" in flags:
        return "AVX-512 + AVX512-BF16 (no AMX)"
    if "avx512f" in flags:
        return "AVX-512 (no bf16)"
    if "avx2" in flags:
        return "AVX2 (no AVX-512)"
    if "bf16" in flags:
        return "ARM + BF16"
    return "no AVX2"
