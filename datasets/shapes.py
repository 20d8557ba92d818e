"""Synthetic shapes: a deterministic object-detection dataset written in the exact COCO 2017 layout.

    python -m datasets.shapes --out data/shapes --train 2000 --val 200 [--seed 0] [--size 256] [--overwrite]

writes <out>/images/{train,val}2017/<12-digit image id>.jpg and <out>/annotations/instances_{train,val}2017.json.
Six classes of filled shapes (SHAPE_CLASSES) on textured, noisy backgrounds with line and blob clutter; object
sizes from 10 px to 60% of the image's short side (many COCO-small), moderate overlaps, about 5% empty images.
Each box is the exact extent of the object's pixels that stay visible after later objects are drawn.
Image i of a split depends only on (seed, split, i), never on how many images are generated.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

SHAPE_CLASSES = ("circle", "rectangle", "triangle", "ellipse", "star", "cross")  # category ids 1..6 in this order
SPLITS = ("train", "val")  # written as COCO's train2017 / val2017

# Image and object geometry, in pixels unless noted.
MIN_SIZE = 64               # smallest allowed --size: below it the largest objects are barely bigger than the smallest
MAX_SIZE = 4096             # largest allowed --size: a typo guard (one 4096 px image already takes ~0.1 GB to draw)
MIN_DIAMETER = 10.0         # smallest object's enclosing circle: below ~10 px a star or cross is just a blob
SMALL_DIAMETER = 32.0       # objects are drawn from [MIN_DIAMETER, SMALL_DIAMETER] with probability SMALL_FRAC ...
SMALL_FRAC = 0.2            # ... (stars, crosses, thin shapes up to ~55 px are also COCO-small: ~45% in all)
MIN_AREA = 12               # fewer pixels: a degenerate sliver (a very thin rectangle or triangle at the smallest size)
MAX_DIAMETER_FRAC = 0.6     # largest object's enclosing circle, as a fraction of the image's short side
MAX_OBJECTS = 8
EMPTY_FRAC = 0.05           # images with no object: a detector must also learn to report nothing
MAX_BOX_IOU = 0.3           # a new object whose box overlaps an earlier object's box more than this is redrawn
MIN_VISIBLE_FRAC = 0.5      # ... and so is one that would leave an earlier object less than half visible
PLACEMENT_TRIES = 5         # candidates drawn per wanted object before giving up (big objects may not fit)
MIN_CONTRAST = 90.0         # RGB distance between an object's colour and the mean of what it covers (max 441)
BACKGROUND_SCALE = 4        # the smooth background is built at 1/4 resolution, then upsampled
SHIFT = 4                   # cv2 fractional bits: polygons are rasterised at 1/16 px precision
JPEG_QUALITY = 95
SMALL_AREA = 32 ** 2        # COCO's "small" objects: area below this

# Fixed, so that the same arguments always give byte-identical annotation files.
INFO = {"description": "Synthetic shapes (datasets/shapes.py of this repository)", "url": "",
        "version": "1.0", "year": 2024, "contributor": "yolov3 datasets/shapes.py", "date_created": "2024/01/01"}
LICENSES = [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}]
CATEGORIES = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CLASSES)]


# -- Rendering ---------------------------------------------------------------------------------------------------
def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image `index` of `split`: independent of every other image, so counts do not matter."""
    # crc32, not hash(): Python salts str hashes per process, and the stream must be the same in every run
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int, channels: int) -> np.ndarray:
    """(H, W, C) float32 random field, about [0, 1]: a cells x cells grid of uniform values upsampled bicubically."""
    grid = rng.random((cells, cells, channels), dtype=np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC).reshape(height, width, channels)


