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

    python export.py --weights W --format openvino --int8                  # + <stem>.xml/.bin, <stem>_int8.xml/.bin

- <stem>.xml / .bin (--format openvino; pip install openvino): OpenVINO IR converted from the ONNX graph (written
  to a temporary folder when onnx is not among the formats), float32 weights, the same input and output. Checked
  like the ONNX file with OpenVINO's f32 precision hint (its default on a CPU with native bf16 is bf16).
- <stem>_int8.xml / .bin (--int8; pip install nncf): NNCF post-training quantisation of it, calibrated on --calib
  (default data.val_images; the first --calib-images images, letterboxed), the decoding left in float
  (models/deploy.py quantize_openvino).
Every .onnx / .xml file carries the config it was exported with, so validation.py and detect.py run it as --weights.
Last, with --check-images N (default 100; 0: off) and data.val_annotations present, the PyTorch model and each file
written are scored on the first N validation images through validation.py's path (each file in its runtime, OpenVINO
at its default precision): an AP50 further than 0.01 (float files) or 0.02 (INT8) from PyTorch's exits with status 1,
naming the file and both figures. With --nms, both are scored at the file's score threshold.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datasets.coco import DatasetError, class_table
from datasets.formats import data_paths
from datasets.loader import build_dataset, build_loader
from datasets.sources import UnreadableError, find_sources, read_image
from engine.evaluate import evaluate
from inference import letterbox_batch, unit_float
from models.deploy import (
    MIN_OPSET,
    OUTPUT_NAMES,
    add_onnx_metadata,
    detection_diffs,
    export_onnx,
    export_openvino,
    export_torchscript,
    load_onnx,
    load_torchscript,
    prediction_diffs,
    quantize_openvino,
)
from models.postprocess import postprocess
from models.runtime import EXPORTED_SUFFIXES, ExportedModel, MissingPackageError, export_metadata, import_optional
from models.transfer import load_model
from utils.checkpoint import CheckpointError
from utils.cli import add_config_args, cli_config
from utils.config import Config
from utils.config_load import config_to_dict

FORMATS = ("onnx", "torchscript", "openvino")
AP50_TOLERANCE = {"fp32": 0.01, "int8": 0.02}  # --check-images: |AP50 of the file - PyTorch's| allowed, by precision


