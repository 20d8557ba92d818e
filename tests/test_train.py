"""Training: accumulation, EMA, exact resume, SIGTERM, TensorBoard tags, early stop, DDP, batch overfit."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import DATA

import batch_overfit
import main as train_main
from datasets.eval_curves import PLOT_FILES
from datasets.shapes import generate_shapes
from engine.ema import ModelEMA
from engine.train import train_step
from models import build_model
from models.loss import build_loss
from utils.checkpoint import load_checkpoint
from utils.config_load import load_config

ROOT = DATA.parent.parent


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=16, num_val=4, seed=0, size=96)
    return root


def run_args(shapes, logs, *overrides):
    return ["--config", str(ROOT / "args.yaml"), "--device", "cpu", "--set", f"data.root={shapes}",
            "model.num_classes=6", "model.arch=yolov3-tiny", "data.img_size=64", "data.multiscale=[64,96]",
            "data.multiscale_every=1", "data.workers=0", "train.batch_size=4", "train.subdivisions=2",
            "train.burn_in=2", "train.amp=fp32", "eval.amp=fp32", "eval.every=1000", "eval.batch_size=4",
            "logging.every=1", "logging.images=2", f"logging.dir={logs}", *overrides]


def test_accumulation_gives_the_gradient_of_the_whole_batch():
    torch.manual_seed(0)
    model = build_model("yolov3-tiny", num_classes=3).train()
    for m in model.modules():  # freeze BatchNorm: batch statistics differ between 8 and 2 images
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    loss_fn = build_loss(model, load_config(ROOT / "args.yaml", ["model.num_classes=3"]).loss)
    images = torch.rand(8, 3, 64, 64)
    targets = torch.tensor([[i, i % 3, 20.0 + 3 * i, 30.0, 12.0, 18.0] for i in range(8)])
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def step(chunks):
        model.load_state_dict(start)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # new weights = old - gradient
        batches = []
        for c in range(chunks):
            part = targets[(targets[:, 0] >= c * 8 // chunks) & (targets[:, 0] < (c + 1) * 8 // chunks)].clone()
            part[:, 0] -= c * 8 // chunks
            batches.append((images[c * 8 // chunks:(c + 1) * 8 // chunks], part))
        result = train_step(model, loss_fn, batches, optimizer, torch.amp.GradScaler("cpu", enabled=False), None, None)
        return result, {k: v.clone() for k, v in model.state_dict().items()}

    one, weights_one = step(1)
    four, weights_four = step(4)
    assert one.losses["total"] == pytest.approx(four.losses["total"], rel=1e-5)
    for k in weights_one:
        assert torch.allclose(weights_one[k], weights_four[k], atol=1e-5), k
    assert any(not torch.equal(weights_one[k], start[k]) for k in start)  # the step did move the weights


def test_non_finite_loss_skips_the_step():
    model = build_model("yolov3-tiny", num_classes=3).train()
    loss_fn = build_loss(model, load_config(ROOT / "args.yaml", ["model.num_classes=3"]).loss)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    images = torch.full((2, 3, 64, 64), float("nan"))
    result = train_step(model, loss_fn, [(images, torch.zeros(0, 6))], torch.optim.SGD(model.parameters(), lr=1.0),
                        torch.amp.GradScaler("cpu", enabled=False), None, 10.0)
    assert result.skipped
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def clip_step(clip_grad_norm):
    """One SGD step (lr 1, no momentum: the update is minus the used gradient) of a seeded tiny model; returns the
    result and the update's norm."""
    torch.manual_seed(0)
    model = build_model("yolov3-tiny", num_classes=3).train()
    loss_fn = build_loss(model, load_config(ROOT / "args.yaml", ["model.num_classes=3"]).loss)
    start = [p.detach().clone() for p in model.parameters()]
    images, targets = torch.rand(2, 3, 64, 64), torch.tensor([[0, 1, 30.0, 30.0, 20.0, 16.0]])
    result = train_step(model, loss_fn, [(images, targets)], torch.optim.SGD(model.parameters(), lr=1.0),
                        torch.amp.GradScaler("cpu", enabled=False), None, clip_grad_norm)
    update = torch.cat([(p.detach() - s).double().flatten() for p, s in zip(model.parameters(), start, strict=True)])
    return result, float(update.norm())  # in float64: a float32 norm of 8.8M values is off by ~1e-3


