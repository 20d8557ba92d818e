"""Training data pipeline throughput, JPEG on disk -> collated 416 batch, with a per-stage breakdown.

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 \\
        .venv/bin/python bench/data_pipeline.py --data DIR [--size 416] [--repeats 5]

One process (as one DataLoader worker) runs the full training transform over every image of the train split,
`--repeats` times after a warm-up pass; each stage is timed separately in a second loop. Then a DataLoader with
each of `--workers` processes (default 1 and 2) is timed on the same data. Prints markdown tables (median and
min-max over repeats); `--json F` also writes the headline figures for bench/run.py.
"""
from __future__ import annotations

import argparse
import copy as copy_module
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_data_argument, checked_data, emit, machine, spread  # noqa: E402
from datasets.coco import collate  # noqa: E402
from datasets.loader import build_dataset, build_loader  # noqa: E402
from datasets.transforms import pad_to_square, resize_to_fit, to_chw_tensor  # noqa: E402
from utils.config_load import load_config  # noqa: E402


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
            image = dataset.load_image(image_id)
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
            tensor = to_chw_tensor(image)
            totals["to tensor (uint8, CHW)"] += time.perf_counter() - t
            samples.append((tensor, torch.zeros(len(boxes), 5), {}))
            if len(samples) == batch:
                t = time.perf_counter()
                collate(samples)
                totals["collate (per image)"] += time.perf_counter() - t
                samples = []
    n = repeats * len(dataset)
    return {name: 1000 * seconds / n for name, seconds in totals.items()}


def repeated(dataset, images: int):  # noqa: ANN001, ANN201
    """A shallow copy of `dataset` whose image ids repeat until there are at least `images` samples: coco_mini's 50
    train images make 3 batches of 16 per epoch, and a DataLoader's workers idle at each epoch's end (2 workers
    could never exceed 1.5x one; 16 workers measured 2.3x one on a 16-core host)."""
    copy = copy_module.copy(dataset)
    copy.ids = dataset.ids * math.ceil(images / len(dataset.ids))
    return copy


def loader_rate(cfg, dataset, workers: int, batches_per_worker: int = 12, batch: int = 16) -> float:  # noqa: ANN001
    """Images/s delivered by a DataLoader with `workers` processes in steady state: timed from the arrival of
    every worker's first batch (their start-up) over the next `batches_per_worker` batches of each worker, within one
    epoch."""
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"workers": workers})})
    batch = min(batch, len(dataset))  # a small set still makes one full batch
    per_round = max(workers, 1)
    loader = build_loader(cfg, repeated(dataset, (batches_per_worker + 2) * per_round * batch), train=True,
                          batch_size=batch)
    iterator = iter(loader)
    for _ in range(per_round):
        next(iterator)
    start, count = time.perf_counter(), 0
    for _ in range(batches_per_worker * per_round):
        count += len(next(iterator)[0])
    return count / (time.perf_counter() - start)


def run(root: str, size: int, repeats: int, workers: list[int]) -> tuple[list[str], dict[str, float]]:
    """All the measurements, as markdown lines and a dict of the headline figures."""
    torch.set_num_threads(1)  # one core, as one DataLoader worker has
    cv2.setNumThreads(1)
    cfg = load_config(Path(__file__).resolve().parents[1] / "args.yaml",
                      [f"data.root={root}", "data.multiscale=null", f"data.img_size={size}"])
    dataset = build_dataset(cfg, "train")
    lines = [f"Machine: {machine(torch.device('cpu'))}, OpenCV {cv2.__version__}", "",
             f"{len(dataset)} train images of {root} at {size}, full training augmentation of args.yaml", ""]
    rates = end_to_end(dataset, size, repeats)
    lines += [f"one process, JPEG -> sample: **{spread(rates, '.0f')} images/s** (median, min-max over {repeats} "
              "passes)", "", "| stage | ms / image |", "|---|---|"]
    lines += [f"| {name} | {ms:.3f} |" for name, ms in stages(dataset, size, repeats).items()]
    figures = {"images_per_s_per_process": statistics.median(rates)}
    # the worker counts alternate, round after round: each round's ratio compares rates measured a few seconds
    # apart, so the machine's speed drifting during the run does not enter the scaling figure
    rounds = [{n: loader_rate(cfg, dataset, n) for n in workers} for _ in range(repeats)]
    rates = {n: statistics.median(r[n] for r in rounds) for n in workers}
    scaling = {n: statistics.median(r[n] / r[workers[0]] for r in rounds) for n in workers}
    lines += ["", "| DataLoader workers (batch 16, collated, steady state within one epoch of the images repeated; "
              f"{repeats} alternating rounds) | images/s | vs {workers[0]} worker(s), paired per round |",
              "|---|---|---|"]
    lines += [f"| {n} | {spread([r[n] for r in rounds], '.0f')} | {scaling[n]:.2f}x |" for n in workers]
    figures.update({f"loader_{n}_workers": rate for n, rate in rates.items()})
    figures.update({f"loader_{n}_workers_scaling": value for n, value in scaling.items()})
    return lines, figures


def main() -> None:
    """Parse arguments, run, print markdown (and write the figures as JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--size", type=int, default=416)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="DataLoader worker counts to time (the first is the 1x reference)")
    parser.add_argument("--json", help="also write the headline figures to this JSON file")
    args = parser.parse_args()
    lines, figures = run(checked_data(args.data), args.size, args.repeats, args.workers)
    emit(lines, figures, args.json)


if __name__ == "__main__":
    main()
