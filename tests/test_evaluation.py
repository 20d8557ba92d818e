"""Evaluation engine: post-processing by hand, and the whole path against pycocotools on real COCO fixture files."""
import contextlib
import io

import numpy as np
import pytest
import torch
from conftest import DATA
from pycocotools.cocoeval import COCOeval
from torchvision.ops import batched_nms

from datasets.coco_eval import COCO_STATS, coco_evaluate, to_coco_rows
from datasets.loader import build_dataset, build_loader
from engine.evaluate import evaluate
from models.postprocess import grouped_nms, nms_best_first, postprocess, to_original_pixels, top_per_image
from utils.config_load import load_config

ROOT = DATA.parent.parent


def boxes_pred(boxes_cxcywh, classes, scores, num_classes=3, n=None):
    """One image's decoded prediction (1, N, 5 + C) with objectness = score and a one-hot class."""
    n = n or len(boxes_cxcywh)
    pred = torch.zeros(1, n, 5 + num_classes)
    pred[0, :len(boxes_cxcywh), :4] = torch.tensor(boxes_cxcywh, dtype=torch.float32)
    pred[0, :len(boxes_cxcywh), 4] = torch.tensor(scores)
    pred[0, torch.arange(len(classes)), 5 + torch.tensor(classes)] = 1.0
    return pred


def test_nms_merges_same_class_only():
    pred = boxes_pred([[50, 50, 20, 20], [52, 50, 20, 20], [52, 50, 20, 20], [150, 50, 20, 20]],
                      classes=[0, 0, 1, 0], scores=[0.9, 0.8, 0.7, 0.6])
    det = postprocess(pred, conf_threshold=0.1, nms_iou=0.5)
    # box 1 overlaps box 0 (IoU 18*20 / (2*400 - 360) = 0.82) in the same class: suppressed
    assert det[:, 5].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert det[:, 6].tolist() == [0, 1, 0]
    assert det[0, 1:5].tolist() == [40, 40, 60, 60]


def test_nms_does_not_merge_across_images():
    pred = torch.cat([boxes_pred([[50, 50, 20, 20]], [0], [0.9]), boxes_pred([[51, 50, 20, 20]], [0], [0.8])])
    det = postprocess(pred, conf_threshold=0.1, nms_iou=0.5)
    assert det[:, 0].tolist() == [0, 1]


def test_grouped_nms_in_chunks_hand_computed():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [1, 1, 11, 11], [-20, -20, -5, -5], [-19, -20, -5, -5.]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    groups = torch.tensor([0, 0, 1, 1, 1])
    # box 1 overlaps box 0 (IoU 81 / 119 = 0.68) in group 0; box 4 overlaps box 3 (IoU 14/15) in group 1 (negative
    # coordinates: the offsets must keep the groups apart all the same); box 2 is alone in group 1's positive corner
    for chunk in (1, 2, 100):
        assert grouped_nms(boxes, scores, groups, 0.5, chunk).tolist() == [0, 2, 3]
    assert grouped_nms(boxes[:0], scores[:0], groups[:0], 0.5, 256).shape == (0,)


def test_grouped_nms_in_chunks_keeps_what_batched_nms_keeps():
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        m = 200 * (seed + 1)
        corner = torch.rand(m, 2, generator=g) * 300 - 50
        boxes = torch.cat([corner, corner + torch.rand(m, 2, generator=g) * 80 + 1], 1)
        scores, groups = torch.rand(m, generator=g), torch.randint(0, 5 + 20 * seed, (m,), generator=g)
        expected = batched_nms(boxes, scores, groups, 0.5)
        for chunk in (1, 64, 500):
            kept = grouped_nms(boxes, scores, groups, 0.5, chunk)
            assert sorted(kept.tolist()) == sorted(expected.tolist()), (seed, chunk)
            assert torch.equal(scores[kept], scores[expected])  # best first


def test_nms_on_the_best_first_keeps_the_best_survivors_of_nms_on_all():
    g = torch.Generator().manual_seed(4)
    m = 3000
    corner = torch.rand(m, 2, generator=g) * 200
    boxes = torch.cat([corner, corner + torch.rand(m, 2, generator=g) * 60 + 5], 1)
    scores, image = torch.rand(m, generator=g), torch.randint(0, 3, (m,), generator=g)
    groups = image * 4 + torch.randint(0, 4, (m,), generator=g)
    # ~1000 candidates per image; the best 120 of images 0, 1, 2 hold 118, 117, 119 survivors, so max_det 118 with
    # first 120 runs image 1 again and keeps the first pass of images 0 and 2
    for max_det in (10, 100, 118):
        full = grouped_nms(boxes, scores, groups, 0.5, 256)
        expected = full[top_per_image(image[full], scores[full], max_det)]
        survivors = torch.bincount(image[full]).tolist()
        # first 5: every image runs again on all its candidates; 2000: no image has more; between: some may
        for first in (5, 50, 120, 400, 2000):
            kept = nms_best_first(boxes, scores, image, groups, 0.5, max_det, first, 256)
            assert (scores[kept].diff() <= 0).all()  # best first, with or without a second pass
            kept = kept[top_per_image(image[kept], scores[kept], max_det)]
            assert kept.tolist() == expected.tolist(), (max_det, first, survivors)
    assert nms_best_first(boxes[:0], scores[:0], image[:0], groups[:0], 0.5, 100, 1000, 256).shape == (0,)


