"""Run a model on images, folders, glob patterns or videos; write annotated copies and the detections.

    python detect.py --weights logs/<run>/best.pt --source photos/                 # a folder, recursively
    python detect.py --weights models/weights/yolov3.weights --source 'shots/*.jpg' clip.mp4 --conf 0.4
    python detect.py --weights W --source photos/ --format txt --no-draw --device cuda:0 --half

Everything is written into --out (default: <logging.dir>/detect_<weights stem>, e.g. logs/detect_best):
- each input annotated (boxes, class names, scores), under its path relative to the folder or glob root it was
  found under; videos as .mp4;
- detections.json, COCO's results format (image_id, category_id as in the annotation file, bbox [x, y, w, h] in
  original pixels, score) plus file_name and, for video frames, frame; or with --format txt one YOLO label file per
  image or frame under labels/ (class cx cy w h score, normalised by the image's width and height).
image_id is the number in an image's file name (COCO's 000000397133.jpg -> 397133; each number once), else, and
for video frames, the next integer above all those numbers, in reading order. Class names and category ids: the
categories of data.val_annotations, or COCO's 80 when that file is missing. An unreadable file is skipped with a
warning and counted in the summary.
"""
from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from datasets.coco import DatasetError, class_table
from datasets.coco_eval import rows_to_json, save_json, to_coco_rows
from datasets.formats import data_paths
from datasets.sources import IMAGE_EXTENSIONS, Frame, Source, find_sources, read_frames
from inference import add_inference_args, detect, inference_setup
from utils.boxes import box_xyxy_to_cxcywh
from utils.plots import draw_boxes


def build_parser() -> argparse.ArgumentParser:
    """The command line: config and inference options plus detect's own."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_inference_args(parser)
    parser.add_argument("--source", required=True, nargs="+",
                        help="image or video files, folders (searched recursively) or quoted glob patterns")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default: eval.batch_size)")
    parser.add_argument("--format", choices=("json", "txt"), default="json",
                        help="detections.json (COCO results) or labels/*.txt (YOLO); default json")
    parser.add_argument("--no-draw", action="store_true", help="write no annotated images or videos")
    return parser


class Outputs:
    """What detect.py writes into its output folder: annotated images and videos, JSON rows or YOLO labels."""

    def __init__(self, out: Path, names: list[str], category_ids: list[int], fmt: str, draw: bool) -> None:
        self.out, self.names, self.category_ids, self.fmt, self.draw = out, names, category_ids, fmt, draw
        self.json: list[dict] = []
        self.counts = {"images": 0, "frames": 0, "detections": 0, "videos": 0, "label files": 0}
        self.video: tuple[Source, cv2.VideoWriter] | None = None

    def add(self, frames: Sequence[Frame], ids: Sequence[int], detections: torch.Tensor) -> None:
        """Write a batch's detections (M, 7) [image_index, x1, y1, x2, y2, score, class] in original pixels."""
        self.counts["detections"] += len(detections)
        if self.fmt == "json":
            rows = rows_to_json(to_coco_rows(detections, [{"image_id": i} for i in ids], self.category_ids))
            extras = [{"file_name": f.source.name.as_posix(), **({"frame": f.index} if f.video else {})}
                      for f in frames]
            self.json += [{**row, **extras[k]} for row, k in zip(rows, detections[:, 0].long().tolist(), strict=True)]
        for i, frame in enumerate(frames):
            self.counts["frames" if frame.video else "images"] += 1
            mine = detections[detections[:, 0] == i]
            if self.fmt == "txt":
                self.write_labels(frame, mine)
            if self.draw:
                det = mine.numpy()
                drawn = draw_boxes(frame.image.copy(), det[:, 1:5], det[:, 6].astype(int), self.names, det[:, 5])
                self.write_image(frame, cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))

    def write_labels(self, frame: Frame, detections: torch.Tensor) -> None:
        """labels/<name>.txt (<name>_<frame>.txt for video frames): class cx cy w h score, normalised to [0, 1]."""
        name = frame.source.name
        if frame.video:
            name = name.with_name(f"{name.stem}_{frame.index:06d}")
        path = (self.out / "labels" / name).with_suffix(".txt")
        height, width = frame.image.shape[:2]
        boxes = box_xyxy_to_cxcywh(detections[:, 1:5]) / torch.tensor([width, height, width, height])
        table = torch.cat([detections[:, 6:7], boxes, detections[:, 5:6]], 1).numpy()
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savetxt(path, table, fmt=["%d", "%.6f", "%.6f", "%.6f", "%.6f", "%.5f"])
        self.counts["label files"] += 1

    def write_image(self, frame: Frame, bgr: np.ndarray) -> None:
        """An annotated image under its output name, or the next frame of its annotated video (<name>.mp4)."""
        if frame.video is None:
            name = frame.source.name
            path = self.out / (name if name.suffix.lower() in IMAGE_EXTENSIONS else f"{name}.jpg")
            path.parent.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(path), bgr):
                raise OSError(f"could not write {path}")
            return
        if self.video is None or self.video[0] != frame.source:
            self.close_video()
            path = (self.out / frame.source.name).with_suffix(".mp4")
            path.parent.mkdir(parents=True, exist_ok=True)
            size = (frame.video.width, frame.video.height)
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), frame.video.fps, size)
            if not writer.isOpened():
                raise OSError(f"could not open {path} for writing (OpenCV has no mp4v encoder?)")
            self.video = (frame.source, writer)
            self.counts["videos"] += 1
        self.video[1].write(bgr)

    def close_video(self) -> None:
        """Finish the annotated video being written, if any."""
        if self.video is not None:
            self.video[1].release()
            self.video = None


