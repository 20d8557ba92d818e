"""bench/: the whole suite runs end to end at a small size and reports every goal (the numbers are not checked:
no test depends on timing)."""
import subprocess
import sys

import pytest
from conftest import DATA

ROOT = DATA.parent.parent


@pytest.mark.slow
def test_bench_run_reports_every_goal_and_section():
    done = subprocess.run([sys.executable, "bench/run.py", "--data", str(DATA / "coco"), "--size", "64",
                           "--repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = done.stdout
    goals = [line for line in report.splitlines() if line.startswith("| ") and line.rstrip().endswith(
        ("| yes |", "| **no** |"))]
    assert len(goals) == 7, report  # one row per goal of bench/run.py's CPU_GOALS
    for section in ("### Model, training step, loss, post-processing", "### Data pipeline",
                    "### Evaluation time split", "Conv ceiling", "| yolov3-tiny darknet53", "| 2 | ",
                    "| pycocotools |", "| faster_coco_eval |", "glibc malloc pinned"):
        assert section in report, section


def test_bench_run_names_a_missing_data_folder(tmp_path):
    done = subprocess.run([sys.executable, "bench/run.py", "--data", str(tmp_path / "nowhere")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and f"--data {tmp_path / 'nowhere'}: no such folder" in done.stderr


@pytest.mark.slow
def test_grad_norms_reports_both_windows_and_the_limits():
    done = subprocess.run([sys.executable, "bench/grad_norms.py", "--root", str(DATA / "coco"), "--size", "64",
                           "--steps", "4", "--window", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = done.stdout
    for line in ("Machine: ", "| steps | mean loss | min | p10 | p50 | p90 | p99 | max |", "| 1-2 | ", "| 3-4 | ",
                 "| 10 | 4 of 4 |", "| 10000 | 0 of 4 |"):  # an untrained tiny's norm: hundreds
        assert line in report, line
