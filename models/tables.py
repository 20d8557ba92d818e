"""The model's vocabulary: architectures, their encoders, Darknet's anchors, masks and strides, and the one check
of a model description (build_model's and the config's).

A leaf module: it imports nothing of ours, so that the config schema (utils/config.py) can check `model:` against
these tables without a second copy of them.
"""
from __future__ import annotations

from typing import Any

MAX_CLASSES = 10_000  # YOLO9000 detects 9418

# The encoders each architecture can be built with (yolov3-tiny has its own fixed backbone, named darknet53 here),
# Darknet's anchors in input pixels (w, h), which anchors each head uses, stride-32 head first (yolov3.cfg /
# yolov3-tiny.cfg `[yolo] anchors=` and `mask=`), and the heads' strides. Tiny's second mask 1,2,3 is Darknet's own
# choice (anchor 0 is used by no head); we keep it so that yolov3-tiny.weights work unchanged.
ENCODERS = {"yolov3": ("darknet53", "mobilenet_v3_large", "mobilenet_v3_small"), "yolov3-tiny": ("darknet53",)}
DARKNET_ANCHORS = {
    "yolov3": ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326)),
    "yolov3-tiny": ((10, 14), (23, 27), (37, 58), (81, 82), (135, 169), (344, 319)),
}
ANCHOR_MASKS = {"yolov3": ((6, 7, 8), (3, 4, 5), (0, 1, 2)), "yolov3-tiny": ((3, 4, 5), (1, 2, 3))}
STRIDES = {"yolov3": (32, 16, 8), "yolov3-tiny": (32, 16)}


def _choices(names: Any) -> str:
    return ", ".join(repr(n) for n in names)


def model_problem(arch: str, encoder: str, num_classes: int, anchors: list | None) -> tuple[str, Any, str] | None:
    """The one check of a model description (the config's and build_model's): None, or (key, value, problem)."""
    if arch not in ENCODERS:
        return "arch", arch, f"unknown architecture; use one of {_choices(ENCODERS)}"
    if encoder not in ENCODERS[arch]:
        return "encoder", encoder, (f"does not exist for {arch}; use {_choices(ENCODERS[arch])}"
                                    + (" (yolov3-tiny has its own fixed backbone)" if arch == "yolov3-tiny" else ""))
    if num_classes < 1:
        return "num_classes", num_classes, "must be at least 1"
    if num_classes > MAX_CLASSES:
        return "num_classes", num_classes, f"must be at most {MAX_CLASSES}"
    if anchors is not None:
        expected = len(DARKNET_ANCHORS[arch])
        if len(anchors) != expected:
            return "anchors", anchors, f"expected {expected} [w, h] pairs for {arch} (it needs {expected}: " \
                f"{len(ANCHOR_MASKS[arch][0])} per head), found {len(anchors)}"
        for pair in anchors:
            if len(pair) != 2 or min(pair) <= 0:
                return "anchors", anchors, f"anchor {pair!r} is not two positive numbers [w, h]"
    return None
