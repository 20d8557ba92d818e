"""The evaluation's pictures (datasets/eval_curves.py, utils/plots.py): a hand-built two-class set whose confusion
matrix, PR curve end points and best-F1 threshold are worked out by hand below; the drawing at 1 and 80 classes;
validation.py writing the pictures (and --no-plots not)."""
import json

import cv2
import numpy as np
import pytest
import torch
from test_validation import DATA_ARGS, tiny_checkpoint

import validation
from datasets.coco import CocoDetection
from datasets.coco_eval import coco_evaluate
from datasets.eval_curves import (
    PLOT_FILES,
    RECALL_POINTS,
    match_detections,
    match_image,
    pr_curves,
    write_evaluation_plots,
)
from datasets.transforms import Preprocess
from reliability.common import open_fds
from utils.boxes import CROWD_CLASS
from utils.plots import plot_confusion_matrix, plot_pr_curves, plot_threshold_curves

CAT, DOG = 3, 7  # category ids in the file; contiguous classes cat 0, dog 1

# Four 100 x 100 images; boxes xyxy. Ground truth:
#   image 1: g1 cat [0, 0, 40, 40], g2 dog [50, 50, 90, 90]
#   image 2: g3 cat [10, 10, 50, 50], and a crowd region (cat, iscrowd 1) [60, 0, 100, 40]
#   image 3: g4 dog [20, 20, 60, 60]
#   image 4: nothing
GROUND_TRUTH = [(1, CAT, [0, 0, 40, 40], 0), (1, DOG, [50, 50, 90, 90], 0), (2, CAT, [10, 10, 50, 50], 0),
                (2, CAT, [60, 0, 100, 40], 1), (3, DOG, [20, 20, 60, 60], 0)]
# Detections (image, category, xyxy, score):
#   d1 cat 0.9 on g1 exactly                  d2 cat 0.7 on g2 exactly (a dog called cat)
#   d3 dog 0.4 on g2 exactly                  d4 cat 0.8 on the crowd region exactly (ignored)
#   d5 cat 0.6 [30, 30, 70, 70]: IoU with g3 = 400 / 2800 = 0.14, inside the crowd 100 / 1600: a false positive
#   d6 dog 0.55 [0, 60, 30, 90] on nothing    d7 cat 0.2 in the empty image 4
DETECTIONS = [(1, CAT, [0, 0, 40, 40], 0.9), (1, CAT, [50, 50, 90, 90], 0.7), (1, DOG, [50, 50, 90, 90], 0.4),
              (2, CAT, [60, 0, 100, 40], 0.8), (2, CAT, [30, 30, 70, 70], 0.6), (3, DOG, [0, 60, 30, 90], 0.55),
              (4, CAT, [10, 10, 30, 30], 0.2)]


def hand_set(tmp_path):
    """The set above as a COCO file (images need not exist: nothing here decodes one) and its COCO rows (7, 7)."""
    (tmp_path / "images").mkdir()
    data = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in (1, 2, 3, 4)],
            "categories": [{"id": CAT, "name": "cat"}, {"id": DOG, "name": "dog"}],
            "annotations": [{"id": n, "image_id": i, "category_id": c, "iscrowd": crowd,
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}
                            for n, (i, c, (x1, y1, x2, y2), crowd) in enumerate(GROUND_TRUTH, start=1)]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    dataset = CocoDetection(tmp_path / "images", tmp_path / "ann.json", Preprocess(), img_size=64)
    rows = np.array([[i, x1, y1, x2 - x1, y2 - y1, s, c] for i, c, (x1, y1, x2, y2), s in DETECTIONS], np.float64)
    return dataset, rows


