"""An exported file (.onnx in ONNX Runtime, OpenVINO .xml) as a module that computes what the PyTorch model's eval
forward computes: (B, 3, H, W) uint8 or [0, 1] float images in, (B, N, 5+C) decoded predictions out, on the CPU.

So the tools run an exported file through the same prediction path as a checkpoint (letterbox -> forward ->
models/postprocess.py -> original pixels), and the AP they print is the deployed file's. export.py writes, into every
file, the config it was exported with (the checkpoint's `config`, as JSON) and how: output kind, input size, precision,
class names; `load_exported` reads them back. A file ending in NMS (export.py --nms) gives (M, 7) detections; its
forward returns them as (B, K, 5+C) rows with objectness = score and a one-hot class, zero rows padding each image
to K: post-processing at thresholds no looser than the export's keeps exactly those detections (they already passed
NMS), so the same code scores them.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from models.forms import Form
from utils.boxes import box_xyxy_to_cxcywh
from utils.config import Config, ConfigError
from utils.config_load import config_from_dict

EXPORTED_SUFFIXES = {".onnx": "onnxruntime", ".xml": "openvino"}  # file suffix -> the runtime that runs it
METADATA_KEY = "yolo"  # ONNX metadata_props key / OpenVINO rt_info path holding export_metadata's JSON
PIP_NAMES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "nncf": "nncf"}  # module -> pip package


class MissingPackageError(ImportError, ValueError):
    """An optional runtime (openvino, nncf, onnxruntime) is not installed; the message names the pip command. A
    ValueError too: the tools report a weights file they cannot load (the missing runtime included) in one line."""


def import_optional(name: str, purpose: str) -> ModuleType:
    """Import an optional package, or raise MissingPackageError naming `purpose` and the pip command."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise MissingPackageError(f"{purpose} needs the {name} package, which is not installed: pip install "
                                  f"{PIP_NAMES.get(name, name)} (or pip install -r requirements-dev.txt)") from e


def export_metadata(cfg: Config, config_dict: dict, output: str, dynamic_size: bool, precision: str,
                    names: list[str] | None, category_ids: list[int] | None) -> dict[str, Any]:
    """What an exported file carries: the config it was exported with (config_to_dict), its output ("predictions"
    or "detections"), whether H and W are dynamic, its precision ("fp32" or "int8"), the input side and, where the
    export knew them, the class names and annotation category ids."""
    return {"config": config_dict, "output": output, "dynamic_size": dynamic_size, "precision": precision,
            "img_size": cfg.data.img_size, "names": names, "category_ids": category_ids}


def read_metadata(path: Path) -> dict[str, Any]:
    """export_metadata's dict from an .onnx (metadata_props) or OpenVINO .xml (rt_info) file; a file without it
    (not written by export.py) is an error naming it."""
    if path.suffix == ".onnx":
        import onnx  # a requirement: the export writes it

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        text = props.get(METADATA_KEY)
    else:
        model = import_optional("openvino", f"running {path}").Core().read_model(str(path))
        text = model.get_rt_info([METADATA_KEY]).astype(str) if model.has_rt_info([METADATA_KEY]) else None
    if text is None:
        raise ValueError(f"{path} has no '{METADATA_KEY}' metadata (model config, input size): export it with "
                         "export.py, which writes it")
    return json.loads(text)


class ExportedModel(nn.Module):
    """An exported file in its runtime on the CPU, called as the PyTorch model's eval forward (see the module's
    docstring). `precision`: OpenVINO's inference precision hint ("f32", "bf16"; None: the runtime's default, bf16
    on a CPU with native bf16); `threads`: the runtime's thread count (None: its default)."""

    def __init__(self, path: Path, threads: int | None = None, precision: str | None = None) -> None:
        super().__init__()
        if path.suffix not in EXPORTED_SUFFIXES:
            raise ValueError(f"{path}: an exported model is an .onnx or OpenVINO .xml file")
        if not path.is_file():
            raise FileNotFoundError(f"exported model not found: {path}")
        self.path, self.runtime = path, EXPORTED_SUFFIXES[path.suffix]
        self.meta = read_metadata(path)
        self.num_classes = int(self.meta["config"]["model"]["num_classes"])
        self.classes = ((self.meta["names"], self.meta["category_ids"]) if self.meta.get("names") else None)
        self.form = Form(self.runtime)
        if self.runtime == "onnxruntime":
            ort = import_optional("onnxruntime", f"running {path}")
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads or 0
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            self.run = lambda x: session.run(None, {name: x})[0]
        else:
            ov = import_optional("openvino", f"running {path}")
            config = {**({"INFERENCE_NUM_THREADS": threads} if threads else {}),
                      **({"INFERENCE_PRECISION_HINT": precision} if precision else {})}
            compiled = ov.Core().compile_model(str(path), "CPU", config)
            self.run = lambda x: compiled(x)[0]

    def fuse(self) -> ExportedModel:
        """Nothing to fuse (the export folded BatchNorm): the tools call it on any model."""
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 0..255 or float in [0, 1] -> (B, N, 5+C) float32 decoded predictions (for a file
        ending in NMS: its detections as such rows, see the module's docstring), on the CPU."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        out = torch.from_numpy(self.run(x.detach().cpu().float().contiguous().numpy())).float()
        return out if self.meta["output"] == "predictions" else detections_as_predictions(out, len(x),
                                                                                          self.num_classes)


def detections_as_predictions(detections: torch.Tensor, batch: int, num_classes: int) -> torch.Tensor:
    """(M, 7) [image_index, x1, y1, x2, y2, score, class] -> (B, K, 5+C): per image its detections as cx, cy, w, h,
    objectness = score, one-hot class probabilities, padded with zero rows to K = the most any image has."""
    image = detections[:, 0].long()
    same = image[:, None] == torch.arange(batch)[None]  # (M, B)
    rank = ((same.long().cumsum(0) * same).sum(1) - 1).clamp(min=0)  # (M,) position within its image
    k = int(same.sum(0).max()) if len(detections) else 0
    rows = torch.cat([box_xyxy_to_cxcywh(detections[:, 1:5]), detections[:, 5:6],
                      nn.functional.one_hot(detections[:, 6].long(), num_classes).float()], 1)
    out = torch.zeros(batch, k, 5 + num_classes)
    out[image, rank] = rows
    return out


def load_exported(path: Path, cfg: Config) -> tuple[ExportedModel, Config]:
    """An exported file as an ExportedModel in its runtime, and `cfg` with the file's model section and, for a file
    of fixed input size, its data.img_size (the only size it takes)."""
    model = ExportedModel(path)
    try:
        exported_cfg = config_from_dict(model.meta["config"], str(path))
    except ConfigError as e:
        raise ValueError(f"{path}: its stored config is invalid: {e}") from e
    data = cfg.data if model.meta["dynamic_size"] else cfg.data.model_copy(update={"img_size": model.meta["img_size"]})
    return model, cfg.model_copy(update={"model": exported_cfg.model, "data": data})
