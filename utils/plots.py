"""Drawing boxes with class names on images, image grids, and the evaluation's charts (PR curves, P/R/F1 against the
score threshold, confusion matrix), all as (H, W, 3) uint8 RGB arrays for files and TensorBoard."""
from __future__ import annotations

import colorsys
import gc
import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch
from matplotlib import font_manager, mathtext
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from utils.boxes import CROWD_CLASS

TRUE_BOX_COLOR = (255, 255, 255)  # ground truth: white, so that predictions in class colours stand out
CROWD_COLOR = (128, 128, 128)  # crowd (ignore) regions: grey, no class colour


def class_color(class_index: int) -> tuple[int, int, int]:
    """A stable, distinct RGB colour per class: hues spaced by the golden ratio."""
    hue = (class_index * 0.618033988749895) % 1.0
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, 1.0))


def tensor_to_image(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) uint8, or float in [0, 1] -> (H, W, 3) uint8 RGB."""
    if image.dtype != torch.uint8:
        image = (image.clamp(0, 1) * 255).round().byte()
    return image.permute(1, 2, 0).cpu().numpy().copy()


def draw_boxes(image: np.ndarray, boxes_xyxy: np.ndarray, classes: np.ndarray, names: Sequence[str],
               scores: np.ndarray | None = None, thickness: int = 2) -> np.ndarray:
    """Draw (K, 4) xyxy pixel boxes with their class name (and score) on a (H, W, 3) uint8 RGB image, in place.
    Crowd regions (class CROWD_CLASS) are grey and labelled "crowd"."""
    for i, (box, cls) in enumerate(zip(np.asarray(boxes_xyxy), np.asarray(classes), strict=True)):
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        crowd = int(cls) == CROWD_CLASS  # not names[-1]: Python would give the last class's name
        color = CROWD_COLOR if crowd else class_color(int(cls))
        cv2.rectangle(image, (x1, y1), (x2, y2), color, thickness)
        label = "crowd" if crowd else names[int(cls)] if 0 <= int(cls) < len(names) else str(int(cls))
        if scores is not None:
            label = f"{label} {float(scores[i]):.2f}"
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        top = max(y1 - th - 4, 0)
        cv2.rectangle(image, (x1, top), (x1 + tw + 2, top + th + 4), color, -1)
        cv2.putText(image, label, (x1 + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return image


def draw_true_boxes(image: np.ndarray, boxes_xyxy: np.ndarray) -> np.ndarray:
    """Draw (K, 4) xyxy pixel ground-truth boxes as thin white outlines, unlabelled, on a (H, W, 3) image, in place."""
    for x1, y1, x2, y2 in np.asarray(boxes_xyxy).round().astype(int).tolist():
        cv2.rectangle(image, (x1, y1), (x2, y2), TRUE_BOX_COLOR, 1)
    return image


def draw_detections(image: np.ndarray, boxes_xyxy: np.ndarray, classes: np.ndarray, names: Sequence[str],
                    scores: np.ndarray | None = None, true_xyxy: np.ndarray | None = None) -> np.ndarray:
    """Predictions (K, 4) xyxy with class names and scores, over the true boxes (M, 4) xyxy in white when given,
    drawn on a (H, W, 3) uint8 RGB image in place: the picture of main.py's predictions.png and visualization.py."""
    if true_xyxy is not None:
        draw_true_boxes(image, true_xyxy)
    return draw_boxes(image, boxes_xyxy, classes, names, scores)


def image_grid(images: Sequence[np.ndarray], columns: int | None = None, gap: int = 4) -> np.ndarray:
    """Tile (H_i, W_i, 3) uint8 images into one grid image, row by row, on white; cells take the largest size."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    cell_h, cell_w = max(im.shape[0] for im in images), max(im.shape[1] for im in images)
    grid = np.full((rows * (cell_h + gap) - gap, columns * (cell_w + gap) - gap, 3), 255, np.uint8)
    for i, im in enumerate(images):
        y, x = (i // columns) * (cell_h + gap), (i % columns) * (cell_w + gap)
        grid[y:y + im.shape[0], x:x + im.shape[1]] = im
    return grid


# -- evaluation charts: matplotlib's Agg canvas, no pyplot (no global backend or figure state) ----------------------

LEGEND_MAX = 20  # up to this many classes the curves carry a legend; beyond, thin unlabelled lines and the mean
CELL_NUMBERS_MAX = 30  # confusion matrices with at most this many rows (background included) print every cell


def figure_to_image(fig: Figure) -> np.ndarray:
    """Render a matplotlib figure on the Agg canvas -> (H, W, 3) uint8 RGB."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def release_fonts() -> None:
    """Close the font files matplotlib keeps open in its cache (call once the figures are gone): a run leaves no
    file descriptor behind (reliability/endurance.py counts them). matplotlib clears this cache the same way after
    a fork; the mathtext parser (a log colour bar's tick labels) holds fonts in its own cache."""
    gc.collect()  # figures are reference cycles: free them, and with them their references to the fonts
    mathtext.MathTextParser._parse_cached.cache_clear()
    font_manager._get_font.cache_clear()


def _class_curves(ax: Axes, x: np.ndarray, per_class: np.ndarray, mean: np.ndarray, names: Sequence[str],
                  labels: Sequence[str], mean_label: str) -> None:
    """Per-class curves (K, N) over x (N,) thin in class colours (legend up to LEGEND_MAX classes), the mean bold."""
    many = len(names) > LEGEND_MAX
    for k, curve in enumerate(per_class):
        if not np.isnan(curve).all():
            keep = _steps(curve)
            ax.plot(x[keep], curve[keep], drawstyle="steps-post", lw=0.6 if many else 1.0, alpha=0.5 if many else 0.8,
                    color=np.array(class_color(k)) / 255, label=None if many else labels[k])
    keep = _steps(mean)
    ax.plot(x[keep], mean[keep], drawstyle="steps-post", lw=2.5, color="#1f3b73", label=mean_label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=_legend_size(len(names)), ncol=1 if many or len(names) <= 10 else 2,
              framealpha=0.7)


