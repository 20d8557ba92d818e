"""The forms an eval-mode model runs inference in, and the probe that picks the fastest one on this machine.

The same weights, computed five ways (all channels_last; every form's output is float32, decoded in float32):

    fp32         float32 convs (oneDNN on a CPU, cuDNN on CUDA)
    packed       float32, conv weights packed once for oneDNN, activations fused into the convs (models/packed.py;
                 CPU)
    bf16         bf16 autocast (a CPU with native bf16: AVX512-BF16 / AMX; or CUDA)
    packed-bf16  bf16 conv weights packed once for oneDNN, bf16 activations, activations fused (CPU, native bf16)
    fp16         fp16 autocast (CUDA)

Which one is fastest is a property of the machine, not of the code: packing gained 1.10-1.13x at batch 1 on an
AVX2 EPYC and nothing at batch 8; packed bf16 is 1.4-1.8x bf16 autocast on an AMX Xeon; bf16 is emulated, and
slower than fp32, on a CPU without native bf16, and faster where it is native (BENCHMARKS.md). So on a CPU
`choose_form` times a few forward passes of each candidate at the tools' input shape (1, 3, size, size), in
alternating rounds, and keeps the fastest; the bf16 forms are candidates only where the CPU has native bf16
(utils/hardware.py). On CUDA the default stays fp32, as the tools ran before (batch-1 timings there are
launch-bound and would not tell which form wins at the batch the tools run).
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from models.packed import pack_conv_weights, packing_available
from utils.hardware import cpu_has_native_bf16
from utils.logger import log

FORMS = ("fp32", "packed", "bf16", "packed-bf16", "fp16")
# ... and the runtimes an exported file runs in (models/runtime.py ExportedModel: never a candidate of the probe)
AUTOCAST = {"fp32": None, "packed": None, "bf16": torch.bfloat16, "packed-bf16": None, "fp16": torch.float16,
            "onnxruntime": None, "openvino": None}  # packed-bf16 carries its dtype in its packed weights
PACKED = {"packed": torch.float32, "packed-bf16": torch.bfloat16}  # packed forms -> the dtype their weights hold
DESCRIPTIONS = {"fp32": "fp32, channels_last", "packed": "fp32, channels_last, conv weights packed for oneDNN",
                "bf16": "bf16 autocast, channels_last",
                "packed-bf16": "bf16, channels_last, conv weights packed for oneDNN",
                "fp16": "fp16 autocast, channels_last",
                "onnxruntime": "exported file in ONNX Runtime (CPU)",
                "openvino": "exported file in OpenVINO (CPU, its default precision hint)"}
OPTIONS = {"fp32": ("fp32", False), "packed": ("fp32", True), "bf16": ("bf16", False), "packed-bf16": ("bf16", True),
           "fp16": ("fp16", False)}
# form -> the (eval.amp, pack) that name it alone: --no-amp / --amp (bf16, fp16) with --no-pack / --pack
PROBE_WARMUP, PROBE_ROUNDS = 1, 3  # untimed passes per form, then alternating timed rounds (median per form)
PROBE_FILL = 114  # the probe's input: letterbox grey (no random numbers: the probe must not move any RNG)


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """The context a forward pass in `dtype` runs in on `device`: torch.autocast of it, or (None) a disabled one,
    so that float32 runs through the same line (training's train.amp, a form's eval.amp)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class FormError(ValueError):
    """A combination of options that names no form (packing with autocast, packing on CUDA)."""


@dataclass(frozen=True)
class Form:
    """The form a model runs in, and the probe's ms per (1, 3, size, size) forward of each candidate (empty when
    there was only one candidate)."""

    name: str  # one of FORMS, or a runtime of an exported file (AUTOCAST)
    probe_ms: dict[str, float] = field(default_factory=dict)
    compiled: bool = False  # torch.compile'd (inference.compile_for_inference)

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for float32."""
        return AUTOCAST[self.name]

    def autocast(self, device: torch.device) -> torch.autocast:
        """The context the form's forward runs in: torch.autocast of its dtype, or nothing."""
        return autocast(device, self.dtype)

    def __str__(self) -> str:
        """'bf16 autocast, channels_last (probe: fp32 12.3 ms, packed 11.1 ms, bf16 6.0 ms)'."""
        text = DESCRIPTIONS[self.name] + (", torch.compile" if self.compiled else "")
        if self.probe_ms:
            text += " (probe: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in self.probe_ms.items()) + ")"
        return text


