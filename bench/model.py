"""Model, training-step, loss and post-processing speed, each also as a ratio to the machine's conv ceiling.

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 \\
        .venv/bin/python bench/model.py [--device cpu|cuda] [--size 416] [--repeats 5] [--quick]

- forward: YOLOv3 at batch 1 and 8 in the FORMS below (eval mode as trained; BN fused + inference_mode;
  + channels_last; + bf16 autocast on CPUs with native bf16; + fp16 autocast on CUDA; + conv weights packed for
  oneDNN on CPUs, the tools' default there), then YOLOv3-tiny and the MobileNetV3 variants in the tools' form.
  FLOPs are counted by torch.utils.flop_counter (2 per multiply-add), achieved GFLOP/s is divided by the conv ceiling.
- train step: forward + loss + backward + optimiser (engine.train_step), YOLOv3 at 416, batch 8 (64 with AMP
  on CUDA), its ratio counting 3x the forward FLOPs per image.
- loss: target building + YOLOv3 loss forward, batch 8, 50 boxes per image, random raw maps.
- post-processing: decode is in the forward; threshold 0.001 + batched NMS + max_det 100 for a batch of 8, with a
  trained-like score distribution and with the untrained worst case (every score above 0.001).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    CeilingProbe,
    bf16_supported,
    emit,
    machine,
    paired_ratio,
    spread,
    time_paired,
    time_runs,
)
from engine import train_step  # noqa: E402
from inference import compile_for_inference, ready_for_inference  # noqa: E402
from models import build_model  # noqa: E402
from models.loss import build_loss  # noqa: E402
from models.packed import packing_available  # noqa: E402
from models.postprocess import postprocess  # noqa: E402
from models.yolo import YOLO  # noqa: E402
from utils.config import EvalConfig, LossConfig  # noqa: E402

FORMS = ("eval mode (as trained)", "BN fused, inference_mode", "fused + channels_last", "fused + channels_last + bf16",
         "fused + channels_last + fp16", "fused + channels_last + packed weights")


def forward_gflops(model: YOLO, size: int) -> float:
    """Forward GFLOPs of one (3, size, size) image (2 per multiply-add)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model.eval()(torch.rand(1, 3, size, size, device=next(model.parameters()).device))
    return counter.get_total_flops() / 1e9


def prepared(arch: str, encoder: str, form: str, device: torch.device, size: int = 416, num_classes: int = 80
             ) -> YOLO:
    """A seeded model of `arch`/`encoder` in one of FORMS (eval mode; fused, channels_last and packed for
    (1, 3, size, size) inputs as the form says, by inference.ready_for_inference as the tools do)."""
    torch.manual_seed(0)
    model = build_model(arch, encoder, num_classes).to(device).eval()
    if form != FORMS[0]:
        model.fuse()
    if "channels_last" in form:
        model = ready_for_inference(model, device, size, pack="packed" in form)
    return model


def fastest_form(device: torch.device) -> str:
    """The fp32 form the tools run by default on `device`: packed weights on a CPU, plain channels_last on CUDA."""
    return FORMS[5] if device.type == "cpu" and packing_available() else FORMS[2]


def forward_seconds(model: YOLO, size: int, batch: int, form: str, device: torch.device, repeats: int,
                    probe: CeilingProbe) -> tuple[list[float], list[float]]:
    """Seconds per image of model(x) for a (batch, 3, size, size) input, in `form`, one figure per repeat, and the
    ceiling measured just before each."""
    x = torch.rand(batch, 3, size, size, device=device)
    if "channels_last" in form:
        x = x.contiguous(memory_format=torch.channels_last)
    seconds, ceilings = time_paired(forward_fn(model, x, form, device), repeats, probe, device=device)
    return [s / batch for s in seconds], ceilings


def forward_fn(model: torch.nn.Module, x: torch.Tensor, form: str, device: torch.device
               ) -> Callable[[], torch.Tensor]:
    """model(x) under inference_mode, with bf16 / fp16 autocast where `form` names it, as a function of no
    arguments."""
    dtype = torch.float16 if "fp16" in form else torch.bfloat16

    def run() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, dtype, enabled="bf16" in form or "fp16" in form):
            return model(x)
    return run


