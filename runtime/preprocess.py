"""open_clip's eval image transform, re-done with Pillow and numpy only (no torch).

The result is the uint8 image that open_clip's ``image_transform(..., is_train=False)`` feeds to
``ToTensor``; the graph divides by 255 and normalizes itself (``PreprocessSpec.folded``). It is
bit-identical, not merely close: torchvision's functional ops on a PIL image are thin wrappers
around Pillow calls, so we make the same Pillow calls with the same arguments, in the same order,
and copy torchvision's and open_clip's integer arithmetic for sizes and offsets (checked against
open_clip 3.3 / torchvision 0.29 by ``tests/test_preprocess.py``):

=============  ==============================================================================
resize_mode    open_clip eval transform (then ``MaybeConvertMode`` = ``image.convert("RGB")``)
=============  ==============================================================================
shortest       square size: ``Resize(size)`` (shorter side) + ``CenterCrop(size)``;
               non-square: ``ResizeKeepRatio(size)`` + ``CenterCrop(size)``. open_clip builds
               that ``ResizeKeepRatio`` without its ``interpolation``, so it is always bicubic.
longest        ``ResizeKeepRatio(size, longest=1)`` + ``CenterCropOrPad(size, fill_color)``
squash         ``Resize((h, w))``
=============  ==============================================================================

open_clip accepts only bicubic and bilinear; "nearest" (allowed by the manifest) is the same
pipeline with ``Image.NEAREST`` wherever open_clip passes its interpolation through.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from clipfold.errors import ImageError
from clipfold.runtime.bundle.schema import PreprocessSpec

# torchvision's pil_modes_mapping: InterpolationMode -> Pillow resampling filter.
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}

__all__ = ["preprocess", "preprocess_one", "transform_image"]


def preprocess(images: Sequence[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    """Preprocess decoded images into the graph's input: uint8 NCHW RGB, shape (N, 3, H, W)."""
    height, width = spec.image_size
    out = np.empty((len(images), 3, height, width), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = preprocess_one(image, spec)
    return out


def preprocess_one(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """One image as uint8 CHW RGB, shape (3, H, W)."""
    rgb = transform_image(image, spec)
    # Same as torchvision's to_tensor before its division by 255: HWC uint8 -> CHW.
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def transform_image(image: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """The PIL image open_clip's eval transform hands to ``ToTensor``: resized, cropped, RGB."""
    if not isinstance(image, Image.Image):
        raise ImageError(
            f"preprocess expects decoded PIL images, got a {type(image).__name__}; "
            f"decode files and bytes with clipfold.runtime.images.load_image first")
    size = spec.image_size  # (h, w)
    resample = _RESAMPLE[spec.interpolation]
    try:
        if spec.resize_mode == "squash":
            image = _resize(image, size, resample)
        elif spec.resize_mode == "longest":
            image = _resize(image, keep_ratio_size(image, size, longest=True), resample)
            image = center_crop_or_pad(image, size, fill=spec.fill_color)
        elif size[0] == size[1]:  # shortest, square: torchvision Resize(int) + CenterCrop
            image = _resize(image, shorter_side_size(image, size[0]), resample)
            image = center_crop_or_pad(image, size, fill=0)
        else:  # shortest, non-square: open_clip's ResizeKeepRatio(size) is always bicubic
            image = _resize(image, keep_ratio_size(image, size, longest=False),
                            Image.Resampling.BICUBIC)
            image = center_crop_or_pad(image, size, fill=0)
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageError(
            f"cannot preprocess a {image.width}x{image.height} {image.mode} image to "
            f"{size[1]}x{size[0]} ({spec.resize_mode}): {exc}") from None


def shorter_side_size(image: Image.Image, target: int) -> tuple[int, int]:
    """(h, w) for torchvision ``Resize(target)``: shorter side = target, longer side *truncated*.

    torchvision's ``_compute_resized_output_size`` computes ``int(target * long / short)``
    (``int()``, not ``round()``), and ties (``w == h``) count as "width is the short side".
    """
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = target, int(target * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return new_h, new_w


def keep_ratio_size(image: Image.Image, target: tuple[int, int], longest: bool) -> tuple[int, int]:
    """(h, w) for open_clip's ``ResizeKeepRatio.get_params`` at eval (no random scale/aspect).

    One ratio for both sides: the larger of h/th, w/tw for ``longest`` (the whole image fits),
    the smaller for shortest (the target is covered). Sides use Python's ``round`` (half to even)
    of ``side * 1.0 / ratio``, in that order of operations, as open_clip does. A very thin image
    can round to 0 pixels; Pillow then refuses to resize, as it does under open_clip.
    """
    h, w = image.size[::-1]
    ratio_h, ratio_w = h / target[0], w / target[1]
    lg = 1.0 if longest else 0.0
    ratio = max(ratio_h, ratio_w) * lg + min(ratio_h, ratio_w) * (1.0 - lg)
    return round(h * 1.0 / ratio), round(w * 1.0 / ratio)


def center_crop_or_pad(image: Image.Image, size: tuple[int, int], fill: int) -> Image.Image:
    """torchvision's ``center_crop`` (which pads with 0) and open_clip's ``center_crop_or_pad``.

    Both pad a too-small image first, putting the odd pixel on the right/bottom
    (left = (cw - w) // 2, right = (cw - w + 1) // 2), then crop at
    ``int(round((h - ch) / 2.0))``: Python ``round`` is half-to-even, so an odd surplus of
    1 pixel gives offset 0, of 3 gives offset 2 (round(1.5) == 2), of 5 gives 2 (round(2.5)).
    """
    crop_h, crop_w = size
    w, h = image.size
    if crop_w > w or crop_h > h:
        ltrb = (
            (crop_w - w) // 2 if crop_w > w else 0,
            (crop_h - h) // 2 if crop_h > h else 0,
            (crop_w - w + 1) // 2 if crop_w > w else 0,
            (crop_h - h + 1) // 2 if crop_h > h else 0,
        )
        image = _pad(image, ltrb, fill)
        w, h = image.size
        if (w, h) == (crop_w, crop_h):
            return image
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))


def _resize(image: Image.Image, size_hw: tuple[int, int], resample: int) -> Image.Image:
    """torchvision ``F.resize`` on PIL: unchanged when the size already matches, else Pillow's
    ``Image.resize`` (always antialiased; Pillow itself uses nearest for modes 1 and P and
    premultiplied alpha for RGBA and LA)."""
    h, w = size_hw
    if image.size == (w, h):
        return image
    return image.resize((w, h), resample)


def _pad(image: Image.Image, ltrb: tuple[int, int, int, int], fill: int) -> Image.Image:
    """torchvision's ``F_pil.pad`` in constant mode: ``ImageOps.expand`` with a fill repeated
    per band (so CMYK pads with (f, f, f, f), which is white for f=0 once converted to RGB), and
    for palette images a palette *index* whose palette is restored afterwards."""
    bands = len(image.getbands())
    color = fill if image.mode == "F" else int(fill)
    if bands > 1:
        color = tuple([color] * bands)
    if image.mode == "P":
        palette = image.getpalette()
        out = ImageOps.expand(image, border=ltrb, fill=color)
        out.putpalette(palette)
        return out
    return ImageOps.expand(image, border=ltrb, fill=color)
