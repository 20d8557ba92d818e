"""From config to DataLoader: datasets per split, multi-scale batches, seeded workers."""
from __future__ import annotations

import functools
import os
import random
import re
import signal
import threading
from collections.abc import Iterator, Sequence, Sized
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from datasets.coco import CocoDetection, DatasetError, collate
from datasets.formats import data_paths
from datasets.transforms import Preprocess, build_augmentation
from utils.config import Config

GPU_MAX_WORKERS = 16  # data.workers auto on a GPU: ~2,000 images/s at 416, twice what one H200 trains


def stream_seed(seed: int, stream: int, *key: int) -> int:
    """A 63-bit seed that is a function of (seed, stream, *key) only: stream 0 for sample seeds, 1 for sizes.

    numpy's SeedSequence hashes the integers, so neighbouring keys give unrelated seeds (seed + index would not)."""
    return int(np.random.SeedSequence([seed, stream, *key]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of dataset index `index` in `epoch`: the same whatever the rank, batch position or
    worker that loads it, so that 2 ranks x B images augment exactly as 1 process x 2B (the same images)."""
    return stream_seed(seed, 0, epoch, index)


class MultiScaleBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """Batches of (index, size, sample seed): one input size per batch, redrawn every `every` optimiser steps of
    `subdivisions` batches each (Darknet's random=1: every 10 batches, in its unit of one optimiser step), and a
    seed for each sample's augmentation.

    Everything is decided here, in the main process, as a function of the run's seed: the seed of a sample from
    (seed, epoch, dataset index) (`sample_seed`), the size of a batch from (seed, its optimiser step), the step
    being counted over the whole run (epoch * batches per epoch + batch, over `subdivisions`), so a step that
    straddles two epochs still has one size. All workers of a batch agree on its size, every DDP rank draws the
    sizes of the others (the same step numbers), a sample's augmentation does not depend on which rank or worker
    loads it, and a resumed run that skips the first `start_batch` batches of its epoch sees exactly what the
    unbroken run saw.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, sizes: Sequence[int], every: int = 10,
                 drop_last: bool = False, seed: int = 0, subdivisions: int = 1) -> None:
        self.sampler, self.batch_size, self.sizes = sampler, batch_size, list(sizes)
        self.every, self.drop_last, self.seed, self.epoch, self.start_batch = every, drop_last, seed, 0, 0
        self.subdivisions = subdivisions

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Start epoch `epoch` (new order and sizes), skipping its first `start_batch` batches (for resuming)."""
        self.epoch, self.start_batch = epoch, start_batch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def batches_per_epoch(self) -> int:
        """Batches in a whole epoch (skipped ones included)."""
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def size_of(self, number: int) -> int:
        """The input size of batch `number` of the current epoch."""
        return self.step_size((self.epoch * self.batches_per_epoch() + number) // self.subdivisions)

    def step_size(self, step: int) -> int:
        """The input size of optimiser step `step` (0-based, counted over the whole run)."""
        if len(self.sizes) == 1:
            return self.sizes[0]
        return self.sizes[stream_seed(self.seed, 1, step // self.every) % len(self.sizes)]

    def step_sizes(self, start: int, stop: int) -> np.ndarray:
        """The input sizes of optimiser steps start..stop-1 (0-based), (stop - start,) int64: what the run will train
        at, known in advance (train.time_limit fits the run to them)."""
        first, last = start // self.every, max(start, stop - 1) // self.every
        chunk_sizes = np.array([self.step_size(c * self.every) for c in range(first, last + 1)], dtype=np.int64)
        return chunk_sizes[np.arange(start, stop) // self.every - first]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        """Yield [(index, size, sample seed), ...] per batch."""
        batch, number = [], 0
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                if number >= self.start_batch:
                    yield self.annotate(batch, number)
                batch, number = [], number + 1
        if batch and not self.drop_last and number >= self.start_batch:
            yield self.annotate(batch, number)

    def annotate(self, indices: list[int], number: int) -> list[tuple[int, int, int]]:
        """Batch `number`'s dataset indices -> [(index, size, sample seed), ...]."""
        size = self.size_of(number)
        return [(index, size, sample_seed(self.seed, self.epoch, index)) for index in indices]

    def __len__(self) -> int:
        """Number of batches per epoch (not counting the skipped ones)."""
        return self.batches_per_epoch() - self.start_batch


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ... of the dataset: each exactly once over all ranks, no padding (so that
    evaluation gathered from all ranks counts each image once)."""

    def __init__(self, dataset: Sized, rank: int = 0, world: int = 1) -> None:
        self.dataset, self.rank, self.world = dataset, rank, world

    def __iter__(self) -> Iterator[int]:
        """This rank's indices in order (of the dataset's current length)."""
        return iter(range(self.rank, len(self.dataset), self.world))

    def __len__(self) -> int:
        """How many indices this rank gets."""
        return len(range(self.rank, len(self.dataset), self.world))


def seed_worker(worker_id: int, trainer: int | None = None) -> None:
    """Worker start: distinct, reproducible seeds for numpy and random (augmentation is seeded per sample), and,
    given the `trainer` process id, SIGTERM from anyone but the trainer ignored (see `ignore_foreign_sigterm`)."""
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32  # torch derives it from the DataLoader generator (train.seed) and the worker id
    random.seed(seed)
    np.random.seed(seed)
    if trainer is not None:
        ignore_foreign_sigterm(trainer)


def ignore_foreign_sigterm(trainer: int) -> None:
    """In a DataLoader worker: die of SIGTERM only when the `trainer` process sends it; ignore it from anyone else.

    `timeout`, `kill -- -PGID` and SLURM's job cancel send SIGTERM to every process of the job at once. Workers
    that died of it would make the trainer fail on its next batch ("DataLoader worker ... killed by signal"),
    before its own SIGTERM handler has finished the step and written last.pt. The trainer still stops its workers
    with SIGTERM (multiprocessing's terminate() at exit), so the signal is not simply ignored: it is blocked, and
    a thread reads each one with its sender and ends the worker only when the sender is the trainer. It ends with
    exit status 0, not by the signal: the trainer may be waiting in waitpid for it then, and torch's SIGCHLD
    handler, run before the worker is reaped, would report a worker "killed by signal" at every such exit. A worker
    whose trainer dies exits by itself (torch's worker watchdog). No-op where sigwaitinfo does not exist (macOS).
    """
    if not hasattr(signal, "sigwaitinfo"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit the mask

    def wait() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != trainer:
            pass
        os._exit(0)  # the trainer's terminate(): end now, as the default action would, but not by the signal

    threading.Thread(target=wait, name="sigterm-filter", daemon=True).start()


def build_dataset(cfg: Config, split: str, augment: bool = True) -> CocoDetection:
    """The dataset of split "train" (augmented by cfg.augment unless `augment` is False) or "val" (letterbox only),
    from cfg.data."""
    images, annotations = data_paths(cfg.data, split)
    if not images.is_dir() or not annotations.is_file():
        missing = images if not images.is_dir() else annotations
        raise DatasetError(
            f"no {split} data: {missing} does not exist (data.root is {cfg.data.root!r}). Download COCO 2017 with "
            "`bash datasets/get_coco.sh` (into data/coco), or write the synthetic demo set with `python -m "
            "datasets.shapes --out data/shapes` and use --set data.root=data/shapes, or point data.root at your "
            "data: a COCO folder, a YOLO/Roboflow data.yaml (or its folder) or a Pascal VOC folder (or set "
            f"data.{split}_images / data.{split}_annotations).")
    # validation keeps every box: it is scored against the annotation file, not against these targets
    preprocess = Preprocess()
    if split == "train" and augment:
        augmentation = build_augmentation(cfg.augment.model_dump(), cfg.data.min_box_size, cfg.train.seed)
        preprocess = Preprocess(augmentation, cfg.data.min_box_size)
    return CocoDetection(images, annotations, preprocess, cfg.data.img_size, cfg.data.skip_bad_images)


def dataset_for_model(cfg: Config, split: str, augment: bool = True, model: str = "model.num_classes"
                      ) -> CocoDetection:
    """build_dataset for a model of cfg.model.num_classes classes: the validation split cut to its first eval.subset
    images, and a DatasetError when the annotation file's categories are not one per class (`model` names the
    model in it: the config key, or the weights file that fixed the class count); num_classes None (the data's
    count, resolved by main.fit_to_data) is not checked."""
    dataset = build_dataset(cfg, split, augment)
    if split == "val" and cfg.eval.subset:
        dataset.ids = dataset.ids[:cfg.eval.subset]
    if cfg.model.num_classes is not None and len(dataset.class_names) != cfg.model.num_classes:
        fix = f"; set --set model.num_classes={len(dataset.class_names)}" if model == "model.num_classes" else ""
        raise DatasetError(f"the model ({model}) predicts {cfg.model.num_classes} classes but {dataset.ann_file} has "
                           f"{len(dataset.class_names)} categories{fix}")
    return dataset


def train_sizes(cfg: Config) -> list[int]:
    """The training input sizes: data.multiscale's range (pixels, or factors of data.img_size) in steps of 32, or
    [data.img_size]."""
    low, high = cfg.data.train_size_range()
    return list(range(low, high + 1, 32))


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one, else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def auto_workers(device: torch.device | None = None) -> int:
    """data.workers auto. Training on a CPU: min(4, the cores this process may use), as the workers share the cores
    with the training step and more only contend with it (torch warns). On a GPU: the cores less one for the
    training process, shared by the processes torchrun started on this machine (LOCAL_WORLD_SIZE), at most
    GPU_MAX_WORKERS: the step needs about one core, and one worker augments ~140 images/s at 416, so 4 would hold a
    GPU that trains ~1,000 (BENCHMARKS.md, NVIDIA H200: 16 workers gave 2,042 images/s)."""
    cores = usable_cores()
    if device is None or device.type != "cuda":
        return min(4, cores)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(GPU_MAX_WORKERS, cores // local_processes - 1))


def build_loader(cfg: Config, dataset: CocoDetection, train: bool, batch_size: int,
                 device: torch.device | None = None, distributed: bool = False) -> DataLoader:
    """A DataLoader yielding collate()'s (images, targets, metas); training batches are shuffled and multi-scale."""
    generator = torch.Generator().manual_seed(cfg.train.seed)
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    if train:
        # DistributedSampler even in one process: its order is a function of (seed, epoch), so resuming at any
        # epoch reproduces it (RandomSampler's order depends on how many epochs were drawn before).
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed)
    else:
        sampler = ShardSampler(dataset, rank, world)
    sizes = train_sizes(cfg) if train else [cfg.data.img_size]
    batches = MultiScaleBatchSampler(sampler, batch_size, sizes, cfg.data.multiscale_every, drop_last=train,
                                     seed=cfg.train.seed, subdivisions=cfg.train.subdivisions)
    workers = auto_workers(device) if cfg.data.workers == "auto" else cfg.data.workers
    if workers > 0:
        # Parallelism comes from the workers. OpenCV's thread pool must be shut down before they fork: a forked
        # child that touches the inherited pool hangs (seen in cv2.setNumThreads inside a worker).
        cv2.setNumThreads(1)
    init = functools.partial(seed_worker, trainer=os.getpid())  # built here: this process is the trainer
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                      pin_memory=device is not None and device.type == "cuda", worker_init_fn=init,
                      generator=generator, persistent_workers=workers > 0,
                      timeout=cfg.data.timeout if workers > 0 else 0)  # a hung worker is an error, not a stall


