"""Drawing boxes with class names on images, and image grids (for tools and TensorBoard)."""
from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch

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