class ImageIds:
    """COCO image ids in reading order: the number in an image file's name (COCO's 000000397133.jpg -> 397133) where
    it has one that no earlier input has; else, and for video frames, the next integer above all such numbers."""

    def __init__(self, sources: Sequence[Source]) -> None:
        self.numbered: dict[Path, int] = {}
        taken: set[int] = set()
        for s in sources:
            number = int(s.path.stem) if not s.is_video and s.path.stem.isdigit() else None
            if number is not None and number not in taken:
                self.numbered[s.path] = number
                taken.add(number)
        self.others = itertools.count(max(taken, default=-1) + 1)

    def __call__(self, frame: Frame) -> int:
        """The id of an image file or video frame (a frame never takes its file's number)."""
        numbered = frame.video is None and frame.source.path in self.numbered
        return self.numbered[frame.source.path] if numbered else next(self.others)


def main(argv: list[str] | None = None) -> dict:
    """Detect on every input, write the outputs, print what was written; returns the counts and skipped files."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: must be at least 1")
    model, cfg, device, form = inference_setup(args)
    batch_size = args.batch_size or cfg.eval.batch_size
    try:
        sources, ignored = find_sources(args.source)
        # an exported file carries the names it was exported with; else the checkpoint's, the data's, or COCO's
        classes = getattr(model, "classes", None)
        names, category_ids = classes or class_table(data_paths(cfg.data, "val")[1], model.num_classes,
                                                     getattr(model, "class_names", None))
    except (FileNotFoundError, ValueError, DatasetError) as e:
        raise SystemExit(f"error: {e}") from e
    out = args.out or Path(cfg.logging.dir) / f"detect_{args.weights.stem}"
    for s in sources:
        if (out / s.name).resolve() == s.path.resolve():
            raise SystemExit(f"error: --out {out} would overwrite the input {s.path}; choose another folder")
    outputs = Outputs(out, names, category_ids, args.format, not args.no_draw)
    skipped: list[str] = []
    image_id = ImageIds(sources)
    with tqdm(total=len(sources), desc="detecting", unit="image") as bar:
        frames = read_frames(sources, skipped, bar)
        while batch := list(itertools.islice(frames, batch_size)):
            detections = detect(model, [f.image for f in batch], cfg.data.img_size, cfg.eval,
                                cfg.detect.conf_threshold, device, form.dtype)
            outputs.add(batch, [image_id(f) for f in batch], detections)
            bar.update(len(batch))
    outputs.close_video()
    if args.format == "json":
        save_json(outputs.json, out / "detections.json")
    report(outputs, out, args.format, skipped, ignored)
    return {**outputs.counts, "out": out, "skipped": skipped, "ignored": [str(p) for p in ignored]}


def report(outputs: Outputs, out: Path, fmt: str, skipped: list[str], ignored: list[Path]) -> None:
    """Print what was written where, and what was skipped or ignored."""
    c = outputs.counts
    print(f"{c['images']} images and {c['frames']} video frames: {c['detections']} detections")
    if outputs.draw:
        print(f"wrote {c['images']} annotated images and {c['videos']} annotated videos to {out}")
    if fmt == "json":
        print(f"wrote {out / 'detections.json'} ({len(outputs.json)} detections, COCO results format)")
    else:
        print(f"wrote {c['label files']} YOLO label files to {out / 'labels'}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s): {', '.join(skipped)}")
    if ignored:
        print(f"ignored {len(ignored)} file(s) in the folders that are neither images nor videos by extension: "
              f"{', '.join(map(str, ignored[:5]))}{' ...' if len(ignored) > 5 else ''}")


if __name__ == "__main__":
    main()