def train_step_fn(size: int, batch: int, device: torch.device, amp: bool) -> Callable[[], object]:
    """One optimiser step of YOLOv3 (train mode, channels_last as main.py trains, Adam, batch `batch`, 20 boxes per
    image, fp16 autocast with `amp`) as a function of no arguments."""
    torch.manual_seed(0)
    model = build_model("yolov3", "darknet53", 80).to(device, memory_format=torch.channels_last).train()
    loss_fn = build_loss(model, LossConfig())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    images = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    targets = random_targets(batch, 20, size, 80, device)
    dtype = torch.float16 if amp else None
    return lambda: train_step(model, loss_fn, [(images, targets)], optimizer, scaler, dtype, 10.0)


def cudnn_benchmark_rows(size: int, device: torch.device, repeats: int) -> list[str]:
    """Table rows (CUDA): the AMP training step at batch 64 and the fp16 forward at batch 32 with
    torch.backends.cudnn.benchmark off and on, in alternating rounds (each flag warmed up, autotuning included)."""
    x = torch.rand(32, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    forward = forward_fn(prepared("yolov3", "darknet53", FORMS[4], device, size), x, FORMS[4], device)
    rows = []
    for name, fn in (("training step, AMP fp16, batch 64", train_step_fn(size, 64, device, amp=True)),
                     ("forward, fused + channels_last + fp16, batch 32", forward)):
        seconds: dict[bool, list[float]] = {False: [], True: []}
        for flag in (False, True, False, True, *([False, True] * repeats)):  # the first two rounds: warm-up
            torch.backends.cudnn.benchmark = flag
            seconds[flag] += time_runs(fn, 1, warmup=0, device=device)
        off, on = seconds[False][2:], seconds[True][2:]
        gain = statistics.median(a / b for a, b in zip(off, on, strict=True))
        rows.append(f"| {name} | {spread([1000 * s for s in off])} | {spread([1000 * s for s in on])} | "
                    f"**{gain:.2f}x** |")
    torch.backends.cudnn.benchmark = False
    return rows


def random_targets(batch: int, per_image: int, size: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """(batch * per_image, 6) [image, class, cx, cy, w, h] with sides log-spread over 8 .. 0.8 size px (seeded)."""
    g = torch.Generator().manual_seed(1)
    n = batch * per_image
    wh = torch.exp(torch.empty(n, 2).uniform_(0, 1, generator=g) * torch.log(torch.tensor(0.1 * size)) + 2.08)
    centre = torch.rand(n, 2, generator=g) * (size - wh) + wh / 2
    image = torch.arange(batch).repeat_interleave(per_image)[:, None].float()
    cls = torch.randint(num_classes, (n, 1), generator=g).float()
    return torch.cat([image, cls, centre, wh], 1).to(device)


def loss_seconds(size: int, batch: int, per_image: int, device: torch.device, repeats: int) -> list[float]:
    """Seconds of target building + YOLOv3 loss forward on random raw maps, one figure per repeat."""
    torch.manual_seed(0)
    model = build_model("yolov3", "darknet53", 80)
    loss_fn = build_loss(model, LossConfig())
    # the model's layout: permuted views of (B, A, 5+C, H, W) conv outputs
    outputs = [torch.randn(batch, 3, 85, size // s, size // s, device=device).permute(0, 1, 3, 4, 2)
               for s in model.strides]
    targets = random_targets(batch, per_image, size, 80, device)
    return time_runs(lambda: loss_fn(outputs, targets), repeats, warmup=3, device=device)


def scored_predictions(model: YOLO, size: int, batch: int, device: torch.device, worst: bool) -> torch.Tensor:
    """(batch, N, 85) decoded predictions of `model` with its head biases set to a trained-like score
    distribution (objectness logits ~N(-9, 3), one class per box ~N(0, 2), the rest ~N(-9, 2)), or to the worst
    case (every score above 0.001)."""
    with torch.inference_mode():
        pred = model(torch.rand(batch, 3, size, size, device=device))
    pred = pred.clone()  # a normal tensor: inference tensors cannot be written to outside inference_mode
    g = torch.Generator().manual_seed(2)
    n = pred.shape[1]
    if worst:
        scores = torch.full((batch, n, 81), 5.0)
    else:
        scores = torch.randn(batch, n, 81, generator=g) * 2 - 9
        scores[..., 0] = torch.randn(batch, n, generator=g) * 3 - 9
        best = torch.randint(80, (batch, n), generator=g) + 1
        scores.scatter_(2, best[..., None], torch.randn(batch, n, 1, generator=g) * 2)
    pred[..., 4:] = scores.sigmoid().to(device)
    return pred


def postprocess_seconds(pred: torch.Tensor, eval_cfg: EvalConfig, device: torch.device, repeats: int
                        ) -> tuple[list[float], int]:
    """Seconds of threshold + batched NMS + max_det on decoded (B, N, 5+C) predictions, and the mean number of
    (box, class) candidates per image above the threshold."""
    candidates = int((pred[..., 4:5] * pred[..., 5:] > eval_cfg.conf_threshold).sum()) // len(pred)
    seconds = time_runs(lambda: postprocess(pred, eval_cfg.conf_threshold, eval_cfg.nms_iou, eval_cfg.max_det,
                                            eval_cfg.max_candidates, eval_cfg.multi_label),
                        repeats, warmup=1, device=device)
    return seconds, candidates


def compiled_rows(size: int, batches: tuple[int, ...], device: torch.device, repeats: int, probe: CeilingProbe,
                  gflops: float) -> list[str]:
    """Table rows of the fused channels_last YOLOv3 under torch.compile with frozen weights, as validation.py
    --compile runs it, one compilation per batch size; an opt-in form, so no goal counts it."""
    rows = []
    for batch in batches:
        compiled = compile_for_inference(prepared("yolov3", "darknet53", FORMS[2], device))
        x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(x)
        compile_s = time.perf_counter() - start
        seconds, ceilings = forward_seconds(compiled, size, batch, FORMS[2], device, repeats, probe)
        form = f"{FORMS[2]} + torch.compile (validation.py --compile; compiled in {compile_s:.0f} s)"
        rows.append(forward_row("yolov3", form, batch, gflops, seconds, ceilings)[0])
    return rows


def forward_row(model: str, form: str, batch: int, gflops: float, seconds: list[float], ceilings: list[float],
                headline: bool = False) -> tuple[str, float]:
    """The forward table's row for per-image `seconds` paired with `ceilings`, and its ratio to the ceiling (in
    bold where it is a `headline` figure that a goal counts)."""
    rate, ratio = gflops / statistics.median(seconds), paired_ratio(gflops, seconds, ceilings)
    shown = f"**{ratio:.2f}**" if headline else f"{ratio:.2f}"
    return (f"| {model} ({gflops:.2f} GFLOPs) | {form} | {batch} | {spread([1000 * s for s in seconds])} | "
            f"{rate:.1f} | {shown} | {drift(ceilings)} |"), ratio


def drift(ceilings: list[float]) -> str:
    """The range of the ceilings measured during one figure's timed calls, GFLOP/s."""
    return f"{min(ceilings):.0f}-{max(ceilings):.0f}"


def run(device: torch.device, size: int, repeats: int, quick: bool, compile_forward: bool = False
        ) -> tuple[list[str], dict[str, float]]:
    """All the measurements of this script, as markdown lines and a dict of the headline figures."""
    lines = [f"Machine: {machine(device)}", ""]
    probe = CeilingProbe(device)
    ceiling = [probe() for _ in range(max(repeats, 5))]
    figures = {"ceiling_gflops": statistics.median(ceiling)}
    lines += [f"Conv ceiling (3x3, 256 -> 512 at 52x52, fp32): **{spread(ceiling, '.1f')} GFLOP/s** at the start. "
              "Every `/ ceiling` below is paired: the ceiling is measured again just before each timed call, and the "
              "figure is the median of the per-call ratios, so a machine whose speed drifts during the run (shared "
              "cloud CPUs) still gives true ratios; `drift` is the range of those ceilings.", ""]

    lines += [f"### Forward, fp32 unless named, {size}x{size}", "",
              "| model | form | batch | ms / image | GFLOP/s | / ceiling | drift |", "|---|---|---|---|---|---|---|"]
    batches = (1, 32) if device.type == "cuda" else (1, 8)
    gflops = forward_gflops(prepared("yolov3", "darknet53", FORMS[1], device), size)
    for form in FORMS:
        if "fp16" in form and device.type == "cpu":
            lines.append(f"| yolov3 | {form} | - | not run: fp16 autocast is the CUDA inference path "
                         "(validation.py --amp) | | |")
            continue
        if "packed" in form and (device.type != "cpu" or not packing_available()):
            lines.append(f"| yolov3 | {form} | - | not run: packing is the CPU path (oneDNN), and needs "
                         "torch.ops.mkldnn | | |")
            continue
        if "bf16" in form and device.type == "cpu" and not bf16_supported():
            lines.append(f"| yolov3 | {form} | - | not run: this CPU has no native bf16 (no avx512_bf16 / AMX); "
                         "bf16 would be emulated, slower than fp32 | | |")
            continue
        model = prepared("yolov3", "darknet53", form, device, size)
        for batch in batches if not quick else batches[:1]:
            seconds, ceilings = forward_seconds(model, size, batch, form, device, repeats, probe)
            row, ratio = forward_row("yolov3", form, batch, gflops, seconds, ceilings, headline=True)
            lines.append(row)
            key = f"forward_ratio_batch{batch}"
            figures[key] = max(figures.get(key, 0.0), ratio)
            figures[f"forward_ms_batch{batch}"] = min(figures.get(f"forward_ms_batch{batch}", 1e9),
                                                      1000 * statistics.median(seconds))
    if compile_forward:
        lines += compiled_rows(size, batches if not quick else batches[:1], device, repeats, probe, gflops)
    tools_form = fastest_form(device)
    for arch, encoder in (("yolov3-tiny", "darknet53"), ("yolov3", "mobilenet_v3_large"),
                          ("yolov3", "mobilenet_v3_small")):
        small_gflops = forward_gflops(prepared(arch, encoder, FORMS[1], device), size)  # packed convs count none
        model = prepared(arch, encoder, tools_form, device, size)
        for batch in batches:
            seconds, ceilings = forward_seconds(model, size, batch, tools_form, device, repeats, probe)
            lines.append(forward_row(f"{arch} {encoder}", tools_form, batch, small_gflops, seconds, ceilings)[0])

    amp = device.type == "cuda"
    batch = 64 if amp else 8
    steps, ceilings = time_paired(train_step_fn(size, batch, device, amp), max(2, repeats // 2), probe,
                                  device=device)
    images_per_s = [batch / s for s in steps]
    rate, ratio = 3 * gflops * statistics.median(images_per_s), paired_ratio(3 * gflops * batch, steps, ceilings)
    figures.update(train_images_per_s=statistics.median(images_per_s), train_ratio=ratio)
    lines += ["", f"### Training step, YOLOv3 at {size}, batch {batch}, {'AMP fp16' if amp else 'fp32'}, Adam", "",
              f"**{spread(images_per_s)} images/s** ({spread(steps)} s per step); {rate:.1f} GFLOP/s counting 3x "
              f"the forward FLOPs = **{ratio:.2f} of the ceiling** (paired; drift {drift(ceilings)})", ""]

    if device.type == "cuda":
        lines += ["### cudnn.benchmark (CUDA): off vs on, alternating rounds", "",
                  "| what | off: ms | on: ms | off / on |", "|---|---|---|---|", *cudnn_benchmark_rows(size, device,
                                                                                                       repeats), ""]
    loss = loss_seconds(size, 8, 50, device, 5 * repeats)
    figures["loss_ms"] = 1000 * statistics.median(loss)
    lines += [f"### Loss, YOLOv3 layout at {size}, batch 8, 50 boxes per image", "",
              f"target building + loss forward: **{spread([1000 * s for s in loss])} ms**", ""]

    eval_cfg = EvalConfig()
    model = prepared("yolov3", "darknet53", FORMS[2], device)
    forward = statistics.median(forward_seconds(model, size, 8, FORMS[2], device, repeats, probe)[0]) * 8
    lines += [f"### Post-processing, batch 8 at {size}: conf {eval_cfg.conf_threshold}, NMS IoU {eval_cfg.nms_iou}, "
              f"max_det {eval_cfg.max_det}, max_candidates {eval_cfg.max_candidates}", "",
              "| scores | candidates / image | ms per batch | / forward of the batch |", "|---|---|---|---|"]
    for worst in (False, True):
        pred = scored_predictions(model, size, 8, device, worst)
        seconds, candidates = postprocess_seconds(pred, eval_cfg, device, repeats)
        name = "untrained worst case (all pass)" if worst else "trained-like"
        lines.append(f"| {name} | {candidates} | {spread([1000 * s for s in seconds])} | "
                     f"**{statistics.median(seconds) / forward:.3f}** |")
        figures["post_over_forward_" + ("worst" if worst else "trained_like")] = statistics.median(seconds) / forward
    return lines, figures


def main() -> None:
    """Parse arguments, run, print markdown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=416)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="batch 1 only for the YOLOv3 forms")
    parser.add_argument("--compile", action="store_true", help="also time YOLOv3 under torch.compile (needs a C++ "
                        "compiler on CPU; ~20-30 s of compilation per batch size)")
    parser.add_argument("--json", help="also write the headline figures to this JSON file")
    args = parser.parse_args()
    lines, figures = run(torch.device(args.device), args.size, args.repeats, args.quick, args.compile)
    emit(lines, figures, args.json)


if __name__ == "__main__":
    main()
