"""Convert YOLO txt labels or Pascal VOC xml annotations to one COCO instances JSON file.

    python -m tools.convert_labels yolo --images DIR --labels DIR --names names.txt --out instances.json
    python -m tools.convert_labels voc --images DIR --annotations DIR [--names names.txt] --out instances.json

Images are the files under --images (searched recursively) with an image suffix; each is paired with the label
file of the same relative path and stem (images/a/0001.jpg <-> labels/a/0001.txt or annotations/a/0001.xml).
VOC's <filename> and <folder> are not read. Images are numbered 1..N in sorted path order; file_name is the path
relative to --images. Categories are numbered 1..C in the names order.

The reading (YOLO and VOC conventions, EXIF sizes, clipping, counted drops, errors) is datasets/formats.py's,
the same that `data.root` uses for a data.yaml or VOC folder; this tool writes its COCO json where you say.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from datasets.labels import COUNT_MEANINGS, LabelError, read_names, voc_to_coco, write_json, yolo_to_coco

__all__ = ["LabelError", "main", "read_names", "voc_to_coco", "yolo_to_coco"]


def summary(counts: dict[str, int], out: Path) -> str:
    """The printed report: every count with its meaning."""
    lines = [f"wrote {out}"] + [f"  {counts[key]:>8}  {meaning}" for key, meaning in COUNT_MEANINGS.items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: a `yolo` or `voc` subcommand with its folders, names and output."""
    parser = argparse.ArgumentParser(prog="python -m tools.convert_labels", description=__doc__.split("\n")[0])
    formats = parser.add_subparsers(dest="format", required=True)
    yolo = formats.add_parser("yolo", help="YOLO txt labels: class cx cy w h, normalised")
    yolo.add_argument("--labels", type=Path, required=True, help="folder of .txt files, one per image")
    yolo.add_argument("--names", type=Path, required=True, help="class names, one per line (class 0 first)")
    voc = formats.add_parser("voc", help="Pascal VOC xml annotations")
    voc.add_argument("--annotations", type=Path, required=True, help="folder of .xml files, one per image")
    voc.add_argument("--names", type=Path, help="class names, one per line, in category order (default: sorted)")
    for sub in (yolo, voc):
        sub.add_argument("--images", type=Path, required=True, help="image folder; file_name is relative to it")
        sub.add_argument("--out", type=Path, required=True, help="COCO instances JSON to write")
        sub.add_argument("--skip-bad", action="store_true", help="count malformed lines and files instead of stopping")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, int]:
    """Convert as the command line says, write the JSON, print the summary and return the counts."""
    args = parse_args(argv)
    try:
        names = read_names(args.names) if args.names else None
        if args.format == "yolo":
            data, counts = yolo_to_coco(args.images, args.labels, names, args.skip_bad)
        else:
            data, counts = voc_to_coco(args.images, args.annotations, names, args.skip_bad)
    except LabelError as e:
        raise SystemExit(f"error: {e}") from e
    write_json(data, args.out)
    print(summary(counts, args.out))
    return counts


if __name__ == "__main__":
    main()
