"""bench/: the whole suite runs end to end at a small size and reports every goal (the numbers are not checked:
no test depends on timing)."""
import subprocess
import sys

import pytest
import torch
from conftest import DATA

from bench.common import bf16_supported, machine_kind
from bench.run import BEGIN, END, NEW_KINDS, write_section
from models.packed import packing_available

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
                    "| pycocotools |", "| faster_coco_eval |", "glibc malloc pinned", "The tools' inference form",
                    "(the tools' pick) |", "| / fp32 ceiling | / bf16 ceiling |", "native bf16: "):
        assert section in report, section
    assert report.startswith(f"## {machine_kind(torch.device('cpu'))}\n")
    for form in ("| BN fused, inference_mode | 1 |", "| fused + channels_last | 1 |"):  # fp32 NCHW, NHWC
        assert form in report, form
    assert ("| fused + channels_last + packed weights | 1 |" in report) is packing_available()
    if bf16_supported(torch.device("cpu")):
        assert "| fused + channels_last + bf16 | 1 |" in report and "the same conv under bf16 autocast: **" in report
        assert "| make demo's step: yolov3-tiny at 160, batch 16 |" in report
    else:
        assert "| fused + channels_last + bf16 | - | not run: no native bf16 here" in report


def test_bench_run_names_a_missing_data_folder(tmp_path):
    done = subprocess.run([sys.executable, "bench/run.py", "--data", str(tmp_path / "nowhere")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and f"--data {tmp_path / 'nowhere'}: no such folder" in done.stderr


@pytest.mark.parametrize("script", ["run.py", "data_pipeline.py", "own_data.py"])
def test_bench_scripts_ask_for_data(script):
    """No default data folder (a clone has none to point at): leaving --data out is an error that names it."""
    done = subprocess.run([sys.executable, f"bench/{script}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "the following arguments are required: --data" in done.stderr, done.stderr


def test_own_data_refuses_a_run_of_no_steps(tmp_path):
    """--steps 0 would train nothing and report the start as the result: refused, naming the value."""
    done = subprocess.run([sys.executable, "bench/own_data.py", "--data", str(tmp_path), "--weights", "w",
                           "--steps", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--steps 0: give a positive number of optimiser steps" in done.stderr


def test_bench_script_names_a_missing_data_folder(tmp_path):
    done = subprocess.run([sys.executable, "bench/evaluation.py", "--data", str(tmp_path / "nowhere")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and f"error: --data {tmp_path / 'nowhere'}: no such folder" in done.stderr


PAGE = f"""# Benchmarks

intro

## CPU A, 2 cores, AVX2 (no AVX-512)

old notes without markers
| old | table |

## CPU B, 2 cores, AVX-512 + AVX512-BF16 (no AMX)

notes that stay

{BEGIN}
### Goals, then
| b | old |
{END}

more notes that stay

{NEW_KINDS}

## The demo

demo text
"""


def test_write_section_replaces_this_kinds_block_and_keeps_the_rest(tmp_path):
    page, history = tmp_path / "BENCHMARKS.md", tmp_path / "BENCHMARKS_HISTORY.md"
    page.write_text(PAGE)
    history.write_text("# history\n")
    write_section(page, history, "CPU B, 2 cores, AVX-512 + AVX512-BF16 (no AMX)", "### Goals, now\n| b | new |",
                  "2026-11-27 10:00")
    text = page.read_text()
    assert "| b | new |" in text and "| b | old |" not in text
    assert "notes that stay" in text and "more notes that stay" in text and "## The demo\n\ndemo text" in text
    assert "| old | table |" in text  # another kind's section is untouched
    assert history.read_text() == ("# history\n\n## CPU B, 2 cores, AVX-512 + AVX512-BF16 (no AMX): bench/run.py "
                                   "figures superseded 2026-11-27 10:00\n\n### Goals, then\n| b | old |\n")

    write_section(page, history, "CPU A, 2 cores, AVX2 (no AVX-512)", "| a | new |", "2026-11-27 11:00")
    text = page.read_text()
    assert f"## CPU A, 2 cores, AVX2 (no AVX-512)\n\n{BEGIN}\n| a | new |\n{END}\n\n## CPU B" in text
    assert "old notes without markers" not in text and "old notes without markers" in history.read_text()

    write_section(page, history, "GPU C", "| c | new |", "2026-11-27 12:00")  # a new kind: above NEW_KINDS
    text = page.read_text()
    assert text.index("## GPU C") < text.index(NEW_KINDS) < text.index("## The demo")
    assert f"## GPU C\n\n{BEGIN}\n| c | new |\n{END}\n" in text
    assert history.read_text().count("superseded") == 2  # nothing was measured before for GPU C


def test_machine_kind_is_model_cores_and_isa_class(monkeypatch):
    import bench.common as common
    monkeypatch.setattr(common.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(common, "isa_class", lambda: "AVX-512 + AVX512-BF16 + AMX-BF16")
    monkeypatch.setattr(common, "cpu_model", lambda: "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz")
    assert machine_kind(torch.device("cpu")) == "Intel Xeon Platinum 8481C, 2 cores, AVX-512 + AVX512-BF16 + AMX-BF16"
    monkeypatch.setattr(common, "cpu_model", lambda: "AMD EPYC")
    monkeypatch.setattr(common, "isa_class", lambda: "AVX-512 + AVX512-BF16 (no AMX)")
    assert machine_kind(torch.device("cpu")) == "AMD EPYC, 2 cores, AVX-512 + AVX512-BF16 (no AMX)"


@pytest.mark.slow
def test_grad_norms_reports_both_windows_and_the_limits():
    done = subprocess.run([sys.executable, "bench/grad_norms.py", "--data", str(DATA / "coco"), "--size", "64",
                           "--steps", "4", "--window", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = done.stdout
    for line in ("Machine: ", "| steps | mean loss | min | p10 | p50 | p90 | p99 | max |", "| 1-2 | ", "| 3-4 | ",
                 "| 10 | 4 of 4 |", "| 10000 | 0 of 4 |"):  # an untrained tiny's norm: hundreds
        assert line in report, line


def test_train_speed_times_each_variant_against_main_and_the_loader():
    """bench/train_speed.py (issue 23's prepared GPU run) end to end on the CPU at a toy size: one row per variant,
    'main' at 1.00x of itself, the loader at data.workers auto."""
    done = subprocess.run([sys.executable, "bench/train_speed.py", "--device", "cpu", "--data", str(DATA / "coco"),
                           "--arch", "yolov3-tiny", "--size", "64", "--batch", "2", "--variants", "other-amp", "nchw",
                           "foreach", "--warmup", "1", "--steps", "2", "--rounds", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {line.split(" | ")[0][2:]: line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert {"main", "other-amp", "nchw", "foreach"} <= set(rows), done.stdout  # main is added as the reference
    assert "| **1.00x** |" in rows["main"]
    assert "yolov3-tiny at 64, batch 2, 2 alternating rounds of 2 steps" in done.stdout
    other = "fp32" if bf16_supported(torch.device("cpu")) else "bfloat16"
    assert rows["other-amp"].split(" | ")[2] == other
    assert " (data.workers auto here) | " in done.stdout and "the loader " in done.stdout
    assert "round 2: main " in done.stderr  # progress as it goes


def test_train_speed_reports_a_variant_that_fails_and_goes_on(monkeypatch, capsys):
    import argparse

    import bench.train_speed as train_speed

    def build(size, batch, device, dtype, arch, **options):
        if options.get("foreach"):
            raise RuntimeError("foreach Adam is off here\nsecond line")
        return lambda: None

    monkeypatch.setattr(train_speed, "train_step_fn", build)
    args = argparse.Namespace(size=64, batch=2, arch="yolov3-tiny", warmup=1)
    steps, seconds, errors = train_speed.build_variants(["main", "foreach", "nchw"], args, torch.device("cpu"))
    assert set(steps) == set(seconds) == {"main", "nchw"}
    assert errors == {"foreach": "RuntimeError: foreach Adam is off here"}
    assert "foreach: failed to build: RuntimeError" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no CUDA device is")
def test_train_speed_on_cuda_without_a_gpu_says_so():
    done = subprocess.run([sys.executable, "bench/train_speed.py", "--device", "cuda", "--data", str(DATA / "coco")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "--device cuda: torch sees no CUDA device" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
