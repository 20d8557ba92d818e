"""A DataLoader worker that hangs, dies or meets a bad image becomes a LoaderError that says what to check, within
data.timeout; main.py prints it as one line; with data.skip_bad_images the run goes on and counts the images."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import main as train_main
from datasets.coco import CocoDetection
from datasets.loader import LoaderError, build_dataset, build_loader, checked_batches
from datasets.shapes import generate_shapes
from reliability.common import ROOT, child_pids, tiny_run_args
from utils.config_load import load_config

GENEROUS = 120  # seconds: a bound on "not a silent stall", far above data.timeout


@pytest.fixture()
def shapes(tmp_path):
    root = tmp_path / "shapes"
    generate_shapes(root, num_train=16, num_val=4, seed=0, size=96)
    return root


def val_loader(root, *overrides):
    cfg = load_config(ROOT / "args.yaml", [f"data.root={root}", "data.img_size=64", "data.workers=2",
                                           "data.timeout=2", *overrides])
    return build_loader(cfg, build_dataset(cfg, "val"), train=False, batch_size=1)


def misbehave_on(monkeypatch, image_index, action):
    """Make the workers run `action` instead of loading the image_index-th validation image."""
    real = CocoDetection.load_image

    def load(self, image_id):
        if torch.utils.data.get_worker_info() is not None and image_id == self.ids[image_index]:
            action()
        return real(self, image_id)

    monkeypatch.setattr(CocoDetection, "load_image", load)


def consume(loader):
    """Iterate the loader to the end through checked_batches; returns the batches' image counts."""
    return [len(images) for images, _, _ in checked_batches(loader)]


def no_children_left(before, grace=30.0):
    deadline = time.monotonic() + grace
    while set(child_pids()) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    return not set(child_pids()) - before


@pytest.mark.slow
def test_a_hung_worker_is_an_error_after_the_timeout(shapes, monkeypatch):
    misbehave_on(monkeypatch, 2, lambda: time.sleep(3600))
    before = set(child_pids())
    loader = val_loader(shapes)
    start = time.monotonic()
    with pytest.raises(LoaderError, match=r"no batch from the 2 DataLoader worker\(s\) in 2 s \(data.timeout\): a "
                       rf"worker hangs or is very slow. Check that {shapes}/images/val2017 is reachable"):
        consume(loader)
    assert time.monotonic() - start < GENEROUS
    del loader
    assert no_children_left(before)  # the hung worker was terminated, not left behind


def test_a_dead_worker_is_an_error_that_points_at_memory(shapes, monkeypatch):
    misbehave_on(monkeypatch, 1, lambda: os.kill(os.getpid(), signal.SIGKILL))
    before = set(child_pids())
    loader = val_loader(shapes, "data.timeout=600")  # death is noticed at once, not at the timeout
    start = time.monotonic()
    with pytest.raises(LoaderError, match=r"^DataLoader worker \(pid\(?s?\)? \d+\) (is killed by signal: Killed|exited "
                       r"unexpectedly)\. A DataLoader worker process died: most often the out-of-memory killer"):
        consume(loader)
    assert time.monotonic() - start < GENEROUS
    del loader
    assert no_children_left(before)


def truncate(path):
    path.write_bytes(path.read_bytes()[:300])


def test_a_bad_image_in_a_worker_names_the_file_not_a_traceback(shapes):
    bad = sorted((shapes / "images" / "val2017").iterdir())[1]
    truncate(bad)
    with pytest.raises(LoaderError) as info:
        consume(val_loader(shapes))
    assert str(info.value) == (f"{bad}: truncated JPEG: the data ends before the end-of-image marker (image id "
                               f"{int(bad.stem)} in "
                               f"{shapes}/annotations/instances_val2017.json) (in DataLoader worker process 1). Fix or "
                               "remove that image, or set data.skip_bad_images=true to skip unreadable images with a "
                               "warning")
    assert consume(val_loader(shapes, "data.skip_bad_images=true")) == [1, 0, 1, 1]  # the second batch lost its image


@pytest.mark.slow
def test_training_on_a_bad_image_stops_with_one_line(shapes, tmp_path):
    for image in (shapes / "images" / "train2017").iterdir():
        truncate(image)
    run = subprocess.run([sys.executable, "main.py", *tiny_run_args(shapes, tmp_path, "data.workers=2")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert re.fullmatch(rf"error: {shapes}/images/train2017/\d+.jpg: truncated JPEG: the data ends before the "
                        r"end-of-image marker \(image id \d+ in .*instances_train2017.json\) \(in DataLoader worker "
                        r"process \d\). Fix or remove that image, or set data.skip_bad_images=true to skip unreadable "
                        r"images with a warning", run.stderr.strip().splitlines()[-1])


@pytest.mark.slow
def test_skip_bad_images_warns_counts_and_training_goes_on(shapes, tmp_path):
    args = tiny_run_args(shapes, tmp_path, "train.steps=1", "data.skip_bad_images=true", "train.batch_size=2",
                         "train.subdivisions=1")
    cfg = load_config(ROOT / "args.yaml", args[args.index("--set") + 1:])
    dataset = build_dataset(cfg, "train")
    first_batch = next(iter(build_loader(cfg, dataset, train=True, batch_size=2).batch_sampler))
    bad = dataset.image_path(dataset.ids[first_batch[0][0]])
    truncate(bad)
    with pytest.warns(UserWarning, match=rf"skipping an unreadable image \(1 so far in this process\): {bad}: "
                      "truncated JPEG"):
        run = train_main.main(args)
    assert run["state"]["step"] == 1 and run["state"]["batch_in_epoch"] == 1  # trained on the other image
    assert run["state"]["skipped_images"] == 1
