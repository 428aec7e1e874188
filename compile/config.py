"""Typed compile options, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from clipfold.compile.precision.config import GateConfig, QuantConfig, check_text_precisions, parse_precisions
from clipfold.errors import ConfigError, LabelError

DEFAULT_MODEL = "clipfold-tiny"


@dataclass(frozen=True)
class VerifyConfig:
    """Tolerances of the fp32 parity check against open_clip eager."""

    min_cosine: float = 0.99999
    # Scores within this absolute distance of the k-th reference score count as tied.
    tie_tolerance: float = 1e-5
    max_score_diff: float = 1e-4
    random_images: int = 8
    generated_images: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.min_cosine <= 1.0:
            raise ConfigError(f"min_cosine must be in (0, 1], got {self.min_cosine}")
        if self.random_images + self.generated_images < 1:
            raise ConfigError("verification needs at least one image")


# A linear head leaves the graph from this many classes on. Measured on the 2-core CPU
# (benchmarks/test_bench_kernel_head.py, dense time / kernel time): at batch 1 ONNX Runtime's
# dense MatMul + Softmax + TopK is faster up to 512k classes (0.74-0.82x); at batch 32 the kernel
# head wins from 128k classes (1.04x, 1.37x at 512k) and never holds the B x C logits. The
# default keeps batch-1 latency below a million classes; at 2^20 x 512 the head's weights also
# pass ONNX's 2 GB single-file limit. Lower it with --kernel-head-classes for batch-heavy serving.
KERNEL_HEAD_CLASSES = 1 << 20

# What the reduced-precision variants are built for: ONNX Runtime's graphs, or TensorRT-bound graphs
# on standard operators (their engines are built on the GPU that runs them: clipfold engine build).
BACKENDS = ("onnxruntime", "tensorrt")


def backend_precisions(backend: str, precisions: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
    """The variant names ``precisions`` mean for ``backend``: for tensorrt, fp16 / int8 / fp8 name the
    TensorRT-bound graphs tensorrt-fp16 / tensorrt-int8 / fp8 (fp32 is always built); onnxruntime keeps them."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "onnxruntime":
        return precisions
    from clipfold.compile.tensorrt.build import TENSORRT_PRECISIONS

    spec = precisions if precisions is not None else ()
    names = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip() and p.strip() != "fp32"]
    unknown = [p for p in names if p not in TENSORRT_PRECISIONS and p not in TENSORRT_PRECISIONS.values()]
    if not names or unknown:
        raise ConfigError(f"backend tensorrt takes precisions from {', '.join(TENSORRT_PRECISIONS)} (or "
                          f"{', '.join(TENSORRT_PRECISIONS.values())}); got {precisions!r}")
    return tuple(TENSORRT_PRECISIONS.get(p, p) for p in names)