class LoaderError(RuntimeError):
    """The DataLoader delivered no batch: an unreadable image, a worker that died or hung. The message says what to
    check."""


def _worker_message(error: Exception) -> str:
    """The message an exception had inside a DataLoader worker: torch re-raises it in the main process as
    "Caught X in DataLoader worker process N. Original Traceback ... X: <message>"."""
    text = str(error)
    start, where = text.rfind(f"{type(error).__name__}: "), re.search(r"in DataLoader worker process \d+", text)
    if not text.startswith("Caught ") or start < 0 or where is None:
        return text
    return f"{text[start + len(type(error).__name__) + 2:].strip()} ({where[0]})"


def checked_batches(loader: DataLoader) -> Iterator[Any]:
    """Iterate `loader`; its failures become LoaderError with a message that names the cause and what to change.

    A bad image (data.skip_bad_images false) names its file; a dead worker (pid, signal) points at memory; a worker
    silent for data.timeout seconds (the DataLoader's timeout) points at the image folder's storage.
    """
    try:
        yield from loader
    except (DatasetError, FileNotFoundError) as e:
        raise LoaderError(f"{_worker_message(e)}. Fix or remove that image, or set data.skip_bad_images=true to skip "
                          "unreadable images with a warning") from e
    except RuntimeError as e:
        text = str(e)
        if text.startswith("DataLoader timed out after"):
            raise LoaderError(
                f"no batch from the {loader.num_workers} DataLoader worker(s) in {loader.timeout:g} s (data.timeout): "
                f"a worker hangs or is very slow. Check that {loader.dataset.root} is reachable (a stalled network "
                "disk?), run with data.workers=0 to see where it stops, or raise data.timeout") from e
        if "DataLoader worker (pid" in text:
            raise LoaderError(
                f"{text.strip().rstrip('.')}. A DataLoader worker process died: most often the out-of-memory killer "
                "(see `dmesg`) or a crash in a native library. Lower data.workers or train.batch_size, or run with "
                "data.workers=0 to see the error in the main process") from e
        raise
