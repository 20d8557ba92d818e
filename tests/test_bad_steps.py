"""NaN or Inf in the loss or the gradients: the step is skipped (nothing changes, BatchNorm statistics included) and
counted; train.max_bad_steps in a row stop training with the step, the loss terms and the lr, keeping last.pt."""
import math

import pytest
import torch
from conftest import DATA

import engine.state
import main as train_main
from engine.train import BadStepCounter, StepResult, train_step
from models import build_model
from models.loss import build_loss
from reliability.common import make_shapes, tiny_run_args
from utils.checkpoint import load_checkpoint
from utils.config_load import load_config

ROOT = DATA.parent.parent


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"))


def tiny_setup():
    torch.manual_seed(0)
    model = build_model("yolov3-tiny", num_classes=3).train()
    loss_fn = build_loss(model, load_config(ROOT / "args.yaml", ["model.num_classes=3"]).loss)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    targets = torch.tensor([[0, 1, 30.0, 30.0, 20.0, 16.0]])
    return model, loss_fn, optimizer, targets


def snapshot(model, optimizer):
    return ({k: v.clone() for k, v in model.state_dict().items()},  # weights and BatchNorm buffers
            {k: {n: t.clone() for n, t in s.items()} for k, s in optimizer.state_dict()["state"].items()})


def assert_unchanged(before, model, optimizer):
    weights, state = before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    after = optimizer.state_dict()["state"]
    assert state.keys() == after.keys() and all(torch.equal(t, after[k][n]) for k, s in state.items()
                                                 for n, t in s.items())


def step(model, loss_fn, optimizer, images, targets):
    return train_step(model, loss_fn, [(images, targets)], optimizer, torch.amp.GradScaler("cpu", enabled=False),
                      None, 10.0)


def test_nan_input_skips_the_step_and_leaves_batchnorm_statistics_alone():
    model, loss_fn, optimizer, targets = tiny_setup()
    step(model, loss_fn, optimizer, torch.rand(2, 3, 64, 64), targets)  # Adam has a state now
    before = snapshot(model, optimizer)
    images = torch.rand(2, 3, 64, 64)
    images[1, :, 10:20, 10:20] = float("nan")
    result = step(model, loss_fn, optimizer, images, targets)
    assert result.skipped and math.isnan(result.losses["total"])
    assert_unchanged(before, model, optimizer)  # running_mean / running_var too, not NaN
    good = step(model, loss_fn, optimizer, torch.rand(2, 3, 64, 64), targets)
    assert not good.skipped and all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_infinite_gradient_with_a_finite_loss_skips_the_step():
    model, loss_fn, optimizer, targets = tiny_setup()
    step(model, loss_fn, optimizer, torch.rand(2, 3, 64, 64), targets)
    before = snapshot(model, optimizer)
    hook = next(model.parameters()).register_hook(lambda grad: grad * float("inf"))
    result = step(model, loss_fn, optimizer, torch.rand(2, 3, 64, 64), targets)
    hook.remove()
    assert result.skipped and math.isfinite(result.losses["total"]) and not math.isfinite(result.grad_norm)
    assert_unchanged(before, model, optimizer)


def result(skipped, lr):
    nan = float("nan")
    losses = {"total": nan, "xy": 0.25, "wh": nan, "obj": 1.5, "cls": 0.125} if skipped else \
        {"total": 2.0, "xy": 0.5, "wh": 0.5, "obj": 0.5, "cls": 0.5}
    return StepResult(losses, nan if skipped else 3.0, skipped, lr=lr)


def test_counter_stops_only_after_max_bad_steps_in_a_row(tmp_path):
    counter = BadStepCounter(3, tmp_path / "last.pt")
    pattern = [False, True, True, False, True, True]  # never 3 in a row
    assert all(counter.update(i + 1, result(bad, 1e-3)) is None for i, bad in enumerate(pattern))
    (tmp_path / "last.pt").write_bytes(b"")
    message = counter.update(7, result(True, 1.5e-4))
    assert message == ("3 optimiser steps in a row had a non-finite loss or gradient (train.max_bad_steps=3); the "
                       "last was step 7: loss nan (xy 0.25 wh nan obj 1.5 cls 0.125), grad norm nan, lr 1.50e-04. "
                       f"{tmp_path / 'last.pt'} is left as the last good checkpoint. Look for NaN/Inf in the data, "
                       "lower train.lr or set train.clip_grad_norm, then resume")


