"""Train YOLOv3 on COCO or any COCO-format dataset.

    nohup python main.py --gpu 0 > nohup_0.out &                     # one GPU, args.yaml as it is
    python main.py --device cpu --set data.root=data/shapes model.num_classes=6 ...
    python main.py --resume logs/<run>/last.pt                       # continue a run exactly where it stopped
    torchrun --nproc_per_node=4 main.py                              # DDP over 4 GPUs (train.batch_size is global)

A run folder logs/<YYmmdd-HHMMSS>_<name>/ receives last.pt (every train.checkpoint_every steps, at the end and on
SIGINT/SIGTERM), best.pt (best eval.metric), the resolved args.yaml, TensorBoard events, evals.jsonl and
predictions.png (the latest evaluation's first validation images: true boxes white, predictions in class colours).
"""
from __future__ import annotations

import argparse
import random
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from datasets.coco import DatasetError
from datasets.loader import LoaderError, build_dataset, build_loader, checked_batches
from models import build_model
from utils.bad_steps import BadStepCounter
from utils.checkpoint import CheckpointError, checkpoint_weights, load_checkpoint, save_checkpoint
from utils.config import (
    Config,
    ConfigError,
    add_config_args,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
    select_device,
)
from utils.distributed import broadcast_object, cleanup, init_distributed, is_distributed
from utils.ema import ModelEMA
from utils.engine import autocast_dtype, train_step
from utils.evaluation import COCO_STATS, coco_evaluate, predict
from utils.logger import RunLogger, log, setup_console_logging
from utils.loss import build_loss
from utils.optim import build_optimizer, build_scheduler
from utils.plots import draw_boxes, draw_true_boxes, image_grid

RESUME_FIXED = ("model.", "train.optimizer")  # config keys a resumed run cannot change (--set on --resume)


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""

    step: int = 0  # optimiser steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_metric: float = -1.0
    best_step: int = 0
    evals_without_improvement: int = 0
    skipped_steps: int = 0
    skipped_images: int = 0  # unreadable images left out of their batch (data.skip_bad_images)


def build_parser() -> argparse.ArgumentParser:
    """Config options plus training's own."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--device", choices=("cpu",), help="train on the CPU even when CUDA is available")
    parser.add_argument("--resume", type=Path, help="last.pt of a run to continue (same run folder)")
    parser.add_argument("--weights", type=Path, help="start from a checkpoint (.pt) or Darknet file "
                        "(yolov3.weights, darknet53.conv.74)")
    parser.add_argument("--name", help="run name (sets logging.name)")
    return parser


def pick_device(args: argparse.Namespace, local_rank: int) -> torch.device:
    """--device cpu, else CUDA (the local rank's GPU under torchrun, --gpu N otherwise); CPU with a warning when
    there is no CUDA."""
    if args.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if args.gpu not in (None, -1):
            log.warning("--gpu %s: no CUDA device on this machine; training on the CPU", args.gpu)
        return torch.device("cpu")
    return torch.device(f"cuda:{local_rank}") if is_distributed() else select_device(args.gpu)


def rng_state() -> dict:
    """Every random generator's state, in types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
            else [], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))


def micro_batches(loader: torch.utils.data.DataLoader, state: TrainState, device: torch.device):  # noqa: ANN201
    """Endless (images, targets) micro-batches on the device, epoch after epoch, keeping state.epoch and
    state.batch_in_epoch current so a checkpoint knows where the data stands."""
    while True:
        loader.batch_sampler.set_epoch(state.epoch, start_batch=state.batch_in_epoch)
        for images, targets, _ in checked_batches(loader):
            state.batch_in_epoch += 1
            state.skipped_images += loader.batch_sampler.batch_size - len(images)
            if len(images):  # every image of the batch unreadable and skipped
                yield images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0


def load_start_weights(model: torch.nn.Module, path: Path) -> str:
    """--weights: a checkpoint's (EMA) weights or a Darknet file (full model or backbone); returns what loaded."""
    if path.suffix != ".pt":
        return f"Darknet {model.load_darknet_weights(path)}"
    state = load_checkpoint(path)
    try:
        model.load_state_dict(checkpoint_weights(state))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its weights do not fit the model of this config: {e}") from e
    return "checkpoint weights"