def test_confusion_matrix_and_threshold_curves_by_hand(tmp_path):
    dataset, rows = hand_set(tmp_path)
    matches = match_detections(rows, dataset.targets, dataset.ids, dataset.category_to_class, 2, conf_threshold=0.5)
    # score > 0.5 keeps d1 d2 d4 d5 d6; matched across classes:
    #   d1 -> g1: (cat, cat); d2 -> g2: (dog, cat); d4 in the crowd: ignored; d5 matches nothing: (background, cat);
    #   d6 matches nothing: (background, dog); g3 and g4 are not found: (cat, background), (dog, background).
    # Rows true cat, dog, background; columns predicted cat, dog, background.
    assert matches.confusion.tolist() == [[1, 0, 1],
                                          [1, 0, 1],
                                          [1, 1, 0]]

    # Per class (COCO's rule), every detection, counted when score > t; 2 cats (g1, g3) and 2 dogs (g2, g4):
    #   cat: d1 0.9 TP, d2 0.7 FP, d5 0.6 FP, d7 0.2 FP (d4 ignored)      dog: d6 0.55 FP, d3 0.4 TP
    #   t in      cat TP/FP  F1                 dog TP/FP  F1     mean F1
    #   [0, .2)   1/3        2/(4+2) = 1/3      1/1        1/2    5/12
    #   [.2, .4)  1/2        2/(3+2) = 2/5      1/1        1/2    9/20  <- best
    #   [.4, .55) 1/2        2/5                0/1        0      1/5
    #   [.6, .7)  1/1        2/(2+2) = 1/2      0/0        0      1/4
    #   [.7, .9)  1/0        2/(1+2) = 2/3      0/0        0      1/3
    #   [.9, 1]   0/0        0                  0/0        0      0
    curves = matches.curves
    assert curves.best_f1 == pytest.approx(9 / 20)
    assert curves.best_threshold == pytest.approx(0.3)  # the middle of [0.2, 0.4)
    at = {t: int(round(t * 1000)) for t in (0.1, 0.3, 0.5, 0.65, 0.8, 0.95)}
    assert curves.mean_f1[list(at.values())] == pytest.approx([5 / 12, 9 / 20, 1 / 5, 1 / 4, 1 / 3, 0])
    assert curves.precision[0, at[0.1]] == pytest.approx(1 / 4) and curves.precision[1, at[0.3]] == 0.5
    assert np.isnan(curves.precision[1, at[0.65]])  # no dog above 0.65: precision undefined, not 0 or 1
    assert curves.recall[:, at[0.3]] == pytest.approx([0.5, 0.5])


def test_pr_curve_end_points_by_hand(tmp_path):
    dataset, rows = hand_set(tmp_path)
    _, per_class, _, pr50 = coco_evaluate(dataset.coco, rows, dataset.ids, dataset.class_names)
    precision, mean = pr_curves(pr50)
    # COCOeval at IoU 0.5, per class, by score: cat d1 TP, d2 FP, d5 FP, d7 FP (d4 on its crowd region is ignored):
    # recall 1/2 with precision 1 at the first detection and never more, so the interpolated curve is 1 up to
    # recall 0.5 and 0 beyond. dog: d6 FP, d3 TP: recall 1/2 at precision 1/2, so 1/2 up to recall 0.5, then 0.
    half = int(np.flatnonzero(RECALL_POINTS == 0.5)[0])
    # (pycocotools divides by tp + fp + eps: 1 - 2e-16, hence approx)
    assert precision[0, [0, half, half + 1, -1]] == pytest.approx([1, 1, 0, 0])
    assert precision[1, [0, half, half + 1, -1]] == pytest.approx([0.5, 0.5, 0, 0])
    assert mean[[0, half, half + 1, -1]] == pytest.approx([0.75, 0.75, 0, 0])
    assert per_class["cat"] == pytest.approx(51 / 101) and mean.mean() == pytest.approx(0.75 * 51 / 101)


