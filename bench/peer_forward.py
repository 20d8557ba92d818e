"""The model time of validation.py against pytorchyolo's (eriklindernoren/PyTorch-YOLOv3, `pip install pytorchyolo`)
forward, on the same letterboxed images, the same Darknet weights, in one process and alternating rounds.

    pip install --no-deps pytorchyolo   # its model module only; its training augmentation (imgaug) is not needed
    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 .venv/bin/python bench/peer_forward.py \\
        --data data/coco_mini --weights yolov3-tiny.weights --cfg yolov3-tiny.cfg [--size 416] [--rounds 5]

Ours: the weights loaded as validation.py loads them, BN fused, in the form models/forms.py's probe picks on this
machine (what validation.py prints as its "inference form"), under inference_mode. pytorchyolo: `load_model(cfg,
weights)` in eval mode under torch.no_grad() in fp32, as its test.py / detect.py run it (they have no other form).
Both see the images of --data's val2017, letterboxed to --size, in batches of --batch (pytorchyolo's test.py
evaluates in batches of 8), converted before timing as each loader gives them: float [0, 1] for pytorchyolo, uint8
for ours (the model normalises, inside the timed forward). One call is one pass over all images; the two
alternate as bench/deploy.py alternating_ms times them (per round: a pause, an untimed pass, BURST timed passes);
the figure is ms per image, the median of the timed passes, and the ratio of the medians.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import types
from pathlib import Path

import cv2
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import add_data_argument, checked_data, machine  # noqa: E402
from bench.deploy import alternating_ms  # noqa: E402
from inference import letterbox_batch  # noqa: E402
from models.forms import choose_form  # noqa: E402
from models.transfer import load_model  # noqa: E402
from utils.config_load import load_config  # noqa: E402


def peer_model(cfg: Path, weights: Path) -> torch.nn.Module:
    """pytorchyolo's Darknet model of `cfg` with `weights`, in eval mode. Its package imports imgaug at the top of
    pytorchyolo.utils.utils for its training augmentation only; a stub stands in where imgaug is not installed."""
    try:
        import imgaug  # noqa: F401
    except ImportError:
        sys.modules["imgaug"] = types.ModuleType("imgaug")
    try:
        from pytorchyolo.models import load_model as load_peer
    except ImportError as error:
        raise SystemExit(f"error: pytorchyolo is not installed ({error}): pip install --no-deps pytorchyolo") from None
    return load_peer(str(cfg), str(weights)).eval()


def batches(data: Path, size: int, batch: int) -> list[torch.Tensor]:
    """val2017's images letterboxed to (B, 3, size, size) uint8 in batches of `batch`."""
    paths = sorted((data / "images" / "val2017").glob("*.jpg"))
    if not paths:
        raise SystemExit(f"error: --data {data}: no .jpg under images/val2017")
    images = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]
    return [letterbox_batch(images[i:i + batch], size)[0] for i in range(0, len(images), batch)]


def main() -> None:
    """Load both models, time alternating passes, print the table row."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--weights", type=Path, required=True, help="a Darknet .weights file (yolov3-tiny's)")
    parser.add_argument("--cfg", type=Path, required=True, help="its Darknet .cfg, for pytorchyolo")
    parser.add_argument("--arch", default="yolov3-tiny", choices=["yolov3-tiny", "yolov3"])
    parser.add_argument("--size", type=int, default=416)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    data = Path(checked_data(args.data))
    peer = peer_model(args.cfg, args.weights)
    cfg = load_config(ROOT / "args.yaml", [f"model.arch={args.arch}"])
    ours, form = choose_form(load_model(args.weights, cfg)[0].fuse(), torch.device("cpu"), args.size)
    inputs = batches(data, args.size, args.batch)
    peer_inputs = [x.float() / 255 for x in inputs]
    images = sum(len(x) for x in inputs)

    def run_ours() -> None:
        with torch.inference_mode(), form.autocast(torch.device("cpu")):
            for x in inputs:
                ours(x)

    def run_peer() -> None:
        with torch.no_grad():
            for x in peer_inputs:
                peer(x)
    ms = alternating_ms({"ours": run_ours, "pytorchyolo": run_peer}, args.rounds)
    median = {name: statistics.median(v) / images for name, v in ms.items()}
    print(machine(torch.device("cpu")))
    print(f"ours: {form}")
    print("| model, size, batch | images | validation.py's form, ms / image | pytorchyolo fp32, ms / image | ratio |\n"
          "|---|---|---|---|---|")
    print(f"| {args.arch}, {args.size}, {args.batch} | {images} | {median['ours']:.2f} | {median['pytorchyolo']:.2f} | "
          f"**{median['pytorchyolo'] / median['ours']:.2f}x** |")


if __name__ == "__main__":
    main()
