"""Run every bench/ script, print one summary table against the project's goals, and optionally record it.

    .venv/bin/python bench/run.py --data DIR                 # CPU: model, loss, post-processing, data, evaluation
    .venv/bin/python bench/run.py --data DIR --device cuda   # GPU: AMP training, inference FPS, loader with all cores
    .venv/bin/python bench/run.py --data DIR --write         # also write this machine kind's section of BENCHMARKS.md

Each script runs in its own process with glibc malloc pinned (MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ set
to 1e9 unless already set): without it, page faults on fresh conv buffers swing CPU timings by 30-40%.

BENCHMARKS.md is the current page: one `## <machine kind>` section per kind of machine (bench/common.py
machine_kind: CPU model, cores and ISA class, or the GPU's name). `--write` replaces the block between that
section's BEGIN and END markers with this run's report (a section without markers is replaced whole; a kind
without a section gets a new one above NEW_KINDS) and appends the block it replaced, dated, to
docs/BENCHMARKS_HISTORY.md. What is outside the markers (notes, accuracy tables) stays.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- bench/run.py --write: begin (this block is replaced by the next run on this machine kind) -->"
END = "<!-- bench/run.py --write: end -->"
NEW_KINDS = "<!-- bench/run.py --write: sections of new machine kinds go above this line -->"
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000"}

# (figure, label, goal, higher is better): the goals of the performance issue, for the CPU runs
CPU_GOALS = [
    ("forward_ratio_batch1", "YOLOv3 forward at 416, batch 1, best eager form: GFLOP/s / its precision's conv ceiling",
     0.85, True),
    ("forward_ratio_batch8", "YOLOv3 forward at 416, batch 8, best eager form: GFLOP/s / its precision's conv ceiling",
     0.90, True),
    ("train_images_per_s", "YOLOv3 training step at 416, batch 8: images/s", 2.0, True),
    ("loss_ms", "target building + loss forward, batch 8, 50 boxes/image: ms", 3.0, False),
    ("post_over_forward_trained_like", "post-processing / forward, batch 8, trained-like scores", 0.05, False),
    ("images_per_s_per_process", "data pipeline, one process, full augmentation: images/s", 250.0, True),
    ("loader_scaling", "DataLoader 2 workers / 1 worker", 1.8, True),
]


def run_script(name: str, args: list[str]) -> tuple[str, dict[str, float]]:
    """Run bench/<name> in a child process with malloc pinned; its markdown output and its --json figures."""
    env = {**os.environ, **{k: v for k, v in MALLOC.items() if k not in os.environ},
           "NO_ALBUMENTATIONS_UPDATE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        figures_path = Path(tmp) / "figures.json"
        done = subprocess.run([sys.executable, str(ROOT / "bench" / name), *args, "--json", str(figures_path)],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"bench/{name} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done.stdout, json.loads(figures_path.read_text())


def python_name() -> str:
    """The interpreter running this, as a command would name it: relative to the repository when it is inside."""
    python = Path(sys.executable)
    return str(python.relative_to(ROOT)) if python.is_relative_to(ROOT) else str(python)


def summary(figures: dict[str, float], device: str) -> list[str]:
    """The goals table (CPU), or which of training and data loading bounds the GPU run."""
    if device == "cuda":
        train, loader = figures["train_images_per_s"], figures["loader_all_workers"]
        bound = "the data loader" if loader < train else "the GPU (training step)"
        return ["| figure | value |", "|---|---|",
                f"| training, AMP, batch 64, 416: images/s | {train:.1f} |",
                f"| inference FPS, batch 1 / batch 32 | {1000 / figures['forward_ms_batch1']:.1f} / "
                f"{1000 / figures['forward_ms_batch32']:.1f} |",
                f"| DataLoader, {os.cpu_count()} workers: images/s | {loader:.0f} "
                f"({figures[f'loader_{os.cpu_count()}_workers_scaling']:.1f}x one worker's "
                f"{figures['loader_1_workers']:.0f}) |",
                f"| bound by | **{bound}** |"]
    lines = ["| figure | goal | measured | met |", "|---|---|---|---|"]
    for key, label, goal, higher in CPU_GOALS:
        value = figures[key]
        met = value >= goal if higher else value <= goal
        shown = f"{value:.3g}"
        if float(shown) == goal != value:  # 1.7996 would read "1.8" beside ">= 1.8 | no"
            shown = f"{value:.5g}"
        lines.append(f"| {label} | {'>=' if higher else '<='} {goal:g} | {shown} | {'yes' if met else '**no**'} |")
    lines += ["", f"- The tools' inference form here: {figures['tools_form'].removeprefix('- ')}."]
    if "ceiling_bf16_gflops" in figures:
        lines += [f"- bf16 conv ceiling {figures['ceiling_bf16_gflops']:.1f} GFLOP/s vs fp32 "
                  f"{figures['ceiling_gflops']:.1f}; training step bf16 / fp32 (paired): YOLOv3 "
                  f"{figures['train_bf16_speedup']:.2f}x, the demo's {figures['demo_step_bf16_speedup']:.2f}x."]
    else:
        lines += ["- No native bf16 here: no bf16 ceiling, bf16 forms and training not run (train.amp auto: fp32)."]
    return lines


def write_section(page: Path, history: Path, kind: str, block: str, when: str) -> None:
    """Put `block` between the BEGIN / END markers of page's `## kind` section (the section replaced whole where it
    has no markers, created above NEW_KINDS, or at the end, where there is none) and append the block it replaces,
    if it held any table, to `history` under a dated heading."""
    text, heading = page.read_text(), f"## {kind}\n"
    fresh = f"{BEGIN}\n{block.strip()}\n{END}\n"
    found = re.search(f"^{re.escape(heading)}", text, re.MULTILINE)
    old = ""
    if found is None:
        at = text.find(NEW_KINDS)
        at = len(text) if at < 0 else at
        text = f"{text[:at].rstrip()}\n\n{heading}\n{fresh}\n{text[at:]}"
    else:
        start = found.start()
        following = re.compile("^## ", re.MULTILINE).search(text, found.end())
        end = following.start() if following else len(text)
        section = text[start:end]
        if BEGIN in section and END in section:
            a, b = section.index(BEGIN), section.index(END) + len(END)
            old, section = section[a + len(BEGIN):b - len(END)], section[:a] + fresh.rstrip("\n") + section[b:]
        else:
            old, section = section[len(heading):], f"{heading}\n{fresh}\n"
        text = text[:start] + section + text[end:]
    page.write_text(text)
    if "\n|" in old:
        with history.open("a") as f:
            f.write(f"\n## {kind}: bench/run.py figures superseded {when}\n\n{old.strip()}\n")


def this_machine_kind(device: str) -> str:
    """bench/common.py machine_kind of `device`, imported only now: torch takes seconds to import, and the scripts
    that need it run in their own processes."""
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.common import machine_kind
    return machine_kind(torch.device(device))


def main() -> None:
    """Run the scripts, print the report, write it into BENCHMARKS.md with --write."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--data", required=True, metavar="DIR", help="COCO-format data for the data and evaluation "
                        "benches (images/ and annotations/ as datasets/get_coco.sh writes them)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=416, help="input size of every bench (the goals are at 416)")
    parser.add_argument("--write", action="store_true", help="write the report into this machine kind's section of "
                        "BENCHMARKS.md (the block it replaces moves to docs/BENCHMARKS_HISTORY.md)")
    parser.add_argument("--compile", action="store_true", help="also time YOLOv3 under torch.compile (bench only)")
    args = parser.parse_args()
    if not (ROOT / args.data).exists() and not Path(args.data).exists():
        raise SystemExit(f"--data {args.data}: no such folder; point it at a COCO-format set (images/ and "
                         "annotations/ as datasets/get_coco.sh writes them)")
    sections, figures = [], {}
    workers = ["1", str(os.cpu_count())] if args.device == "cuda" else ["1", "2"]
    plan = [("model.py", "Model, training step, loss, post-processing",
             ["--device", args.device, "--repeats", str(args.repeats), "--size", str(args.size),
              *(["--compile"] if args.compile else [])]),
            ("data_pipeline.py", "Data pipeline", ["--data", args.data, "--repeats", str(args.repeats),
                                                   "--size", str(args.size), "--workers", *workers])]
    if args.device == "cpu":
        plan.append(("evaluation.py", "Evaluation time split", ["--data", args.data, "--size", str(args.size)]))
    for script, title, script_args in plan:
        print(f"running bench/{script} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        text, found = run_script(script, script_args)
        figures.update(found)
        sections.append(f"### {title} (`bench/{script} {' '.join(script_args)}`, "
                        f"{time.perf_counter() - start:.0f} s)\n\n{text.strip()}\n")
    if args.device == "cpu":
        figures["loader_scaling"] = figures["loader_2_workers_scaling"]  # paired per round, not a ratio of medians
    else:
        figures["loader_all_workers"] = figures[f"loader_{os.cpu_count()}_workers"]
    options = (f" --data {args.data}" + (" --device cuda" if args.device == "cuda" else "")
               + (" --compile" if args.compile else ""))
    when = time.strftime("%Y-%m-%d %H:%M")
    block = "\n".join([f"### {'Summary' if args.device == 'cuda' else 'Goals'}, {when}", "",
                       f"Command: `{python_name()} bench/run.py{options}` (malloc pinned by the script)", "",
                       *summary(figures, args.device), "", *sections])
    kind = this_machine_kind(args.device)
    print(f"## {kind}\n\n{block}")
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", ROOT / "docs" / "BENCHMARKS_HISTORY.md", kind, block, when)
        print(f"wrote the '## {kind}' section of {ROOT / 'BENCHMARKS.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
