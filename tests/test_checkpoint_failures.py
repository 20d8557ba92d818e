"""A checkpoint write that fails (disk full, no permission, file too large) keeps the previous checkpoint, leaves no
partial file, and stops training with a message naming the file and the reason."""
import errno
import os
import resource
import signal

import pytest
import torch

import main as train_main
import utils.checkpoint as checkpoint_module
from reliability.common import make_shapes, tiny_run_args
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"))


class FailingFile:
    """A real file that raises OSError(code) once more than `room` bytes have been written to it."""

    def __init__(self, file, room, code):
        self.file, self.room, self.code = file, room, code

    def write(self, data):
        if self.room < len(data):
            self.file.write(bytes(data[:self.room]))  # what fitted is on the disk, as with a full disk
            self.room = 0
            raise OSError(self.code, os.strerror(self.code))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def fail_writes(monkeypatch, after_saves, room, code):
    """From the (after_saves + 1)-th checkpoint on, writing fails with `code` after `room` bytes; open itself fails
    when room is None (as for a folder without write permission)."""
    saves = [0]

    def fake_open(path, mode="r", *args, **kwargs):
        saves[0] += 1
        if saves[0] <= after_saves:
            return open(path, mode, *args, **kwargs)
        if room is None:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return FailingFile(open(path, mode, *args, **kwargs), room, code)

    monkeypatch.setattr(checkpoint_module, "open", fake_open, raising=False)


STATE = {"model": {"w": torch.arange(250_000, dtype=torch.float32)}, "config": {}}


@pytest.mark.parametrize("room, code, reason", [
    (100_000, errno.ENOSPC, "No space left on device"),
    (0, errno.EIO, "Input/output error"),
    (None, errno.EACCES, "Permission denied"),
])
def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, room, code, reason):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, path)
    fail_writes(monkeypatch, 0, room, code)
    with pytest.raises(CheckpointError, match=rf"last.pt: could not write the checkpoint: {reason} \(the previous "
                       r"last.pt is unchanged; no partial file is left\)"):
        save_checkpoint(STATE, path)
    assert load_checkpoint(path)["model"]["w"].tolist() == [1.0, 1.0, 1.0]
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_real_file_size_limit_is_reported_with_the_system_reason(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the kernel then fails the write with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        with pytest.raises(CheckpointError, match=r"could not write the checkpoint: File too large \(the previous"):
            save_checkpoint(STATE, path)  # 1 MB of floats: torch's C++ writer meets the limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert load_checkpoint(path)["model"]["w"].tolist() == [1.0, 1.0, 1.0]
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_training_stops_with_a_message_and_keeps_the_last_checkpoint(shapes, tmp_path, monkeypatch):
    fail_writes(monkeypatch, 1, 1_000_000, errno.ENOSPC)  # the write at step 2 works, the one at step 4 fails
    with pytest.raises(SystemExit) as info:
        train_main.main(tiny_run_args(shapes, tmp_path, "train.steps=4", "train.checkpoint_every=2",
                                      "train.batch_size=2", "train.subdivisions=1"))
    message = str(info.value)
    assert message.startswith("error: training stopped at step 4: ") and "No space left on device" in message
    run_dir = next(tmp_path.iterdir())
    assert f"{run_dir / 'last.pt'}: could not write the checkpoint" in message
    assert load_checkpoint(run_dir / "last.pt")["state"]["step"] == 2
    assert not (run_dir / ".last.pt.tmp").exists()


def test_a_half_written_file_is_refused_with_a_clear_message(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(STATE, path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut.pt: not a readable PyTorch checkpoint \(truncated"):
        load_checkpoint(cut)