def test_matching_is_greedy_by_score_and_crowds_are_ignored():
    gt = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 60, 20]], np.float64)
    classes = np.array([0, 1, CROWD_CLASS])
    # two detections on the first object: the higher score wins though the lower one fits better; a detection
    # inside the crowd region is ignored, one of the wrong class matches only across classes
    det = np.array([[0, 0, 10, 11], [0, 0, 10, 10], [45, 5, 55, 15], [20, 0, 30, 10]], np.float64)
    scores, det_classes = np.array([0.9, 0.5, 0.7, 0.8]), np.array([0, 0, 0, 0])
    matched, ignored = match_image(det, scores, det_classes, gt, classes, same_class=True)
    assert matched.tolist() == [0, -1, -1, -1] and ignored.tolist() == [False, False, True, False]
    matched, _ = match_image(det, scores, det_classes, gt, classes, same_class=False)
    assert matched.tolist() == [0, -1, -1, 1]


def test_no_detections_draws_empty_curves(tmp_path):
    dataset, _ = hand_set(tmp_path)
    _, _, _, pr50 = coco_evaluate(dataset.coco, np.zeros((0, 7)), dataset.ids, dataset.class_names)
    assert pr50.shape == (101, 2) and (pr50 == 0).all()  # both classes have ground truth: precision 0, not -1
    before = open_fds()
    pictures, summary = write_evaluation_plots(np.zeros((0, 7)), pr50, dataset, 0.25, tmp_path / "out")
    assert open_fds() == before  # matplotlib's cached font files closed: training leaves no fd behind
    assert summary["best_f1_threshold"] is None and summary["confusion_matrix"] == [[0, 0, 2], [0, 0, 2], [0, 0, 0]]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(PLOT_FILES)


@pytest.mark.parametrize("num_classes", [1, 80])
def test_drawing_1_and_80_classes(tmp_path, num_classes):
    rng = np.random.default_rng(0)
    names = [f"class_{k}" for k in range(num_classes)]
    precision = np.sort(rng.random((num_classes, 101)), 1)[:, ::-1]
    charts = {"pr": plot_pr_curves(RECALL_POINTS, precision, precision.mean(0), names),
              "thresholds": plot_threshold_curves(np.arange(1001) / 1000, *[rng.random((num_classes, 1001))] * 3,
                                                  (rng.random(1001),) * 3, 0.4, names)}
    matrix = rng.integers(0, 50, (num_classes + 1, num_classes + 1))
    for normalize in (False, True):
        charts[f"confusion_{normalize}"] = plot_confusion_matrix(matrix, names, 0.25, normalize)
    for name, chart in charts.items():
        path = tmp_path / f"{name}.png"
        assert cv2.imwrite(str(path), chart)
        h, w, _ = cv2.imread(str(path)).shape
        assert 400 <= min(h, w) and max(h, w) <= 2000, (name, h, w)
        assert chart.std() > 10  # something is drawn, not a blank canvas
    side = charts["confusion_False"].shape[0]
    assert (side >= 1200) if num_classes == 80 else (side <= 700)  # the matrix grows with the classes


def test_validation_writes_the_pictures_and_no_plots_skips_them(tmp_path, capsys):
    weights = tmp_path / "run" / "last.pt"
    weights.parent.mkdir()
    tiny_checkpoint(weights)
    torch.manual_seed(0)
    common = ["--weights", str(weights), *DATA_ARGS, "--img-size", "64", "--subset", "2", "--conf", "0.00005"]
    validation.main([*common, "--out", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert "detect.py --conf " in out or "no score threshold finds a true positive" in out
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert written == sorted(["last_val64.json", *(f"last_val64_{name}" for name in PLOT_FILES)])
    metrics = json.loads((tmp_path / "plots" / "last_val64.json").read_text())
    assert len(metrics["plots"]["confusion_matrix"]) == 81  # 80 COCO classes and the background
    validation.main([*common, "--out", str(tmp_path / "none"), "--no-plots"])
    assert sorted(p.name for p in (tmp_path / "none").iterdir()) == ["last_val64.json"]
