"""Image + box transforms: letterbox (train and val alike) and the Albumentations training augmentation.

The order of work is chosen for speed: the decoded image is first resized to fit the network size, so every
augmentation runs on at most size x size pixels whatever the source resolution; the grey padding is added last.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from datasets.augmentations import AUGMENTATIONS, PAD_VALUE, make_augmentation


def build_augmentation(augment: dict[str, dict[str, Any]], min_box_size: float, seed: int) -> A.Compose | None:
    """The training augmentation (in AUGMENTATIONS order, p = 0 left out) on xyxy pixel boxes with `labels`;
    None when every transform is off.

    Boxes are clipped to the image; boxes narrower or shorter than `min_box_size` pixels afterwards are removed.
    """
    transforms = [make_augmentation(key, augment[key]) for key in AUGMENTATIONS if augment[key].get("p", 0.5) > 0]
    if not transforms:
        return None
    # filter_invalid_bboxes: a sub-pixel box can collapse to x_max == x_min in float32, which Albumentations
    # would otherwise reject with an exception; such a box is below any min_box_size anyway.
    # check_each_transform=False: clip and filter once at the end, not after every transform (2.4 -> 1 ms/image).
    boxes = A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True, filter_invalid_bboxes=True,
                         min_width=min_box_size, min_height=min_box_size, check_each_transform=False)
    moves_boxes = any(isinstance(t, A.DualTransform) for t in transforms)  # colour-only: boxes pass unchanged
    return A.Compose(transforms, bbox_params=boxes if moves_boxes else None, seed=seed)


@dataclass
class Letterbox:
    """How an image was letterboxed: input = original * (scale_x, scale_y) + (pad_left, pad_top); the inverse, for
    boxes, is models/postprocess.py to_original_pixels."""

    scale_x: float
    scale_y: float
    pad_left: int
    pad_top: int


def resize_to_fit(image: np.ndarray, size: int) -> tuple[np.ndarray, float, float]:
    """(H, W, 3) -> (h, w, 3) with max(h, w) = size, aspect ratio kept; returns the image and x, y scales."""
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return image, new_w / width, new_h / height


def pad_to_square(image: np.ndarray, size: int) -> tuple[np.ndarray, int, int]:
    """(h, w, 3) with h, w <= size -> (size, size, 3), centred on grey; returns the image and left, top padding."""
    height, width = image.shape[:2]
    left, top = (size - width) // 2, (size - height) // 2
    if (width, height) == (size, size):
        return image, 0, 0
    padded = cv2.copyMakeBorder(image, top, size - height - top, left, size - width - left,
                                cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return padded, left, top


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> contiguous (3, H, W) uint8 tensor, so that collate's stack is a plain copy.

    cv2.split writes the planes straight into the tensor: 13x faster than torch's permute().contiguous() on uint8
    (28 vs 369 us at 416 px). OpenCV fills the given planes only when their size and type match, hence the check.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    planes = torch.empty((3, *image.shape[:2]), dtype=torch.uint8)
    cv2.split(image, [plane.numpy() for plane in planes])
    return planes


class Preprocess:
    """Original image + boxes -> network input at a given size: fit, augment (training only), pad, to tensor; then
    boxes narrower or shorter than `min_box_size` input pixels are removed (training: data.min_box_size; 0 keeps
    every box, as validation does)."""

    def __init__(self, augmentation: A.Compose | None = None, min_box_size: float = 0.0) -> None:
        self.augmentation, self.min_box_size = augmentation, min_box_size

    def __call__(self, image: np.ndarray, boxes_xyxy: np.ndarray, classes: np.ndarray, size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, Letterbox]:
        """(H, W, 3) uint8 RGB, (K, 4) xyxy px, (K,) -> (3, size, size) uint8 RGB, (K', 5) [class, cx, cy, w, h]
        in input pixels, and the letterbox that maps input pixels back to the original image. Crowd regions (class
        -1) are boxes like the others here.

        The image stays uint8 (the model converts it to float on its device): 4x fewer bytes through the worker
        queues and to the GPU, and no float pass in the workers."""
        image, scale_x, scale_y = resize_to_fit(image, size)
        boxes = boxes_xyxy.astype(np.float32) * np.array([scale_x, scale_y, scale_x, scale_y], np.float32)
        if self.augmentation is not None and self.augmentation.processors:
            out = self.augmentation(image=image, bboxes=boxes.reshape(-1, 4), labels=classes)
            image, boxes = out["image"], np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
            classes = np.asarray(out["labels"]).reshape(-1)
        elif self.augmentation is not None:
            image = self.augmentation(image=image)["image"]
        image, left, top = pad_to_square(image, size)
        targets = np.empty((len(boxes), 5), np.float32)
        targets[:, 0] = classes
        targets[:, 1] = (boxes[:, 0] + boxes[:, 2]) / 2 + left
        targets[:, 2] = (boxes[:, 1] + boxes[:, 3]) / 2 + top
        targets[:, 3] = boxes[:, 2] - boxes[:, 0]
        targets[:, 4] = boxes[:, 3] - boxes[:, 1]
        if self.min_box_size > 0:
            # here, not only in the augmentation's BboxParams: the resize to the input size shrinks boxes too, and
            # runs when no transform that moves boxes does (the augmentation then never looks at them)
            targets = targets[(targets[:, 3] >= self.min_box_size) & (targets[:, 4] >= self.min_box_size)]
        return to_chw_tensor(image), torch.from_numpy(targets), Letterbox(scale_x, scale_y, left, top)
