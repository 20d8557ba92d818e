"""tools.convert_labels (datasets/formats.py): YOLO txt and VOC xml -> COCO, boxes by hand, round trips, counted
drops, errors, the CLI."""
import json

import pytest
from PIL import Image
from pycocotools.coco import COCO

from datasets.coco import read_coco_json
from tools.convert_labels import LabelError, main, read_names, voc_to_coco, yolo_to_coco

W, H = 64, 48  # every test image, in pixels


def write_image(path, size=(W, H), exif_orientation=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    Image.new("RGB", size, (90, 120, 150)).save(path, exif=exif)


def yolo_dataset(root, lines_a):
    """images/a.jpg with `lines_a`, images/b.png without labels, images/sub/c.jpg, and a label without an image."""
    images, labels = root / "images", root / "labels"
    for name in ("a.jpg", "b.png", "sub/c.jpg"):
        write_image(images / name)
    (labels / "sub").mkdir(parents=True)
    (labels / "a.txt").write_text("\n".join(lines_a) + "\n")
    (labels / "sub" / "c.txt").write_text("1 0.5 0.5 1 1\n")
    (labels / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (root / "names.txt").write_text("cat\ntraffic light\n\n")  # a trailing blank line, as editors leave
    return images, labels


YOLO_LINES = [
    "0 0.5 0.5 0.25 0.5",  # cx 32, cy 24, w 16, h 24 -> [24, 12, 16, 24]
    "1 0.25 0.75 0.125 0.25",  # cx 16, cy 36, w 8, h 12 -> [12, 30, 8, 12]
    "0 0.5 0.5 0 0.5",  # zero width: dropped
    "",  # blank lines are not boxes
    "1 0.0 0.5 0.25 0.5",  # x -8..8 -> clipped to [0, 12, 8, 24]
]


def boxes_by_file(data):
    names = {image["id"]: image["file_name"] for image in data["images"]}
    result = {}
    for a in data["annotations"]:
        result.setdefault(names[a["image_id"]], []).append((a["category_id"], a["bbox"]))
    return result


def test_yolo_boxes_by_hand_and_round_trip(tmp_path):
    images, labels = yolo_dataset(tmp_path, YOLO_LINES)
    data, counts = yolo_to_coco(images, labels, read_names(tmp_path / "names.txt"))
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in data["images"]] == [
        (1, "a.jpg", W, H), (2, "b.png", W, H), (3, "sub/c.jpg", W, H)]
    assert data["categories"] == [{"id": 1, "name": "cat", "supercategory": "none"},
                                  {"id": 2, "name": "traffic light", "supercategory": "none"}]
    boxes = boxes_by_file(data)
    assert boxes == {"a.jpg": [(1, [24.0, 12.0, 16.0, 24.0]), (2, [12.0, 30.0, 8.0, 12.0]),
                               (2, [0.0, 12.0, 8.0, 24.0])],
                     "sub/c.jpg": [(2, [0.0, 0.0, 64.0, 48.0])]}
    assert all(type(v) is float for a in data["annotations"] for v in a["bbox"])
    assert [a["area"] for a in data["annotations"]] == [384.0, 96.0, 192.0, 3072.0]
    assert [a["id"] for a in data["annotations"]] == [1, 2, 3, 4] and {a["iscrowd"] for a in data["annotations"]} == {0}
    # COCO bbox back to YOLO's normalised cx cy w h: the input lines that were not clipped
    for (category, (x, y, w, h)), line in zip(boxes["a.jpg"][:2], YOLO_LINES[:2], strict=True):
        expected = [float(v) for v in line.split()]
        assert category - 1 == expected[0]
        assert [(x + w / 2) / W, (y + h / 2) / H, w / W, h / H] == pytest.approx(expected[1:], abs=1e-6)
    assert counts == {"images": 3, "annotations": 4, "clipped": 1, "difficult": 0, "zero_size": 1, "outside_image": 0,
                      "unknown_class": 0, "bad_lines": 0, "bad_files": 0, "images_without_labels": 1,
                      "labels_without_images": 1}


def test_yolo_malformed_line_names_file_and_line(tmp_path):
    images, labels = yolo_dataset(tmp_path, ["0 0.5 0.5 0.2 0.2", "", "0 0.5 0.5 0.2"])
    with pytest.raises(LabelError, match=r"a\.txt: line 3: 4 values '0 0\.5 0\.5 0\.2'; expected 5: class cx cy w h"):
        yolo_to_coco(images, labels, ["cat", "dog"])
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n1.5 0.5 0.5 0.2 0.2\n")
    with pytest.raises(LabelError, match=r"a\.txt: line 2: .*integer class"):
        yolo_to_coco(images, labels, ["cat", "dog"])
    data, counts = yolo_to_coco(images, labels, ["cat", "dog"], skip_bad=True)
    assert counts["bad_lines"] == 1 and len(boxes_by_file(data)["a.jpg"]) == 1
    # a class out of range and pixel coordinates are errors too (counted skips with skip_bad)
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n2 0.5 0.5 0.1 0.1\n")
    with pytest.raises(LabelError, match=r"a\.txt: line 2: class 2 is out of range; .* expected 0\.\.1"):
        yolo_to_coco(images, labels, ["cat", "dog"])
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n0 32 24 16 16\n")
    with pytest.raises(LabelError, match=r"a\.txt: line 3: '0 32 24 16 16' has a coordinate outside 0\.\.1"):
        yolo_to_coco(images, labels, ["cat", "dog"])
    data, counts = yolo_to_coco(images, labels, ["cat", "dog"], skip_bad=True)
    assert counts["bad_lines"] == 1 and len(boxes_by_file(data)["a.jpg"]) == 2


def test_yolo_size_from_exif_orientation(tmp_path):
    # stored 64x48, EXIF 6 (rotate 90): YOLO tools label the displayed 48x64 image
    images, labels = tmp_path / "images", tmp_path / "labels"
    write_image(images / "r.jpg", exif_orientation=6)
    labels.mkdir()
    (labels / "r.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    data, _ = yolo_to_coco(images, labels, ["cat"])
    assert (data["images"][0]["width"], data["images"][0]["height"]) == (H, W)
    assert data["annotations"][0]["bbox"] == [12.0, 16.0, 24.0, 32.0]


def voc_xml(size, objects):
    parts = [f"<annotation><filename>ignored.jpg</filename><size><width>{size[0]}</width>"
             f"<height>{size[1]}</height><depth>3</depth></size>"]
    for name, box, difficult in objects:
        coords = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True))
        parts.append(f"<object>\n  <name> {name}\n  </name><difficult>{difficult}</difficult>"
                     f"<bndbox>{coords}</bndbox></object>")
    return "\n".join(parts) + "\n</annotation>\n"


