"""Box format conversions (the format is in the name: xyxy corners, cxcywh centre and size, in pixels), the class
that marks a crowd region in targets, and the ragged index helper that box matching and per-image selection share."""
from __future__ import annotations

import torch

# The class of a crowd region (COCO iscrowd=1) in targets [batch_index, class, cx, cy, w, h]: an ignore region, never
# a positive and no objectness penalty for predictions inside it (models/loss.py); drawn and counted apart, never
# looked up as a class name.
CROWD_CLASS = -1


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) cx, cy, w, h -> (..., 4) x1, y1, x2, y2."""
    centre, size = boxes[..., :2], boxes[..., 2:4]
    return torch.cat([centre - size / 2, centre + size / 2], -1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) x1, y1, x2, y2 -> (..., 4) cx, cy, w, h."""
    top_left, bottom_right = boxes[..., :2], boxes[..., 2:4]
    return torch.cat([(top_left + bottom_right) / 2, bottom_right - top_left], -1)


def ragged_arange(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G,) counts -> (owner, offset), each (counts.sum(),): entry i is number offset[i] of group owner[i].

    E.g. counts [2, 0, 3] -> owner [0, 0, 2, 2, 2], offset [0, 1, 0, 1, 2]. A loop-free `for g: for j < counts[g]`.
    """
    owner = torch.repeat_interleave(counts)
    offset = torch.arange(len(owner), device=counts.device) - (counts.cumsum(0) - counts)[owner]
    return owner, offset
