"""CUDA paths against the CPU and plain paths: forward, loss, post-processing, fused / channels_last / fp16, AMP
training. Skipped where no CUDA device exists (CI); run them on a GPU machine with `pytest tests/test_cuda.py`."""
import pytest
import torch

from engine.train import train_step
from models import build_model
from models.loss import build_loss
from models.postprocess import postprocess
from utils.config import LossConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 convolutions and matmuls in true fp32 (TF32 is on by default for cuDNN convolutions)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def seeded(arch: str = "yolov3", num_classes: int = 80):
    torch.manual_seed(0)
    return build_model(arch, "darknet53", num_classes).eval()


def images(batch: int = 2, size: int = 96) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_forward_on_cuda_matches_cpu():
    model, x = seeded(), images()
    with torch.inference_mode():
        cpu = model(x)
        gpu = model.to(CUDA)(x.to(CUDA)).cpu()
    assert gpu.shape == cpu.shape == (2, 3 * (9 + 36 + 144), 85)
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-3)  # boxes in pixels, scores in [0, 1]


def test_uint8_input_equals_float_input_on_cuda():
    model, x = seeded().to(CUDA), images().to(CUDA)
    with torch.inference_mode():
        assert torch.equal(model(x), model(x.float() / 255))


def test_fused_channels_last_and_fp16_on_cuda_match_plain():
    model, x = seeded().to(CUDA), images().to(CUDA)
    with torch.inference_mode():
        plain = model(x)
        model.fuse().to(memory_format=torch.channels_last)
        fused = model(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cuda", torch.float16):
            half = model(x.contiguous(memory_format=torch.channels_last)).float()
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-3)
    # fp16: scores to about 1e-2, boxes (pixels, up to ~100 here) to about 1 %
    torch.testing.assert_close(half[..., 4:], plain[..., 4:], rtol=0, atol=2e-2)
    torch.testing.assert_close(half[..., :4], plain[..., :4], rtol=2e-2, atol=0.5)


def test_loss_on_cuda_matches_cpu():
    model = seeded()
    loss_fn = build_loss(model, LossConfig())
    g = torch.Generator().manual_seed(2)
    outputs = [torch.randn(4, 3, 128 // s, 128 // s, 85, generator=g) for s in model.strides]
    targets = torch.cat([torch.arange(4).repeat_interleave(10)[:, None].float(),
                         torch.randint(80, (40, 1), generator=g).float(),
                         torch.rand(40, 2, generator=g) * 100 + 14, torch.rand(40, 2, generator=g) * 60 + 4], 1)
    cpu_loss, cpu_terms = loss_fn(outputs, targets)
    gpu_loss, gpu_terms = loss_fn([o.to(CUDA) for o in outputs], targets.to(CUDA))
    assert gpu_loss.device.type == CUDA.type
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=1e-5, atol=1e-5)
    assert gpu_terms.keys() == cpu_terms.keys()
    for key in cpu_terms:
        torch.testing.assert_close(gpu_terms[key].cpu(), cpu_terms[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("boxes", [500, 3000])  # 3000: ~18k candidates, several NMS chunks on CUDA
def test_postprocess_on_cuda_matches_cpu(boxes):
    g = torch.Generator().manual_seed(3)
    pred = torch.cat([torch.rand(2, boxes, 2, generator=g) * 300 + 50, torch.rand(2, boxes, 2, generator=g) * 80 + 10,
                      torch.rand(2, boxes, 1, generator=g), torch.rand(2, boxes, 5, generator=g) ** 4], 2)
    cpu = postprocess(pred, 0.01, 0.5, 100, 10000, True)
    gpu = postprocess(pred.to(CUDA), 0.01, 0.5, 100, 10000, True).cpu()
    assert len(cpu) == len(gpu) == 200  # 100 per image: both images keep max_det
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-4)


def test_amp_fp16_training_on_cuda_brings_the_loss_down():
    torch.manual_seed(0)
    model = build_model("yolov3-tiny", "darknet53", 3).to(CUDA, memory_format=torch.channels_last).train()
    loss_fn = build_loss(model, LossConfig())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    batch = images(4, 128).to(CUDA).contiguous(memory_format=torch.channels_last)
    targets = torch.tensor([[i, i % 3, 40.0 + 10 * i, 60.0, 30.0, 40.0] for i in range(4)], device=CUDA)
    results = [train_step(model, loss_fn, [(batch, targets)], optimizer, scaler, torch.float16, 10.0)
               for _ in range(60)]
    losses = [r.losses["total"] for r in results if not r.skipped]
    # GradScaler starts at 2^16 and halves on each overflow: the per-image sum loss overflowed fp16 in 6 of the first
    # steps on an H200 (the GPU demo: 3 skipped steps of 900)
    assert sum(r.skipped for r in results) <= 10, "the fp16 scaler settles its scale within a few steps"
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


def test_forms_on_cuda_default_to_fp32_and_autocast_matches_it():
    """models/forms.py on CUDA: eval.amp auto keeps fp32 (no probe), --amp is fp16 autocast, bf16 where asked; the
    autocast forms compute the fp32 outputs within fp16 / bf16 tolerances (tests/test_forms.py for the CPU)."""
    from models.forms import FormError, choose_form
    x = images().to(CUDA)
    outputs = {}
    for amp in ("auto", "fp16", "bf16"):
        model, form = choose_form(seeded().fuse(), CUDA, 96, amp)
        assert form.name == ("fp32" if amp == "auto" else amp) and not form.probe_ms
        with torch.inference_mode(), form.autocast(CUDA):
            outputs[amp] = model(x)
        assert outputs[amp].dtype == torch.float32  # decoded in fp32
    for amp in ("fp16", "bf16"):
        torch.testing.assert_close(outputs[amp][..., 4:], outputs["auto"][..., 4:], rtol=0, atol=2e-2)
        torch.testing.assert_close(outputs[amp][..., :4], outputs["auto"][..., :4], rtol=2e-2, atol=1.0)
    with pytest.raises(FormError, match="packing the conv weights is for the CPU"):
        choose_form(seeded().fuse(), CUDA, 96, "auto", pack=True)


def test_train_amp_auto_on_cuda_is_bf16_where_the_gpu_has_it():
    from engine.state import autocast_dtype
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert autocast_dtype("auto", CUDA) == expected and autocast_dtype("fp16", CUDA) == torch.float16
