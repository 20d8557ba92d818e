"""Train YOLOv3 on COCO or any COCO-format dataset.

    nohup python main.py --gpu 0 > nohup_0.out &                     # one GPU, args.yaml as it is
    python main.py --device cpu --set data.root=data/shapes ...
    python main.py --set data.root=path/to/roboflow/data.yaml                # YOLO / VOC layouts: datasets/formats.py
    python main.py --resume logs/<run>/last.pt                       # continue a run exactly where it stopped
    torchrun --nproc_per_node=4 main.py                              # DDP over 4 GPUs (train.batch_size is global)

A run folder logs/<YYmmdd-HHMMSS>_<name>/ receives last.pt (every train.checkpoint_every steps, at the end and on
SIGINT/SIGTERM), best.pt (best eval.metric), the resolved args.yaml, TensorBoard events, evals.jsonl,
predictions.png (the latest evaluation's first validation images: true boxes white, predictions in class colours),
and, from the start, dataset_report.txt and labels.png (datasets/report.py).

The path of one training image: datasets/loader.py (decode, augment, letterbox, batch) -> engine/train.py
micro_batches -> train_one_step -> train_step (models/yolo.py forward, models/loss.py, backward, update). Of one
validation image: engine/evaluate.py evaluate -> detect_batch (the model decodes, models/postprocess.py) ->
datasets/coco_eval.py (pycocotools).
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import torch

from datasets.anchors import box_sizes, check_anchors
from datasets.coco import CocoDetection, DatasetError
from datasets.coco_names import COCO_NAMES
from datasets.eval_curves import best_threshold_line, write_evaluation_plots
from datasets.loader import LoaderError, build_loader, dataset_for_model
from datasets.report import dataset_report
from engine.budget import TimeBudget, fit_to_time
from engine.evaluate import EvalResult, evaluate, evaluation_form, prediction_grid
from engine.merge import keep_start, save_start
from engine.progress import Progress
from engine.state import Trainer
from engine.train import BadStepCounter, micro_batches, train_one_step
from models import build_model
from models.transfer import start_from
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from utils.cli import add_config_args, training_device
from utils.config import COCO_STATS, Config, ConfigError
from utils.config_load import config_from_dict, load_config, save_config
from utils.distributed import broadcast_object, cleanup, init_distributed, is_distributed
from utils.logger import RunLogger, log, setup_console_logging
from utils.recipe import choose_recipe

RESUME_FIXED = ("model.", "train.optimizer")  # config keys a resumed run cannot change (--set on --resume)


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


def resolve_config(args: argparse.Namespace) -> tuple[Config, dict | None]:
    """A resumed run's own config (plus --set) and its checkpoint, or --config (plus --set) and None."""
    if args.name:
        args.overrides.append(f"logging.name={args.name}")
    resumed = load_checkpoint(args.resume) if args.resume else None
    if resumed is None:
        return load_config(args.config, args.overrides), None
    fixed = [o for o in args.overrides if o.split("=", 1)[0].strip().startswith(RESUME_FIXED)]
    if fixed:  # the weights and the optimiser state are shaped by these: load_state_dict would fail
        raise SystemExit(f"error: --resume {args.resume} --set {' '.join(fixed)}: a resumed run keeps its "
                         "model.* and train.optimizer settings (its weights and optimiser state are shaped by "
                         "them); start a new run to train a changed model")
    return config_from_dict(resumed["config"], str(args.resume), args.overrides), resumed


