"""What the data holds, before training on it: per split counts (images, boxes, boxes per class, images without
boxes, boxes too small to train on, boxes clipped or dropped and why) and labels.png (boxes per class; box width x
height at the network input over the model's anchors; box centres). Written by main.py into the run folder and
TensorBoard at the start of training, and by `python -m tools.dataset_report`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datasets.coco import CocoDetection
from datasets.labels import COUNT_MEANINGS
from utils.boxes import CROWD_CLASS

REPORT_FILE, LABELS_FILE = "dataset_report.txt", "labels.png"
CONVERSION_DROPS = ("clipped", "zero_size", "outside_image", "unknown_class", "bad_lines", "bad_files",
                    "images_without_labels")  # the conversion counts (datasets/formats.py) a report repeats


@dataclass
class SplitStats:
    """One split's counts; box sizes (N, 2) and centres (N, 2) are in letterboxed input pixels / image fractions."""

    images: int
    boxes: int
    per_class: list[int]
    empty_images: int
    small_boxes: int  # narrower or shorter than data.min_box_size at data.img_size
    crowd: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> boxes, at loading and at conversion
    sizes: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    centres: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def split_stats(dataset: CocoDetection, img_size: int, min_box_size: float) -> SplitStats:
    """SplitStats of a dataset's images (dataset.ids) as training reads them (image_boxes' clipping and drops)."""
    boxes, classes, scales, image_sizes = [], [], [], []
    for image_id in dataset.ids:
        xyxy, cls = dataset.targets[image_id]
        info = dataset.coco.imgs[image_id]
        boxes.append(xyxy)
        classes.append(cls)
        scales.append(np.full(len(cls), img_size / max(info["width"], info["height"])))
        image_sizes.append(np.tile([info["width"], info["height"]], (len(cls), 1)))
    xyxy = np.concatenate([np.zeros((0, 4), np.float32), *boxes]).astype(np.float64)
    cls = np.concatenate([np.zeros(0, np.int64), *classes])
    objects = cls != CROWD_CLASS
    sizes = (xyxy[:, 2:] - xyxy[:, :2]) * np.concatenate([np.zeros(0), *scales])[:, None]  # (N, 2) input px
    centres = (xyxy[:, :2] + xyxy[:, 2:]) / 2 / np.concatenate([np.zeros((0, 2)), *image_sizes])
    converted = dataset.coco.dataset.get("info", {}).get("counts", {})
    dropped = {**{COUNT_MEANINGS[k]: converted[k] for k in CONVERSION_DROPS if converted.get(k)},
               **{f"{why} (dropped at loading)": n for why, n in dataset.dropped.items()}}
    return SplitStats(
        images=len(dataset.ids), boxes=int(objects.sum()),
        per_class=np.bincount(cls[objects], minlength=len(dataset.class_names)).tolist(),
        empty_images=sum(int((c != CROWD_CLASS).sum()) == 0 for c in classes),
        small_boxes=int((sizes[objects].min(1, initial=np.inf) < min_box_size).sum()) if objects.any() else 0,
        crowd=int((~objects).sum()), dropped=dropped, sizes=sizes[objects], centres=centres[objects],
        classes=cls[objects])


def report_text(stats: dict[str, SplitStats], names: list[str], img_size: int, min_box_size: float) -> str:
    """The printed report: one column per split."""
    splits = list(stats)
    width = max([12, *(len(n) + 2 for n in names)])
    rows = [f"{'':<{width}}" + "".join(f"{s:>10}" for s in splits)]

    def row(label: str, values: list) -> None:
        rows.append(f"{label:<{width}}" + "".join(f"{v:>10}" for v in values))

    row("images", [stats[s].images for s in splits])
    row("boxes", [stats[s].boxes for s in splits])
    row("no boxes", [stats[s].empty_images for s in splits])
    row(f"< {min_box_size:g} px", [stats[s].small_boxes for s in splits])
    row("crowd", [stats[s].crowd for s in splits])
    rows.append("boxes per class:")
    for k, name in enumerate(names):
        row(f"  {name}", [stats[s].per_class[k] for s in splits])
    lines = [f"dataset: {len(names)} classes; box sizes at the {img_size} px input ('< {min_box_size:g} px': boxes "
             "narrower or shorter than data.min_box_size there, which training removes)", *rows]
    for s in splits:
        for reason, n in stats[s].dropped.items():
            lines.append(f"{s}: {n} {reason}")
    empty = [names[k] for k in range(len(names)) if stats[splits[0]].per_class[k] == 0]
    if empty:
        lines.append(f"warning: no {splits[0]} box of class(es) {', '.join(empty)}: the model cannot learn them")
    return "\n".join(lines)


def labels_figure(stats: SplitStats, names: list[str], anchors: np.ndarray, img_size: int) -> np.ndarray:
    """labels.png as (H, W, 3) uint8 RGB: boxes per class (bar), box w x h in input px over the anchors (x), box
    centres as fractions of the image."""
    import matplotlib
    matplotlib.use("Agg")  # no display; only the Agg canvas is drawn to
    import matplotlib.pyplot as plt

    fig, (bars, sizes, centres) = plt.subplots(1, 3, figsize=(15, 4.5), dpi=80)
    classes = np.arange(len(names))
    bars.bar(classes, stats.per_class, color=[plt.cm.tab20(k % 20) for k in classes])
    if len(names) <= 30:  # names legible; above that, class indices every 10 (the report lists the names)
        bars.set_xticks(classes, names, rotation=90, fontsize=8)
    else:
        bars.set_xticks(classes[::10], [str(k) for k in classes[::10]])
        bars.set_xlabel("class index")
    bars.set_ylabel("boxes")
    bars.set_title(f"boxes per class ({stats.boxes} in {stats.images} images)")
    colours = plt.cm.tab20(stats.classes % 20)
    sizes.scatter(stats.sizes[:, 0], stats.sizes[:, 1], s=8, c=colours, alpha=0.6, linewidths=0)
    sizes.scatter(anchors[:, 0], anchors[:, 1], marker="x", s=80, c="black", label="anchors")
    sizes.set(xlabel="box width (input px)", ylabel="box height (input px)", xlim=(0, img_size), ylim=(0, img_size),
              title=f"box sizes at {img_size} px and the model's anchors")
    sizes.legend(loc="upper left")
    centres.scatter(stats.centres[:, 0], stats.centres[:, 1], s=8, c=colours, alpha=0.6, linewidths=0)
    centres.set(xlabel="x / image width", ylabel="y / image height", xlim=(0, 1), ylim=(1, 0), title="box centres")
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy()
    plt.close(fig)
    return image


def dataset_report(datasets: dict[str, CocoDetection], anchors: np.ndarray, img_size: int, min_box_size: float,
                   out: Path | None = None) -> tuple[str, np.ndarray]:
    """The report text and labels.png (of the first split, the training one) of `datasets` {split: dataset};
    written to out/REPORT_FILE and out/LABELS_FILE when `out` is given."""
    names = next(iter(datasets.values())).class_names
    stats = {split: split_stats(d, img_size, min_box_size) for split, d in datasets.items()}
    text = report_text(stats, names, img_size, min_box_size)
    image = labels_figure(next(iter(stats.values())), names, np.asarray(anchors, np.float64), img_size)
    if out is not None:
        import cv2

        out.mkdir(parents=True, exist_ok=True)
        (out / REPORT_FILE).write_text(text + "\n")
        if not cv2.imwrite(str(out / LABELS_FILE), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {out / LABELS_FILE}")
    return text, image

