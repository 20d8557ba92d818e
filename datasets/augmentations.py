"""The `augment:` vocabulary: each args.yaml key is one Albumentations 2.x transform, built and checked here.

Shared by the config schema (utils/config.py builds and applies each entry once at load time, so that a bad argument
is reported with its key) and by datasets/transforms.py (which composes them for training). A leaf module: it imports
nothing of ours, so that the schema below it can check against it.
"""
from __future__ import annotations

import inspect
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.core.bbox_utils import denormalize_bboxes, normalize_bboxes

PAD_VALUE = 127  # Darknet letterboxes with 0.5 grey (src/image.c letterbox_image)


def boxes_outside_holes(boxes: np.ndarray, holes: np.ndarray, shape: tuple[int, int], min_area: float = 0.0,
                        min_visibility: float = 0.0) -> np.ndarray:
    """(N, 4+) xyxy pixel boxes (extra columns kept) after dropout holes (M, 4) xyxy int: a box with no pixel left
    visible (or below min_area pixels / min_visibility of its pixels) is removed; a box whose first or last rows or
    columns are all hidden shrinks to the visible ones, at the hole's edge. Edges that no hole moved keep their
    sub-pixel value.

    Albumentations 2.0.8's filter_bboxes_by_holes does the same, but truncates every edge of every box in the image
    to an integer (astype(int)), moving it by up to 1 px, towards the top-left (the geometry audit,
    tests/test_geometry_audit.py, found boxes 1 px off their objects wherever a hole was drawn).
    """
    height, width = shape
    hidden = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in holes.astype(int):
        hidden[max(y0, 0):y1, max(x0, 0):x1] = True
    kept = []
    for box in boxes:
        # the pixels the box touches, partly covered ones included
        x0, y0 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
        x1, y1 = min(int(np.ceil(box[2])), width), min(int(np.ceil(box[3])), height)
        visible = ~hidden[y0:y1, x0:x1]
        if visible.size == 0:  # outside the image: left to the final clip and filter
            kept.append(box)
            continue
        area = int(visible.sum())
        if area == 0 or area < min_area or area / visible.size < min_visibility:
            continue
        cols, rows = np.flatnonzero(visible.any(0)), np.flatnonzero(visible.any(1))
        box = box.copy()
        box[0], box[2] = max(box[0], x0 + cols[0]), min(box[2], x0 + cols[-1] + 1)
        box[1], box[3] = max(box[1], y0 + rows[0]), min(box[3], y0 + rows[-1] + 1)
        kept.append(box)
    return np.array(kept, dtype=boxes.dtype).reshape(-1, boxes.shape[1])


class CoarseDropout(A.CoarseDropout):
    """Albumentations' CoarseDropout with boxes that keep their sub-pixel edges (see `boxes_outside_holes`)."""

    def apply_to_bboxes(self, bboxes: np.ndarray, holes: np.ndarray, **params: Any) -> np.ndarray:
        """(N, 4+) normalised xyxy boxes -> the boxes left and shrunk by the holes, normalised."""
        processor = self.get_processor("bboxes")
        if holes.size == 0 or processor is None or len(bboxes) == 0:
            return bboxes
        shape = params["shape"][:2]
        kept = boxes_outside_holes(denormalize_bboxes(bboxes, shape), holes, shape, processor.params.min_area,
                                   processor.params.min_visibility)
        return normalize_bboxes(kept, shape)

# The training augmentations, in the order they are applied: args.yaml `augment.<key>` -> Albumentations 2.x class.
# Colour ops first, then geometry; each key's mapping holds the class's arguments, `p: 0` switches it off.
AUGMENTATIONS: dict[str, type[A.BasicTransform]] = {
    "multiplicative_noise": A.MultiplicativeNoise,
    "clahe": A.CLAHE,
    "posterize": A.Posterize,
    "to_gray": A.ToGray,
    "random_brightness_contrast": A.RandomBrightnessContrast,
    "rgb_shift": A.RGBShift,
    "color_jitter": A.ColorJitter,
    "gauss_noise": A.GaussNoise,
    "random_fog": A.RandomFog,
    "coarse_dropout": CoarseDropout,  # A.CoarseDropout, boxes exact
    "horizontal_flip": A.HorizontalFlip,
    "affine": A.Affine,
}
MAX_ARGUMENT = 10_000  # largest magnitude of a number in an augmentation's arguments (pixels, degrees, factors)
# Arguments we set: the areas that geometry and dropout uncover are grey like the letterbox padding.
FIXED_ARGUMENTS = {"affine": {"border_mode": cv2.BORDER_CONSTANT, "fill": PAD_VALUE},
                   "coarse_dropout": {"fill": PAD_VALUE}}


def _numbers(value: Any) -> list[float]:
    """The numbers in an argument: itself, or those in its (nested) list."""
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return [value] if isinstance(value, int | float) and not isinstance(value, bool) else []


def make_augmentation(key: str, kwargs: dict[str, Any]) -> A.BasicTransform:
    """One Albumentations transform from its args.yaml entry; unknown or invalid arguments raise ValueError."""
    cls = AUGMENTATIONS[key]
    valid = [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "args", "kwargs")]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for Albumentations {cls.__name__}; valid: {valid}")
    p = kwargs.get("p", 0.5)
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
        raise ValueError(f"p={p!r} must be a probability in [0, 1]")
    for name, value in kwargs.items():
        if any(abs(v) > MAX_ARGUMENT for v in _numbers(value)):
            raise ValueError(f"{name}={value!r}: beyond {MAX_ARGUMENT:,}, no argument of these transforms means "
                             "anything (Albumentations overflows on some)")
    try:
        return cls(**{**kwargs, **FIXED_ARGUMENTS.get(key, {})})
    except Exception as e:  # pydantic's ValidationError and TypeError: report them as a bad config value
        raise ValueError(f"Albumentations {cls.__name__} rejects {kwargs}: {e}") from e


def check_augmentation(key: str, kwargs: dict[str, Any]) -> None:
    """Build one augment entry and apply it once (probability 1) to a small image with a box: arguments that
    Albumentations accepts but cannot apply (a translation of 1e308) fail here, with the config, as ValueError."""
    transform = make_augmentation(key, {**kwargs, "p": 1.0})
    boxes = A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True, filter_invalid_bboxes=True)
    try:
        compose = A.Compose([transform], bbox_params=boxes if isinstance(transform, A.DualTransform) else None, seed=0)
        compose(image=np.full((24, 32, 3), 100, np.uint8), bboxes=np.array([[2.0, 3.0, 20.0, 18.0]]), labels=[0])
    except Exception as e:  # anything Albumentations raises: the value is the cause, reported as a config error
        raise ValueError(f"Albumentations {type(transform).__name__} fails on an image with {kwargs}: "
                         f"{type(e).__name__}: {e}") from e


