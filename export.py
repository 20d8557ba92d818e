"""Export a checkpoint or Darknet .weights file to ONNX and TorchScript, and prove that the files compute what the
PyTorch model computes.

    python export.py --weights logs/<run>/best.pt                     # ONNX (opset 17) + TorchScript, data.img_size
    python export.py --weights models/weights/yolov3.weights --img-size 608 --opset 13 --dynamic-size
    python export.py --weights logs/<run>/best.pt --format onnx --nms --conf 0.25   # ONNX ending in NMS

BatchNorm is folded into the convs first. Files go into --out (default: next to the weights):
- <stem>.onnx: input "images" (B, 3, H, W) RGB in [0, 1], letterboxed as datasets/transforms.py does; output
  "predictions" (B, N, 5+C) decoded: cx, cy, w, h in input pixels, objectness, class probabilities (the PyTorch
  model's eval output). With --nms, output "detections" (M, 7) [image_index, x1, y1, x2, y2, score, class] in input
  pixels, at most eval.max_det per image (ONNX NonMaxSuppression, IoU eval.nms_iou, score above
  detect.conf_threshold). The batch axis is dynamic; with --dynamic-size height and width are too.
- <stem>.torchscript: the same input and output as the ONNX file without --nms; any batch and size.
Each file is then run (onnxruntime on the CPU, torch.jit.load) on --image (default: the first image of
data.val_images) letterboxed to the input size, as a batch of 1 and of 3 (with its mirror images), and at a second
size where the file allows it, and compared with the unfused PyTorch model (for --nms: with models/postprocess.py on
its output). The largest absolute differences are printed; one above --atol (probabilities and scores; boxes as a
fraction of the input side) fails the run with exit status 1. Everything runs on the CPU.
"""
from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from datasets.formats import DatasetError, data_paths
from datasets.sources import UnreadableError, find_sources, read_image
from inference import letterbox_batch, unit_float
from models.deploy import (
    MIN_OPSET,
    detection_diffs,
    export_onnx,
    export_torchscript,
    load_onnx,
    load_torchscript,
    prediction_diffs,
)
from models.postprocess import postprocess
from models.transfer import load_model
from utils.checkpoint import CheckpointError
from utils.cli import add_config_args, cli_config
from utils.config import Config

FORMATS = ("onnx", "torchscript")


def build_parser() -> argparse.ArgumentParser:
    """The command line: config options plus the export's own."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--weights", required=True, type=Path, help="checkpoint (.pt) or Darknet .weights file")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS), help="default: both")
    parser.add_argument("--img-size", type=int, help="input side for the export and the check (default: "
                        "data.img_size)")
    parser.add_argument("--opset", type=int, default=17, help=f"ONNX opset, {MIN_OPSET} or more (default 17)")
    parser.add_argument("--dynamic-size", action="store_true", help="ONNX: dynamic height and width too")
    parser.add_argument("--nms", action="store_true", help="ONNX: end the graph in NMS, output (M, 7) detections")
    parser.add_argument("--conf", type=float, help="--nms score threshold (default: detect.conf_threshold)")
    parser.add_argument("--image", type=Path, help="image for the check (default: first of data.val_images)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest accepted difference (default 1e-4)")
    parser.add_argument("--out", type=Path, help="folder for the files (default: next to --weights)")
    return parser


def check_image(path: Path | None, cfg: Config) -> np.ndarray:
    """The check's image: --image, or the first image of data.val_images, as (H, W, 3) uint8 RGB."""
    if path is None:
        try:
            folder = data_paths(cfg.data, "val")[0]
        except DatasetError as e:
            raise SystemExit(f"error: the check's image comes from data.root: {e}; or give --image PATH") from e
        if not folder.is_dir():
            raise SystemExit(f"error: the check runs the exported files on a real image: give --image PATH "
                             f"(data.val_images, {folder}, does not exist)")
        path = next(s.path for s in find_sources([str(folder)])[0] if not s.is_video)
    try:
        return read_image(path)
    except UnreadableError as e:
        raise SystemExit(f"error: --image: {e}") from e


def check_inputs(image: np.ndarray, size: int) -> dict[str, torch.Tensor]:
    """Name -> (B, 3, S, S) float input in [0, 1] (what the exported graphs take): the image letterboxed as a batch
    of 1, of 3 (with its mirror images), and as a batch of 1 at size + 32."""
    x = unit_float(letterbox_batch([image], size)[0])
    return {f"batch 1 at {size}": x, f"batch 3 at {size}": torch.cat([x, x.flip(-1), x.flip(-2)]),
            f"batch 1 at {size + 32}": unit_float(letterbox_batch([image], size + 32)[0])}


