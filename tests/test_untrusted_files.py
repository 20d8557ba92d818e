"""Files from strangers: a checkpoint that would run code when unpickled is refused wherever a checkpoint is read, a
Darknet file or checkpoint that does not fit stops with one line, and every tool writes only inside the output
folder it is given."""
import pickle
import re

import pytest
import torch
from conftest import DATA

import main as train_main
import validation
from datasets import shapes as shapes_tool
from models import build_model
from reliability.common import make_shapes, tiny_run_args
from tools import anchors, lr_scheduler_creator, visualize_batch
from utils.checkpoint import CheckpointError, load_checkpoint

ROOT = DATA.parent.parent


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"))


class Exploit:
    """Unpickling this object creates the file `marker`: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def evil_files(tmp_path):
    """A torch checkpoint and a plain pickle that would each create tmp_path/pwned when loaded."""
    marker = tmp_path / "pwned"
    torch_file, pickle_file = tmp_path / "evil.pt", tmp_path / "plain.pt"
    torch.save({"model": {}, "config": {}, "payload": Exploit(marker)}, torch_file)
    pickle_file.write_bytes(pickle.dumps({"model": Exploit(marker), "config": {}}))
    return marker, [torch_file, pickle_file]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_checkpoint_that_would_run_code_is_refused_everywhere(tmp_path, shapes):
    marker, files = evil_files(tmp_path)
    for path in files:
        with pytest.raises(CheckpointError, match=rf"{path.name}: refused to load: it holds objects other than "
                           r"tensors and plain containers \(weights_only=True\)|not a readable PyTorch checkpoint"):
            load_checkpoint(path)
        with pytest.raises(SystemExit, match=rf"^error: {path}: (refused to load|not a readable)"):
            train_main.main(["--resume", str(path), "--device", "cpu"])
        with pytest.raises(SystemExit, match=rf"^error: --weights: {path}: (refused to load|not a readable)"):
            train_main.main([*tiny_run_args(shapes, tmp_path / "logs"), "--weights", str(path)])
        with pytest.raises(SystemExit, match=rf"^error: {path}: (refused to load|not a readable)"):
            validation.main(["--weights", str(path), "--set", f"data.root={shapes}"])
    assert not marker.exists()  # no code ran
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


def test_weights_that_do_not_fit_stop_training_with_one_line(tmp_path, shapes):
    darknet = tmp_path / "short.weights"
    torch.manual_seed(0)
    build_model("yolov3-tiny", num_classes=6).save_darknet_weights(darknet)
    darknet.write_bytes(darknet.read_bytes()[:-400])  # 100 floats short
    with pytest.raises(SystemExit, match=r"^error: --weights: .*short.weights: its 8,687,694 float32 weights fit no "
                       r"Darknet file this config can start from\. Tried, .* with this config's 6 classes 8,687,794"):
        train_main.main([*tiny_run_args(shapes, tmp_path / "logs"), "--weights", str(darknet)])
    other = tmp_path / "other.pt"
    torch.save({"model": build_model("yolov3-tiny", num_classes=3).state_dict(), "config": {}}, other)
    with pytest.raises(SystemExit, match=r"^error: --weights: .*other.pt: weights do not fit the yolov3/darknet53 "
                       "model its config describes: Error"):
        train_main.main([*tiny_run_args(shapes, tmp_path / "logs2"), "--weights", str(other)])


SKIP = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", ".venv"}


def snapshot(*roots):
    """path -> (size, mtime) of every file under the roots."""
    files = {}
    for root in roots:
        for path in root.rglob("*"):
            if not SKIP & set(path.relative_to(root).parts) and path.is_file():
                files[path] = (path.stat().st_size, path.stat().st_mtime_ns)
    return files


def written_outside(out, before, after):
    return sorted(str(p) for p in set(after) | set(before) if after.get(p) != before.get(p)
                  and not p.is_relative_to(out))


@pytest.mark.slow
def test_tools_write_only_inside_the_output_folder_they_are_given(tmp_path, shapes, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative default would land here, and be caught
    data_args = ["--config", str(ROOT / "args.yaml"), "--set", f"data.root={shapes}", "model.num_classes=6",
                 "model.arch=yolov3-tiny", "data.img_size=64", "data.workers=0", "eval.batch_size=4"]
    trained = train_main.main(tiny_run_args(shapes, tmp_path / "first", "train.steps=1"))["run_dir"] / "last.pt"
    runs = {
        "main.py": lambda out: train_main.main(tiny_run_args(shapes, out, "train.steps=2", "eval.every=2")),
        "validation.py": lambda out: validation.main(["--weights", str(trained), *data_args, "--out", str(out),
                                                      "--save-json"]),
        "datasets.shapes": lambda out: shapes_tool.main(["--out", str(out), "--train", "2", "--val", "1",
                                                         "--size", "64"]),
        "tools.visualize_batch": lambda out: visualize_batch.main([*data_args, "--out", str(out / "batch.png")]),
        "tools.lr_scheduler_creator": lambda out: lr_scheduler_creator.main([*data_args, "--out",
                                                                             str(out / "lr.png"), "--steps", "100"]),
        "tools.anchors": lambda out: anchors.main(data_args),
    }
    for name, run in runs.items():
        out = tmp_path / f"out_{name}"
        before = snapshot(tmp_path, ROOT)
        run(out)
        after = snapshot(tmp_path, ROOT)
        assert written_outside(out, before, after) == [], name
        assert name == "tools.anchors" or any(p.is_relative_to(out) for p in after), name  # it did write


def test_a_run_name_cannot_leave_the_logs_folder(tmp_path, shapes):
    for name in ("../escape", "/tmp/escape", "a\\b"):
        with pytest.raises(SystemExit, match=re.escape(f"logging.name={name!r}: must be non-empty without '/', "
                                                       "'\\' or ':'")):
            train_main.main([*tiny_run_args(shapes, tmp_path), "--name", name])
    assert not any(tmp_path.iterdir()) and not (tmp_path.parent / "escape").exists()
