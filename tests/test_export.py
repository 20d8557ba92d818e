"""export.py: the ONNX and TorchScript files compute what the PyTorch model computes (checked here on our own,
besides the tool's check), with a dynamic batch; the NMS graph gives models/postprocess.py's detections; a difference
above the tolerance fails the run."""
import onnx
import onnxruntime
import pytest
import torch
from conftest import DATA

import export
from datasets.sources import read_image
from inference import letterbox_batch, unit_float
from models import build_model
from models.postprocess import postprocess
from models.yolo import HeadOutput
from utils.checkpoint import save_checkpoint
from utils.config_load import config_to_dict, load_config

ROOT = DATA.parent.parent
IMAGE = DATA / "coco" / "images" / "val2017" / "000000397133.jpg"  # what the tool checks on: data.val_images' first
SIZE = 64


def random_model(arch, encoder, tmp_path, suffix):
    """A model with BatchNorm statistics away from the identity (so that folding them matters) and boxes of about
    half the input side; saved as a checkpoint or a Darknet file. Returns the unfused eval-mode model and the file."""
    torch.manual_seed(0)
    model = build_model(arch, encoder)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.2)
        # Rescale the head output channels so that what is compared depends on the image as a trained model's
        # output does: logits of x, y, objectness and classes with std 1 on an image; w, h logits damped to boxes of
        # about half the input side (not the anchors' up to 373 px, where a float32 step is 3e-5 px).
        x = unit_float(letterbox_batch([read_image(IMAGE)], SIZE)[0])
        maps = model.eval().head_maps(model.normalize(torch.cat([x, torch.rand_like(x)])))
        heads = [m for m in model.modules() if isinstance(m, HeadOutput)]  # stride 32 first, as model.masks
        for out, mask, raw in zip(heads, model.masks, maps, strict=True):
            scale = 1 / raw.std((0, 2, 3)).clamp(min=1e-12)  # (A * (5+C),)
            scale.view(len(mask), -1)[:, 2:4] = 0.1
            out.weight *= scale.view(-1, 1, 1, 1)
            bias = out.bias.view(len(mask), -1)
            bias[:, :2] = 0.0
            bias[:, 2:4] = torch.log(SIZE / 2 / model.anchors[list(mask)])
    path = tmp_path / f"model{suffix}"
    if suffix == ".weights":
        model.save_darknet_weights(path)
    else:
        cfg = load_config(ROOT / "args.yaml", [f"model.arch={arch}", f"model.encoder={encoder}"])
        save_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg)}, path)
    return model.eval(), path


def tool_args(path, arch, *extra):
    return ["--weights", str(path), "--config", str(ROOT / "args.yaml"), "--set", f"data.root={DATA / 'coco'}",
            f"model.arch={arch}", "--img-size", str(SIZE), "--check-images", "0", *extra]  # AP: test_deploy.py


def max_diffs(reference, exported):
    assert exported.shape == reference.shape
    diff = (torch.as_tensor(exported) - reference).abs()
    return float(diff[..., :4].max()), float(diff[..., 4:].max())


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("arch, encoder, suffix, opset", [("yolov3-tiny", "darknet53", ".weights", 17),
                                                          ("yolov3", "mobilenet_v3_small", ".pt", 13)])
