"""Typed options for reduced-precision variants and the accuracy gate they must pass, and the table
of precisions (``PRECISIONS``: what each is and which backends run it). Only data and its checks:
variants.py builds the variants, gate.py measures them, image_sets.py picks their images.

A variant is named after its precision. fp32 is always built first: it is verified against
open_clip eager, and every other variant is then gated against it on held-out images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clipfold.errors import ConfigError

# name -> (what it is, the backends that run it)
PRECISIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fp32": ("float32 reference, ONNX Runtime fused graph", ("onnxruntime",)),
    "fp32-native": ("float32 image tower run by clipfold's own CPU kernel (AVX2 + FMA; open_clip class-token ViTs), "
                    "head in ONNX Runtime", ("native",)),
    "fp16": ("mixed fp16 for GPU backends: LayerNorm, softmax, reductions and the head stay fp32", ("onnxruntime",)),
    "bf16": ("the fp32 graph run in bfloat16 by OpenVINO on CPUs with AMX or AVX512-BF16 (no second file)",
             ("openvino",)),
    "int8-dynamic": ("int8 weights, activations quantized per batch at run time", ("onnxruntime",)),
    "int8-static": ("int8 QDQ, activation ranges calibrated on images", ("onnxruntime",)),
    "int8-weight": ("weight-only int8 MatMul (MatMulNBits)", ("onnxruntime",)),
    "int4-weight": ("weight-only int4 MatMul (MatMulNBits)", ("onnxruntime",)),
    "fp8": ("FP8 E4M3 QDQ graph for TensorRT on Hopper (checked here with emulated Q/DQ)", ("tensorrt",)),
    # TensorRT-bound graphs on standard operators (compile --backend tensorrt), for a strongly typed network
    "tensorrt-fp16": ("mixed fp16 graph for TensorRT: LayerNorm, softmax, reductions and the head stay fp32",
                      ("tensorrt",)),
    "tensorrt-int8": ("int8 QDQ graph for TensorRT: symmetric s8 activations and weights, ranges calibrated on "
                      "images", ("tensorrt",)),
}
# The precisions whose graphs need calibration images.
CALIBRATED = ("int8-static", "fp8", "tensorrt-int8")
CALIBRATIONS = ("minmax", "entropy", "percentile")
# Operator types left in float by default: normalization, softmax and GELU are where int8
# ranges go wrong in ViTs (outliers after LayerNorm, the exponent of softmax); the head is kept
# in float separately (see quantize.head_nodes).
DEFAULT_KEEP_FLOAT = ("LayerNormalization", "SkipLayerNormalization", "Softmax", "BiasGelu", "Gelu", "Erf")


# Text graphs: the quantizers that need no calibration data (token ids are not images).
TEXT_PRECISIONS = ("int8-dynamic", "int8-weight", "int4-weight")


def check_text_precisions(names, text: bool) -> tuple[str, ...]:
    """``--text-precision``: known text precisions, and only with ``--text``."""
    names = tuple(dict.fromkeys(n.strip() for n in names if n.strip() and n.strip() != "fp32"))
    unknown = [n for n in names if n not in TEXT_PRECISIONS]
    if unknown:
        raise ConfigError(f"unknown text precision {', '.join(map(repr, unknown))}; the text graph can be built as "
                          f"{', '.join(TEXT_PRECISIONS)} (fp32 always)")
    if names and not text:
        raise ConfigError("--text-precision needs --text: there is no text graph to quantize without it")
    return names


def parse_precisions(spec: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """``"fp32,int8-static"`` -> ``("fp32", "int8-static")``; fp32 is always first."""
    if spec is None:
        return ("fp32",)
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in PRECISIONS]
    if unknown:
        raise ConfigError(f"unknown precision {', '.join(map(repr, unknown))}; expected some of {', '.join(PRECISIONS)}")
    ordered = ["fp32"] + [n for n in dict.fromkeys(names) if n != "fp32"]
    return tuple(ordered)


@dataclass(frozen=True)
class QuantConfig:
    """How quantized variants are built.

    ``calib`` is a folder of images (one level or class sub-folders); without it the adapter's
    support images or generated images are used. ``search`` returns the most sensitive nodes to
    float, a few more each round, until the gate holds.
    """

    calib: Path | None = None
    calibration: str = "minmax"
    calib_images: int = 32
    # Off by default: ONNX Runtime's per-channel MatMul weights use a reduced (7-bit) range, which
    # measured worse on the tiny model (int8-dynamic embedding cosine mean 0.99855 vs 0.99986).
    per_channel: bool = False
    keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT
    search: bool = True
    block_size: int = 32  # weight-only int4/int8

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(f"unknown calibration method {self.calibration!r}; expected one of {CALIBRATIONS}")
        if self.calib_images < 1:
            raise ConfigError(f"calib_images must be >= 1, got {self.calib_images}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two >= 16, got {self.block_size}")
        object.__setattr__(self, "keep_float", tuple(self.keep_float))
        if self.calib is not None:
            object.__setattr__(self, "calib", Path(self.calib))


@dataclass(frozen=True)
class GateConfig:
    """Limits a variant must meet against fp32 before it is written.

    ``data`` is a labelled image folder (class sub-folders named like the labels): it adds
    accuracy, held to ``max_accuracy_drop`` below fp32's. Without it, ``images`` generated images
    are used, disjoint from the calibration images. ``search_data`` (optional) is a labelled folder
    for the sensitivity search's choices; without it half of ``data`` (or generated images of
    another seed) is set apart for them, and the gate reports only on the rest (:mod:`.gate`).
    """

    min_cosine: float = 0.99
    min_top1_agreement: float = 0.99
    min_top5_overlap: float = 0.0
    max_accuracy_drop: float = 0.01
    data: Path | None = None
    images: int = 128
    seed: int = 1234
    search_data: Path | None = None

    def __post_init__(self) -> None:
        for name in ("min_cosine", "min_top1_agreement", "min_top5_overlap", "max_accuracy_drop"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"gate {name} must be in [0, 1], got {value}")
        if self.images < 1:
            raise ConfigError(f"the gate needs at least one image, got {self.images}")
        if self.data is not None:
            object.__setattr__(self, "data", Path(self.data))
        if self.search_data is not None:
            object.__setattr__(self, "search_data", Path(self.search_data))

    def thresholds(self) -> dict[str, float]:
        return {"min_cosine": self.min_cosine, "min_top1_agreement": self.min_top1_agreement,
                "min_top5_overlap": self.min_top5_overlap, "max_accuracy_drop": self.max_accuracy_drop}
