"""Model, training-step, loss and post-processing speed, each also as a ratio to the machine's conv ceiling.

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 \\
        .venv/bin/python bench/model.py [--device cpu|cuda] [--size 416] [--repeats 5] [--quick]

- forward: YOLOv3 at batch 1 and 8 in the FORMS below (eval mode as trained; BN fused + inference_mode, NCHW;
  + channels_last; + bf16 autocast where bf16 is native; + fp16 autocast on CUDA; + conv weights packed for
  oneDNN on CPUs), then the form the tools pick on this machine (models/forms.py's probe, as validation.py,
  detect.py and visualization.py run it) for YOLOv3, YOLOv3-tiny and the MobileNetV3 variants.
  FLOPs are counted by torch.utils.flop_counter (2 per multiply-add); achieved GFLOP/s is divided by the fp32 conv
  ceiling and, where bf16 is native, by the bf16 one (the same conv under bf16 autocast).
- train step: forward + loss + backward + optimiser (engine/train.py train_step), YOLOv3 at 416, batch 8 (64 with AMP
  on CUDA), its ratio counting 3x the forward FLOPs per image; on a CPU with native bf16 also fp32 vs bf16
  autocast (train.amp) in alternating rounds, for YOLOv3 and for the demo's step (YOLOv3-tiny, 160 px, batch 16).
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
    Ceilings,
    bf16_supported,
    emit,
    machine,
    paired_ratio,
    spread,
    time_paired,
    time_runs,
)
from engine.optim import fused_update, parameter_groups  # noqa: E402
from engine.train import train_step  # noqa: E402
from inference import compile_for_inference  # noqa: E402
from models import build_model  # noqa: E402
from models.forms import choose_form, prepare  # noqa: E402
from models.loss import build_loss  # noqa: E402
from models.packed import packing_available  # noqa: E402
from models.postprocess import postprocess  # noqa: E402
from models.yolo import YOLO  # noqa: E402
from utils.config import EvalConfig, LossConfig  # noqa: E402

FORMS = ("eval mode (as trained)", "BN fused, inference_mode", "fused + channels_last", "fused + channels_last + bf16",
         "fused + channels_last + fp16", "fused + channels_last + packed weights",
         "fused + channels_last + packed bf16 weights")
TOOL_FORMS = {"fp32": FORMS[2], "bf16": FORMS[3], "fp16": FORMS[4], "packed": FORMS[5],
              "packed-bf16": FORMS[6]}  # models/forms.py -> FORMS
DEMO_STEP = ("yolov3-tiny", 160, 16, 6)  # make demo's training step: arch, size, batch, classes


def forward_gflops(model: YOLO, size: int) -> float:
    """Forward GFLOPs of one (3, size, size) image (2 per multiply-add)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model.eval()(torch.rand(1, 3, size, size, device=next(model.parameters()).device))
    return counter.get_total_flops() / 1e9


def prepared(arch: str, encoder: str, form: str, device: torch.device, size: int = 416, num_classes: int = 80
             ) -> YOLO:
    """A seeded model of `arch`/`encoder` in one of FORMS (eval mode; fused, channels_last and packed for
    (1, 3, size, size) inputs as the form says, by models/forms.py prepare as the tools do)."""
    torch.manual_seed(0)
    model = build_model(arch, encoder, num_classes).to(device).eval()
    if form != FORMS[0]:
        model.fuse()
    if "channels_last" in form:
        model = prepare(model, next((k for k, v in TOOL_FORMS.items() if v == form), "fp32"), device, size)
    return model


def tools_form(arch: str, encoder: str, device: torch.device, size: int) -> tuple[YOLO, str, str]:
    """The seeded fused model in the form validation.py / detect.py pick for it on this machine (models/forms.py
    choose_form, its probe included), that form as one of FORMS, and the probe's line."""
    torch.manual_seed(0)
    model, form = choose_form(build_model(arch, encoder, 80).fuse(), device, size)
    return model, TOOL_FORMS[form.name], str(form)


