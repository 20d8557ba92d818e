"""torchvision's MobileNetV3 (large / small) as a YOLOv3 encoder with taps at strides 8, 16 and 32."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS = {
    "mobilenet_v3_large": torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
    "mobilenet_v3_small": torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1,
}


def _imagenet_state_dict(name: str, path: str | None) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet state dict for `name`, from the local file `path` or torchvision's download cache."""
    if path is not None:
        return torch.load(path, map_location="cpu", weights_only=True)
    weights = WEIGHTS[name]
    try:
        return weights.get_state_dict(progress=True)
    except OSError as e:  # URLError and socket errors are OSErrors
        file_name = weights.url.rsplit("/", 1)[-1]
        raise RuntimeError(
            f"model.pretrained is true but torchvision's ImageNet weights for {name} could not be downloaded from "
            f"{weights.url} ({e}). Download that file where there is internet, then point the config at it: "
            f"`model.pretrained_path: /path/to/{file_name}` in args.yaml or "
            f"`--set model.pretrained_path=/path/to/{file_name}`.") from e


class MobileNetV3Encoder(nn.Module):
    """MobileNetV3 `features` cut after the last block of stride 8, 16 and 32; the classifier is not kept."""

    def __init__(self, name: str, pretrained: bool = False, pretrained_path: str | None = None) -> None:
        super().__init__()
        if name not in WEIGHTS:
            raise ValueError(f"unknown MobileNetV3 encoder {name!r}; expected one of {sorted(WEIGHTS)}")
        net = getattr(torchvision.models, name)(weights=None)
        if pretrained:
            state = _imagenet_state_dict(name, pretrained_path)
            try:
                net.load_state_dict(state)
            except RuntimeError as e:
                source = pretrained_path or WEIGHTS[name].url
                raise RuntimeError(f"{source} is not a torchvision {name} state dict: {e}") from e
        self.normalization = (IMAGENET_MEAN, IMAGENET_STD)
        features = net.features
        ends, out_channels = self._stride_ends(features)
        self.stage8 = features[:ends[0] + 1]
        self.stage16 = features[ends[0] + 1:ends[1] + 1]
        self.stage32 = features[ends[1] + 1:]
        self.out_channels = tuple(out_channels)

    @staticmethod
    @torch.no_grad()
    def _stride_ends(features: nn.Sequential) -> tuple[list[int], list[int]]:
        """Index and channels of the last block at strides 8 and 16 (and channels at 32), found by a 32x32 probe."""
        was_training = features.training
        x, last = torch.zeros(1, 3, 32, 32), {}
        for i, block in enumerate(features.eval()):
            x = block(x)
            last[32 // x.shape[-1]] = (i, x.shape[1])
        features.train(was_training)
        return [last[8][0], last[16][0]], [last[s][1] for s in (8, 16, 32)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) normalised -> stride 8, 16, 32 maps (B, C_i, H/s, W/s)."""
        c3 = self.stage8(x)
        c4 = self.stage16(c3)
        return c3, c4, self.stage32(c4)

