"""One form alone in a fresh process, timed: the worker `bench/deploy.py --alone` starts per form, batch and round.

    .venv/bin/python bench/alone.py --form ov --file yolov3-tiny.xml --batch 1 --size 416 --threads 2
    .venv/bin/python bench/alone.py --form tools --weights yolov3-tiny.weights --arch yolov3-tiny --batch 1 ...
    .venv/bin/python bench/alone.py --form compiled --weights ...   # as validation.py --compile runs it

Why a process per form: in bench/deploy.py's one process every runtime stays loaded with its thread pool (OpenMP,
TBB, ONNX Runtime's), and a runtime timed next to another ran slower than a user running it alone would see it
(BENCHMARKS.md, the OpenVINO caveat). Here the runtimes' forms import only their runtime and numpy, not torch; the
tools' form imports torch and the repository, as validation.py does. Prints one JSON line: the ms of each of --calls
back-to-back calls after --warm untimed ones, on the same seeded (B, 3, S, S) float input in [0, 1] as deploy.py's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def runtime_call(form: str, path: Path, threads: int) -> Callable[[np.ndarray], object]:
    """The exported file at `path` in its runtime alone (ort, ort-int8: ONNX Runtime's CPU provider; ov, int8:
    OpenVINO at its default precision hint; ov-f32: at f32), as deploy.py's ExportedModel configures it."""
    if form in ("ort", "ort-int8"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": threads, **({"INFERENCE_PRECISION_HINT": "f32"} if form == "ov-f32" else {})}
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    return lambda x: compiled(x)[0]


def tools_call(weights: Path, arch: str, size: int, threads: int, compile: bool = False
               ) -> Callable[[np.ndarray], object]:
    """The tools' form (BN fused, the probe's pick, under its autocast; `compile`: as validation.py --compile runs
    it, compiled at the first call) on a float input, as deploy.py times it."""
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.deploy import AutocastModule
    from inference import ready_for_inference
    from models.forms import choose_form
    from models.transfer import load_model
    from utils.config_load import load_config

    torch.set_num_threads(threads)
    cfg = load_config(ROOT / "args.yaml", [f"model.arch={arch}"])
    model = load_model(weights, cfg)[0].fuse()
    model, form = (ready_for_inference(model, torch.device("cpu"), size, compile=True) if compile
                   else choose_form(model, torch.device("cpu"), size))
    module = AutocastModule(model, form.dtype)
    print(f"form: {form}", file=sys.stderr)
    return lambda x: module(torch.from_numpy(x))


def main(argv: list[str] | None = None) -> None:
    """Build the form, warm it, time --calls calls, print {"ms": [...]}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--form", required=True,
                        choices=("tools", "ort", "ov", "ov-f32", "int8", "ort-int8", "compiled"))  # deploy.py's KEYS
    parser.add_argument("--file", type=Path, help="the exported file (every form but tools and compiled)")
    parser.add_argument("--weights", type=Path, help="the weights (tools, compiled)")
    parser.add_argument("--arch", default="yolov3-tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=416)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warm", type=int, default=5)
    parser.add_argument("--calls", type=int, default=15)
    args = parser.parse_args(argv)
    if args.form in ("tools", "compiled"):
        if args.weights is None:
            parser.error(f"--form {args.form} needs --weights")
        call = tools_call(args.weights, args.arch, args.size, args.threads, compile=args.form == "compiled")
    else:
        if args.file is None:
            parser.error(f"--form {args.form} needs --file (the exported model)")
        call = runtime_call(args.form, args.file, args.threads)
    # deploy.py's input: torch.rand with seed 0; here numpy's, the same distribution (speed does not depend on it)
    x = np.random.default_rng(0).random((args.batch, 3, args.size, args.size), dtype=np.float32)
    for _ in range(args.warm):
        call(x)
    ms = []
    for _ in range(args.calls):
        start = time.perf_counter()
        call(x)
        ms.append(1000 * (time.perf_counter() - start))
    print(json.dumps({"ms": ms}))


if __name__ == "__main__":
    main()
