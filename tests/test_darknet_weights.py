"""Darknet .weights I/O: files written here in Darknet's format (sizes from the cfg files, not from our model)."""
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import darknet_float_count

from models import build_model

ROOT = Path(__file__).resolve().parents[1]


def write_weights(path, floats, major=0, minor=2, revision=0, seen=32013312):
    """A Darknet .weights file: int32 major, minor, revision; seen int64 (version >= 0.2) or int32; float32s."""
    seen_dtype = "<i8" if major * 10 + minor >= 2 else "<i4"
    with open(path, "wb") as f:
        f.write(np.array([major, minor, revision], "<i4").tobytes())
        f.write(np.array([seen], seen_dtype).tobytes())
        f.write(np.asarray(floats, "<f4").tobytes())
    return path


def random_floats(n, seed=0):
    return np.random.default_rng(seed).standard_normal(n, dtype=np.float32)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["yolov3", "yolov3-tiny"])
def test_round_trip_is_bit_exact(arch, cfg_convs, tmp_path):
    convs = cfg_convs[arch]
    floats = random_floats(darknet_float_count(convs))
    source = write_weights(tmp_path / f"{arch}.weights", floats)
    model = build_model(arch)
    assert model.load_darknet_weights(source) == "full model"
    assert model.darknet_header.seen == 32013312

    # first layer: BN bias, scale, mean, variance (c each), then the c x 3 x 3 x 3 kernel, row-major
    c = convs[0]["filters"]
    stem = model.darknet_layers()[0]
    assert torch.equal(stem.bn.bias, torch.from_numpy(floats[0:c]))
    assert torch.equal(stem.bn.weight, torch.from_numpy(floats[c:2 * c]))
    assert torch.equal(stem.bn.running_mean, torch.from_numpy(floats[2 * c:3 * c]))
    assert torch.equal(stem.bn.running_var, torch.from_numpy(floats[3 * c:4 * c]))
    assert torch.equal(stem.conv.weight, torch.from_numpy(floats[4 * c:4 * c + c * 27]).view(c, 3, 3, 3))
    # last layer: a head output conv, bias then weights, ends the file
    last = model.darknet_layers()[-1]
    n_w = last.weight.numel()
    assert torch.equal(last.weight.flatten(), torch.from_numpy(floats[-n_w:]))
    assert torch.equal(last.bias, torch.from_numpy(floats[-n_w - 255:-n_w]))

    copy = tmp_path / "copy.weights"
    model.save_darknet_weights(copy)
    assert copy.read_bytes() == source.read_bytes()


def test_old_header_with_int32_seen_round_trips(cfg_convs, tmp_path):
    source = write_weights(tmp_path / "old.weights", random_floats(darknet_float_count(cfg_convs["yolov3-tiny"])),
                           major=0, minor=1, seen=12345)
    model = build_model("yolov3-tiny")
    model.load_darknet_weights(source)
    assert (model.darknet_header.minor, model.darknet_header.seen) == (1, 12345)
    model.save_darknet_weights(tmp_path / "copy.weights")
    assert (tmp_path / "copy.weights").read_bytes() == source.read_bytes()
    assert source.stat().st_size == 16 + 4 * darknet_float_count(cfg_convs["yolov3-tiny"])


def test_loaded_model_computes_with_the_loaded_weights(cfg_convs, tmp_path):
    """Two models loaded from one file give identical outputs; a freshly initialised one does not."""
    floats = random_floats(darknet_float_count(cfg_convs["yolov3-tiny"]), seed=3) * 0.05
    floats = np.abs(floats) + 0.01  # positive variances everywhere keep BN finite
    path = write_weights(tmp_path / "tiny.weights", floats)
    a, b, fresh = build_model("yolov3-tiny"), build_model("yolov3-tiny"), build_model("yolov3-tiny")
    a.load_darknet_weights(path)
    b.load_darknet_weights(path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))
        assert not torch.allclose(a(x), fresh.eval()(x))


def test_backbone_only_file_loads_backbone(cfg_convs, tmp_path):
    backbone = cfg_convs["yolov3"][:52]  # darknet53.conv.74: cfg layers 0-73 hold the first 52 convs
    floats = random_floats(darknet_float_count(backbone))
    path = write_weights(tmp_path / "darknet53.conv.74", floats)
    assert path.stat().st_size == 162482580  # the official file's size
    model = build_model("yolov3")
    heads_before = {k: v for k, v in state(model).items() if not k.startswith("encoder.")}
    assert model.load_darknet_weights(path) == "darknet53.conv.74"
    last_backbone = model.encoder.stage5[-1].expand.conv.weight
    assert torch.equal(last_backbone.flatten(), torch.from_numpy(floats[-last_backbone.numel():]))
    after = state(model)
    assert all(torch.equal(v, after[k]) for k, v in heads_before.items())


