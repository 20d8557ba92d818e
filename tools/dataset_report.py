"""The dataset report training prints at its start (datasets/report.py), for any layout data.root holds (COCO, a
YOLO / Roboflow data.yaml or its folder, a Pascal VOC folder), with how the model's anchors fit the training boxes.

    python -m tools.dataset_report --set data.root=path/to/data.yaml            # logs/dataset_report/
    python -m tools.dataset_report --set data.root=VOCdevkit/VOC2012 model.arch=yolov3-tiny --out report/
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from datasets.anchors import anchor_fit, box_sizes
from datasets.coco import DatasetError
from datasets.formats import prepare_data
from datasets.loader import build_dataset
from datasets.report import LABELS_FILE, REPORT_FILE, dataset_report
from models.tables import DARKNET_ANCHORS
from utils.cli import add_config_args, parse_cli


def main(argv: list[str] | None = None) -> str:
    """Read every split of the configured data, print the report, write it and labels.png; returns the text."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--out", type=Path, default=Path("logs") / "dataset_report",
                        help=f"folder for {REPORT_FILE} and {LABELS_FILE} (default: logs/dataset_report)")
    args, cfg, _ = parse_cli(parser, argv)
    try:
        test = prepare_data(cfg.data.root, cfg.data.skip_bad_images).splits.get("test")
        splits = ("train", "val", "test") if test and test[1].is_file() else ("train", "val")  # test: optional
        sets = {split: build_dataset(cfg, split) for split in splits}
    except (DatasetError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e
    given = cfg.model.anchors
    anchors = np.array(DARKNET_ANCHORS[cfg.model.arch] if given is None or isinstance(given, str) else given, float)
    text, _ = dataset_report(sets, anchors, cfg.data.img_size, cfg.data.min_box_size, args.out)
    wh, _ = box_sizes(sets["train"].coco.dataset, sets["train"].targets, {}, cfg.data.img_size)
    text += f"\nanchors of {cfg.model.arch}: {anchor_fit(wh, anchors, cfg.model.arch)}"
    print(f"{text}\nwrote {args.out / REPORT_FILE} and {args.out / LABELS_FILE}")
    return text


if __name__ == "__main__":
    main()
