"""Box format conversions; the format is in the name (xyxy: corners, cxcywh: centre and size, both in pixels)."""
from __future__ import annotations

import torch


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) cx, cy, w, h -> (..., 4) x1, y1, x2, y2."""
    centre, size = boxes[..., :2], boxes[..., 2:4]
    return torch.cat([centre - size / 2, centre + size / 2], -1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) x1, y1, x2, y2 -> (..., 4) cx, cy, w, h."""
    top_left, bottom_right = boxes[..., :2], boxes[..., 2:4]
    return torch.cat([(top_left + bottom_right) / 2, bottom_right - top_left], -1)
