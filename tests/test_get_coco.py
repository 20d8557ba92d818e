"""datasets/get_coco.sh against a local mirror with zips shaped like the official ones."""
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from datasets.loader import build_dataset
from utils.config_load import load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "datasets" / "get_coco.sh"
pytestmark = pytest.mark.skipif(not (shutil.which("curl") and shutil.which("unzip")), reason="needs curl and unzip")


def make_mirror(root):
    ok, jpeg = cv2.imencode(".jpg", np.zeros((20, 30, 3), np.uint8))
    (root / "zips").mkdir(parents=True)
    (root / "annotations").mkdir()
    for split in ("train2017", "val2017"):
        with zipfile.ZipFile(root / "zips" / f"{split}.zip", "w") as z:
            z.writestr(f"{split}/000000000001.jpg", jpeg.tobytes())
    with zipfile.ZipFile(root / "annotations" / "annotations_trainval2017.zip", "w") as z:
        for split in ("train2017", "val2017"):
            data = {"images": [{"id": 1, "file_name": "000000000001.jpg", "width": 30, "height": 20}],
                    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 5]}],
                    "categories": [{"id": 1, "name": "thing"}]}
            z.writestr(f"annotations/instances_{split}.json", json.dumps(data))
            z.writestr(f"annotations/captions_{split}.json", "{}")


def run(out, mirror):
    env = {**os.environ, "BASE_URL": f"file://{mirror}"}
    return subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=120)


def test_layout_after_download_loads(tmp_path):
    make_mirror(tmp_path / "mirror")
    result = run(tmp_path / "coco", tmp_path / "mirror")
    assert result.returncode == 0, result.stderr
    assert "(1 train, 1 val images)" in result.stdout
    out = tmp_path / "coco"
    assert (out / "images" / "val2017" / "000000000001.jpg").is_file()
    assert not (out / "annotations" / "captions_train2017.json").exists()
    cfg = load_config(ROOT / "args.yaml", [f"data.root={out}"])
    _, targets, _ = build_dataset(cfg, "val")[0]
    assert targets.shape == (1, 5)


def test_failed_download_says_so(tmp_path):
    make_mirror(tmp_path / "mirror")
    (tmp_path / "mirror" / "zips" / "train2017.zip").unlink()
    result = run(tmp_path / "coco", tmp_path / "mirror")
    assert result.returncode != 0
    assert "error: could not download" in result.stderr and "train2017.zip" in result.stderr