VOC_OBJECTS = [
    ("dog", (1, 1, 64, 48), 0),  # 1-based inclusive, the whole image -> [0, 0, 64, 48]
    ("cat", (11, 21, 30, 40), 1),  # -> [10, 20, 20, 20], difficult
    ("cat", (60, 10, 70, 20), 0),  # x 59..70 -> clipped to [59, 9, 5, 11]
    ("bird", (30, 10, 20, 20), 0),  # xmax < xmin: dropped
]


def voc_dataset(root, objects=VOC_OBJECTS, size=(W, H)):
    images, annotations = root / "images", root / "annotations"
    write_image(images / "v1.jpg")
    write_image(images / "v2.jpg")
    annotations.mkdir()
    (annotations / "v1.xml").write_text(voc_xml(size, objects))
    (annotations / "v3.xml").write_text(voc_xml(size, []))
    return images, annotations


def test_voc_boxes_by_hand_and_round_trip(tmp_path):
    images, annotations = voc_dataset(tmp_path)
    data, counts = voc_to_coco(images, annotations)
    assert [c["name"] for c in data["categories"]] == ["bird", "cat", "dog"]  # sorted without --names
    boxes = boxes_by_file(data)["v1.jpg"]
    assert boxes == [(3, [0.0, 0.0, 64.0, 48.0]), (2, [10.0, 20.0, 20.0, 20.0]), (2, [59.0, 9.0, 5.0, 11.0])]
    for (_, (x, y, w, h)), (_, box, _) in zip(boxes[:2], VOC_OBJECTS[:2], strict=True):
        assert (x + 1, y + 1, x + w, y + h) == box  # back to VOC's xmin ymin xmax ymax
    assert counts == {"images": 2, "annotations": 3, "clipped": 1, "difficult": 1, "zero_size": 1, "outside_image": 0,
                      "unknown_class": 0, "bad_lines": 0, "bad_files": 0, "images_without_labels": 1,
                      "labels_without_images": 1}
    data, _ = voc_to_coco(images, annotations, ["dog", "cat", "bird"])
    assert [c["name"] for c in data["categories"]] == ["dog", "cat", "bird"]
    assert [b[0] for b in boxes_by_file(data)["v1.jpg"]] == [1, 2, 2]


