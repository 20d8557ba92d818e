"""visualization.py draws the predicted boxes where the model put them (through the letterbox and back), in the class
colour, from a checkpoint or a Darknet file; --gt adds the true boxes in white."""
import cv2
import numpy as np
import pytest
from conftest import DATA, grid_model

import visualization
from utils.checkpoint import save_checkpoint
from utils.config_load import config_to_dict, load_config
from utils.plots import TRUE_BOX_COLOR, class_color

ROOT = DATA.parent.parent
CLS = 2  # COCO's "car"
ARGS = ["--config", str(ROOT / "args.yaml"), "--set", f"data.root={DATA / 'coco'}", "model.arch=yolov3-tiny",
        "--img-size", "128", "--device", "cpu", "--no-amp"]  # fp32: the forms are compared in tests/test_forms.py


def write_weights(path):
    model = grid_model(cls=CLS)
    if path.suffix == ".pt":
        cfg = load_config(ROOT / "args.yaml", ["model.arch=yolov3-tiny"])
        save_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg)}, path)
    else:
        model.save_darknet_weights(path)
    return path


def read_rgb(path):
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize("weights_name", ["grid.pt", "grid.weights"])
def test_boxes_are_drawn_where_the_model_puts_them(tmp_path, capsys, weights_name):
    weights = write_weights(tmp_path / weights_name)
    image = tmp_path / "wide.png"  # 256 x 128: letterboxed to 128 at scale 0.5 with 32 px of grey above and below
    cv2.imwrite(str(image), np.zeros((128, 256, 3), np.uint8))
    result = visualization.main(["--weights", str(weights), "--source", str(image), *ARGS, "--out",
                                 str(tmp_path / "out")])
    assert result["files"] == [tmp_path / "out" / "wide.png"]
    assert f"wrote {tmp_path / 'out'}: 1 images, 16 predictions" in capsys.readouterr().out
    drawn = read_rgb(tmp_path / "out" / "wide.png")
    assert drawn.shape == (128, 256, 3)
    # input cell (row r, col c) holds the box x 8+32c..24+32c, y 8+32r..24+32r; in the original image
    # x = input x / 0.5 and y = (input y - 32) / 0.5: rows 1 and 2 are the boxes y 16..48 and 80..112, x 16+64c..48+64c
    colour = class_color(CLS)
    for top, bottom in ((16, 48), (80, 112)):
        middle = (top + bottom) // 2
        for c in range(4):
            left, right = 16 + 64 * c, 48 + 64 * c
            assert tuple(drawn[middle, left]) == colour and tuple(drawn[middle, right]) == colour
            assert tuple(drawn[top, left + 16]) == colour and tuple(drawn[bottom, left + 16]) == colour
            assert tuple(drawn[middle, left + 16]) == (0, 0, 0)  # inside: the image
            assert tuple(drawn[middle, left - 4]) == (0, 0, 0)  # outside: the image


def test_ground_truth_in_white_on_dataset_images(tmp_path, capsys):
    weights = write_weights(tmp_path / "grid.pt")
    visualization.main(["--weights", str(weights), *ARGS, "--images", "1", "--gt", "--out", str(tmp_path / "gt")])
    visualization.main(["--weights", str(weights), *ARGS, "--images", "1", "--out", str(tmp_path / "plain")])
    from datasets.loader import build_dataset  # the first validation image and its first true box
    dataset = build_dataset(load_config(ROOT / "args.yaml", [f"data.root={DATA / 'coco'}"]), "val")
    image_id = dataset.ids[0]
    name = dataset.coco.imgs[image_id]["file_name"].replace(".jpg", ".png")
    x1, y1, x2, y2 = dataset.targets[image_id][0][0].round().astype(int)
    with_gt, without = read_rgb(tmp_path / "gt" / name), read_rgb(tmp_path / "plain" / name)
    middle = (y1 + y2) // 2
    for y, x in ((middle, x1), (middle, x2), (y1, (x1 + x2) // 2), (y2, (x1 + x2) // 2)):
        assert tuple(with_gt[y, x]) == TRUE_BOX_COLOR and tuple(without[y, x]) != TRUE_BOX_COLOR
    assert "and their true boxes" in capsys.readouterr().out


def test_grid_and_jpeg(tmp_path):
    weights = write_weights(tmp_path / "grid.pt")
    result = visualization.main(["--weights", str(weights), *ARGS, "--images", "3", "--grid", "--ext", "jpg",
                                 "--out", str(tmp_path / "g")])
    assert result["files"] == [tmp_path / "g" / "grid.jpg"]
    grid = cv2.imread(str(tmp_path / "g" / "grid.jpg"))
    assert grid.shape[1] > 2 * 400  # two 640 px wide validation images side by side (2 columns for 3 images)


def test_bad_options_are_one_line_errors(tmp_path):
    weights = write_weights(tmp_path / "grid.pt")
    with pytest.raises(SystemExit):
        visualization.main(["--weights", str(weights), *ARGS, "--gt", "--source", str(tmp_path)])
    with pytest.raises(SystemExit, match="--half runs fp16 on CUDA only"):
        visualization.main(["--weights", str(weights), *ARGS, "--half"])
    with pytest.raises(SystemExit, match=r"--device 'gpu0': expected cpu, cuda, cuda:N or N"):
        visualization.main(["--weights", str(weights), *ARGS, "--device", "gpu0"])


def test_crowd_regions_are_drawn_grey_not_as_the_last_class():
    # class -1 must not index the names from the end (it would be labelled and coloured as the last class)
    from utils.boxes import CROWD_CLASS
    from utils.plots import draw_boxes

    image = np.zeros((40, 60, 3), np.uint8)
    draw_boxes(image, np.array([[5.0, 20.0, 55.0, 35.0]]), np.array([CROWD_CLASS]), ["a", "b"], thickness=1)
    assert tuple(image[35, 30]) == tuple(image[25, 5]) == (128, 128, 128)  # bottom and left edges: grey
    assert (image[:, :, 0] == image[:, :, 1]).all() and (image[:, :, 1] == image[:, :, 2]).all()  # no class colour