def test_clipping_is_reported_and_scales_the_update_to_the_limit():
    free, free_update = clip_step(None)
    assert not free.clipped and free.grad_norm > 1  # an untrained tiny model: a norm in the hundreds
    assert free_update == pytest.approx(free.grad_norm, rel=1e-4)  # nothing clipped: the whole gradient
    clipped, clipped_update = clip_step(1e-3)
    assert clipped.clipped and clipped.grad_norm == pytest.approx(free.grad_norm, rel=1e-5)  # norm before clipping
    assert clipped_update == pytest.approx(1e-3, rel=1e-3)  # the update scaled down to the limit
    above, _ = clip_step(2 * free.grad_norm)  # a limit above the norm: not clipped
    assert not above.clipped


def test_the_default_limit_leaves_a_fresh_models_steps_alone():
    # the loss sums each image's terms, so a fresh model's gradient norm is in the hundreds (thousands for yolov3,
    # BENCHMARKS.md "Gradient norms"): a limit of 10 would rescale every step, the default only outliers
    limit = load_config(ROOT / "args.yaml").train.clip_grad_norm
    result, _ = clip_step(limit)
    assert not result.clipped and limit >= 2 * 4474  # twice the largest norm measured on coco_mini (yolov3 start)


def test_progress_window_counts_clipped_steps(caplog):
    from types import SimpleNamespace

    from engine.progress import ProgressWindow
    from engine.state import TrainState
    from engine.train import StepResult

    class Scalars:
        def scalars(self, values, step):
            self.values, self.step = values, step

    losses = {"total": 1.0, "xy": 0.1, "wh": 0.2, "obj": 0.3, "cls": 0.4}
    trainer = SimpleNamespace(state=TrainState(step=5), scheduler=SimpleNamespace(get_last_lr=lambda: [1e-3]))
    window, logger = ProgressWindow(), Scalars()
    for clipped in (True, False, True, True, False):
        window.count(StepResult(losses, 12.0, False, clipped))
    with caplog.at_level("INFO", logger="yolov3"):
        window.log(logger, trainer, StepResult(losses, 12.0, False, False), 10, torch.device("cpu"))
    assert logger.values["clip_fraction"] == pytest.approx(3 / 5) and logger.step == 5
    assert "clipped 3 of the last 5 steps" in caplog.text
    assert window.steps == window.clipped == 0  # a new window


@pytest.mark.slow
@pytest.mark.parametrize("config", ["args.yaml", "configs/darknet.yaml"])
def test_both_recipes_bring_the_loss_down_on_real_images(config):
    """The seed's Adam recipe and the paper's SGD one, augmentation included, on the 4 COCO training images of
    tests/data at 96 px with yolov3-tiny: the mean loss of the last 5 of 40 steps is well below the first 5's."""
    from datasets.loader import build_dataset, build_loader
    from engine.state import Trainer
    from engine.train import micro_batches

    small = [f"data.root={DATA / 'coco'}", "model.arch=yolov3-tiny", "model.pretrained=false", "data.img_size=96",
             "data.multiscale=null", "data.workers=0", "train.batch_size=4", "train.subdivisions=1", "train.burn_in=5",
             "train.amp=fp32"]
    cfg = load_config(ROOT / config, small)
    dataset = build_dataset(cfg, "train")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.arch, num_classes=len(dataset.class_names)).train()
    trainer = Trainer.build(model, cfg, torch.device("cpu"), dataset.class_names)
    batches = micro_batches(build_loader(cfg, dataset, True, 4), trainer.state, torch.device("cpu"))
    losses = []
    for _ in range(40):
        result = train_step(model, trainer.loss_fn, [next(batches)], trainer.optimizer, trainer.scaler, None,
                            cfg.train.clip_grad_norm)
        trainer.scheduler.step()
        assert not result.skipped
        losses.append(result.losses["total"])
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, losses


