"""Inputs of the inference tools: image files, folders (recursive, by extension), glob patterns and videos.

Each input gets an output name relative to the folder or glob root it was found under, so that the tools write
a/1.jpg and b/1.jpg of one folder to different files, and never outside their output folder.
"""
from __future__ import annotations

import glob
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")  # what OpenCV decodes
VIDEO_EXTENSIONS = (".avi", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".webm", ".wmv")


class UnreadableError(OSError):
    """An input file that cannot be decoded; the message names the file."""


@dataclass(frozen=True)
class Source:
    """One input file and its output name (relative path, no '..')."""

    path: Path
    name: Path

    @property
    def is_video(self) -> bool:
        """Videos are recognised by their extension; everything else is read as an image."""
        return self.path.suffix.lower() in VIDEO_EXTENSIONS


def glob_root(pattern: str) -> Path:
    """The leading folders of a glob pattern before its first wildcard: 'data/*/x*.jpg' -> 'data'."""
    parts = Path(pattern).parts
    fixed = parts[:next(i for i, p in enumerate(parts) if glob.has_magic(p))]
    return Path(*fixed) if fixed else Path(".")


def find_sources(specs: Sequence[str]) -> tuple[list[Source], list[Path]]:
    """Files, folders or glob patterns -> the inputs in order, and the files of folders left out for their extension.

    A folder is searched recursively for IMAGE_EXTENSIONS and VIDEO_EXTENSIONS (any case). A file named directly
    or matched by a glob is always an input, whatever its extension (an unreadable one is skipped when read).
    """
    sources, ignored = [], []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file())
            wanted = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
            ignored += [f for f in files if f.suffix.lower() not in wanted]
            found = [Source(f, f.relative_to(path)) for f in files if f.suffix.lower() in wanted]
            problem = f"holds no file with an image or video extension ({', '.join(wanted)})"
        elif path.is_file():
            found, problem = [Source(path, Path(path.name))], ""
        elif glob.has_magic(spec):
            root = glob_root(spec)
            found = [Source(Path(f), Path(f).relative_to(root)) for f in sorted(glob.glob(spec, recursive=True))
                     if Path(f).is_file()]
            problem = "matches no file"
        else:
            raise FileNotFoundError(f"--source {spec!r}: no such file or folder (nor a glob pattern)")
        if not found:
            raise FileNotFoundError(f"--source {spec!r}: {problem}")
        sources += found
    names: dict[Path, Path] = {}
    for s in sources:
        if ".." in s.name.parts:  # a pattern such as '*/../../x.jpg': its name would lead out of the output folder
            raise ValueError(f"--source: {s.path} lies outside the folder its glob pattern starts from; give a "
                             "pattern without '..' after a wildcard")
        if names.setdefault(s.name, s.path) != s.path:
            raise ValueError(f"--source: {names[s.name]} and {s.path} would both be written as {s.name}; give them "
                             "as one folder or glob pattern, or in separate runs")
    return sources, ignored


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB, EXIF orientation applied (as viewers show it)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR_RGB)
    if image is None:
        raise UnreadableError(f"{path}: cannot be decoded as an image (corrupt, or not an image file)")
    return image


@dataclass
class VideoInfo:
    """What a video writer needs to reproduce a video: frames per second and frame size."""

    fps: float
    width: int
    height: int
    frames: int  # the container's frame count (an estimate for some formats)


def open_video(path: Path) -> tuple[VideoInfo, Iterator[np.ndarray]]:
    """A video's info and its frames as (H, W, 3) uint8 RGB; a file without a readable first frame is an error."""
    capture = cv2.VideoCapture(str(path))
    ok, first = capture.read() if capture.isOpened() else (False, None)
    if not ok:
        capture.release()
        raise UnreadableError(f"{path}: cannot be decoded as a video (corrupt, or a format this OpenCV lacks)")
    info = VideoInfo(capture.get(cv2.CAP_PROP_FPS) or 25.0, first.shape[1], first.shape[0],
                     int(capture.get(cv2.CAP_PROP_FRAME_COUNT)))

    def frames() -> Iterator[np.ndarray]:
        frame = first
        try:
            while frame is not None:
                yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                ok, frame = capture.read()
                frame = frame if ok else None
        finally:
            capture.release()

    return info, frames()


@dataclass
class Frame:
    """One image to detect on: a file, or a frame of a video file (with the video's info)."""

    source: Source
    index: int | None  # frame number in a video; None for an image file
    image: np.ndarray  # (H, W, 3) uint8 RGB
    video: VideoInfo | None = None


def read_frames(sources: Sequence[Source], skipped: list[str], bar: tqdm) -> Iterator[Frame]:
    """Every image and video frame of the sources; an unreadable file is warned about, added to `skipped`, passed."""
    for source in sources:
        try:
            if not source.is_video:
                yield Frame(source, None, read_image(source.path))
                continue
            info, frames = open_video(source.path)
        except UnreadableError as e:
            skipped.append(str(source.path))
            warnings.warn(f"skipped ({len(skipped)} so far): {e}", stacklevel=1)
            bar.update()
            continue
        bar.total += max(info.frames, 1) - 1  # the bar counted the video as one item
        yield from (Frame(source, k, frame, info) for k, frame in enumerate(frames))
