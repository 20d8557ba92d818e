"""Letterbox and augmentation geometry with known answers: boxes stay on their objects."""
import numpy as np
import pytest
import torch
from conftest import boxes_to_original

from datasets.transforms import (
    AUGMENTATIONS,
    PAD_VALUE,
    Preprocess,
    build_augmentation,
    pad_to_square,
    resize_to_fit,
    to_chw_tensor,
)
from utils.config import AugmentConfig
from utils.config_load import config_to_dict

GEOMETRIC = {"horizontal_flip": {"p": 1.0},
             "affine": {"p": 1.0, "scale": [0.7, 1.3], "translate_percent": [-0.15, 0.15], "rotate": [-10, 10]}}


def only(key, kwargs):
    """An augment config with every transform off except `key`."""
    augment = {k: {"p": 0} for k in AUGMENTATIONS}
    augment[key] = kwargs
    return augment


def square_image():
    """A 120 x 160 black image with one white 40 x 30 rectangle at x 30..70, y 50..80."""
    image = np.zeros((120, 160, 3), np.uint8)
    image[50:80, 30:70] = 255
    return image, np.array([[30, 50, 70, 80]], np.float32), np.array([1])


def white_extent(image):
    mask = image.float().mean(0) > 0.7 * 255  # (3, H, W) uint8 -> white pixels
    ys, xs = np.nonzero(mask.numpy())
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def iou(a, b):
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def to_xyxy(targets):
    cx, cy, w, h = targets[0, 1:].tolist()
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def test_letterbox_by_hand():
    image, boxes, classes = square_image()
    tensor, targets, lb = Preprocess()(image, boxes, classes, 320)
    # 160 x 120 -> scale 2 -> 320 x 240, padded 40 top and bottom; the box doubles and moves down 40
    assert (lb.scale_x, lb.scale_y, lb.pad_left, lb.pad_top) == (2.0, 2.0, 0, 40)
    assert torch.allclose(targets, torch.tensor([[1.0, 100.0, 170.0, 80.0, 60.0]]))
    assert (tensor[:, :40] == PAD_VALUE).all() and (tensor[:, 40] != PAD_VALUE).all()
    assert np.allclose(white_extent(tensor), [60, 140, 140, 200], atol=1)
    meta = {"letterbox": lb, "orig_size": image.shape[:2]}
    assert np.allclose(boxes_to_original(torch.tensor([[60.0, 140.0, 140.0, 200.0]]), meta), boxes)


def test_resize_and_pad_shapes():
    image = np.zeros((100, 50, 3), np.uint8)
    resized, sx, sy = resize_to_fit(image, 64)
    assert resized.shape == (64, 32, 3) and (sx, sy) == (32 / 50, 64 / 100)
    padded, left, top = pad_to_square(resized, 64)
    assert padded.shape == (64, 64, 3) and (left, top) == (16, 0)
    assert (padded[:, :16] == PAD_VALUE).all() and (padded[:, 48:] == PAD_VALUE).all()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("key", sorted(GEOMETRIC))
def test_geometric_augmentation_keeps_box_on_the_object(key, seed):
    image, boxes, classes = square_image()
    preprocess = Preprocess(build_augmentation(only(key, GEOMETRIC[key]), min_box_size=2, seed=seed))
    tensor, targets, _ = preprocess(image, boxes, classes, 160)
    assert len(targets) == 1 and targets[0, 0] == 1
    assert iou(to_xyxy(targets), white_extent(tensor)) > 0.9


def test_flip_by_hand():
    image, boxes, classes = square_image()
    preprocess = Preprocess(build_augmentation(only("horizontal_flip", {"p": 1.0}), min_box_size=2, seed=0))
    _, targets, _ = preprocess(image, boxes, classes, 160)
    # x 30..70 in a 160-wide image -> 90..130; letterbox pads 20 on top
    assert torch.allclose(targets, torch.tensor([[1.0, 110.0, 85.0, 40.0, 30.0]]))


@pytest.mark.parametrize("key", [k for k in AUGMENTATIONS if k not in GEOMETRIC])
def test_colour_and_dropout_augmentations_do_not_move_boxes(key):
    image, boxes, classes = square_image()
    kwargs = {**config_to_dict(AugmentConfig())[key], "p": 1.0}
    preprocess = Preprocess(build_augmentation(only(key, kwargs), min_box_size=2, seed=0))
    tensor, targets, _ = preprocess(image, boxes, classes, 160)
    _, plain, _ = Preprocess()(image, boxes, classes, 160)
    assert tensor.shape == (3, 160, 160)
    # CoarseDropout moves only edges whose rows or columns a hole hides all of (datasets/augmentations.py
    # boxes_outside_holes; Albumentations' own truncated every edge to an integer)
    assert torch.equal(targets, plain)


def test_boxes_pushed_out_or_too_small_are_removed():
    image = np.zeros((100, 100, 3), np.uint8)
    boxes = np.array([[0, 0, 10, 10], [40, 40, 41.5, 60]], np.float32)  # second: 1.5 px wide
    out = {"p": 1.0, "translate_px": {"x": [-50, -50], "y": [0, 0]}}  # box 0 leaves on the left, box 1 stays
    preprocess = Preprocess(build_augmentation(only("affine", out), min_box_size=2, seed=0))
    _, targets, _ = preprocess(image, boxes, np.array([0, 1]), 100)
    assert len(targets) == 0  # the first box left the image, the second is below min_box_size
    partly = {"p": 1.0, "translate_px": {"x": [-5, -5], "y": [0, 0]}}  # box 0 -> x -5..5: clipped to 0..5
    preprocess = Preprocess(build_augmentation(only("affine", partly), min_box_size=2, seed=0))
    _, targets, _ = preprocess(image, boxes, np.array([0, 1]), 100)
    assert torch.allclose(targets, torch.tensor([[0.0, 2.5, 5.0, 5.0, 10.0]]))


def test_all_default_augmentations_run_and_keep_valid_boxes():
    image, boxes, classes = square_image()
    augment = config_to_dict(AugmentConfig())
    preprocess = Preprocess(build_augmentation(augment, min_box_size=2, seed=0))
    for _ in range(20):
        tensor, targets, _ = preprocess(image, boxes, classes, 128)
        assert tensor.shape == (3, 128, 128) and tensor.dtype == torch.uint8 and tensor.is_contiguous()
        if len(targets):
            x1y1 = targets[:, 1:3] - targets[:, 3:] / 2
            x2y2 = targets[:, 1:3] + targets[:, 3:] / 2
            assert (x1y1 >= -1e-3).all() and (x2y2 <= 128 + 1e-3).all() and (targets[:, 3:] >= 2).all()


def test_sub_pixel_box_is_dropped_not_an_error():
    image = np.zeros((100, 100, 3), np.uint8)
    boxes = np.array([[50, 50, 50 + 1e-9, 60], [10, 10, 30, 30]], np.float32)  # x2 == x1 in float32
    preprocess = Preprocess(build_augmentation(only("horizontal_flip", {"p": 1.0}), min_box_size=2, seed=0))
    _, targets, _ = preprocess(image, boxes, np.array([0, 1]), 100)
    assert targets[:, 0].tolist() == [1.0]


def test_to_chw_tensor_is_the_permuted_image():
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for view in (image, image[:, ::-1], image[5:30, 7:40]):  # contiguous, negative strides, a crop
        tensor = to_chw_tensor(view)
        assert tensor.shape == (3, *view.shape[:2]) and tensor.is_contiguous()
        assert torch.equal(tensor, torch.from_numpy(view.copy()).permute(2, 0, 1))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        to_chw_tensor(image.astype(np.float32))
