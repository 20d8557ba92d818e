"""COCO evaluation: batched inference -> COCO result rows -> the official COCO API's 12 numbers and per-class AP50."""
from __future__ import annotations

import contextlib
import io
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.loader import checked_batches
from utils.config import EvalConfig
from utils.postprocess import postprocess, to_original_pixels

# COCOeval.stats in its order (cocoeval.py summarize()): AP at IoU .50:.95, .50, .75, by area; AR at 1/10/100 dets.
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass
class EvalResult:
    """Everything one evaluation produced."""

    stats: dict[str, float]  # COCO_STATS -> value (0.0 for everything when there is no detection)
    per_class_ap50: dict[str, float]  # class name -> AP50 (nan for classes without ground truth in the images)
    table: str  # the COCO API's printed summary
    rows: np.ndarray  # (M, 7) [image_id, x, y, w, h, score, category_id], original pixels and category ids
    seconds: dict[str, float] = field(default_factory=dict)  # data, model, postprocess, cocoeval


def to_coco_rows(detections: torch.Tensor, metas: list[dict], category_ids: list[int]) -> np.ndarray:
    """Detections (M, 7) [image_index, x1, y1, x2, y2, score, class] in original pixels -> COCO rows (M, 7)
    [image_id, x, y, w, h, score, category_id] with the annotation file's own category ids."""
    det = detections.double().cpu().numpy()
    image_ids = np.array([m["image_id"] for m in metas], np.float64)
    categories = np.asarray(category_ids, np.float64)
    return np.stack([image_ids[det[:, 0].astype(int)], det[:, 1], det[:, 2], det[:, 3] - det[:, 1],
                     det[:, 4] - det[:, 2], det[:, 5], categories[det[:, 6].astype(int)]], 1).reshape(-1, 7)


def rows_to_json(rows: np.ndarray) -> list[dict]:
    """COCO rows (M, 7) -> the COCO results format: [{image_id, category_id, bbox [x, y, w, h], score}]."""
    return [{"image_id": int(r[0]), "category_id": int(r[6]), "bbox": [round(float(v), 3) for v in r[1:5]],
             "score": round(float(r[5]), 5)} for r in rows]


@torch.inference_mode()
def predict(model: torch.nn.Module, loader: DataLoader, eval_cfg: EvalConfig, device: torch.device,
            amp: bool = False, progress: bool = True) -> tuple[np.ndarray, dict[str, float]]:
    """Run the model over the loader; returns COCO rows (M, 7) at eval_cfg.conf_threshold and seconds per stage."""
    model.eval()
    category_ids = loader.dataset.category_ids
    seconds: dict[str, float] = defaultdict(float)
    rows = [np.zeros((0, 7))]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for images, _, metas in tqdm(checked_batches(loader), total=len(loader), desc="evaluating", unit="batch",
                                 disable=not progress, leave=False):
        seconds["data"] += time.perf_counter() - start
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
            pred = model(images.to(device, non_blocking=True)).float()
        sync()
        seconds["model"] += time.perf_counter() - start
        start = time.perf_counter()
        detections = postprocess(pred, eval_cfg.conf_threshold, eval_cfg.nms_iou, eval_cfg.max_det,
                                 eval_cfg.max_candidates, eval_cfg.multi_label)
        rows.append(to_coco_rows(to_original_pixels(detections.cpu(), metas), metas, category_ids))
        seconds["postprocess"] += time.perf_counter() - start
        start = time.perf_counter()
    return np.concatenate(rows), dict(seconds)


def coco_evaluate(coco_gt: COCO, rows: np.ndarray, image_ids: list[int], class_names: list[str],
                  backend: str = "pycocotools") -> tuple[dict[str, float], dict[str, float], str]:
    """Score COCO rows against the ground truth on `image_ids`: (12 stats by name, per-class AP50, printed table).

    No detections is a valid result: every number is 0.0 (COCO's API itself cannot load an empty result list).
    """
    if not len(rows):
        return dict.fromkeys(COCO_STATS, 0.0), dict.fromkeys(class_names, 0.0), "no detections: every AP and AR is 0"
    if backend == "faster_coco_eval":
        evaluator = _faster_coco_eval(coco_gt, rows)
    else:
        with contextlib.redirect_stdout(io.StringIO()):  # loadRes prints progress lines
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(rows), "bbox")
    evaluator.params.imgIds = sorted(image_ids)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: float(v) for name, v in zip(COCO_STATS, evaluator.stats, strict=True)}
    # precision: (IoU thresholds, recall points, classes, area ranges, max dets); IoU .50, all areas, 100 dets
    precision = evaluator.eval["precision"][0, :, :, 0, -1]
    per_class = {}
    for k, name in enumerate(class_names):
        valid = precision[:, k][precision[:, k] > -1]
        per_class[name] = float(valid.mean()) if valid.size else float("nan")
    table = "\n".join(line for line in printed.getvalue().splitlines() if line.startswith(" Average"))
    return stats, per_class, table


def _faster_coco_eval(coco_gt: COCO, rows: np.ndarray) -> object:
    """faster-coco-eval's COCOeval on the same ground truth (an optional dependency)."""
    try:
        import faster_coco_eval
    except ImportError as e:
        raise ImportError("eval.backend is faster_coco_eval but the package is not installed: "
                          "pip install faster-coco-eval, or set eval.backend: pycocotools") from e
    gt = faster_coco_eval.COCO(coco_gt.dataset)
    return faster_coco_eval.COCOeval_faster(gt, gt.loadRes(rows), "bbox", print_function=print)


def evaluate(model: torch.nn.Module, loader: DataLoader, eval_cfg: EvalConfig, device: torch.device,
             amp: bool = False, progress: bool = True) -> EvalResult:
    """Predict over the loader's dataset and score it with the COCO API (eval_cfg.backend)."""
    rows, seconds = predict(model, loader, eval_cfg, device, amp, progress)
    dataset = loader.dataset
    start = time.perf_counter()
    stats, per_class, table = coco_evaluate(dataset.coco, rows, dataset.ids, dataset.class_names, eval_cfg.backend)
    seconds["cocoeval"] = time.perf_counter() - start
    return EvalResult(stats, per_class, table, rows, seconds)


def save_json(obj: object, path: str | Path) -> None:
    """Write JSON (a result list or a metrics dict) with the parent folder created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=None if isinstance(obj, list) else 2))
