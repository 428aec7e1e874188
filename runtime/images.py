"""Decode an image from a path, bytes or a PIL image, refusing unsafe or broken input. No torch.

The image is returned in the mode it was stored in (RGBA, P, CMYK, I;16, ...). It is *not*
converted to RGB here: open_clip's eval transform resizes and crops first and converts last
(``MaybeConvertMode`` -> ``image.convert("RGB")`` after ``Resize``/``CenterCrop``), and the order
matters, e.g. Pillow resizes RGBA with premultiplied alpha and resizes P images with nearest
neighbour. :func:`clipfold.runtime.preprocess.preprocess` repeats that order.

Safety: formats whose decoders run an external program (EPS: Ghostscript) are not opened. The
pixel count is checked from the header before any pixel is decoded, against the
caller's ``max_pixels`` rather than Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` (which we
neither rely on nor change). Images are fully decoded here (``load()``) so truncated files fail
with a clear :class:`~clipfold.errors.ImageError` instead of deep inside preprocessing.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from typing import BinaryIO, Union

from PIL import Image, UnidentifiedImageError

from clipfold.errors import DecompressionBombError, ImageError

ImageSource = Union[str, os.PathLike, bytes, Image.Image]

# Pillow's own default for Image.MAX_IMAGE_PIXELS (about 89.5 M pixels, ~0.25 GiB at 24 bit/pixel).
DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3

# What a broken file raises inside Pillow's decoders: OSError ("image file is truncated",
# "broken data stream"), SyntaxError (bad PNG chunk/CRC), ValueError/EOFError/IndexError in some
# plugins, struct.error on short headers. UnidentifiedImageError is an OSError and is handled
# before these.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)

__all__ = ["DEFAULT_MAX_PIXELS", "ImageSource", "load_image", "open_image"]


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Identify encoded bytes and check their pixel count from the header, decoding no pixel.

    The caller learns what decoding will hold (``image.size``) before it happens; ``load_image``
    on the result decodes it with the same checks. Raises as :func:`load_image` does.
    """
    data = bytes(data)
    name = f"<bytes, {len(data)} bytes>"
    if not data:
        raise ImageError(f"image {name} is empty: zero bytes were given")
    return _identify(io.BytesIO(data), name, max_pixels)


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Return a fully decoded PIL image from a file path, raw encoded bytes, or a PIL image.

    Raises :class:`~clipfold.errors.ImageError` (naming the file, or ``<bytes, N bytes>``) for a
    missing, empty, undecodable or truncated image or an unsupported ``source`` type, and
    :class:`~clipfold.errors.DecompressionBombError` when width*height exceeds ``max_pixels``.
    No file handle stays open afterwards. Only the first frame of animated images is decoded.
    """
    if isinstance(source, Image.Image):
        name = _pil_name(source)
        _check_pixels(source.size, max_pixels, name)
        _decode(source, name)
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = f"<bytes, {len(data)} bytes>"
        if not data:
            raise ImageError(f"image {name} is empty: zero bytes were given")
        return _open(io.BytesIO(data), name, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        return _open_path(source, max_pixels)
    raise ImageError(
        f"cannot load an image from a {type(source).__name__}: expected a file path (str or "
        f"os.PathLike), the encoded file's bytes, or a PIL.Image.Image")


def _open_path(source: str | os.PathLike, max_pixels: int) -> Image.Image:
    name = os.fsdecode(source)
    try:
        fh = open(source, "rb")
    except FileNotFoundError:
        raise ImageError(f"image file {name} not found") from None
    except IsADirectoryError:
        raise ImageError(f"image path {name} is a directory, not an image file") from None
    except OSError as exc:
        raise ImageError(f"cannot read image file {name}: {exc.strerror or exc}") from None
    # Our own handle, closed on every path; Pillow does not keep it once the pixels are loaded.
    with fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise ImageError(f"image file {name} is empty (0 bytes)")
        return _open(fh, name, max_pixels)


def _open(fh: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    """Identify from the header, check the pixel count, then decode every pixel."""
    image = _identify(fh, name, max_pixels)
    _decode(image, name)
    return image


def _identify(fh: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    try:
        # Pillow warns between 1x and 2x its global limit; our own check below decides instead.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fh, formats=_formats())
    except Image.DecompressionBombError as exc:
        # Above 2x Image.MAX_IMAGE_PIXELS Pillow refuses in open() whatever max_pixels says.
        raise DecompressionBombError(
            f"image {name} is refused as a possible decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(
            f"cannot decode image {name}: unknown or unsupported image format (not an image "
            f"file Pillow can read, or its header is damaged)") from None
    except _DECODE_ERRORS as exc:
        raise ImageError(f"cannot decode image {name}: {_describe(exc)}") from None
    _check_pixels(image.size, max_pixels, name)
    return image


# Formats whose decoders run an external program (Ghostscript for EPS/PS): never for untrusted bytes.
_EXTERNAL_DECODERS = frozenset({"EPS"})


def _formats() -> list[str]:
    Image.init()
    return [f for f in Image.OPEN if f not in _EXTERNAL_DECODERS]


def _check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise DecompressionBombError(
            f"image {name} declares {width}x{height} = {width * height:,} pixels, more than the "
            f"limit of {max_pixels:,}; refusing to decode it as a possible decompression bomb "
            f"(pass a larger max_pixels if the image is trusted)")
    if width < 1 or height < 1:
        raise ImageError(f"image {name} has no pixels (size {width}x{height})")


def _decode(image: Image.Image, name: str) -> None:
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise DecompressionBombError(
            f"image {name} is refused as a possible decompression bomb: {exc}") from None
    except _DECODE_ERRORS as exc:
        raise ImageError(f"cannot decode image {name}: {_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "truncated" in text.lower():
        return f"the file is truncated ({text})"
    return f"the data is corrupt or not a supported image ({text})"


def _pil_name(image: Image.Image) -> str:
    filename = getattr(image, "filename", "")
    if filename:
        return os.fsdecode(filename)
    return f"<PIL image, {image.mode} {image.size[0]}x{image.size[1]}>"
