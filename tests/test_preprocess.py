"""runtime.preprocess matches open_clip's eval transform bit for bit; runtime.images refuses bad input.

Parity: for every resize mode, interpolation and a square and non-square size, each of ~130 images
(noise and gradients; 16 sizes from 1x1 and 3x500 to 333x250; modes RGB, RGBA, L, P, CMYK, LA,
I;16, 1) must give exactly the uint8 pixels open_clip's transform gives, max difference 0.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageFile
from torchvision.transforms import Compose, InterpolationMode, Normalize

from clipfold.errors import DecompressionBombError, ImageError
from clipfold.runtime.bundle.schema import PreprocessSpec
from clipfold.runtime.images import DEFAULT_MAX_PIXELS, load_image
from clipfold.runtime.preprocess import preprocess, preprocess_one

MODES = ("RGB", "RGBA", "L", "P", "CMYK", "LA", "I;16", "1")
# (width, height): degenerate, thin both ways, odd, smaller/larger than every target, square.
SIZES = ((1, 1), (3, 500), (500, 3), (47, 1), (1, 47), (7, 13), (31, 31), (33, 65), (64, 64),
         (80, 48), (48, 80), (100, 100), (224, 224), (250, 333), (333, 250), (301, 299))
IMAGE_SIZES = (64, (48, 80), 224)  # open_clip takes an int for square models, (h, w) otherwise


def _make(width: int, height: int, mode: str, smooth: bool, rng: np.random.Generator) -> Image.Image:
    if smooth:  # a smooth gradient: resampling filters matter most on noise, rounding on ramps
        y, x = np.mgrid[0:height, 0:width]
        fx, fy = x / max(width - 1, 1), y / max(height - 1, 1)
        planes = np.stack([fx, fy, (fx + fy) / 2, 1 - fx * fy], axis=-1)
    else:
        planes = rng.random((height, width, 4))
    rgba = (planes * 255).round().astype(np.uint8)
    if mode == "I;16":  # 0..511: open_clip's convert("RGB") clips the upper half to 255
        return Image.fromarray((planes[..., 0] * 511).round().astype(np.uint16))
    if mode == "CMYK":
        return Image.frombytes("CMYK", (width, height), rgba.tobytes())
    if mode == "RGBA":
        return Image.fromarray(rgba)
    if mode == "LA":
        return Image.fromarray(np.ascontiguousarray(rgba[..., :2]))
    return Image.fromarray(np.ascontiguousarray(rgba[..., :3])).convert(mode)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(1234)
    out = [_make(w, h, mode, smooth=i % 2 == 1, rng=rng)
           for i, (w, h) in enumerate(SIZES) for mode in MODES]
    assert {im.mode for im in out} == set(MODES)
    return out


def _spec(image_size, resize_mode: str, interpolation: str, fill_color: int = 0) -> PreprocessSpec:
    hw = (image_size, image_size) if isinstance(image_size, int) else image_size
    return PreprocessSpec(image_size=hw, resize_mode=resize_mode, interpolation=interpolation,
                          fill_color=fill_color)


def reference_transform(image_size, spec: PreprocessSpec) -> Compose:
    """open_clip's own eval transform for ``spec`` with its final ``Normalize`` dropped.

    Dropping the last step (checked to be the ``Normalize``) leaves ``MaybeToTensor``'s output,
    which is exactly ``uint8 / 255`` in float32; ``torch.round(x * 255)`` recovers the integer
    exactly since float32's error there is < 1e-4, far below 0.5. Un-normalizing instead would
    add float error of its own. open_clip refuses "nearest": for it we build open_clip's bilinear
    pipeline and switch to NEAREST the steps that received the bilinear setting (the non-square
    "shortest" ResizeKeepRatio never receives it: open_clip always makes that one bicubic).
    """
    interpolation = "bilinear" if spec.interpolation == "nearest" else spec.interpolation
    full = open_clip.image_transform(image_size, is_train=False, mean=spec.mean, std=spec.std,
                                     resize_mode=spec.resize_mode, interpolation=interpolation,
                                     fill_color=spec.fill_color)
    steps = list(full.transforms)
    assert isinstance(steps[-1], Normalize), steps
    steps = steps[:-1]
    if spec.interpolation == "nearest":
        for step in steps:
            if getattr(step, "interpolation", None) == InterpolationMode.BILINEAR:
                step.interpolation = InterpolationMode.NEAREST
    return Compose(steps)


def _reference_pixels(transform: Compose, image: Image.Image) -> np.ndarray:
    return torch.round(transform(image) * 255).to(torch.uint8).numpy()


def _check_parity(images, image_size, spec) -> int:
    """Compare every image; return how many open_clip itself could not process."""
    transform = reference_transform(image_size, spec)
    failures, refused = [], 0
    for image in images:
        try:
            expected = _reference_pixels(transform, image)
        except ValueError:  # e.g. a 3x500 image in "longest" mode resizes to 0 rows
            with pytest.raises(ImageError, match=r"cannot preprocess a \d+x\d+ .* image"):
                preprocess_one(image, spec)
            refused += 1
            continue
        ours = preprocess_one(image, spec)
        assert ours.dtype == np.uint8 and ours.shape == (3, *spec.image_size)
        diff = int(np.abs(ours.astype(np.int16) - expected.astype(np.int16)).max())
        if diff:
            failures.append(f"{image.mode} {image.size}: max abs diff {diff}")
    assert not failures, failures
    return refused


@pytest.mark.parametrize("image_size", IMAGE_SIZES, ids=str)
@pytest.mark.parametrize("interpolation", ("bicubic", "bilinear", "nearest"))
@pytest.mark.parametrize("resize_mode", ("shortest", "longest", "squash"))
def test_bit_identical_to_open_clip(images, resize_mode, interpolation, image_size):
    refused = _check_parity(images, image_size, _spec(image_size, resize_mode, interpolation))
    # Only "longest" can shrink a side of a thin image to 0 pixels (open_clip fails there too).
    assert refused == 0 or resize_mode == "longest"
    assert refused < len(images) // 4


@pytest.mark.parametrize("fill_color", (77, 255))
def test_longest_pads_with_fill_color_like_open_clip(images, fill_color):
    # A P image pads with palette *index* fill_color and CMYK with (f, f, f, f), as torchvision.
    _check_parity(images, (48, 80), _spec((48, 80), "longest", "bicubic", fill_color))


def test_square_size_as_tuple_matches_int(images):
    spec = _spec(64, "shortest", "bicubic")
    as_int, as_tuple = reference_transform(64, spec), reference_transform((64, 64), spec)
    for image in images[::9]:
        assert np.array_equal(_reference_pixels(as_int, image), _reference_pixels(as_tuple, image))
        assert np.array_equal(preprocess_one(image, spec), _reference_pixels(as_int, image))


def test_batch_shape_dtype_and_empty(images):
    spec = _spec((48, 80), "shortest", "bicubic")
    batch = preprocess(images[:5], spec)
    assert batch.shape == (5, 3, 48, 80) and batch.dtype == np.uint8
    assert all(np.array_equal(batch[i], preprocess_one(images[i], spec)) for i in range(5))
    empty = preprocess([], spec)
    assert empty.shape == (0, 3, 48, 80) and empty.dtype == np.uint8


def test_preprocess_rejects_undecoded_input():
    with pytest.raises(ImageError, match=r"expects decoded PIL images, got a str.*load_image"):
        preprocess(["cat.png"], _spec(64, "shortest", "bicubic"))


# --- load_image ------------------------------------------------------------------------------
def _encoded(fmt: str, size=(64, 48), mode="RGB") -> bytes:
    rng = np.random.default_rng(7)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(buf, fmt)
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A small real PNG whose IHDR is patched (CRC fixed) to declare ``width x height``."""
    data = bytearray(_encoded("PNG", (8, 8)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture()
def no_pixel_decoding(monkeypatch):
    """Fail the test if any image's pixels are decoded."""
    def load(self):
        raise AssertionError(f"pixels of a {self.size} image were decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_load_from_path_bytes_and_pil_keeps_mode(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(_encoded("PNG", mode="RGBA"))
    for source in (path, str(path), path.read_bytes()):
        image = load_image(source)
        assert image.mode == "RGBA" and image.size == (64, 48)  # converted to RGB only after resizing
    original = Image.new("P", (5, 4))
    assert load_image(original) is original


def test_missing_empty_and_directory(tmp_path):
    with pytest.raises(ImageError, match=r"image file .*nope\.png not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=r"image file .*zero\.jpg is empty \(0 bytes\)"):
        load_image(tmp_path / "zero.jpg")
    with pytest.raises(ImageError, match=r"image <bytes, 0 bytes> is empty"):
        load_image(b"")
    with pytest.raises(ImageError, match=r"image path .* is a directory"):
        load_image(tmp_path)


@pytest.mark.parametrize("fmt", ("PNG", "JPEG"))
def test_truncated_file(tmp_path, fmt):
    data = _encoded(fmt)
    cut = data[: len(data) // 2]
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(cut)
    with pytest.raises(ImageError, match=rf"cannot decode image .*cut\.{fmt.lower()}: the file is truncated"):
        load_image(path)
    with pytest.raises(ImageError, match=rf"image <bytes, {len(cut)} bytes>: the file is truncated"):
        load_image(cut)
    # A lazily opened PIL image is decoded by load_image too, and named by its file.
    with Image.open(path) as lazy:
        with pytest.raises(ImageError, match=r"cut\..* the file is truncated"):
            load_image(lazy)


def test_garbage_and_unknown_format(tmp_path):
    garbage = np.random.default_rng(3).integers(0, 256, 100, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match=r"image <bytes, 100 bytes>: unknown or unsupported image format"):
        load_image(garbage)
    (tmp_path / "notes.jpg").write_text("not an image\n")
    with pytest.raises(ImageError, match=r"image .*notes\.jpg: unknown or unsupported image format"):
        load_image(tmp_path / "notes.jpg")
    # A header that identifies but whose data is broken (zeroed IDAT) is a decode error, not a crash.
    broken = _encoded("PNG").replace(b"IDAT", b"IDAT\x00\x00\x00\x00", 1)
    with pytest.raises(ImageError, match=r"cannot decode image <bytes, \d+ bytes>"):
        load_image(broken)


@pytest.mark.parametrize("source", (123, None, 4.5, np.zeros((4, 4, 3), np.uint8), ["a.png"]))
def test_wrong_type(source):
    with pytest.raises(ImageError, match=r"cannot load an image from a \w+: expected a file path"):
        load_image(source)


def test_bomb_over_default_limit_refused_from_header(tmp_path, no_pixel_decoding):
    # 100 M pixels: above Pillow's default 89.5 M, below the 2x where Pillow itself raises; only
    # our check stops it, before any pixel is decoded and without leaking Pillow's warning.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_declaring(10_000, 10_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DecompressionBombError,
                           match=rf"image .*bomb\.png declares 10000x10000 = 100,000,000 pixels, "
                                 rf"more than the limit of {DEFAULT_MAX_PIXELS:,}"):
            load_image(path)
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS  # not mutated


def test_bomb_beyond_pillows_hard_limit(no_pixel_decoding):
    # 10^10 pixels: Pillow raises in Image.open; we convert it and name the source.
    data = _png_declaring(100_000, 100_000)
    with pytest.raises(DecompressionBombError,
                       match=r"image <bytes, \d+ bytes> is refused as a possible decompression bomb"):
        load_image(data)


def test_small_max_pixels(tmp_path, no_pixel_decoding):
    path = tmp_path / "small.png"
    path.write_bytes(_encoded("PNG", (64, 48)))
    with pytest.raises(DecompressionBombError,
                       match=r"small\.png declares 64x48 = 3,072 pixels, more than the limit of 1,000"):
        load_image(path, max_pixels=1000)
    with pytest.raises(DecompressionBombError, match=r"<PIL image, RGB 64x48> declares 64x48"):
        load_image(Image.new("RGB", (64, 48)), max_pixels=1000)


def test_larger_max_pixels_is_ours_to_decide(tmp_path):
    # With the limit raised the bomb check passes and decoding fails on the missing pixel data.
    path = tmp_path / "big.png"
    path.write_bytes(_png_declaring(10_000, 10_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match=r"big\.png: the file is truncated") as info:
            load_image(path, max_pixels=200_000_000)
    assert not isinstance(info.value, DecompressionBombError)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count open files")
def test_no_file_handle_left_open(tmp_path):
    good, cut = tmp_path / "good.png", tmp_path / "cut.jpg"
    good.write_bytes(_encoded("PNG"))
    cut.write_bytes(_encoded("JPEG")[:300])
    (tmp_path / "bomb.png").write_bytes(_png_declaring(10_000, 10_000))
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        load_image(good).convert("RGB")
        for bad in (cut, tmp_path / "bomb.png"):
            with pytest.raises(ImageError):
                load_image(bad)
    assert len(os.listdir("/proc/self/fd")) == before
