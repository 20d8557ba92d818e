"""Darknet-53 (yolov3.cfg layers 0-74), YOLOv3-tiny's backbone, and Darknet's binary .weights format."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.common import ConvBNLeaky


class Residual(nn.Module):
    """Darknet-53's residual unit: 1x1 conv halving channels, 3x3 conv restoring them, `[shortcut] from=-3`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = ConvBNLeaky(channels, channels // 2, 1)
        self.expand = ConvBNLeaky(channels // 2, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return x + self.expand(self.reduce(x))


def _stage(in_channels: int, out_channels: int, num_residuals: int) -> nn.Sequential:
    """A stride-2 3x3 conv then `num_residuals` residual units (one row of Table 1 in the YOLOv3 paper)."""
    return nn.Sequential(ConvBNLeaky(in_channels, out_channels, 3, stride=2),
                         *[Residual(out_channels) for _ in range(num_residuals)])


class Darknet53(nn.Module):
    """Darknet-53 without its classifier; returns the stride 8, 16, 32 maps (cfg layers 36, 61, 74)."""

    out_channels = (256, 512, 1024)
    normalization = None  # Darknet weights expect RGB in [0, 1]

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNLeaky(3, 32, 3)
        self.stage1 = _stage(32, 64, 1)
        self.stage2 = _stage(64, 128, 2)
        self.stage3 = _stage(128, 256, 8)
        self.stage4 = _stage(256, 512, 8)
        self.stage5 = _stage(512, 1024, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (B, 256, H/8, W/8), (B, 512, H/16, W/16), (B, 1024, H/32, W/32)."""
        c3 = self.stage3(self.stage2(self.stage1(self.stem(x))))
        c4 = self.stage4(c3)
        return c3, c4, self.stage5(c4)


class MaxPool2x2(nn.MaxPool2d):
    """Darknet's `[maxpool] size=2 stride=2`. Without autograd (inference, evaluation), on a channels_last map with
    even sides, as two elementwise maxima over the NHWC memory viewed in row and column pairs: max_pool2d's values,
    faster (yolov3-tiny's five pools in bf16 at 416, batch 8, 2-core AMX Xeon: 9.9 ms -> 5.1 ms, of a ~40 ms
    forward; max_pool2d vectorises over 16-32 channels poorly). Training, tracing and export keep max_pool2d: its
    gradient goes to one element of a tie (torch.maximum's is split), and an exported graph keeps one MaxPool op."""

    def __init__(self) -> None:
        super().__init__(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2), memory format kept."""
        b, c, h, w = x.shape
        if (torch.is_grad_enabled() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or h % 2 or w % 2
                or not x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x)
        pairs = x.permute(0, 2, 3, 1).view(b, h // 2, 2, w // 2, 2, c)  # (B, H/2, 2, W/2, 2, C), no copy
        rows = torch.maximum(pairs[:, :, 0], pairs[:, :, 1])  # (B, H/2, W/2, 2, C)
        return torch.maximum(rows[:, :, :, 0], rows[:, :, :, 1]).permute(0, 3, 1, 2)


class MaxPoolSame(nn.Module):
    """Darknet's `[maxpool] size=2 stride=1`: output keeps H x W; the window hangs over the right/bottom edge,
    where Darknet ignores the missing pixels (replicate padding computes the same max)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return nn.functional.max_pool2d(nn.functional.pad(x, (0, 1, 0, 1), mode="replicate"), 2, 1)


class TinyBackbone(nn.Module):
    """yolov3-tiny.cfg layers 0-12; returns layer 8 (stride 16, 256 ch) and layer 12 (stride 32, 1024 ch)."""

    out_channels = (256, 1024)

    def __init__(self) -> None:
        super().__init__()
        pool = MaxPool2x2()
        self.stage16 = nn.Sequential(ConvBNLeaky(3, 16, 3), pool, ConvBNLeaky(16, 32, 3), pool,
                                     ConvBNLeaky(32, 64, 3), pool, ConvBNLeaky(64, 128, 3), pool,
                                     ConvBNLeaky(128, 256, 3))
        self.stage32 = nn.Sequential(pool, ConvBNLeaky(256, 512, 3), MaxPoolSame(), ConvBNLeaky(512, 1024, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (B, 256, H/16, W/16), (B, 1024, H/32, W/32)."""
        c4 = self.stage16(x)
        return c4, self.stage32(c4)


# --------------------------------------------------------------------------------------------------------------
# Darknet's .weights format (src/parser.c: load_weights_upto / save_weights_upto)
# --------------------------------------------------------------------------------------------------------------

@dataclass
class DarknetHeader:
    """The header of a .weights file; `seen` (images trained on) is int64 from format version 0.2 on."""

    major: int = 0
    minor: int = 2
    revision: int = 0
    seen: int = 0

    @property
    def seen_is_int64(self) -> bool:
        """Darknet's rule: `(major*10 + minor) >= 2 && major < 1000 && minor < 1000`."""
        return self.major * 10 + self.minor >= 2 and self.major < 1000 and self.minor < 1000


class DarknetSizeError(ValueError):
    """A .weights file whose number of float32 values fits no part of the model; `values` is that number (with
    Darknet's header), `five_int32` whether the 20-byte header variant was tried too (one value fewer)."""

    def __init__(self, message: str, values: int, five_int32: bool) -> None:
        super().__init__(message)
        self.values, self.five_int32 = values, five_int32


def conv_layer_tensors(layer: nn.Module) -> list[torch.Tensor]:
    """The tensors of one Darknet conv layer in file order: BN bias, scale, mean, var, weights; or bias, weights."""
    if isinstance(layer, ConvBNLeaky):
        conv, bn = layer.conv, layer.bn
        if not isinstance(bn, nn.BatchNorm2d):
            raise ValueError("Darknet weights need the BatchNorm layers; this model was fused with model.fuse()")
        return [bn.bias, bn.weight, bn.running_mean, bn.running_var, conv.weight]
    if isinstance(layer, nn.Conv2d) and layer.bias is not None:
        return [layer.bias, layer.weight]
    raise TypeError(f"{type(layer).__name__} is not a Darknet convolutional layer")


def _read_header(f, path: Path) -> DarknetHeader:  # noqa: ANN001 (binary file object)
    """Read the 16- or 20-byte header (Darknet's rule) from an open .weights file; load_darknet_weights also accepts
    the 20-byte five-int32 header some PyTorch ports write for versions below 0.2."""
    raw = f.read(12)
    if len(raw) < 12:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for a Darknet .weights header (12-16 bytes)")
    major, minor, revision = (int(v) for v in np.frombuffer(raw, "<i4"))
    header = DarknetHeader(major, minor, revision)
    if major >= 1000 or minor >= 1000:
        raise ValueError(f"{path}: header version {major}.{minor} marks transposed weights, which are not supported")
    seen_dtype = "<i8" if header.seen_is_int64 else "<i4"
    raw = f.read(np.dtype(seen_dtype).itemsize)
    if len(raw) < np.dtype(seen_dtype).itemsize:
        raise ValueError(f"{path}: file ends inside the Darknet header")
    header.seen = int(np.frombuffer(raw, seen_dtype)[0])
    return header


def load_darknet_weights(layers: list[nn.Module], path: str | Path,
                         prefixes: dict[str, int]) -> tuple[DarknetHeader, str]:
    """Copy a .weights file into `layers` (Darknet conv order). The file must hold all layers or one of the named
    `prefixes` (e.g. {"darknet53.conv.74": 52}); returns (header, name of the part loaded).

    The whole file is read and its size checked before any parameter is touched.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Darknet weights file not found: {path}")
    with path.open("rb") as f:
        header = _read_header(f, path)
        payload = f.read()
    if len(payload) % 4:
        raise ValueError(f"{path}: {len(payload)} bytes after the header is not a whole number of float32 values")
    values = np.frombuffer(payload, "<f4")

    parts = {"full model": len(layers), **prefixes}
    sizes = {name: sum(t.numel() for layer in layers[:n] for t in conv_layer_tensors(layer))
             for name, n in parts.items()}
    matches = [name for name, size in sizes.items() if size == values.size]
    # Some PyTorch ports write five int32 (major, minor, revision, seen, 0): 20 bytes where Darknet's rule says 16
    # (int32 `seen` below version 0.2). Tried only when Darknet's own layout fits no part of the model.
    five_int32 = not header.seen_is_int64 and values.size >= 1
    if not matches and five_int32:
        matches = [name for name, size in sizes.items() if size == values.size - 1]
        if matches:
            fifth = int(np.frombuffer(payload[:4], "<i4")[0])
            warnings.warn(f"{path}: the header is 20 bytes (five int32: {header.major}, {header.minor}, "
                          f"{header.revision}, seen {header.seen}, {fifth}), as some PyTorch ports write it, instead "
                          f"of Darknet's 16 for version {header.major}.{header.minor} (three int32 and an int32 seen); "
                          "loaded with the 20-byte header", UserWarning, stacklevel=3)
            values = values[1:]
    if not matches:
        expected = ", ".join(f"{size:,} for the {name} ({parts[name]} conv layers)" for name, size in sizes.items())
        tried = (f" ({values.size - 1:,} if the header is the 20-byte five-int32 variant some PyTorch ports write; "
                 "that fits neither)") if five_int32 else ""
        raise DarknetSizeError(f"{path}: holds {values.size:,} float32 weights{tried}, but this model expects "
                               f"{expected}. Is it the file for this architecture and number of classes?",
                               values.size, five_int32)
    part = matches[0]

    offset = 0
    with torch.no_grad():
        for layer in layers[:parts[part]]:
            for tensor in conv_layer_tensors(layer):
                chunk = torch.from_numpy(values[offset:offset + tensor.numel()].copy())
                tensor.copy_(chunk.view_as(tensor))
                offset += tensor.numel()
    return header, part


def save_darknet_weights(layers: list[nn.Module], path: str | Path, header: DarknetHeader) -> None:
    """Write `layers` (Darknet conv order) as a .weights file with `header`, atomically (temporary file + rename)."""
    tensors = [t for layer in layers for t in conv_layer_tensors(layer)]  # raises before any file is opened
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    seen_dtype = "<i8" if header.seen_is_int64 else "<i4"
    try:
        with tmp.open("wb") as f:
            f.write(np.array([header.major, header.minor, header.revision], "<i4").tobytes())
            f.write(np.array([header.seen], seen_dtype).tobytes())
            for tensor in tensors:
                f.write(tensor.detach().to("cpu", torch.float32).numpy().astype("<f4").tobytes())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
