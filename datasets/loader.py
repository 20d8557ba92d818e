"""From config to DataLoader: datasets per split, multi-scale batches, seeded workers."""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from datasets.coco import CocoDetection, DatasetError, collate
from datasets.transforms import Preprocess, build_augmentation
from utils.config import Config


class MultiScaleBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (index, size) pairs: one input size per batch, redrawn every `every` batches (Darknet's random=1).

    The size is decided here, in the main process, so all workers of a batch agree without sharing state; the draw
    depends only on (seed, epoch, batch number), so runs and DDP ranks with the same seed see the same sizes.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, sizes: Sequence[int], every: int = 10,
                 drop_last: bool = False, seed: int = 0) -> None:
        self.sampler, self.batch_size, self.sizes = sampler, batch_size, list(sizes)
        self.every, self.drop_last, self.seed, self.epoch = every, drop_last, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Change the size sequence (and the DistributedSampler's order) for a new epoch."""
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """Yield [(index, size), ...] per batch."""
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        batch, number, size = [], 0, self.sizes[0]
        for index in self.sampler:
            if not batch and number % self.every == 0:
                size = rng.choice(self.sizes)
            batch.append((index, size))
            if len(batch) == self.batch_size:
                yield batch
                batch, number = [], number + 1
        if batch and not self.drop_last:
            yield batch

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def seed_worker(worker_id: int) -> None:
    """Worker start: distinct, reproducible seeds for numpy, random and the augmentation."""
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32  # torch derives it from the DataLoader generator (train.seed) and the worker id
    random.seed(seed)
    np.random.seed(seed)
    augmentation = info.dataset.preprocess.augmentation
    if augmentation is not None:
        augmentation.set_random_seed(seed)


def build_dataset(cfg: Config, split: str) -> CocoDetection:
    """The dataset of split "train" (augmented) or "val" (letterbox only), from cfg.data (and cfg.augment)."""
    images, annotations = cfg.data.split_paths(split)
    if not images.is_dir() or not annotations.is_file():
        missing = images if not images.is_dir() else annotations
        raise DatasetError(
            f"no {split} data: {missing} does not exist (data.root is {cfg.data.root!r}). Download COCO 2017 with "
            "`bash datasets/get_coco.sh` (into data/coco), or write the synthetic demo set with `python -m "
            "datasets.shapes --out data/shapes` and use --set data.root=data/shapes model.num_classes=6, or point "
            f"data.root / data.{split}_images / data.{split}_annotations at your COCO-format data.")
    augmentation = None
    if split == "train":
        augmentation = build_augmentation(dataclasses.asdict(cfg.augment), cfg.data.min_box_size, cfg.train.seed)
    return CocoDetection(images, annotations, Preprocess(augmentation), cfg.data.img_size, cfg.data.skip_bad_images)


def train_sizes(cfg: Config) -> list[int]:
    """The training input sizes: data.multiscale's range in steps of 32, or [data.img_size]."""
    if cfg.data.multiscale is None:
        return [cfg.data.img_size]
    low, high = cfg.data.multiscale
    return list(range(low, high + 1, 32))


def build_loader(cfg: Config, dataset: CocoDetection, train: bool, batch_size: int,
                 device: torch.device | None = None, distributed: bool = False) -> DataLoader:
    """A DataLoader yielding collate()'s (images, targets, metas); training batches are shuffled and multi-scale."""
    generator = torch.Generator().manual_seed(cfg.train.seed)
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=train, seed=cfg.train.seed)
    else:
        sampler = RandomSampler(dataset, generator=generator) if train else SequentialSampler(dataset)
    sizes = train_sizes(cfg) if train else [cfg.data.img_size]
    batches = MultiScaleBatchSampler(sampler, batch_size, sizes, cfg.data.multiscale_every, drop_last=train,
                                     seed=cfg.train.seed)
    workers = cfg.data.workers
    if workers > 0:
        # Parallelism comes from the workers. OpenCV's thread pool must be shut down before they fork: a forked
        # child that touches the inherited pool hangs (seen in cv2.setNumThreads inside a worker).
        cv2.setNumThreads(1)
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                      pin_memory=device is not None and device.type == "cuda", worker_init_fn=seed_worker,
                      generator=generator, persistent_workers=workers > 0)
