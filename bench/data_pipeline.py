"""Training data pipeline throughput, JPEG on disk -> collated 416 batch, with a per-stage breakdown.

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 \\
        .venv/bin/python bench/data_pipeline.py [--root ../shared/data/coco_mini] [--size 416] [--repeats 5]

One process (as one DataLoader worker) runs the full training transform over every image of the train split,
`--repeats` times after a warm-up pass; each stage is timed separately in a second loop. Then a DataLoader with
1 and 2 workers is timed on the same data. Prints markdown tables (median and min-max over repeats).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.coco import collate  # noqa: E402
from datasets.loader import build_dataset, build_loader  # noqa: E402
from datasets.transforms import pad_to_square, resize_to_fit  # noqa: E402
from utils.config import load_config  # noqa: E402


def spread(values: list[float]) -> str:
    """'median (min-max)' of a list of rates."""
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def end_to_end(dataset, size: int, repeats: int) -> list[float]:  # noqa: ANN001
    """Images/s of dataset[(i, size)] over the whole split, once per repeat (after one warm-up pass)."""
    rates = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[(i, size)]
        if r:
            rates.append(len(dataset) / (time.perf_counter() - start))
    return rates


def stages(dataset, size: int, repeats: int, batch: int = 16) -> dict[str, float]:  # noqa: ANN001
    """Mean milliseconds per image of each stage, each Albumentations transform timed on its own (with its p)."""
    totals: dict[str, float] = defaultdict(float)
    augmentation = dataset.preprocess.augmentation
    samples = []
    for _ in range(repeats):
        for image_id in dataset.ids:
            t = time.perf_counter()
            image = dataset._load_image(image_id)
            totals["decode (cv2.imread, RGB)"] += time.perf_counter() - t
            t = time.perf_counter()
            image, scale_x, scale_y = resize_to_fit(image, size)
            totals["letterbox resize"] += time.perf_counter() - t
            boxes, classes = dataset.targets[image_id]
            boxes = boxes * np.array([scale_x, scale_y, scale_x, scale_y], np.float32)
            for transform in augmentation.transforms:
                t = time.perf_counter()
                image = transform(image=image)["image"]
                totals[f"  {type(transform).__name__} (p={transform.p})"] += time.perf_counter() - t
            t = time.perf_counter()
            dataset.preprocess.augmentation(image=image, bboxes=boxes, labels=classes)
            totals["augmentation as one Compose, with boxes"] += time.perf_counter() - t
            t = time.perf_counter()
            image, _, _ = pad_to_square(image, size)
            totals["letterbox pad"] += time.perf_counter() - t
            t = time.perf_counter()
            tensor = torch.from_numpy(image).permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)
            tensor.div_(255)
            totals["to tensor (float, /255)"] += time.perf_counter() - t
            samples.append((tensor, torch.zeros(len(boxes), 5), {}))
            if len(samples) == batch:
                t = time.perf_counter()
                collate(samples)
                totals["collate (per image)"] += time.perf_counter() - t
                samples = []
    n = repeats * len(dataset)
    return {name: 1000 * seconds / n for name, seconds in totals.items()}


def loader_rate(cfg, dataset, workers: int, batches: int, batch: int = 16) -> float:  # noqa: ANN001
    """Images/s delivered by a DataLoader with `workers` processes (after its first batch)."""
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, workers=workers))
    loader = build_loader(cfg, dataset, train=True, batch_size=batch)
    iterator, count = iter(loader), 0
    next(iterator)
    start = time.perf_counter()
    while count < batches:
        try:
            count += len(next(iterator)[0])
        except StopIteration:
            iterator = iter(loader)
    return count / (time.perf_counter() - start)


def main() -> None:
    """Run the three measurements and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="../shared/data/coco_mini")
    parser.add_argument("--size", type=int, default=416)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core, as one DataLoader worker has
    cv2.setNumThreads(1)
    cfg = load_config(Path(__file__).resolve().parents[1] / "args.yaml",
                      [f"data.root={args.root}", "data.multiscale=null", f"data.img_size={args.size}"])
    dataset = build_dataset(cfg, "train")
    malloc = os.environ.get("MALLOC_MMAP_THRESHOLD_", "unset")
    print(f"## Data pipeline, {time.strftime('%Y-%m-%d')}: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, OpenCV {cv2.__version__}, "
          f"MALLOC_MMAP_THRESHOLD_={malloc}")
    print(f"\n{len(dataset)} train images of {args.root} at {args.size}, full training augmentation of args.yaml\n")
    rates = end_to_end(dataset, args.size, args.repeats)
    print(f"one process, JPEG -> sample: **{spread(rates)} images/s** (median, min-max over {args.repeats} passes)\n")
    print("| stage | ms / image |\n|---|---|")
    for name, ms in stages(dataset, args.size, args.repeats).items():
        print(f"| {name} | {ms:.3f} |")
    one = loader_rate(cfg, dataset, 1, 200)
    two = loader_rate(cfg, dataset, 2, 200)
    print(f"\nDataLoader (batch 16, collated): 1 worker {one:.0f} images/s, 2 workers {two:.0f} images/s "
          f"({two / one:.2f}x)")


if __name__ == "__main__":
    main()