def test_ema_ramps_and_averages():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = ModelEMA(model, decay=0.5, ramp=1.0)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # d = 0.5 * (1 - e^-1) = 0.31606: ema = 0.31606 * 0 + 0.68394 * 1
    assert ema.module.weight.item() == pytest.approx(1 - 0.5 * (1 - 2.718281828 ** -1), rel=1e-6)
    state = ema.state_dict()
    other = ModelEMA(model, decay=0.5, ramp=1.0)
    other.load_state_dict(state)
    assert other.updates == 1 and other.module.weight.item() == ema.module.weight.item()


def test_a_checkpoint_holds_what_earlier_versions_wrote_and_loads_back():
    """The keys of Trainer.state_dict are the checkpoint format: last.pt files of earlier runs must go on resuming."""
    from engine.state import Trainer

    cfg = load_config(ROOT / "args.yaml", ["model.num_classes=3", "model.arch=yolov3-tiny"])
    torch.manual_seed(0)
    trainer = Trainer.build(build_model("yolov3-tiny", num_classes=3), cfg, torch.device("cpu"), ["a", "b", "c"])
    trainer.state.step, trainer.state.best_metric = 7, 0.25
    saved = trainer.state_dict()
    assert set(saved) == {"model", "ema", "optimizer", "scheduler", "scaler", "state", "config", "class_names", "rng"}
    assert set(saved["state"]) == {"step", "epoch", "batch_in_epoch", "best_metric", "best_step",
                                   "evals_without_improvement", "skipped_steps", "skipped_images", "planned_steps"}
    assert set(saved["ema"]) == {"module", "updates"} and set(saved["rng"]) == {"torch", "cuda", "numpy", "python"}
    other = Trainer.build(build_model("yolov3-tiny", num_classes=3), cfg, torch.device("cpu"), ["a", "b", "c"])
    other.load_state_dict(saved)
    assert other.state.step == 7 and other.state.best_metric == 0.25
    assert all(torch.equal(v, other.model.state_dict()[k]) for k, v in saved["model"].items())


@pytest.mark.slow
def test_resume_continues_exactly(shapes, tmp_path):
    straight = train_main.main(run_args(shapes, tmp_path / "a", "train.steps=6", "train.checkpoint_every=3"))
    first = train_main.main(run_args(shapes, tmp_path / "b", "train.steps=3", "train.checkpoint_every=3"))
    resumed = train_main.main(["--resume", str(first["run_dir"] / "last.pt"), "--device", "cpu",
                               "--set", "train.steps=6"])
    assert resumed["run_dir"] == first["run_dir"]  # the same run folder
    assert resumed["state"]["step"] == straight["state"]["step"] == 6
    assert resumed["state"]["epoch"] == straight["state"]["epoch"]
    a = load_checkpoint(straight["run_dir"] / "last.pt")
    b = load_checkpoint(resumed["run_dir"] / "last.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["ema"]["module"].items():
        assert torch.equal(v, b["ema"]["module"][k]), k
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6
    for change in ("model.num_classes=7", "train.optimizer=sgd"):  # shapes the weights / optimiser state: refused
        with pytest.raises(SystemExit, match=rf"--set {change}: a resumed run keeps its model\.\* and "):
            train_main.main(["--resume", str(first["run_dir"] / "last.pt"), "--device", "cpu", "--set", change])


def test_run_folder_tensorboard_tags_and_best(shapes, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train_main.main(run_args(shapes, tmp_path, "train.steps=4", "eval.every=2",
                                      "train.clip_grad_norm=1e-9", "--name", "tags"))
    run_dir = result["run_dir"]
    assert run_dir.parent == tmp_path and run_dir.name.endswith("_tags") and ":" not in run_dir.name
    assert {"last.pt", "best.pt", "args.yaml", "evals.jsonl", "predictions.png", *PLOT_FILES} <= \
        {p.name for p in run_dir.iterdir()}
    evaluations = [json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines()]
    assert len(evaluations) == 2  # at steps 2 and 4
    assert np.array(evaluations[-1]["plots"]["confusion_matrix"]).shape == (7, 7)  # 6 classes and the background
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss/total", "loss/xy", "loss/wh", "loss/obj", "loss/cls", "lr", "grad_norm", "speed/images_per_s",
            "speed/data_fraction", "memory_gb", "skipped_steps", "clip_fraction", "eval/AP", "eval/AP50",
            "eval/ARl"} <= scalars
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("clip_fraction")] == [1.0] * 4  # a limit of 1e-9 clips every step
    assert {"eval/predictions", *(f"eval/{name.removesuffix('.png')}" for name in PLOT_FILES)} <= \
        set(events.Tags()["images"])
    saved = load_config(run_dir / "args.yaml")
    assert saved.model.arch == "yolov3-tiny" and saved.logging.name == "tags"


