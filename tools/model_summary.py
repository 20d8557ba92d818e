"""Build the configured model(s) and check them: parameters, GFLOPs, output shapes, BN fusion, Darknet weights.

    python -m tools.model_summary                        # the model in args.yaml
    python -m tools.model_summary --all                  # every arch / encoder
    python -m tools.model_summary --weights yolov3.weights   # also load a Darknet weights file
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from models import ENCODERS, YOLO, build_model
from utils.cli import add_config_args, parse_cli


def variants(arch: str, encoder: str, all_variants: bool) -> list[tuple[str, str]]:
    """The (arch, encoder) pairs to check: the configured one, or every valid pair."""
    if not all_variants:
        return [(arch, encoder)]
    return [(a, e) for a, encoders in ENCODERS.items() for e in encoders]


@torch.inference_mode()
def summarize(model: YOLO, img_size: int, device: torch.device) -> dict[str, float | str]:
    """Parameters, forward GFLOPs (conv + matmul, 2 per multiply-add), output shape, time and fused-vs-unfused diff."""
    model = model.to(device).eval()
    params = sum(p.numel() for p in model.parameters())  # before fusion removes the BN parameters
    x = torch.rand(1, 3, img_size, img_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        reference = model(x)
    start = time.perf_counter()
    model(x)
    seconds = time.perf_counter() - start
    fused = model.fuse()(x)
    return {"params": params, "gflops": counter.get_total_flops() / 1e9,
            "output": "x".join(map(str, reference.shape)), "ms": 1000 * seconds,
            "fuse_diff": (fused - reference).abs().max().item()}


def main() -> None:
    """Parse arguments, build each model, print one row per model."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--all", action="store_true", help="check every arch / encoder, not only the configured one")
    parser.add_argument("--weights", help="Darknet .weights file to load into the configured model first")
    args, cfg, device = parse_cli(parser)
    size = cfg.data.img_size
    print(f"{'arch':12} {'encoder':19} {'params':>11} {'GFLOPs@' + str(size):>11} {'eval output':>13} "
          f"{'ms/img':>8} {'fuse max diff':>14}")
    for arch, encoder in variants(cfg.model.arch, cfg.model.encoder, args.all):
        anchors = cfg.model.anchors if arch == cfg.model.arch and not isinstance(cfg.model.anchors, str) else None
        model = build_model(arch, encoder, cfg.model.num_classes or 80, anchors,  # no data read: COCO's 80 unless set
                            cfg.model.pretrained and encoder == cfg.model.encoder, cfg.model.pretrained_path)
        if args.weights and (arch, encoder) == (cfg.model.arch, cfg.model.encoder):
            print(f"{args.weights}: loaded the {model.load_darknet_weights(args.weights)}")
        row = summarize(model, size, device)
        print(f"{arch:12} {encoder:19} {row['params']:>11,} {row['gflops']:>11.2f} {row['output']:>13} "
              f"{row['ms']:>8.1f} {row['fuse_diff']:>14.2e}")


if __name__ == "__main__":
    main()
