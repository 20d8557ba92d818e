"""From decoded predictions to final detections: scores, candidate cap, NMS, max_det, back to original pixels.

Everything is vectorised over the batch. NMS runs with one group per (image, class), first on each image's
NMS_FIRST x max_det best candidates only (`nms_best_first`: exact, as max_det per image is all that is kept), and in
`grouped_nms` whole groups are packed into chunks of about NMS_CHUNK boxes, each chunk one NMS with its groups offset
apart. One NMS per group (torchvision's batched_nms above 4,000 boxes)
costs a call each, a kernel launch and a host sync on CUDA; one NMS over everything (its coordinate trick) is
quadratic in all the boxes of a batch. The measured times of each form are in BENCHMARKS.md (post-processing).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.ops import nms

from utils.boxes import box_cxcywh_to_xyxy, ragged_arange


def rank_within_group(group: torch.Tensor) -> torch.Tensor:
    """(M,) group ids of rows already sorted by group then by score -> (M,) 0-based rank of each row in its group."""
    _, counts = torch.unique_consecutive(group, return_counts=True)
    return ragged_arange(counts)[1]


# boxes per NMS call, by device type (measured best of 128 .. 16384: a CPU's greedy NMS is quadratic in the boxes of
# one call, a GPU's call has a fixed cost and a sequential pass over its n x n/64 overlap mask)
NMS_CHUNK = {"cpu": 256, "cuda": 2048}
NMS_FIRST = 10  # NMS starts on each image's NMS_FIRST * max_det best candidates (nms_best_first; exact either way)


def grouped_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float,
                chunk: int) -> torch.Tensor:
    """Greedy NMS within each group: boxes (M, 4) xyxy, scores (M,), groups (M,) ints -> kept indices (K,), best
    score first. Whole groups are packed into chunks that start every `chunk` boxes (a chunk holds less than chunk +
    its last group), one NMS each with the groups offset apart. The offsets are added in float64: rounding there
    is ~1e-9 px at 10,000 groups of 600 px, where float32's would be ~0.25 px. Groups never interact, so any chunk
    size keeps what torchvision's batched_nms keeps."""
    if not len(boxes):
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(groups, stable=True)
    _, counts = torch.unique_consecutive(groups[order], return_counts=True)
    group_of_box, _ = ragged_arange(counts)  # (M,) 0 .. G-1 in sorted order
    chunk_of_box = ((counts.cumsum(0) - counts) // chunk)[group_of_box]  # a group's chunk: where it starts
    sorted_boxes = boxes[order].double()
    low, high = sorted_boxes.min(), sorted_boxes.max()
    shifted = sorted_boxes + (group_of_box * (high - low + 1))[:, None]  # groups apart, as batched_nms does
    sorted_scores = scores[order].double()
    sizes = torch.unique_consecutive(chunk_of_box, return_counts=True)[1].tolist()  # one host sync
    keep, start = [], 0
    for size in sizes:  # a handful of calls: M / chunk, not one per group
        keep.append(start + nms(shifted[start:start + size], sorted_scores[start:start + size], iou_threshold))
        start += size
    kept = order[torch.cat(keep)]
    return kept[torch.argsort(scores[kept], descending=True, stable=True)]


def top_per_image(image_index: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best-scoring rows of each image, ordered by image then by descending score: (M',)."""
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(image_index[order], stable=True)]  # by image, by score within each image
    return order[rank_within_group(image_index[order]) < k]


def nms_best_first(boxes: torch.Tensor, scores: torch.Tensor, image: torch.Tensor, groups: torch.Tensor,
                   iou_threshold: float, max_det: int, first: int, chunk: int) -> torch.Tensor:
    """grouped_nms as far as `max_det` per image needs it: boxes (M, 4) xyxy, scores (M,), image (M,), groups (M,)
    -> kept indices (K,), best score first, whose best max_det per image are those of grouped_nms on everything.

    NMS runs on each image's `first` best candidates; an image left with fewer than max_det survivors that had
    more candidates runs again on all of them. Exact: a box survives greedy NMS or not by the higher-scoring boxes
    of its group alone, which are among its image's best whenever it is, so the survivors among the best are the
    best survivors (ties in score aside, whose order NMS leaves open anyway)."""
    best = top_per_image(image, scores, first)
    kept = best[grouped_nms(boxes[best], scores[best], groups[best], iou_threshold, chunk)]
    images = int(image.max()) + 1 if len(image) else 0
    redo = (torch.bincount(image[kept], minlength=images) < max_det) & (torch.bincount(image, minlength=images) > first)
    if bool(redo.any()):  # rare: the best `first` held too few survivors
        rows = torch.nonzero(redo[image]).squeeze(1)
        again = rows[grouped_nms(boxes[rows], scores[rows], groups[rows], iou_threshold, chunk)]
        kept = torch.cat([kept[~redo[image[kept]]], again])
        kept = kept[torch.argsort(scores[kept], descending=True, stable=True)]  # two best-first lists into one
    return kept  # grouped_nms's order (best first) where nothing ran again


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
    keep = nms_best_first(boxes, s, b, b * num_classes + c, nms_iou, max_det, NMS_FIRST * max_det,
                          NMS_CHUNK.get(boxes.device.type, NMS_CHUNK["cpu"]))
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
