"""Decoding one image file that may be hostile: the size is read from the header and checked before any pixel is
decoded, truncated JPEGs are refused, and every failure is a DatasetError naming the file and the problem."""
from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# Larger images are refused before decoding: a 420 KB PNG can declare 12000 x 12000 pixels and take 870 MB and 2.5 s
# to decode (measured with OpenCV 5.0), in every DataLoader worker that meets it. 2**27 is 11585 x 11585.
MAX_PIXELS = 2**27

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_START = b"\xff\xd8"
JPEG_END = b"\xff\xd9"
JPEG_SCAN = 0xDA  # start-of-scan marker: the compressed pixels follow until the end-of-image marker
JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length field (TEM, RST0-7)
JPEG_FRAME = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (SOF0-15): hold the image size


class DatasetError(ValueError):
    """An annotation file or image that cannot be used; the message names the file and the problem."""


def jpeg_structure(data: bytes) -> tuple[tuple[int, int] | None, bool]:
    """A JPEG's (width, height) from its frame header (None if not found), and whether it is complete: it holds
    its end-of-image marker after the first scan.

    OpenCV decodes a truncated JPEG without an error, filling the missing rows with grey. The walk skips the header
    segments by their lengths (so an EXIF thumbnail's own markers do not count); inside the compressed data 0xFF is
    always followed by 0x00 or a restart marker, so 0xFF 0xD9 there can only be the real end.
    """
    pos, size = len(JPEG_START), None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return size, True  # not a segment structure this walk understands: the decoder decides
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == JPEG_SCAN:
            return size, data.rfind(JPEG_END, pos) >= 0  # from the end: the marker is normally the last 2 bytes
        elif marker in JPEG_STANDALONE:
            pos += 2
        else:
            if marker in JPEG_FRAME and size is None and pos + 9 <= len(data):  # FF Cn, length, precision, Y, X
                size = int.from_bytes(data[pos + 7:pos + 9], "big"), int.from_bytes(data[pos + 5:pos + 7], "big")
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return size, False  # the file ends inside its header


def _pillow_size(data: bytes, path: Path) -> tuple[int, int] | None:
    """(width, height) from the header by Pillow, which reads no pixels; None when it cannot tell."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # decode_image applies MAX_PIXELS
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Image.DecompressionBombError as e:  # Pillow's own limit, 2 * 89.5 M pixels
        raise DatasetError(f"{path}: refused before decoding: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error):
        return None  # a format Pillow does not know, or a header it cannot parse: OpenCV decides


def header_size(data: bytes, path: Path) -> tuple[int, int] | None:
    """(width, height) that an image file's header declares, read without decoding any pixel (PNG and JPEG here,
    other formats by Pillow); None when no header could tell."""
    if data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data.startswith(JPEG_START):
        size, _ = jpeg_structure(data)
        if size is not None:
            return size
    return _pillow_size(data, path)


def decode_image(path: Path, width: int | float, height: int | float, context: str) -> np.ndarray:
    """Decode `path` to (height, width, 3) uint8 RGB, the size its annotation gives; `context` (which image of
    which annotation file) ends every error message.

    The EXIF orientation is applied only when the annotation gives the displayed (rotated) size. Errors: missing
    file (FileNotFoundError); unreadable, empty, too large, truncated, undecodable or of another size (DatasetError).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path} ({context})") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot be read: {e.strerror or e} ({context})") from e
    if not data:
        raise DatasetError(f"{path}: empty file (0 bytes) ({context})")
    expected = (int(height), int(width))
    size = header_size(data, path)
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        raise DatasetError(f"{path}: refused before decoding: its header declares {size[0]}x{size[1]} pixels, more "
                           f"than the {MAX_PIXELS:,} this loader accepts (datasets/images.py MAX_PIXELS) ({context})")
    if size is not None and size not in (expected[::-1], expected):
        raise DatasetError(f"{path}: its size {size[0]}x{size[1]} differs from the annotation's "
                           f"{expected[1]}x{expected[0]} ({context})")
    if data.startswith(JPEG_START) and not jpeg_structure(data)[1]:
        raise DatasetError(f"{path}: truncated JPEG: the data ends before the end-of-image marker ({context})")
    buffer = np.frombuffer(data, np.uint8)
    try:
        # IMREAD_COLOR_RGB gives 3 channels, 8 bits, RGB (no separate BGR->RGB pass) from greyscale, RGBA, CMYK
        # and 16-bit files alike.
        image = cv2.imdecode(buffer, cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
        if image is not None and image.shape[:2] != expected and image.shape[1::-1] == expected:
            image = cv2.imdecode(buffer, cv2.IMREAD_COLOR_RGB)  # annotated as displayed: apply EXIF orientation
    except cv2.error as e:  # OpenCV's own checks, e.g. its CV_IO_MAX_IMAGE_PIXELS for formats Pillow cannot read
        raise DatasetError(f"{path}: cannot be decoded as an image: {e.err} ({context})") from e
    if image is None:
        raise DatasetError(f"{path}: cannot be decoded as an image ({context})")
    if image.shape[:2] != expected:
        raise DatasetError(f"{path}: decoded size {image.shape[1]}x{image.shape[0]} differs from the annotation's "
                           f"{expected[1]}x{expected[0]} ({context})")
    return image