def _steps(curve: np.ndarray) -> np.ndarray:
    """Indices (N',) where a curve (N,) changes, and its ends: drawn as steps they give the same picture from far
    fewer points (80 classes x 1001 thresholds otherwise take seconds to draw)."""
    change = np.flatnonzero(curve[1:] != curve[:-1]) + 1  # nan != nan: kept, harmless
    return np.unique(np.concatenate([[0], change, [len(curve) - 1]]))


def _legend_size(num_classes: int) -> float:
    """Legend font size (points): small only while the legend lists 9 to LEGEND_MAX classes."""
    return 5 if 8 < num_classes <= LEGEND_MAX else 7


def plot_pr_curves(recall: np.ndarray, precision: np.ndarray, mean: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Precision (K, R) per class (nan rows: no ground truth) and their mean (R,) at the recall points (R,)
    -> a (H, W, 3) uint8 chart; each label carries the curve's AP50 (its mean over the recall points)."""
    fig = Figure(figsize=(7, 6), dpi=100)
    ax = fig.subplots()
    labels = [f"{name} {np.nanmean(p) if not np.isnan(p).all() else float('nan'):.3f}"
              for name, p in zip(names, precision, strict=True)]
    _class_curves(ax, recall, precision, mean, names, labels, f"all classes {mean.mean():.3f} mAP50")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall at IoU 0.5 (COCOeval: area all, 100 detections)", fontsize=10)
    return figure_to_image(fig)


def plot_threshold_curves(thresholds: np.ndarray, precision: np.ndarray, recall: np.ndarray, f1: np.ndarray,
                          means: tuple[np.ndarray, np.ndarray, np.ndarray], best_threshold: float | None,
                          names: Sequence[str]) -> np.ndarray:
    """Precision, recall, F1 per class (K, T) and their means (T,) against the score thresholds (T,), with the
    best-F1 threshold marked -> one (H, W, 3) uint8 chart of three panels."""
    fig = Figure(figsize=(15, 5), dpi=100)
    axes = fig.subplots(1, 3)
    best = float(np.nanmax(means[2])) if np.isfinite(means[2]).any() else 0.0
    for ax, title, per_class, mean in zip(axes, ("precision", "recall", "F1"), (precision, recall, f1), means,
                                          strict=True):
        _class_curves(ax, thresholds, per_class, mean, names, names, "all classes (mean)")
        if best_threshold is not None:
            ax.axvline(best_threshold, color="#c0392b", ls="--", lw=1.2,
                       label=f"best F1 {best:.3f} at {best_threshold:.3f}")
            ax.legend(loc="lower left", fontsize=_legend_size(len(names)), framealpha=0.7)
        ax.set_xlabel("score threshold (detections with score > t)")
        ax.set_title(title)
    fig.suptitle("At IoU 0.5; the best-F1 threshold is detect.py --conf (detect.conf_threshold)", fontsize=10)
    fig.tight_layout()
    return figure_to_image(fig)


def plot_confusion_matrix(matrix: np.ndarray, names: Sequence[str], conf_threshold: float,
                          normalize: bool) -> np.ndarray:
    """Confusion matrix (K+1, K+1), rows true class, columns predicted, index K background -> (H, W, 3) uint8;
    normalize: each row divided by its sum (rows without a count stay 0). Figure, fonts and tick labels scale
    with K; cells carry numbers up to CELL_NUMBERS_MAX rows."""
    n = len(names) + 1
    labels = [*names, "background"]
    values = matrix / np.maximum(matrix.sum(1, keepdims=True), 1) if normalize else matrix.astype(float)
    side = float(np.clip(3.5 + 0.18 * n, 5, 18))  # inches at 100 dpi: ~18 px per row at 80 classes
    tick_size = float(np.clip(520 / n, 6, 10))  # points: 6 pt (8 px) names at 80 classes fit their rows
    fig = Figure(figsize=(side + 1.5, side), dpi=100)
    ax = fig.subplots()
    # empty cells white; counts on a log scale, else the largest cell (often person -> background) washes out the rest
    norm = Normalize(0, 1) if normalize else LogNorm(1, max(values.max(), 2))
    image = ax.imshow(np.ma.masked_equal(values, 0), cmap="Blues", norm=norm, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, format=FuncFormatter(lambda v, _: f"{v:g}"))  # no mathtext
    ax.set_xticks(range(n), labels, rotation=90, fontsize=tick_size)
    ax.set_yticks(range(n), labels, fontsize=tick_size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= CELL_NUMBERS_MAX:
        cell_size = float(np.clip(160 / n, 5, 11))
        threshold = 0.5 if normalize else np.sqrt(max(values.max(), 1))  # the colour scale's middle: white text
        for (i, j), v in np.ndenumerate(values):
            if v:
                ax.text(j, i, f"{v:.2f}" if normalize else f"{int(v)}", ha="center", va="center",
                        fontsize=cell_size, color="white" if v > threshold else "black")
    kind = "row-normalised" if normalize else "counts"
    ax.set_title(f"Confusion matrix ({kind}) at score > {conf_threshold:g} and IoU 0.5", fontsize=10)
    fig.tight_layout()
    return figure_to_image(fig)
