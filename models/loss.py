"""The YOLOv3 loss: Darknet's src/yolo_layer.c `forward_yolo_layer`, vectorised over images, boxes, anchors and heads.

Each term's gradient is Darknet's `delta` with the sign flipped: x/y, objectness and classes are logistic, and their
delta `target - sigmoid(t)` is the gradient of BCE-with-logits; w/h's `scale * (target - t)` is the gradient of
0.5 * scale * squared error. Darknet sums deltas over the batch and divides the learning rate by the batch size
(network.c `update_network`), so every term here is a sum divided by the number of images: the loss is per image.

The objectness term works on all predictions at once in an (anchor slot, image, cell) layout, cells being every
head's grid cells one after the other (stride 32 first, row-major): a prediction's `cell index` is
image * cells + head_offset + row * W + col, and it sits at [slot, cell index].
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.boxes import box_cxcywh_to_xyxy, ragged_arange
from utils.config import LossConfig

LOSS_TERMS = ("xy", "wh", "obj", "cls")
# A prediction whose box lies this much inside a crowd region (intersection / its own area) is not penalised as
# background: COCOeval ignores such a detection at IoU threshold 0.5 (see YOLOLoss)
CROWD_IGNORE_FRACTION = 0.5


def wh_iou(wh1: torch.Tensor, wh2: torch.Tensor) -> torch.Tensor:
    """IoU of (N, 2) sizes with (M, 2) sizes, boxes aligned at a common centre -> (N, M)."""
    inter = torch.minimum(wh1[:, None], wh2[None]).prod(-1)
    return inter / (wh1.prod(-1)[:, None] + wh2.prod(-1)[None] - inter)


def paired_box_iou_xyxy(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of boxes (4, ...) x1, y1, x2, y2 with COORDINATES FIRST, paired with the (broadcast) boxes2 -> (...).

    Coordinates first keeps every operand contiguous: on CPU, elementwise ops on strided views are many times slower.
    """
    inter = (torch.minimum(boxes1[2:], boxes2[2:]) - torch.maximum(boxes1[:2], boxes2[:2])).clamp(min=0).prod(0)
    area1 = (boxes1[2:] - boxes1[:2]).prod(0)
    area2 = (boxes2[2:] - boxes2[:2]).prod(0)
    return inter / (area1 + area2 - inter)


def keep_last(keys: torch.Tensor) -> torch.Tensor:
    """Indices into (P,) `keys` of the last occurrence of each distinct key, ordered by key.

    A stable sort keeps equal keys in input order, so the last of each run is the latest entry: deterministic on
    CPU and CUDA, unlike index_put with repeated indices.
    """
    sorted_keys, order = torch.sort(keys, stable=True)
    last = torch.ones_like(sorted_keys, dtype=torch.bool)
    last[:-1] = sorted_keys[1:] != sorted_keys[:-1]
    return order[last]


