"""YOLOv3 models: `build_model` is the one entry point (see docs/DESIGN.md, Model)."""
from __future__ import annotations

from pathlib import Path

from models.darknet import Darknet53
from models.mobilenet import MobileNetV3Encoder
from models.tables import DARKNET_ANCHORS, ENCODERS, model_problem
from models.yolo import YOLO, YOLOv3, YOLOv3Tiny

__all__ = ["DARKNET_ANCHORS", "ENCODERS", "YOLO", "build_model"]


def build_model(arch: str = "yolov3", encoder: str = "darknet53", num_classes: int = 80,
                anchors: list | None = None, pretrained: bool = False, pretrained_path: str | None = None) -> YOLO:
    """Build YOLOv3 / YOLOv3-tiny; anchors None = Darknet's. `pretrained` loads the encoder's ImageNet weights:
    torchvision's for MobileNetV3 (from `pretrained_path` if given), darknet53.conv.74 at `pretrained_path` for
    Darknet-53. Train mode returns raw maps (B, A, H, W, 5+C) per head; eval mode (B, N, 5+C) decoded."""
    if problem := model_problem(arch, encoder, num_classes, anchors):  # the config's own check
        key, value, why = problem
        raise ValueError(f"model.{key}={value!r}: {why}")
    if arch == "yolov3-tiny":
        model = YOLOv3Tiny(num_classes, anchors)
    elif encoder == "darknet53":
        model = YOLOv3(Darknet53(), num_classes, anchors)
    else:
        model = YOLOv3(MobileNetV3Encoder(encoder, pretrained, pretrained_path), num_classes, anchors)
    model.encoder_name = encoder
    if pretrained and encoder == "darknet53":
        if pretrained_path is None or not Path(pretrained_path).is_file():
            raise FileNotFoundError(
                f"model.pretrained with the darknet53 encoder loads darknet53.conv.74 from model.pretrained_path, "
                f"which is {pretrained_path!r}: fetch it with models/weights/download_darknet_weights.sh and set "
                "model.pretrained_path to its path")
        model.load_darknet_weights(pretrained_path)
    return model
