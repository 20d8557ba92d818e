"""Cut a backbone prefix from a full Darknet .weights file, as Darknet's `partial` command does.

    python -m tools.darknet_prefix yolov3-tiny.weights yolov3-tiny.conv.15 --arch yolov3-tiny
    python -m tools.darknet_prefix yolov3.weights darknet53.conv.74 --arch yolov3

The prefix is the file's header and its first conv layers (the model's named prefix: yolov3-tiny.conv.15 is 9
convs, layers 0-14; darknet53.conv.74 is 52), written bit for bit; --weights or model.pretrained_path start a
model of any class count from it (its heads start fresh). The full file is read as COCO's 80 classes unless
--classes says otherwise.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from models.tables import ENCODERS
from models.transfer import cut_prefix


def main(argv: list[str] | None = None) -> str:
    """Parse, cut, say what was written."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("full", type=Path, help="a full Darknet .weights file")
    parser.add_argument("out", type=Path, help="the prefix file to write")
    parser.add_argument("--arch", choices=tuple(ENCODERS), default="yolov3", help="the full file's architecture")
    parser.add_argument("--classes", type=int, default=80, help="the full file's number of classes (default 80)")
    args = parser.parse_args(argv)
    try:
        name = cut_prefix(args.full, args.out, args.arch, args.classes)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e
    print(f"wrote {args.out}: the {name} prefix of {args.full}")
    return name


if __name__ == "__main__":
    main()
