"""Do the anchors fit the data? Best-anchor IoU of the training boxes, k-means anchors (1 - IoU) and a short
refinement; `check_anchors` is what training runs at its start (model.anchors: null, a list, or "auto").

The loss (models/loss.py `positives`) makes every box a positive of its best anchor by (w, h) IoU among the
anchors some head uses, with no IoU or size-ratio limit: every box is assigned. What decides whether it is learnt
well is how far that anchor is from the box (the wh term regresses log(w / anchor_w)), so the recall printed is the
share of boxes whose best used anchor has IoU > FIT_IOU with it ("best possible recall" in YOLOv5's sense, with
IoU in place of its side ratio 4), next to the mean best IoU.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets.coco import image_boxes, read_coco_json
from models.tables import ANCHOR_MASKS, DARKNET_ANCHORS
from utils.boxes import CROWD_CLASS

log = logging.getLogger(__name__)

RECALL_THRESHOLDS = (0.5, 0.25)  # a box "has an anchor" when its best anchor's IoU exceeds this
FIT_IOU = 0.25  # the recall check_anchors prints and model.anchors: auto acts on: best-anchor IoU above this
AUTO_RECALL = 0.98  # model.anchors: auto re-fits when fewer boxes than this share have an anchor above FIT_IOU
FIT_BOXES = 20000  # at most this many boxes (a seeded sample) enter k-means and the refinement: enough for 9 sizes
REFINE_STEPS = 300  # refinement: mutations of the k-means anchors tried, the better kept (YOLOv5's evolve, shorter)
REFINE_SIGMA = 0.1  # ... each side multiplied by exp(N(0, sigma)) for a random half of the anchors


def wh_iou(boxes: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """IoU of boxes (N, 2) and anchors (K, 2), all (w, h) placed at a common centre -> (N, K)."""
    w, h = boxes[:, 0:1], boxes[:, 1:2]  # (N, 1) each; broadcast against the (K,) anchor sides
    inter = np.minimum(w, anchors[:, 0]) * np.minimum(h, anchors[:, 1])  # (N, K)
    return inter / (w * h + anchors[:, 0] * anchors[:, 1] - inter)


def anchor_fitness(wh: np.ndarray, anchors: np.ndarray) -> dict[str, float]:
    """Best-anchor IoU of boxes wh (N, 2) vs anchors (K, 2): its mean, and recall = fraction of boxes above each
    threshold in RECALL_THRESHOLDS (keys "mean_iou", "recall_0.5", "recall_0.25")."""
    best = wh_iou(wh, np.asarray(anchors, dtype=np.float64)).max(1)  # (N,)
    return {"mean_iou": float(best.mean()), **{f"recall_{t}": float((best > t).mean()) for t in RECALL_THRESHOLDS}}


def _init_plusplus(wh: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007) with d = 1 - IoU: (N, 2) -> (k, 2) boxes from wh."""
    centroids = [wh[rng.integers(len(wh))]]
    best = wh_iou(wh, centroids[0][None]).ravel()  # (N,) best IoU to the centroids so far
    for _ in range(1, k):
        weight = (1.0 - best) ** 2
        # only boxes identical to chosen centroids left: any box is as good (and k > distinct sizes anyway)
        index = rng.choice(len(wh), p=weight / weight.sum()) if weight.sum() > 0 else rng.integers(len(wh))
        centroids.append(wh[index])
        best = np.maximum(best, wh_iou(wh, wh[index][None]).ravel())
    return np.stack(centroids)


def _kmeans_once(wh: np.ndarray, k: int, rng: np.random.Generator, max_iter: int, tol: float) -> np.ndarray:
    """One k-means run from a k-means++ start: (N, 2) -> (k, 2) centroids, unsorted."""
    centroids = _init_plusplus(wh, k, rng)
    previous = None
    for _ in range(max_iter):
        iou = wh_iou(wh, centroids)  # (N, k)
        assign = iou.argmax(1)  # nearest centroid = highest IoU
        if previous is not None and (assign != previous).mean() <= tol:
            break
        previous = assign
        # Median, not mean: sizes within a cluster are right-skewed (a few boxes several times the typical
        # one); the mean follows that tail in pixels while 1 - IoU sees relative sizes, and the median stays
        # on the typical member. Mean best IoU, median vs mean: coco_mini train 0.619 vs 0.591 (k=9),
        # 0.560 vs 0.518 (k=6); 100k log-normal sizes 0.713 vs 0.692 (k=9).
        empty = []
        for j in range(k):
            members = wh[assign == j]
            if len(members):
                centroids[j] = np.median(members, axis=0)
            else:
                empty.append(j)
        if empty:
            _reseed(wh, centroids, empty)
    return centroids


