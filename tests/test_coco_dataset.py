"""CocoDetection on real COCO files (tests/data/coco) and on small files written here with known content."""
import json

import cv2
import numpy as np
import pytest
import torch
from conftest import DATA, boxes_to_original
from PIL import Image

from datasets.coco import CocoDetection, DatasetError, collate
from datasets.transforms import Preprocess
from utils.boxes import box_cxcywh_to_xyxy

COCO = DATA / "coco"


def coco_split(split):
    return CocoDetection(COCO / "images" / f"{split}2017", COCO / "annotations" / f"instances_{split}2017.json",
                         Preprocess(), img_size=416)


def xyxy(targets):
    return box_cxcywh_to_xyxy(targets[:, 1:])


def test_real_coco_id_map_and_toothbrush():
    ds = coco_split("train")
    assert len(ds.class_names) == 80 and ds.category_ids[79] == 90 and ds.class_names[79] == "toothbrush"
    assert ds.category_to_class[90] == 79 and ds.category_to_class[13] == 11
    index = ds.ids.index(542145)  # the image with two toothbrushes
    _, targets, meta = ds[index]
    assert meta["image_id"] == 542145
    assert (targets[:, 0] == 79).sum() == 2


def test_real_coco_crowd_is_kept_as_an_ignore_region():
    ds = coco_split("train")
    assert ds.dropped == {} and ds.crowd_regions == 1  # kept, not dropped
    crowd_image = 204805  # 15 annotations, one of them iscrowd
    anns = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[crowd_image]))
    assert len(anns) == 15 and sum(a["iscrowd"] for a in anns) == 1
    _, targets, meta = ds[ds.ids.index(crowd_image)]
    assert len(targets) == 15 and (targets[:, 0] == -1).sum() == 1  # class -1: the crowd region
    crowd = next(a for a in anns if a["iscrowd"])
    x, y, w, h = crowd["bbox"]
    back = boxes_to_original(xyxy(targets[targets[:, 0] == -1]), meta)
    assert torch.allclose(back, torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32), atol=0.5)
    assert len(ds.object_boxes(crowd_image)) == 14


def test_real_coco_letterbox_maps_back_within_half_a_pixel():
    ds = coco_split("val")
    checked = 0
    for index, image_id in enumerate(ds.ids):
        image, targets, meta = ds[index]
        assert image.shape == (3, 416, 416) and image.dtype == torch.uint8
        h, w = meta["orig_size"]
        info = ds.coco.imgs[image_id]
        assert (w, h) == (info["width"], info["height"])
        anns = [a for a in ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[image_id])) if not a["iscrowd"]]
        expected = np.array([[x, y, min(x + bw, w), min(y + bh, h)] for x, y, bw, bh in (a["bbox"] for a in anns)])
        back = boxes_to_original(xyxy(targets), meta).numpy()
        assert back.shape == expected.reshape(-1, 4).shape
        if len(anns):
            assert np.abs(back - expected).max() < 0.5
            assert [int(c) for c in targets[:, 0]] == [ds.category_to_class[a["category_id"]] for a in anns]
        checked += len(anns)
    assert checked == 57  # every val annotation of the fixture


def test_images_without_annotations_are_negatives():
    ds = coco_split("val")
    _, targets, meta = ds[ds.ids.index(226111)]
    assert targets.shape == (0, 5)
    images, batch_targets, metas = collate([ds[ds.ids.index(226111)], ds[0]])
    assert images.shape == (2, 3, 416, 416) and [m["image_id"] for m in metas] == [226111, ds.ids[0]]
    assert (batch_targets[:, 0] == 1).all()  # all boxes belong to the second image


# -- small datasets written here --------------------------------------------------------------------------------

