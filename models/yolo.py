"""YOLOv3 and YOLOv3-tiny: neck, heads and decoding, layer for layer as Darknet's yolov3.cfg / yolov3-tiny.cfg."""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from models import darknet
from models.common import ConvBNLeaky, Normalize, fuse_conv_bn
from models.tables import ANCHOR_MASKS, DARKNET_ANCHORS, STRIDES

OBJECTNESS_PRIOR = 0.01  # initial sigmoid(objectness): about 1 object per 100 predictions, as in focal loss's prior


def decode(raw: torch.Tensor, anchors: torch.Tensor, stride: int) -> torch.Tensor:
    """Raw head map (B, A, H, W, 5+C) -> (B, A*H*W, 5+C): cx, cy, w, h in input pixels, sigmoid(obj), sigmoid(cls).

    cx = (sigmoid(tx) + col) * stride, w = exp(tw) * anchor_w (YOLOv3 paper, section 2.1); `anchors` is (A, 2).
    Computed in float32 whatever the map's dtype: bf16's 8-bit mantissa would round centres at 256-512 px to 2 px
    (the conv outputs of bf16 / fp16 autocast are rounded once, ~0.03 px at stride 32).
    """
    batch, num_anchors, height, width, channels = raw.shape
    raw = raw.float() if raw.dtype in (torch.bfloat16, torch.float16) else raw
    rows = torch.arange(height, device=raw.device, dtype=raw.dtype).view(1, 1, height, 1)
    cols = torch.arange(width, device=raw.device, dtype=raw.dtype).view(1, 1, 1, width)
    grid = torch.stack(torch.broadcast_tensors(cols, rows), -1)  # (1, 1, H, W, 2): col, row
    # a cat of the three channel groups, not assignment into slices of a copy: traced for export, slice assignment
    # becomes ONNX ScatterND plus a graph that builds its (B, A, H, W, 2, 5) index tensor on every call; with a
    # dynamic batch OpenVINO ran that in reference kernels, 0.2 of YOLOv3-tiny's INT8 time (BENCHMARKS.md). In eager
    # mode the cat measured 0.65-0.9x the slice assignment's time (no strided copy of the permuted map first).
    xy = (raw[..., :2].sigmoid() + grid) * stride  # cx, cy = (sigmoid(t) + cell) * stride
    wh = raw[..., 2:4].exp() * anchors.to(raw.dtype).view(1, num_anchors, 1, 1, 2)  # w, h = exp(t) * anchor
    out = torch.cat([xy, wh, raw[..., 4:].sigmoid()], -1)  # objectness, classes
    return out.view(batch, num_anchors * height * width, channels)


