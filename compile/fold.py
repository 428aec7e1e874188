"""Stage 3: fold input normalization into the image tower's first convolution.

open_clip feeds the tower ``(x / 255 - mean) / std``; that is ``x * a + c`` per channel with
``a = 1 / (255 std)`` and ``c = -mean / std``. For the first convolution ``W``:

* unpadded (ViT patch embedding, ConvNeXt stem): ``conv(W, x a + c) = conv(W a, x) + sum(W c)``,
  an exact rewrite into new weights and a bias, so the graph takes raw pixels at no cost;
* padded (ModifiedResNet's 3x3 stem): zero padding happens in *normalized* space, where a zero
  is raw value ``255 mean``. Folding the bias would be wrong at the borders, so the scale goes
  into the weights and one per-channel subtraction of ``255 mean`` stays in front. That keeps
  the rewrite exact; the subtraction costs one elementwise pass over the input.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from clipfold.errors import ExportError


class _ShiftThenConv(nn.Module):
    """``conv(x - shift)``: keeps padding semantics exact for a scale-folded padded conv."""

    def __init__(self, conv: nn.Conv2d, shift: torch.Tensor):
        super().__init__()
        self.conv = conv
        self.register_buffer("shift", shift.reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x - self.shift)


def find_input_conv(visual: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    """The first Conv2d reading the 3 image channels, with its parent and attribute name."""
    for parent_name, parent in visual.named_modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3 and child.groups == 1:
                return parent, child_name, child
    raise ExportError(
        f"cannot fold input normalization: no 3-channel Conv2d found in {type(visual).__name__}; "
        "expected a patch-embedding or stem convolution")


@torch.no_grad()
def fold_input_normalization(visual: nn.Module, mean, std) -> nn.Module:
    """Return a copy of ``visual`` that takes raw float pixels in [0, 255]."""
    visual = copy.deepcopy(visual)
    parent, name, conv = find_input_conv(visual)
    mean_t = torch.tensor(mean, dtype=torch.float64)
    std_t = torch.tensor(std, dtype=torch.float64)
    scale = 1.0 / (255.0 * std_t)
    weight = conv.weight.double()

    folded = nn.Conv2d(
        3, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, bias=True, padding_mode=conv.padding_mode,
    )
    folded.weight.copy_((weight * scale.view(1, 3, 1, 1)).float())
    bias = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64)

    if _is_unpadded(conv):
        offset = -mean_t / std_t
        folded.bias.copy_((bias + (weight * offset.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))).float())
        setattr(parent, name, folded)
    else:
        folded.bias.copy_(bias.float())
        setattr(parent, name, _ShiftThenConv(folded, (255.0 * mean_t).float()))
    return visual


def _is_unpadded(conv: nn.Conv2d) -> bool:
    padding = conv.padding
    if isinstance(padding, str):
        return padding == "valid"
    return all(p == 0 for p in padding)
