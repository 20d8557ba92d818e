"""CPU inference of the tools' own form against what a user would deploy instead, and what each costs in AP50.

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 .venv/bin/python bench/deploy.py \\
        --data data/coco_mini --weights models/weights/yolov3-tiny.weights [--size 416] [--rounds 7] [--threads 2]

For YOLOv3 and YOLOv3-tiny at --size, batch 1 and 8, in alternating rounds (per round and form: half a second's
pause, one untimed call, then BURST timed calls back to back, as a model serving a stream of requests runs: see
PAUSE; the median of all of a form's timed calls), all with --threads threads:
- the tools' form: the BN-fused model in the form models/forms.py's probe picks here (what validation.py runs);
- the same model as `validation.py --compile` runs it (inference.ready_for_inference: inductor, frozen weights, the
  C++ wrapper, bf16 autocast where the CPU has native bf16), compiled at its first call (untimed);
- ONNX Runtime fp32 on the .onnx that export.py writes (CPU provider, graph optimisations on, its default);
- OpenVINO on the .xml export.py writes, at its default precision hint (bf16 on a CPU with native bf16) and at f32;
- the INT8 files: export.py --int8 (NNCF, preset mixed, on the OpenVINO file, at OpenVINO's default hint) and
  ONNX Runtime's static quantisation (QDQ, per-channel weights) of the .onnx, in ONNX Runtime: the two routes the
  issue named, so that the one export.py takes is the one measured faster at equal AP.
Calibration: the first 50 images of --data's train2017 (not the validation images scored below).
AP50: YOLOv3-tiny with --weights (the official Darknet file) in every form on --data's val2017 at --size, conf
0.001, through validation.py's prediction path (engine.evaluate). YOLOv3 runs with seeded random weights (its
speed does not depend on them). The files are written by export.py itself (a subprocess), into --out.
`--alone`: each form timed alone in a fresh process (bench/alone.py, no other runtime loaded), the processes
alternating round by round: what a user running only that runtime sees (in one process the runtimes' thread pools
share the 2 cores; see PAUSE).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import MALLOC_PINS, add_data_argument, checked_data, machine  # noqa: E402
from datasets.loader import build_dataset, build_loader  # noqa: E402
from engine.evaluate import evaluate  # noqa: E402
from inference import ready_for_inference  # noqa: E402
from models import build_model  # noqa: E402
from models.forms import choose_form  # noqa: E402
from models.runtime import ExportedModel, import_optional  # noqa: E402
from models.transfer import load_model  # noqa: E402
from utils.config_load import load_config  # noqa: E402
from utils.hardware import VNNI_FLAGS, cpu_flags  # noqa: E402

FORMS = ("tools' form", "ONNX Runtime fp32", "OpenVINO default", "OpenVINO f32", "INT8 NNCF (OpenVINO)",
         "INT8 ORT static (ONNX Runtime)", "tools' form, --compile")
KEYS = ("tools", "ort", "ov", "ov-f32", "int8", "ort-int8", "compiled")  # --forms names of FORMS, in order
CALIBRATION_IMAGES = 50
# ONNX Runtime's quantisation docs advise 7-bit weights (reduce_range) for U8S8 on CPUs without VNNI. Measured on an
# AVX2-only EPYC: AP50 0.3444 with 8-bit weights, 0.4570 with 7-bit (fp32 0.4480; BENCHMARKS.md)


def ort_reduce_range(flags: frozenset[str]) -> bool:
    """Whether ONNX Runtime's static INT8 should quantise weights to 7 bits: on a CPU with none of VNNI_FLAGS."""
    return not flags & VNNI_FLAGS


