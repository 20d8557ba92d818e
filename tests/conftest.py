"""Shared test helpers: Darknet cfg parsing (an independent reference for the models), a model with known output."""
import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# YOLO / VOC datasets converted by tests go to a scratch folder, not the user's ~/.cache (datasets/formats.py)
os.environ.setdefault("YOLOV3_DATA_CACHE", tempfile.mkdtemp(prefix="yolov3-test-data-cache-"))

DATA = Path(__file__).parent / "data"


def parse_darknet_cfg(path: Path) -> list[dict]:
    """Darknet cfg -> list of conv layers in file order: filters, size, stride, in_channels, batch_normalize.

    Follows route / shortcut / upsample / maxpool to know each conv's input channels, as Darknet's parser does.
    """
    sections, current = [], None
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("["):
            current = {"type": line[1:-1]}
            sections.append(current)
        elif "=" in line:
            key, value = (s.strip() for s in line.split("=", 1))
            current[key] = value
    channels, convs = [], []  # channels[i]: output channels of layer i
    for i, s in enumerate(sections[1:]):
        c_in = channels[-1] if channels else 3
        if s["type"] == "convolutional":
            convs.append({"index": i, "filters": int(s["filters"]), "size": int(s["size"]),
                          "stride": int(s["stride"]), "in_channels": c_in,
                          "batch_normalize": s.get("batch_normalize") == "1"})
            channels.append(int(s["filters"]))
        elif s["type"] == "route":
            sources = [int(v) for v in s["layers"].split(",")]
            channels.append(sum(channels[j if j >= 0 else i + j] for j in sources))
        else:  # shortcut, upsample, maxpool, yolo keep channels
            channels.append(c_in)
    return convs


@pytest.fixture(scope="session")
def cfg_convs() -> dict[str, list[dict]]:
    """Conv layers of Darknet's yolov3.cfg and yolov3-tiny.cfg (copied into tests/data)."""
    return {arch: parse_darknet_cfg(DATA / f"{arch}.cfg") for arch in ("yolov3", "yolov3-tiny")}


def darknet_float_count(convs: list[dict]) -> int:
    """Number of float32 values a .weights file holds for these conv layers."""
    total = 0
    for c in convs:
        total += (4 if c["batch_normalize"] else 1) * c["filters"]
        total += c["filters"] * c["in_channels"] * c["size"] ** 2
    return total


def grid_model(num_classes: int = 80, cls: int = 2, box: float = 16.0):
    """A YOLOv3-tiny whose output does not depend on the image: in every cell of the stride-32 head one box of
    box x box input pixels centred in the cell, at (16 + 32 col, 16 + 32 row), class `cls`, score ~1; nothing else
    scores above 1e-8. A known answer for drawing, letterbox inversion and export."""
    from models import build_model

    torch.manual_seed(0)
    model = build_model("yolov3-tiny", num_classes=num_classes)
    with torch.no_grad():
        for head, active in ((model.head32.out, True), (model.head16.out, False)):
            head.weight.zero_()
            bias = head.bias.view(len(model.masks[0]), 5 + num_classes)  # (anchor, attribute)
            bias.fill_(-20.0)
            bias[:, :2] = 0.0  # sigmoid(0) = 0.5: the cell's centre
            if active:
                anchor = model.anchors[model.masks[0][0]]
                bias[0, 2:4] = torch.log(box / anchor)  # w = exp(tw) * anchor_w = box
                bias[0, 4] = bias[0, 5 + cls] = 20.0
    return model.eval()


def boxes_to_original(boxes_xyxy: torch.Tensor, meta: dict) -> torch.Tensor:
    """(K, 4) xyxy in network-input pixels -> (K, 4) in the original image's pixels of `meta` {orig_size, letterbox},
    through models/postprocess.py to_original_pixels (the inverse evaluation uses), as detections of image 0."""
    from models.postprocess import to_original_pixels

    rows = torch.cat([torch.zeros(len(boxes_xyxy), 1), boxes_xyxy.float(), torch.zeros(len(boxes_xyxy), 2)], 1)
    return to_original_pixels(rows, [meta])[:, 1:5]
