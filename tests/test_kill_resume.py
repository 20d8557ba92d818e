"""Kill -9 at random moments of a CPU training, and once inside a checkpoint write: each time every checkpoint on
disk loads, at most train.checkpoint_every steps are lost, and --resume ends with the weights of an uninterrupted run.
The full-size run is `python -m reliability.kill_resume` (RELIABILITY.md)."""
import pytest
import torch

from reliability.common import make_shapes
from reliability.kill_resume import kill_and_resume


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the runs' speed, not their numbers: the killed runs use this process's count
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_kill_9_three_times_then_resume_to_the_uninterrupted_weights(tmp_path, one_thread):
    # 30 steps, checkpoint every 2 steps, 2 kills at random moments and 1 inside a checkpoint write
    result = kill_and_resume(make_shapes(tmp_path / "shapes"), tmp_path, 30, 2, 2, 1, "train.batch_size=2",
                             "train.subdivisions=1", seed=3)
    kills = result["kills"]
    assert len(kills) == 3, kills
    assert [k.how.startswith("in save") for k in kills].count(True) == 1
    cut = next(k for k in kills if k.how.startswith("in save"))
    assert cut.cut_write  # killed with the temporary file half written, and last.pt still loaded
    for k in kills:
        assert k.loadable >= 1  # every checkpoint file on disk loaded
        assert 0 <= k.lost <= 2  # train.checkpoint_every
        assert k.checkpoint_step % 2 == 0 and k.checkpoint_step >= k.resumed_from
    assert result["final_step"] == 30 and result["weights_equal"]