def _reseed(wh: np.ndarray, centroids: np.ndarray, empty: list[int]) -> None:
    """Move each empty cluster's centroid (k, 2), in place, onto the box of wh (N, 2) that the others fit worst.

    One at a time, so two empty clusters do not land on the same region.
    """
    full = [j for j in range(len(centroids)) if j not in empty]
    best = wh_iou(wh, centroids[full]).max(1) if full else np.zeros(len(wh))  # (N,)
    for j in empty:
        centroids[j] = wh[best.argmin()]
        best = np.maximum(best, wh_iou(wh, centroids[j][None]).ravel())


def kmeans_anchors(wh: np.ndarray, k: int, seed: int = 0, restarts: int = 3, max_iter: int = 300,
                   tol: float = 1e-3) -> np.ndarray:
    """k-means of box sizes wh (N, 2) with d = 1 - IoU -> (k, 2) anchors (w, h) sorted by area ascending.

    Deterministic for a seed: `restarts` runs from k-means++ starts drawn from one np.random.Generator(seed),
    keeping the highest mean best IoU. Each run stops when assignments stop changing: when at most a fraction
    `tol` of the boxes changes cluster (so exactly none below 1/tol boxes; on COCO-sized data a few boxes
    keep swapping between neighbouring clusters for hundreds of steps while the mean IoU moves by ~1e-3), or
    after max_iter steps. Ascending area matters: Darknet's masks give the first anchors to the finest (stride-8) head.
    """
    wh = np.asarray(wh, dtype=np.float64)
    if wh.ndim != 2 or wh.shape[1] != 2:
        raise ValueError(f"box sizes must have shape (N, 2), got {wh.shape}")
    if not (np.isfinite(wh).all() and (wh > 0).all()):
        raise ValueError("box sizes must be finite and positive")
    if k < 1 or restarts < 1:
        raise ValueError(f"need k >= 1 and restarts >= 1, got k={k}, restarts={restarts}")
    if len(wh) < k:
        raise ValueError(f"{len(wh)} boxes cannot make {k} anchors; need at least {k}")
    rng = np.random.default_rng(seed)
    runs = [_kmeans_once(wh, k, rng, max_iter, tol) for _ in range(restarts)]
    best = max(runs, key=lambda c: anchor_fitness(wh, c)["mean_iou"])  # first of equals: deterministic
    return best[np.argsort(best.prod(1), kind="stable")]


def load_box_sizes(annotations_path: str | Path, img_size: int) -> tuple[np.ndarray, dict[str, int]]:
    """COCO json -> box sizes (N, 2) as (w, h) in letterboxed input px, and counts of the boxes left out.

    The file is read and filtered exactly as training reads it (datasets.coco: degenerate and outside boxes dropped,
    boxes clipped to the image); crowd regions are left out too (training keeps them as ignore regions, never as
    positives, so no anchor is fitted to them). Each box is then scaled by img_size / max(width, height) of its image.
    """
    path = Path(annotations_path)
    data = read_coco_json(path)
    category_to_class = {c["id"]: i for i, c in enumerate(data["categories"])}
    per_image, dropped = image_boxes(data, path, category_to_class)
    return box_sizes(data, per_image, dropped, img_size)


def box_sizes(data: dict, per_image: dict[int, tuple[np.ndarray, np.ndarray]], dropped: dict[str, int],
              img_size: int) -> tuple[np.ndarray, dict[str, int]]:
    """Box sizes (N, 2) (w, h) in letterboxed input px of image_boxes' output (crowd regions left out), and counts
    of the boxes left out."""
    scale = {image["id"]: img_size / max(image["width"], image["height"]) for image in data["images"]}
    objects = {image_id: boxes[classes != CROWD_CLASS] for image_id, (boxes, classes) in per_image.items()}
    sizes = [(boxes[:, 2:] - boxes[:, :2]) * scale[image_id] for image_id, boxes in objects.items()]
    crowd = sum(len(per_image[i][0]) - len(boxes) for i, boxes in objects.items())
    skipped = {**({"crowd": crowd} if crowd else {}), **dropped}
    return np.concatenate([np.zeros((0, 2)), *sizes]).astype(np.float64), skipped


