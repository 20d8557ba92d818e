"""The `augment:` vocabulary: each args.yaml key is one Albumentations 2.x transform, built and checked here.

Shared by the config (which builds and applies each entry once at load time, so that a bad argument is reported
with its key) and by datasets/transforms.py (which composes them for training).
"""
from __future__ import annotations

import inspect
from typing import Any

import albumentations as A
import cv2
import numpy as np

PAD_VALUE = 127  # Darknet letterboxes with 0.5 grey (src/image.c letterbox_image)

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
    "coarse_dropout": A.CoarseDropout,
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


