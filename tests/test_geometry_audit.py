"""Geometry audit of the training pipeline (issue 21, item 5): every training box against the pixels of its object.

Each image (real COCO photos from tests/data and synthetic ones, at most 160 px) gets two solid rectangles and two
ellipses in distinct colours, one cut by the left and one by the bottom border; its annotation is each object's pixel
extent before clipping (the dataset clips it, as it does COCO's). The samples come from the training dataset exactly
as main.py builds it: args.yaml with `--set` overrides -> `build_dataset(cfg, "train")` -> `dataset[(index, size,
seed)]`, the sizes from `train_sizes` (multi-scale) and the seeds from `sample_seed`, as the MultiScaleBatchSampler
hands them out. Cases: letterbox alone, each augmentation alone at p=1, all at p=1, and args.yaml as it is.

Finding an object in the output. Colour augmentations change the colours (to_gray makes red and green alike, fog and
CLAHE mix them with the background), so objects are not found by colour. Instead masks travel with the image,
resampled exactly as its pixels are: float channels (1 inside, 0 outside) resized to the fitted image with the
image's interpolation (INTER_LINEAR), carried through the dataset's own Albumentations call (the Compose is wrapped
to add `mask=`: the same call, so the same random draws; checked, images and boxes are identical with and without
it), Affine warping them with the image's interpolation too, then padded by the sample's letterbox. A pixel is the
object's when at least half covered (>= 0.5). A CoarseDropout hole writes 0 into the masks (its `fill_mask`) as it
writes grey into the image. That the masks follow the pixels is checked independently on the synthetic images under
the geometric transforms alone: there each object keeps its colour, and its extent by colour agrees with its mask's.

Each object has two masks: its shape, and its annotated box (a filled rectangle). For a rectangle they are the same.
For an ellipse, the box mask's extent is the ellipse's extent as long as the ellipse is whole (no transform here
rotates or shears) and is free of the quantisation of its thin tips; once the frame (or a dropout hole) cuts the
ellipse, its visible part is narrower than its clipped box. A box knows an object's extent, not its shape: no
box-only pipeline can do better than the clipped box, which is what the box mask gives.

The checks, per sample and object (class k - 1 <-> object k):
- the box matches its box mask's extent (the annotation moved, scaled, flipped and clipped as the pixels were), and
  exists iff that mask is visible (sides >= min_box_size + 2 px; below that either is right);
- a rectangle's box matches its visible pixels (IoU >= 0.95; the same pixels as its box mask); an ellipse's box
  holds its visible pixels (to EDGE_TOLERANCE). The IoUs of the boxes with their objects' visible pixels are
  reported, rectangles and ellipses apart, with the number of cut ellipses.
"Matches": IoU >= MIN_IOU. Pixels place an edge only to within half a pixel, and four such errors cost more than 0.05
of IoU on a side under MIN_IOU_SIDE px; there (small objects at the small multi-scale sizes, slivers left by a border)
the box fails only if an edge is off by more than EDGE_TOLERANCE px.
`test_checker_catches_wrong_transforms` shows that the checker fails on wrong transforms.
"""
import json
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest

import datasets.transforms
from datasets.augmentations import AUGMENTATIONS, boxes_outside_holes
from datasets.loader import build_dataset, sample_seed, train_sizes
from utils.config_load import load_config

ROOT = Path(__file__).parents[1]
COCO_IMAGES = Path(__file__).parent / "data" / "coco" / "images" / "train2017"
MIN_IOU = 0.95
MIN_IOU_SIDE = 40  # px: a visible extent smaller than this on a side is held to EDGE_TOLERANCE, not to MIN_IOU
EDGE_TOLERANCE = 1.0  # px
COLOURS = [(230, 30, 30), (30, 220, 40), (40, 50, 230), (235, 225, 30)]  # object k has COLOURS[k - 1]
COLOUR_TOLERANCE = 40  # max per-channel difference for a pixel to count as the object's colour
SYNTHETIC_SIZES = [(160, 120), (120, 160), (144, 144), (160, 96)]  # (width, height): letterbox both ways
OVERRIDES = ["data.img_size=128", "data.multiscale=[96, 160]", "data.workers=0"]  # sizes 96, 128, 160
REPEATS = {"all": 16, "args.yaml": 24}  # epochs over the 8 images; 6 for the others