def test_voc_errors(tmp_path):
    images, annotations = voc_dataset(tmp_path)
    with pytest.raises(LabelError, match=r"v1\.xml: class name 'cat' is not in the names file"):
        voc_to_coco(images, annotations, ["dog", "bird"])
    _, counts = voc_to_coco(images, annotations, ["dog", "bird"], skip_bad=True)
    assert counts["unknown_class"] == 2
    (annotations / "v1.xml").write_text(voc_xml((100, 100), VOC_OBJECTS))
    with pytest.raises(LabelError, match=r"v1\.xml: <size> 100 x 100 but .*v1\.jpg is 64 x 48"):
        voc_to_coco(images, annotations)
    (annotations / "v1.xml").write_text(voc_xml((W, H), [("dog", (1, 1, "x", 9), 0)]))
    with pytest.raises(LabelError, match=r"v1\.xml: object 1 \(dog\): <xmax> is 'x'; expected a number"):
        voc_to_coco(images, annotations)
    (annotations / "v1.xml").write_text("<annotation>\n<object>\n</annotation>\n")
    with pytest.raises(LabelError, match=r"v1\.xml: line 3: not valid XML"):
        voc_to_coco(images, annotations)
    data, counts = voc_to_coco(images, annotations, skip_bad=True)
    assert counts["bad_files"] == 1 and [i["file_name"] for i in data["images"]] == ["v2.jpg"]


def test_names_file_errors(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("cat\n\ndog\n")
    with pytest.raises(LabelError, match=r"names\.txt: line 2: empty class name"):
        read_names(path)
    path.write_text("cat\ndog\ncat\n")
    with pytest.raises(LabelError, match=r"names\.txt: line 3: 'cat' repeats line 1"):
        read_names(path)


def test_cli_end_to_end_loads_in_pycocotools(tmp_path, capsys):
    images, labels = yolo_dataset(tmp_path / "yolo", YOLO_LINES)
    out = tmp_path / "out" / "yolo.json"
    counts = main(["yolo", "--images", str(images), "--labels", str(labels), "--names",
                   str(tmp_path / "yolo" / "names.txt"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "1  boxes partly outside the image, clipped to it (kept)" in printed
    coco = COCO(str(out))
    assert len(coco.getImgIds()) == 3 and len(coco.getAnnIds()) == counts["annotations"] == 4
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["cat", "traffic light"]
    read_coco_json(out)  # the project's own loader accepts it

    voc_images, annotations = voc_dataset(tmp_path / "voc")
    (tmp_path / "voc" / "names.txt").write_text("dog\ncat\nbird\n")
    out = tmp_path / "voc.json"
    main(["voc", "--images", str(voc_images), "--annotations", str(annotations), "--names",
          str(tmp_path / "voc" / "names.txt"), "--out", str(out)])
    assert [c["name"] for c in COCO(str(out)).dataset["categories"]] == ["dog", "cat", "bird"]
    assert json.loads(out.read_text())["annotations"][1]["bbox"] == [10.0, 20.0, 20.0, 20.0]

    (labels / "a.txt").write_text("0 0.5 zero 0.2 0.2\n")
    with pytest.raises(SystemExit, match=r"^error: .*a\.txt: line 1: .*not 5 numbers"):
        main(["yolo", "--images", str(images), "--labels", str(labels), "--names",
              str(tmp_path / "yolo" / "names.txt"), "--out", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()