def test_max_det_max_candidates_and_threshold():
    grid = [[10 + 20 * (i % 30), 10 + 20 * (i // 30), 10, 10] for i in range(300)]  # 300 disjoint boxes
    scores = np.linspace(0.99, 0.01, 300).tolist()
    pred = torch.cat([boxes_pred(grid, [0] * 300, scores)] * 2)
    det = postprocess(pred, conf_threshold=0.001, max_det=100)
    assert det[:, 0].tolist() == [0] * 100 + [1] * 100
    assert det[:100, 5].tolist() == pytest.approx(scores[:100])  # the best 100, best first
    det = postprocess(pred, conf_threshold=0.5, max_det=300)
    assert len(det) == 2 * sum(s > 0.5 for s in scores)
    det = postprocess(pred, conf_threshold=0.001, max_det=1000, max_candidates=50)
    assert len(det) == 100 and det[:50, 5].tolist() == pytest.approx(scores[:50])


def test_multi_label_keeps_every_class_above_threshold():
    pred = torch.zeros(1, 1, 8)
    pred[0, 0] = torch.tensor([50, 50, 20, 20, 1.0, 0.6, 0.3, 0.0001])
    assert postprocess(pred, conf_threshold=0.01)[:, 6].tolist() == [0, 1]
    assert postprocess(pred, conf_threshold=0.01, multi_label=False)[:, 6].tolist() == [0]


def test_untrained_scores_everywhere_stay_bounded():
    pred = torch.rand(2, 2535, 85) * 0.5 + 0.25  # every score above 0.001, as an untrained model gives
    det = postprocess(pred, conf_threshold=0.001, max_candidates=1000, max_det=100)
    assert det.shape[1] == 7 and (det[:, 0] == 0).sum() == 100 and (det[:, 0] == 1).sum() == 100


def test_class_79_is_written_as_category_90():
    det = torch.tensor([[0, 10.0, 20.0, 30.0, 60.0, 0.5, 79.0]])
    rows = to_coco_rows(det, [{"image_id": 42}], category_ids=list(range(1, 80)) + [90])
    assert rows.tolist() == [[42, 10.0, 20.0, 20.0, 40.0, 0.5, 90]]


# -- the whole path on tests/data/coco ---------------------------------------------------------------------------

class Replay(torch.nn.Module):
    """A stand-in model that returns prepared predictions, one tensor per call (the val loader is sequential)."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, images):
        out = self.outputs.pop(0)
        assert len(out) == len(images)
        return out


def val_setup(*overrides):
    cfg = load_config(ROOT / "args.yaml", [f"data.root={DATA / 'coco'}", "data.workers=0", *overrides])
    dataset = build_dataset(cfg, "val")
    return cfg, dataset, build_loader(cfg, dataset, train=False, batch_size=3)


def predictions_from_annotations(dataset, loader, shift=(0.0, 0.0), seed=0):
    """For each batch, decoded predictions (B, N, 85) placing a box on every (shifted) annotation, in input pixels,
    with varied scores; plus the same detections as COCO rows computed directly from the annotation file."""
    rng = np.random.default_rng(seed)
    outputs, rows = [], []
    for _, _, metas in loader:
        batch = torch.zeros(len(metas), 30, 85)
        for i, meta in enumerate(metas):
            anns = [a for a in dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=[meta["image_id"]]))
                    if not a["iscrowd"]]
            lb = meta["letterbox"]
            for j, a in enumerate(anns):
                x, y, w, h = a["bbox"]
                x, y = x + shift[0], y + shift[1]
                score = float(rng.uniform(0.3, 1.0))
                cx, cy = (x + w / 2) * lb.scale_x + lb.pad_left, (y + h / 2) * lb.scale_y + lb.pad_top
                batch[i, j, :5] = torch.tensor([cx, cy, w * lb.scale_x, h * lb.scale_y, score])
                batch[i, j, 5 + dataset.category_to_class[a["category_id"]]] = 1.0
                height, width = meta["orig_size"]
                x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)  # clipped as detections
                rows.append([meta["image_id"], x1, y1, x2 - x1, y2 - y1, score, a["category_id"]])
        outputs.append(batch)
    return outputs, np.array(rows)


def test_perfect_detections_give_ap_1_through_the_letterbox():
    cfg, dataset, loader = val_setup()
    outputs, _ = predictions_from_annotations(dataset, loader)
    result = evaluate(Replay(outputs), loader, cfg.eval, torch.device("cpu"), progress=False)
    assert result.stats["AP"] == pytest.approx(1.0) and result.stats["AP50"] == pytest.approx(1.0)
    assert result.stats["AP75"] == pytest.approx(1.0)
    assert len(result.rows) == 57  # one detection per annotation of the 8 images
    assert set(result.seconds) == {"data", "model", "postprocess", "cocoeval"}
    present = {k for k, v in result.per_class_ap50.items() if not np.isnan(v)}
    assert present and all(result.per_class_ap50[k] == pytest.approx(1.0) for k in present)


def test_shifted_boxes_score_as_pycocotools_scores_them():
    cfg, dataset, loader = val_setup()
    outputs, direct = predictions_from_annotations(dataset, loader, shift=(3.3, -2.1), seed=1)
    result = evaluate(Replay(outputs), loader, cfg.eval, torch.device("cpu"), progress=False)
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCOeval(dataset.coco, dataset.coco.loadRes(direct), "bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    assert 0.2 < result.stats["AP"] < 0.95  # the shift costs AP at the strict IoU thresholds
    assert [result.stats[k] for k in COCO_STATS] == pytest.approx(list(reference.stats), abs=1e-6)


def test_faster_coco_eval_backend_gives_the_same_numbers():
    pytest.importorskip("faster_coco_eval")
    _, dataset, loader = val_setup()
    _, rows = predictions_from_annotations(dataset, loader, shift=(3.3, -2.1), seed=1)
    a, per_a, _, pr_a = coco_evaluate(dataset.coco, rows, dataset.ids, dataset.class_names, "pycocotools")
    b, per_b, table, pr_b = coco_evaluate(dataset.coco, rows, dataset.ids, dataset.class_names, "faster_coco_eval")
    assert [a[k] for k in COCO_STATS] == pytest.approx([b[k] for k in COCO_STATS], abs=1e-6)
    assert pr_a.shape == (101, 80) and np.allclose(pr_a, pr_b, atol=1e-6)  # the PR curves' array too
    assert table.count("Average Precision") == 6


def test_no_detections_subset_and_empty_images():
    cfg, dataset, loader = val_setup()
    silent = Replay([torch.zeros(len(m), 10, 85) for _, _, m in loader])
    result = evaluate(silent, loader, cfg.eval, torch.device("cpu"), progress=False)
    assert result.stats == dict.fromkeys(COCO_STATS, 0.0) and len(result.rows) == 0
    # a subset holding only the two images without annotations
    cfg, dataset, loader = val_setup()
    dataset.ids = [226111, 58636]
    outputs = [boxes_pred([[100, 100, 50, 50]] * 2, [0, 1], [0.9, 0.8], num_classes=80).repeat(2, 1, 1)]
    result = evaluate(Replay(outputs), loader, cfg.eval, torch.device("cpu"), progress=False)
    assert len(result.rows) == 4 and set(result.rows[:, 0]) == {226111, 58636}
    assert result.stats["AP"] in (-1.0, 0.0)  # COCO's "no ground truth" marker or zero, never a crash


def test_to_original_pixels_inverts_and_clips():
    from datasets.transforms import Letterbox
    metas = [{"letterbox": Letterbox(0.5, 0.5, 0, 20), "orig_size": (100, 200)}]
    det = torch.tensor([[0, 10.0, 30.0, 90.0, 60.0, 0.9, 1.0], [0, -5.0, 10.0, 120.0, 100.0, 0.8, 2.0]])
    out = to_original_pixels(det, metas)
    assert out[0].tolist() == pytest.approx([0, 20, 20, 180, 80, 0.9, 1])
    assert out[1, 1:5].tolist() == pytest.approx([0, 0, 200, 100])  # clipped to the 200 x 100 image


def test_detect_batch_gives_original_pixels_and_keeps_every_modules_mode():
    """grid_model: one 16 x 16 box per stride-32 cell, class 2. A 128 x 64 (W x H) image letterboxed to 64 px is
    scaled by 0.5 and padded 16 px at the top, so the 2 x 2 cells' boxes (8-24, 40-56 px on each axis) come back at
    x 16-48 and 80-112, y (8 - 16) / 0.5 = -16 -> 0 to 16 and 48 to 80 -> 64 (clipped to the image)."""
    from conftest import grid_model

    from engine.evaluate import detect_batch
    from inference import letterbox_batch
    from utils.config import EvalConfig

    model = grid_model(num_classes=3).train()
    model.head16.eval()  # a module in another mode than the model's, as a frozen encoder is
    modes = {name: m.training for name, m in model.named_modules()}
    batch, metas = letterbox_batch([np.zeros((64, 128, 3), np.uint8)], 64)
    detections, _ = detect_batch(model, batch, metas, EvalConfig(), torch.device("cpu"))
    boxes = detections[:, 1:5][(detections[:, 1].round() * 1000 + detections[:, 2].round()).argsort()]  # x, then y
    expected = torch.tensor([[16.0, 0, 48, 16], [16, 48, 48, 64], [80, 0, 112, 16], [80, 48, 112, 64]])
    assert torch.allclose(boxes, expected, atol=1e-4)  # float32 decoding
    assert detections[:, 0].tolist() == [0] * 4 and detections[:, 6].tolist() == [2] * 4
    assert {name: m.training for name, m in model.named_modules()} == modes  # no caller switches it back
    model.eval()
    detect_batch(model, batch, metas, EvalConfig(), torch.device("cpu"))
    assert not any(m.training for m in model.modules())
