"""Stage 3: fold input normalization into the image tower's first convolution.

open_clip feeds the tower ``(x / 255 - mean) / std``; that is ``x * a + c`` per channel with
``a = 1 / (255 std)`` and ``c = -mean / std``. For the first convolution ``W``:

* unpadded (ViT patch embedding, ConvNeXt stem): ``conv(W, x a + c) = conv(W a, x) + sum(W c)``,
  an exact rewrite into new weights and a bias, so the graph takes raw pixels at no cost;
* padded (ModifiedResNet's 3x3 stem): zero padding happens in *normalized* space, where a zero
  is raw value ``255 mean``. Folding the bias would be wrong at the borders, so the scale goes
  into the weights and one per-channel subtraction of ``255 mean`` stays in front. That keeps
  the rewrite exact; the subtraction costs one elementwise pass over the input.

The fold is taken only where that convolution is provably the one operator reading the pixels
(every torch call is watched on one forward pass, :func:`input_readers`). A tower whose input is
read by several operators (MobileCLIP's MobileOne stem before reparameterization: a 3x3 and a 1x1
branch) or by anything else is normalized in the graph instead (:class:`_NormalizeThen`: one
multiply-add, the same arithmetic as open_clip's). Reparameterizable blocks (MobileOne, RepMixer,
any module with timm's ``reparameterize``/``fuse``) are fused for inference first, as timm's
``reparameterize_model`` and MobileCLIP's own export do; the parity check measures the result
against the unfused eager tower.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from clipfold.errors import ExportError


class _ShiftThenConv(nn.Module):
    """``conv(x - shift)``: keeps padding semantics exact for a scale-folded padded conv."""

    def __init__(self, conv: nn.Conv2d, shift: torch.Tensor):
        super().__init__()
        self.conv = conv
        self.register_buffer("shift", shift.reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x - self.shift)


class _NormalizeThen(nn.Module):
    """``tower(x * a + c)``: normalization in the graph, for a tower whose input no one conv reads alone."""

    def __init__(self, tower: nn.Module, scale: torch.Tensor, offset: torch.Tensor):
        super().__init__()
        self.tower = tower
        self.register_buffer("scale", scale.reshape(1, -1, 1, 1))
        self.register_buffer("offset", offset.reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor):
        return self.tower(x * self.scale + self.offset)


class _Watch(TorchFunctionMode):
    """Records every torch call that receives ``target`` (by identity) as an argument."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target, self.calls = target, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(a is self.target for a in (*args, *kwargs.values())) and not _is_metadata(func):
            self.calls.append(func)
        return func(*args, **kwargs)


def _is_metadata(func) -> bool:
    """Shape, dtype and device queries read no pixel values."""
    name = getattr(func, "__name__", "")
    return name in ("__get__", "size", "dim", "ndimension", "numel", "is_floating_point", "is_complex",
                    "get_device", "__len__", "type", "is_contiguous", "element_size")


def input_readers(visual: nn.Module, image_size: tuple[int, int]) -> tuple[list, list[nn.Module]]:
    """(the torch calls that read the input, the modules it is handed to) on one forward pass."""
    x = torch.zeros(1, 3, *image_size)
    handed: list[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: handed.append(mod) if args and args[0] is x else None)
             for m in visual.modules()]
    try:
        with torch.no_grad(), _Watch(x) as watch:
            visual(x)
    except Exception as exc:  # the tower's own errors, of any type
        raise ExportError(f"cannot trace {type(visual).__name__} on a {image_size[0]}x{image_size[1]} image to fold its "
                          f"input normalization: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    finally:
        for h in hooks:
            h.remove()
    return watch.calls, handed


def reparameterize(visual: nn.Module) -> nn.Module:
    """Fuse reparameterizable branches for inference (in place), as timm's ``reparameterize_model``."""
    from timm.models import reparameterize_model

    return reparameterize_model(visual, inplace=True)


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
def fold_input_normalization(visual: nn.Module, mean, std, image_size: tuple[int, int] | None = None) -> nn.Module:
    """Return a copy of ``visual`` that takes raw float pixels in [0, 255] (reparameterized, then
    normalization folded into its input convolution when that is the input's one reader, else
    normalized in the graph). ``image_size`` defaults to the tower's own."""
    visual = reparameterize(copy.deepcopy(visual))
    mean_t = torch.tensor(mean, dtype=torch.float64)
    std_t = torch.tensor(std, dtype=torch.float64)
    scale = 1.0 / (255.0 * std_t)
    conv = _sole_input_conv(visual, image_size or _image_size(visual))
    if conv is None:
        return _NormalizeThen(visual, scale.float(), (-mean_t / std_t).float())
    parent, name, conv = conv
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


def _sole_input_conv(visual: nn.Module, image_size: tuple[int, int]):
    """(parent, name, conv) when one plain 3-channel Conv2d is the only operator reading the input; else None."""
    calls, handed = input_readers(visual, image_size)
    convs = [m for m in handed if isinstance(m, nn.Conv2d)]
    if len(calls) != 1 or calls[0] is not F.conv2d or len(convs) != 1:
        return None
    conv = convs[0]
    if conv.in_channels != 3 or conv.groups != 1 or conv.padding_mode != "zeros":
        return None
    for parent in visual.modules():
        for child_name, child in parent.named_children():
            if child is conv:
                return parent, child_name, conv
    return None


def _image_size(visual: nn.Module) -> tuple[int, int]:
    size = next((m.image_size for m in visual.modules() if getattr(m, "image_size", None) is not None), None)
    if size is None:  # a bare module (compile always passes the preprocessing's size): any size will do
        return (224, 224)
    return (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)


def _is_unpadded(conv: nn.Conv2d) -> bool:
    padding = conv.padding
    if isinstance(padding, str):
        return padding == "valid"
    return all(p == 0 for p in padding)
