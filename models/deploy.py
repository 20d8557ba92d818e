"""A YOLO model to deployable files and back: ONNX (with an optional NMS graph), TorchScript, OpenVINO IR (float32
and NNCF INT8), and running them (models/runtime.py runs .onnx / .xml files as the tools do).

ONNX uses torch's TorchScript-based exporter (`dynamo=False`): it writes the opset asked for (MIN_OPSET and up; torch
2.14 writes up to 21), takes about a second for YOLOv3-tiny, needs no onnxscript, and works on every torch this
project supports. (On torch 2.14 the torch.export-based exporter took 8 s for the same model and could not write
opset 17: it converts down from 18 and has no converter for Pad.)
TorchScript is `torch.jit.trace`: the decoding reads its grid sizes from the input, so the traced model takes any
batch size and any input size whose sides are multiples of 32.
"""
from __future__ import annotations

import inspect
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.ops import batched_nms

from models.postprocess import top_per_image
from models.runtime import METADATA_KEY, import_optional
from utils.boxes import box_cxcywh_to_xyxy

INPUT_NAME = "images"  # (B, 3, H, W) RGB in [0, 1], float32
OUTPUT_NAMES = {False: "predictions", True: "detections"}  # (B, N, 5+C) decoded; with NMS (M, 7)

MIN_OPSET = 11  # below it the exporter cannot write the dynamic grid sizes of the decoding (nor the NMS graph)

# Messages the exporters print for what is expected here: torch's deprecation notices for the two exporters we
# chose on purpose (see above); the tracer's notes on Python values it records as constants (the anchors and
# strides, which are constants) and on shapes read in NonMaxSuppression.forward (the ONNX node replaces it); constant
# folding skipping strided slices (correct, only not folded); advanced indexing being wrong for negative indices
# (ours are never negative).
EXPECTED_WARNINGS = ("You are using the legacy TorchScript-based ONNX export", "The feature will be removed",
                     "is deprecated. Please switch to", "Converting a tensor to a Python",
                     "Using len to get tensor shape", "Constant folding - Only steps=1",
                     "Exporting aten::index operator of advanced indexing")


class NonMaxSuppression(torch.autograd.Function):
    """ONNX NonMaxSuppression: per image and class, at most `max_per_class` boxes above `score_threshold`, greedy
    at `iou_threshold`. The forward computes the same in PyTorch (what tracing records shapes from)."""

    @staticmethod
    def forward(ctx: object, boxes_xyxy: torch.Tensor, scores: torch.Tensor, max_per_class: int,
                iou_threshold: float, score_threshold: float) -> torch.Tensor:
        """(B, N, 4), (B, C, N) -> selected (K, 3) [image, class, box index], ONNX's output."""
        b, c, n = torch.nonzero(scores > score_threshold, as_tuple=True)
        group = b * scores.shape[1] + c
        keep = batched_nms(boxes_xyxy[b, n], scores[b, c, n], group, iou_threshold)
        keep = keep[top_per_image(group[keep], scores[b, c, n][keep], max_per_class)]
        return torch.stack([b, c, n], 1)[keep]

    @staticmethod
    def symbolic(g: object, boxes_xyxy: object, scores: object, max_per_class: int, iou_threshold: float,
                 score_threshold: float) -> object:
        """The ONNX node (opset 11+); corners in any order work, as IoU does not depend on it."""
        constant = lambda value, dtype: g.op("Constant", value_t=torch.tensor([value], dtype=dtype))  # noqa: E731
        return g.op("NonMaxSuppression", boxes_xyxy, scores, constant(max_per_class, torch.int64),
                    constant(iou_threshold, torch.float32), constant(score_threshold, torch.float32))


class WithNMS(nn.Module):
    """The model plus post-processing as models/postprocess.py does it with multi_label and no candidate cap:
    (B, 3, H, W) -> detections (M, 7) [image_index, x1, y1, x2, y2, score, class] in input pixels, by image, best
    first, at most max_det per image."""

    def __init__(self, model: nn.Module, conf_threshold: float, nms_iou: float, max_det: int) -> None:
        super().__init__()
        self.model, self.conf_threshold, self.nms_iou, self.max_det = model, conf_threshold, nms_iou, max_det

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (M, 7) detections."""
        pred = self.model(x)  # (B, N, 5+C)
        boxes = box_cxcywh_to_xyxy(pred[..., :4])  # (B, N, 4)
        scores = (pred[..., 4:5] * pred[..., 5:]).transpose(1, 2)  # (B, C, N)
        # a class never has more than max_det boxes among an image's max_det best
        selected = NonMaxSuppression.apply(boxes, scores, self.max_det, self.nms_iou, self.conf_threshold)
        b, c, n = selected.unbind(1)
        s = scores[b, c, n]
        order = torch.argsort(b.to(s.dtype) * 2 - s)  # by image, then best first (scores are in [0, 1])
        b, c, n, s = b[order], c[order], n[order], s[order]
        same_image = (b[:, None] == torch.arange(x.shape[0], device=x.device)[None]).long()  # (K, B) one-hot
        rank = (same_image.cumsum(0) * same_image).sum(1) - 1  # (K,) 0-based rank within its image
        keep = rank < self.max_det
        return torch.cat([b[:, None].to(s.dtype), boxes[b, n], s[:, None], c[:, None].to(s.dtype)], 1)[keep]


def export_onnx(model: nn.Module, path: Path, example: torch.Tensor, opset: int, dynamic_size: bool = False,
                nms: tuple[float, float, int] | None = None) -> Path:
    """Write the eval-mode model as ONNX with a dynamic batch axis (and dynamic H, W with dynamic_size); with
    nms = (conf_threshold, nms_iou, max_det) the graph ends in NonMaxSuppression and outputs (M, 7) detections."""
    if nms is not None:
        model = WithNMS(model, *nms)
    output = OUTPUT_NAMES[nms is not None]
    axes = {INPUT_NAME: {0: "batch", **({2: "height", 3: "width"} if dynamic_size else {})},
            output: {0: "detections"} if nms else {0: "batch", **({1: "anchors"} if dynamic_size else {})}}
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings():
        for message in EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=f".*{message}")
        torch.onnx.export(model.eval(), (example,), str(path), input_names=[INPUT_NAME], output_names=[output],
                          opset_version=opset, dynamic_axes=axes, **legacy)
    return path


def export_torchscript(model: nn.Module, path: Path, example: torch.Tensor) -> Path:
    """Write the eval-mode model traced on `example` as TorchScript (torch.jit.load reads it back)."""
    with warnings.catch_warnings():
        for message in EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=f".*{message}")
        traced = torch.jit.trace(model.eval(), example, check_trace=False)
        traced.save(str(path))
    return path


def load_onnx(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """An exported ONNX file in an onnxruntime CPU session, as a function (B, 3, H, W) -> its output."""
    import onnxruntime  # only export needs it

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])


def load_torchscript(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """An exported TorchScript file read with torch.jit.load, as a function (B, 3, H, W) -> its output."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f".*{EXPECTED_WARNINGS[2]}")
        model = torch.jit.load(str(path), map_location="cpu")
    return torch.inference_mode()(model)


