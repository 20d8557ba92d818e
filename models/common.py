"""Building blocks shared by every architecture: Darknet's conv layer, BN folding, input normalisation."""
from collections import OrderedDict

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


class ConvBNLeaky(nn.Sequential):
    """Darknet's `[convolutional] batch_normalize=1 activation=leaky`: conv (no bias), BN, LeakyReLU(0.1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(OrderedDict(
            # Darknet's pad=1 means padding = size // 2 on every side.
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
            bn=nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.01),  # Darknet: rolling stats at .99
            act=nn.LeakyReLU(0.1, inplace=True),
        ))


class Normalize(nn.Module):
    """(x - mean) / std per channel on a (B, 3, H, W) RGB batch in [0, 1]."""

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, H, W)."""
        return (x - self.mean) / self.std


def fuse_conv_bn(module: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d in an nn.Sequential into the conv; returns the count.

    Covers our ConvBNLeaky and torchvision's Conv2dNormActivation alike. Eval-mode statistics are used, so the
    fused module computes what the unfused one computes in eval mode.
    """
    fused = 0
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, bn = seq._modules[first], seq._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq._modules[first] = fuse_conv_bn_eval(conv.eval(), bn.eval())
                seq._modules[second] = nn.Identity()
                fused += 1
    return fused