def nan_loss_at(monkeypatch, bad_steps):
    """Make main.py's loss NaN (total and the obj term) at these 1-based micro-batch calls (one per step here)."""
    real_build = engine.state.build_loss

    def build(model, loss_cfg):
        loss_fn, calls = real_build(model, loss_cfg), [0]

        def loss(outputs, targets):
            calls[0] += 1
            total, terms = loss_fn(outputs, targets)
            if calls[0] in bad_steps:
                return total * float("nan"), {**terms, "obj": terms["obj"] * float("nan")}
            return total, terms
        return loss

    monkeypatch.setattr(engine.state, "build_loss", build)


def test_isolated_bad_steps_are_skipped_and_counted(shapes, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, {2, 4})
    run = train_main.main(tiny_run_args(shapes, tmp_path, "train.steps=5", "train.max_bad_steps=2",
                                        "train.batch_size=2", "train.subdivisions=1"))
    assert run["state"]["step"] == 5 and run["state"]["skipped_steps"] == 2
    saved = load_checkpoint(run["run_dir"] / "last.pt")
    assert saved["state"]["skipped_steps"] == 2
    assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in
               (saved[part] if part == "model" else saved[part]["module"]).values() if v.is_floating_point())


def test_max_bad_steps_in_a_row_stop_training_and_keep_the_last_good_checkpoint(shapes, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, {4, 5, 6, 7})
    with pytest.raises(SystemExit) as info:
        train_main.main(tiny_run_args(shapes, tmp_path, "train.steps=10", "train.max_bad_steps=2",
                                      "train.checkpoint_every=3", "train.batch_size=2", "train.subdivisions=1",
                                      "train.burn_in=0", "train.lr=0.002"))
    run_dir = next(tmp_path.iterdir())
    message = str(info.value)
    assert message.startswith("error: 2 optimiser steps in a row had a non-finite loss or gradient "
                              "(train.max_bad_steps=2); the last was step 5: loss nan (xy ")
    assert " obj nan cls " in message and ", lr 2.00e-03. " in message
    assert f"{run_dir / 'last.pt'} is left as the last good checkpoint" in message
    saved = load_checkpoint(run_dir / "last.pt")
    assert saved["state"]["step"] == 3 and saved["state"]["skipped_steps"] == 0


def _ddp_rank_with_an_infinite_loss(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, loss_fn, optimizer, targets = tiny_setup()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        before = {k: v.clone() for k, v in model.state_dict().items()}

        def loss_on_rank(outputs, targets):  # noqa: ANN001, ANN202
            loss, terms = loss_fn(outputs, targets)  # rank 1: an infinite loss whose gradients are finite
            return (loss + math.inf if rank == 1 else loss), terms

        torch.manual_seed(rank)
        result = train_step(ddp, loss_on_rank, [(torch.rand(2, 3, 64, 64), targets)], optimizer,
                            torch.amp.GradScaler("cpu", enabled=False), None, 10.0)
        unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        torch.save({"skipped": result.skipped, "grad_norm": result.grad_norm, "unchanged": unchanged,
                    "total": result.losses["total"]}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_agree_to_skip(tmp_path):
    torch.multiprocessing.spawn(_ddp_rank_with_an_infinite_loss, args=(2, 29531, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all(math.isfinite(r["grad_norm"]) for r in ranks)  # the gradients were finite on both ranks
    assert [r["skipped"] for r in ranks] == [True, True]  # rank 0's own loss was finite: it skips with rank 1
    assert [r["unchanged"] for r in ranks] == [True, True]  # no rank stepped: the weights stay equal
    assert [r["total"] for r in ranks] == [math.inf, math.inf]  # the loss logged is the mean over ranks
