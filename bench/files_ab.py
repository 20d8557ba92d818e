"""Exported files timed against each other, each alone in a fresh process (bench/alone.py), alternating round by round:
e.g. the same model exported by two commits, to see what a change to the exported graph costs or saves.

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 .venv/bin/python bench/files_ab.py \\
        --file old int8 old/yolov3-tiny_int8.xml --file new int8 new/yolov3-tiny_int8.xml [--batch 1 8] [--rounds 5]

Each --file is LABEL FORM PATH (FORM as bench/alone.py's --form: ort, ov, ov-f32, int8, ort-int8). Per round, batch
and file: one process, 5 untimed calls, 15 timed back to back; the median of all of a file's timed calls. Prints a
markdown table, the files in the order given, (x) = time / the first file's of the same FORM.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import machine  # noqa: E402
from bench.deploy import BURST, KEYS, alone_worker  # noqa: E402

FORMS = KEYS[1:]  # every form of bench/deploy.py but the tools' own (a file is timed here)
CALLS = BURST * 5  # per worker: what bench/deploy.py --alone times


def main(argv: list[str] | None = None) -> None:
    """Time every --file at every --batch in alternating rounds; print markdown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", nargs=3, action="append", required=True, metavar=("LABEL", "FORM", "PATH"))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--size", type=int, default=416)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # the machine line reports it
    files = [(label, form, Path(path)) for label, form, path in args.file]
    for label, form, path in files:
        if form not in FORMS:
            raise SystemExit(f"error: --file {label} {form} {path}: FORM must be one of {', '.join(FORMS)}")
        if not path.is_file():
            raise SystemExit(f"error: --file {label} {form} {path}: no such file")
    ms: dict[tuple[int, int], list[float]] = {(b, i): [] for b in args.batch for i in range(len(files))}
    for _ in range(args.rounds):
        for batch in args.batch:
            for i, (_, form, path) in enumerate(files):
                ms[batch, i] += alone_worker(form, ["--file", str(path)], batch, args.size, args.threads)[0]
    print(f"Machine: {machine(torch.device('cpu'))}; {args.rounds} alternating rounds of {CALLS} calls, each file "
          f"alone in its process; input {args.size} px\n")
    print("| file | form | " + " | ".join(f"batch {b}, ms" for b in args.batch) + " |")
    print("|---|---|" + "---|" * len(args.batch))
    for i, (label, form, path) in enumerate(files):
        first = next(j for j, f in enumerate(files) if f[1] == form)
        cells = []
        for b in args.batch:
            median = statistics.median(ms[b, i])
            cells.append(f"{median:.1f}" + ("" if first == i else
                                            f" ({median / statistics.median(ms[b, first]):.2f}x)"))
        print(f"| {label} ({path.name}) | {form} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