def evaluate_run(model: torch.nn.Module, loader: torch.utils.data.DataLoader, cfg: Config, device: torch.device,
                 logger: RunLogger, step: int) -> dict[str, float]:
    """Evaluate on every rank's shard, score on rank 0, log; returns the 12 COCO numbers (on every rank)."""
    rows, _ = predict(model, loader, cfg.eval, device, amp=False, progress=False)
    if is_distributed():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, rows)
        rows = np.concatenate(gathered)
    stats = {}
    if logger.enabled:
        dataset = loader.dataset
        stats, per_class, _ = coco_evaluate(dataset.coco, rows, dataset.ids, dataset.class_names, cfg.eval.backend)
        logger.scalars({f"eval/{k}": v for k, v in stats.items()}, step)
        logger.evaluation({"stats": stats, "per_class_ap50": {k: None if np.isnan(v) else v
                                                              for k, v in per_class.items()}}, step)
        if cfg.logging.images:
            grid = prediction_grid(dataset, rows, cfg.logging.images)
            logger.image("eval/predictions", grid, step)
            cv2.imwrite(str(logger.run_dir / "predictions.png"), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    return broadcast_object(stats)


def prediction_grid(dataset, rows: np.ndarray, count: int, min_score: float = 0.3) -> np.ndarray:  # noqa: ANN001
    """The first `count` validation images with true boxes (white; crowd regions left out) and predictions above
    min_score (class colours)."""
    tiles = []
    for image_id in dataset.ids[:count]:
        image = draw_true_boxes(dataset._load_image(image_id), dataset.targets[image_id][0])
        mine = rows[(rows[:, 0] == image_id) & (rows[:, 5] >= min_score)]
        xyxy = np.concatenate([mine[:, 1:3], mine[:, 1:3] + mine[:, 3:5]], 1)
        classes = [dataset.category_to_class[int(c)] for c in mine[:, 6]]
        tiles.append(draw_boxes(image, xyxy, np.array(classes, int), dataset.class_names, mine[:, 5]))
    return image_grid(tiles)


def main(argv: list[str] | None = None) -> dict:  # noqa: C901 (one sequence, phase by phase)
    """Parse, set up, train, evaluate, save; returns the run folder, the final state and a weights checksum."""
    args = build_parser().parse_args(argv)
    rank, world, local_rank = init_distributed()
    setup_console_logging(rank == 0)
    main_process = rank == 0

    # -- config: a resumed run keeps its own config (plus --set), a new one reads --config --------------------
    if args.name:
        args.overrides.append(f"logging.name={args.name}")
    try:
        resumed = load_checkpoint(args.resume) if args.resume else None
        fixed = [o for o in args.overrides if o.split("=", 1)[0].strip().startswith(RESUME_FIXED)]
        if resumed and fixed:  # the weights and the optimiser state are shaped by these: load_state_dict would fail
            raise SystemExit(f"error: --resume {args.resume} --set {' '.join(fixed)}: a resumed run keeps its "
                             "model.* and train.optimizer settings (its weights and optimiser state are shaped by "
                             "them); start a new run to train a changed model")
        cfg = config_from_dict(resumed["config"], str(args.resume), args.overrides) if resumed else \
            load_config(args.config, args.overrides)
        device = pick_device(args, local_rank)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e

    # -- data ----------------------------------------------------------------------------------------------------
    try:
        train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    except (DatasetError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e
    if cfg.eval.subset:
        val_set.ids = val_set.ids[:cfg.eval.subset]
    if len(train_set.class_names) != cfg.model.num_classes:
        raise SystemExit(f"error: {train_set.ann_file} has {len(train_set.class_names)} categories but "
                         f"model.num_classes is {cfg.model.num_classes}; set --set model.num_classes="
                         f"{len(train_set.class_names)}")
    if cfg.train.micro_batch_size % world:
        raise SystemExit(f"error: the micro-batch (train.batch_size / train.subdivisions = "
                         f"{cfg.train.micro_batch_size}) must divide over {world} processes")
    train_loader = build_loader(cfg, train_set, True, cfg.train.micro_batch_size // world, device, world > 1)
    val_loader = build_loader(cfg, val_set, False, cfg.eval.batch_size, device, world > 1)
    if len(train_loader.batch_sampler) == 0:
        raise SystemExit(f"error: {len(train_set)} training images make no full micro-batch of "
                         f"{cfg.train.micro_batch_size // world}")

    # -- model, loss, optimiser, schedule, precision, EMA ---------------------------------------------------------
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.arch, cfg.model.encoder, cfg.model.num_classes, cfg.model.anchors,
                        cfg.model.pretrained and resumed is None, cfg.model.pretrained_path)
    if args.weights and resumed is None:
        try:
            log.info("%s: loaded the %s", args.weights, load_start_weights(model, args.weights))
        except (CheckpointError, ValueError, FileNotFoundError) as e:  # a file that does not fit this model
            raise SystemExit(f"error: --weights: {e}") from e
    if cfg.train.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device, memory_format=torch.channels_last)  # NHWC convs: faster with oneDNN (CPU) and cuDNN (AMP)
    loss_fn = build_loss(model, cfg.loss)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    amp_dtype = autocast_dtype(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = ModelEMA(model, cfg.train.ema_decay) if cfg.train.ema else None
    state = TrainState()
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        if ema and resumed.get("ema"):
            ema.load_state_dict(resumed["ema"])
        state = TrainState(**resumed["state"])
        set_rng_state(resumed["rng"])
    train_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model

    # -- run folder and logs ----------------------------------------------------------------------------------------
    if resumed:
        run_dir = args.resume.parent
    else:
        run_dir = Path(cfg.logging.dir) / f"{time.strftime('%y%m%d-%H%M%S')}_{cfg.logging.name}"
        run_dir = Path(broadcast_object(str(run_dir)))
        if main_process:
            run_dir.mkdir(parents=True, exist_ok=False)
            save_config(cfg, run_dir / "args.yaml")
    logger = RunLogger(run_dir, main_process, state.step)
    log.info("run %s | %s/%s, %d classes | %d train, %d val images | device %s x %d | step %d of %d",
             run_dir, cfg.model.arch, cfg.model.encoder, cfg.model.num_classes, len(train_set), len(val_set),
             device, world, state.step, cfg.train.steps)

    def checkpoint(name: str) -> None:
        if main_process:
            try:
                save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict() if ema else None,
                                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                 "scaler": scaler.state_dict(), "state": asdict(state), "config": config_to_dict(cfg),
                                 "rng": rng_state()}, run_dir / name)
            except CheckpointError as e:
                raise SystemExit(f"error: training stopped at step {state.step}: {e}") from e

    stop: list[int] = []  # the signal that asked to stop; the step in progress finishes, then last.pt is written
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda s, _frame: stop.append(s))

    # -- the loop --------------------------------------------------------------------------------------------------
    batches = micro_batches(train_loader, state, device)
    # the bar on a terminal; in a file (nohup_0.out) the log lines every logging.every steps are the progress
    progress = tqdm(total=cfg.train.steps, initial=state.step, disable=not main_process or not sys.stderr.isatty(),
                    desc="train", unit="step", dynamic_ncols=True)
    window = {"start": time.perf_counter(), "data": 0.0, "images": 0}
    bad_steps = BadStepCounter(cfg.train.max_bad_steps, run_dir / "last.pt")
    while state.step < cfg.train.steps and not stop:
        start = time.perf_counter()
        step_batches = [next(batches) for _ in range(cfg.train.subdivisions)]
        window["data"] += time.perf_counter() - start
        window["images"] += sum(len(images) for images, _ in step_batches) * world
        result = train_step(train_model, loss_fn, step_batches, optimizer, scaler, amp_dtype,
                            cfg.train.clip_grad_norm)
        if diverged := bad_steps.update(state.step + 1, result, scheduler.get_last_lr()[0]):
            raise SystemExit(f"error: {diverged}")  # no last.pt is written: the one on disk is the last good state
        scheduler.step()
        if ema and not result.skipped:
            ema.update(model)
        state.step += 1
        state.skipped_steps += result.skipped
        progress.update()
        progress.set_postfix(loss=f"{result.losses['total']:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")

        if state.step % cfg.logging.every == 0 or state.step == cfg.train.steps:
            seconds = time.perf_counter() - window["start"]
            memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else \
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            scalars = {**{f"loss/{k}": v for k, v in result.losses.items()}, "lr": scheduler.get_last_lr()[0],
                       "grad_norm": result.grad_norm, "speed/images_per_s": window["images"] / seconds,
                       "speed/data_fraction": window["data"] / seconds, "memory_gb": memory / 2**30,
                       "skipped_steps": state.skipped_steps, "skipped_images": state.skipped_images}
            logger.scalars(scalars, state.step)
            log.info("step %d/%d | loss %.4f (xy %.3f wh %.3f obj %.3f cls %.3f) | lr %.2e | grad %.2f | "
                     "%.1f img/s, data %.0f%% | skipped %d steps, %d images", state.step, cfg.train.steps,
                     result.losses["total"], result.losses["xy"], result.losses["wh"], result.losses["obj"],
                     result.losses["cls"],
                     scalars["lr"], result.grad_norm, scalars["speed/images_per_s"],
                     100 * scalars["speed/data_fraction"], state.skipped_steps, state.skipped_images)
            window = {"start": time.perf_counter(), "data": 0.0, "images": 0}
        if state.step % cfg.train.checkpoint_every == 0:
            checkpoint("last.pt")
        if state.step % cfg.eval.every == 0 or state.step == cfg.train.steps:
            stats = evaluate_run(ema.module if ema else model, val_loader, cfg, device, logger, state.step)
            metric = stats[cfg.eval.metric]
            log.info("eval at step %d | %s", state.step, " ".join(f"{k} {stats[k]:.4f}" for k in COCO_STATS))
            if metric > state.best_metric:
                state.best_metric, state.best_step, state.evals_without_improvement = metric, state.step, 0
                checkpoint("best.pt")
            else:
                state.evals_without_improvement += 1
            if cfg.train.patience and state.evals_without_improvement >= cfg.train.patience:
                log.info("early stop: %s has not improved for %d evaluations (best %.4f at step %d)",
                         cfg.eval.metric, cfg.train.patience, state.best_metric, state.best_step)
                break
            model.train()
    progress.close()
    checkpoint("last.pt")
    if stop:
        log.info("stopped by signal %d at step %d; resume with --resume %s", stop[0], state.step, run_dir / "last.pt")
    log.info("done: step %d, best %s %.4f at step %d, run folder %s", state.step, cfg.eval.metric,
             state.best_metric, state.best_step, run_dir)
    logger.close()
    cleanup()
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    return {"run_dir": run_dir, "state": asdict(state), "weights_checksum": checksum}


if __name__ == "__main__":
    try:
        main()
    except LoaderError as e:  # an unreadable image, a dead or hung DataLoader worker: a message, not a traceback
        raise SystemExit(f"error: {e}") from e
