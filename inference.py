"""Inference on decoded images: letterbox a batch, run the model, post-process, map back to original pixels.

The same geometry and the same code as evaluation (datasets/transforms.py letterbox, engine/evaluate.py
detect_batch: the forward pass, models/postprocess.py and its inverse), for any images.
"""
from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets.transforms import Preprocess
from engine.evaluate import detect_batch
from models import YOLO
from models.forms import Form, FormError, choose_form, prepare
from models.runtime import ExportedModel
from models.transfer import load_model
from utils.checkpoint import CheckpointError
from utils.cli import add_config_args, cli_config, device_to_gpu
from utils.config import Config, ConfigError, EvalConfig
from utils.hardware import cpu_has_native_bf16

LETTERBOX = Preprocess()  # no augmentation: fit, pad with grey, to tensor
NO_BOXES, NO_CLASSES = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)


def letterbox_batch(images: Sequence[np.ndarray], size: int) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """(H_i, W_i, 3) uint8 RGB images -> (B, 3, size, size) uint8 and one meta per image
    {orig_size (h, w), letterbox}, as the dataset gives for evaluation."""
    tensors, metas = [], []
    for image in images:
        tensor, _, letterbox = LETTERBOX(image, NO_BOXES, NO_CLASSES, size)
        tensors.append(tensor)
        metas.append({"orig_size": image.shape[:2], "letterbox": letterbox})
    return torch.stack(tensors), metas


class CompileError(RuntimeError):
    """torch.compile cannot run on this machine (no C++ compiler); the message says what to install."""


def compile_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile (inductor) with the weights frozen as constants, for a model whose weights no longer change
    (validation, detection; never a model being trained or averaged): faster per image after some seconds of
    compilation per input shape (bench/run.py --compile; figures in BENCHMARKS.md); it needs a C++ compiler.

    Freezing is switched on process-wide (torch._inductor.config.freezing): inductor reads it when it compiles,
    at the first call and at each recompilation, not in torch.compile(); torch.compile(options={"freezing": True})
    was measured no faster than eager (BENCHMARKS_HISTORY.md). For a model on the CPU inductor's C++ wrapper
    (cpp_wrapper) is switched on the same way: the compiled kernels are called from C++ instead of a generated
    Python function, which takes the Python and dispatch time between ~40 kernels out of a batch-1 forward
    (yolov3-tiny, 416, bf16, 2-core Zen 4: 13.8 ms against 15.2 with the Python wrapper and 15.4 eager;
    BENCHMARKS.md, "Deployment"), for about twice the compilation time. Shapes stay static (dynamic=False): each
    new input shape compiles anew, where dynamo's automatic dynamic shapes would recompile a second image size
    with symbolic sizes, which inductor's freezing pass cannot lay out (torch 2.14: BackendCompilerFailed in
    enforce_output_layout). The tools that call this compile nothing else. Raises CompileError at once where
    inductor's C++ compiler is missing (it would fail only at the first call, deep in a traceback)."""
    compiler = os.environ.get("CXX") or "g++"  # what inductor runs on a CPU (and Triton's launcher needs a C one)
    if shutil.which(compiler) is None:
        raise CompileError(f"torch.compile needs a C++ compiler: {compiler!r} (the CXX environment variable, else "
                           "g++) is not on the PATH; install one (e.g. apt install g++) or run without --compile")
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True
    if next(model.parameters()).device.type == "cpu":  # CUDA keeps the Python wrapper: not measured with it
        inductor_config.cpp_wrapper = True
    return torch.compile(model, dynamic=False)


def add_speed_args(parser: argparse.ArgumentParser) -> None:
    """--amp / --no-amp, --pack / --no-pack and --compile, for the tools that run a trained model (validation.py,
    detect.py, visualization.py): which form the model runs in (models/forms.py)."""
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, help="autocast: fp16 on CUDA, bf16 on a "
                        "CPU; --no-amp: fp32 (default: eval.amp, auto: on a CPU with native bf16 the probe may pick "
                        "bf16, on CUDA fp32)")
    parser.add_argument("--pack", action=argparse.BooleanOptionalAction, help="on a CPU, conv weights packed for "
                        "oneDNN once, activations fused (fp32: the same outputs, ~10%% faster at batch 1 on AVX2); "
                        "--no-pack: the plain convs (default: the probe decides)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model, weights frozen: faster per "
                        "image after ~20 s of compilation per input shape on a CPU (needs a C++ compiler; bf16 "
                        "autocast on a CPU with native bf16 unless --no-amp, else fp32 unless --amp)")


def amp_mode(flag: bool | None, configured: str, device: torch.device) -> str:
    """The eval.amp value the tools run with: `configured`, or what --amp (the device's autocast: fp16 on CUDA,
    bf16 on a CPU) / --no-amp (fp32) say."""
    if flag is None:
        return configured
    return ("fp16" if device.type == "cuda" else "bf16") if flag else "fp32"