class HeadOutput(nn.Conv2d):
    """A head's final 1x1 conv with bias and no BN (`[convolutional] filters=A*(5+C) activation=linear`)."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int) -> None:
        super().__init__(in_channels, num_anchors * (5 + num_classes), 1)
        self.num_anchors, self.num_classes = num_anchors, num_classes
        self.init_priors()

    @torch.no_grad()
    def init_priors(self) -> None:
        """Bias objectness to OBJECTNESS_PRIOR and classes to 1/(C+1), so early training is not swamped by
        confident false positives."""
        bias = self.bias.view(self.num_anchors, 5 + self.num_classes)
        bias[:, :4] = 0.0
        bias[:, 4] = math.log(OBJECTNESS_PRIOR / (1 - OBJECTNESS_PRIOR))
        bias[:, 5:] = -math.log(self.num_classes)  # logit of 1/(C+1)


def head(in_channels: int, mid_channels: int, num_anchors: int, num_classes: int) -> nn.Sequential:
    """A 3x3 conv, then the output conv (the two layers before each `[yolo]`)."""
    return nn.Sequential(OrderedDict(conv=ConvBNLeaky(in_channels, mid_channels, 3),
                                     out=HeadOutput(mid_channels, num_anchors, num_classes)))


def conv_set(in_channels: int, channels: int) -> nn.Sequential:
    """The five convs 1x1, 3x3, 1x1, 3x3, 1x1 that end each YOLOv3 scale (e.g. cfg layers 75-79)."""
    return nn.Sequential(ConvBNLeaky(in_channels, channels, 1), ConvBNLeaky(channels, 2 * channels, 3),
                         ConvBNLeaky(2 * channels, channels, 1), ConvBNLeaky(channels, 2 * channels, 3),
                         ConvBNLeaky(2 * channels, channels, 1))


def lateral(in_channels: int) -> nn.Sequential:
    """1x1 conv halving channels, then nearest x2 upsampling (`[route] layers=-4`, conv, `[upsample]`)."""
    return nn.Sequential(ConvBNLeaky(in_channels, in_channels // 2, 1), nn.Upsample(scale_factor=2, mode="nearest"))


class YOLO(nn.Module):
    """Shared by YOLOv3 and YOLOv3-tiny: input normalisation, raw-map reshaping, decoding, Darknet weights I/O."""

    arch: str
    encoder_name: str = "darknet53"  # model.encoder's name (build_model sets it)
    darknet_prefixes: dict[str, int] = {}  # named partial .weights files: name -> number of conv layers

    def __init__(self, num_classes: int, anchors: list | None, normalization: tuple | None) -> None:
        super().__init__()
        anchors = DARKNET_ANCHORS[self.arch] if anchors is None else anchors  # checked by build_model
        self.num_classes = num_classes
        self.strides = STRIDES[self.arch]
        self.masks = ANCHOR_MASKS[self.arch]
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32))  # (K, 2) input pixels
        self.normalize = Normalize(*normalization) if normalization else nn.Identity()
        self.darknet_header = darknet.DarknetHeader()

    def head_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalised -> one (B, A*(5+C), H/s, W/s) map per head, stride-32 head first."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        """(B, 3, H, W) RGB, uint8 0..255 (as the datasets give it) or float in [0, 1] -> train: [(B, A, H/s, W/s,
        5+C) raw] per head (permuted views of the conv outputs: not contiguous); eval: (B, N, 5+C) decoded."""
        if not torch.jit.is_tracing() and (x.shape[-1] % self.strides[0] or x.shape[-2] % self.strides[0]):
            raise ValueError(f"input size {tuple(x.shape[-2:])} (H, W): both sides must be multiples of "
                             f"{self.strides[0]}")
        if x.dtype == torch.uint8:  # converted here, on the model's device: 4x fewer bytes from the loader to it
            x = x.to(self.anchors.dtype).div_(255)  # the model's float type (fp16 after .half(), as its buffers)
        maps = self.head_maps(self.normalize(x))
        raw = []
        for m, mask in zip(maps, self.masks, strict=True):
            b, _, h, w = m.shape
            # a permuted view, not a copy: each channel stays one contiguous (H, W) plane, so the loss reads the 5
            # box/objectness planes of every prediction without streaming the class channels through the cache
            raw.append(m.view(b, len(mask), 5 + self.num_classes, h, w).permute(0, 1, 3, 4, 2))
        if self.training:
            return raw
        heads = zip(raw, self.masks, self.strides, strict=True)
        return torch.cat([decode(r, self.anchors[list(mask)], stride) for r, mask, stride in heads], 1)

    # -- Darknet weights ---------------------------------------------------------------------------------------
    def darknet_layers(self) -> list[nn.Module]:
        """The conv layers in Darknet cfg order (= .weights order): module registration follows the cfg."""
        if not self.darknet_prefixes:
            raise ValueError(f"{type(self).__name__} with a {type(self.encoder).__name__} encoder has no Darknet "
                             "weights format; use encoder darknet53 or arch yolov3-tiny")
        return [m for m in self.modules() if isinstance(m, (ConvBNLeaky, HeadOutput))]

    def load_darknet_weights(self, path: str | Path) -> str:
        """Load a Darknet .weights file (full model, or a backbone file such as darknet53.conv.74); returns the part."""
        self.darknet_header, part = darknet.load_darknet_weights(self.darknet_layers(), path, self.darknet_prefixes)
        return part

    def save_darknet_weights(self, path: str | Path) -> None:
        """Write the model as a Darknet .weights file (the header read by load_darknet_weights, if any, is kept)."""
        darknet.save_darknet_weights(self.darknet_layers(), path, self.darknet_header)

    def fuse(self) -> YOLO:
        """Fold BatchNorm into the preceding convs for inference/export (eval-mode outputs are unchanged)."""
        fuse_conv_bn(self)
        return self.eval()


class YOLOv3(YOLO):
    """Encoder (Darknet-53 or MobileNetV3) + YOLOv3 neck with heads at strides 32, 16, 8 (yolov3.cfg 75-106)."""

    arch = "yolov3"

    def __init__(self, encoder: nn.Module, num_classes: int = 80, anchors: list | None = None) -> None:
        super().__init__(num_classes, anchors, encoder.normalization)
        if isinstance(encoder, darknet.Darknet53):
            self.darknet_prefixes = {"darknet53.conv.74": 52}
        c3, c4, c5 = encoder.out_channels
        a = len(self.masks[0])
        self.encoder = encoder                     # layers 0-74
        self.block32 = conv_set(c5, 512)           # 75-79
        self.head32 = head(512, 1024, a, num_classes)    # 80-81, [yolo] 82
        self.lateral32 = lateral(512)              # 83-85
        self.block16 = conv_set(c4 + 256, 256)     # 86 route -1,61; 87-91
        self.head16 = head(256, 512, a, num_classes)    # 92-93, [yolo] 94
        self.lateral16 = lateral(256)              # 95-97
        self.block8 = conv_set(c3 + 128, 128)      # 98 route -1,36; 99-103
        self.head8 = head(128, 256, a, num_classes)     # 104-105, [yolo] 106

    def head_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> maps at strides 32, 16, 8, each (B, 3*(5+C), H/s, W/s)."""
        c3, c4, c5 = self.encoder(x)
        p5 = self.block32(c5)
        p4 = self.block16(torch.cat([self.lateral32(p5), c4], 1))  # route order: upsampled first, then layer 61
        p3 = self.block8(torch.cat([self.lateral16(p4), c3], 1))
        return [self.head32(p5), self.head16(p4), self.head8(p3)]


class YOLOv3Tiny(YOLO):
    """YOLOv3-tiny (yolov3-tiny.cfg): heads at strides 32 and 16."""

    arch = "yolov3-tiny"
    darknet_prefixes = {"yolov3-tiny.conv.15": 9}  # Darknet's `partial ... 15`: layers 0-14, 9 convs

    def __init__(self, num_classes: int = 80, anchors: list | None = None) -> None:
        super().__init__(num_classes, anchors, None)
        a = len(self.masks[0])
        self.encoder = darknet.TinyBackbone()      # layers 0-12
        self.block32 = ConvBNLeaky(1024, 256, 1)   # 13
        self.head32 = head(256, 512, a, num_classes)    # 14-15, [yolo] 16
        self.lateral32 = lateral(256)              # 17-19
        self.head16 = head(128 + 256, 256, a, num_classes)  # 20 route -1,8; 21-22, [yolo] 23

    def head_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> maps at strides 32, 16, each (B, 3*(5+C), H/s, W/s)."""
        c4, c5 = self.encoder(x)
        p5 = self.block32(c5)
        return [self.head32(p5), self.head16(torch.cat([self.lateral32(p5), c4], 1))]