def training_sets(cfg: Config) -> tuple[CocoDetection, CocoDetection]:
    """The training and validation sets; a dataset that does not fit the config stops with one line."""
    try:
        return dataset_for_model(cfg, "train"), dataset_for_model(cfg, "val")
    except (DatasetError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e


def training_loaders(cfg: Config, train_set: CocoDetection, val_set: CocoDetection, world: int, device: torch.device
                     ) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """The training loader (this rank's share of each micro-batch) and the validation loader."""
    if cfg.train.micro_batch_size % world:
        raise SystemExit(f"error: the micro-batch (train.batch_size / train.subdivisions = "
                         f"{cfg.train.micro_batch_size}) must divide over {world} processes")
    train_loader = build_loader(cfg, train_set, True, cfg.train.micro_batch_size // world, device, world > 1)
    val_loader = build_loader(cfg, val_set, False, cfg.eval.batch_size, device, world > 1)
    if len(train_loader.batch_sampler) == 0:
        raise SystemExit(f"error: {len(train_set)} training images make no full micro-batch of "
                         f"{cfg.train.micro_batch_size // world}")
    return train_loader, val_loader


def fit_to_data(cfg: Config, train_set: CocoDetection) -> Config:
    """cfg with model.num_classes from the data when unset (a set one must match it) and model.anchors checked
    against the training boxes at data.img_size, "auto" resolved (datasets/anchors.py): what the checkpoint keeps."""
    names = train_set.class_names  # a model.num_classes set by hand was checked against them (dataset_for_model)
    wh, _ = box_sizes(train_set.coco.dataset, train_set.targets, {}, cfg.data.img_size)
    anchors = check_anchors(wh, cfg.model.arch, cfg.model.anchors, cfg.train.seed)
    model = cfg.model.model_copy(update={"num_classes": len(names), "anchors": anchors})
    return cfg.model_copy(update={"model": model})


def report_data(train_set: CocoDetection, val_set: CocoDetection, model: torch.nn.Module, cfg: Config,
                logger: RunLogger) -> None:
    """The dataset report (datasets/report.py) to the log, the run folder and TensorBoard."""
    text, image = dataset_report({"train": train_set, "val": val_set}, model.anchors.cpu().numpy(),
                                 cfg.data.img_size, cfg.data.min_box_size, logger.run_dir)
    log.info("%s", text)
    logger.text("data/report", text, 0)
    logger.image("data/labels", image, 0)


def recipe_for(cfg: Config, args: argparse.Namespace, train_images: int) -> Config:
    """A new run's config with train.recipe resolved (utils/recipe.py); the log line says which and why."""
    try:
        cfg, line = choose_recipe(cfg, args.overrides, bool(args.weights) or cfg.model.pretrained, train_images)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from e
    log.info(line)
    return cfg


def build_start_model(cfg: Config, args: argparse.Namespace, resumed: bool, world: int, names: list[str]
                      ) -> tuple[torch.nn.Module, bool]:
    """The model of cfg.model (SyncBatchNorm under DDP with train.sync_bn), a new run's started from --weights or,
    for the darknet53 encoder, model.pretrained_path: any class count, classes matched by name (models/transfer.py;
    Darknet files hold COCO's 80); and whether a whole trained model started it."""
    torch.manual_seed(cfg.train.seed)
    darknet_file = cfg.model.pretrained_path if cfg.model.pretrained and cfg.model.encoder == "darknet53" else None
    source = None if resumed else args.weights or darknet_file
    model = build_model(cfg.model.arch, cfg.model.encoder, cfg.model.num_classes, cfg.model.anchors,
                        cfg.model.pretrained and not resumed and darknet_file is None, cfg.model.pretrained_path)
    transfer = None
    if source:
        try:
            transfer = start_from(model, source, names, COCO_NAMES)
            log.info("start from %s", transfer)
        except (CheckpointError, ValueError, FileNotFoundError) as e:  # a file that does not fit this model
            raise SystemExit(f"error: {'--weights' if args.weights else 'model.pretrained_path'}: {e}") from e
    if cfg.train.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, transfer is not None and not transfer.note  # heads and all, not a backbone prefix


def make_run_dir(cfg: Config, resume: Path | None, main_process: bool) -> Path:
    """The resumed run's folder, or a new logs/<YYmmdd-HHMMSS>_<name>/ (rank 0's name on every rank) holding the
    resolved args.yaml."""
    if resume:
        return resume.parent
    name = f"{time.strftime('%y%m%d-%H%M%S')}_{cfg.logging.name}"
    run_dir = Path(broadcast_object(str(Path(cfg.logging.dir) / name)))
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=False)
        save_config(cfg, run_dir / "args.yaml")
    return run_dir


def log_evaluation(result: EvalResult, val_loader: torch.utils.data.DataLoader, cfg: Config, logger: RunLogger,
                   step: int) -> None:
    """An evaluation's numbers to the log, TensorBoard and evals.jsonl, and its pictures to the run folder:
    predictions.png and datasets/eval_curves.py's PR curves, threshold curves and confusion matrix."""
    log.info("eval at step %d | %s", step, " ".join(f"{k} {result.stats[k]:.4f}" for k in COCO_STATS))
    if not logger.enabled:
        return
    logger.scalars({f"eval/{k}": v for k, v in result.stats.items()}, step)
    pictures, plots = write_evaluation_plots(result.rows, result.pr50, val_loader.dataset, cfg.detect.conf_threshold,
                                             logger.run_dir)  # pr_curve.png, threshold_curves.png, confusion_matrix*
    log.info("eval at step %d | %s", step, best_threshold_line(plots))
    for name, picture in pictures.items():
        logger.image(f"eval/{name}", picture, step)
    logger.evaluation({"stats": result.stats, "per_class_ap50": {k: None if np.isnan(v) else v
                                                                 for k, v in result.per_class_ap50.items()},
                       "plots": plots}, step)
    if cfg.logging.images:
        grid = prediction_grid(val_loader.dataset, result.rows, cfg.logging.images)
        logger.image("eval/predictions", grid, step)
        cv2.imwrite(str(logger.run_dir / "predictions.png"), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))


