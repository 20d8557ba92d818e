"""k-means anchors for a COCO-format dataset, compared with Darknet's defaults (YOLOv2 paper, section 2).

    python -m tools.anchors                      # the training annotations of args.yaml's data
    python -m tools.anchors --annotations my.json --set model.arch=yolov3-tiny data.img_size=320

Box sizes are scaled as the letterbox scales their image (img_size / longest side), clustered with the
distance 1 - IoU of (w, h) boxes sharing a centre, and printed as lines to paste into args.yaml or --set.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from datasets.coco import DatasetError, image_boxes, read_coco_json
from models import DARKNET_ANCHORS
from models.tables import ANCHOR_MASKS
from utils.boxes import CROWD_CLASS
from utils.cli import add_config_args, parse_cli
from utils.config import Config

RECALL_THRESHOLDS = (0.5, 0.25)  # a box "has an anchor" when its best anchor's IoU exceeds this


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
    scale = {image["id"]: img_size / max(image["width"], image["height"]) for image in data["images"]}
    objects = {image_id: boxes[classes != CROWD_CLASS] for image_id, (boxes, classes) in per_image.items()}
    sizes = [(boxes[:, 2:] - boxes[:, :2]) * scale[image_id] for image_id, boxes in objects.items()]
    crowd = sum(len(per_image[i][0]) - len(boxes) for i, boxes in objects.items())
    skipped = {**({"crowd": crowd} if crowd else {}), **dropped}
    return np.concatenate([np.zeros((0, 2)), *sizes]).astype(np.float64), skipped


def round_anchors(anchors: np.ndarray) -> np.ndarray:
    """Anchors (K, 2) -> integer anchors (K, 2), each side at least 1 px, re-sorted by area ascending."""
    rounded = np.maximum(np.rint(anchors), 1).astype(int)
    return rounded[np.argsort(rounded.prod(1), kind="stable")]


def default_annotations(cfg: Config) -> Path:
    """The annotation file to use when --annotations is not given: the training split's."""
    return cfg.data.split_paths("train")[1]


def _fitness_row(name: str, fitness: dict[str, float]) -> str:
    return f"{name:<26}" + "".join(f"{v:>17.4f}" for v in fitness.values())


def _reasons(skipped: dict[str, int]) -> str:
    return ", ".join(f"{n} {why}" for why, n in skipped.items()) or "none"


def report(wh: np.ndarray, skipped: dict[str, int], anchors: np.ndarray, arch: str, img_size: int) -> str:
    """The printed report: boxes used / skipped, anchors, their fitness vs Darknet's, and lines to paste."""
    darknet = np.array(DARKNET_ANCHORS[arch])
    pairs = [[int(w), int(h)] for w, h in anchors]
    lines = [f"boxes: {len(wh)} used, {sum(skipped.values())} left out ({_reasons(skipped)}); sizes in px of the "
             f"{img_size}x{img_size} letterboxed input",
             f"anchors ({len(anchors)}, w x h, smallest area first): " + " ".join(f"{w}x{h}" for w, h in pairs),
             "", f"{'':<26}{'mean best IoU':>17}" + "".join(f"{f'recall IoU>{t}':>17}" for t in RECALL_THRESHOLDS),
             _fitness_row("k-means (these anchors)", anchor_fitness(wh, anchors)),
             _fitness_row(f"Darknet {arch}", anchor_fitness(wh, darknet))]
    used = sorted({i for mask in ANCHOR_MASKS[arch] for i in mask})
    if len(anchors) == len(darknet) and len(used) < len(darknet):
        lines += [f"  {arch}'s heads use anchors {', '.join(map(str, used))} only (Darknet's mask quirk); "
                  "over those:",
                  _fitness_row("  k-means, used by heads", anchor_fitness(wh, anchors[used])),
                  _fitness_row("  Darknet, used by heads", anchor_fitness(wh, darknet[used]))]
    if len(anchors) != len(darknet):
        lines += ["", f"note: model.anchors for {arch} takes {len(darknet)} pairs, not {len(anchors)}: "
                      "the lines below will not load for this arch"]
    lines += ["", "args.yaml (under model:):", f"  anchors: {pairs}",
              "command line:", f"  --set model.anchors='{json.dumps(pairs, separators=(',', ':'))}'"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, load the box sizes, run k-means and print the report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)  # --gpu is accepted and ignored: this runs on the CPU
    parser.add_argument("--annotations", metavar="JSON",
                        help="COCO-format instances file (default: the config's training annotations)")
    parser.add_argument("--img-size", type=int, help="letterbox size in px (default: the config's data.img_size)")
    parser.add_argument("--num", type=int, help="number of anchors (default: that of the config's model.arch)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the k-means++ starts (default: 0)")
    args, cfg, _ = parse_cli(parser, argv)
    annotations = args.annotations or default_annotations(cfg)
    img_size = cfg.data.img_size if args.img_size is None else args.img_size
    num = len(DARKNET_ANCHORS[cfg.model.arch]) if args.num is None else args.num
    if img_size <= 0 or num < 1:
        parser.error(f"--img-size and --num must be positive, got {img_size} and {num}")
    try:
        wh, skipped = load_box_sizes(annotations, img_size)
    except (DatasetError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e
    if len(wh) < num:
        raise SystemExit(f"error: {annotations}: {len(wh)} usable boxes ({_reasons(skipped)} left out) cannot "
                         f"make {num} anchors; need at least {num}")
    anchors = round_anchors(kmeans_anchors(wh, num, seed=args.seed))
    print(f"annotations: {annotations}\n" + report(wh, skipped, anchors, cfg.model.arch, img_size))


if __name__ == "__main__":
    main()
