"""tools.anchors: IoU of (w, h) boxes, k-means recovering known clusters, COCO loading, the CLI's paste lines."""
import json

import numpy as np
import pytest
import yaml

import datasets.anchors as anchors_tool
from datasets.coco import DatasetError
from models import DARKNET_ANCHORS
from tools.anchors import anchor_fitness, kmeans_anchors, load_box_sizes, main, round_anchors, wh_iou
from utils.config_load import load_config

CLUSTERS = np.array([[10.0, 20.0], [50.0, 40.0], [200.0, 150.0]])  # (w, h), ascending area


def three_clusters(n_per: int = 200, seed: int = 0) -> np.ndarray:
    """Sizes within +-3% of each of CLUSTERS, shuffled: (3 * n_per, 2)."""
    rng = np.random.default_rng(seed)
    wh = np.concatenate([c * rng.uniform(0.97, 1.03, (n_per, 2)) for c in CLUSTERS])
    return rng.permutation(wh)


def write_coco(path, images, annotations):
    images = [{"file_name": f"{image['id']}.jpg", **image} for image in images]
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "thing"}]}))
    return path


def ann(ann_id, image_id, w, h, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "bbox": [1.0, 2.0, w, h], "iscrowd": iscrowd, "category_id": 1}


def test_wh_iou_by_hand():
    iou = wh_iou(np.array([[2.0, 2.0], [4.0, 1.0]]), np.array([[4.0, 1.0], [2.0, 2.0], [1.0, 1.0]]))
    assert iou.shape == (2, 3)
    # (2,2) vs (4,1): intersection 2*1 = 2, union 4 + 4 - 2 = 6; (2,2) vs (1,1): 1 / 4; (4,1) vs (1,1): 1 / 4
    np.testing.assert_allclose(iou, [[1 / 3, 1.0, 0.25], [1.0, 1 / 3, 0.25]])


def test_anchor_fitness_by_hand():
    fitness = anchor_fitness(np.array([[2.0, 2.0], [4.0, 1.0]]), np.array([[2, 2]]))  # best IoUs 1 and 1/3
    assert fitness == pytest.approx({"mean_iou": 2 / 3, "recall_0.5": 0.5, "recall_0.25": 1.0})


def test_kmeans_recovers_three_clusters_sorted_and_deterministic():
    wh = three_clusters()
    anchors = kmeans_anchors(wh, 3, seed=0)
    assert anchors.shape == (3, 2)
    np.testing.assert_allclose(anchors, CLUSTERS, rtol=0.05)
    assert np.all(np.diff(anchors.prod(1)) > 0)  # ascending area: smallest anchors go to the stride-8 head
    np.testing.assert_array_equal(kmeans_anchors(wh, 3, seed=0), anchors)
    np.testing.assert_allclose(kmeans_anchors(wh, 3, seed=7), CLUSTERS, rtol=0.05)


def test_kmeans_exact_on_repeated_sizes():
    wh = np.repeat(CLUSTERS[::-1], [5, 3, 4], axis=0)
    np.testing.assert_array_equal(kmeans_anchors(wh, 3, restarts=1), CLUSTERS)


def test_kmeans_anchors_fit_better_than_darknet():
    wh = three_clusters()
    fitness = anchor_fitness(wh, kmeans_anchors(wh, 9))
    darknet = anchor_fitness(wh, np.array(DARKNET_ANCHORS["yolov3"]))
    assert fitness["mean_iou"] >= darknet["mean_iou"]
    assert fitness["recall_0.5"] >= darknet["recall_0.5"]
    assert anchor_fitness(wh, kmeans_anchors(wh, 3))["recall_0.5"] == 1.0


def test_kmeans_reseeds_empty_clusters_at_worst_fit_boxes(monkeypatch):
    # all centroids start on one big box: two clusters are empty and must be re-seeded, one after the other,
    # at the box the others fit worst (first a small one, then a medium one), so all three clusters are found
    wh = three_clusters()
    monkeypatch.setattr(anchors_tool, "_init_plusplus", lambda wh, k, rng: np.tile(CLUSTERS[2], (k, 1)))
    np.testing.assert_allclose(kmeans_anchors(wh, 3, restarts=1), CLUSTERS, rtol=0.05)


