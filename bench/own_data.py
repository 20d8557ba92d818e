"""Your own data, fine-tuned in the time you have: YOLOv3-tiny trained with train.time_limit from scratch, from the
backbone prefix (yolov3-tiny.conv.15, cut from the full file) and from the full COCO-trained file, with the old
defaults and the transfer recipe, scored by pycocotools on held-out images: the start (step-0 evaluation), best.pt
and last.pt (the run's last evaluation).

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 \\
        .venv/bin/python bench/own_data.py --data DIR --weights yolov3-tiny.weights --minutes 5 15
    # a candidate against the recipe by steps, not minutes: --steps 300 --recipes new [--set train.optimizer=adam]

Datasets, under --data (COCO-format folders): robot_indoor/ (64 train / 21 val photos, 30 classes, 15 of them COCO's);
"coco_mini-3", coco_mini/ reduced to person, book and toilet (its 50 train2017 images to train, its 50 val2017 held
out); "coco-person" and "coco-animal", one-class cuts: train = the coco128/ and coco_mini/train2017 images holding a
person (or one of COCO's ten animals, merged into one new class "animal"), val = coco_mini/val2017's. Darknet's COCO
training left val2017 out, so every held-out image is new to the full file too; the person set is a COCO class with
COCO's own box style (the start is strong there), the animal set a class COCO splits ten ways. "robot-chair" and
"robot-coco": robot_indoor reduced to its chairs, or to its 15 classes whose names match COCO's (VOC spellings:
sofa, tvmonitor, ...): objects COCO knows, in indoor photos it never saw (the closest we have to a user's photos of
people, cars or animals).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
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
ROBOT_COCO = ("chair", "diningtable", "cup", "book", "pottedplant", "sofa", "tvmonitor", "bowl", "vase", "sink",
              "remote", "bottle", "backpack", "bed", "person")  # robot_indoor's classes with a COCO row
ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe")
EVAL = re.compile(r"eval at step (\d+) \| AP ([\d.]+) AP50 ([\d.]+)")
RECIPE = re.compile(r"recipe: (.*)")
# the defaults before issue 21, set by hand (hand-set values win over the transfer recipe)
OLD = ("train.recipe=coco", "train.optimizer=adam", "train.batch_size=64", "train.subdivisions=4", "train.amp=fp16",
       "data.workers=4", "train.burn_in=1000")


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


def one_class_cut(data: Path, out: Path, names: tuple[str, ...], new_name: str) -> Path:
    """A one-class COCO folder: the images holding any of `names` (copied), their boxes as class `new_name`; train
    from coco128 (train2017 + val2017) and coco_mini/train2017, val from coco_mini/val2017."""
    sources = {"train": [("coco128", "train2017"), ("coco128", "val2017"), ("coco_mini", "train2017")],
               "val": [("coco_mini", "val2017")]}
    for split, parts in sources.items():
        images, boxes = [], []
        folder = out / "images" / f"{split}2017"
        folder.mkdir(parents=True, exist_ok=True)
        for name, part in parts:
            coco = json.loads((data / name / "annotations" / f"instances_{part}.json").read_text())
            keep = {c["id"] for c in coco["categories"] if c["name"] in names}
            by_image: dict[int, list] = {}
            for a in coco["annotations"]:
                if a["category_id"] in keep:
                    by_image.setdefault(a["image_id"], []).append(a)
            for image in coco["images"]:
                if image["id"] not in by_image:
                    continue
                new_id = len(images) + 1
                if not (folder / image["file_name"]).exists():
                    shutil.copy(data / name / "images" / part / image["file_name"], folder / image["file_name"])
                images.append({**image, "id": new_id})
                boxes += [{**a, "id": len(boxes) + i + 1, "image_id": new_id, "category_id": 1}
                          for i, a in enumerate(by_image[image["id"]])]
        (out / "annotations").mkdir(exist_ok=True)
        (out / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(
            {"images": images, "annotations": boxes, "categories": [{"id": 1, "name": new_name}]}))
    return out


def run(root: Path, classes: int, start: Path | None, minutes: float | None, logs: Path, name: str,
        recipe: tuple[str, ...], steps: int | None = None) -> dict:
    """One training, time-limited (minutes) or of fixed length (steps: AP then depends on the steps, not on the
    machine's speed); its steps, the start's, best and last evaluations, and the wall minutes."""
    length = ([f"train.time_limit={minutes}"] if steps is None else
              [f"train.steps={steps}", "train.lr_steps=[0.8,0.9]", f"eval.every={steps}"])
    command = [sys.executable, "main.py", "--device", "cpu", *(["--weights", str(start)] if start else []),
               "--set", f"data.root={root}", "model.arch=yolov3-tiny", f"model.num_classes={classes}",
               "data.img_size=320", *length, f"logging.dir={logs}", f"logging.name={name}", *recipe]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"{name}.log").write_text(done.stdout + done.stderr)  # the mixes keep_start tried are only in the log
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    evals = [(int(s), float(ap), float(ap50)) for s, ap, ap50 in EVAL.findall(done.stdout)]
    best = max(evals, key=lambda e: e[2])  # eval.metric AP50 picks best.pt
    start = evals[0][1:] if evals[0][0] == 0 else None  # scratch and prefix starts have no step-0 evaluation
    return {"steps": evals[-1][0], "start": start, "best": best[1:], "last": evals[-1][1:],
            "minutes": seconds / 60, "command": " ".join(command[1:]),
            "recipe": next(iter(RECIPE.findall(done.stdout)), "")}


def main() -> None:
    """Cut the sets and the prefix, run every set x start x recipe x minutes, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, metavar="DIR",
                        help="the folder holding robot_indoor/, coco_mini/ and coco128/ (COCO-format sets)")
    parser.add_argument("--weights", type=Path, required=True, help="the full COCO-trained yolov3-tiny.weights")
    parser.add_argument("--minutes", type=float, nargs="+", default=[5.0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/own_data"))
    parser.add_argument("--datasets", nargs="+", default=["coco-person", "coco-animal", "robot_indoor", "coco_mini-3",
                                                          "robot-chair", "robot-coco"])
    parser.add_argument("--starts", nargs="+", default=["coco"], choices=["scratch", "prefix", "coco"])
    parser.add_argument("--recipes", nargs="+", default=["old", "new"], choices=["old", "new"])
    parser.add_argument("--steps", type=int, default=None,
                        help="fixed-length runs of this many optimiser steps instead of --minutes (lr decays at 80%% "
                             "and 90%% as in a time-limited run; evaluated at step 0 and at the end): a candidate "
                             "compared by steps, whatever the machine's speed")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="config overrides added to every run after the recipe's (a candidate: e.g. "
                             "train.optimizer=adam); they join the runs' names")
    args = parser.parse_args()
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"error: --steps {args.steps}: give a positive number of optimiser steps")
    missing = [name for name in ("robot_indoor", "coco_mini", "coco128") if not (args.data / name).is_dir()]
    if missing:
        raise SystemExit(f"error: --data {args.data}: no {' or '.join(missing)} folder in it")
    if not args.weights.is_file():
        raise SystemExit(f"error: --weights {args.weights} does not exist (Darknet's yolov3-tiny.weights)")
    args.work.mkdir(parents=True, exist_ok=True)
    prefix = args.work / "yolov3-tiny.conv.15"
    cut_prefix(args.weights, prefix, "yolov3-tiny")
    sets = {"robot_indoor": lambda: (args.data / "robot_indoor", 30),
            "coco_mini-3": lambda: (coco_subset(args.data / "coco_mini", args.work / "coco_mini-3", COCO3), 3),
            "robot-chair": lambda: (coco_subset(args.data / "robot_indoor", args.work / "robot-chair", ("chair",)), 1),
            "robot-coco": lambda: (coco_subset(args.data / "robot_indoor", args.work / "robot-coco", ROBOT_COCO),
                                   len(ROBOT_COCO)),
            "coco-person": lambda: (one_class_cut(args.data, args.work / "coco-person", ("person",), "person"), 1),
            "coco-animal": lambda: (one_class_cut(args.data, args.work / "coco-animal", ANIMALS, "animal"), 1)}
    starts = {"scratch": None, "prefix": prefix, "coco": args.weights}
    print(machine(torch.device("cpu")))
    print("| data | start | recipe | minutes | steps | start AP / AP50 | best.pt AP / AP50 | last.pt AP / AP50 |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for data in args.datasets:
        root, classes = sets[data]()
        for start in args.starts:
            for minutes in [None] if args.steps else args.minutes:
                for recipe in args.recipes:  # alternating: a slower stretch of the machine hits both
                    length = f"{args.steps}steps" if args.steps else f"{minutes:g}min"
                    name = "_".join([data, start, length, recipe, *(o.replace("=", "-") for o in args.overrides)])
                    r = run(root, classes, starts[start], minutes, args.work / "logs", name,
                            (*(OLD if recipe == "old" else ()), *args.overrides), args.steps)
                    rows.append((data, start, recipe, r))
                    ap = " | ".join(f"{r[k][0]:.3f} / {r[k][1]:.3f}" if r[k] else "(no step-0 evaluation)"
                                    for k in ("start", "best", "last"))
                    wall = f"{minutes:g} ({r['minutes']:.1f})" if minutes else f"({r['minutes']:.1f})"
                    label = " ".join((recipe, *args.overrides))
                    print(f"| {data} | {start} | {label} | {wall} | {r['steps']} | {ap} |", flush=True)
    print()
    for data, start, recipe, r in rows:
        print(f"- {data}, {start}, {recipe}: `{r['command']}`" + (f"; recipe: {r['recipe']}" if r["recipe"] else ""))


if __name__ == "__main__":
    main()
