"""Inference forms (models/forms.py) and native-bf16 detection (utils/hardware.py): the choice logic with the
detector and the probe replaced, the forms computing what the plain fp32 model computes (bf16 within a stated
tolerance), bf16 training on the CPU, and the tools' --amp / --pack options."""
import glob
import os
import shutil

import cv2
import numpy as np
import pytest
import torch
from conftest import DATA, grid_model

import engine.evaluate
import engine.state
import engine.train
import inference
import validation
from models import build_model, forms
from models.forms import Form, FormError, candidate_forms, choose_form, probe_forms
from models.loss import build_loss
from models.packed import PackedConv2d, packing_available
from utils import hardware
from utils.config import ConfigError, EvalConfig, LossConfig
from utils.config_load import load_config

ROOT = DATA.parent.parent
CPU = torch.device("cpu")
IMAGES = [cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB)
          for p in sorted(glob.glob(str(DATA / "coco" / "images" / "val2017" / "*.jpg")))[:4]]
# bf16 against fp32 (bf16 keeps 8 bits of mantissa; the decoding runs in fp32): final scores (objectness x class)
# within 0.02, box coordinates within 2 px at 64-128 px. The official yolov3-tiny.weights at 416 on coco_mini
# moved AP by the amount BENCHMARKS.md states.
SCORE_ATOL, BOX_ATOL = 0.02, 2.0


def tiny(seed=0):
    torch.manual_seed(seed)
    return build_model("yolov3-tiny").fuse()


# -- native bf16: the CPU's flags decide, oneDNN's answer must agree where torch has one ----------------------------


@pytest.mark.parametrize("flags, onednn, native", [
    ({"avx2", "avx512f", "avx512_bf16"}, True, True),  # Zen 4/5, Cooper Lake
    ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, True, True),  # Sapphire Rapids
    ({"avx2", "avx512f", "avx512_bf16"}, None, True),  # a torch without _is_mkldnn_bf16_supported: flags alone
    ({"avx2", "avx512f", "avx512_bf16"}, False, False),  # a torch whose oneDNN cannot run bf16
    ({"avx2", "avx512f"}, True, False),  # Skylake-SP: oneDNN says yes (emulated), the flags say no
    ({"avx2"}, None, False),
    (set(), True, False),  # no /proc/cpuinfo: an unknown CPU runs fp32
])
def test_native_bf16_needs_the_cpu_flag(monkeypatch, flags, onednn, native):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(hardware, "onednn_bf16_check", lambda: onednn)
    assert hardware.cpu_has_native_bf16() is native


def test_cpu_flags_are_read_from_cpuinfo(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16 sse\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    monkeypatch.setattr(hardware, "CPUINFO", cpuinfo)
    hardware.cpu_flags.cache_clear()
    try:
        assert hardware.cpu_flags() == {"fpu", "avx2", "avx512f", "avx512_bf16", "sse"}  # the first core's
        assert hardware.cpu_features() == ["avx2", "avx512_bf16", "avx512f"]
        assert hardware.isa_class() == "AVX-512 + AVX512-BF16 (no AMX)"
        monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "missing")
        hardware.cpu_flags.cache_clear()
        assert hardware.cpu_flags() == frozenset() and hardware.isa_class() == "no AVX2"
    finally:
        hardware.cpu_flags.cache_clear()
    assert hardware.onednn_bf16_check() in (True, False, None)  # this torch's own answer, whatever it is