def main(argv: list[str] | None = None) -> dict:
    """Parse, set up, train, evaluate, save; returns the run folder, the final state and the trained model."""
    started, args = time.perf_counter(), build_parser().parse_args(argv)
    rank, world, local_rank = init_distributed()
    setup_console_logging(rank == 0)
    main_process = rank == 0

    # -- config: a resumed run keeps its own config (plus --set), a new one reads --config --------------------
    try:
        cfg, resumed = resolve_config(args)
        device = training_device(args.device == "cpu", args.gpu, local_rank, is_distributed())
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e

    # -- data, and the recipe it calls for (a resumed run keeps the one its checkpoint's config resolved) ------------
    train_set, val_set = training_sets(cfg)
    cfg = fit_to_data(cfg, train_set)
    if resumed is None:
        cfg = recipe_for(cfg, args, len(train_set))
    train_loader, val_loader = training_loaders(cfg, train_set, val_set, world, device)

    # -- model, loss, optimiser, schedule, precision, EMA ---------------------------------------------------------
    model, started_from_weights = build_start_model(cfg, args, resumed is not None, world, train_set.class_names)
    model.to(device, memory_format=torch.channels_last)  # NHWC convs: faster with oneDNN (CPU) and cuDNN (AMP)
    trainer = Trainer.build(model, cfg, device, train_set.class_names)
    if resumed:
        trainer.load_state_dict(resumed)
    state = trainer.state
    train_model = torch.nn.parallel.DistributedDataParallel(  # a frozen encoder's parameters get no gradient
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=cfg.train.freeze != "none") if world > 1 else model

    # -- run folder and logs ----------------------------------------------------------------------------------------
    run_dir = make_run_dir(cfg, args.resume, main_process)
    logger = RunLogger(run_dir, main_process, state.step)
    if main_process and not resumed:
        report_data(train_set, val_loader.dataset, model, cfg, logger)
    eval_form = evaluation_form(trainer.eval_model, cfg.eval.amp, cfg.data.img_size, device)
    log.info("run %s | %s/%s, %d classes | %d train, %d val images, %d loader workers | device %s x %d | step %d of "
             "%d | training in %s, evaluating in %s", run_dir, cfg.model.arch, cfg.model.encoder,
             cfg.model.num_classes, len(train_set), len(val_loader.dataset), train_loader.num_workers, device, world,
             state.step, trainer.steps,
             str(trainer.amp_dtype or torch.float32).removeprefix("torch."), eval_form)

    def checkpoint(name: str) -> float:
        start = time.perf_counter()
        if main_process:
            try:
                save_checkpoint(trainer.state_dict(), run_dir / name)
            except CheckpointError as e:
                raise SystemExit(f"error: training stopped at step {state.step}: {e}") from e
        return time.perf_counter() - start

    evaluations: list[EvalResult] = []

    def evaluation_step(result: EvalResult | None = None) -> bool:
        evaluation = result or evaluate(trainer.eval_model, val_loader, cfg.eval, device, eval_form.dtype,
                                        progress=False)
        evaluations.append(evaluation)
        log_evaluation(evaluation, val_loader, cfg, logger, state.step)
        best, patience_out = state.record_evaluation(evaluation.stats[cfg.eval.metric], cfg.train.patience)
        if best:
            checkpoint("best.pt")
        return patience_out  # True: stop early

    if started_from_weights and state.step == 0:  # what the start scores: best.pt keeps it unless training beats it
        evaluation_step()
    keep = cfg.train.keep_start and started_from_weights  # a whole trained model: its step-0 score means something
    if keep and main_process and state.step == 0:  # the start, for the end's mix (a resumed run reads it back)
        save_start(trainer, evaluations[0], run_dir / "start.pt")
    stop: list[int] = []  # the signal that asked to stop; the step in progress finishes, then last.pt is written
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda s, _frame: stop.append(s))

    # -- the loop: step, divergence check, log, checkpoint, evaluate ------------------------------------------------
    batches = micro_batches(train_loader, state, device)
    progress = Progress(trainer, logger, device, bar=main_process and sys.stderr.isatty())
    bad_steps = BadStepCounter(cfg.train.max_bad_steps, run_dir / "last.pt")
    budget = (TimeBudget(cfg.train.time_limit, started, train_loader.batch_sampler.step_sizes)
              if cfg.train.time_limit and not resumed else None)
    while state.step < trainer.steps and not stop:
        result = train_one_step(trainer, train_model, batches)
        if diverged := bad_steps.update(state.step, result):
            raise SystemExit(f"error: {diverged}")  # no last.pt is written: the one on disk is the last good state
        if budget and budget.after_step(state.step, result.size, state.planned_steps is not None):
            fit_to_time(budget, trainer, val_loader, device, eval_form.dtype, checkpoint("last.pt"), 4 if keep else 1)
        progress.update(result)
        if state.step % cfg.train.checkpoint_every == 0:
            checkpoint("last.pt")
        if (state.step % cfg.eval.every == 0 or state.step == trainer.steps) and evaluation_step():
            log.info("early stop: %s has not improved for %d evaluations (best %.4f at step %d)",
                     cfg.eval.metric, cfg.train.patience, state.best_metric, state.best_step)
            break
    progress.close()
    if keep and not stop and state.step == trainer.steps:
        keep_start(trainer, model, run_dir / "start.pt", evaluations[-1],
                   lambda: evaluate(trainer.eval_model, val_loader, cfg.eval, device, eval_form.dtype, progress=False),
                   cfg.eval.metric, evaluation_step)
    checkpoint("last.pt")
    if stop:
        log.info("stopped by signal %d at step %d; resume with --resume %s", stop[0], state.step, run_dir / "last.pt")
    log.info("done: step %d, best %s %.4f at step %d, run folder %s", state.step, cfg.eval.metric,
             state.best_metric, state.best_step, run_dir)
    logger.close()
    cleanup()
    return {"run_dir": run_dir, "state": asdict(state), "model": model}


if __name__ == "__main__":
    try:
        main()
    except LoaderError as e:  # an unreadable image, a dead or hung DataLoader worker: a message, not a traceback
        raise SystemExit(f"error: {e}") from e
