"""The one prediction path and the evaluation: batched inference -> COCO rows (gathered over ranks) -> the COCO API.

`detect_batch` is forward -> post-processing -> original pixels for one letterboxed batch; `predict` runs it over a
loader, `evaluate` scores what every rank predicted. inference.py (detect.py, visualization.py) and batch_overfit.py
call `detect_batch` too, so evaluation and the tools see the same boxes.
"""
from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.coco_eval import coco_evaluate, to_coco_rows
from datasets.loader import checked_batches
from models.forms import Form, autocast, choose_form
from models.postprocess import postprocess, to_original_pixels
from utils.config import EvalConfig
from utils.distributed import all_gather_rows, broadcast_object, is_main_process
from utils.plots import draw_detections, image_grid


@dataclass
class EvalResult:
    """Everything one evaluation produced."""

    stats: dict[str, float]  # COCO_STATS -> value (0.0 for everything when there is no detection)
    per_class_ap50: dict[str, float]  # class name -> AP50 (nan for classes without ground truth in the images)
    table: str  # the COCO API's printed summary
    rows: np.ndarray  # (M, 7) [image_id, x, y, w, h, score, category_id], original pixels and category ids
    seconds: dict[str, float] = field(default_factory=dict)  # data, model, postprocess, cocoeval
    pr50: np.ndarray | None = None  # (101 recall points, K) COCOeval precision at IoU 0.5, -1: no ground truth (rank 0)


def evaluate(model: nn.Module, loader: DataLoader, eval_cfg: EvalConfig, device: torch.device,
             amp_dtype: torch.dtype | None = None, progress: bool = True) -> EvalResult:
    """Predict over the loader's dataset (this rank's shard under DDP, the rows gathered from all ranks) and score
    it with the COCO API (eval_cfg.backend) on rank 0; every rank returns the stats, rank 0 the per-class AP50 and
    the table too."""
    rows, seconds = predict(model, loader, eval_cfg, device, amp_dtype, progress)
    rows = all_gather_rows(rows)  # every rank predicted its shard (datasets/loader.py ShardSampler)
    dataset = loader.dataset
    start = time.perf_counter()
    stats, per_class, table, pr50 = {}, {}, "", None
    if is_main_process():
        stats, per_class, table, pr50 = coco_evaluate(dataset.coco, rows, dataset.ids, dataset.class_names,
                                                      eval_cfg.backend)
    seconds["cocoeval"] = time.perf_counter() - start
    return EvalResult(broadcast_object(stats), per_class, table, rows, seconds, pr50)


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, eval_cfg: EvalConfig, device: torch.device,
            amp_dtype: torch.dtype | None = None, progress: bool = True, max_batches: int | None = None
            ) -> tuple[np.ndarray, dict[str, float]]:
    """Run `detect_batch` over the loader (its first max_batches batches only, if given; under autocast of
    `amp_dtype`: models/forms.py Form.dtype; None: as it is); returns COCO rows (M, 7) at eval_cfg.conf_threshold
    and seconds per stage (data, model, postprocess)."""
    category_ids = loader.dataset.category_ids
    seconds: dict[str, float] = defaultdict(float)
    rows = [np.zeros((0, 7))]
    start = time.perf_counter()
    batches = itertools.islice(checked_batches(loader), max_batches)
    for images, _, metas in tqdm(batches, total=min(len(loader), max_batches or len(loader)), desc="evaluating",
                                 unit="batch", disable=not progress, leave=False):
        seconds["data"] += time.perf_counter() - start
        detections, stages = detect_batch(model, images, metas, eval_cfg, device, amp_dtype)
        start = time.perf_counter()
        rows.append(to_coco_rows(detections, metas, category_ids))
        seconds["model"] += stages["model"]
        seconds["postprocess"] += stages["postprocess"] + time.perf_counter() - start
        start = time.perf_counter()
    return np.concatenate(rows), dict(seconds)


@torch.inference_mode()
def detect_batch(model: nn.Module, images: torch.Tensor, metas: Sequence[dict[str, Any]], eval_cfg: EvalConfig,
                 device: torch.device, amp_dtype: torch.dtype | None = None, conf_threshold: float | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """One letterboxed batch (B, 3, S, S) (uint8, or float in [0, 1]) with its metas {orig_size, letterbox} ->
    detections (M, 7) [image_index, x1, y1, x2, y2, score, class] in each image's original pixels, on the CPU, and
    the seconds of the forward pass and of the post-processing.

    The model runs in eval mode (decoded boxes) in its own dtype, under autocast of `amp_dtype` (Form.dtype) where
    one is given; every module's train / eval mode is as it was on return. Post-processing: models/postprocess.py
    with eval_cfg's NMS settings, at `conf_threshold` (default eval_cfg.conf_threshold).
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        start = time.perf_counter()
        with autocast(device, amp_dtype):
            pred = model(images.to(device, non_blocking=True)).float()  # (B, N, 5+C); the model converts uint8
        if device.type == "cuda":
            torch.cuda.synchronize()  # the forward's own time, not the post-processing's
        forward = time.perf_counter() - start
    finally:
        for module, training in modes:
            module.training = training
    start = time.perf_counter()
    threshold = eval_cfg.conf_threshold if conf_threshold is None else conf_threshold
    detections = postprocess(pred, threshold, eval_cfg.nms_iou, eval_cfg.max_det, eval_cfg.max_candidates,
                             eval_cfg.multi_label)
    detections = to_original_pixels(detections.cpu(), metas)
    return detections, {"model": forward, "postprocess": time.perf_counter() - start}


def evaluation_form(model: nn.Module, amp: str, size: int, device: torch.device) -> Form:
    """The form training evaluates `model` in (eval.amp `amp`; never packed: its weights go on changing), probed at
    (1, 3, size, size) on rank 0 and the same on every rank; the model's train / eval mode is left as it was."""
    training = model.training
    _, form = choose_form(model, device, size, amp, pack=False)
    model.train(training)
    return broadcast_object(form)


def prediction_grid(dataset, rows: np.ndarray, count: int, min_score: float = 0.3) -> np.ndarray:  # noqa: ANN001
    """The first `count` images of a CocoDetection with their true boxes (white; crowd regions left out) and the
    COCO rows (M, 7) above min_score (class colours), as one (H, W, 3) uint8 grid."""
    tiles = []
    for image_id in dataset.ids[:count]:
        mine = rows[(rows[:, 0] == image_id) & (rows[:, 5] >= min_score)]
        xyxy = np.concatenate([mine[:, 1:3], mine[:, 1:3] + mine[:, 3:5]], 1)
        classes = np.array([dataset.category_to_class[int(c)] for c in mine[:, 6]], int)
        tiles.append(draw_detections(dataset.load_image(image_id), xyxy, classes, dataset.class_names, mine[:, 5],
                                     dataset.object_boxes(image_id)))
    return image_grid(tiles)