def test_early_stopping(shapes, tmp_path):
    # lr 1e-9: nothing improves after the first evaluation, so patience 1 stops at the second
    result = train_main.main(run_args(shapes, tmp_path, "train.steps=20", "eval.every=1", "train.patience=1",
                                      "train.lr=1e-9", "train.burn_in=0", "train.ema=false"))
    assert result["state"]["step"] < 20 and result["state"]["evals_without_improvement"] == 1


@pytest.mark.slow
def test_missing_dataset_stops_with_one_line(tmp_path):
    run = subprocess.run([sys.executable, "main.py", "--device", "cpu", "--set", f"data.root={tmp_path / 'none'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert str(tmp_path / "none") in run.stderr and "get_coco.sh" in run.stderr and "datasets.shapes" in run.stderr


@pytest.mark.slow
def test_sigterm_leaves_a_loadable_last_checkpoint(shapes, tmp_path):
    args = [sys.executable, "main.py", *run_args(shapes, tmp_path, "train.steps=100000", "train.checkpoint_every=1000")]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("*/events.out.tfevents.*")):
        time.sleep(0.5)
    time.sleep(3)  # a few steps
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "stopped by signal 15" in output
    state = load_checkpoint(next(tmp_path.glob("*/last.pt")))
    assert state["state"]["step"] >= 1


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_with_workers(shapes, tmp_path):
    # `timeout`, `kill -- -PGID` and SLURM signal every process of the job: the DataLoader workers must outlive the
    # signal until the trainer has finished its step and written last.pt, then go with it
    args = [sys.executable, "main.py", *run_args(shapes, tmp_path, "train.steps=100000", "train.checkpoint_every=1000",
                                                 "data.workers=2")]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("*/events.out.tfevents.*")):
        time.sleep(0.5)
    time.sleep(3)  # a few steps, workers running
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "stopped by signal 15" in output and "killed by signal" not in output
    assert load_checkpoint(next(tmp_path.glob("*/last.pt")))["state"]["step"] >= 1
    deadline = time.time() + 30
    while time.time() < deadline:  # the workers end with the trainer: the process group empties
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("DataLoader workers outlived the trainer")


def run_two_ranks(tmp_path, args: list[str], result_json: str) -> tuple[subprocess.CompletedProcess, list]:
    """Run main.main(args) on 2 gloo ranks (torchrun --standalone: a free port) and return the run and, per rank,
    the JSON of `result_json`, a Python expression of main()'s `result`."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import json, os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import main\n"
        "result = main.main(sys.argv[1:])\n"
        "open(os.path.join(os.environ['OUT'], f\"rank{os.environ['RANK']}.json\"), 'w').write(json.dumps("
        f"{result_json}))\n")
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(worker), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run, [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(shapes, tmp_path):
    _, ranks = run_two_ranks(tmp_path, run_args(shapes, tmp_path / "logs", "train.steps=3", "eval.every=3"),
                             "{'checksum': float(sum(p.detach().double().sum() for p in result['model'].parameters()))"
                             ", 'step': result['state']['step']}")
    assert ranks[0]["step"] == ranks[1]["step"] == 3
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # identical weights on both ranks
    runs = list((tmp_path / "logs").iterdir())
    assert len(runs) == 1  # one run folder, written by rank 0 only
    assert {"last.pt", "best.pt", "args.yaml"} <= {p.name for p in runs[0].iterdir()}


@pytest.mark.slow
def test_batch_overfit_reaches_high_ap50(shapes):
    result = batch_overfit.main([
        "--config", str(ROOT / "args.yaml"), "--gpu", "-1", "--set", f"data.root={shapes}", "model.num_classes=6",
        "model.arch=yolov3-tiny", "data.img_size=96", "train.lr=0.002", "--steps", "150", "--images", "4"])
    assert result["AP50"] >= 0.9
    assert result["obj"] < 1.0 and result["cls"] < 0.5



DDP_STEP_WORKER = """\
import json, os, sys
sys.path.insert(0, {root!r})
import torch
import main