def test_isa_classes(monkeypatch):
    for flags, name in (({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "AVX-512 + AVX512-BF16 + AMX-BF16"),
                        ({"avx2", "avx512f"}, "AVX-512 (no bf16)"), ({"avx2"}, "AVX2 (no AVX-512)")):
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert hardware.isa_class() == name


# -- the choice: candidates, the probe picks the minimum, forcing works ------------------------------------------


@pytest.fixture
def native(monkeypatch):
    monkeypatch.setattr(forms, "cpu_has_native_bf16", lambda: True)


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(forms, "cpu_has_native_bf16", lambda: False)


@pytest.fixture
def packable(monkeypatch):
    monkeypatch.setattr(forms, "packing_available", lambda: True)


def test_candidates_on_a_cpu_with_native_bf16(native, packable):
    assert candidate_forms(CPU, "auto", None) == ["fp32", "packed", "bf16", "packed-bf16"]
    assert candidate_forms(CPU, "auto", False) == ["fp32", "bf16"]  # --no-pack: the plain convs, fp32 or bf16
    assert candidate_forms(CPU, "auto", True) == ["packed", "packed-bf16"]  # --pack: packed, fp32 or bf16
    assert candidate_forms(CPU, "fp32", None) == ["fp32", "packed"]  # --no-amp
    assert candidate_forms(CPU, "fp32", False) == ["fp32"]
    assert candidate_forms(CPU, "bf16", None) == ["bf16", "packed-bf16"]  # --amp
    assert candidate_forms(CPU, "bf16", False) == ["bf16"] and candidate_forms(CPU, "bf16", True) == ["packed-bf16"]
    assert candidate_forms(CPU, "fp16", None) == ["fp32", "packed"]  # fp16 is CUDA's: a CPU runs fp32


def test_a_cpu_without_native_bf16_never_gets_bf16_by_itself(emulated, packable):
    assert candidate_forms(CPU, "auto", None) == ["fp32", "packed"]
    assert candidate_forms(CPU, "auto", False) == ["fp32"]
    assert candidate_forms(CPU, "bf16", None) == ["bf16"]  # asked for by hand: autocast runs (emulated)
    with pytest.raises(FormError, match=r"packed bf16 conv weights need a CPU with native bf16 .* drop --pack"):
        candidate_forms(CPU, "bf16", True)


def test_candidates_on_cuda_keep_fp32_by_default():
    cuda = torch.device("cuda")
    assert candidate_forms(cuda, "auto", None) == candidate_forms(cuda, "fp32", False) == ["fp32"]
    assert candidate_forms(cuda, "fp16", None) == ["fp16"] and candidate_forms(cuda, "bf16", None) == ["bf16"]
    with pytest.raises(FormError, match="packing the conv weights is for the CPU"):
        candidate_forms(cuda, "auto", True)


@pytest.mark.parametrize("fastest", ["fp32", "packed", "bf16", "packed-bf16"])
def test_the_probe_picks_the_fastest(native, monkeypatch, fastest):
    if not packing_available() or not hardware.cpu_has_native_bf16():
        pytest.skip("needs oneDNN conv packing and a CPU with native bf16 (the packed bf16 copy is built)")
    times = {"fp32": 10.0, "packed": 9.0, "bf16": 8.0, "packed-bf16": 7.0}
    times[fastest] = 1.0
    probed = []

    def fake_probe(models, example):
        probed.append(sorted(models))
        assert example.shape == (1, 3, 64, 64) and example.dtype == torch.uint8
        return {name: times[name] for name in models}
    monkeypatch.setattr(forms, "probe_forms", fake_probe)
    model = tiny()
    chosen, form = choose_form(model, CPU, 64)
    assert probed == [["bf16", "fp32", "packed", "packed-bf16"]]
    assert form.name == fastest and form.probe_ms == times
    assert str(form).startswith(forms.DESCRIPTIONS[fastest] + " (probe: fp32 ")
    packed = [m.weight.dtype for m in chosen.modules() if isinstance(m, PackedConv2d)]
    assert set(packed) == ({forms.PACKED[fastest]} if fastest in forms.PACKED else set())
    assert (chosen is model) is (fastest not in forms.PACKED)  # packing is probed on a copy
    assert not any(isinstance(m, PackedConv2d) for m in model.modules())


def test_forcing_a_form_runs_no_probe(native, monkeypatch):
    monkeypatch.setattr(forms, "probe_forms", lambda *a: pytest.fail("probed"))
    for name, (amp, pack) in forms.OPTIONS.items():
        if name == "fp16" or (name in forms.PACKED and not packing_available()) or (
                name == "packed-bf16" and not hardware.cpu_has_native_bf16()):
            continue
        chosen, form = choose_form(tiny(), CPU, 64, amp, pack)
        assert form == Form(name) and str(form) == forms.DESCRIPTIONS[name]
        assert any(isinstance(m, PackedConv2d) for m in chosen.modules()) is (name in forms.PACKED)


def test_a_real_probe_times_every_candidate_and_moves_no_rng():
    model = tiny()
    state = torch.get_rng_state()
    example = torch.full((1, 3, 64, 64), 114, dtype=torch.uint8)
    times = probe_forms({"fp32": model, "bf16": model}, example, rounds=2, warmup=1)
    assert set(times) == {"fp32", "bf16"} and all(t > 0 for t in times.values())
    assert torch.equal(torch.get_rng_state(), state)


# -- every form computes what the plain fp32 model computes -----------------------------------------------------


def outputs_in(form_name, size=128, seed=0):
    model, form = choose_form(tiny(seed), CPU, size, *forms.OPTIONS[form_name])
    batch, _ = inference.letterbox_batch(IMAGES, size)
    with torch.inference_mode(), form.autocast(CPU):
        return model(batch)


NATIVE_PACKING = packing_available() and hardware.cpu_has_native_bf16()


@pytest.mark.parametrize("size, form", [(64, "bf16"), (128, "bf16"), pytest.param(
    128, "packed-bf16", marks=pytest.mark.skipif(not NATIVE_PACKING, reason="needs oneDNN packing and native bf16"))])
def test_bf16_outputs_match_fp32_within_tolerance(size, form):
    plain, bf16 = outputs_in("fp32", size), outputs_in(form, size)
    assert bf16.dtype == torch.float32 and bf16.shape == plain.shape  # decoded in fp32
    scores, scores_bf16 = plain[..., 4:5] * plain[..., 5:], bf16[..., 4:5] * bf16[..., 5:]
    torch.testing.assert_close(scores_bf16, scores, rtol=0, atol=SCORE_ATOL)
    torch.testing.assert_close(bf16[..., 4:], plain[..., 4:], rtol=0, atol=SCORE_ATOL)
    torch.testing.assert_close(bf16[..., :4], plain[..., :4], rtol=0, atol=BOX_ATOL)


@pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN conv packing")
def test_packed_outputs_match_fp32():
    torch.testing.assert_close(outputs_in("packed"), outputs_in("fp32"), rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not NATIVE_PACKING, reason="needs oneDNN packing and a CPU with native bf16")
def test_packed_bf16_computes_what_bf16_autocast_computes():
    """The same bf16 weights and oneDNN kernels: within bf16 rounding of the activations between layers (autocast
    returns them to fp32 around the non-conv ops, the packed form keeps them in bf16)."""
    packed, autocast = outputs_in("packed-bf16"), outputs_in("bf16")
    assert packed.dtype == torch.float32
    torch.testing.assert_close(packed[..., 4:], autocast[..., 4:], rtol=0, atol=SCORE_ATOL / 2)
    torch.testing.assert_close(packed[..., :4], autocast[..., :4], rtol=0, atol=BOX_ATOL / 2)


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which(os.environ.get("CXX") or "g++"), reason="torch.compile needs a C++ compiler")
def test_compiled_bf16_computes_what_bf16_autocast_computes():
    """--compile in bf16 (its default on a CPU with native bf16): inductor's frozen bf16 weights, its own fusions of
    the non-conv ops and its C++ wrapper give eager bf16 autocast's outputs within bf16 rounding, at a second image
    size and batch too (a recompilation: with symbolic sizes inductor's freezing failed)."""
    compiled, form = inference.ready_for_inference(tiny(), CPU, 128, "bf16", compile=True)
    assert form == Form("bf16", compiled=True)
    for size, images in ((128, IMAGES), (64, IMAGES[:3])):
        batch, _ = inference.letterbox_batch(images, size)
        with torch.inference_mode(), form.autocast(CPU):
            outputs = compiled(batch).float()
        autocast = outputs_in("bf16", size)[:len(images)]
        assert outputs.shape == autocast.shape
        torch.testing.assert_close(outputs[..., 4:], autocast[..., 4:], rtol=0, atol=SCORE_ATOL / 2)
        torch.testing.assert_close(outputs[..., :4], autocast[..., :4], rtol=0, atol=BOX_ATOL / 2)


