"""DataLoader assembly: multi-scale batches, collate layout, reproducible seeded workers, SIGTERM filter."""
import multiprocessing
import os
import subprocess
import time

import pytest
import torch
from conftest import DATA
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler

from datasets.loader import (
    MultiScaleBatchSampler,
    auto_workers,
    build_dataset,
    build_loader,
    ignore_foreign_sigterm,
    train_sizes,
)
from datasets.shapes import generate_shapes
from utils.config_load import load_config


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=24, num_val=4, seed=0, size=96)
    return root


def config(root, *overrides):
    return load_config(DATA.parent.parent / "args.yaml", [f"data.root={root}", *overrides])


def test_multiscale_sampler_one_size_per_batch_and_varied():
    sampler = MultiScaleBatchSampler(SequentialSampler(range(1000)), batch_size=4, sizes=range(320, 609, 32),
                                     every=1, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 250
    sizes = [{size for _, size, _ in batch} for batch in batches]
    assert all(len(s) == 1 for s in sizes)
    used = {s.pop() for s in sizes}
    assert len(used) >= 8 and all(s % 32 == 0 and 320 <= s <= 608 for s in used)
    assert [i for batch in batches for i, _, _ in batch] == list(range(1000))
    seeds = [seed for batch in batches for _, _, seed in batch]
    assert len(set(seeds)) == 1000  # a distinct augmentation seed per sample


def test_sampler_resumes_mid_epoch_exactly():
    sampler = MultiScaleBatchSampler(RandomSampler(range(100), generator=torch.Generator().manual_seed(0)),
                                     batch_size=4, sizes=[64, 96, 128], every=2, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start_batch=7)
    assert len(sampler) == 25 - 7
    sampler.sampler.generator.manual_seed(0)  # a resumed run's RandomSampler starts from the same generator state
    resumed = list(sampler)
    assert resumed == full[7:]


def test_multiscale_sampler_every_n_batches_and_epochs():
    sampler = MultiScaleBatchSampler(SequentialSampler(range(400)), batch_size=2, sizes=[320, 352, 384, 416],
                                     every=10, seed=1)
    sizes = [batch[0][1] for batch in sampler]
    assert all(len(set(sizes[i:i + 10])) == 1 for i in range(0, 200, 10))
    assert len(set(sizes)) > 1
    again = [batch[0][1] for batch in sampler]
    sampler.set_epoch(1)
    other_epoch = [batch[0][1] for batch in sampler]
    assert sizes == again and sizes != other_epoch


def test_train_sizes_from_config(shapes_root):
    assert train_sizes(config(shapes_root, "data.multiscale=[64,160]")) == [64, 96, 128, 160]
    assert train_sizes(config(shapes_root, "data.multiscale=null", "data.img_size=96")) == [96]


def test_train_loader_batches_match_their_sizes(shapes_root):
    cfg = config(shapes_root, "data.multiscale=[64,128]", "data.multiscale_every=1", "data.workers=2",
                 "model.num_classes=6")
    dataset = build_dataset(cfg, "train")
    assert dataset.class_names == ["circle", "rectangle", "triangle", "ellipse", "star", "cross"]
    loader = build_loader(cfg, dataset, train=True, batch_size=4)
    seen = set()
    for images, targets, metas in loader:
        size = images.shape[-1]
        seen.add(size)
        assert images.shape == (4, 3, size, size) and len(metas) == 4
        assert targets.shape[1] == 6 and set(targets[:, 0].long().tolist()) <= {0, 1, 2, 3}
        assert (targets[:, 1] >= 0).all() and (targets[:, 1] <= size).all() and (targets[:, 3] > 0).all()
    assert len(seen) > 1 and seen <= {64, 96, 128}


def batches(cfg, split="train"):
    dataset = build_dataset(cfg, split)
    loader = build_loader(cfg, dataset, train=split == "train", batch_size=4)
    return [(images, targets) for images, targets, _ in loader]


def test_augmentation_is_reproducible_from_the_seed_with_workers(shapes_root):
    cfg = config(shapes_root, "data.workers=2", "data.multiscale=[64,96]", "train.seed=5")
    first, second = batches(cfg), batches(cfg)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second, strict=True))
    other = batches(config(shapes_root, "data.workers=2", "data.multiscale=[64,96]", "train.seed=6"))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))


def test_augmentation_does_not_depend_on_the_number_of_workers(shapes_root):
    zero = batches(config(shapes_root, "data.workers=0", "data.multiscale=[64,96]", "train.seed=5"))
    two = batches(config(shapes_root, "data.workers=2", "data.multiscale=[64,96]", "train.seed=5"))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(zero, two, strict=True))


def test_workers_do_not_repeat_each_others_augmentation(shapes_root):
    # one image repeated: with per-worker seeds, the two workers' augmentations of it differ
    cfg = config(shapes_root, "data.workers=2", "data.multiscale=null", "data.img_size=64",
                 "augment.horizontal_flip.p=0.5", "augment.affine.p=1.0")
    dataset = build_dataset(cfg, "train")
    dataset.ids = dataset.ids[:1] * 16
    loader = build_loader(cfg, dataset, train=True, batch_size=2)
    images = [b[0] for b in loader]
    assert len(images) == 8
    assert not torch.equal(images[0], images[1])  # batch 0 from worker 0, batch 1 from worker 1


