"""From decoded predictions to final detections: scores, candidate cap, NMS, max_det, back to original pixels.

Everything is vectorised over the batch; NMS runs once per call through `torchvision.ops.batched_nms` with one
group per (image, class). (Below 4,000 boxes on the CPU batched_nms offsets the groups apart and runs one NMS; above,
it runs one small NMS per group, which keeps the O(n^2) of greedy NMS inside each group: on 8 x 10,000 candidates
a single offset NMS took 58 s where the per-group path takes well under a second.)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.ops import batched_nms

from utils.boxes import box_cxcywh_to_xyxy, ragged_arange


def rank_within_group(group: torch.Tensor) -> torch.Tensor:
    """(M,) group ids of rows already sorted by group then by score -> (M,) 0-based rank of each row in its group."""
    _, counts = torch.unique_consecutive(group, return_counts=True)
    return ragged_arange(counts)[1]


def top_per_image(image_index: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best-scoring rows of each image, ordered by image then by descending score: (M',)."""
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(image_index[order], stable=True)]  # by image, by score within each image
    return order[rank_within_group(image_index[order]) < k]


def postprocess(pred: torch.Tensor, conf_threshold: float = 0.001, nms_iou: float = 0.6, max_det: int = 100,
                max_candidates: int = 10000, multi_label: bool = True) -> torch.Tensor:
    """Decoded predictions (B, N, 5+C) [cx, cy, w, h, obj, cls...] -> detections (M, 7)
    [image_index, x1, y1, x2, y2, score, class] in input pixels, grouped by image, best first.

    score = objectness x class probability. multi_label: every class above `conf_threshold` is a candidate
    (Darknet and COCO practice); else only each box's best class. At most `max_candidates` per image enter NMS
    (an untrained model passes all 10,647 x C scores at 0.001), and at most `max_det` per image leave it.
    """
    num_classes = pred.shape[-1] - 5
    scores = pred[..., 4:5] * pred[..., 5:]  # (B, N, C)
    if not multi_label:
        scores, best_class = scores.max(-1, keepdim=True)  # (B, N, 1)
    flat = scores.flatten(1)  # (B, N * C'), C' = C or 1
    passed = flat > conf_threshold
    if len(flat) and int(passed.sum(1).max()) > max_candidates:
        # Too many for NMS (an untrained model passes all 10,647 x C scores at 0.001): the best per image only.
        top_scores, top_index = flat.topk(max_candidates, dim=1)  # (B, K)
        b, j = torch.nonzero(top_scores > conf_threshold, as_tuple=True)
        s, index = top_scores[b, j], top_index[b, j]
    else:
        b, index = torch.nonzero(passed, as_tuple=True)
        s = flat[b, index]
    n, c = index // scores.shape[-1], index % scores.shape[-1]
    if not multi_label:
        c = best_class[b, n, 0]
    boxes = box_cxcywh_to_xyxy(pred[b, n, :4])
    keep = batched_nms(boxes, s, b * num_classes + c, nms_iou)  # sorted by score, best first
    keep = keep[top_per_image(b[keep], s[keep], max_det)]
    return torch.cat([b[keep, None].to(boxes.dtype), boxes[keep], s[keep, None], c[keep, None].to(boxes.dtype)], 1)


def to_original_pixels(detections: torch.Tensor, metas: Sequence[dict[str, Any]]) -> torch.Tensor:
    """Detections (M, 7) in letterboxed input pixels -> the same in each image's original pixels, clipped to it."""
    if not len(detections):
        return detections
    letterboxes = [m["letterbox"] for m in metas]
    table = detections.new_tensor([[lb.scale_x, lb.scale_y, lb.pad_left, lb.pad_top, m["orig_size"][1],
                                    m["orig_size"][0]] for lb, m in zip(letterboxes, metas, strict=True)])
    per_row = table[detections[:, 0].long()]  # (M, 6): scale x, y, pad x, y, width, height
    corners = detections[:, 1:5].reshape(-1, 2, 2)  # (M, corner, xy), a copy
    corners = (corners - per_row[:, None, 2:4]) / per_row[:, None, 0:2]
    corners = corners.clamp(min=torch.zeros_like(per_row[:, None, 4:6]), max=per_row[:, None, 4:6])
    return torch.cat([detections[:, :1], corners.reshape(-1, 4), detections[:, 5:]], 1)
