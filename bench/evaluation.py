"""validation.py's time split (data, model, post-processing, COCOeval) on a COCO-format val set.

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 \\
        .venv/bin/python bench/evaluation.py [--root ../shared/data/coco_mini] [--size 416] [--arch yolov3]

Two score distributions, both from an untrained model (the trained weights cannot be downloaded here):
- "priors": as initialised, objectness ~0.01 x class ~1/81, so almost nothing passes conf 0.001;
- "worst case": objectness and class biases raised so that all 10,647 x 80 scores per image pass 0.001, the load
  that eval.max_candidates bounds.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.loader import build_dataset, build_loader  # noqa: E402
from models import build_model  # noqa: E402
from models.yolo import HeadOutput  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.evaluation import evaluate  # noqa: E402


def main() -> None:
    """Evaluate twice and print one markdown table row per score distribution."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="../shared/data/coco_mini")
    parser.add_argument("--size", type=int, default=416)
    parser.add_argument("--arch", default="yolov3")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    cfg = load_config(Path(__file__).resolve().parents[1] / "args.yaml",
                      [f"data.root={args.root}", f"data.img_size={args.size}", "data.workers=1",
                       f"model.arch={args.arch}"])
    dataset = build_dataset(cfg, "val")
    loader = build_loader(cfg, dataset, train=False, batch_size=args.batch)
    torch.manual_seed(0)
    model = build_model(cfg.model.arch, num_classes=len(dataset.class_names)).fuse()
    print(f"## Evaluation time split, {time.strftime('%Y-%m-%d')}: {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), MALLOC_MMAP_THRESHOLD_="
          f"{os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}")
    print(f"\n{len(dataset)} val images of {args.root}, {args.arch} at {args.size}, batch {args.batch}, 1 loader "
          f"worker, conf {cfg.eval.conf_threshold}, max_candidates {cfg.eval.max_candidates}\n")
    print("| scores | detections | data s | model s | post-processing s | COCOeval s | post / model |")
    print("|---|---|---|---|---|---|---|")
    evaluate(model, loader, cfg.eval, torch.device("cpu"), progress=False)  # warm-up
    for name in ("priors", "worst case"):
        if name == "worst case":
            with torch.no_grad():
                for head in (m for m in model.modules() if isinstance(m, HeadOutput)):
                    head.bias.view(head.num_anchors, -1)[:, 4:] = 5.0  # sigmoid(5) = 0.993: everything passes
        result = evaluate(model, loader, cfg.eval, torch.device("cpu"), progress=False)
        s = result.seconds
        print(f"| {name} | {len(result.rows)} | {s['data']:.2f} | {s['model']:.2f} | {s['postprocess']:.2f} | "
              f"{s['cocoeval']:.2f} | {s['postprocess'] / s['model']:.3f} |")


if __name__ == "__main__":
    main()
