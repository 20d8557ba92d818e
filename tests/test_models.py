"""Model structure against Darknet's cfg files, parameter/FLOP counts, outputs, decoding, fusion, encoders."""
import math
import urllib.error

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops.misc import Conv2dNormActivation

from models import build_model
from models.common import ConvBNLeaky
from models.mobilenet import MobileNetV3Encoder
from models.packed import PackedConv2d, pack_conv_weights, packing_available
from models.yolo import HeadOutput, decode


def randomize_bn(model):
    """Give every BatchNorm non-trivial statistics so that fusion is really tested."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("arch, params", [("yolov3", 61_949_149), ("yolov3-tiny", 8_852_366)])
def test_parameter_count_is_darknets(arch, params):
    model = build_model(arch)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("arch", ["yolov3", "yolov3-tiny"])
def test_layers_match_darknet_cfg(arch, cfg_convs):
    layers = build_model(arch).darknet_layers()
    expected = cfg_convs[arch]
    assert len(layers) == len(expected)
    for i, (layer, ref) in enumerate(zip(layers, expected, strict=True)):
        conv = layer.conv if isinstance(layer, ConvBNLeaky) else layer
        got = {"filters": conv.out_channels, "size": conv.kernel_size[0], "stride": conv.stride[0],
               "in_channels": conv.in_channels, "batch_normalize": isinstance(layer, ConvBNLeaky)}
        assert got == {k: ref[k] for k in got}, f"conv {i} (cfg layer {ref['index']})"
        assert conv.padding[0] == ref["size"] // 2


@pytest.mark.parametrize("arch, gflops", [("yolov3", 65.86), ("yolov3-tiny", 5.56)])
def test_flops_at_416(arch, gflops):
    model = build_model(arch).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, 416, 416))
    assert counter.get_total_flops() / 1e9 == pytest.approx(gflops, rel=0.005)


@pytest.mark.parametrize("arch, encoder", [("yolov3", "darknet53"), ("yolov3-tiny", "darknet53"),
                                           ("yolov3", "mobilenet_v3_large"), ("yolov3", "mobilenet_v3_small")])
def test_output_shapes_rectangular_forward_backward(arch, encoder):
    model = build_model(arch, encoder, num_classes=3)
    x = torch.rand(2, 3, 64, 96)
    raw = model.train()(x)
    strides = model.strides
    assert [r.shape for r in raw] == [(2, 3, 64 // s, 96 // s, 8) for s in strides]
    sum(r.square().mean() for r in raw).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    first = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.weight.grad.abs().sum() > 0
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (2, sum(3 * (64 // s) * (96 // s) for s in strides), 8)
    assert ((out[..., 4:] >= 0) & (out[..., 4:] <= 1)).all()


def test_batch_of_one_and_five_agree():
    model = build_model("yolov3-tiny", num_classes=2).eval()
    x = torch.rand(5, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x)[3:4], model(x[3:4]), atol=1e-5)


@pytest.mark.parametrize("encoder", ["darknet53", "mobilenet_v3_small"])  # no input normalisation / ImageNet's
def test_uint8_input_is_the_float_input_divided_by_255(encoder):
    torch.manual_seed(0)
    model = build_model("yolov3", encoder, num_classes=2)
    image = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    unit = image.float() / 255
    for mode in (model.train(), model.eval()):
        with torch.no_grad():
            expected, got = mode(unit), mode(image)
        for e, g in zip(expected if isinstance(expected, list) else [expected], got if isinstance(got, list) else [got],
                        strict=True):
            assert torch.equal(e, g)  # the same float32 division, bit for bit
    assert image.dtype == torch.uint8  # the caller's batch is left alone


def test_input_not_multiple_of_32_is_refused():
    model = build_model("yolov3-tiny", num_classes=2)
    with pytest.raises(ValueError, match=r"\(64, 80\).*multiples of 32"):
        model(torch.rand(1, 3, 64, 80))


def test_decode_by_hand_non_square():
    # one head, stride 32, 2 anchors, a 2 x 3 grid (input 64 x 96), 2 classes
    anchors = torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    raw = torch.zeros(1, 2, 2, 3, 7)
    raw[0, 1, 1, 2] = torch.tensor([0.0, math.log(3), math.log(2), 0.0, 0.0, math.log(4), math.log(0.25)])
    out = decode(raw, anchors, 32)
    assert out.shape == (1, 12, 7)
    # anchor 1, row 1, col 2 -> index 1*6 + 1*3 + 2 = 11 (anchor, row, column order)
    # cx = (0.5 + 2) * 32, cy = (0.75 + 1) * 32, w = 2 * 30, h = 1 * 40, obj 0.5, classes 0.8 / 0.2
    expected = torch.tensor([80.0, 56.0, 60.0, 40.0, 0.5, 0.8, 0.2])
    assert torch.allclose(out[0, 11], expected, atol=1e-5)
    # an all-zero prediction at anchor 0, row 0, col 1: centre of cell (1, 0), anchor 0's size
    assert torch.allclose(out[0, 1, :4], torch.tensor([48.0, 16.0, 10.0, 20.0]))


def test_eval_output_is_train_output_decoded_in_darknet_order():
    model = build_model("yolov3", "mobilenet_v3_small", num_classes=2)
    x = torch.rand(1, 3, 96, 64)
    with torch.no_grad():
        model.train()
        for m in model.modules():  # keep BN in eval so both passes compute the same thing
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        raw = model(x)
        decoded = model.eval()(x)
    # heads: stride 32 with anchors 6,7,8 first, then 16 (3,4,5), then 8 (0,1,2)
    anchors = model.anchors
    expected = torch.cat([decode(raw[0], anchors[6:9], 32), decode(raw[1], anchors[3:6], 16),
                          decode(raw[2], anchors[0:3], 8)], 1)
    assert torch.allclose(decoded, expected, atol=1e-5)


def test_tiny_uses_darknets_anchor_masks():
    model = build_model("yolov3-tiny")
    assert model.masks == ((3, 4, 5), (1, 2, 3))
    assert model.anchors[list(model.masks[1])].tolist() == [[23, 27], [37, 58], [81, 82]]


def test_custom_anchors_are_used():
    anchors = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12]]
    model = build_model("yolov3-tiny", anchors=anchors, num_classes=1)
    assert model.anchors.tolist() == anchors
    with pytest.raises(ValueError, match="needs 9"):
        build_model("yolov3", anchors=anchors)


def test_head_biases_start_at_priors():
    model = build_model("yolov3", num_classes=4)
    outs = [m for m in model.modules() if isinstance(m, HeadOutput)]
    assert len(outs) == 3
    for out in outs:
        bias = out.bias.view(3, 9)
        assert torch.allclose(bias[:, 4].sigmoid(), torch.full((3,), 0.01))
        assert torch.allclose(bias[:, 5:].sigmoid(), torch.full((3, 4), 0.2))


@pytest.mark.parametrize("arch, encoder", [("yolov3-tiny", "darknet53"), ("yolov3", "mobilenet_v3_small")])
def test_fuse_preserves_outputs(arch, encoder, tmp_path):
    model = randomize_bn(build_model(arch, encoder, num_classes=3)).eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        before = model(x)
        assert (before[0] - before[1]).abs().max() > 1e-3  # the outputs depend on the input
        model.fuse()
        after = model(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
    expected_error = "fused" if encoder == "darknet53" else "no Darknet weights format"
    with pytest.raises(ValueError, match=expected_error):
        model.save_darknet_weights(tmp_path / "fused.weights")
    assert list(tmp_path.iterdir()) == []


def test_mobilenet_taps_and_no_classifier():
    encoder = MobileNetV3Encoder("mobilenet_v3_large")
    c3, c4, c5 = encoder(torch.rand(1, 3, 64, 64))
    assert [c.shape[1:] for c in (c3, c4, c5)] == [(40, 8, 8), (112, 4, 4), (960, 2, 2)]
    assert encoder.out_channels == (40, 112, 960)
    assert not any(isinstance(m, torch.nn.Linear) for m in encoder.modules())


def test_mobilenet_pretrained_from_local_file(tmp_path):
    reference = torchvision.models.mobilenet_v3_small()
    path = tmp_path / "mobilenet_v3_small.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("yolov3", "mobilenet_v3_small", pretrained=True, pretrained_path=str(path))
    stem = model.encoder.stage8[0][0]
    assert torch.equal(stem.weight, reference.features[0][0].weight)
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_mobilenet_pretrained_download_failure_says_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"could not be downloaded.*model.pretrained_path"):
        build_model("yolov3", "mobilenet_v3_large", pretrained=True)


def test_mobilenet_pretrained_wrong_file(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(torchvision.models.mobilenet_v3_large().state_dict(), path)
    with pytest.raises(RuntimeError, match="other.pth is not a torchvision mobilenet_v3_small state dict"):
        build_model("yolov3", "mobilenet_v3_small", pretrained=True, pretrained_path=str(path))


def test_bad_arch_and_encoder():
    with pytest.raises(ValueError, match="model.arch='yolov4': unknown architecture"):
        build_model("yolov4")
    with pytest.raises(ValueError, match="model.encoder='mobilenet_v3_small': does not exist for yolov3-tiny; "
                       "use 'darknet53'"):
        build_model("yolov3-tiny", "mobilenet_v3_small")
    with pytest.raises(FileNotFoundError, match="download_darknet_weights.sh"):
        build_model("yolov3", pretrained=True)


@pytest.mark.parametrize("arch, encoder", [("yolov3-tiny", "darknet53"), ("yolov3", "darknet53"),
                                           ("yolov3", "mobilenet_v3_small")])
def test_fused_channels_last_inference_matches_plain(arch, encoder):
    """The fast inference path (fused BN, channels_last, inference_mode) computes what the plain eval model does."""
    torch.manual_seed(0)
    model = randomize_bn(build_model(arch, encoder, num_classes=3)).eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        plain = model(x)
    model.fuse().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        fast = model(x.contiguous(memory_format=torch.channels_last))
    assert model.head32[-1].weight.is_contiguous(memory_format=torch.channels_last)
    assert (plain[0] - plain[1]).abs().max() > 1e-3
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN conv packing")
@pytest.mark.parametrize("arch, encoder, convs", [("yolov3-tiny", "darknet53", 13), ("yolov3", "darknet53", 75),
                                                  ("yolov3", "mobilenet_v3_small", 75)])
def test_packed_convs_match_plain(arch, encoder, convs):
    """Packed weights + fused activations (the CPU inference path) compute what the plain eval model does, at the
    packed shape and at another batch and size; every conv is packed, every conv + activation pair fused."""
    torch.manual_seed(0)
    model = randomize_bn(build_model(arch, encoder, num_classes=3)).eval()
    # conv + BN + activation blocks: every conv but the heads' outputs (and MobileNet's SE and linear projections)
    fused = sum(isinstance(m, ConvBNLeaky) or (isinstance(m, Conv2dNormActivation) and len(m) == 3)
                for m in model.modules())
    x, other = torch.rand(1, 3, 64, 96), torch.rand(3, 3, 96, 64)
    with torch.no_grad():
        plain, plain_other = model(x), model(other)
    model.fuse().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert pack_conv_weights(model, x.contiguous(memory_format=torch.channels_last)) == convs
        packed, packed_other = model(x), model(other)
    layers = [m for m in model.modules() if isinstance(m, PackedConv2d)]
    assert len(layers) == convs and not any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert sum(m.attr != "none" for m in layers) == fused
    if encoder == "darknet53":  # every conv but the heads' output convs is conv + BN + leaky
        assert fused == convs - len(model.strides)
    torch.testing.assert_close(packed, plain, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed_other, plain_other, atol=1e-4, rtol=1e-4)


def test_packing_refuses_a_training_model():
    model = build_model("yolov3-tiny", num_classes=3)
    with pytest.raises(ValueError, match="eval-mode"):
        pack_conv_weights(model, torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_tiny_max_pool_in_inference_is_max_pool2d(dtype, memory_format, monkeypatch):
    """MaxPool2x2's pairwise maxima (channels_last): max_pool2d's values exactly (ties and negative values included),
    layout kept; NCHW, odd sides and autograd run max_pool2d itself (a tie's gradient goes to one element)."""
    from models.darknet import MaxPool2x2
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 6).round().to(dtype).contiguous(memory_format=memory_format)  # rounded: many ties
    pool = MaxPool2x2()
    with monkeypatch.context() as patch, torch.inference_mode():
        if memory_format == torch.channels_last:  # the fast path must be the one computing here
            patch.setattr(torch.nn.MaxPool2d, "forward", lambda *a: pytest.fail("max_pool2d ran"))
        fast = pool(x)
    assert torch.equal(fast, torch.nn.functional.max_pool2d(x, 2, 2)) and fast.shape == (2, 16, 4, 3)
    assert fast.is_contiguous(memory_format=memory_format)
    odd = x[..., :5]  # an odd side: max_pool2d's floor, not the slices
    with torch.no_grad():
        assert torch.equal(pool(odd), torch.nn.functional.max_pool2d(odd, 2, 2))
    leaf = x.float().requires_grad_()
    pool(leaf).sum().backward()
    assert leaf.grad.sum() == 2 * 16 * 4 * 3 and set(leaf.grad.unique().tolist()) == {0.0, 1.0}  # one per window
