"""CPU inference with the conv weights reordered once into oneDNN's blocked layout, activations fused into the conv.

Eager PyTorch keeps conv weights in the plain (O, I, kH, kW) layout, so oneDNN reorders every weight into its
blocked layout at every call: for YOLOv3 that is 248 MB read and written per forward, ~10% of the time at batch 1
(amortised over a batch of 8). Packing does that reorder once, as inductor's freezing pass does for torch.compile,
and lets the conv apply the following LeakyReLU / ReLU / Hardswish itself (one pass over the output fewer). Outputs
equal the unpacked model's (same oneDNN kernels); bench/model.py measures the gain.

Packed in bf16 (`dtype=torch.bfloat16`, a CPU with native bf16) the weights are cast once as well, and the
activations flow between the convs in bf16: bf16 autocast instead casts every weight at every call (YOLOv3: 248 MB
read, 124 MB written) and casts each activation back and forth around the non-conv ops. That is 1.4-1.8x faster
than autocast on an AMX Xeon (BENCHMARKS.md, "Deployment"); the outputs are bf16 autocast's within bf16 rounding,
and the heads decode in float32 as every form's do (models/yolo.py decode).

It calls oneDNN through torch.ops.mkldnn (`_reorder_convolution_weight`, `_convolution_pointwise`): the ops
inductor's CPU backend emits, not a public API, so `packing_available()` checks that they are there and
tests/test_models.py checks the outputs. A packed model is for inference on the CPU only: no autograd, no
`.to("cuda")`, no state_dict round trip (keep the unpacked model for saving or exporting).
"""
from __future__ import annotations

import torch
from torch import nn

# activation modules the conv can apply itself, and oneDNN's name for each (with its scalars)
FUSABLE_ACTIVATIONS = {nn.LeakyReLU: "leaky_relu", nn.ReLU: "relu", nn.Hardswish: "hardswish"}


def packing_available() -> bool:
    """True where this torch build has oneDNN and the two ops packing calls."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_convolution_weight")
            and hasattr(ops, "_convolution_pointwise"))


class PackedConv2d(nn.Module):
    """An nn.Conv2d (and the activation after it, if any) with its weight reordered for oneDNN once."""

    def __init__(self, conv: nn.Conv2d, input_shape: tuple[int, ...], activation: nn.Module | None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"cannot pack a conv with padding {conv.padding!r} / {conv.padding_mode!r}")
        self.args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        weight = conv.weight.detach().to(dtype)
        self.register_buffer("weight", torch.ops.mkldnn._reorder_convolution_weight(
            weight, *self.args, list(input_shape)), persistent=False)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().to(dtype), persistent=False)
        self.attr, self.scalars = "none", []
        if activation is not None:
            self.attr = FUSABLE_ACTIVATIONS[type(activation)]
            self.scalars = [activation.negative_slope] if isinstance(activation, nn.LeakyReLU) else []
        self.text = f"{conv.in_channels}, {conv.out_channels}, kernel_size={conv.kernel_size}, stride={conv.stride}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) on the CPU -> (B, C_out, H', W') in the weights' dtype, activation applied."""
        return torch.ops.mkldnn._convolution_pointwise(x.to(self.weight.dtype), self.weight, self.bias, *self.args,
                                                       self.attr, self.scalars, "")

    def extra_repr(self) -> str:
        """The conv's shape and the fused activation."""
        return f"{self.text}, activation={self.attr}, dtype={self.weight.dtype}"


@torch.no_grad()
def pack_conv_weights(model: nn.Module, example: torch.Tensor, dtype: torch.dtype = torch.float32) -> int:
    """Replace every nn.Conv2d of `model` (eval mode, on the CPU) by a PackedConv2d of `dtype` (float32 or
    bfloat16), in place, fusing the activation that directly follows it in an nn.Sequential (after BN folding; an
    unfolded BN in between keeps it apart); returns the number packed. `example` (B, 3, H, W) is run once to learn
    each conv's input shape, which picks oneDNN's layout; other shapes run too."""
    if not packing_available():
        raise RuntimeError(f"torch {torch.__version__} has no oneDNN conv packing (torch.ops.mkldnn."
                           "_reorder_convolution_weight / _convolution_pointwise); run the model unpacked")
    if model.training or example.device.type != "cpu":
        raise ValueError("pack_conv_weights packs an eval-mode model for the CPU; call model.eval() on the CPU first")
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def record(conv: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        shapes.setdefault(conv, tuple(args[0].shape))
    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        model(example)
    finally:
        for hook in hooks:
            hook.remove()
    packed = 0
    for parent in list(model.modules()):
        names = list(parent._modules)
        for i, name in enumerate(names):
            conv = parent._modules[name]
            if not isinstance(conv, nn.Conv2d) or conv not in shapes:
                continue
            # in a Sequential, the module after the conv (BN folded into an Identity skipped) may be fused into it
            after = [n for n in names[i + 1:] if not isinstance(parent._modules[n], nn.Identity)][:1]
            activation = parent._modules[after[0]] if after and isinstance(parent, nn.Sequential) else None
            if type(activation) not in FUSABLE_ACTIVATIONS:
                activation = None
            parent._modules[name] = PackedConv2d(conv, shapes[conv], activation, dtype)
            if activation is not None:
                parent._modules[after[0]] = nn.Identity()
            packed += 1
    return packed