def test_bf16_detections_of_a_known_model_are_the_fp32_ones():
    """The grid model (one 16 px box per stride-32 cell): the same detections, boxes within 1 px of the image's
    pixels, scores within SCORE_ATOL."""
    model = grid_model(cls=2).fuse().to(memory_format=torch.channels_last)
    found = {dtype: inference.detect(model, IMAGES[:2], 128, EvalConfig(), 0.25, CPU, dtype)
             for dtype in (None, torch.bfloat16)}
    plain, bf16 = found[None], found[torch.bfloat16]
    assert len(plain) == len(bf16) == 2 * 16  # 4 x 4 cells at 128 px, two images
    order = [np.lexsort(d[:, :3].numpy().T[::-1]) for d in (plain, bf16)]
    plain, bf16 = plain[order[0]], bf16[order[1]]
    assert torch.equal(plain[:, [0, 6]], bf16[:, [0, 6]])  # image and class
    torch.testing.assert_close(bf16[:, 1:5], plain[:, 1:5], rtol=0, atol=1.0)
    torch.testing.assert_close(bf16[:, 5], plain[:, 5], rtol=0, atol=SCORE_ATOL)


# -- training in bf16 on the CPU (train.amp bf16 / auto) ----------------------------------------------------------


def test_bf16_training_on_the_cpu_brings_the_loss_down_and_starts_where_fp32_does():
    batch = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[i, i % 3, 20.0 + 6 * i, 30.0, 20.0, 24.0] for i in range(4)])
    first = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = build_model("yolov3-tiny", num_classes=3).to(memory_format=torch.channels_last).train()
        loss_fn = build_loss(model, LossConfig())
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        x = batch.contiguous(memory_format=torch.channels_last)
        steps = 1 if dtype is None else 8
        results = [engine.train.train_step(model, loss_fn, [(x, targets)], optimizer, scaler, dtype, 10.0)
                   for _ in range(steps)]
        first[dtype] = results[0].losses["total"]
    losses = [r.losses["total"] for r in results]
    assert not any(r.skipped for r in results) and all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
    assert first[torch.bfloat16] == pytest.approx(first[None], rel=0.01)  # step 0: the same weights and data


