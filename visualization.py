"""Draw a model's predictions (and, with --gt, the ground truth) on dataset images or on given image files.

    python visualization.py --weights logs/<run>/best.pt                       # the first 8 validation images
    python visualization.py --weights logs/<run>/best.pt --images 16 --gt --grid   # one grid, true boxes in white
    python visualization.py --weights models/weights/yolov3.weights --source a.jpg photos/ --conf 0.5 --ext jpg

Predictions are drawn in their class's colour (the same colour for a class everywhere: utils/plots.class_color)
with the class name and score; true boxes (--gt, dataset images only) as thin white outlines. Files go into --out
(default: <logging.dir>/visualization_<weights stem>): one <image name>.png (or .jpg) per image, or with --grid
one grid.png. Class names: the dataset's, or for --source the categories of data.val_annotations (COCO's 80 when
that file is missing). An unreadable --source file is skipped with a warning and counted.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from datasets.coco import DatasetError, class_table
from datasets.loader import build_dataset
from datasets.sources import find_sources, read_frames
from inference import add_inference_args, detect, inference_setup
from utils.config import Config
from utils.plots import draw_boxes, draw_true_boxes, image_grid

DEFAULT_IMAGES = 8  # dataset images drawn without --images


def build_parser() -> argparse.ArgumentParser:
    """The command line: config and inference options plus the drawing's own."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_inference_args(parser)
    parser.add_argument("--source", nargs="+", help="image files, folders or quoted glob patterns (default: the "
                        "configured dataset's images)")
    parser.add_argument("--split", choices=("train", "val"), default="val", help="dataset split (default val)")
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES,
                        help=f"the first N images of the split (default {DEFAULT_IMAGES})")
    parser.add_argument("--gt", action="store_true", help="also draw the true boxes (white; crowd regions left out), "
                        "dataset images only")
    parser.add_argument("--grid", action="store_true", help="one grid image instead of one file per image")
    parser.add_argument("--ext", choices=("png", "jpg"), default="png", help="image file type (default png)")
    return parser


def dataset_images(cfg: Config, split: str, count: int, gt: bool) -> tuple[list[str], list[np.ndarray], list[str]]:
    """The first `count` images of a split: (names, (H, W, 3) uint8 RGB images, true boxes drawn if gt), class names."""
    try:
        dataset = build_dataset(cfg, split)
        ids = dataset.ids[:count]
        images = [dataset.load_image(i) for i in ids]
    except (OSError, DatasetError) as e:
        raise SystemExit(f"error: {e}") from e
    if gt:
        images = [draw_true_boxes(image, dataset.object_boxes(i)) for image, i in zip(images, ids, strict=True)]
    names = [Path(dataset.coco.imgs[i]["file_name"]).stem for i in ids]
    return names, images, dataset.class_names


def main(argv: list[str] | None = None) -> dict:
    """Predict on the images, draw, write the files, print what was written; returns the paths and counts."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images {args.images}: must be at least 1")
    if args.gt and args.source:
        parser.error("--gt draws the dataset's annotations, so it works without --source only")
    model, cfg, device, form = inference_setup(args)
    skipped: list[str] = []
    if args.source:
        try:
            sources, _ = find_sources(args.source)
            class_names = class_table(cfg.data.split_paths("val")[1], model.num_classes,
                                      getattr(model, "class_names", None))[0]
        except (FileNotFoundError, ValueError, DatasetError) as e:
            raise SystemExit(f"error: {e}") from e
        if any(s.is_video for s in sources):
            raise SystemExit(f"error: {next(s.path for s in sources if s.is_video)} is a video; visualization.py "
                             "draws images (detect.py annotates videos)")
        with tqdm(total=len(sources), desc="reading", unit="image", leave=False) as bar:
            frames = list(read_frames(sources, skipped, bar))
        names, images = [f.source.name.with_suffix("").as_posix() for f in frames], [f.image for f in frames]
    else:
        names, images, class_names = dataset_images(cfg, args.split, args.images, args.gt)
    if len(class_names) != model.num_classes:
        raise SystemExit(f"error: {args.weights} predicts {model.num_classes} classes but the data has "
                         f"{len(class_names)}; set data.root (or data.{args.split}_annotations) to the model's data")
    if not images:
        raise SystemExit(f"error: no readable image among {len(skipped)} input(s)")

    detections = []
    for start in range(0, len(images), cfg.eval.batch_size):
        batch = images[start:start + cfg.eval.batch_size]
        d = detect(model, batch, cfg.data.img_size, cfg.eval, cfg.detect.conf_threshold, device, form.dtype).numpy()
        d[:, 0] += start  # index among all images
        detections.append(d)
    detections = np.concatenate(detections)
    tiles = []
    for i, image in enumerate(images):
        d = detections[detections[:, 0] == i]
        tiles.append(draw_boxes(image.copy(), d[:, 1:5], d[:, 6].astype(int), class_names, d[:, 5]))

    out = args.out or Path(cfg.logging.dir) / f"visualization_{args.weights.stem}"
    files = [(out / f"grid.{args.ext}", image_grid(tiles))] if args.grid else [
        (out / f"{name}.{args.ext}", tile) for name, tile in zip(names, tiles, strict=True)]
    for path, image in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise SystemExit(f"error: could not write {path}")
    where = files[0][0] if args.grid else out
    print(f"wrote {where}: {len(tiles)} images, {len(detections)} predictions with score > "
          f"{cfg.detect.conf_threshold}{' and their true boxes' if args.gt else ''}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s): {', '.join(skipped)}")
    return {"files": [p for p, _ in files], "detections": len(detections), "skipped": skipped}


if __name__ == "__main__":
    main()
