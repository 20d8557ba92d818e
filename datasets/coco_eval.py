"""COCO scoring: detections <-> COCO result rows / JSON (the annotation file's category ids), and the official COCO
API's 12 numbers and per-class AP50 (torchvision's references/detection/coco_eval.py in role). The batched
inference that produces the detections is engine/evaluate.py's `evaluate`."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.config import COCO_STATS

__all__ = ["COCO_STATS", "coco_evaluate", "rows_to_json", "save_json", "to_coco_rows"]  # COCO_STATS: the config's


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


def coco_evaluate(coco_gt: COCO, rows: np.ndarray, image_ids: list[int], class_names: list[str],
                  backend: str = "pycocotools") -> tuple[dict[str, float], dict[str, float], str, np.ndarray]:
    """Score COCO rows against the ground truth on `image_ids`: (12 stats by name, per-class AP50, printed table,
    precision at IoU 0.5 (101 recall points, K classes) with -1 for classes without ground truth: the PR curves).

    No detections is a valid result: every number is 0.0 (COCO's API itself cannot load an empty result list).
    """
    if not len(rows):
        present = {a["category_id"] for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=image_ids, iscrowd=False))}
        pr50 = np.array([[0.0 if c in present else -1.0 for c in sorted(coco_gt.cats)]] * 101)
        return (dict.fromkeys(COCO_STATS, 0.0), dict.fromkeys(class_names, 0.0), "no detections: every AP and AR is 0",
                pr50)
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
    precision = evaluator.eval["precision"][0, :, :, 0, -1]  # (101, K)
    per_class = {}
    for k, name in enumerate(class_names):
        valid = precision[:, k][precision[:, k] > -1]
        per_class[name] = float(valid.mean()) if valid.size else float("nan")
    table = "\n".join(line for line in printed.getvalue().splitlines() if line.startswith(" Average"))
    return stats, per_class, table, np.array(precision)


def _faster_coco_eval(coco_gt: COCO, rows: np.ndarray) -> object:
    """faster-coco-eval's COCOeval on the same ground truth (an optional dependency)."""
    try:
        import faster_coco_eval
    except ImportError as e:
        raise ImportError("eval.backend is faster_coco_eval but the package is not installed: "
                          "pip install faster-coco-eval, or set eval.backend: pycocotools") from e
    gt = faster_coco_eval.COCO(coco_gt.dataset)
    return faster_coco_eval.COCOeval_faster(gt, gt.loadRes(rows), "bbox", print_function=print)


def save_json(obj: object, path: str | Path) -> None:
    """Write JSON (a result list or a metrics dict) with the parent folder created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=None if isinstance(obj, list) else 2))