def used_anchors(arch: str) -> list[int]:
    """Indices of the anchors some head of `arch` uses (yolov3-tiny's anchor 0 is used by none: Darknet's mask)."""
    return sorted({i for mask in ANCHOR_MASKS[arch] for i in mask})


@dataclass
class AnchorFit:
    """How anchors fit boxes: recall (share with best-anchor IoU > FIT_IOU), mean best IoU, and over how many."""

    recall: float
    mean_iou: float
    boxes: int

    def __str__(self) -> str:
        return f"recall {self.recall:.3f} (best-anchor IoU > {FIT_IOU}), mean best IoU {self.mean_iou:.3f}"


def anchor_fit(wh: np.ndarray, anchors: np.ndarray, arch: str) -> AnchorFit:
    """AnchorFit of boxes wh (N, 2) against the anchors (K, 2) of `arch` that its heads use (the loss's choice)."""
    if not len(wh):
        return AnchorFit(float("nan"), float("nan"), 0)
    best = wh_iou(np.asarray(wh, np.float64), np.asarray(anchors, np.float64)[used_anchors(arch)]).max(1)  # (N,)
    return AnchorFit(float((best > FIT_IOU).mean()), float(best.mean()), len(wh))


def refine_anchors(wh: np.ndarray, anchors: np.ndarray, seed: int = 0, steps: int = REFINE_STEPS) -> np.ndarray:
    """Hill-climb anchors (k, 2) on boxes wh (N, 2): mutate, keep when the mean best IoU rises -> (k, 2) sorted by
    area ascending. Never worse than the start (k-means' medians are not the mean-IoU optimum)."""
    rng = np.random.default_rng(seed)
    best, score = anchors.astype(np.float64), wh_iou(wh, anchors).max(1).mean()
    for _ in range(steps):
        chosen = rng.random(len(best)) < 0.5  # (k,) which anchors move this step
        trial = best * np.exp(rng.normal(0.0, REFINE_SIGMA, best.shape) * chosen[:, None])
        trial_score = wh_iou(wh, trial).max(1).mean()
        if trial_score > score:
            best, score = trial, trial_score
    return best[np.argsort(best.prod(1), kind="stable")]


def fit_anchors(wh: np.ndarray, anchors: np.ndarray, arch: str, seed: int = 0) -> np.ndarray:
    """New anchors (K, 2) for `arch` from boxes wh (N, 2): k-means (1 - IoU) then refinement for the anchors the
    heads use, rounded to 0.1 px, in ascending area; an anchor no head uses keeps its value."""
    rng = np.random.default_rng(seed)
    sample = wh[rng.choice(len(wh), FIT_BOXES, replace=False)] if len(wh) > FIT_BOXES else wh
    used = used_anchors(arch)
    fitted = refine_anchors(sample, kmeans_anchors(sample, len(used), seed=seed), seed)
    new = np.asarray(anchors, np.float64).copy()
    new[used] = np.round(fitted, 1)
    return new


def check_anchors(wh: np.ndarray, arch: str, anchors: list | str | None, seed: int = 0) -> list[list[float]] | None:
    """Print how the model's anchors fit the training boxes wh (N, 2) at the input size; for "auto", re-fit them when
    the recall is below AUTO_RECALL. Returns the anchors to train with: the given list, None (Darknet's), or for
    "auto" the new or Darknet's anchors as a list (so that the checkpoint's config holds them)."""
    darknet = np.array(DARKNET_ANCHORS[arch], np.float64)
    current = darknet if anchors is None or isinstance(anchors, str) else np.asarray(anchors, np.float64)
    fit = anchor_fit(wh, current, arch)
    log.info("anchors: %s of %d training boxes (%s anchors)", fit, fit.boxes,
             "Darknet's" if anchors is None or isinstance(anchors, str) else "model.anchors")
    if anchors != "auto":
        return anchors
    if fit.boxes < len(current) or fit.recall >= AUTO_RECALL:
        log.info("anchors: auto keeps them (%s)", f"recall >= {AUTO_RECALL}" if fit.boxes >= len(current)
                 else f"{fit.boxes} boxes are too few to fit {len(current)}")
        return current.tolist()
    new = fit_anchors(wh, current, arch, seed)
    log.info("anchors: auto re-fitted them (recall below %s): %s\n  old %s\n  new %s", AUTO_RECALL,
             anchor_fit(wh, new, arch), " ".join(f"{w:g}x{h:g}" for w, h in current),
             " ".join(f"{w:g}x{h:g}" for w, h in new))
    return new.tolist()
