"""The numbers behind the evaluation's pictures: precision-recall curves at IoU 0.5 (COCOeval's own array),
precision / recall / F1 against the score threshold with the best-F1 threshold, and a confusion matrix with a
background row and column. `write_evaluation_plots` draws them (utils/plots.py) into a folder; validation.py and
every training evaluation call it.

Matching (`match_image`) is greedy by score at IoU >= 0.5, one IoU matrix per image: each detection claims its
best-overlapping ground truth, and a ground truth claimed by several keeps the highest-scoring one. This is one
vectorised pass, not COCO's detection-by-detection loop: they differ only where a detection loses its best ground
truth to a higher score while overlapping a second one >= 0.5 (COCO gives it the second, here it is a false
positive), i.e. only between heavily overlapping objects. Crowd regions (class CROWD_CLASS) are ignore regions as
in COCO: a detection left unmatched that lies >= 0.5 inside one (intersection over the detection's area) is neither
a true nor a false positive, and a crowd region is never a miss.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from datasets.coco import CocoDetection
from utils.boxes import CROWD_CLASS
from utils.plots import plot_confusion_matrix, plot_pr_curves, plot_threshold_curves, release_fonts

IOU_THRESHOLD = 0.5  # the pictures' match rule: COCO's AP50
THRESHOLDS = np.arange(1001) / 1000  # score thresholds of the P/R/F1 curves; a detection counts when score > t
RECALL_POINTS = np.linspace(0, 1, 101)  # COCOeval's params.recThrs: the columns of eval["precision"]
PLOT_FILES = ("pr_curve.png", "threshold_curves.png", "confusion_matrix.png", "confusion_matrix_normalized.png")


def box_iou_np(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """xyxy boxes a (N, 4), b (M, 4) -> (IoU (N, M), intersection over a's area (N, M): COCO's crowd overlap)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / np.maximum(union, 1e-12), inter / np.maximum(area_a[:, None], 1e-12)


def match_image(det_xyxy: np.ndarray, det_scores: np.ndarray, det_classes: np.ndarray, gt_xyxy: np.ndarray,
                gt_classes: np.ndarray, same_class: bool) -> tuple[np.ndarray, np.ndarray]:
    """One image's detections (D, 4) xyxy with scores (D,) and classes (D,) against its ground truth (G, 4) xyxy
    with classes (G,) (CROWD_CLASS: crowd region) -> (index of the matched ground truth per detection (D,), -1 for
    none; ignored (D,) bool: unmatched but inside a crowd region). same_class: only a ground truth of the
    detection's class can match (COCO's rule); else any class (the confusion matrix's)."""
    matched = np.full(len(det_xyxy), -1, np.int64)
    objects = np.flatnonzero(gt_classes != CROWD_CLASS)
    if len(det_xyxy) and len(objects):
        iou, _ = box_iou_np(det_xyxy, gt_xyxy[objects])  # (D, G')
        if same_class:
            iou = np.where(det_classes[:, None] == gt_classes[objects][None, :], iou, 0.0)
        d, g = np.nonzero(iou >= IOU_THRESHOLD)
        order = np.lexsort((-iou[d, g], -det_scores[d]))  # by score, then IoU, both descending
        d, g = d[order], g[order]
        _, first = np.unique(d, return_index=True)  # each detection's best ground truth
        d, g = d[np.sort(first)], g[np.sort(first)]  # np.sort: keep the score order
        _, first = np.unique(g, return_index=True)  # each ground truth's highest-scoring claimant
        matched[d[first]] = objects[g[first]]
    crowd = np.flatnonzero(gt_classes == CROWD_CLASS)
    ignored = np.zeros(len(det_xyxy), bool)
    if len(det_xyxy) and len(crowd):
        _, inside = box_iou_np(det_xyxy, gt_xyxy[crowd])
        ignored = (matched < 0) & (inside >= IOU_THRESHOLD).any(1)
    return matched, ignored


def _per_image(rows: np.ndarray, targets: dict[int, tuple[np.ndarray, np.ndarray]], image_ids: list[int],
               category_to_class: dict[int, int]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                                np.ndarray]]:
    """COCO rows (M, 7) [image_id, x, y, w, h, score, category_id] and per-image ground truth -> per image:
    (det xyxy (D, 4), scores (D,), classes (D,), gt xyxy (G, 4), gt classes (G,))."""
    image_ids = sorted(image_ids)  # a subset may come in any order; the search below needs them sorted
    rows = rows[np.isin(rows[:, 0], image_ids)]
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    lookup = np.zeros(max(category_to_class, default=0) + 1, np.int64)
    lookup[list(category_to_class)] = list(category_to_class.values())
    classes = lookup[rows[:, 6].astype(np.int64)]
    xyxy = np.concatenate([rows[:, 1:3], rows[:, 1:3] + rows[:, 3:5]], 1)
    starts = np.searchsorted(rows[:, 0], image_ids)
    ends = np.searchsorted(rows[:, 0], image_ids, side="right")
    return [(xyxy[s:e], rows[s:e, 5], classes[s:e], *targets[i]) for i, s, e in zip(image_ids, starts, ends,
                                                                                     strict=True)]