def ready_for_inference(model: YOLO, device: torch.device, size: int, amp: str = "auto", pack: bool | None = None,
                        compile: bool = False) -> tuple[torch.nn.Module, Form]:
    """An eval-mode model (BN fused or not) as the tools run it, and its form: channels_last on `device`, then
    compiled (`compile`: the autocast `amp` names; auto: bf16 on a CPU with native bf16, where the probe picks a
    bf16 form on every model measured, else fp32; no probe, each candidate would compile for ~20 s), or in
    the fastest form that eval.amp `amp` and `pack` allow (models/forms.py choose_form: on a CPU a probe of a few
    (1, 3, size, size) forwards when several forms qualify). Raises CompileError where `compile` cannot run, FormError
    for options that name no form."""
    if compile:
        if pack:
            raise FormError("--compile freezes and lays out the weights itself; --pack is for eager runs: choose one")
        if amp == "auto":
            name = "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
        else:
            name = "fp32" if amp == "fp16" and device.type == "cpu" else amp
        return compile_for_inference(prepare(model, "fp32", device, size)), Form(name, compiled=True)
    return choose_form(model, device, size, amp, pack)


def unit_float(batch: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 in [0, 1]: the input that exported graphs take (our models take either)."""
    return batch.float().div_(255)


def detect(model: torch.nn.Module, images: Sequence[np.ndarray], size: int, eval_cfg: EvalConfig,
           conf_threshold: float, device: torch.device, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Images (H_i, W_i, 3) uint8 RGB -> detections (M, 7) [image_index, x1, y1, x2, y2, score, class] in each
    image's original pixels, on the CPU: letterboxed as evaluation's images are, then evaluation's own
    engine/evaluate.py detect_batch. The model runs in its own dtype (fp16 after model.half()), under autocast of
    `amp_dtype` (Form.dtype) where one is given."""
    batch, metas = letterbox_batch(images, size)
    return detect_batch(model, batch, metas, eval_cfg, device, amp_dtype, conf_threshold)[0]


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    """The options detect.py and visualization.py share: config, weights, size, threshold, device, output folder."""
    add_config_args(parser)
    parser.add_argument("--weights", required=True, type=Path, help="checkpoint (.pt) or Darknet .weights file")
    parser.add_argument("--img-size", type=int, help="network input side, a multiple of 32 (default: data.img_size)")
    parser.add_argument("--conf", type=float, help="score threshold (default: detect.conf_threshold)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or N (the same as --gpu; default: cuda:0 if available)")
    parser.add_argument("--half", action="store_true", help="fp16 weights and inputs (CUDA only; the form is fp16)")
    add_speed_args(parser)
    parser.add_argument("--out", type=Path, help="output folder (default: <logging.dir>/<tool>_<weights stem>)")


def inference_setup(args: argparse.Namespace) -> tuple[YOLO, Config, torch.device, Form]:
    """Parsed add_inference_args options -> the fused model as ready_for_inference makes it (fp16 with --half),
    the config whose `model` section describes it, the device and the model's form (printed); a bad option, config
    or weights file exits with one line."""
    # the options are shorthands for config keys, so the config's checks and messages apply to them
    for key, value in (("data.img_size", args.img_size), ("detect.conf_threshold", args.conf)):
        if value is not None:
            args.overrides.append(f"{key}={value}")
    if args.device is not None:
        try:
            args.gpu = device_to_gpu(args.device)
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from e
    cfg, device = cli_config(args)
    if args.half and device.type != "cuda":
        raise SystemExit(f"error: --half runs fp16 on CUDA only; this run is on {device} (use --device cuda)")
    try:
        model, cfg = load_model(args.weights, cfg)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    names = getattr(model, "class_names", None)  # a checkpoint's (models/transfer.py)
    model = model.fuse().half() if args.half else model.fuse()
    amp = "fp16" if args.half else amp_mode(args.amp, cfg.eval.amp, device)
    model, form = tool_ready_for_inference(model, device, cfg.data.img_size, amp, args.pack, args.compile)
    model.class_names = names  # kept on whatever form runs, so the tools name classes without data
    return model, cfg, device, form


def tool_ready_for_inference(model: YOLO, device: torch.device, size: int, amp: str, pack: bool | None,
                             compile: bool) -> tuple[torch.nn.Module, Form]:
    """ready_for_inference for a tool: options that name no form, or a --compile that cannot run, exit with one
    line; the form that runs is printed."""
    if isinstance(model, ExportedModel):  # an exported file runs in its own runtime, as deployed
        if pack or compile:
            raise SystemExit(f"error: --pack and --compile are for a PyTorch model; {model.path} runs in "
                             f"{model.runtime}")
        print(f"inference form: {model.form}")
        return model, model.form
    try:
        model, form = ready_for_inference(model, device, size, amp, pack, compile)
    except CompileError as e:
        raise SystemExit(f"error: --compile: {e}") from e
    except FormError as e:
        raise SystemExit(f"error: {e}") from e
    print(f"inference form: {form}")
    return model, form
