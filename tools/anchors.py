"""k-means anchors (datasets/anchors.py) for a dataset in any layout of data.root, compared with Darknet's
defaults (YOLOv2 paper, section 2).

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

from datasets.anchors import RECALL_THRESHOLDS, anchor_fitness, kmeans_anchors, load_box_sizes, wh_iou
from datasets.coco import DatasetError
from datasets.formats import data_paths
from models import DARKNET_ANCHORS
from models.tables import ANCHOR_MASKS
from utils.cli import add_config_args, parse_cli
from utils.config import Config

__all__ = ["anchor_fitness", "kmeans_anchors", "load_box_sizes", "main", "report", "round_anchors", "wh_iou"]


def round_anchors(anchors: np.ndarray) -> np.ndarray:
    """Anchors (K, 2) -> integer anchors (K, 2), each side at least 1 px, re-sorted by area ascending."""
    rounded = np.maximum(np.rint(anchors), 1).astype(int)
    return rounded[np.argsort(rounded.prod(1), kind="stable")]


def default_annotations(cfg: Config) -> Path:
    """The annotation file to use when --annotations is not given: the training split's."""
    return data_paths(cfg.data, "train")[1]


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