def test_pretrained_darknet53_through_build_model(cfg_convs, tmp_path):
    floats = random_floats(darknet_float_count(cfg_convs["yolov3"][:52]))
    path = write_weights(tmp_path / "darknet53.conv.74", floats)
    model = build_model("yolov3", pretrained=True, pretrained_path=str(path))
    assert torch.equal(model.encoder.stem.bn.bias, torch.from_numpy(floats[:32]))


@pytest.mark.parametrize("case", ["other_arch", "other_classes", "truncated", "extra", "odd_bytes", "header_only"])
def test_wrong_files_are_refused_before_touching_weights(case, cfg_convs, tmp_path):
    tiny = cfg_convs["yolov3-tiny"]
    n = darknet_float_count(tiny)
    if case == "other_arch":
        floats = random_floats(n)  # a yolov3-tiny file into yolov3
        model = build_model("yolov3")
    else:
        model = build_model("yolov3-tiny", num_classes=20 if case == "other_classes" else 80)
        floats = {"other_classes": random_floats(n), "truncated": random_floats(n - 1000),
                  "extra": random_floats(n + 1), "odd_bytes": random_floats(n), "header_only": []}[case]
    path = write_weights(tmp_path / "bad.weights", floats)
    if case == "odd_bytes":
        with open(path, "ab") as f:
            f.write(b"\x00\x00")
    before = state(model)
    expected = "not a whole number of float32" if case == "odd_bytes" else \
        rf"holds {len(floats):,} float32 weights, but this model expects [\d,]+ for the full model"
    with pytest.raises(ValueError, match=expected):
        model.load_darknet_weights(path)
    after = state(model)
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_short_header_and_missing_file(tmp_path):
    path = tmp_path / "short.weights"
    path.write_bytes(b"\x00" * 7)
    model = build_model("yolov3-tiny")
    with pytest.raises(ValueError, match="short.weights: 7 bytes, too short"):
        model.load_darknet_weights(path)
    with pytest.raises(FileNotFoundError, match="nothere.weights"):
        model.load_darknet_weights(tmp_path / "nothere.weights")


def test_mobilenet_has_no_darknet_format(tmp_path):
    with pytest.raises(ValueError, match="no Darknet weights format"):
        build_model("yolov3", "mobilenet_v3_small").load_darknet_weights(tmp_path / "x.weights")


def five_int32_file(path, standard_file, seen, major=0, minor=0, revision=0, fifth=0):
    """Rewrite a version-0.2 file's 20-byte header (3 int32 + int64 seen) as five int32, as some PyTorch ports do."""
    data = standard_file.read_bytes()
    path.write_bytes(np.array([major, minor, revision, seen, fifth], "<i4").tobytes() + data[20:])
    return path


def header_warnings(caught, path):
    return [w for w in caught if path.name in str(w.message)]


