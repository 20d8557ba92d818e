"""Inference on decoded images: letterbox a batch, run the model, post-process, map back to original pixels.

The same geometry as evaluation (datasets/transforms.py letterbox, models/postprocess.py inverse), for any images.
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
from models import YOLO
from models.packed import pack_conv_weights, packing_available
from models.postprocess import postprocess, to_original_pixels
from models.transfer import load_model
from utils.checkpoint import CheckpointError
from utils.cli import add_config_args, cli_config, device_to_gpu
from utils.config import Config, ConfigError, EvalConfig

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
    (validation, detection; never a model being trained or averaged). On this project's 2-core CPU it took the
    fused channels_last YOLOv3 from 0.79 to 0.93 of the conv ceiling at batch 1 (bench/run.py --compile), after
    ~20 s of compilation per input shape; it needs a C++ compiler.

    Freezing is switched on process-wide (torch._inductor.config.freezing): inductor reads it when it compiles,
    at the first call and at each recompilation, not in torch.compile(); torch.compile(options={"freezing": True})
    measured no faster than eager here. The tools that call this compile nothing else. Raises CompileError at once
    where inductor's C++ compiler is missing (it would fail only at the first call, deep in a traceback)."""
    compiler = os.environ.get("CXX") or "g++"  # what inductor runs on a CPU (and Triton's launcher needs a C one)
    if shutil.which(compiler) is None:
        raise CompileError(f"torch.compile needs a C++ compiler: {compiler!r} (the CXX environment variable, else "
                           "g++) is not on the PATH; install one (e.g. apt install g++) or run without --compile")
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True
    return torch.compile(model)


def add_speed_args(parser: argparse.ArgumentParser) -> None:
    """--compile and --no-pack, for the tools that run a trained model (validation.py, detect.py, visualization.py)."""
    parser.add_argument("--compile", action="store_true", help="torch.compile the model, weights frozen: faster per "
                        "image after ~20 s of compilation per input shape on a CPU (needs a C++ compiler)")
    parser.add_argument("--no-pack", action="store_true", help="on a CPU, run the plain convs (default: weights "
                        "packed for oneDNN once, activations fused; the same outputs, ~10%% faster at batch 1)")


def ready_for_inference(model: YOLO, device: torch.device, size: int, compile: bool = False, pack: bool = True
                        ) -> torch.nn.Module:
    """An eval-mode model (BN fused or not) as the tools run it: channels_last on `device`, then compiled
    (`compile`), or on a CPU in fp32 with its conv weights packed for oneDNN (`pack`, models/packed.py; packed for
    (1, 3, size, size) inputs, other shapes run too). Raises CompileError where `compile` cannot run."""
    model = model.eval().to(device, memory_format=torch.channels_last)
    if compile:
        return compile_for_inference(model)
    if pack and device.type == "cpu" and packing_available():  # the tools autocast on CUDA only
        pack_conv_weights(model, torch.zeros(1, 3, size, size).contiguous(memory_format=torch.channels_last))
    return model


def unit_float(batch: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 in [0, 1]: the input that exported graphs take (our models take either)."""
    return batch.float().div_(255)


@torch.inference_mode()
def detect(model: torch.nn.Module, images: Sequence[np.ndarray], size: int, eval_cfg: EvalConfig,
           conf_threshold: float, device: torch.device) -> torch.Tensor:
    """Images (H_i, W_i, 3) uint8 RGB -> detections (M, 7) [image_index, x1, y1, x2, y2, score, class] in each
    image's original pixels, on the CPU. The model runs in its own dtype (fp16 after model.half())."""
    batch, metas = letterbox_batch(images, size)
    pred = model(batch.to(device, non_blocking=True)).float()  # (B, N, 5+C); the model converts the uint8 batch
    detections = postprocess(pred, conf_threshold, eval_cfg.nms_iou, eval_cfg.max_det, eval_cfg.max_candidates,
                             eval_cfg.multi_label)
    return to_original_pixels(detections.cpu(), metas)


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    """The options detect.py and visualization.py share: config, weights, size, threshold, device, output folder."""
    add_config_args(parser)
    parser.add_argument("--weights", required=True, type=Path, help="checkpoint (.pt) or Darknet .weights file")
    parser.add_argument("--img-size", type=int, help="network input side, a multiple of 32 (default: data.img_size)")
    parser.add_argument("--conf", type=float, help="score threshold (default: detect.conf_threshold)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or N (the same as --gpu; default: cuda:0 if available)")
    parser.add_argument("--half", action="store_true", help="fp16 weights and inputs (CUDA only)")
    add_speed_args(parser)
    parser.add_argument("--out", type=Path, help="output folder (default: <logging.dir>/<tool>_<weights stem>)")


def inference_setup(args: argparse.Namespace) -> tuple[YOLO, Config, torch.device]:
    """Parsed add_inference_args options -> the fused model as ready_for_inference makes it (fp16 with --half),
    the config whose `model` section describes it, and the device; a bad option, config or weights file exits
    with one line."""
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
    model = model.fuse().half() if args.half else model.fuse()
    try:
        return ready_for_inference(model, device, cfg.data.img_size, args.compile, not args.no_pack), cfg, device
    except CompileError as e:
        raise SystemExit(f"error: --compile: {e}") from e
