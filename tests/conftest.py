"""Shared test helpers: Darknet cfg parsing (an independent reference for the models)."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

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