SHAPES = ("rectangle", "ellipse", "ellipse", "rectangle")  # object k has SHAPES[k - 1]


def object_layout(width: int, height: int, rng: np.random.Generator) -> list[tuple[str, tuple[int, int, int, int]]]:
    """Four objects of SHAPES, one per quadrant (their boxes do not overlap), (shape, (x0, y0, x1, y1)) in image px,
    x1/y1 exclusive: the first a third over the left border, the third a third over the bottom border."""
    objects = []
    qw, qh = width // 2, height // 2
    for q in range(4):
        left, top = (q % 2) * qw, (q // 2) * qh
        w, h = int(rng.uniform(0.55, 0.85) * qw), int(rng.uniform(0.55, 0.85) * qh)
        x0 = -w // 3 if q == 0 else left + int(rng.integers(2, qw - w - 1))
        y0 = height - 2 * h // 3 if q == 2 else top + int(rng.integers(2, qh - h - 1))
        objects.append((SHAPES[q], (x0, y0, x0 + w, y0 + h)))
    return objects


def draw_objects(image: np.ndarray, objects: list) -> tuple[np.ndarray, np.ndarray, list[list[float]]]:
    """Draw the objects in COLOURS; returns the image, the masks (H, W, 2K) float32 (channel k - 1: object k's
    shape, K + k - 1: its box) and each object's extent [x, y, w, h] before clipping to the image (the annotation)."""
    height, width = image.shape[:2]
    margin = max(height, width)  # drawn on a canvas this much larger on every side: the extents beyond the border
    canvas = np.zeros((len(objects), height + 2 * margin, width + 2 * margin), np.uint8)
    for plane, (shape, (x0, y0, x1, y1)) in zip(canvas, objects, strict=True):
        x0, y0, x1, y1 = x0 + margin, y0 + margin, x1 + margin, y1 + margin
        if shape == "rectangle":
            plane[y0:y1, x0:x1] = 1
        else:
            centre, axes = ((x0 + x1 - 1) // 2, (y0 + y1 - 1) // 2), ((x1 - x0 - 1) // 2, (y1 - y0 - 1) // 2)
            cv2.ellipse(plane, centre, axes, 0, 0, 360, 1, thickness=-1)
    boxes = [extent(plane) - margin for plane in canvas]
    shapes = canvas[:, margin:margin + height, margin:margin + width].astype(bool)
    rectangles = np.zeros_like(shapes)
    for plane, (x0, y0, x1, y1) in zip(rectangles, boxes, strict=True):
        plane[max(int(y0), 0):int(y1), max(int(x0), 0):int(x1)] = True
    image = image.copy()
    for shape, colour in zip(shapes, COLOURS, strict=False):
        image[shape] = colour
    masks = np.concatenate([shapes, rectangles]).transpose(1, 2, 0).astype(np.float32)
    return image, masks, [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in boxes]


def extent(pixels: np.ndarray) -> np.ndarray | None:
    """xyxy pixel-edge extent of the nonzero pixels of an (H, W) array (x1, y1 exclusive); None when there are none."""
    ys, xs = np.nonzero(pixels)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def write_dataset(root: Path) -> tuple[Path, dict[int, np.ndarray], set[int]]:
    """A COCO-format training set in `root` of objects drawn on the real and synthetic images (PNG: colours stay
    exact); returns root, the masks of each image id, and the ids of the synthetic images (whose background is far
    from every colour in COLOURS)."""
    (root / "images" / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(21)
    backgrounds = []
    for path in sorted(COCO_IMAGES.glob("*.jpg")):
        photo = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        scale = 160 / max(photo.shape[:2])
        backgrounds.append(cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))
    synthetic = set(range(len(backgrounds) + 1, len(backgrounds) + len(SYNTHETIC_SIZES) + 1))
    for width, height in SYNTHETIC_SIZES:  # a dark grey ramp with a little noise
        ramp = np.linspace(40, 90, width)[None, :, None] + rng.normal(0, 4, (height, width, 3))
        backgrounds.append(np.clip(ramp, 0, 255).astype(np.uint8))
    images, annotations, masks = [], [], {}
    for image_id, background in enumerate(backgrounds, start=1):
        height, width = background.shape[:2]
        image, masks[image_id], boxes = draw_objects(background, object_layout(width, height, rng))
        name = f"{image_id:03d}.png"
        cv2.imwrite(str(root / "images" / "train2017" / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        annotations += [{"id": len(annotations) + k, "image_id": image_id, "category_id": k, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0} for k, box in enumerate(boxes, start=1)]
    categories = [{"id": k, "name": f"object{k}"} for k in range(1, len(COLOURS) + 1)]
    text = json.dumps({"images": images, "annotations": annotations, "categories": categories})
    (root / "annotations" / "instances_train2017.json").write_text(text)
    return root, masks, synthetic


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> tuple[Path, dict[int, np.ndarray], set[int]]:
    return write_dataset(tmp_path_factory.mktemp("geometry"))


def fit_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) masks resized to (width, height) = `size` as resize_to_fit resizes the image."""
    resized = cv2.resize(mask, size, interpolation=cv2.INTER_LINEAR)
    return resized.reshape(*resized.shape[:2], mask.shape[2])


class MaskAlong:
    """The dataset's augmentation (an A.Compose), with the masks of the current sample carried along in each call:
    `mask` is set before a sample is read, `out` holds the augmented masks after it."""

    def __init__(self, compose: A.Compose) -> None:
        self.compose, self.mask, self.out = compose, None, None
        for t in compose.transforms:  # what happens to the masks only
            if isinstance(t, A.CoarseDropout):
                t.fill_mask = 0.0  # a hole hides the object: background in the mask, as the image gets grey
            if isinstance(t, A.Affine):
                t.mask_interpolation = t.interpolation  # resampled as the image (masks default to nearest)

    def __getattr__(self, name: str):
        return getattr(self.compose, name)

    def __call__(self, image: np.ndarray, **targets):
        out = self.compose(image=image, mask=fit_mask(self.mask, image.shape[1::-1]), **targets)
        self.out = out["mask"]
        return out


def training_dataset(root: Path, augment_overrides: list[str]):
    """The training dataset as main.py builds it from args.yaml and these overrides, its config, and its
    augmentation wrapped in MaskAlong (None without augmentation)."""
    cfg = load_config(ROOT / "args.yaml", [f"data.root={root}", *OVERRIDES, *augment_overrides])
    dataset = build_dataset(cfg, "train")
    along = None
    if dataset.preprocess.augmentation is not None:
        along = MaskAlong(dataset.preprocess.augmentation)
        dataset.preprocess.augmentation = along
    return dataset, cfg, along


def output_masks(masks: np.ndarray, along: MaskAlong | None, meta: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The masks in network-input pixels, augmented (or fitted) as the image was and padded by its letterbox, as two
    (size, size) uint8 id maps: object shapes and object boxes (0: none, k: at least half covered by object k)."""
    letterbox = meta["letterbox"]
    if along is not None:
        fitted = along.out
    else:
        height, width = masks.shape[:2]
        fitted = fit_mask(masks, (round(width * letterbox.scale_x), round(height * letterbox.scale_y)))
    maps = []
    for half in np.split(fitted, 2, axis=-1):  # within each, the objects do not overlap
        ids = np.zeros((size, size), np.uint8)
        top, left = letterbox.pad_top, letterbox.pad_left
        ids[top:top + half.shape[0], left:left + half.shape[1]] = np.where(half.max(-1) >= 0.5, half.argmax(-1) + 1, 0)
        maps.append(ids)
    return maps[0], maps[1]


def matches(box: np.ndarray, pixels: np.ndarray) -> bool:
    """The box agrees with the pixel extent: IoU >= MIN_IOU, or edges within EDGE_TOLERANCE for a small extent."""
    if min(pixels[2:] - pixels[:2]) < MIN_IOU_SIDE:
        return np.abs(box - pixels).max() <= EDGE_TOLERANCE
    return box_iou(box, pixels) >= MIN_IOU


def check_sample(targets: np.ndarray, shapes: np.ndarray, boxes: np.ndarray, kinds: tuple[str, ...],
                 min_box_size: float) -> tuple[dict[str, list[float]], list[str], int]:
    """Targets (K, 5) [class, cx, cy, w, h] against the output id maps of shapes and boxes, object k of kind
    kinds[k - 1]: the IoUs of the boxes with their objects' visible pixels per kind, the failures, and how many boxes
    were of cut ellipses."""
    ious, failures, cut = {kind: [] for kind in kinds}, [], 0
    classes = targets[:, 0].astype(int).tolist()
    for k, kind in enumerate(kinds, start=1):
        visible, region = extent(shapes == k), extent(boxes == k)
        rows = [i for i, c in enumerate(classes) if c == k - 1]
        if len(rows) > 1:
            failures.append(f"object {k}: {len(rows)} boxes")
            continue
        if not rows:
            if region is not None and min(region[2:] - region[:2]) >= min_box_size + 2:
                failures.append(f"object {k}: visible at {region.tolist()} but no box")
            continue
        cx, cy, w, h = targets[rows[0], 1:]
        box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        if region is None:
            failures.append(f"object {k}: gone from the image but boxed at {box.round(1).tolist()}")
            continue
        if not matches(box, region):
            failures.append(f"object {k}: box {box.round(1).tolist()} vs its box's pixels {region.tolist()}, "
                            f"IoU {box_iou(box, region):.3f}")
            continue
        if visible is None:  # an ellipse's box mask shows a corner its shape does not reach
            cut += 1
            continue
        iou = box_iou(box, visible)
        ious[kind].append(iou)
        if kind == "rectangle" and not matches(box, visible):
            failures.append(f"object {k}: box {box.round(1).tolist()} vs pixels {visible.tolist()}, IoU {iou:.3f}")
        if kind == "ellipse":
            cut += np.abs(visible - region).max() > EDGE_TOLERANCE
            if (box[:2] > visible[:2] + EDGE_TOLERANCE).any() or (box[2:] < visible[2:] - EDGE_TOLERANCE).any():
                failures.append(f"object {k}: box {box.round(1).tolist()} does not hold its pixels {visible.tolist()}")
    return ious, failures, int(cut)


def check_colours(image: np.ndarray, shapes: np.ndarray, n_objects: int) -> list[str]:
    """Each object's extent by its colour in the output image against its extent in the shape map: edges within 1 px."""
    failures = []
    for k in range(1, n_objects + 1):
        by_mask = extent(shapes == k)
        by_colour = extent(np.abs(image.astype(int) - COLOURS[k - 1]).max(-1) <= COLOUR_TOLERANCE)
        if (by_mask is None) != (by_colour is None) or (
                by_mask is not None and np.abs(by_mask - by_colour).max() > EDGE_TOLERANCE):
            failures.append(f"object {k}: pixels of its colour at {by_colour} but its mask at {by_mask}")
    return failures


def audit(root: Path, masks: dict, augment_overrides: list[str], epochs: int, synthetic: set[int] = frozenset()
          ) -> tuple[dict[str, list[float]], list[str], int]:
    """Every image `epochs` times, at the multi-scale sizes in turn, with the seeds the sampler gives epochs 0..;
    returns check_sample's IoUs, failures (naming image, size and seed) and cut count over all samples. The objects
    of the `synthetic` images are found by colour too."""
    dataset, cfg, along = training_dataset(root, augment_overrides)
    sizes = train_sizes(cfg)
    ious, failures, cut = {kind: [] for kind in SHAPES}, [], 0
    for epoch in range(epochs):
        for index, image_id in enumerate(dataset.ids):
            size, seed = sizes[(epoch + index) % len(sizes)], sample_seed(cfg.train.seed, epoch, index)
            if along is not None:
                along.mask = masks[image_id]
            tensor, targets, meta = dataset[(index, size, seed)]
            shapes, boxes = output_masks(masks[image_id], along, meta, size)
            got, bad, n_cut = check_sample(targets.numpy(), shapes, boxes, SHAPES, cfg.data.min_box_size)
            if image_id in synthetic:
                bad += check_colours(tensor.permute(1, 2, 0).numpy(), shapes, len(SHAPES))
            cut += n_cut
            for kind in ious:
                ious[kind] += got[kind]
            failures += [f"image {image_id} size {size} seed {seed}: {f}" for f in bad]
    return ious, failures, cut


def only(key: str | None) -> list[str]:
    """Overrides that switch every augmentation off but `key` (at p=1); key "all": every one at p=1."""
    return [f"augment.{k}.p={1.0 if key in (k, 'all') else 0}" for k in AUGMENTATIONS]


CASES = {"letterbox": only(None), **{k: only(k) for k in AUGMENTATIONS}, "all": only("all"), "args.yaml": []}
GEOMETRIC_ONLY = ("letterbox", "horizontal_flip", "affine")  # colours intact: objects found by colour too


@pytest.mark.parametrize("case", list(CASES))
def test_boxes_follow_their_objects(case, data_root):
    root, masks, synthetic = data_root
    by_colour = synthetic if case in GEOMETRIC_ONLY else frozenset()
    ious, failures, cut = audit(root, masks, CASES[case], REPEATS.get(case, 6), by_colour)
    print(f"{case}:", "; ".join(f"{kind}s {len(v)}, IoU with their pixels min {min(v):.3f} p5 "
                                f"{np.percentile(v, 5):.3f} median {np.median(v):.3f}" for kind, v in ious.items()),
          f"({cut} cut ellipses)")
    assert not failures, f"{len(failures)} failure(s), first: {failures[:5]}"


def test_mask_does_not_change_the_augmentation(data_root):
    """MaskAlong must not change the random draws: the same images and boxes with and without it."""
    root, masks, _ = data_root
    plain = build_dataset(load_config(ROOT / "args.yaml", [f"data.root={root}", *OVERRIDES, *only("all")]), "train")
    wrapped, _, along = training_dataset(root, only("all"))
    for index, image_id in enumerate(plain.ids):
        along.mask = masks[image_id]
        a, b = plain[(index, 128, 7 + index)], wrapped[(index, 128, 7 + index)]
        assert (a[0] == b[0]).all() and (a[1] == b[1]).all()


def test_checker_catches_wrong_transforms(data_root, monkeypatch):
    """The audit fails on transforms that are wrong: a flip that leaves the boxes where they were, a letterbox that
    does not move the boxes by its padding (nor report it: the masks are placed where it says, so the objects' colours
    show it), and boxes 1 px too wide on each side."""
    root, masks, synthetic = data_root
    with monkeypatch.context() as m:
        m.setattr(A.HorizontalFlip, "apply_to_bboxes", lambda self, bboxes, **params: bboxes)
        assert any("IoU" in f for f in audit(root, masks, only("horizontal_flip"), 1)[1])
    with monkeypatch.context() as m:
        pad = datasets.transforms.pad_to_square
        m.setattr(datasets.transforms, "pad_to_square", lambda image, size: (pad(image, size)[0], 0, 0))
        assert any("pixels of its colour" in f for f in audit(root, masks, only(None), 1, synthetic)[1])
    with monkeypatch.context() as m:
        preprocess = datasets.transforms.Preprocess.__call__

        def wider(self, *args):
            tensor, targets, letterbox = preprocess(self, *args)
            targets[:, 3:] += 2
            return tensor, targets, letterbox

        m.setattr(datasets.transforms.Preprocess, "__call__", wider)
        assert any("IoU" in f for f in audit(root, masks, only(None), 1)[1])
    assert not audit(root, masks, only(None), 1, synthetic)[1]  # the monkeypatches are undone


def test_check_sample_by_hand():
    shapes = np.zeros((64, 64), np.uint8)
    shapes[10:30, 20:40] = 1  # object 1 a rectangle at x 20..40, y 10..30; object 2 gone
    exact = np.array([[0, 30, 20, 20, 20]], np.float32)
    kinds = ("rectangle", "rectangle")
    assert check_sample(exact, shapes, shapes, kinds, 2.0) == ({"rectangle": [1.0]}, [], 0)
    _, failures, _ = check_sample(np.array([[0, 32, 20, 20, 20]], np.float32), shapes, shapes, kinds, 2.0)  # 2 px off
    assert failures == ["object 1: box [22.0, 10.0, 42.0, 30.0] vs its box's pixels [20.0, 10.0, 40.0, 30.0], "
                        "IoU 0.818"]
    two = np.concatenate([exact, [[1, 5, 5, 4, 4]]]).astype(np.float32)
    assert check_sample(two, shapes, shapes, kinds, 2.0)[1] == ["object 2: gone from the image but boxed at "
                                                                "[3.0, 3.0, 7.0, 7.0]"]
    _, failures, _ = check_sample(np.zeros((0, 5), np.float32), shapes, shapes, kinds, 2.0)
    assert failures == ["object 1: visible at [20.0, 10.0, 40.0, 30.0] but no box"]
    ellipse = np.zeros((64, 64), np.uint8)
    ellipse[10:30, 25:35] = 1  # what is left of an ellipse cut at y 30: narrower than its box
    assert check_sample(exact, ellipse, shapes, ("ellipse",), 2.0) == ({"ellipse": [0.5]}, [], 1)
    narrow = np.array([[0, 30, 20, 10, 20]], np.float32)  # the visible part's box, not the clipped box
    _, failures, _ = check_sample(narrow, ellipse, shapes, ("ellipse",), 2.0)
    assert failures and "vs its box's pixels" in failures[0]
    wide = np.zeros((64, 64), np.uint8)
    wide[12:28, 17:43] = 1  # pixels 3 px beyond the box on the left and right (not an ellipse's, but a check's test)
    _, failures, _ = check_sample(exact, wide, shapes, ("ellipse",), 2.0)
    assert failures == ["object 1: box [20.0, 10.0, 40.0, 30.0] does not hold its pixels [17.0, 12.0, 43.0, 28.0]"]


def test_dropout_boxes_by_hand():
    """Boxes under dropout holes keep their sub-pixel edges unless a hole hides whole rows or columns of them."""
    boxes = np.array([[10.3, 10.6, 30.7, 20.2, 0], [40.5, 5.5, 44.5, 9.5, 1], [2.2, 30.4, 12.8, 38.6, 2]])
    holes = np.array([[25, 0, 50, 15], [0, 34, 20, 40]])  # hides x >= 25 of box 0's top rows, all of box 1,
    kept = boxes_outside_holes(boxes, holes, (50, 60))  # and box 2's rows from 34 down
    assert np.allclose(kept, [[10.3, 10.6, 30.7, 20.2, 0], [2.2, 30.4, 12.8, 34, 2]])
    holes = np.array([[20, 0, 40, 40]])  # every row of box 0 from x 20 on
    assert np.allclose(boxes_outside_holes(boxes[:1], holes, (50, 60)), [[10.3, 10.6, 20, 20.2, 0]])
    assert np.allclose(boxes_outside_holes(boxes[:1], holes, (50, 60), min_visibility=0.6), np.zeros((0, 5)))


def test_layout_is_as_annotated(data_root):
    """The annotations are the objects' unclipped extents: clipped, they are the extents of both masks."""
    root, masks, _ = data_root
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    for a in data["annotations"]:
        mask, k = masks[a["image_id"]], a["category_id"]
        x, y, w, h = a["bbox"]
        clipped = [max(x, 0), max(y, 0), min(x + w, mask.shape[1]), min(y + h, mask.shape[0])]
        assert extent(mask[..., k - 1]).tolist() == clipped == extent(mask[..., len(SHAPES) + k - 1]).tolist()