def random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A uniform random RGB colour as ints (what cv2 drawing functions take)."""
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def draw_blobs(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """canvas (h, w, 3) uint8 with 0-5 random ellipses blended in at 40-80% opacity (blurred and upsampled later)."""
    height, width = canvas.shape[:2]
    layer = canvas.copy()
    for _ in range(rng.integers(0, 6)):
        centre = (int(rng.integers(width)), int(rng.integers(height)))
        axes = tuple(int(a) for a in rng.integers(1, max(2, min(height, width) // 4), 2))
        cv2.ellipse(layer, centre, axes, float(rng.uniform(0, 180)), 0, 360, random_colour(rng), -1)
    opacity = rng.uniform(0.4, 0.8)
    return cv2.addWeighted(layer, opacity, canvas, 1 - opacity, 0)


def draw_lines(rng: np.random.Generator, canvas: np.ndarray) -> None:
    """Draw 0-8 thin long lines and arcs on canvas (H, W, 3) uint8 in place: sharp edges that are no object."""
    height, width = canvas.shape[:2]
    for _ in range(rng.integers(0, 9)):
        thickness = int(rng.integers(1, 3))
        if rng.random() < 0.7:
            p1, p2 = (tuple(int(v) for v in rng.integers(0, (width, height))) for _ in range(2))
            cv2.line(canvas, p1, p2, random_colour(rng), thickness, cv2.LINE_AA)
        else:  # an open arc of a big circle: curved clutter, never closed into a filled shape
            centre = tuple(int(v) for v in rng.integers(0, (width, height)))
            radius = int(rng.integers(min(height, width) // 4, max(height, width)))
            start = float(rng.uniform(0, 360))
            cv2.ellipse(canvas, centre, (radius, radius), 0, start, start + rng.uniform(30, 120),
                        random_colour(rng), thickness, cv2.LINE_AA)


def render_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB: smooth colour field + lighting gradient + soft blobs, then sharp line clutter."""
    # built at 1/BACKGROUND_SCALE resolution and upsampled: cheap, and all of it is smooth
    low_h, low_w = -(-height // BACKGROUND_SCALE), -(-width // BACKGROUND_SCALE)
    field = (smooth_noise(rng, low_h, low_w, int(rng.integers(2, 6)), 3) - 0.5) * rng.uniform(40, 160)
    ys, xs = np.mgrid[-0.5:0.5:low_h * 1j, -0.5:0.5:low_w * 1j]
    direction = rng.normal(size=2)
    ramp = (direction[0] * xs + direction[1] * ys) * (rng.uniform(0, 120) / (np.linalg.norm(direction) + 1e-6))
    low = np.clip(rng.uniform(0, 255, 3) + field + ramp[..., None], 0, 255).astype(np.uint8)
    # blurred by 8-14 px at full size: blobs must never pass for (unlabelled) ellipses or circles
    low = cv2.GaussianBlur(draw_blobs(rng, low), (0, 0), rng.uniform(2.0, 3.5))
    canvas = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    draw_lines(rng, canvas)
    return canvas


def add_noise(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """canvas (H, W, 3) uint8 + fine grey texture + pixel noise (std 2-10) -> (H, W, 3) uint8, objects included."""
    height, width = canvas.shape[:2]
    texture = (smooth_noise(rng, height, width, max(4, max(height, width) // 6), 1) - 0.5) * rng.uniform(10, 40)
    # uniform, not Gaussian, pixel noise: 4x cheaper to draw and looks the same; width sqrt(12) * std
    amplitude = np.float32(rng.uniform(2, 10) * np.sqrt(12))
    noise = (rng.random((height, width, 3), dtype=np.float32) - 0.5) * amplitude + texture
    return cv2.add(canvas, noise, dtype=cv2.CV_8U)  # rounds and saturates to 0..255


def rotate(points: np.ndarray, angle: float) -> np.ndarray:
    """Points (P, 2) rotated by angle (radians) about the origin."""
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def ellipse_points(a: float, b: float, count: int = 64) -> np.ndarray:
    """(count, 2) polygon of an axis-aligned ellipse with half-axes a (x) and b (y) about the origin."""
    t = np.linspace(0, 2 * np.pi, count, endpoint=False)
    return np.stack([a * np.cos(t), b * np.sin(t)], 1)


def shape_polygon(rng: np.random.Generator, cls: int, radius: float) -> np.ndarray:
    """(P, 2) polygon (x, y) of a random instance of SHAPE_CLASSES[cls] that fits the circle of `radius` at 0."""
    name = SHAPE_CLASSES[cls]
    if name == "circle":
        return ellipse_points(radius, radius)
    if name == "ellipse":  # minor/major <= 0.7, so that no ellipse passes for a circle
        points = ellipse_points(radius, radius * rng.uniform(0.35, 0.7))
    elif name == "rectangle":  # the diagonal is the diameter
        aspect = rng.uniform(0.3, 1.0)
        half_w = radius / np.sqrt(1 + aspect ** 2)
        points = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * (half_w, half_w * aspect)
    elif name == "triangle":  # corners near 120 degrees apart: from equilateral to clearly scalene
        angles = np.radians([0, 120, 240] + rng.uniform(-20, 20, 3))
        points = radius * np.stack([np.cos(angles), np.sin(angles)], 1)
    elif name == "star":  # five points, alternating outer and inner radius
        radii = np.tile([radius, radius * rng.uniform(0.38, 0.55)], 5)
        angles = np.arange(10) * np.pi / 5
        points = radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)
    else:  # cross: a plus sign whose arm ends touch the circle
        half_t = radius * rng.uniform(0.2, 0.35)
        half_l = np.sqrt(radius ** 2 - half_t ** 2)
        quarter = np.array([[half_t, half_l], [half_t, half_t], [half_l, half_t]])
        points = np.concatenate([rotate(quarter, -k * np.pi / 2) for k in range(4)])
    return rotate(points, rng.uniform(0, 2 * np.pi))


def sample_diameter(rng: np.random.Generator, short_side: int) -> float:
    """An object's size (diameter of its enclosing circle, px): log-uniform in [MIN_DIAMETER, SMALL_DIAMETER] with
    probability SMALL_FRAC, else in [SMALL_DIAMETER, MAX_DIAMETER_FRAC * short_side]."""
    largest = MAX_DIAMETER_FRAC * short_side
    middle = min(SMALL_DIAMETER, largest)
    low, high = (MIN_DIAMETER, middle) if rng.random() < SMALL_FRAC else (middle, largest)
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def rasterize(polygon: np.ndarray, height: int, width: int) -> tuple[np.ndarray, int, int]:
    """Polygon (P, 2) in image pixels -> (mask (h, w) bool of its filled pixels in a crop at (x0, y0), x0, y0)."""
    x0, y0 = np.maximum(np.floor(polygon.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(polygon.max(0)).astype(int) + 1, (width, height))
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    points = np.round((polygon - (x0, y0)) * (1 << SHIFT)).astype(np.int32)
    cv2.fillPoly(mask, [points], 1, cv2.LINE_8, SHIFT)
    return mask.view(bool), int(x0), int(y0)


def box_iou_xyxy(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box (4,) with boxes (N, 4), all xyxy -> (N,)."""
    wh = np.clip(np.minimum(box[2:], boxes[:, 2:]) - np.maximum(box[:2], boxes[:, :2]), 0, None)
    inter = wh[:, 0] * wh[:, 1]
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


class Layout:
    """The objects of one image so far: which one each pixel shows (later ones on top) and their boxes and areas."""

    def __init__(self, height: int, width: int) -> None:
        self.owner = np.full((height, width), -1, np.int16)  # object index per pixel, -1 = background
        self.boxes_xyxy: list[np.ndarray] = []  # as drawn, before later objects hide parts: (4,) each
        self.areas: list[int] = []  # pixels as drawn
        self.visible: list[int] = []  # pixels still shown

    def try_add(self, polygon: np.ndarray) -> tuple[np.ndarray, int, int] | None:
        """Put polygon (P, 2) on top and return (mask (h, w) bool, x0, y0), or None (nothing changes) when it is a
        sliver, its box overlaps a box more than MAX_BOX_IOU, or it would leave an object under MIN_VISIBLE_FRAC."""
        mask, x0, y0 = rasterize(polygon, *self.owner.shape)
        area = int(mask.sum())
        box = np.array([x0, y0, x0 + mask.shape[1], y0 + mask.shape[0]], np.float64)
        if area < MIN_AREA or (self.areas and box_iou_xyxy(box, np.array(self.boxes_xyxy)).max() > MAX_BOX_IOU):
            return None
        region = self.owner[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]
        hidden = np.bincount(region[mask] + 1, minlength=len(self.areas) + 1)[1:]  # pixels taken from each object
        visible = np.array(self.visible, np.int64) - hidden
        if np.any(visible < MIN_VISIBLE_FRAC * np.array(self.areas)):
            return None
        region[mask] = len(self.areas)
        self.boxes_xyxy.append(box)
        self.areas.append(area)
        self.visible = [*visible.tolist(), area]
        return mask, x0, y0

    def visible_boxes_xywh(self) -> np.ndarray:
        """(K, 4) float32 tight xywh boxes of the visible pixels of each object: pixel (x, y) covers [x, x+1) x
        [y, y+1) as in COCO; searched inside the drawn box, which holds every visible pixel."""
        boxes = np.zeros((len(self.areas), 4), np.float32)
        for k, (x0, y0, x1, y1) in enumerate(np.array(self.boxes_xyxy, int).reshape(-1, 4)):
            ys, xs = np.nonzero(self.owner[y0:y1, x0:x1] == k)
            boxes[k] = x0 + xs.min(), y0 + ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()
        return boxes

    def visible_masks(self) -> np.ndarray:
        """(K, H, W) bool: the pixels each object shows in the final image."""
        return self.owner[None] == np.arange(len(self.areas), dtype=np.int16)[:, None, None]


def object_colour(rng: np.random.Generator, covered: np.ndarray) -> np.ndarray:
    """(3,) float RGB that stands out from the pixels (N, 3) the object will cover: the first of 20 random colours
    at least MIN_CONTRAST away from their mean, else the farthest one."""
    candidates = rng.uniform(0, 255, (20, 3))
    distance = np.linalg.norm(candidates - covered.mean(0), axis=1)
    good = np.flatnonzero(distance >= MIN_CONTRAST)
    return candidates[good[0] if len(good) else distance.argmax()]


def paint(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, x0: int, y0: int) -> None:
    """Fill mask (h, w) bool at (x0, y0) of canvas (H, W, 3) uint8 in place: a contrasting colour with shading."""
    region = canvas[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]
    colour = object_colour(rng, region[mask].astype(np.float32))
    ys, xs = np.nonzero(mask)
    # a linear brightness ramp of up to about +-20 across the object, as under directional light: not a flat sticker
    ramp = rng.uniform(-1, 1, 2) @ np.stack([xs - xs.mean(), ys - ys.mean()]) * (30 / max(mask.shape))
    region[ys, xs] = np.clip(colour + ramp[:, None], 0, 255).astype(np.uint8)


def render_sample(rng: np.random.Generator, size: int, return_masks: bool = False) -> tuple[np.ndarray, ...]:
    """One image (H, W, 3) uint8 RGB, boxes (K, 4) float32 xywh pixels, classes (K,) int64 in 0..N-1, and with
    return_masks the visible masks (K, H, W) bool; H and W are each uniform in [0.75, 1.25] * size."""
    height, width = (int(round(s)) for s in rng.uniform(0.75 * size, 1.25 * size, 2))
    canvas = render_background(rng, height, width)
    layout, classes = Layout(height, width), []
    wanted = 0 if rng.random() < EMPTY_FRAC else int(rng.integers(1, MAX_OBJECTS + 1))
    for _ in range(wanted * PLACEMENT_TRIES):
        if len(classes) == wanted:
            break
        cls = int(rng.integers(len(SHAPE_CLASSES)))
        radius = sample_diameter(rng, min(height, width)) / 2
        centre = rng.uniform((radius, radius), (width - 1 - radius, height - 1 - radius))  # whole object inside
        placed = layout.try_add(shape_polygon(rng, cls, radius) + centre)
        if placed is not None:
            paint(rng, canvas, *placed)
            classes.append(cls)
    out = (add_noise(rng, canvas), layout.visible_boxes_xywh(), np.array(classes, np.int64))
    return (*out, layout.visible_masks()) if return_masks else out


# -- COCO files ----------------------------------------------------------------------------------------------------
def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer outlines of mask (H, W) bool as COCO polygons [[x1, y1, x2, y2, ...], ...] through pixel centres."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        points = cv2.approxPolyDP(contour, 0.7, True).reshape(-1, 2)  # drop near-collinear points: smaller JSON
        if len(points) >= 3:  # pycocotools needs 3+ points; 1-2 point fragments are slivers of a few pixels
            polygons.append([round(float(v) + 0.5, 2) for v in points.reshape(-1)])
    return polygons


def box_polygon(box_xywh: np.ndarray) -> list[list[float]]:
    """The box (4,) xywh as one COCO polygon: the fallback outline when a mask has no 3-point contour."""
    x, y, w, h = (float(v) for v in box_xywh)
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def coco_annotations(masks: np.ndarray, boxes: np.ndarray, classes: np.ndarray, image_id: int,
                     first_id: int) -> list[dict]:
    """COCO "annotations" of one image from its visible masks (K, H, W), boxes (K, 4) xywh and classes (K,)."""
    annotations = []
    for k, (mask, box, cls) in enumerate(zip(masks, boxes, classes, strict=True)):
        x, y, w, h = (int(v) for v in box)
        crop_polygons = mask_polygons(mask[y:y + h, x:x + w])  # contours of the crop only: K small passes
        polygons = [[v + (x if i % 2 == 0 else y) for i, v in enumerate(p)] for p in crop_polygons]
        annotations.append({"id": first_id + k, "image_id": image_id, "category_id": int(cls) + 1,
                            "bbox": [round(float(v), 2) for v in box], "area": float(mask.sum()), "iscrowd": 0,
                            "segmentation": polygons or box_polygon(box)})
    return annotations


def image_file_name(image_id: int) -> str:
    """COCO's file name for an image id: 12 zero-padded digits + .jpg."""
    return f"{image_id:012d}.jpg"


def generate_split(out_root: Path, split: str, num_images: int, seed: int, size: int, first_id: int = 1) -> dict:
    """Render and write images <out_root>/images/<split>2017/*.jpg (ids first_id, first_id + 1, ...) and return the
    split's COCO instances dict; image i is rendered from image_rng(seed, split, i) alone."""
    folder = Path(out_root) / "images" / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in tqdm(range(num_images), desc=f"{split}2017", unit="img"):
        image_id = first_id + i
        image, boxes, classes, masks = render_sample(image_rng(seed, split, i), size, return_masks=True)
        name = image_file_name(image_id)
        if not cv2.imwrite(str(folder / name), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
            raise OSError(f"could not write {folder / name}")
        images.append({"id": image_id, "file_name": name, "width": image.shape[1], "height": image.shape[0],
                       "license": 1})
        annotations += coco_annotations(masks, boxes, classes, image_id, len(annotations) + 1)
    info = dict(INFO, description=f"{INFO['description']}: {split}, seed {seed}, size {size}")
    return {"info": info, "licenses": LICENSES, "images": images, "annotations": annotations,
            "categories": CATEGORIES}


def output_paths(out: Path, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of a split in the COCO 2017 layout under out."""
    return out / "images" / f"{split}2017", out / "annotations" / f"instances_{split}2017.json"


def prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty <out>/images or <out>/annotations unless overwrite; with it, delete the split folders and
    files this module writes (nothing else), so that no image of a bigger earlier run stays behind."""
    for sub in ("images", "annotations"):
        folder = out / sub
        if not overwrite and folder.is_dir() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} already exists and is not empty; refusing to overwrite it "
                                  "(pass --overwrite, or overwrite=True, to replace the shapes data there)")
    for split in SPLITS:
        images, annotation_file = output_paths(out, split)
        if images.exists():
            shutil.rmtree(images)
        annotation_file.unlink(missing_ok=True)


def int_range_text(low: int, high: int | None) -> str:
    """'an integer >= low' or 'an integer in [low, high]', for error messages."""
    return f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"


def check_int(name: str, value: int, low: int, high: int | None = None) -> None:
    """Raise ValueError naming the argument and value unless value is an int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= (high or value):
        raise ValueError(f"{name} must be {int_range_text(low, high)}, got {value!r}")


def generate_shapes(out: Path, num_train: int, num_val: int, seed: int = 0, size: int = 256,
                    overwrite: bool = False) -> None:
    """Write the train and val splits (images and instances JSONs) under out; val image ids follow train's."""
    for name, value, low in (("num_train", num_train, 0), ("num_val", num_val, 0), ("seed", seed, 0)):
        check_int(name, value, low)
    check_int("size", size, MIN_SIZE, MAX_SIZE)
    out = Path(out)
    prepare_output(out, overwrite)
    first_id = 1
    for split, count in zip(SPLITS, (num_train, num_val), strict=True):
        coco = generate_split(out, split, count, seed, size, first_id)
        annotation_file = output_paths(out, split)[1]
        annotation_file.parent.mkdir(parents=True, exist_ok=True)
        annotation_file.write_text(json.dumps(coco, separators=(",", ":")))
        first_id += count


def describe_split(coco: dict) -> str:
    """Counts of a split's COCO dict as printable lines: images, empty images, boxes, small boxes, boxes per class."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    annotations = coco["annotations"]
    per_class = Counter(names[a["category_id"]] for a in annotations)
    empty = len(coco["images"]) - len({a["image_id"] for a in annotations})
    small = sum(a["area"] < SMALL_AREA for a in annotations)
    return (f"{len(coco['images'])} images ({empty} empty), {len(annotations)} boxes ({small} small, area < 32^2)\n"
            f"    per class: " + ", ".join(f"{name} {per_class[name]}" for name in names.values()))


# -- Command line --------------------------------------------------------------------------------------------------
def int_in_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type: an int in [low, high] (argparse puts the option's name before the message)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= (high or value):
            raise argparse.ArgumentTypeError(f"must be {int_range_text(low, high)}, got {text!r}")
        return value
    return parse


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, write the dataset, print what was written where."""
    parser = argparse.ArgumentParser(prog="python -m datasets.shapes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="dataset root to write (COCO 2017 layout)")
    parser.add_argument("--train", type=int_in_range(0), required=True, help="number of training images")
    parser.add_argument("--val", type=int_in_range(0), required=True, help="number of validation images")
    parser.add_argument("--seed", type=int_in_range(0), default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int_in_range(MIN_SIZE, MAX_SIZE), default=256,
                        help="typical image side in px; each side is uniform in [0.75, 1.25] x size (default 256)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shapes data under --out")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        generate_shapes(args.out, args.train, args.val, args.seed, args.size, args.overwrite)
    except OSError as error:  # an existing output (FileExistsError) or an unwritable --out
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    for split in SPLITS:
        images, annotation_file = output_paths(args.out, split)
        coco = json.loads(annotation_file.read_text())
        print(f"{split}2017: {describe_split(coco)}\n    -> {images}/, {annotation_file}")
    print(f"done in {time.perf_counter() - start:.1f} s (seed {args.seed}, size {args.size})")


if __name__ == "__main__":
    main()