def test_train_amp_auto(monkeypatch):
    monkeypatch.setattr(engine.state, "cpu_has_native_bf16", lambda: True)
    assert engine.state.autocast_dtype("auto", CPU) == torch.bfloat16
    monkeypatch.setattr(engine.state, "cpu_has_native_bf16", lambda: False)
    assert engine.state.autocast_dtype("auto", CPU) is None
    assert engine.state.autocast_dtype("fp16", CPU) is None
    assert engine.state.autocast_dtype("bf16", CPU) == torch.bfloat16
    assert load_config(ROOT / "args.yaml").train.amp == "auto"  # the default since issue 21: bf16 where native
    assert load_config(ROOT / "args.yaml", ["train.amp=auto", "eval.amp=bf16"]).eval.amp == "bf16"
    with pytest.raises(ConfigError, match=r"eval.amp='on': unknown amp 'on'.*valid amps: auto, fp32, bf16, fp16"):
        load_config(ROOT / "args.yaml", ["eval.amp='on'"])


def test_training_evaluates_in_the_probed_form_and_keeps_the_mode(native, monkeypatch):
    monkeypatch.setattr(forms, "probe_forms", lambda models, example: {"fp32": 2.0, "bf16": 1.0})
    model = build_model("yolov3-tiny", num_classes=3).train()
    form = engine.evaluate.evaluation_form(model, "auto", 64, CPU)
    assert form.name == "bf16" and form.dtype == torch.bfloat16 and model.training
    assert not any(isinstance(m, PackedConv2d) for m in model.modules())  # the live weights are never packed
    assert engine.evaluate.evaluation_form(model, "fp32", 64, CPU) == Form("fp32")


# -- the tools' options --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from utils.checkpoint import save_checkpoint
    from utils.config_load import config_to_dict
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    cfg = load_config(ROOT / "args.yaml", ["model.arch=yolov3-tiny"])
    torch.manual_seed(0)
    save_checkpoint({"model": build_model("yolov3-tiny").state_dict(), "config": config_to_dict(cfg)}, path)
    return path