def test_kmeans_rejects_fewer_boxes_than_anchors():
    with pytest.raises(ValueError, match="2 boxes cannot make 3 anchors"):
        kmeans_anchors(CLUSTERS[:2], 3)


def test_round_anchors_keeps_one_pixel_and_area_order():
    rounded = round_anchors(np.array([[0.4, 3.0], [3.4, 2.6], [2.0, 2.2]]))
    np.testing.assert_array_equal(rounded, [[1, 3], [2, 2], [3, 3]])


def test_load_box_sizes_letterbox_scale_and_skips(tmp_path):
    images = [{"id": 1, "width": 640, "height": 480}, {"id": 2, "width": 300, "height": 600},
              {"id": 3, "width": 208, "height": 100}]
    annotations = [ann(10, 1, 100, 50), ann(11, 2, 30, 60), ann(12, 3, 10, 5),
                   ann(13, 1, 80, 80, iscrowd=1), ann(14, 2, 0, 10), ann(15, 3, 4, -1)]
    wh, skipped = load_box_sizes(write_coco(tmp_path / "a.json", images, annotations), 416)
    assert skipped == {"crowd": 1, "zero or negative size": 2}  # counted as training counts them
    # scale = 416 / max(w, h): 416/640 = 0.65, 416/600, 416/208 = 2 (small images are scaled up); float32 boxes
    np.testing.assert_allclose(wh, [[65.0, 32.5], [30 * 416 / 600, 60 * 416 / 600], [20.0, 10.0]], rtol=1e-6)


def test_load_box_sizes_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        load_box_sizes(tmp_path / "missing.json", 416)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="bad.json: not valid JSON"):
        load_box_sizes(bad, 416)
    no_annotations = tmp_path / "no_annotations.json"
    no_annotations.write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError, match=r"no_annotations\.json: missing or not a list: key 'annotations'"):
        load_box_sizes(no_annotations, 416)
    images = [{"id": 1, "width": 10, "height": 10}]
    path = write_coco(tmp_path / "orphan.json", images, [ann(10, 1, 5, 5), ann(77, 2, 5, 5)])
    with pytest.raises(DatasetError, match=r"annotation id 77 refers to image_id 2, which is not in 'images'"):
        load_box_sizes(path, 416)
    path = write_coco(tmp_path / "nobbox.json", images, [{"id": 5, "image_id": 1, "category_id": 1}])
    with pytest.raises(DatasetError, match=r"nobbox\.json: annotations\[0\] \(id 5\) lacks key 'bbox'"):
        load_box_sizes(path, 416)


def test_cli_tiny_prints_loadable_anchors(tmp_path, capsys):
    wh = three_clusters(n_per=20)
    images = [{"id": 1, "width": 416, "height": 208}]  # scale 1: sizes go through unchanged
    annotations = [ann(i, 1, float(w), float(h)) for i, (w, h) in enumerate(wh)] + [ann(999, 1, 5, 5, iscrowd=1)]
    path = write_coco(tmp_path / "train.json", images, annotations)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    main(["--annotations", str(path), "--num", "6", "--config", str(empty), "--set", "model.arch=yolov3-tiny"])
    out = capsys.readouterr().out
    assert "boxes: 60 used, 1 left out (1 crowd)" in out
    assert "Darknet yolov3-tiny" in out
    line = next(line for line in out.splitlines() if "--set model.anchors=" in line)
    value = line.split("--set model.anchors=", 1)[1].strip("'")
    anchors = yaml.safe_load(value)
    assert len(anchors) == 6 and all(isinstance(v, int) for pair in anchors for v in pair)
    cfg = load_config(empty, ["model.arch=yolov3-tiny", f"model.anchors={value}"])
    assert cfg.model.anchors == anchors
    assert f"  anchors: {anchors}" in out  # the args.yaml line


def test_cli_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(SystemExit, match="error: annotation file not found: .*missing.json"):
        main(["--annotations", str(tmp_path / "missing.json"), "--config", str(empty)])
    path = write_coco(tmp_path / "few.json", [{"id": 1, "width": 10, "height": 10}],
                      [ann(i, 1, 2 + i, 3) for i in range(5)] + [ann(9, 1, 0, 3)])
    with pytest.raises(SystemExit, match="5 usable boxes .* cannot make 9 anchors"):
        main(["--annotations", str(path), "--config", str(empty)])
