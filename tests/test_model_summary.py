"""tools.model_summary, the README's demo until training lands: it runs and prints the exact counts."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_model_summary_all_variants():
    run = subprocess.run([sys.executable, "-m", "tools.model_summary", "--all", "--gpu", "-1",
                          "--set", "data.img_size=64"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = {tuple(line.split()[:2]): line.split() for line in run.stdout.splitlines()[1:]}
    assert set(rows) == {("yolov3", "darknet53"), ("yolov3", "mobilenet_v3_large"),
                         ("yolov3", "mobilenet_v3_small"), ("yolov3-tiny", "darknet53")}
    assert rows["yolov3", "darknet53"][2] == "61,949,149"
    assert rows["yolov3-tiny", "darknet53"][2] == "8,852,366"
    assert rows["yolov3", "darknet53"][4] == "1x252x85"  # 3 anchors x (2x2 + 4x4 + 8x8) cells at 64 px
    assert all(float(row[-1]) < 1e-3 for row in rows.values())  # fused vs unfused


@pytest.mark.slow
def test_model_summary_bad_config_value_is_one_line_error():
    run = subprocess.run([sys.executable, "-m", "tools.model_summary", "--set", "data.img_size=100"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "data.img_size=100: must be a positive multiple of 32; use 96 or 128" in run.stderr
    assert "Traceback" not in run.stderr