# Each runtime keeps its threads spinning for a while after a call (OpenMP's wait policy, ONNX Runtime's
# intra-op spinning, OpenVINO's TBB): on 2 cores the next runtime's call would share them with the spinners, so the
# form timed after another runs slower than alone (tools' form, yolov3-tiny batch 1 on a 2-core Xeon: 43.7 ms
# alternating without a pause, 12.6 ms in the probe). A pause lets them sleep; then one untimed call wakes the
# form's own threads and caches (a timed call right after the pause measured the wake-up: 9.0 ms against 5.8 ms
# back to back for the packed bf16 tiny model, 27 ms once OpenVINO's threads were in the process), and BURST calls
# back to back are timed: the steady state of each runtime, which is what OpenVINO's benchmark_app reports too.
PAUSE, BURST = 0.5, 3


def export_files(arch: str, weights: Path, data: str, size: int, out: Path) -> dict[str, Path]:
    """Run export.py (onnx + openvino + --int8, calibrated on train2017) for `arch` and add ONNX Runtime's static
    INT8 quantisation of the .onnx; returns form name -> file."""
    calib = Path(data) / "images" / "train2017"
    command = [sys.executable, str(ROOT / "export.py"), "--weights", str(weights), "--format", "onnx", "openvino",
               "--int8", "--calib", str(calib), "--calib-images", str(CALIBRATION_IMAGES), "--check-images", "0",
               "--img-size", str(size), "--out", str(out), "--set", f"model.arch={arch}", f"data.root={data}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: export.py failed for {arch}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    stem = out / weights.stem
    ort_int8 = quantize_onnxruntime(stem.with_suffix(".onnx"), out / f"{weights.stem}_ort_int8.onnx", calib, size)
    return {FORMS[1]: stem.with_suffix(".onnx"), FORMS[2]: stem.with_suffix(".xml"), FORMS[3]: stem.with_suffix(".xml"),
            FORMS[4]: out / f"{weights.stem}_int8.xml", FORMS[5]: ort_int8}


def quantize_onnxruntime(source: Path, path: Path, calib: Path, size: int) -> Path:
    """ONNX Runtime static INT8 quantisation (QDQ, per-channel weights, 7-bit where the CPU has no VNNI, MinMax
    calibration on the first CALIBRATION_IMAGES images of `calib`) of `source`, the decoding after the last
    convolutions left in float (as NNCF's route does), with `source`'s metadata."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from datasets.sources import find_sources, read_image
    from inference import letterbox_batch, unit_float

    sources = [s for s in find_sources([str(calib)])[0] if not s.is_video][:CALIBRATION_IMAGES]
    inputs = [unit_float(letterbox_batch([read_image(s.path)], size)[0]).numpy() for s in sources]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(inputs)

        def get_next(self) -> dict | None:
            x = next(self.items, None)
            return None if x is None else {"images": x}

    graph = onnx.load(str(source))
    last_conv = max(i for i, n in enumerate(graph.graph.node) if n.op_type == "Conv")  # the decoding follows it
    quantize_static(str(source), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=ort_reduce_range(cpu_flags()), activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_quantize=[n.name for n in graph.graph.node[:last_conv + 1]])
    quantized = onnx.load(str(path))
    quantized.metadata_props.extend(graph.metadata_props)
    onnx.save(quantized, str(path))
    return path


def runners(arch: str, weights: Path, files: dict[str, Path], size: int, threads: int,
            forms: tuple[str, ...] = FORMS) -> tuple[dict[str, torch.nn.Module], str]:
    """Form name -> a module computing the eval forward (the tools' form under its autocast), and the probe's
    line."""
    cfg = load_config(ROOT / "args.yaml", [f"model.arch={arch}"])
    model = load_model(weights, cfg)[0].fuse()
    compiled = {}
    if FORMS[6] in forms:
        compiled_model, compiled_form = ready_for_inference(copy.deepcopy(model), torch.device("cpu"), size,
                                                            compile=True)
        compiled[FORMS[6]] = AutocastModule(compiled_model, compiled_form.dtype)
    model, form = choose_form(model, torch.device("cpu"), size)
    tools = AutocastModule(model, form.dtype)
    exported = {name: ExportedModel(files[name], threads, "f32" if name == FORMS[3] else None)
                for name in forms if name not in (FORMS[0], FORMS[6])}
    return {FORMS[0]: tools, **exported, **compiled}, str(form)


class AutocastModule(torch.nn.Module):
    """A model whose forward runs under inference_mode and the autocast of `dtype` (None: float32)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, 5+C) float32."""
        with torch.inference_mode(), torch.autocast("cpu", self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.model(x).float()


def alternating_ms(calls: dict[str, Callable[[], object]], rounds: int, pause: float = PAUSE, burst: int = BURST
                   ) -> dict[str, list[float]]:
    """ms per call of each, in `rounds` alternating rounds: per round and call, `pause` seconds, one untimed call,
    then `burst` timed calls back to back (all of a call's timed figures in one list)."""
    ms: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            time.sleep(pause)
            call()
            for _ in range(burst):
                start = time.perf_counter()
                call()
                ms[name].append(1000 * (time.perf_counter() - start))
    return ms


def alone_ms(arch: str, weights: Path, files: dict[str, Path], forms: tuple[str, ...], batch: int, size: int,
             threads: int, rounds: int) -> tuple[dict[str, list[float]], str]:
    """ms per call of each form, each alone in a fresh process (bench/alone.py: BURST * 5 calls back to back after 5
    untimed), the forms' processes alternating over `rounds` rounds (all of a form's calls in one list); and the
    tools' form's probe line from its last worker."""
    ms: dict[str, list[float]] = {name: [] for name in forms}
    probe = ""
    for _ in range(rounds):
        for name in forms:
            key = KEYS[FORMS.index(name)]
            target = (["--weights", str(weights), "--arch", arch] if key in ("tools", "compiled")
                      else ["--file", str(files[name])])
            calls, stderr = alone_worker(key, target, batch, size, threads)
            ms[name] += calls
            if key == "tools":
                probe = next((line[6:] for line in stderr.splitlines() if line.startswith("form: ")), probe)
    return ms, probe


def alone_worker(key: str, target: list[str], batch: int, size: int, threads: int) -> tuple[list[float], str]:
    """One fresh bench/alone.py process for form `key` (KEYS) on `target` (its --file or --weights arguments): the
    ms of its BURST * 5 timed calls, and its stderr (the tools' form's probe line); a failed worker is an error."""
    command = [sys.executable, str(ROOT / "bench" / "alone.py"), "--form", key, *target, "--batch", str(batch),
               "--size", str(size), "--threads", str(threads), "--calls", str(BURST * 5)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])["ms"], done.stderr


def ap50(models: dict[str, torch.nn.Module], data: str, size: int) -> dict[str, float]:
    """AP50 of each on --data's val2017 at `size` (conf 0.001, validation.py's path)."""
    cfg = load_config(ROOT / "args.yaml", ["model.arch=yolov3-tiny", f"data.root={data}", f"data.img_size={size}",
                                           "data.workers=0"])
    loader = build_loader(cfg, build_dataset(cfg, "val"), train=False, batch_size=8)
    return {name: evaluate(m, loader, cfg.eval, torch.device("cpu"), progress=False).stats["AP50"]
            for name, m in models.items()}


def main(argv: list[str] | None = None) -> None:
    """Export, time, score, print markdown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--weights", required=True, type=Path, help="the official yolov3-tiny.weights (Darknet)")
    parser.add_argument("--size", type=int, default=416)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arch", nargs="+", default=["yolov3-tiny", "yolov3"], choices=("yolov3-tiny", "yolov3"))
    parser.add_argument("--out", type=Path, help="folder for the exported files (default: a temporary one)")
    parser.add_argument("--forms", nargs="+", choices=KEYS[1:], default=list(KEYS[1:]),
                        help="the runtimes timed against the tools' form (default: all); every compiled model stays "
                        "loaded in the process while the others are timed")
    parser.add_argument("--alone", action="store_true",
                        help="time each form alone in its own fresh process (bench/alone.py), the processes "
                        "alternating, instead of all in this one; AP50 is still scored here")
    args = parser.parse_args(argv)
    forms = tuple(name for name, key in zip(FORMS, KEYS, strict=True) if key == "tools" or key in args.forms)
    data = checked_data(args.data)
    if not args.weights.is_file():
        raise SystemExit(f"error: --weights {args.weights}: no such file; give the official yolov3-tiny.weights "
                         "(https://pjreddie.com/media/files/yolov3-tiny.weights)")
    for name in ("openvino", "nncf", "onnxruntime"):
        try:
            import_optional(name, "bench/deploy.py")
        except ImportError as e:
            raise SystemExit(f"error: {e}") from e
    torch.set_num_threads(args.threads)
    pinned = all(os.environ.get(name) for name in MALLOC_PINS)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        lines = [f"Machine: {machine(torch.device('cpu'))}", "",
                 f"{args.threads} threads in every runtime; {args.rounds} alternating rounds, medians; glibc malloc "
                 f"{'pinned' if pinned else 'NOT pinned'}; "
                 f"{'each form alone in its own process' if args.alone else 'all forms in one process'}; "
                 f"onnxruntime {version('onnxruntime')}, openvino {version('openvino')}, nncf {version('nncf')}", "",
                 f"| model, {args.size} px | batch | " + " | ".join(forms) + " |", "|---" * (len(forms) + 2) + "|"]
        probes, scores = [], {}
        for arch in args.arch:
            weights = args.weights
            if arch != "yolov3-tiny":  # seeded random weights, as a Darknet file export.py reads
                torch.manual_seed(0)
                weights = out / f"{arch}.weights"
                build_model(arch).save_darknet_weights(weights)
            files = export_files(arch, weights, data, args.size, out / arch)
            # --alone: no runtime loaded here while the workers run; the models are built after, for AP50
            models, probe = ({}, "") if args.alone else runners(arch, weights, files, args.size, args.threads, forms)
            for batch in (1, 8):
                if args.alone:
                    ms, probe = alone_ms(arch, weights, files, forms, batch, args.size, args.threads, args.rounds)
                else:
                    x = torch.rand(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
                    ms = alternating_ms({name: (lambda m=m, x=x: m(x)) for name, m in models.items()}, args.rounds)
                tools = statistics.median(ms[FORMS[0]])
                cells = [f"{statistics.median(v):.1f}" + ("" if name == FORMS[0] else
                                                          f" ({statistics.median(v) / tools:.2f}x)")
                         for name, v in ms.items()]
                lines.append(f"| {arch} | {batch} | " + " | ".join(cells) + " |")
            probes.append(f"- {arch}: {probe}" + (" (in the workers)" if args.alone else ""))
            if arch == "yolov3-tiny":
                models = models or runners(arch, weights, files, args.size, args.threads, forms)[0]
                scores = ap50(models, data, args.size)
        if scores:
            lines.append(f"| AP50, yolov3-tiny ({args.weights.name}) on {Path(data).name} val | | " +
                         " | ".join(f"{scores[name]:.4f}" for name in forms) + " |")
        lines += ["", "ms per call (per batch), median; (x): time / the tools' form's, > 1 slower. The tools' form "
                  "(models/forms.py probe):", *probes]
        if FORMS[5] in forms:
            lines.append(f"- {FORMS[5]}: " + ("7-bit weights (reduce_range: no VNNI on this CPU)"
                                              if ort_reduce_range(cpu_flags()) else "8-bit weights (VNNI here)"))
    print("\n".join(lines))


def version(name: str) -> str:
    """An installed package's version."""
    from importlib.metadata import version as package_version

    return package_version(name)


if __name__ == "__main__":
    main()