VAL_ARGS = ["--config", str(ROOT / "args.yaml"), "--set", f"data.root={DATA / 'coco'}", "data.workers=0",
            "eval.batch_size=4", "--img-size", "64", "--subset", "4", "--conf", "0.00005"]


@pytest.mark.parametrize("options, printed", [
    (["--amp", "--no-pack"], "inference form: bf16 autocast, channels_last\n"),
    (["--no-amp", "--no-pack"], "inference form: fp32, channels_last\n"),
    (["--set", "eval.amp=bf16", "--no-pack"], "inference form: bf16 autocast, channels_last\n"),
    pytest.param(["--amp", "--pack"], "inference form: bf16, channels_last, conv weights packed for oneDNN\n",
                 marks=pytest.mark.skipif(not NATIVE_PACKING, reason="needs oneDNN packing and native bf16")),
    ([], "(probe: fp32 "),
])
def test_validation_prints_the_form_it_runs(weights, tmp_path, capsys, request, options, printed):
    if options:  # the named forms as on a CPU with native bf16; the probe ([]) only tries what this CPU can run
        request.getfixturevalue("native")
    validation.main(["--weights", str(weights), *VAL_ARGS, "--out", str(tmp_path), *options])
    out = capsys.readouterr().out
    assert printed in out and "AP50" in out


def test_validation_bf16_scores_like_fp32(weights, tmp_path):
    import json
    results = {}
    for name, options in (("fp32", ["--no-amp", "--no-pack"]), ("bf16", ["--amp", "--no-pack"])):
        validation.main(["--weights", str(weights), *VAL_ARGS, "--out", str(tmp_path / name), *options])
        results[name] = json.loads((tmp_path / name / "tiny_val64.json").read_text())
    assert results["bf16"]["form"].startswith("bf16") and results["fp32"]["form"].startswith("fp32")
    for key in ("AP", "AP50"):
        assert results["bf16"]["stats"][key] == pytest.approx(results["fp32"]["stats"][key], abs=0.02)


def test_contradictory_options_are_one_line(weights, emulated):
    with pytest.raises(SystemExit, match="error: packed bf16 conv weights need a CPU with native bf16"):
        validation.main(["--weights", str(weights), *VAL_ARGS, "--amp", "--pack"])
    with pytest.raises(SystemExit, match="error: --compile freezes and lays out the weights itself"):
        validation.main(["--weights", str(weights), *VAL_ARGS, "--compile", "--pack"])


def test_amp_mode():
    assert inference.amp_mode(None, "auto", CPU) == "auto"
    assert inference.amp_mode(True, "auto", CPU) == "bf16" and inference.amp_mode(False, "bf16", CPU) == "fp32"
    assert inference.amp_mode(True, "fp32", torch.device("cuda")) == "fp16"


@pytest.mark.parametrize(("has_bf16", "amp", "name"), [
    (True, "auto", "bf16"),  # the probe picks a bf16 form on every model measured where bf16 is native
    (False, "auto", "fp32"),  # emulated bf16 is slower than fp32
    (True, "fp32", "fp32"), (False, "bf16", "bf16"),  # --no-amp / --amp as named
    (True, "fp16", "fp32"),  # fp16 autocast is the CUDA path
])
def test_compile_picks_its_autocast_without_a_probe_and_calls_kernels_from_cpp(monkeypatch, has_bf16, amp, name):
    """--compile runs no probe (each candidate would compile): eval.amp auto is bf16 autocast on a CPU with native
    bf16, fp32 elsewhere; on the CPU inductor freezes the weights and calls its kernels from its C++ wrapper."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: has_bf16)
    monkeypatch.setattr(forms, "probe_forms", lambda *a: pytest.fail("probed"))
    monkeypatch.setattr(inference.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(torch, "compile", lambda model, dynamic: ("compiled", model, dynamic))
    model = tiny()
    with inductor_config.patch(freezing=False, cpp_wrapper=False):  # restored after, for the tests that compile
        compiled, form = inference.ready_for_inference(model, CPU, 64, amp, compile=True)
        assert inductor_config.freezing and inductor_config.cpp_wrapper
    assert compiled == ("compiled", model, False) and form == Form(name, compiled=True)  # static shapes
    assert str(form) == forms.DESCRIPTIONS[name] + ", torch.compile"