out, rank = os.environ["OUT"], int(os.environ.get("RANK", 0))
loaders, build = [], main.build_start_model


def build_frozen_bn(*args):  # BatchNorm in eval mode: its batch statistics would differ between 2 and 4 images
    model, started = build(*args)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
            m.train = lambda mode=True, m=m: m  # and kept there when main.py puts the model back in train mode
    torch.save({{k: v.clone() for k, v in model.state_dict().items()}}, os.path.join(out, f"start{{rank}}.pt"))
    return model, started


def keep_loader(*args):
    data = training_loaders(*args)
    loaders.append(data[0])
    return data


main.build_start_model, training_loaders, main.training_loaders = build_frozen_bn, main.training_loaders, keep_loader
result = main.main(sys.argv[1:])
torch.save(result["model"].state_dict(), os.path.join(out, f"end{{rank}}.pt"))
sampler = loaders[0].batch_sampler
sampler.set_epoch(0)
json.dump(next(iter(sampler)), open(os.path.join(out, f"batch{{rank}}.json"), "w"))
"""


@pytest.mark.slow
def test_ddp_two_ranks_step_as_one_process_with_the_whole_batch(shapes, tmp_path):
    # 2 gloo ranks x 2 images must take the optimiser step of 1 process x 4 images: the same images with the same
    # augmentation (affine always on, so that a wrong seed shows) and the same gradient (BatchNorm frozen)
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_STEP_WORKER.format(root=str(ROOT)))
    args = run_args(shapes, tmp_path / "logs", "train.steps=1", "train.subdivisions=1", "train.optimizer=sgd",
                    "train.lr=0.01", "train.burn_in=0", "train.clip_grad_norm=null", "train.ema=false",
                    "augment.affine.p=1.0", "logging.images=0")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: a free port (a fixed one collides with other test runs on the machine)
    for name, launcher in (("ddp", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]),
                           ("one", [])):
        (tmp_path / name).mkdir()
        run = subprocess.run([sys.executable, *launcher, str(worker), *args], cwd=ROOT, env={**env, "OUT": str(
            tmp_path / name)}, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ddp" / f"batch{r}.json").read_text()) for r in (0, 1)]
    whole = json.loads((tmp_path / "one" / "batch0.json").read_text())
    assert len(ranks[0]) == len(ranks[1]) == 2 and len(whole) == 4
    assert not {seed for _, _, seed in ranks[0]} & {seed for _, _, seed in ranks[1]}  # each rank its own draws
    assert sorted(ranks[0] + ranks[1]) == sorted(whole)  # (index, size, seed): the images of the whole batch
    start, ddp, one = (torch.load(tmp_path / d / f"{w}0.pt") for d, w in (("one", "start"), ("ddp", "end"),
                                                                           ("one", "end")))
    moved = 0
    for k, v in start.items():
        if v.dtype.is_floating_point and "running" not in k:
            torch.testing.assert_close(ddp[k], one[k], rtol=1e-6, atol=1e-9,
                                           msg=lambda m, k=k: f"{k}: {m}")  # float rounding only
            moved += not torch.equal(one[k], v)
    assert moved > 10  # the step changed the weights
