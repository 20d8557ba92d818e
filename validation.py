"""COCO evaluation of a training checkpoint (.pt) or a Darknet .weights file with the official COCO API.

    python validation.py --weights logs/<run>/best.pt
    python validation.py --weights models/weights/yolov3.weights --img-size 608 --conf 0.001 0.01 0.1 0.5
    python validation.py --weights W --subset 500 --per-class --save-json

A .pt checkpoint brings its own model config; a .weights file is read into the model of args.yaml's `model:`
section. The data and the post-processing come from the config (`data:`, `eval:`) and the options below. Results
are written next to the weights (or into --out): <stem>_val<size>.json with every number, the pictures
<stem>_val<size>_{pr_curve,threshold_curves,confusion_matrix,confusion_matrix_normalized}.png (not with --no-plots),
and with --save-json the detections in the COCO results format.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from datasets.coco import DatasetError
from datasets.coco_eval import coco_evaluate, rows_to_json, save_json
from datasets.eval_curves import best_threshold_line, write_evaluation_plots
from datasets.loader import LoaderError, build_loader, dataset_for_model
from engine.evaluate import evaluate
from inference import add_speed_args, amp_mode, tool_ready_for_inference
from models.transfer import load_model
from utils.checkpoint import CheckpointError
from utils.cli import add_config_args, cli_config
from utils.config_load import config_to_dict


def build_parser() -> argparse.ArgumentParser:
    """The command line: config options plus the evaluation's own."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--weights", required=True, type=Path, help="checkpoint (.pt) or Darknet .weights file")
    parser.add_argument("--img-size", type=int, help="input size (default: data.img_size)")
    parser.add_argument("--conf", type=float, nargs="+", help="score threshold(s); several print an AP/AP50 table "
                        "per threshold (default: eval.conf_threshold)")
    parser.add_argument("--subset", type=int, help="evaluate the first N validation images (default: eval.subset)")
    parser.add_argument("--save-json", action="store_true", help="also write the detections (COCO results format)")
    parser.add_argument("--per-class", action="store_true", help="print AP50 per class")
    parser.add_argument("--out", type=Path, help="folder for the result files (default: next to --weights)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PR curves, P/R/F1 against the threshold and "
                        "the confusion matrix (at detect.conf_threshold)")
    parser.add_argument("--no-fuse", action="store_true", help="keep BatchNorm separate (default: fused)")
    add_speed_args(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Evaluate, print the COCO table(s), write the result files."""
    args = build_parser().parse_args(argv)
    # the options are shorthands for config keys, so the config's checks and messages apply to them
    for key, value in (("data.img_size", args.img_size), ("eval.subset", args.subset),
                       ("eval.conf_threshold", min(args.conf) if args.conf else None)):
        if value is not None:
            args.overrides.append(f"{key}={value}")
    cfg, device = cli_config(args)
    if args.conf and max(args.conf) >= 1:
        raise SystemExit(f"error: --conf {max(args.conf)}: thresholds must be in [0, 1)")
    try:
        model, cfg = load_model(args.weights, cfg)
        dataset = dataset_for_model(cfg, "val", model=str(args.weights))
    except (CheckpointError, DatasetError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    names = getattr(model, "class_names", None)  # a checkpoint's: the data must hold the same classes, in order
    if names is not None and list(names) != dataset.class_names:
        raise SystemExit(f"error: {args.weights} was trained on classes {names[:10]}{' ...' * (len(names) > 10)} but "
                         f"{dataset.ann_file} holds {dataset.class_names[:10]}{' ...' * (len(names) > 10)}; point "
                         "data.root at the model's data")
    if not args.no_fuse:
        model.fuse()
    loader = build_loader(cfg, dataset, train=False, batch_size=cfg.eval.batch_size, device=device)
    model, form = tool_ready_for_inference(model, device, cfg.data.img_size, amp_mode(args.amp, cfg.eval.amp, device),
                                           args.pack, args.compile)
    try:
        result = evaluate(model, loader, cfg.eval, device, form.dtype)
    except LoaderError as e:
        raise SystemExit(f"error: {e}") from e

    print(result.table)
    seconds = " ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    print(f"{args.weights} | {cfg.model.arch}/{cfg.model.encoder} @ {cfg.data.img_size} | {len(dataset)} images | "
          f"conf {cfg.eval.conf_threshold} | AP {result.stats['AP']:.4f} AP50 {result.stats['AP50']:.4f} | {seconds} | "
          f"{form.name}")
    by_threshold = {}
    if args.conf and len(args.conf) > 1:
        print(f"\n{'conf':>8} {'detections':>11} {'AP':>7} {'AP50':>7}")
        for threshold in sorted(args.conf):
            # post-processing is monotonic in the threshold: filtering the lowest threshold's output is exact
            rows = result.rows[result.rows[:, 5] > threshold]
            stats, _, _, _ = coco_evaluate(dataset.coco, rows, dataset.ids, dataset.class_names, cfg.eval.backend)
            by_threshold[threshold] = {"detections": len(rows), "AP": stats["AP"], "AP50": stats["AP50"]}
            print(f"{threshold:>8} {len(rows):>11} {stats['AP']:>7.4f} {stats['AP50']:>7.4f}")
    if args.per_class:
        print(f"\n{'class':<20} {'AP50':>7}")
        for name, ap in sorted(result.per_class_ap50.items(), key=lambda kv: -np.nan_to_num(kv[1], nan=-1)):
            print(f"{name:<20} {ap:>7.4f}")

    out = args.out or args.weights.parent
    stem = f"{args.weights.stem}_val{cfg.data.img_size}"
    metrics = {"weights": str(args.weights), "images": len(dataset), "stats": result.stats,
               "per_class_ap50": {k: None if np.isnan(v) else v for k, v in result.per_class_ap50.items()},
               "by_conf": by_threshold, "seconds": result.seconds, "form": str(form), "config": config_to_dict(cfg)}
    if not args.no_plots:
        pictures, metrics["plots"] = write_evaluation_plots(result.rows, result.pr50, dataset,
                                                            cfg.detect.conf_threshold, out, f"{stem}_")
        print(f"{best_threshold_line(metrics['plots'])}\nwrote {', '.join(f'{stem}_{n}.png' for n in pictures)} "
              f"into {out}")
    save_json(metrics, out / f"{stem}.json")
    print(f"wrote {out / f'{stem}.json'}")
    if args.save_json:
        save_json(rows_to_json(result.rows), out / f"{stem}_detections.json")
        print(f"wrote {out / f'{stem}_detections.json'} ({len(result.rows)} detections)")


if __name__ == "__main__":
    main()