def compare(name: str, run: Callable[[torch.Tensor], torch.Tensor], inputs: dict[str, torch.Tensor],
            expected: dict[str, torch.Tensor], diffs: Callable, atol: float) -> dict[str, dict]:
    """Run the exported model on each input and compare with PyTorch's output; prints and returns, per input,
    the largest differences and `ok` (or `ok` False and the `error` when the outputs do not even correspond)."""
    results = {}
    for label, x in inputs.items():
        try:
            d = diffs(expected[label], run(x))
        except ValueError as e:  # shapes, counts or classes differ: a failure of the export, reported as one
            results[label] = {"ok": False, "error": str(e)}
            print(f"{name:<12} {label:<16} FAILED: {e}")
            continue
        d["ok"] = d["probabilities"] <= atol and d["boxes"] / x.shape[-1] <= atol
        count = f" ({d['detections']} detections)" if "detections" in d else ""
        print(f"{name:<12} {label:<16} max abs diff: boxes {d['boxes']:.2e} px ({d['boxes'] / x.shape[-1]:.1e} of "
              f"the side), probabilities {d['probabilities']:.2e}{count}  {'ok' if d['ok'] else 'ABOVE TOLERANCE'}")
        results[label] = d
    return results


def main(argv: list[str] | None = None) -> dict:
    """Export, check, print what was written and the differences; returns the files and the differences."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.opset < MIN_OPSET:
        parser.error(f"--opset {args.opset}: the model needs opset {MIN_OPSET} or more (dynamic grid sizes)")
    if args.atol <= 0:
        parser.error(f"--atol {args.atol}: must be positive")
    for key, value in (("data.img_size", args.img_size), ("detect.conf_threshold", args.conf)):
        if value is not None:
            args.overrides.append(f"{key}={value}")
    cfg, _ = cli_config(args)
    try:
        model, cfg = load_model(args.weights, cfg)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    reference = copy.deepcopy(model).eval()  # unfused: the check covers the folding too
    model.fuse()
    size, image = cfg.data.img_size, check_image(args.image, cfg)
    out = args.out or args.weights.parent
    out.mkdir(parents=True, exist_ok=True)
    inputs = check_inputs(image, size)
    example = inputs[f"batch 1 at {size}"]
    nms = (cfg.detect.conf_threshold, cfg.eval.nms_iou, cfg.eval.max_det) if args.nms else None

    files = {}
    if "onnx" in args.format:
        try:
            files["onnx"] = export_onnx(model, out / f"{args.weights.stem}.onnx", example, args.opset,
                                        args.dynamic_size, nms)
        except Exception as e:  # torch's exporter raises many types; all mean this opset / model cannot be written
            raise SystemExit(f"error: ONNX export at opset {args.opset} failed: {type(e).__name__}: {e}") from e
    if "torchscript" in args.format:
        files["torchscript"] = export_torchscript(model, out / f"{args.weights.stem}.torchscript", example)
    for path in files.values():
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")

    with torch.inference_mode():
        predictions = {label: reference(x) for label, x in inputs.items()}  # (B, N, 5+C), unfused PyTorch
    checks = {}
    if "onnx" in files:
        onnx_inputs = {k: x for k, x in inputs.items() if args.dynamic_size or x.shape[-1] == size}
        if nms:  # what the graph computes: models/postprocess.py with multi_label and no candidate cap
            expected = {k: postprocess(predictions[k], *nms, max_candidates=predictions[k][0].numel(),
                                       multi_label=True) for k in onnx_inputs}
        checks["onnx"] = compare("onnx", load_onnx(files["onnx"]), onnx_inputs, expected if nms else predictions,
                                 detection_diffs if nms else prediction_diffs, args.atol)
    if "torchscript" in files:  # a traced model takes any size
        checks["torchscript"] = compare("torchscript", load_torchscript(files["torchscript"]), inputs, predictions,
                                        prediction_diffs, args.atol)
    failures = [f"{fmt} {label}: " + (d["error"] if "error" in d else
                                      f"boxes {d['boxes']:.2e} px, probabilities {d['probabilities']:.2e}")
                for fmt, per_input in checks.items() for label, d in per_input.items() if not d["ok"]]
    if failures:
        raise SystemExit(f"error: the exported model differs from PyTorch by more than --atol {args.atol}; do not "
                         "deploy it:\n  " + "\n  ".join(failures))
    print(f"checked against PyTorch: every difference within --atol {args.atol}")
    return {"files": files, "checks": checks}


if __name__ == "__main__":
    main()