def pr_curves(pr50: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval's precision at IoU 0.5, area 'all', 100 detections (R=101 recall points, K) with -1 for classes
    without ground truth -> (per-class precision (K, R), nan for those classes; the mean over the others (R,),
    whose average over the recall points is mAP50)."""
    precision = np.where(pr50 < 0, np.nan, pr50).T
    valid = ~np.isnan(precision).all(1)
    mean = precision[valid].mean(0) if valid.any() else np.zeros(len(RECALL_POINTS))
    return precision, mean


@dataclass
class ThresholdCurves:
    """Precision, recall and F1 per class (K, T) at THRESHOLDS (T,), their means over the classes with ground
    truth (T,), and the threshold of the best mean F1 (None when no threshold finds anything)."""

    precision: np.ndarray  # (K, T), nan where a class has no detection above the threshold
    recall: np.ndarray  # (K, T), nan for classes without ground truth
    f1: np.ndarray  # (K, T), nan for classes without ground truth
    mean_precision: np.ndarray  # (T,) mean over the classes with ground truth and a detection above t
    mean_recall: np.ndarray  # (T,)
    mean_f1: np.ndarray  # (T,)
    best_f1: float
    best_threshold: float | None


def threshold_curves(true_positive: np.ndarray, scores: np.ndarray, classes: np.ndarray, num_gt: np.ndarray
                     ) -> ThresholdCurves:
    """Counted detections (N,) (ignored ones left out): true positive or not, score, class; num_gt (K,) ground
    truth per class -> P / R / F1 per class at every threshold t of THRESHOLDS, counting detections with
    score > t (models/postprocess.py's rule, so the best threshold goes to detect.py as it is).

    Computed from our own per-class matches rather than COCOeval's eval["scores"]: that array holds only the score
    at each of 101 recall points with COCO's interpolated (upper-envelope) precision, per class, while choosing one
    threshold for all classes needs the raw counts at a common threshold.
    Best threshold: the middle of the first run of thresholds where the mean F1 is highest.
    """
    num_classes = len(num_gt)
    tp = np.zeros((num_classes, len(THRESHOLDS)))
    kept = np.zeros((num_classes, len(THRESHOLDS)))
    for c in range(num_classes):  # classes, not boxes: each is two cumulative sums and a search
        mine = classes == c
        order = np.argsort(-scores[mine], kind="stable")
        cum_tp = np.concatenate([[0], np.cumsum(true_positive[mine][order])])
        above = mine.sum() - np.searchsorted(np.sort(scores[mine]), THRESHOLDS, side="right")  # count of score > t
        tp[c], kept[c] = cum_tp[above], above
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / kept  # nan: no detection above t
        recall = np.where(num_gt[:, None] > 0, tp / num_gt[:, None], np.nan)
        f1 = np.where(tp > 0, 2 * tp / (kept + num_gt[:, None]), 0.0)  # 2PR / (P + R) in counts
    f1 = np.where(num_gt[:, None] > 0, f1, np.nan)
    present = num_gt > 0
    if not present.any():
        nothing = np.zeros(len(THRESHOLDS))
        return ThresholdCurves(precision, recall, f1, nothing, nothing, nothing, 0.0, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-nan column: no detection above t
        mean_precision = np.nanmean(precision[present], 0)
    mean_recall, mean_f1 = recall[present].mean(0), f1[present].mean(0)
    best = float(mean_f1.max())
    if best <= 0:
        return ThresholdCurves(precision, recall, f1, mean_precision, mean_recall, mean_f1, 0.0, None)
    first = int(np.argmax(mean_f1 >= best - 1e-12))
    run_end = first + int(np.argmin(np.append(mean_f1[first:] >= best - 1e-12, False)))  # first index past the run
    threshold = (THRESHOLDS[first] + THRESHOLDS[min(run_end, len(THRESHOLDS) - 1)]) / 2
    return ThresholdCurves(precision, recall, f1, mean_precision, mean_recall, mean_f1, best, float(threshold))


@dataclass
class Matches:
    """Every image's detections matched two ways: per class (for the threshold curves) and across classes at the
    confusion matrix's threshold."""

    curves: ThresholdCurves
    confusion: np.ndarray  # (K+1, K+1) counts: rows true class, columns predicted class; index K: background


def match_detections(rows: np.ndarray, targets: dict[int, tuple[np.ndarray, np.ndarray]], image_ids: list[int],
                     category_to_class: dict[int, int], num_classes: int, conf_threshold: float) -> Matches:
    """COCO rows (M, 7) [image_id, x, y, w, h, score, category_id] against per-image ground truth (xyxy (G, 4),
    classes (G,) with CROWD_CLASS for crowd regions) -> the threshold curves (every row) and the confusion matrix
    of the rows with score > conf_threshold (detect.conf_threshold: what detect.py would draw)."""
    background = num_classes  # the confusion matrix's last row and column
    tp, scores, classes, truth, predicted = [], [], [], [], []
    num_gt = np.zeros(num_classes, np.int64)
    for det_xyxy, det_scores, det_classes, gt_xyxy, gt_classes in _per_image(rows, targets, image_ids,
                                                                             category_to_class):
        num_gt += np.bincount(gt_classes[gt_classes != CROWD_CLASS], minlength=num_classes)
        matched, ignored = match_image(det_xyxy, det_scores, det_classes, gt_xyxy, gt_classes, same_class=True)
        tp.append(matched[~ignored] >= 0)
        scores.append(det_scores[~ignored])
        classes.append(det_classes[~ignored])

        shown = det_scores > conf_threshold
        matched, ignored = match_image(det_xyxy[shown], det_scores[shown], det_classes[shown], gt_xyxy, gt_classes,
                                       same_class=False)
        hit = matched >= 0
        missed = np.setdiff1d(np.flatnonzero(gt_classes != CROWD_CLASS), matched[hit])
        truth += [gt_classes[matched[hit]], np.full((~hit & ~ignored).sum(), background), gt_classes[missed]]
        predicted += [det_classes[shown][hit], det_classes[shown][~hit & ~ignored], np.full(len(missed), background)]
    side = num_classes + 1
    confusion = np.bincount(_concat(truth, np.int64) * side + _concat(predicted, np.int64),
                            minlength=side ** 2).reshape(side, side)
    curves = threshold_curves(_concat(tp, bool), _concat(scores, np.float64), _concat(classes, np.int64), num_gt)
    return Matches(curves, confusion)


def _concat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    """Per-image arrays -> one (N,) array of `dtype` (empty when there are no images)."""
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def write_evaluation_plots(rows: np.ndarray, pr50: np.ndarray, dataset: CocoDetection, conf_threshold: float,
                           out_dir: Path, prefix: str = "") -> tuple[dict[str, np.ndarray], dict]:
    """Draw the evaluation of COCO rows (M, 7) on a CocoDetection (its `ids`, `targets`, `class_names`) into
    out_dir/<prefix>{PLOT_FILES}: PR curves from pr50 (COCOeval's precision (101, K) at IoU 0.5), P/R/F1 against
    the score threshold, the confusion matrix at conf_threshold (counts, and row-normalised).
    Returns ({name: (H, W, 3) uint8 RGB picture} for TensorBoard, a summary: best F1, its threshold, the matrix)."""
    names = dataset.class_names
    matches = match_detections(rows, dataset.targets, dataset.ids, dataset.category_to_class, len(names),
                               conf_threshold)
    precision, mean = pr_curves(pr50)
    curves = matches.curves
    pictures = {
        "pr_curve": plot_pr_curves(RECALL_POINTS, precision, mean, names),
        "threshold_curves": plot_threshold_curves(THRESHOLDS, curves.precision, curves.recall, curves.f1,
                                                  (curves.mean_precision, curves.mean_recall, curves.mean_f1),
                                                  curves.best_threshold, names),
        "confusion_matrix": plot_confusion_matrix(matches.confusion, names, conf_threshold, normalize=False),
        "confusion_matrix_normalized": plot_confusion_matrix(matches.confusion, names, conf_threshold,
                                                             normalize=True),
    }
    release_fonts()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, picture in pictures.items():
        path = out_dir / f"{prefix}{name}.png"
        if not cv2.imwrite(str(path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {path}")
    summary = {"best_f1": curves.best_f1, "best_f1_threshold": curves.best_threshold,
               "confusion_matrix_conf": conf_threshold, "confusion_matrix": matches.confusion.tolist()}
    return pictures, summary


def best_threshold_line(summary: dict) -> str:
    """The one line printed after an evaluation: the best-F1 threshold and the option that takes it."""
    if summary["best_f1_threshold"] is None:
        return "best F1: no score threshold finds a true positive"
    t = summary["best_f1_threshold"]
    return (f"best F1 {summary['best_f1']:.3f} (mean over classes) at score threshold {t:.3f}: "
            f"detect.py --conf {t:.3f} (config detect.conf_threshold)")
