"""validation.py's time split (data, model, post-processing, COCOeval) on a COCO-format val set.

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 \\
        .venv/bin/python bench/evaluation.py --data DIR [--size 416] [--arch yolov3]

Two score distributions, both from an untrained model (the trained weights cannot be downloaded here):
- "priors": as initialised, objectness ~0.01 x class ~1/81, so almost nothing passes conf 0.001;
- "worst case": objectness and class biases raised so that all 10,647 x 80 scores per image pass 0.001, the load
  that eval.max_candidates bounds.
Then the worst case's detections are scored by pycocotools and by faster-coco-eval (same numbers, timed).
`--json F` also writes the headline figures for bench/run.py.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_data_argument, checked_data, emit, machine  # noqa: E402
from datasets.coco_eval import coco_evaluate  # noqa: E402
from datasets.loader import build_dataset, build_loader  # noqa: E402
from engine.evaluate import evaluate  # noqa: E402
from inference import ready_for_inference  # noqa: E402
from models import build_model  # noqa: E402
from models.forms import OPTIONS, Form  # noqa: E402
from models.yolo import HeadOutput  # noqa: E402
from utils.config_load import load_config  # noqa: E402


def run(root: str, size: int, arch: str, batch: int) -> tuple[list[str], dict[str, float]]:
    """Evaluate twice (two score distributions) and compare the COCO backends; markdown lines and figures."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "args.yaml",
                      [f"data.root={root}", f"data.img_size={size}", "data.workers=1", f"model.arch={arch}"])
    dataset = build_dataset(cfg, "val")
    loader = build_loader(cfg, dataset, train=False, batch_size=batch)

    chosen: list[Form] = []

    def validation_model(worst: bool) -> tuple[torch.nn.Module, Form]:
        """The seeded model as validation.py runs it (fused, then in the form its probe picks: the first call's
        pick for every call) and that form; with `worst`, every score above the threshold (head biases set before
        packing, which copies the weights)."""
        torch.manual_seed(0)
        model = build_model(cfg.model.arch, num_classes=len(dataset.class_names)).fuse()
        if worst:
            with torch.no_grad():
                for head in (m for m in model.modules() if isinstance(m, HeadOutput)):
                    head.bias.view(head.num_anchors, -1)[:, 4:] = 5.0  # sigmoid(5) = 0.993: everything passes
        amp, pack = OPTIONS[chosen[0].name] if chosen else ("auto", None)
        model, form = ready_for_inference(model, torch.device("cpu"), size, amp, pack)
        chosen.append(form)
        return model, form

    model, form = validation_model(False)
    evaluate(model, loader, cfg.eval, torch.device("cpu"), form.dtype, progress=False)  # warm-up
    lines = [f"Machine: {machine(torch.device('cpu'))}", "",
             f"{len(dataset)} val images of {root}, {arch} at {size}, batch {batch}, 1 loader worker, conf "
             f"{cfg.eval.conf_threshold}, max_candidates {cfg.eval.max_candidates}; the model in the form "
             f"validation.py picks: {form}", "",
             "| scores | detections | data s | model s | post-processing s | COCOeval s | post / model |",
             "|---|---|---|---|---|---|---|"]
    figures: dict[str, float] = {}
    for name in ("priors", "worst case"):
        model, form = validation_model(worst=name == "worst case")
        result = evaluate(model, loader, cfg.eval, torch.device("cpu"), form.dtype, progress=False)
        s = result.seconds
        lines.append(f"| {name} | {len(result.rows)} | {s['data']:.2f} | {s['model']:.2f} | "
                     f"{s['postprocess']:.2f} | {s['cocoeval']:.2f} | {s['postprocess'] / s['model']:.3f} |")
        figures[f"post_over_model_{name.replace(' ', '_')}"] = s["postprocess"] / s["model"]
    # the same detections through both COCO backends
    lines += ["", f"COCO API on the same {len(result.rows)} detections:", "",
              "| backend | seconds (median of 3) | AP | AP50 |", "|---|---|---|---|"]
    for backend in ("pycocotools", "faster_coco_eval"):
        times, stats = [], {}
        for _ in range(3):
            start = time.perf_counter()
            stats = coco_evaluate(dataset.coco, result.rows, dataset.ids, dataset.class_names, backend)[0]
            times.append(time.perf_counter() - start)
        lines.append(f"| {backend} | {statistics.median(times):.3f} | {stats['AP']:.6f} | {stats['AP50']:.6f} |")
        figures[f"cocoeval_{backend}_s"] = statistics.median(times)
    return lines, figures


def main() -> None:
    """Parse arguments, run, print markdown (and write the figures as JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--size", type=int, default=416)
    parser.add_argument("--arch", default="yolov3")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", help="also write the headline figures to this JSON file")
    args = parser.parse_args()
    lines, figures = run(checked_data(args.data), args.size, args.arch, args.batch)
    emit(lines, figures, args.json)


if __name__ == "__main__":
    main()
