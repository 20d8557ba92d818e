"""tools.visualize_batch draws the targets where they are, and a missing dataset is a one-line error."""
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from datasets.coco import DatasetError
from datasets.loader import build_dataset
from datasets.shapes import generate_shapes
from tools import visualize_batch
from utils.config_load import load_config
from utils.plots import class_color

ROOT = Path(__file__).resolve().parents[1]


def test_writes_a_grid_with_boxes_in_class_colours(tmp_path, capsys):
    generate_shapes(tmp_path / "shapes", num_train=8, num_val=2, seed=0, size=96)
    out = tmp_path / "grid.png"
    visualize_batch.main(["--config", str(ROOT / "args.yaml"), "--set", f"data.root={tmp_path / 'shapes'}",
                          "data.workers=0", "data.multiscale=null", "data.img_size=96", "--split", "val",
                          "--batch-size", "2", "--out", str(out)])
    assert "wrote" in capsys.readouterr().out
    grid = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    assert grid.shape == (96, 96 * 2 + 4, 3)  # two 96 px tiles, 4 px gap
    colours = {class_color(c) for c in range(6)}
    drawn = {tuple(int(v) for v in px) for px in grid.reshape(-1, 3)} & colours
    assert drawn  # at least one box outline in a class colour


@pytest.mark.slow
def test_missing_dataset_names_folder_script_and_demo(tmp_path):
    cfg = load_config(ROOT / "args.yaml", [f"data.root={tmp_path / 'nothing'}"])
    with pytest.raises(DatasetError) as info:
        build_dataset(cfg, "train")
    message = str(info.value)
    for part in (str(tmp_path / "nothing" / "images" / "train2017"), "datasets/get_coco.sh", "datasets.shapes"):
        assert part in message
    run = subprocess.run([sys.executable, "-m", "tools.visualize_batch", "--set", f"data.root={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stderr and "data error: no train data" in run.stderr


def test_plots_class_colours_are_stable_and_distinct():
    # hue = class x golden ratio mod 1, saturation 0.85, value 1, x 255 truncated: class 0 is hue 0 -> (1, 0.15, 0.15);
    # class 1 hue 0.618 (sector 3, f 0.708) -> (p, q, v) = (0.15, 0.398, 1); class 2 hue 0.236 (sector 1, f 0.416)
    # -> (q, v, p) = (0.646, 1, 0.15). A function of the class alone, so a class has one colour in every picture.
    assert [class_color(c) for c in range(3)] == [(255, 38, 38), (38, 101, 255), (164, 255, 38)]
    assert len({class_color(c) for c in range(80)}) == 80
    assert np.array(class_color(0)).max() == 255