def prediction_diffs(reference: torch.Tensor, exported: torch.Tensor) -> dict[str, float]:
    """Decoded predictions (B, N, 5+C) of PyTorch and of an export -> max abs diff of boxes (px) and of the
    probabilities (objectness, classes); a shape mismatch is an error naming both shapes."""
    if reference.shape != exported.shape:
        raise ValueError(f"exported output shape {tuple(exported.shape)} differs from PyTorch's "
                         f"{tuple(reference.shape)}")
    diff = (reference - exported).abs()
    return {"boxes": float(diff[..., :4].max()), "probabilities": float(diff[..., 4:].max())}


NEAR_TIES = (" (scores equal to within float precision, as an untrained model gives, can be kept or suppressed "
             "differently by onnxruntime; the check without --nms compares the predictions themselves)")


def detection_diffs(reference: torch.Tensor, exported: torch.Tensor) -> dict[str, float]:
    """Detections (M, 7) of postprocess and of the NMS graph -> max abs diff of boxes (px) and scores, after
    ordering both by image, class and score, and their number; a different count, image or class is an error."""
    if reference.shape != exported.shape:
        raise ValueError(f"the NMS graph found {len(exported)} detections where PyTorch's postprocess finds "
                         f"{len(reference)}{NEAR_TIES}")
    # by image, class and score; equal scores (a constant model) by position
    ordered = [d[np.lexsort((d[:, 2].round(2), d[:, 1].round(2), -d[:, 5], d[:, 6], d[:, 0]))]
               for d in (reference.numpy(), exported.numpy())]
    if not np.array_equal(ordered[0][:, [0, 6]], ordered[1][:, [0, 6]]):
        raise ValueError(f"the NMS graph's detections are of other images or classes than PyTorch's postprocess's"
                         f"{NEAR_TIES}")
    diff = np.abs(ordered[0] - ordered[1])
    return {"boxes": float(diff[:, 1:5].max(initial=0)), "probabilities": float(diff[:, 5].max(initial=0)),
            "detections": len(diff)}


def add_onnx_metadata(path: Path, metadata: dict) -> None:
    """Store models/runtime.py export_metadata's dict in the ONNX file's metadata_props (what load_exported reads)."""
    import onnx

    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.save(model, str(path))


def export_openvino(onnx_path: Path, path: Path, metadata: dict) -> Path:
    """Convert an exported ONNX file to OpenVINO IR (path .xml + .bin, float32 weights) with `metadata` in its
    rt_info. The ONNX graph is the source (not the torch model): one tracing, the same NMS node."""
    ov = import_optional("openvino", "export.py --format openvino")
    model = ov.convert_model(str(onnx_path))
    model.set_rt_info(json.dumps(metadata), [METADATA_KEY])
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path


def quantize_openvino(xml_path: Path, path: Path, calibration: list[np.ndarray], metadata: dict,
                      preset: str = "mixed") -> Path:
    """Post-training INT8 quantisation of an OpenVINO file with NNCF, calibrated on `calibration` ((1, 3, S, S)
    float32 inputs in [0, 1]), written to `path` with `metadata`. NNCF quantises the convolutions' inputs and weights
    (preset "mixed": asymmetric activations, symmetric weights; "performance": both symmetric); the decoding after
    the last convolutions (sigmoid, exp, grid offsets, concat of pixels and probabilities) is left in float: one
    int8 scale for boxes in pixels and probabilities in [0, 1] would erase the probabilities."""
    ov = import_optional("openvino", "export.py --int8")
    nncf = import_optional("nncf", "export.py --int8")
    logging.getLogger("nncf").setLevel(logging.WARNING)  # else a line per operation it leaves in float
    model = ov.Core().read_model(str(xml_path))
    decoding = nncf.IgnoredScope(types=["Sigmoid", "Exp", "Multiply", "Subtract", "Concat", "Reshape", "Transpose",
                                        "Gather", "NonMaxSuppression"], validate=False)  # not every graph has all
    quantized = nncf.quantize(model, nncf.Dataset(calibration), subset_size=len(calibration),
                              preset=nncf.QuantizationPreset(preset), ignored_scope=decoding)
    quantized.set_rt_info(json.dumps(metadata), [METADATA_KEY])
    ov.save_model(quantized, str(path), compress_to_fp16=False)
    return path
