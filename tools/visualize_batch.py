"""Write a PNG grid of batches exactly as the model sees them (augmented, letterboxed) with boxes and class names;
crowd regions, which the loss ignores, in grey.

    python -m tools.visualize_batch                          # one training micro-batch of the configured data
    python -m tools.visualize_batch --split val --batches 2 --out logs/val_batches.png
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import cv2

from datasets.coco import DatasetError
from datasets.loader import build_dataset, build_loader
from utils.boxes import box_cxcywh_to_xyxy
from utils.cli import add_config_args, parse_cli
from utils.plots import draw_boxes, image_grid, tensor_to_image


def main(argv: list[str] | None = None) -> None:
    """Load `--batches` batches of `--split`, draw their targets, write one PNG grid."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--split", choices=("train", "val"), default="train")
    parser.add_argument("--batches", type=int, default=1, help="number of batches to draw (default 1)")
    parser.add_argument("--batch-size", type=int, help="images per batch (default: train.micro_batch_size)")
    parser.add_argument("--out", type=Path, help="PNG to write (default: logs/batch_<split>.png)")
    args, cfg, _ = parse_cli(parser, argv)
    if args.batches < 1:
        parser.error(f"--batches {args.batches}: must be at least 1")
    batch_size = args.batch_size or cfg.train.micro_batch_size
    if batch_size < 1:
        parser.error(f"--batch-size {batch_size}: must be at least 1")
    out = args.out or Path("logs") / f"batch_{args.split}.png"

    try:
        dataset = build_dataset(cfg, args.split)
    except (DatasetError, FileNotFoundError) as e:
        raise SystemExit(f"data error: {e}") from e
    loader = build_loader(cfg, dataset, train=args.split == "train", batch_size=batch_size)
    tiles, boxes_drawn = [], 0
    for images, targets, _ in itertools.islice(loader, args.batches):
        for i, image in enumerate(images):
            t = targets[targets[:, 0] == i]  # (K, 6) [batch_index, class, cx, cy, w, h]
            xyxy = box_cxcywh_to_xyxy(t[:, 2:]).numpy()
            tiles.append(draw_boxes(tensor_to_image(image), xyxy, t[:, 1].long().numpy(), dataset.class_names))
            boxes_drawn += len(t)
    if not tiles:
        raise SystemExit(f"{args.split}: no batch to draw (dataset of {len(dataset)} images, batch size {batch_size})")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), cv2.cvtColor(image_grid(tiles), cv2.COLOR_RGB2BGR)):
        raise SystemExit(f"could not write {out}")
    print(f"wrote {out}: {len(tiles)} {args.split} images, {boxes_drawn} boxes")


if __name__ == "__main__":
    main()
