"""Your own data, fine-tuned in the time you have: YOLOv3-tiny trained with train.time_limit from scratch, from the
backbone prefix (yolov3-tiny.conv.15, cut from the full file) and from the full COCO-trained file, scored by
pycocotools on held-out images (the run's last evaluation = its last.pt).

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 \\
        .venv/bin/python bench/own_data.py --data DIR --weights yolov3-tiny.weights --minutes 5

Datasets, under --data: robot_indoor/ (64 train / 21 val photos, 30 classes) and "coco_mini-3", coco_mini/
reduced to person, book and toilet (its 50 train2017 images to train, its 50 val2017 images held out: Darknet's
COCO training left val2017's images out, so the held-out images are new to the full file too).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import machine  # noqa: E402
from models.transfer import cut_prefix  # noqa: E402

COCO3 = ("person", "book", "toilet")
EVAL = re.compile(r"eval at step (\d+) \| AP ([\d.]+) AP50 ([\d.]+)")
FITTED = re.compile(r"fitted (\d+) steps to ([\d.]+) min")


def coco_subset(source: Path, out: Path, names: tuple[str, ...]) -> Path:
    """A COCO-layout folder whose annotation files keep only `names` (images linked, every image kept)."""
    for split in ("train", "val"):
        data = json.loads((source / "annotations" / f"instances_{split}2017.json").read_text())
        keep = {c["id"]: c for c in data["categories"] if c["name"] in names}
        data["categories"] = [keep[i] for i in sorted(keep)]
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] in keep]
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        (out / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
        (out / "images").mkdir(exist_ok=True)
        link = out / "images" / f"{split}2017"
        if not link.exists():
            link.symlink_to((source / "images" / f"{split}2017").resolve())
    return out


def run(root: Path, classes: int, start: Path | None, minutes: float, logs: Path, name: str) -> dict:
    """One time-limited training; its fitted steps, last evaluation and wall minutes."""
    command = [sys.executable, "main.py", "--device", "cpu", *(["--weights", str(start)] if start else []),
               "--set", f"data.root={root}", "model.arch=yolov3-tiny", f"model.num_classes={classes}",
               "data.img_size=320", f"train.time_limit={minutes}", f"logging.dir={logs}", f"logging.name={name}"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    step, ap, ap50 = EVAL.findall(done.stdout)[-1]
    fitted = FITTED.findall(done.stdout)
    transfer = next((line.split(" start from ", 1)[1] for line in done.stdout.splitlines() if " start from " in line),
                    "")
    return {"steps": int(step), "fitted": fitted, "AP": float(ap), "AP50": float(ap50), "minutes": seconds / 60,
            "command": " ".join(command[1:]), "transfer": transfer}


def main() -> None:
    """Cut the prefix, run the six trainings, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, metavar="DIR",
                        help="the folder holding robot_indoor/ and coco_mini/ (COCO-format sets)")
    parser.add_argument("--weights", type=Path, required=True, help="the full COCO-trained yolov3-tiny.weights")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/own_data"))
    parser.add_argument("--datasets", nargs="+", default=["robot_indoor", "coco_mini-3"])
    args = parser.parse_args()
    missing = [name for name in ("robot_indoor", "coco_mini") if not (args.data / name).is_dir()]
    if missing:
        raise SystemExit(f"error: --data {args.data}: no {' or '.join(missing)} folder in it")
    args.work.mkdir(parents=True, exist_ok=True)
    prefix = args.work / "yolov3-tiny.conv.15"
    cut_prefix(args.weights, prefix, "yolov3-tiny")
    sets = {"robot_indoor": (args.data / "robot_indoor", 30),
            "coco_mini-3": (coco_subset(args.data / "coco_mini", args.work / "coco_mini-3", COCO3), len(COCO3))}
    print(machine(torch.device("cpu")))
    print("| data | start | steps fitted | minutes | AP | AP50 |\n|---|---|---|---|---|---|", flush=True)
    rows = []
    for data in args.datasets:
        root, classes = sets[data]
        for label, start in (("scratch", None), ("yolov3-tiny.conv.15", prefix), ("yolov3-tiny.weights", args.weights)):
            r = run(root, classes, start, args.minutes, args.work / "logs", f"{data}_{label.split('.')[0]}")
            rows.append((data, label, r))
            print(f"| {data} | {label} | {r['steps']} | {r['minutes']:.2f} | {r['AP']:.4f} | {r['AP50']:.4f} |",
                  flush=True)
    print()
    for data, label, r in rows:
        print(f"- {data}, {label}: `{r['command']}`; fits {r['fitted']}" + (f"; {r['transfer']}" if r["transfer"]
                                                                             else ""))


if __name__ == "__main__":
    main()