@dataclass(frozen=True)
class CompileConfig:
    """Everything ``compile_bundle`` needs. Labels are checked here, before any model loads.

    ``labels`` may be None only with a clipfold adapter file, whose own labels are then used.
    With ``method`` set, ``adapter`` is an official checkpoint of that method, imported with
    ``method_options`` (e.g. ``{"class_token_position": "middle"}``).
    """

    labels: tuple[str, ...] | None
    out: Path
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    templates: str | tuple[str, ...] | None = None  # preset name, a file, or explicit templates
    top_k: int = 10
    overwrite: bool = False
    opset: int = 18
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    adapter: Path | None = None  # a fitted adapter file, or a checkpoint of ``method``; replaces the zero-shot head
    method: str | None = None  # import ``adapter`` as this method's official checkpoint
    method_options: dict[str, str] = field(default_factory=dict)
    precisions: tuple[str, ...] = ("fp32",)  # variants to build; fp32 always, first
    # onnxruntime, or tensorrt: precisions fp16/int8/fp8 then name TensorRT-bound graphs (backend_precisions)
    backend: str = "onnxruntime"
    quant: QuantConfig = field(default_factory=QuantConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    fuse: bool = True  # ONNX Runtime fused operators in the fp32 graph (see optimize.py)
    # CPU alternatives to the fp32 engine (fp32-native, bf16) built only where this machine runs them
    # and kept only where they measure faster than fp32 at batch 1 (compile/precision/speed_check.py).
    if_faster: tuple[str, ...] = ()
    # A linear head with at least this many classes is scored by the top-k kernel at run time
    # instead of a dense MatMul + Softmax + TopK in the graph (runtime/backends/kernel_head.py); None: never.
    kernel_head_classes: int | None = KERNEL_HEAD_CLASSES
    text: bool = False  # also carry the text tower and tokenizer, for text queries at serving time
    # Reduced-precision text graphs, each gated against the fp32 text graph (compile/stages/text_tower.py).
    text_precisions: tuple[str, ...] = ()
    # A local Hugging Face tokenizer (folder or tokenizer.json) for models that read text with one (SigLIP).
    tokenizer: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "precisions", parse_precisions(backend_precisions(self.backend, self.precisions)))
        if self.if_faster:
            from clipfold.compile.precision.speed_check import check_if_faster

            names = self.if_faster.split(",") if isinstance(self.if_faster, str) else self.if_faster
            object.__setattr__(self, "if_faster", check_if_faster(names))
        object.__setattr__(self, "text_precisions", check_text_precisions(self.text_precisions, self.text))
        if self.kernel_head_classes is not None and self.kernel_head_classes < 1:
            raise ConfigError(f"kernel_head_classes must be >= 1 (or None for never), got {self.kernel_head_classes}")
        if self.labels is None:
            if self.adapter is None or self.method is not None:
                raise LabelError("labels are required unless a clipfold adapter file (which carries its "
                                 "labels) is given; importing a checkpoint needs the class names")
        else:
            object.__setattr__(self, "labels", normalize_labels(self.labels))
        if self.method is not None and self.adapter is None:
            raise ConfigError(f"--method {self.method} imports a checkpoint: pass it with --adapter")
        if self.method_options and self.method is None:
            raise ConfigError("method options apply to an imported checkpoint; pass --method too")
        object.__setattr__(self, "out", Path(self.out))
        if self.adapter is not None:
            object.__setattr__(self, "adapter", Path(self.adapter))
        if self.tokenizer is not None:
            object.__setattr__(self, "tokenizer", Path(self.tokenizer))
        if self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if not self.model:
            raise ConfigError("model name is empty")


def generated_images(count: int, seed: int) -> list:
    """The images compile uses wherever the user gives none: verification (stages/verify.py) and the
    calibration, search and gate sets (precision/image_sets.py); each passes its own seed. This is the
    one place that chooses them: the demo model's renders (compile/tiny/data.py, coloured shapes on
    light, dark, gray and noisy backgrounds; PIL RGB images), real-looking enough to exercise every
    layer and free of any data set. Deterministic in ``seed``."""
    from clipfold.compile.tiny import data

    return [sample.image for sample in data.generate(count, seed=seed)]


def normalize_labels(labels) -> tuple[str, ...]:
    """Strip labels and refuse empty or duplicate ones, naming them."""
    if isinstance(labels, str):
        raise LabelError("labels must be a sequence of strings, got one string; split it first")
    cleaned = tuple(str(label).strip() for label in labels)
    if not cleaned:
        raise LabelError("no labels given: expected at least one class label")
    empty = [i for i, label in enumerate(cleaned) if not label]
    if empty:
        raise LabelError(f"labels at positions {empty} are empty: every label needs text")
    seen: dict[str, int] = {}
    dupes = []
    for i, label in enumerate(cleaned):
        if label in seen:
            dupes.append(f"{label!r} (positions {seen[label]} and {i})")
        seen.setdefault(label, i)
    if dupes:
        raise LabelError(f"duplicate labels: {', '.join(dupes)}; each class needs a unique label")
    return cleaned


def read_labels(spec: str) -> tuple[str, ...]:
    """``spec`` is a file (one label per line, blank lines and #comments skipped) or a comma list."""
    path = Path(spec)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LabelError(f"cannot read labels file {path}: {exc}") from None
        lines = [ln.strip() for ln in text.splitlines()]
        return normalize_labels([ln for ln in lines if ln and not ln.startswith("#")])
    if "," not in spec and (spec.endswith((".txt", ".csv")) or "/" in spec):
        raise LabelError(f"labels file {spec} not found; pass a file or a comma-separated list")
    return normalize_labels(spec.split(","))