def test_onnx_and_torchscript_match_pytorch(tmp_path, capsys, arch, encoder, suffix, opset):
    model, path = random_model(arch, encoder, tmp_path, suffix)
    result = export.main(tool_args(path, arch, "--opset", str(opset), "--dynamic-size"))
    assert result["files"] == {"onnx": tmp_path / "model.onnx", "torchscript": tmp_path / "model.torchscript"}
    printed = capsys.readouterr().out
    assert printed.count(" ok\n") == 6 and "checked against PyTorch: every difference within --atol 0.0001" in printed
    for fmt in ("onnx", "torchscript"):  # the tool's own check: batch 1 and 3 at 64 px, batch 1 at 96 px
        assert list(result["checks"][fmt]) == ["batch 1 at 64", "batch 3 at 64", "batch 1 at 96"]
        assert all(d["ok"] and d["probabilities"] < 1e-4 for d in result["checks"][fmt].values())

    # and on our own, with onnxruntime and torch.jit.load against the unfused PyTorch model (the files are fused)
    graph = onnx.load(str(tmp_path / "model.onnx"))
    assert graph.opset_import[0].version == opset
    # the decoding is a cat of channel groups: slice assignment would be traced as ScatterND plus a subgraph that
    # builds its index tensor on every call (0.2-0.3 of the INT8 file's time in OpenVINO, BENCHMARKS.md)
    assert "ScatterND" not in {node.op_type for node in graph.graph.node}
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    scripted = torch.jit.load(str(tmp_path / "model.torchscript"))
    x = unit_float(letterbox_batch([read_image(IMAGE)], SIZE)[0])
    batch = torch.cat([x, x.flip(-1), torch.rand_like(x)])
    with torch.no_grad():
        reference, scripted_out = model(batch), scripted(x)
    outputs = {"onnx batch 3": session.run(None, {"images": batch.numpy()})[0], "torchscript batch 1": scripted_out,
               "onnx batch 1": session.run(None, {"images": x.numpy()})[0]}
    for name, out in outputs.items():
        # Probabilities within 1e-4; boxes within 1e-4 of the input side (0.0064 px at 64 px): a box coordinate of
        # tens of pixels after 20+ float32 layers differs by up to ~1e-4 px between kernels (PyTorch's own
        # BatchNorm folding included), which says nothing about the export.
        boxes, probabilities = max_diffs(reference[:len(out)], out)
        assert boxes / SIZE < 1e-4 and probabilities < 1e-4, (name, boxes, probabilities)
    assert reference[..., 4].std() > 0.1  # the objectness compared is spread out, not the initial prior 0.01


def test_nms_graph_gives_postprocess_detections(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("yolov3-tiny", num_classes=5).eval()
    with torch.no_grad():  # spread scores: many overlapping boxes of several classes above 0.3, few ties
        for out, mask in zip((model.head32.out, model.head16.out), model.masks, strict=True):
            out.weight.view(len(mask), -1, *out.weight.shape[1:])[:, 4:] *= 20  # objectness and class logits
            out.bias.view(len(mask), -1)[:, 4:].normal_(0, 3)
    path = tmp_path / "model.pt"
    cfg = load_config(ROOT / "args.yaml", ["model.arch=yolov3-tiny", "model.num_classes=5"])
    save_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg)}, path)
    export.main(tool_args(path, "yolov3-tiny", "--set", "eval.max_det=5", "--format", "onnx", "--nms", "--conf", "0.3"))
    printed = capsys.readouterr().out
    assert "batch 3 at 64    max abs diff" in printed and "(15 detections)  ok" in printed  # 5 per image
    assert "checked against PyTorch" in printed

    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["detections"]
    x = unit_float(letterbox_batch([read_image(IMAGE)], SIZE)[0])
    batch = torch.cat([x, torch.rand_like(x)])
    exported = torch.from_numpy(session.run(None, {"images": batch.numpy()})[0])
    with torch.no_grad():
        expected = postprocess(model(batch), 0.3, 0.6, 5, max_candidates=10**6)
    assert exported[:, 0].tolist() == [0.0] * 5 + [1.0] * 5  # max_det per image, by image
    torch.testing.assert_close(exported, expected, atol=1e-4, rtol=0)  # same order: by image, best first


def test_difference_above_tolerance_fails(tmp_path):
    _, path = random_model("yolov3-tiny", "darknet53", tmp_path, ".weights")
    with pytest.raises(SystemExit, match=r"differs from PyTorch by more than --atol 1e-12; do not deploy it:\n  onnx "
                                         r"batch 1 at 64: boxes .* px, probabilities"):
        export.main(tool_args(path, "yolov3-tiny", "--format", "onnx", "--atol", "1e-12"))
    with pytest.raises(SystemExit, match=r"--image: .*nothere.jpg: cannot be decoded"):
        export.main(tool_args(path, "yolov3-tiny", "--image", str(tmp_path / "nothere.jpg")))
    with pytest.raises(SystemExit):
        export.main(tool_args(path, "yolov3-tiny", "--opset", "9"))
