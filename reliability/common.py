"""What the reliability scripts share: the tiny CPU training they run, and reading a process's resources."""
from __future__ import annotations

import os
import re
import runpy
import sys
from pathlib import Path

from datasets.shapes import generate_shapes

ROOT = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r" step (\d+)/(\d+) \| loss ")  # main.py's log line, one per logging.every steps


def make_shapes(root: Path, train: int = 16, val: int = 4) -> Path:
    """A small synthetic shapes set (96 px images) at `root`, written once; returns root."""
    if not (root / "annotations" / "instances_val2017.json").is_file():
        generate_shapes(root, num_train=train, num_val=val, seed=0, size=96)
    return root


def tiny_run_args(shapes: Path, logs: Path, *overrides: str) -> list[str]:
    """main.py arguments for a YOLOv3-tiny training at 64-96 px on the CPU, logging every step into `logs`."""
    return ["--config", str(ROOT / "args.yaml"), "--device", "cpu", "--set", f"data.root={shapes}",
            "model.num_classes=6", "model.arch=yolov3-tiny", "data.img_size=64", "data.multiscale=[64,96]",
            "data.multiscale_every=1", "data.workers=0", "train.batch_size=4", "train.subdivisions=2",
            "train.burn_in=2", "train.amp=fp32", "eval.amp=fp32", "eval.every=1000", "eval.batch_size=4",
            "logging.every=1", "logging.images=2", f"logging.dir={logs}", *overrides]


def run_main(args: list[str]) -> None:
    """Run main.py with `args` in this process, as `python main.py ARGS` would (runpy: no import of the script),
    so that this process's memory, file descriptors and workers are the training's."""
    saved = sys.argv
    sys.argv = [str(ROOT / "main.py"), *args]
    try:
        runpy.run_path(str(ROOT / "main.py"), run_name="__main__")
    finally:
        sys.argv = saved


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process (Linux /proc), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


def pss_bytes(pid: int | str = "self") -> int:
    """Proportional set size of a process (Linux /proc): its private memory plus its share of pages it shares
    (forked DataLoader workers share most of theirs with the trainer, so their RSS would count those again)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/smaps_rollup has no Pss line")


def child_pids(pid: int | None = None) -> list[int]:
    """Live child processes of `pid` (default: this process), from /proc."""
    pid = os.getpid() if pid is None else pid
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # exited while we looked
                continue
            fields = stat.rsplit(")", 1)[1].split()  # after "pid (command)": state, ppid, ...
            if int(fields[1]) == pid and fields[0] != "Z":
                children.append(int(entry.name))
    return children


def open_fds() -> list[str]:
    """What this process's open file descriptors point at (Linux /proc/self/fd)."""
    fds = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            fds.append(os.readlink(fd))
        except OSError:  # the descriptor listdir itself used, closed by now
            continue
    return fds


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
