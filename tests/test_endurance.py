"""Endurance, scaled down: a CPU training with DataLoader workers and repeated evaluations keeps the trainer's memory
flat and leaves no worker process or file descriptor behind when main() returns. The 2000-step run is
`python -m reliability.endurance` (RELIABILITY.md)."""
import pytest
import torch

from reliability.common import make_shapes
from reliability.endurance import MB, endurance


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_memory_flat_and_nothing_left_behind(tmp_path, one_thread):
    result = endurance(make_shapes(tmp_path / "shapes"), tmp_path / "runs", 120, 40, 2, "train.batch_size=2",
                       "train.subdivisions=1")
    assert [step for step, _, _ in result["samples"]] == list(range(10, 121, 10))
    assert result["workers_seen"] == 4  # 2 persistent training workers + 2 validation workers, all of them ...
    assert result["workers_left"] == []  # ... gone once main() returned
    assert result["leaked_fds"] == []  # event files, checkpoints, images, worker pipes: all closed
    growth = result["rss_end"] - result["rss_first_eval"]
    assert growth < 64 * MB, f"trainer RSS grew {growth / MB:.0f} MB over {result['steps']} steps"