def build_parser() -> argparse.ArgumentParser:
    """The command line: config options plus the export's own."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--weights", required=True, type=Path, help="checkpoint (.pt) or Darknet .weights file")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS[:2]),
                        help="default: onnx torchscript")
    parser.add_argument("--img-size", type=int, help="input side for the export and the check (default: "
                        "data.img_size)")
    parser.add_argument("--opset", type=int, default=17, help=f"ONNX opset, {MIN_OPSET} or more (default 17)")
    parser.add_argument("--dynamic-size", action="store_true", help="ONNX: dynamic height and width too")
    parser.add_argument("--nms", action="store_true", help="ONNX: end the graph in NMS, output (M, 7) detections")
    parser.add_argument("--conf", type=float, help="--nms score threshold (default: detect.conf_threshold)")
    parser.add_argument("--image", type=Path, help="image for the check (default: first of data.val_images)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest accepted difference (default 1e-4)")
    parser.add_argument("--out", type=Path, help="folder for the files (default: next to --weights)")
    parser.add_argument("--int8", action="store_true", help="with --format openvino: also <stem>_int8.xml, NNCF "
                        "post-training quantisation")
    parser.add_argument("--calib", type=Path, help="--int8 calibration images (default: data.val_images)")
    parser.add_argument("--calib-images", type=int, default=300, help="--int8: calibrate on at most N images "
                        "(default 300)")
    parser.add_argument("--preset", choices=("mixed", "performance"), default="mixed", help="--int8: NNCF preset "
                        "(mixed: asymmetric activations; default mixed)")
    parser.add_argument("--check-images", type=int, default=100, help="score every file written by AP50 on the "
                        "first N validation images against PyTorch (default 100; 0: no AP check)")
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
    if args.calib_images < 1:
        parser.error(f"--calib-images {args.calib_images}: must be at least 1")
    if args.int8 and "openvino" not in args.format:
        parser.error("--int8 quantises the OpenVINO file: add --format openvino")
    if args.weights.suffix in EXPORTED_SUFFIXES:
        parser.error(f"--weights {args.weights}: export.py exports a checkpoint (.pt) or Darknet .weights file, not "
                     f"an exported {args.weights.suffix}")
    for key, value in (("data.img_size", args.img_size), ("detect.conf_threshold", args.conf)):
        if value is not None:
            args.overrides.append(f"{key}={value}")
    cfg, _ = cli_config(args)
    try:
        model, cfg = load_model(args.weights, cfg)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    try:  # before any work: a missing optional package is the first thing to say
        for name, purpose, wanted in (("openvino", "export.py --format openvino", "openvino" in args.format),
                                      ("nncf", "export.py --int8", args.int8)):
            if wanted:
                import_optional(name, purpose)
    except MissingPackageError as e:
        raise SystemExit(f"error: {e}") from e
    reference = copy.deepcopy(model).eval()  # unfused: the check covers the folding too
    model.fuse()
    size, image = cfg.data.img_size, check_image(args.image, cfg)
    out = args.out or args.weights.parent
    out.mkdir(parents=True, exist_ok=True)
    inputs = check_inputs(image, size)
    example = inputs[f"batch 1 at {size}"]
    nms = (cfg.detect.conf_threshold, cfg.eval.nms_iou, cfg.eval.max_det) if args.nms else None

    metadata = file_metadata(cfg, model.num_classes, OUTPUT_NAMES[nms is not None], args.dynamic_size)
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "onnx" in args.format or "openvino" in args.format:  # OpenVINO converts the ONNX graph
            folder = out if "onnx" in args.format else Path(tmp)
            try:
                onnx_path = export_onnx(model, folder / f"{args.weights.stem}.onnx", example, args.opset,
                                        args.dynamic_size, nms)
            except Exception as e:  # torch's exporter raises many types; all mean this opset / model cannot be written
                raise SystemExit(f"error: ONNX export at opset {args.opset} failed: {type(e).__name__}: {e}") from e
            add_onnx_metadata(onnx_path, metadata)
            if "onnx" in args.format:
                files["onnx"] = onnx_path
        if "openvino" in args.format:
            files["openvino"] = export_openvino(onnx_path, out / f"{args.weights.stem}.xml", metadata)
        if args.int8:
            calibration = calibration_inputs(args.calib, cfg, args.calib_images)
            files["openvino_int8"] = quantize_openvino(files["openvino"], out / f"{args.weights.stem}_int8.xml",
                                                       calibration, {**metadata, "precision": "int8"}, args.preset)
    if "torchscript" in args.format:
        files["torchscript"] = export_torchscript(model, out / f"{args.weights.stem}.torchscript", example)
    for path in files.values():
        weights = path.with_suffix(".bin") if path.suffix == ".xml" else None  # OpenVINO's weights file
        mib = (path.stat().st_size + (weights.stat().st_size if weights else 0)) / 2**20
        print(f"wrote {path}{f' and {weights.name}' if weights else ''} ({mib:.1f} MiB)")

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
    if "openvino" in files:  # with the f32 hint: the check is of the conversion, not of bf16 arithmetic
        runtime = ExportedModel(files["openvino"], precision="f32")
        compare_inputs = {k: x for k, x in inputs.items() if args.dynamic_size or x.shape[-1] == size}
        checks["openvino"] = compare("openvino", lambda x: torch.from_numpy(runtime.run(x.numpy())), compare_inputs,
                                     expected if nms else predictions,
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
    ap50 = check_by_ap(files, reference, cfg, args.check_images, nms)
    return {"files": files, "checks": checks, "ap50": ap50}


def file_metadata(cfg: Config, num_classes: int, output: str, dynamic_size: bool) -> dict:
    """models/runtime.py export_metadata for this export: the config, and the class names and category ids of
    data.val_annotations (or COCO's) where they fit the model, else none (detect.py then looks them up itself)."""
    try:
        names, category_ids = class_table(data_paths(cfg.data, "val")[1], num_classes)
    except DatasetError:
        names, category_ids = None, None
    return export_metadata(cfg, config_to_dict(cfg), output, dynamic_size, "fp32", names, category_ids)


def calibration_inputs(folder: Path | None, cfg: Config, count: int) -> list[np.ndarray]:
    """The first `count` images of --calib (default data.val_images), letterboxed to data.img_size, as (1, 3, S, S)
    float32 inputs in [0, 1]."""
    folder = folder or data_paths(cfg.data, "val")[0]
    if not folder.is_dir():
        raise SystemExit(f"error: --int8 calibrates on images: --calib {folder} is not a folder (default: "
                         "data.val_images)")
    sources = [s for s in find_sources([str(folder)])[0] if not s.is_video][:count]
    if not sources:
        raise SystemExit(f"error: --calib {folder}: no images in it")
    try:
        return [unit_float(letterbox_batch([read_image(s.path)], cfg.data.img_size)[0]).numpy()
                for s in tqdm(sources, desc="calibration images", unit="image")]
    except UnreadableError as e:
        raise SystemExit(f"error: --calib: {e}") from e


class FloatInput(torch.nn.Module):
    """A traced TorchScript model (it takes float [0, 1] only: tracing kept one input dtype's path) fed the loaders'
    uint8 batches."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 or float [0, 1] -> (B, N, 5+C) decoded predictions."""
        return self.model(unit_float(x) if x.dtype == torch.uint8 else x)


def check_by_ap(files: dict[str, Path], reference: torch.nn.Module, cfg: Config, count: int,
                nms: tuple[float, float, int] | None) -> dict[str, float]:
    """AP50 of the PyTorch model and of each .onnx / .xml / .torchscript file on the first `count` validation images
    (validation.py's prediction path; with `nms` at its score threshold, as the file's graph); prints each and exits
    with status 1 naming every file further than AP50_TOLERANCE from PyTorch. Returns name -> AP50 ("pytorch" too);
    empty when off or without validation annotations."""
    images, annotations = data_paths(cfg.data, "val")
    if count <= 0 or not annotations.is_file() or not images.is_dir():
        if count > 0:
            print(f"AP check skipped: no validation set ({annotations} or {images} does not exist)")
        return {}
    dataset = build_dataset(cfg, "val")
    if len(dataset.class_names) != reference.num_classes:
        print(f"AP check skipped: {annotations} has {len(dataset.class_names)} categories, the model "
              f"{reference.num_classes} classes")
        return {}
    dataset.ids = dataset.ids[:count]
    eval_cfg = cfg.eval if nms is None else cfg.eval.model_copy(update={  # what the NMS graph computes
        "conf_threshold": nms[0], "multi_label": True, "max_candidates": 2**62})
    loader = build_loader(cfg, dataset, train=False, batch_size=cfg.eval.batch_size, device=torch.device("cpu"))
    score = lambda model: evaluate(model, loader, eval_cfg, torch.device("cpu")).stats["AP50"]  # noqa: E731
    ap50 = {"pytorch": score(reference)}
    failures = []
    for name, path in files.items():
        model = FloatInput(torch.jit.load(str(path), map_location="cpu")) if name == "torchscript" else \
            ExportedModel(path)
        ap50[name] = score(model)
        tolerance = AP50_TOLERANCE["int8" if name.endswith("int8") else "fp32"]
        ok = abs(ap50[name] - ap50["pytorch"]) <= tolerance
        print(f"AP50 on {len(dataset)} validation images: {path} {ap50[name]:.4f}, PyTorch {ap50['pytorch']:.4f}: "
              f"{'within' if ok else 'OUTSIDE'} the tolerance {tolerance}")
        if not ok:
            failures.append(f"{path}: AP50 {ap50[name]:.4f}, PyTorch's {ap50['pytorch']:.4f}, tolerance {tolerance}")
    if failures:
        raise SystemExit("error: exported file(s) score away from the PyTorch model on the validation images; do not "
                         "deploy them:\n  " + "\n  ".join(failures))
    return ap50


if __name__ == "__main__":
    main()