class YOLOLoss(nn.Module):
    """YOLOv3 loss over all heads (Darknet src/yolo_layer.c `forward_yolo_layer`, YOLOv3 paper section 2).

    Assignment (yolo_layer.c: `best_n` over all `l.total` anchors, then `mask_n = int_index(l.mask, best_n, l.n)`):
    each ground truth's best anchor is chosen among ALL anchors by the IoU of (w, h) with both boxes centred at the
    same point (ties: the lower anchor index, Darknet's strict `>`). In every head whose mask holds that anchor, the
    ground truth is a positive at the cell holding its centre (col = floor(cx / stride), clamped into the grid) and
    that anchor's slot. With yolov3-tiny's masks (3,4,5) and (1,2,3) a ground truth whose best anchor is 3 is a
    positive in BOTH heads, as in Darknet. One change from Darknet: anchors that no mask holds (tiny's anchor 0)
    are left out of the choice. Darknet lets them win and then assigns the box nowhere, which on data with many
    small objects (best anchor 10x14) leaves most of them unlearned. When several ground truths fall on
    the same (image, head, anchor, row, column), the one later in `targets` wins, as Darknet overwrites in order.
    (Darknet's `delta_yolo_class` would also keep the earlier one's class as a second positive class at that slot;
    here the later ground truth wins whole.)

    Terms, per positive with scale = 2 - w * h / (input_w * input_h) (Darknet's `2 - truth.w * truth.h` in units of
    the input size: small boxes weigh up to twice as much):
    - xy: scale * BCE-with-logits(tx, ty; in-cell centre offset cx / stride - col, in [0, 1)).
    - wh: scale * 0.5 * ((tw - log(w / anchor_w))^2 + (th - log(h / anchor_h))^2) (paper section 2.1, inverted).
    - cls: BCE-with-logits of every class logit against the one-hot class (independent logistic classifiers, paper
      section 2.2).
    - obj: BCE-with-logits over every prediction, target 1 at positives and 0 elsewhere, except that predictions
      which are not positives and whose decoded box has IoU > ignore_threshold with some ground truth of the same
      image get no objectness loss (paper section 2.1; yolo_layer.c `if (best_iou > l.ignore_thresh)`).
    Each term is weight * sum / batch size; the total is their sum.

    Crowd regions (COCO iscrowd=1) are target rows of class < 0 (utils/boxes.py CROWD_CLASS). They are never
    positives and have no xy, wh or cls term. A prediction that is not a positive gets no objectness loss either when
    at least half of its decoded box lies inside a crowd region of its image: intersection / prediction area >=
    CROWD_IGNORE_FRACTION (0.5). That is COCOeval's rule: it matches a detection to an iscrowd ground truth by that
    intersection over the detection's area (pycocotools maskUtils.iou with iscrowd=1) and ignores it when the value
    reaches the IoU threshold, 0.5 for AP50. IoU with the region would not do: one person of a crowd box has a small
    IoU with it, and would be pushed to background while COCOeval does not count it as a false positive.
    """

    def __init__(self, anchors: torch.Tensor, masks: Sequence[Sequence[int]], strides: Sequence[int],
                 num_classes: int, ignore_threshold: float = 0.7, xy_weight: float = 1.0, wh_weight: float = 1.0,
                 obj_weight: float = 1.0, cls_weight: float = 1.0) -> None:
        super().__init__()
        # anchors, masks and strides come from the model (models/tables.py, checked by build_model); not re-checked
        anchors = torch.as_tensor(anchors, dtype=torch.float32).detach().clone().cpu()
        self.masks = tuple(tuple(int(i) for i in mask) for mask in masks)
        self.strides = tuple(int(s) for s in strides)
        self.num_anchors = len(self.masks[0])  # per head
        self.num_classes = num_classes
        self.ignore_threshold = ignore_threshold
        self.weights = {"xy": xy_weight, "wh": wh_weight, "obj": obj_weight, "cls": cls_weight}
        self.register_buffer("anchors", anchors, persistent=False)  # (K, 2) input pixels
        # slot_of[h, k]: position of anchor k in head h's mask, -1 if head h does not use it
        slot_of = torch.full((len(masks), len(anchors)), -1, dtype=torch.long)
        for h, mask in enumerate(self.masks):
            slot_of[h, list(mask)] = torch.arange(len(mask))
        self.register_buffer("slot_of", slot_of, persistent=False)
        self.register_buffer("mask_table", torch.tensor(self.masks), persistent=False)  # (heads, A) anchor index
        # A prediction can only reach IoU > t with a ground truth (gw, gh) if their centres' distance (dx, dy)
        # obeys (1 + 2 dx / gw) * (1 + 2 dy / gh) < ignore_joint and dx < gw * ignore_reach, dy < gh * ignore_reach
        # (proof in `ignored`), so the ignore test looks only at the cells that close.
        self.ignore_joint = ((1 + ignore_threshold) / (2 * ignore_threshold)) ** 2
        self.ignore_reach = min((1 - ignore_threshold) * max(1.0, 0.5 / ignore_threshold), (self.ignore_joint - 1) / 2)
        self._grids: dict[tuple, torch.Tensor] = {}  # prediction_grid cache: one entry per input size and device

    def check_outputs(self, outputs: Sequence[torch.Tensor]) -> None:
        """Raise ValueError if the raw maps do not fit the heads this loss was built for."""
        if len(outputs) != len(self.masks):
            raise ValueError(f"expected {len(self.masks)} head outputs, got {len(outputs)}")
        input_h, input_w = outputs[0].shape[2] * self.strides[0], outputs[0].shape[3] * self.strides[0]
        for raw, stride in zip(outputs, self.strides, strict=True):
            expected = (outputs[0].shape[0], self.num_anchors, input_h // stride, input_w // stride,
                        5 + self.num_classes)
            if tuple(raw.shape) != expected:
                raise ValueError(f"head output {tuple(raw.shape)} at stride {stride}: expected {expected} for a "
                                 f"{input_h}x{input_w} input")

    def prediction_grid(self, grid_sizes: Sequence[tuple[int, int]], device: torch.device) -> torch.Tensor:
        """(5, A, 1, cells): col, row, stride, anchor_w / 2, anchor_h / 2 of the predictions at each anchor slot and
        cell of one image (cells of all heads, stride 32 first). Cached per input size and device."""
        key = (tuple(grid_sizes), str(device))
        if key not in self._grids:
            parts = []
            for (height, width), mask, stride in zip(grid_sizes, self.masks, self.strides, strict=True):
                shape = (len(mask), height * width)
                rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
                half_anchors = self.anchors.cpu()[list(mask)] / 2  # halving is exact: same bits as decode's w / 2
                parts.append(torch.stack([cols.flatten().expand(shape), rows.flatten().expand(shape),
                                          torch.full(shape, stride), half_anchors[:, :1].expand(shape),
                                          half_anchors[:, 1:].expand(shape)]))
            self._grids[key] = torch.cat(parts, 2).float()[:, :, None].to(device)
        return self._grids[key]

    def cell_index(self, positives: torch.Tensor, grid_sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """(P,) cell index (image * cells + head_offset + row * W + col) of each row of `positives` (P, 6)."""
        head, _, image, _, row, col = positives.unbind(1)
        planes = [h * w for h, w in grid_sizes]
        per_head = positives.new_tensor([(sum(planes[:h]), w) for h, (_, w) in enumerate(grid_sizes)])
        head_offset, width = per_head[head].unbind(1)
        return image * sum(planes) + head_offset + row * width + col

    def assign(self, targets: torch.Tensor, grid_sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Positives per head: targets (K, 6) [image, class, cx, cy, w, h] pixels, grid_sizes [(H, W)] per head ->
        one (P, 5) long tensor per head of [target index, image, anchor slot in the head's mask, row, column],
        ordered by (slot, image, row, column), one row per slot (the latest target wins)."""
        positives = self.positives(targets, grid_sizes)
        return [positives[positives[:, 0] == h, 1:] for h in range(len(self.masks))]

    def positives(self, targets: torch.Tensor, grid_sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """(P, 6) long [head, target index, image, slot, row, column] of all heads, ordered by head, then slot,
        image, row, column (the order of `assign`). targets: (K, 6) [image, class, cx, cy, w, h] in pixels; rows of
        class < 0 (crowd regions) are never positives."""
        device = targets.device
        iou = wh_iou(targets[:, 4:6], self.anchors.to(device))  # (K, anchors)
        # anchors that no head uses (yolov3-tiny's anchor 0) cannot win: Darknet lets them, and loses those boxes
        iou = iou.masked_fill(~(self.slot_of >= 0).any(0).to(device), -1.0)
        best = iou.argmax(1)  # (K,) first max on ties, as Darknet
        slot = self.slot_of.to(device)[:, best]  # (heads, K)
        owned = (slot >= 0) & (targets[:, 1] >= 0)  # crowd regions leave before the latest-wins choice below
        head, index = owned.nonzero().unbind(1)  # (P,) each: the heads owning each target's best anchor
        slot = slot[head, index]
        per_head = torch.tensor([(h, w, s) for (h, w), s in zip(grid_sizes, self.strides, strict=True)],
                                device=device)
        height, width, stride = per_head.index_select(0, head).unbind(1)
        image, _, cx, cy, _, _ = targets.index_select(0, index).unbind(1)  # one gather, not one per column
        # Darknet: i = (truth.x * l.w), j = (truth.y * l.h); clamped for centres on or outside the border
        col = torch.minimum((cx / stride).floor().long().clamp(min=0), width - 1)
        row = torch.minimum((cy / stride).floor().long().clamp(min=0), height - 1)
        image = image.long()
        positives = torch.stack([head, index, image, slot, row, col], 1)
        # one key per (head, slot, image, row, column), increasing in that order (2**32 > any image * cells)
        win = keep_last((head * self.num_anchors + slot) * 2**32 + self.cell_index(positives, grid_sizes))
        return positives[win]

    def forward(self, outputs: list[torch.Tensor], targets: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """outputs: per head (B, A, H, W, 5+C) raw maps (stride-32 head first); targets: (K, 6) [image, class, cx,
        cy, w, h] in input pixels -> (total, {"xy", "wh", "obj", "cls"}): scalars per image, the terms detached."""
        self.check_outputs(outputs)
        if targets.ndim != 2 or targets.shape[1] != 6:
            raise ValueError(f"targets must be (K, 6) [image, class, cx, cy, w, h], got {tuple(targets.shape)}")
        device = outputs[0].device
        with torch.autocast(device.type, enabled=False):  # the loss is fp32 whatever the forward ran in
            outputs = [raw.float() for raw in outputs]
            targets = targets.to(device, torch.float32)
            grid_sizes = [tuple(raw.shape[2:4]) for raw in outputs]
            positives = self.positives(targets, grid_sizes)
            sums, positive_logits = self.positive_sums(outputs, targets, positives)
            sums["obj"] = self.objectness_sum(outputs, targets, positives, positive_logits)
            terms = {name: self.weights[name] * sums[name] / outputs[0].shape[0] for name in LOSS_TERMS}
            total = terms["xy"] + terms["wh"] + terms["obj"] + terms["cls"]
        return total, {name: value.detach() for name, value in terms.items()}

    def positive_sums(self, outputs: list[torch.Tensor], targets: torch.Tensor, positives: torch.Tensor
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Unweighted xy, wh, cls sums over the positives (P, 6) of `positives`, and their (P,) objectness logits."""
        head, index, image, slot, row, col = positives.unbind(1)
        # each head's rows of the positives (positives are ordered by head): (P, 5+C)
        counts = torch.bincount(head, minlength=len(outputs)).tolist()
        rows = []
        for raw, h, n in zip(outputs, range(len(outputs)), counts, strict=True):
            part = slice(sum(counts[:h]), sum(counts[:h]) + n)
            rows.append(raw[image[part], slot[part], row[part], col[part]])  # any strides: the model's are permuted
        pred = torch.cat(rows)  # (P, 5+C) tx, ty, tw, th, objectness, classes
        gt = targets[index]  # (P, 6)
        stride = torch.tensor(self.strides, device=pred.device, dtype=pred.dtype)[head]
        input_h, input_w = outputs[0].shape[2] * self.strides[0], outputs[0].shape[3] * self.strides[0]
        scale = 2 - gt[:, 4] * gt[:, 5] / (input_w * input_h)  # (P,) Darknet's `2 - truth.w * truth.h`
        # in-cell offset, Darknet: truth.x * l.w - i (clamped: a centre outside the image would give a BCE
        # target outside [0, 1], whose loss is unbounded below)
        offset = (gt[:, 2:4] / stride[:, None] - torch.stack([col, row], 1)).clamp(0, 1)
        xy = (F.binary_cross_entropy_with_logits(pred[:, :2], offset, reduction="none").sum(1) * scale).sum()
        anchors = self.anchors.to(pred.device)[self.mask_table.to(pred.device)[head, slot]]  # (P, 2)
        log_wh = (gt[:, 4:6] / anchors).log()  # Darknet: tw = log(truth.w * net.w / biases[2 * n])
        wh = (0.5 * scale * (pred[:, 2:4] - log_wh).square().sum(1)).sum()
        one_hot = F.one_hot(gt[:, 1].long(), self.num_classes).to(pred.dtype)
        cls = F.binary_cross_entropy_with_logits(pred[:, 5:], one_hot, reduction="sum")
        return {"xy": xy, "wh": wh, "cls": cls}, pred[:, 4]

    def objectness_sum(self, outputs: list[torch.Tensor], targets: torch.Tensor, positives: torch.Tensor,
                       positive_logits: torch.Tensor) -> torch.Tensor:
        """Unweighted objectness BCE sum over all predictions: target 1 at the positives (P, 6) whose logits are
        positive_logits (P,), 0 elsewhere, and no loss at the non-positives that `ignored` picks."""
        num_anchors = outputs[0].shape[1]
        grid_sizes = [tuple(raw.shape[2:4]) for raw in outputs]
        # tx, ty, tw, th, objectness of every prediction, channels first so that every elementwise operand below
        # is contiguous (strided ones are many times slower on CPU). The model's raw maps are permuted views of
        # (B, A, 5+C, H, W) conv outputs, so these are 5 of each (image, anchor)'s contiguous (H, W) planes: the
        # class channels, 94% of the bytes at 80 classes, are never read here
        boxes = torch.cat([raw[..., :5].flatten(2, 3).permute(3, 1, 0, 2) for raw in outputs], 3)  # (5, A, B, cells)
        boxes = boxes.view(5, num_anchors, -1)  # (5, A, B*cells)
        # BCE-with-logits against 0 is softplus(o), against 1 it is softplus(o) - o
        negatives = F.softplus(boxes[4])
        # IoU > 1 never happens; crowd regions ignore whatever the threshold
        if len(targets) and (self.ignore_threshold < 1 or bool((targets[:, 1] < 0).any())):
            ignore = self.ignored(boxes[:4].detach(), targets, grid_sizes)
            ignore[positives[:, 3], self.cell_index(positives, grid_sizes)] = False  # Darknet sets them afterwards
            negatives = negatives.masked_fill(ignore, 0.0)
        return negatives.sum() - positive_logits.sum()

    @torch.no_grad()
    def ignored(self, boxes: torch.Tensor, targets: torch.Tensor, grid_sizes: Sequence[tuple[int, int]]
                ) -> torch.Tensor:
        """(A, B*cells) bool: the predictions (at [slot, cell index]) the objectness loss ignores: decoded box with
        IoU > ignore_threshold with a ground truth of their image, or at least CROWD_IGNORE_FRACTION of it inside a
        crowd region (class < 0) of their image. boxes: (4, A, B*cells) raw tx, ty, tw, th; targets: (K, 6)."""
        num_anchors = boxes.shape[1]
        # decode every prediction exactly as models.yolo.decode does: cx = (sigmoid(tx) + col) * stride,
        # w = exp(tw) * anchor_w, then x1 = cx - w / 2
        grid = self.prediction_grid(grid_sizes, boxes.device)  # (5, A, 1, cells)
        boxes = boxes.view(4, num_anchors, -1, grid.shape[-1])  # (4, A, B, cells)
        centre = boxes[:2].sigmoid().add_(grid[:2]).mul_(grid[2])
        half = boxes[2:4].exp().mul_(grid[3:5])
        top_left = centre - half
        pred = torch.cat([top_left, centre.add_(half)]).view(4 * num_anchors, -1)  # (4A, B*cells) x1, y1, x2, y2
        crowd = targets[:, 1] < 0
        has_crowd = bool(crowd.any())  # one host sync; most batches hold no crowd region
        objects = targets[~crowd] if has_crowd else targets
        if self.ignore_threshold < 1 and len(objects):
            hits = self.overlap_hits(pred, objects, grid_sizes)
        else:
            hits = torch.zeros(num_anchors, pred.shape[1], device=pred.device)
        if has_crowd:
            hits += self.crowd_hits(pred, targets[crowd], grid.shape[-1])
        return hits > 0

    def crowd_hits(self, pred: torch.Tensor, crowds: torch.Tensor, cells: int) -> torch.Tensor:
        """(A, B*cells) count of the crowd regions (Kc, 6) that hold at least CROWD_IGNORE_FRACTION of each decoded
        prediction pred (4A, B*cells) x1, y1, x2, y2 (`cells` per image), by intersection / prediction area.

        Every prediction of a crowd's image is tested: crowd regions are few (about 1 per 100 COCO boxes), and such a
        prediction can be anywhere inside a large region, so a window around it would save little.
        """
        num_anchors = pred.shape[0] // 4
        pred = pred.view(4, num_anchors, -1, cells)  # (4, A, B, cells)
        image = crowds[:, 0].long()
        candidates = pred.index_select(2, image)  # (4, A, Kc, cells)
        region = box_cxcywh_to_xyxy(crowds[:, 2:6]).T[:, None, :, None]  # (4, 1, Kc, 1)
        inter = (torch.minimum(candidates[2:], region[2:]) - torch.maximum(candidates[:2], region[:2])).clamp(min=0)
        area = (candidates[2:] - candidates[:2]).prod(0)
        inside = inter.prod(0) >= CROWD_IGNORE_FRACTION * area  # (A, Kc, cells); no division: area may be 0
        inside &= area > 0  # a zero-area prediction (exp underflow) is nowhere: 0 >= 0 would count it
        hits = torch.zeros(num_anchors, pred.shape[2], cells, device=pred.device)
        hits.index_add_(1, image, inside.to(hits.dtype))  # several crowds of one image add up: exact, order-free
        return hits.view(num_anchors, -1)

    def overlap_hits(self, pred: torch.Tensor, targets: torch.Tensor, grid_sizes: Sequence[tuple[int, int]]
                     ) -> torch.Tensor:
        """(A, B*cells) count of the ground truths (K, 6) with which each decoded prediction pred (4A, B*cells)
        x1, y1, x2, y2 has IoU > ignore_threshold.

        Only predictions near a ground truth can pass, so each ground truth is tested against the cells around it
        rather than against all predictions. With t the threshold, p the prediction, g the ground truth, (dx, dy)
        the distance of their centres and (iw, ih) the overlap of their x and y extents (iw <= min(pw, gw) and
        iw <= (pw + gw) / 2 - dx):
        - IoU > t means inter * (1 + t) > t * (p_area + g_area) >= 2t * sqrt(p_area * g_area), so
          iw / sqrt(pw * gw) * ih / sqrt(ph * gh) > 2t / (1 + t); over all pw, iw / sqrt(pw * gw) is at most
          1 / sqrt(1 + 2 dx / gw) (at pw = gw + 2 dx), hence (1 + 2 dx / gw) * (1 + 2 dy / gh) < ignore_joint.
        - iw * ih > t * union >= t * max(p_area, g_area) with ih <= min(ph, gh) gives iw > t * max(pw, gw), so
          pw < gw / t and dx < (pw + gw) / 2 - t * max(pw, gw) <= gw * (1 - t) * max(1, 1 / (2t)).
        A prediction's centre lies in its cell, so a ground truth's candidates are the rows whose band comes within
        gh * ignore_reach of its centre and, in each row, the cells within the dx the joint bound leaves.
        """
        device = pred.device
        num_anchors = pred.shape[0] // 4

        # per head: stride, last row, last column, width, first cell index; the 1e-3 cell margins below absorb float
        # rounding (more candidates never change the result, fewer would)
        planes = [h * w for h, w in grid_sizes]
        heads = torch.tensor([(s, h - 1, w - 1, w, sum(planes[:i])) for i, (s, (h, w))
                              in enumerate(zip(self.strides, grid_sizes, strict=True))], device=device)
        stride = heads[:, :1].to(pred.dtype)  # (heads, 1)
        cx, cy, w, h = targets[:, 2:6].unbind(1)  # (K,) each
        reach_y = h * self.ignore_reach
        row_low = ((cy - reach_y) / stride - 1e-3).floor().long().clamp(min=0).minimum(heads[:, 1:2])  # (heads, K)
        row_high = ((cy + reach_y) / stride + 1e-3).floor().long().clamp(min=0).minimum(heads[:, 1:2])

        # each candidate row, enumerated without a loop, and the columns the joint bound leaves in it
        window, row_offset = ragged_arange((row_high - row_low + 1).flatten())  # (R,) window: head * K + gt
        head, gt = window // len(targets), window % len(targets)
        row = row_low.flatten().index_select(0, window) + row_offset
        # one gather of each table per candidate row (indexing column by column costs an op per column)
        row_stride, _, last_col, width, first_cell = heads.index_select(0, head).unbind(1)  # exact integers
        image, _, gt_cx, gt_cy, gt_w, gt_h = targets.index_select(0, gt).unbind(1)
        dy = (row * row_stride - gt_cy).clamp(min=0) + (gt_cy - (row + 1) * row_stride).clamp(min=0)  # nearest
        reach_x = gt_w * ((self.ignore_joint / (1 + 2 * dy / gt_h) - 1) / 2).clamp(max=self.ignore_reach)
        col_low = ((gt_cx - reach_x) / row_stride - 1e-3).floor().long().clamp(min=0).minimum(last_col)
        col_high = ((gt_cx + reach_x) / row_stride + 1e-3).floor().long().clamp(min=0).minimum(last_col)
        length = (col_high - col_low + 1).clamp(min=0)  # (R,) 0 where even the nearest centre is too far
        start = image.long() * sum(planes) + first_cell + row * width + col_low
        # the cells of a row have consecutive indices: cell = start of its row + its position in the row
        cell = torch.repeat_interleave(start - (length.cumsum(0) - length), length)  # (M,)
        cell += torch.arange(len(cell), device=device)
        gt = torch.repeat_interleave(gt, length)  # (M,)

        gt_xyxy = box_cxcywh_to_xyxy(targets[:, 2:6]).T.contiguous()  # (4, K)
        # gather with an expanded index: 2.3x faster than index_select along dim 1 on CPU (152 vs 352 us here)
        candidates = pred.gather(1, cell.expand(len(pred), -1)).view(4, num_anchors, -1)  # (4, A, M)
        iou = paired_box_iou_xyxy(candidates, gt_xyxy.gather(1, gt.expand(4, -1))[:, None])  # (A, M)
        # a prediction can be a candidate of several ground truths: count its hits (exact, order-free)
        hits = torch.zeros(num_anchors, pred.shape[1], device=device)
        hits.index_add_(1, cell, (iou > self.ignore_threshold).to(hits.dtype))
        return hits


def build_loss(model: nn.Module, loss_cfg: LossConfig) -> YOLOLoss:
    """The loss for `model` (its anchors, masks, strides, classes; pass the model unwrapped from DDP) from a
    LossConfig. Move it with `.to(device)` or not: it moves its small tables to the outputs' device itself."""
    return YOLOLoss(model.anchors, model.masks, model.strides, model.num_classes,
                    ignore_threshold=loss_cfg.ignore_threshold, xy_weight=loss_cfg.xy_weight,
                    wh_weight=loss_cfg.wh_weight, obj_weight=loss_cfg.obj_weight, cls_weight=loss_cfg.cls_weight)