def forward_seconds(model: YOLO, size: int, batch: int, form: str, device: torch.device, repeats: int,
                    probe: Ceilings) -> tuple[list[float], list[dict[str, float]]]:
    """Seconds per image of model(x) for a (batch, 3, size, size) input, in `form`, one figure per repeat, and the
    ceilings measured just before each."""
    x = torch.rand(batch, 3, size, size, device=device)
    if "channels_last" in form:
        x = x.contiguous(memory_format=torch.channels_last)
    seconds, ceilings = time_paired(forward_fn(model, x, form, device), repeats, probe, device=device)
    return [s / batch for s in seconds], ceilings


def forward_fn(model: torch.nn.Module, x: torch.Tensor, form: str, device: torch.device
               ) -> Callable[[], torch.Tensor]:
    """model(x) under inference_mode, with bf16 / fp16 autocast where `form` names it (a packed bf16 model carries
    its dtype in its weights), as a function of no arguments."""
    dtype = torch.float16 if "fp16" in form else torch.bfloat16

    def run() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, dtype, enabled=form.endswith(("bf16", "fp16"))):
            return model(x)
    return run


def train_step_fn(size: int, batch: int, device: torch.device, dtype: torch.dtype | None, arch: str = "yolov3",
                  num_classes: int = 80, channels_last: bool = True, foreach: bool = False, compile_model: str = "",
                  compile_loss: bool = False) -> Callable[[], object]:
    """One optimiser step of `arch` (train mode, Adam over main.py's parameter groups, batch `batch`, 20 boxes per
    image, autocast of `dtype` (None: fp32), fp16's GradScaler) as a function of no arguments. As main.py trains
    unless asked: channels_last model and input (False: NCHW), Adam's fused update (`foreach`: its foreach one),
    no torch.compile (`compile_model`: the model compiled in that mode, "default" or "reduce-overhead" (CUDA graphs);
    `compile_loss`: the loss compiled, shapes dynamic as the targets' count varies)."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(arch, "darknet53", num_classes).to(device, memory_format=memory_format).train()
    loss_fn = build_loss(model, LossConfig())
    optimizer = torch.optim.Adam(parameter_groups(model, 5e-4), lr=1e-5, fused=None if foreach else fused_update(model),
                                 foreach=True if foreach else None)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    images = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    targets = random_targets(batch, 20, size, num_classes, device)
    step_model = torch.compile(model, mode=compile_model) if compile_model else model
    step_loss = torch.compile(loss_fn, dynamic=True) if compile_loss else loss_fn
    return lambda: train_step(step_model, step_loss, [(images, targets)], optimizer, scaler, dtype, 10.0)


def train_precision_rows(size: int, device: torch.device, repeats: int) -> tuple[list[str], dict[str, float]]:
    """Table rows: the training step in fp32 and under bf16 autocast (train.amp bf16) in alternating rounds (one
    warm-up round), YOLOv3 at `size` batch 8 and the demo's step; the bf16 speed-up paired per round."""
    rows, figures = [], {}
    arch, demo_size, demo_batch, demo_classes = DEMO_STEP
    for name, key, args in (
            (f"yolov3 at {size}, batch 8", "train_bf16_speedup", (size, 8, "yolov3", 80)),
            (f"make demo's step: {arch} at {demo_size}, batch {demo_batch}", "demo_step_bf16_speedup",
             (demo_size, demo_batch, arch, demo_classes))):
        step_size, batch, step_arch, classes = args
        fns = {dtype: train_step_fn(step_size, batch, device, dtype, step_arch, classes)
               for dtype in (None, torch.bfloat16)}
        for fn in fns.values():
            fn()  # the warm-up round
        seconds: dict[torch.dtype | None, list[float]] = {None: [], torch.bfloat16: []}
        for _ in range(max(2, repeats // 2)):
            for dtype, fn in fns.items():
                seconds[dtype] += time_runs(fn, 1, warmup=0, device=device)
        fp32, bf16 = seconds[None], seconds[torch.bfloat16]
        gain = statistics.median(a / b for a, b in zip(fp32, bf16, strict=True))
        figures[key] = gain
        rows.append(f"| {name} | {spread([batch / s for s in fp32])} | {spread([batch / s for s in bf16])} | "
                    f"**{gain:.2f}x** |")
    return rows, figures


def cudnn_benchmark_rows(size: int, device: torch.device, repeats: int) -> list[str]:
    """Table rows (CUDA): the AMP training step at batch 64 and the fp16 forward at batch 32 with
    torch.backends.cudnn.benchmark off and on, in alternating rounds (each flag warmed up, autotuning included)."""
    x = torch.rand(32, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    forward = forward_fn(prepared("yolov3", "darknet53", FORMS[4], device, size), x, FORMS[4], device)
    rows = []
    for name, fn in (("training step, AMP fp16, batch 64", train_step_fn(size, 64, device, torch.float16)),
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


def compiled_rows(size: int, batches: tuple[int, ...], device: torch.device, repeats: int, probe: Ceilings,
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


def forward_row(model: str, form: str, batch: int, gflops: float, seconds: list[float],
                ceilings: list[dict[str, float]], headline: bool = False) -> tuple[str, float]:
    """The forward table's row for per-image `seconds` paired with `ceilings`, and its ratio to the ceiling of its
    own precision (bf16 for the autocast forms where a bf16 ceiling was measured, else fp32), in bold where it is a
    `headline` figure that a goal counts."""
    rate = gflops / statistics.median(seconds)
    ratios = {name: paired_ratio(gflops, seconds, [c[name] for c in ceilings]) for name in ceilings[0]}
    own = "bf16" if ("bf16" in form or "fp16" in form) and "bf16" in ratios else "fp32"
    shown = {name: f"**{r:.2f}**" if headline and name == own else f"{r:.2f}" for name, r in ratios.items()}
    return (f"| {model} ({gflops:.2f} GFLOPs) | {form} | {batch} | {spread([1000 * s for s in seconds])} | "
            f"{rate:.1f} | {shown['fp32']} | {shown.get('bf16', '-')} | {drift(ceilings)} |"), ratios[own]


def drift(ceilings: list[dict[str, float]]) -> str:
    """The range of each ceiling measured during one figure's timed calls, GFLOP/s."""
    return ", ".join(f"{name} {min(c[name] for c in ceilings):.0f}-{max(c[name] for c in ceilings):.0f}"
                     for name in ceilings[0])


def not_run(form: str, device: torch.device) -> str | None:
    """Why a YOLOv3 form is not timed on `device`, or None when it is."""
    if "fp16" in form and device.type == "cpu":
        return "fp16 autocast is the CUDA inference path (validation.py --amp on CUDA)"
    if "packed" in form and (device.type != "cpu" or not packing_available()):
        return "packing is the CPU path (oneDNN), and needs torch.ops.mkldnn"
    if "bf16" in form and not bf16_supported(device):
        return "no native bf16 here (no avx512_bf16 / AMX); bf16 would be emulated, slower than fp32"
    return None


def ceiling_lines(probe: Ceilings, repeats: int) -> tuple[list[str], dict[str, float]]:
    """The ceilings at the start, as markdown, and their medians (ceiling_gflops, ceiling_bf16_gflops)."""
    measured = [probe() for _ in range(max(repeats, 5))]
    by_name = {name: [m[name] for m in measured] for name in measured[0]}
    figures = {"ceiling_gflops": statistics.median(by_name["fp32"])}
    text = f"Conv ceiling (3x3, 256 -> 512 at 52x52, fp32): **{spread(by_name['fp32'], '.1f')} GFLOP/s**"
    if "bf16" in by_name:
        figures["ceiling_bf16_gflops"] = statistics.median(by_name["bf16"])
        gain = statistics.median(b / f for b, f in zip(by_name["bf16"], by_name["fp32"], strict=True))
        text += (f"; the same conv under bf16 autocast: **{spread(by_name['bf16'], '.1f')} GFLOP/s** "
                 f"(**{gain:.2f}x** fp32, paired)")
    else:
        text += "; no bf16 ceiling: bf16 is not native here"
    return [text + " at the start. Every `/ ceiling` below is paired: the ceilings are measured again just before "
            "each timed call, and the figure is the median of the per-call ratios, so a machine whose speed drifts "
            "during the run (shared cloud CPUs) still gives true ratios; `drift` is the range of those ceilings.",
            ""], figures


def run(device: torch.device, size: int, repeats: int, quick: bool, compile_forward: bool = False
        ) -> tuple[list[str], dict[str, float]]:
    """All the measurements of this script, as markdown lines and a dict of the headline figures."""
    lines = [f"Machine: {machine(device)}", ""]
    probe = Ceilings(device)
    text, figures = ceiling_lines(probe, repeats)
    lines += text
    lines += [f"#### Forward, fp32 unless named, {size}x{size}", "",
              "| model | form | batch | ms / image | GFLOP/s | / fp32 ceiling | / bf16 ceiling | drift |",
              "|---|---|---|---|---|---|---|---|"]
    batches = (1, 32) if device.type == "cuda" else (1, 8)
    gflops = forward_gflops(prepared("yolov3", "darknet53", FORMS[1], device), size)
    for form in FORMS:
        if reason := not_run(form, device):
            lines.append(f"| yolov3 | {form} | - | not run: {reason} | | | | |")
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
    chosen = []
    for arch, encoder in (("yolov3", "darknet53"), ("yolov3-tiny", "darknet53"), ("yolov3", "mobilenet_v3_large"),
                          ("yolov3", "mobilenet_v3_small")):
        model_gflops = forward_gflops(prepared(arch, encoder, FORMS[1], device), size)  # packed convs count none
        model, form, line = tools_form(arch, encoder, device, size)
        chosen.append(f"- {arch} {encoder}: {line}")
        for batch in batches:
            seconds, ceilings = forward_seconds(model, size, batch, form, device, repeats, probe)
            lines.append(forward_row(f"{arch} {encoder}", f"{form} (the tools' pick)", batch, model_gflops, seconds,
                                     ceilings)[0])
    figures["tools_form"] = chosen[0]
    lines += ["", f"The form the tools pick (models/forms.py: a probe of (1, 3, {size}, {size}) forwards, alternating "
              "rounds, as validation.py / detect.py / visualization.py run it by default):", "", *chosen]

    amp = device.type == "cuda"
    batch = 64 if amp else 8
    steps, ceilings = time_paired(train_step_fn(size, batch, device, torch.float16 if amp else None),
                                  max(2, repeats // 2), probe, device=device)
    images_per_s = [batch / s for s in steps]
    rate = 3 * gflops * statistics.median(images_per_s)
    ratio = paired_ratio(3 * gflops * batch, steps, [c["fp32"] for c in ceilings])
    figures.update(train_images_per_s=statistics.median(images_per_s), train_ratio=ratio)
    lines += ["", f"#### Training step, YOLOv3 at {size}, batch {batch}, {'AMP fp16' if amp else 'fp32'}, Adam", "",
              f"**{spread(images_per_s)} images/s** ({spread(steps)} s per step); {rate:.1f} GFLOP/s counting 3x "
              f"the forward FLOPs = **{ratio:.2f} of the fp32 ceiling** (paired; drift {drift(ceilings)})", ""]
    if device.type == "cpu" and bf16_supported(device):
        rows, found = train_precision_rows(size, device, repeats)
        figures.update(found)
        lines += ["#### Training step, fp32 vs bf16 autocast (train.amp), alternating rounds", "",
                  "| step | fp32: images/s | bf16: images/s | bf16 speed-up, paired |", "|---|---|---|---|", *rows, ""]
    elif device.type == "cpu":
        lines += ["Training in bf16: not run, no native bf16 here (train.amp auto runs fp32 on this CPU).", ""]

    if device.type == "cuda":
        lines += ["#### cudnn.benchmark (CUDA): off vs on, alternating rounds", "",
                  "| what | off: ms | on: ms | off / on |", "|---|---|---|---|", *cudnn_benchmark_rows(size, device,
                                                                                                       repeats), ""]
    loss = loss_seconds(size, 8, 50, device, 5 * repeats)
    figures["loss_ms"] = 1000 * statistics.median(loss)
    lines += [f"#### Loss, YOLOv3 layout at {size}, batch 8, 50 boxes per image", "",
              f"target building + loss forward: **{spread([1000 * s for s in loss])} ms**", ""]

    eval_cfg = EvalConfig()
    model = prepared("yolov3", "darknet53", FORMS[2], device)
    forward = statistics.median(forward_seconds(model, size, 8, FORMS[2], device, repeats, probe)[0]) * 8
    lines += [f"#### Post-processing, batch 8 at {size}: conf {eval_cfg.conf_threshold}, NMS IoU {eval_cfg.nms_iou}, "
              f"max_det {eval_cfg.max_det}, max_candidates {eval_cfg.max_candidates}", "",
              "| scores | candidates / image | ms per batch | / fp32 forward of the batch |", "|---|---|---|---|"]
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