def test_val_loader_is_letterbox_only_in_order(shapes_root):
    cfg = config(shapes_root, "data.img_size=96", "data.workers=0")
    dataset = build_dataset(cfg, "val")
    loader = build_loader(cfg, dataset, train=False, batch_size=3)
    metas = [m for _, _, batch_metas in loader for m in batch_metas]
    assert [m["image_id"] for m in metas] == dataset.ids  # every image once, in order, last batch kept
    assert next(iter(loader))[0].shape[-2:] == (96, 96)


def _filtered_worker(trainer: int, ready) -> None:  # noqa: ANN001
    ignore_foreign_sigterm(trainer)
    ready.set()
    time.sleep(60)


def test_workers_die_of_sigterm_only_from_the_trainer():
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    worker = context.Process(target=_filtered_worker, args=(os.getpid(), ready), daemon=True)
    worker.start()
    assert ready.wait(10)
    # from another process (a shell's `kill`, `timeout`, SLURM): ignored
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)
    worker.join(1.0)
    assert worker.is_alive()
    worker.terminate()  # from the trainer (multiprocessing's terminate at exit): ends, with status 0
    worker.join(10)
    assert worker.exitcode == 0


def test_ranks_draw_distinct_seeds_and_together_equal_one_big_batch():
    # 2 ranks x 4 images must be the 8 images of one process's batch of 8, with the same sizes and the same
    # augmentation seeds; before, image j of every rank got the same seed (the seeds came from (seed, epoch) only)
    data = range(40)

    def sampler(world, rank, batch_size):
        return MultiScaleBatchSampler(DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=3),
                                      batch_size, sizes=[64, 96, 128], every=1, drop_last=True, seed=3)

    one, ranks = sampler(1, 0, 8), [sampler(2, r, 4) for r in (0, 1)]
    for epoch in (0, 1):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        for big, mine, other in zip(one, *ranks, strict=True):
            assert sorted(big) == sorted(mine + other)  # (index, size, seed) triples
            assert not {seed for _, _, seed in mine} & {seed for _, _, seed in other}
    assert len(one) == len(ranks[0]) == 5


def test_multiscale_size_changes_every_n_optimiser_steps():
    # 10 images in micro-batches of 2: 5 per epoch, optimiser steps of 2 micro-batches (subdivisions), a new size
    # every 3 steps = 6 micro-batches counted over the run: step 2 is the last micro-batch of epoch 0 and the first
    # of epoch 1, and has one size
    sampler = MultiScaleBatchSampler(SequentialSampler(range(10)), batch_size=2, sizes=range(64, 321, 32), every=3,
                                     drop_last=True, seed=0, subdivisions=2)
    sizes = []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        sizes += [batch[0][1] for batch in sampler]
    assert len(sizes) == 30
    blocks = [sizes[i:i + 6] for i in range(0, 30, 6)]
    assert all(len(set(block)) == 1 for block in blocks)
    assert len({block[0] for block in blocks}) > 1
    sampler.set_epoch(3, start_batch=2)  # a resumed run: micro-batch 2 of epoch 3 is micro-batch 17 of the run
    assert [batch[0][1] for batch in sampler] == sizes[17:20]


def test_train_loader_counts_multiscale_every_in_optimiser_steps(shapes_root):
    cfg = config(shapes_root, "data.multiscale=[64,160]", "data.multiscale_every=1", "train.batch_size=4",
                 "train.subdivisions=2", "data.workers=0", "model.num_classes=6")
    loader = build_loader(cfg, build_dataset(cfg, "train"), train=True, batch_size=2)
    sizes = []
    for epoch in range(3):
        loader.batch_sampler.set_epoch(epoch)
        sizes += [batch[0][1] for batch in loader.batch_sampler]  # the sampler alone: no image is decoded
    assert len(sizes) == 36
    assert all(sizes[i] == sizes[i + 1] for i in range(0, 36, 2))  # both micro-batches of each step
    assert len(set(sizes)) > 1
    # what train.time_limit plans with: every step's size known in advance, the same as the batches then carry
    assert loader.batch_sampler.step_sizes(0, 18).tolist() == sizes[::2]
    assert loader.batch_sampler.step_sizes(5, 9).tolist() == sizes[10:18:2]


@pytest.mark.parametrize(("device", "cores", "local_processes", "expected"), [
    ("cpu", 2, None, 2), ("cpu", 16, None, 4), ("cpu", 1, None, 1),  # a CPU step shares the cores: at most 4
    ("cuda", 16, None, 15), ("cuda", 16, "4", 3), ("cuda", 64, None, 16), ("cuda", 1, None, 1), ("cuda", 2, "4", 1),
])
def test_auto_workers_by_device_cores_and_local_processes(monkeypatch, device, cores, local_processes, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    if local_processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_processes)
    assert auto_workers(torch.device(device)) == expected
    assert auto_workers() == min(4, cores)  # no device: the CPU rule


def test_build_loader_resolves_auto_workers_for_its_device(shapes_root, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = config(shapes_root, "data.workers=auto")
    dataset = build_dataset(cfg, "val")
    assert build_loader(cfg, dataset, False, 2).num_workers == 4
    assert build_loader(cfg, dataset, False, 2, torch.device("cpu")).num_workers == 4
    assert build_loader(cfg, dataset, False, 2, torch.device("cuda")).num_workers == 7  # built, never iterated