def test_five_int32_header_loads_with_a_warning(cfg_convs, tmp_path):
    source = build_model("yolov3-tiny", num_classes=80)
    source.load_darknet_weights(write_weights(tmp_path / "random.weights",
                                              random_floats(darknet_float_count(cfg_convs["yolov3-tiny"]), seed=5)))
    source.save_darknet_weights(tmp_path / "standard.weights")
    path = five_int32_file(tmp_path / "port.weights", tmp_path / "standard.weights", seen=4242)
    assert path.stat().st_size == 20 + 4 * darknet_float_count(cfg_convs["yolov3-tiny"])  # Darknet's rule: 16 + ...

    model = build_model("yolov3-tiny", num_classes=80)
    with pytest.warns(UserWarning, match=r"port\.weights: the header is 20 bytes \(five int32.*PyTorch ports.*"
                                         r"instead of Darknet's 16"):
        assert model.load_darknet_weights(path) == "full model"
    expected, got = source.state_dict(), model.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(v, got[k]) for k, v in expected.items())
    header = model.darknet_header
    assert (header.major, header.minor, header.revision, header.seen) == (0, 0, 0, 4242)

    # saving writes Darknet's standard header again (version 0.0: int32 seen, 16 bytes), same floats
    model.save_darknet_weights(tmp_path / "resaved.weights")
    resaved = (tmp_path / "resaved.weights").read_bytes()
    assert resaved == np.array([0, 0, 0, 4242], "<i4").tobytes() + path.read_bytes()[20:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_model("yolov3-tiny").load_darknet_weights(tmp_path / "resaved.weights")
    assert not header_warnings(caught, tmp_path / "resaved.weights")


def test_five_int32_header_on_a_backbone_file(cfg_convs, tmp_path):
    floats = random_floats(darknet_float_count(cfg_convs["yolov3"][:52]), seed=6)
    standard = write_weights(tmp_path / "standard.conv.74", floats)
    path = five_int32_file(tmp_path / "darknet53.conv.74", standard, seen=7, minor=1, fifth=99)
    model = build_model("yolov3")
    with pytest.warns(UserWarning, match="darknet53.conv.74: the header is 20 bytes"):
        assert model.load_darknet_weights(path) == "darknet53.conv.74"
    last_backbone = model.encoder.stage5[-1].expand.conv.weight
    assert torch.equal(last_backbone.flatten(), torch.from_numpy(floats[-last_backbone.numel():]))
    assert torch.equal(model.encoder.stem.bn.bias, torch.from_numpy(floats[:32]))
    assert (model.darknet_header.minor, model.darknet_header.seen) == (1, 7)


@pytest.mark.parametrize("extra", [-2, 1, 2])
def test_file_fitting_neither_header_is_refused(extra, cfg_convs, tmp_path):
    n = darknet_float_count(cfg_convs["yolov3-tiny"])
    # version 0.0, int32 seen: n + 1 + extra floats after Darknet's 16 bytes = n + extra after a 20-byte header
    path = write_weights(tmp_path / "bad.weights", random_floats(n + 1 + extra), major=0, minor=0)
    model = build_model("yolov3-tiny")
    before = state(model)
    with pytest.raises(ValueError, match=rf"holds {n + 1 + extra:,} float32 weights \({n + extra:,} if the header is "
                                         rf"the 20-byte five-int32 variant.*this model expects {n:,} for the full"):
        model.load_darknet_weights(path)
    after = state(model)
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_version_02_file_does_not_try_five_int32(cfg_convs, tmp_path):
    """From version 0.2 Darknet's header is already 20 bytes: one float too many is simply wrong."""
    n = darknet_float_count(cfg_convs["yolov3-tiny"])
    path = write_weights(tmp_path / "bad.weights", random_floats(n + 1))
    with pytest.raises(ValueError, match=rf"holds {n + 1:,} float32 weights, but") as err:
        build_model("yolov3-tiny").load_darknet_weights(path)
    assert "five-int32" not in str(err.value)


@pytest.mark.parametrize("minor", [0, 1, 2])
def test_standard_file_gives_no_warning(minor, cfg_convs, tmp_path):
    floats = random_floats(darknet_float_count(cfg_convs["yolov3-tiny"]))
    path = write_weights(tmp_path / "standard.weights", floats, minor=minor, seen=77)
    model = build_model("yolov3-tiny")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert model.load_darknet_weights(path) == "full model"
    assert not header_warnings(caught, path)
    assert model.darknet_header.seen == 77
    assert torch.equal(model.encoder.stage16[0].bn.bias, torch.from_numpy(floats[:16]))


SCRIPT = ROOT / "models" / "weights" / "download_darknet_weights.sh"
OFFICIAL_SIZES = {"yolov3.weights": 248007048, "yolov3-tiny.weights": 35434956, "darknet53.conv.74": 162482580}


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_download_script_checks_sizes(tmp_path, cfg_convs):
    # the sizes the script insists on are the ones the loader computes
    assert OFFICIAL_SIZES["yolov3.weights"] == 20 + 4 * darknet_float_count(cfg_convs["yolov3"])
    assert OFFICIAL_SIZES["yolov3-tiny.weights"] == 20 + 4 * darknet_float_count(cfg_convs["yolov3-tiny"])
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, size in OFFICIAL_SIZES.items():
        with open(mirror / name, "wb") as f:
            f.truncate(size)  # sparse: right size, no disk
    env = {**os.environ, "BASE_URL": f"file://{mirror}"}
    ok = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert {p.name: p.stat().st_size for p in (tmp_path / "out").iterdir()} == OFFICIAL_SIZES

    with open(mirror / "yolov3-tiny.weights", "r+b") as f:
        f.truncate(1000)
    bad = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out2")], env=env, capture_output=True, text=True)
    assert bad.returncode != 0
    assert "yolov3-tiny.weights is 1000 bytes, expected 35434956" in bad.stderr
    assert not (tmp_path / "out2" / "yolov3-tiny.weights").exists()