def candidate_forms(device: torch.device, amp: str, pack: bool | None) -> list[str]:
    """The forms `choose_form` may pick, for eval.amp `amp` and the packing choice `pack` (None: let the probe
    decide; True / False: --pack / --no-pack; False for a model that goes on training).

    amp: auto (a CPU: fp32, packed and, where the CPU has native bf16, bf16 and packed-bf16; CUDA: fp32), fp32 (no
    autocast), bf16 (bf16 autocast, also where bf16 is emulated, or packed bf16 weights where it is native), fp16
    (fp16 autocast on CUDA; a CPU runs fp32, as train.amp fp16)."""
    if device.type != "cpu":
        if pack:
            raise FormError(f"packing the conv weights is for the CPU (oneDNN); this run is on {device}")
        return ["fp32" if amp == "auto" else amp]
    can_pack = packing_available()
    if pack and not can_pack:
        raise FormError(f"torch {torch.__version__} cannot pack conv weights here (models/packed.py)")
    native = cpu_has_native_bf16()
    if amp == "bf16" and pack and not native:
        raise FormError("packed bf16 conv weights need a CPU with native bf16 (avx512_bf16 / amx_bf16); drop --pack "
                        "(bf16 autocast, emulated) or --amp")
    precisions = ["bf16"] if amp == "bf16" else ["fp32", "bf16"] if amp == "auto" and native else ["fp32"]
    forms = [] if pack else list(precisions)  # the plain convs: fp32, bf16 autocast
    if pack is not False and can_pack:
        forms += [{"fp32": "packed", "bf16": "packed-bf16"}[p] for p in precisions if p == "fp32" or native]
    return sorted(forms, key=FORMS.index)


def prepare(model: nn.Module, form: str, device: torch.device, size: int) -> nn.Module:
    """`model` (eval mode, BN fused or not) on `device`, channels_last, and for a packed form with its conv
    weights packed in place (in the form's dtype), for (1, 3, size, size) inputs (other shapes run too)."""
    model = model.eval().to(device, memory_format=torch.channels_last)
    if form in PACKED:
        pack_conv_weights(model, torch.zeros(1, 3, size, size).contiguous(memory_format=torch.channels_last),
                          PACKED[form])
    return model


@torch.inference_mode()
def probe_forms(models: dict[str, nn.Module], example: torch.Tensor, rounds: int = PROBE_ROUNDS,
                warmup: int = PROBE_WARMUP) -> dict[str, float]:
    """ms per forward of each form's model (form -> model prepared in it) on `example`: `warmup` untimed passes
    each, then `rounds` rounds that time every form once in turn (so a drifting machine slows all alike); the
    median per form."""
    device = example.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name, model in models.items():
        for _ in range(warmup):
            with Form(name).autocast(device):
                model(example)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            sync()
            start = time.perf_counter()
            with Form(name).autocast(device):
                model(example)
            sync()
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(ms) for name, ms in times.items()}


def choose_form(model: nn.Module, device: torch.device, size: int, amp: str = "auto", pack: bool | None = None
                ) -> tuple[nn.Module, Form]:
    """The model in its fastest form on this machine among `candidate_forms(device, amp, pack)` (a
    probe of a few (1, 3, size, size) forwards when there are several), and that form. The packed candidates are
    probed on copies; the model returned is `model` itself (eval mode, channels_last) or, if packing won, its
    packed copy. Raises FormError for options that name no form."""
    candidates = candidate_forms(device, amp, pack)
    if any("bf16" in c for c in candidates) and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning("bf16 on a CPU without native bf16 (no avx512_bf16 / amx_bf16): emulated, slower than fp32")
    model = prepare(model, "fp32", device, size)
    if len(candidates) == 1:
        return prepare(model, candidates[0], device, size), Form(candidates[0])
    models = {name: prepare(copy.deepcopy(model), name, device, size) if name in PACKED else model
              for name in candidates}
    example = torch.full((1, 3, size, size), PROBE_FILL, dtype=torch.uint8, device=device)  # as the loaders give
    probe_ms = probe_forms(models, example)
    best = min(probe_ms, key=probe_ms.get)
    return models[best], Form(best, probe_ms)