def write_coco(root, images, annotations, categories=None):
    """images: list of (file_name, width, height, writer) where writer(path) writes the file (or None)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (name, width, height, writer) in enumerate(images, start=1):
        if writer is not None:
            writer(root / "images" / name)
        entries.append({"id": i, "file_name": name, "width": width, "height": height})
    data = {"images": entries, "annotations": annotations,
            "categories": categories or [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}
    path = root / "ann.json"
    path.write_text(json.dumps(data))
    return path


def ann(i, image_id, bbox, category_id=3, **extra):
    return {"id": i, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


def cv2_writer(array, *params):
    return lambda path: cv2.imwrite(str(path), array, list(params))


def open_dataset(root, path, skip=False, size=64):
    return CocoDetection(root / "images", path, Preprocess(), img_size=size, skip_bad_images=skip)


def test_boxes_zero_size_outside_and_partly_outside(tmp_path):
    image = np.zeros((40, 60, 3), np.uint8)
    path = write_coco(tmp_path, [("a.png", 60, 40, cv2_writer(image))], [
        ann(1, 1, [10, 10, 20, 10]),           # kept as is
        ann(2, 1, [5, 5, 0, 10]),              # zero width
        ann(3, 1, [70, 5, 10, 10]),            # entirely right of the image
        ann(4, 1, [50, 30, 20, 20], 7),        # partly outside: clipped to [50, 30, 60, 40]
        ann(5, 1, [1, 2, 3, float("nan")]),    # non-finite
        ann(6, 1, [1, 1, 5, 5], iscrowd=1),    # crowd
    ])
    ds = open_dataset(tmp_path, path, size=64)
    assert ds.dropped == {"zero or negative size": 1, "outside the image": 1, "non-finite": 1}
    assert ds.crowd_regions == 1  # kept as an ignore region
    _, targets, meta = ds[0]
    # 60x40 -> scale 64/60, resized 64x43, padded top (64 - 43) // 2 = 10
    lb = meta["letterbox"]
    assert (lb.pad_left, lb.pad_top) == (0, 10) and lb.scale_x == pytest.approx(64 / 60)
    assert lb.scale_y == pytest.approx(43 / 40)
    expected = torch.tensor([[0, 20 * 64 / 60, 15 * 43 / 40 + 10, 20 * 64 / 60, 10 * 43 / 40],
                             [1, 55 * 64 / 60, 35 * 43 / 40 + 10, 10 * 64 / 60, 10 * 43 / 40],
                             [-1, 3.5 * 64 / 60, 3.5 * 43 / 40 + 10, 5 * 64 / 60, 5 * 43 / 40]])  # the crowd
    assert torch.allclose(targets, expected, atol=1e-4)


@pytest.mark.parametrize("kind", ["grey", "rgba", "16bit", "cmyk"])
def test_unusual_image_formats_decode_to_rgb(tmp_path, kind):
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :24] = (200, 30, 10)  # left half reddish in RGB
    writers = {
        "grey": ("g.png", cv2_writer(np.full((32, 48), 90, np.uint8))),
        "rgba": ("a.png", cv2_writer(np.dstack([rgb[..., ::-1], np.full((32, 48), 128, np.uint8)]))),
        "16bit": ("w.png", cv2_writer(rgb[..., ::-1].astype(np.uint16) * 257)),
        "cmyk": ("c.jpg", lambda p: Image.fromarray(rgb).convert("CMYK").save(p, quality=100)),
    }
    name, writer = writers[kind]
    path = write_coco(tmp_path, [(name, 48, 32, writer)], [])
    image = open_dataset(tmp_path, path).load_image(1)
    assert image.shape == (32, 48, 3) and image.dtype == np.uint8
    if kind == "grey":
        assert (image == 90).all()
    else:
        assert np.abs(image[16, 10].astype(int) - (200, 30, 10)).max() <= 8  # CMYK round trip is lossy
        assert np.abs(image[16, 40].astype(int)).max() <= 8


@pytest.mark.parametrize("annotated_as", ["stored", "displayed"])
def test_exif_rotated_jpeg_uses_the_annotated_frame(tmp_path, annotated_as):
    stored = np.zeros((30, 50, 3), np.uint8)
    stored[:, :10] = 255  # a white band on the stored image's left edge

    def writer(p):
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
        Image.fromarray(stored).save(p, exif=exif, quality=100)

    width, height = (50, 30) if annotated_as == "stored" else (30, 50)
    path = write_coco(tmp_path, [("r.jpg", width, height, writer)], [])
    image = open_dataset(tmp_path, path).load_image(1)
    assert image.shape[:2] == (height, width)
    if annotated_as == "stored":
        assert image[:, :10].min() > 200
    else:  # rotated clockwise for display: the left band becomes the top band
        assert image[:10, :].min() > 200 and image[20:, :].max() < 60


def test_bad_files_raise_naming_the_file(tmp_path):
    def corrupt(p):
        p.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)

    good = np.zeros((20, 20, 3), np.uint8)
    path = write_coco(tmp_path, [("bad.jpg", 20, 20, corrupt), ("missing.jpg", 20, 20, None),
                                 ("ok.png", 20, 20, cv2_writer(good)), ("size.png", 30, 20, cv2_writer(good))], [])
    ds = open_dataset(tmp_path, path)
    with pytest.raises(DatasetError, match=r"bad.jpg: truncated JPEG: .* \(image id 1 in .*ann.json\)"):
        ds[0]
    with pytest.raises(FileNotFoundError, match=r"image not found: .*missing.jpg"):
        ds[1]
    assert ds[2][0].shape == (3, 64, 64)
    with pytest.raises(DatasetError, match=r"size.png: its size 20x20 differs from the annotation's 30x20"):
        ds[3]


def test_skip_bad_images_warns_and_collate_drops(tmp_path):
    path = write_coco(tmp_path, [("missing.jpg", 20, 20, None),
                                 ("ok.png", 20, 20, cv2_writer(np.zeros((20, 20, 3), np.uint8)))], [])
    ds = open_dataset(tmp_path, path, skip=True)
    with pytest.warns(UserWarning, match=r"skipping an unreadable image \(1 so far in this process\): image not "
                      "found: .*missing.jpg"):
        sample = ds[0]
    assert sample is None and ds.skipped == 1
    images, targets, metas = collate([sample, ds[1]])
    assert images.shape == (1, 3, 64, 64) and [m["image_id"] for m in metas] == [2]
    assert collate([None])[0].shape == (0, 3, 0, 0)


def test_file_name_leaving_the_image_folder_is_refused(tmp_path):
    path = write_coco(tmp_path, [("../../etc/passwd", 20, 20, None)], [])
    with pytest.raises(DatasetError, match=r"file_name '../../etc/passwd' leads outside"):
        open_dataset(tmp_path, path)[0]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("annotations"), "missing or not a list: key 'annotations'"),
    (lambda d: d["images"][0].pop("width"), r"images\[0\] \(id 1\) lacks key 'width'"),
    (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\] \(id 1\) lacks key 'bbox'"),
    (lambda d: d["annotations"][0].update(category_id=5), "annotation id 1 has category_id 5, which is not in"),
    (lambda d: d["annotations"][0].update(image_id=9), "annotation id 1 refers to image_id 9"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"annotation id 1: bbox must be 4 numbers"),
    (lambda d: d["annotations"].append(dict(d["annotations"][0])), r"duplicate annotations id\(s\) \[1\]"),
])
def test_bad_annotation_files_name_the_key(tmp_path, mutate, message):
    path = write_coco(tmp_path, [("a.png", 20, 20, None)], [ann(1, 1, [1, 1, 5, 5])])
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=message) as info:
        open_dataset(tmp_path, path)
    assert "ann.json" in str(info.value)


def test_invalid_json_and_missing_annotation_file(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DatasetError, match="broken.json: not valid JSON"):
        open_dataset(tmp_path, tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="annotation file not found: .*nothere.json"):
        open_dataset(tmp_path, tmp_path / "nothere.json")


def test_min_box_size_holds_without_augmentation_for_training_only(tmp_path):
    # a 100x100 image letterboxed to 64: scale 0.64, so a 3 px wide box becomes 1.92 px (< data.min_box_size 2)
    # and a 4 px one 2.56 px; with every augmentation off nothing but the final filter can remove the first
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((100, 100, 3), np.uint8))
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100}],
        "annotations": [ann(1, 1, [10, 10, 3, 20]), ann(2, 1, [50, 50, 4, 20]), ann(3, 1, [0, 0, 50, 2], iscrowd=1)],
        "categories": [{"id": 3, "name": "a"}]}))
    from datasets.augmentations import AUGMENTATIONS
    from datasets.loader import build_dataset
    from utils.config_load import load_config

    overrides = [f"data.{split}_{kind}={tmp_path / name}" for split in ("train", "val")
                 for kind, name in (("images", ""), ("annotations", "ann.json"))]
    cfg = load_config(DATA.parent.parent / "args.yaml", [*overrides, "data.img_size=64", "data.min_box_size=2",
                                                         *(f"augment.{key}.p=0" for key in AUGMENTATIONS)])
    _, train, _ = build_dataset(cfg, "train")[0]
    assert torch.allclose(train, torch.tensor([[0, 52 * 0.64, 60 * 0.64, 4 * 0.64, 20 * 0.64]]))
    _, val, _ = build_dataset(cfg, "val")[0]  # validation keeps every box, the crowd (1.28 px high) too
    assert len(val) == 3 and val[:, 3:].min() == pytest.approx(2 * 0.64)
