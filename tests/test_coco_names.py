"""The one COCO class table against the categories of a real COCO 2017 annotation file."""
import json

from conftest import DATA

from datasets.coco_names import CATEGORY_ID_TO_CLASS, COCO_CATEGORY_IDS, COCO_NAMES


def test_table_matches_coco_annotation_categories():
    categories = json.loads((DATA / "coco_categories.json").read_text())["categories"]
    assert [(c["id"], c["name"]) for c in categories] == list(zip(COCO_CATEGORY_IDS, COCO_NAMES, strict=True))


def test_80_to_91_map_both_ways():
    assert len(COCO_NAMES) == 80 and len(set(COCO_CATEGORY_IDS)) == 80
    assert COCO_CATEGORY_IDS[0] == 1 and COCO_CATEGORY_IDS[79] == 90 and COCO_CATEGORY_IDS[11] == 13
    assert CATEGORY_ID_TO_CLASS[90] == 79 and CATEGORY_ID_TO_CLASS[13] == 11
    assert all(CATEGORY_ID_TO_CLASS[cat] == i for i, cat in enumerate(COCO_CATEGORY_IDS))
    assert 12 not in CATEGORY_ID_TO_CLASS  # one of COCO's 11 unused ids
