"""The bundle manifest: the only contract between ``clipfold.compile`` and ``clipfold.runtime``.

compile writes a :class:`Manifest` as ``manifest.json`` (runtime/bundle/write.py); the runtime reads it
(:meth:`Manifest.read`) and nothing else. Every section is a small frozen dataclass validated on
construction, serialised with plain JSON types; the parity and gate sections are in
runtime/bundle/agreement.py, the file names in runtime/bundle/layout.py. A manifest whose
``schema_version`` is newer than :data:`SCHEMA_VERSION` is refused.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipfold.errors import BundleError, SchemaVersionError
from clipfold.runtime.bundle.agreement import Gate, HeadParity, Parity, TextGate, TextParity
from clipfold.runtime.bundle.files import bundle_digest, check_relative
from clipfold.runtime.bundle.layout import GALLERY_FILE, MANIFEST_NAME, native_files

SCHEMA_VERSION = 8  # 2: optional extra heads; 3: variants carry backends, quantization and an accuracy gate;
# 4: a large head may live outside the graph (HeadInfo.kernel); an optional text tower (Manifest.text);
# 5: gated reduced-precision text graphs (TextTower.variants); 6: TensorRT engines of a variant (Variant.engines);
# 7: a variant may be a clipfold-vit folder (fp32-native); 8: the text tower names its tokenizer kind and cleanup
# (TextTower.tokenizer_kind, .clean: SigLIP's Hugging Face tokenizer)
DEFAULT_HEAD = "default"  # the head fused into the variants

RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
DTYPES = ("uint8", "int32", "int64", "float16", "float32", "bfloat16")
ACTIVATIONS = ("softmax", "sigmoid")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise BundleError(f"invalid manifest: {message}")


@dataclass(frozen=True)
class PreprocessSpec:
    """How to turn a decoded image into the graph's pixel input, exactly as open_clip does at eval.

    ``mean``/``std`` are the normalization open_clip applies after ``ToTensor``; when ``folded`` is
    true the graph already contains it and takes ``uint8`` pixels in NCHW layout.
    """

    image_size: tuple[int, int]  # (height, width)
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    fill_color: int = 0
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    folded: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        _check(len(self.image_size) == 2 and min(self.image_size) > 0,
               f"preprocess.image_size must be two positive ints, got {self.image_size}")
        _check(self.resize_mode in RESIZE_MODES,
               f"preprocess.resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")
        _check(self.interpolation in INTERPOLATIONS,
               f"preprocess.interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")
        _check(len(self.mean) == 3 and len(self.std) == 3 and min(self.std) > 0,
               "preprocess.mean and std must have 3 values, std positive")
        _check(0 <= int(self.fill_color) <= 255, "preprocess.fill_color must be in 0..255")


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output. Dynamic dims are strings (``"batch"``)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        _check(self.dtype in DTYPES, f"tensor {self.name!r} has unknown dtype {self.dtype!r}")




@dataclass(frozen=True)
class EngineRecord:
    """A TensorRT engine (plan) built from a variant's graph, and what it is tied to.

    A plan runs only on the GPU compute capability and the TensorRT version that built it; the
    runtime picks the record matching its machine or refuses, naming what exists.
    """

    file: str  # the serialized plan
    timing_cache: str  # TensorRT's timing cache from the build, reused by the next build on such a GPU
    tensorrt: str  # TensorRT version, e.g. "10.8.0.43"
    gpu: str  # e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str  # e.g. "9.0"
    profile: dict[str, int]  # batch sizes: min, opt, max
    build_seconds: float = 0.0
    gate: Gate | None = None  # the engine's agreement with the fp32 variant, measured on that GPU

    def __post_init__(self) -> None:
        if self.gate is not None:
            object.__setattr__(self, "gate", _coerce(Gate, self.gate))
        _check(set(self.profile) == {"min", "opt", "max"} and 1 <= self.profile["min"] <= self.profile["opt"]
               <= self.profile["max"], f"engine {self.file!r} has an invalid batch profile {self.profile}")


VARIANT_FORMATS = ("onnx", "clipfold-vit")


@dataclass(frozen=True)
class Variant:
    """One engine file in the bundle, e.g. the fp32 ONNX graph or an int8 one.

    ``backends`` lists the backends that can run the file (an fp8 QDQ graph is for TensorRT);
    ``quantization`` describes the scheme (method, calibration, per-channel, ...), ``gate`` its
    agreement with the fp32 variant; both are absent for fp32, whose ``parity`` against open_clip
    eager is the reference check. ``fused_ops`` counts the ONNX Runtime fused operators.
    """

    name: str
    file: str
    format: str  # "onnx", or "clipfold-vit" (a folder for the package's own ViT kernel, backend "native")
    precision: str  # "fp32", "fp16", "int8-dynamic", ...
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parity: Parity
    top_k: int
    backends: tuple[str, ...] = ("onnxruntime",)
    quantization: dict[str, Any] | None = None
    gate: Gate | None = None
    fused_ops: dict[str, int] = field(default_factory=dict)
    engines: tuple[EngineRecord, ...] = ()  # TensorRT plans built from ``file`` (``clipfold engine build``)

    def __post_init__(self) -> None:
        object.__setattr__(self, "engines", tuple(_coerce(EngineRecord, e) for e in self.engines))
        object.__setattr__(self, "inputs", tuple(_coerce(TensorSpec, t) for t in self.inputs))
        object.__setattr__(self, "outputs", tuple(_coerce(TensorSpec, t) for t in self.outputs))
        object.__setattr__(self, "parity", _coerce(Parity, self.parity))
        object.__setattr__(self, "backends", tuple(self.backends))
        if self.gate is not None:
            object.__setattr__(self, "gate", _coerce(Gate, self.gate))
        _check(len(self.backends) > 0, f"variant {self.name!r} names no backend")
        _check(self.format in VARIANT_FORMATS, f"variant {self.name!r} has unknown format {self.format!r}; "
                                              f"expected one of {VARIANT_FORMATS}")
        _check(self.top_k >= 1, f"variant {self.name!r} has top_k {self.top_k} < 1")

    def stored_files(self) -> tuple[str, ...]:
        """The bundle files the variant cannot run without (a clipfold-vit folder's weights)."""
        if self.format == "clipfold-vit":  # the head graph too, when the head is not the top-k kernel's
            return native_files(self.file, with_head=any(o.name == "scores" for o in self.outputs))
        return (self.file,)


@dataclass(frozen=True)
class ModelInfo:
    """Where the weights came from."""

    name: str
    pretrained: str | None
    checkpoint_sha256: str | None
    family: str  # "vit", "modified-resnet", "timm", ...
    embed_dim: int


@dataclass(frozen=True)
class HeadInfo:
    """The classification head folded into the graph."""

    activation: str  # softmax or sigmoid
    logit_scale: float
    logit_bias: float | None
    templates: tuple[str, ...]
    method: str = "zero-shot"
    adapter: dict[str, Any] | None = None  # file, sha256 and hyperparameters of a fitted or imported adapter
    slow: bool = False  # the graph runs per-image text work (CoCoOp): expect far higher latency
    # A folder of the bundle holding the head as a kernel gallery (rows [w_c, b_c]): the graph stops
    # at the embedding and the runtime scores it with the fused top-k kernel (runtime/backends/kernel_head.py).
    kernel: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "templates", tuple(self.templates))
        _check(self.activation in ACTIVATIONS,
               f"head.activation {self.activation!r} is not one of {ACTIVATIONS}")



@dataclass(frozen=True)
class ExtraHead:
    """A head added to a bundle (``clipfold head add``): a small graph from the default variant's
    ``embedding`` output to ``scores`` and ``indices``, with its own labels."""

    name: str
    file: str
    labels: tuple[str, ...]
    head: HeadInfo
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    top_k: int
    parity: HeadParity

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "head", _coerce(HeadInfo, self.head))
        object.__setattr__(self, "inputs", tuple(_coerce(TensorSpec, t) for t in self.inputs))
        object.__setattr__(self, "outputs", tuple(_coerce(TensorSpec, t) for t in self.outputs))
        object.__setattr__(self, "parity", _coerce(HeadParity, self.parity))
        _check(bool(self.name) and self.name == self.name.strip(), f"head name {self.name!r} is empty or padded")
        _check(len(self.labels) > 0, f"head {self.name!r} has no labels")
        _check(len(set(self.labels)) == len(self.labels), f"head {self.name!r} has duplicate labels")
        _check(1 <= self.top_k <= len(self.labels), f"head {self.name!r} has top_k {self.top_k} out of range")




@dataclass(frozen=True)
class TextVariant:
    """A gated reduced-precision text graph; the engine of the image variant of the same name uses it."""

    name: str
    file: str
    precision: str
    gate: TextGate
    quantization: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "gate", _coerce(TextGate, self.gate))


@dataclass(frozen=True)
class TextTower:
    """The text tower as its own graph: token ids (batch, tokens) -> unit embedding (batch, D).

    ``tokenizer`` is a ``tokenizers`` file. ``tokenizer_kind`` ``clip``: CLIP's BPE after CLIP's text
    cleanup, ids ``[start, ..., end]`` cut at ``context_length``; ``hf``: a Hugging Face tokenizer
    (SigLIP's; start and end ids -1) whose file truncates and pads to ``context_length`` itself, after open_clip's
    ``clean`` step (``lower``, ``canonicalize`` or ``whitespace``). With ``cut_after_end`` the tower
    is causal and pools the end token, so a batch may stop right after its longest prompt's end token.
    """

    file: str
    tokenizer: str
    context_length: int
    start_id: int
    end_id: int
    cut_after_end: bool
    parity: TextParity
    variants: tuple[TextVariant, ...] = ()  # reduced-precision text graphs, each gated against ``file``
    tokenizer_kind: str = "clip"  # "clip" or "hf"
    clean: str = "lower"

    def __post_init__(self) -> None:
        object.__setattr__(self, "parity", _coerce(TextParity, self.parity))
        object.__setattr__(self, "variants", tuple(_coerce(TextVariant, v) for v in self.variants))
        _check(self.context_length >= 2, f"text context_length {self.context_length} < 2")
        _check(self.tokenizer_kind in ("clip", "hf"), f"text tokenizer_kind {self.tokenizer_kind!r} (expected clip or hf)")
        _check(self.clean in ("lower", "canonicalize", "whitespace"),
               f"text clean {self.clean!r} (expected lower, canonicalize or whitespace)")
        _check(self.tokenizer_kind == "hf" or self.clean == "lower", "CLIP's tokenizer cleans with 'lower' only")

    def graph_for(self, variant: str | None) -> tuple[str, str]:
        """(name, file) of the text graph that goes with image variant ``variant``: the text
        variant of that name if there is one, else the fp32 text graph."""
        for v in self.variants:
            if v.name == variant:
                return v.name, v.file
        return "fp32", self.file


@dataclass(frozen=True)
class Manifest:
    model: ModelInfo
    labels: tuple[str, ...]
    head: HeadInfo
    preprocess: PreprocessSpec
    variants: tuple[Variant, ...]
    default_variant: str
    files: dict[str, str]  # relative path -> sha256
    producer: dict[str, str]
    schema_version: int = SCHEMA_VERSION
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    heads: tuple[ExtraHead, ...] = ()  # extra heads; the default head is fused into every variant
    text: TextTower | None = None  # the text tower, for text queries at serving time (compile --text)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", _coerce(ModelInfo, self.model))
        object.__setattr__(self, "head", _coerce(HeadInfo, self.head))
        object.__setattr__(self, "preprocess", _coerce(PreprocessSpec, self.preprocess))
        object.__setattr__(self, "variants", tuple(_coerce(Variant, v) for v in self.variants))
        object.__setattr__(self, "labels", tuple(self.labels))
        _check(isinstance(self.files, dict), "files must map relative paths to sha256 digests")
        for rel in self.files:  # every path is plain, relative and inside the bundle (issue 20)
            check_relative(rel, "files entry")
        _check(len(self.labels) > 0, "labels are empty")
        _check(len(set(self.labels)) == len(self.labels), "labels contain duplicates")
        names = [v.name for v in self.variants]
        _check(len(names) > 0, "no variants")
        _check(len(set(names)) == len(names), f"duplicate variant names {names}")
        _check(self.default_variant in names,
               f"default_variant {self.default_variant!r} is not one of {names}")
        for v in self.variants:
            check_relative(v.file, f"variant {v.name!r} file")
            for name in v.stored_files():
                _check(name in self.files, f"variant file {name!r} has no checksum in files")
            for e in v.engines:
                for name in (e.file, e.timing_cache):
                    _check(name in self.files, f"engine file {name!r} of variant {v.name!r} has no checksum in files")
        object.__setattr__(self, "heads", tuple(_coerce(ExtraHead, h) for h in self.heads))
        head_names = [h.name for h in self.heads]
        _check(len(set(head_names)) == len(head_names), f"duplicate head names {head_names}")
        _check(DEFAULT_HEAD not in head_names, f"an extra head may not be called {DEFAULT_HEAD!r}")
        for h in self.heads:
            check_relative(h.file, f"head {h.name!r} file")
            _check(h.file in self.files, f"head file {h.file!r} has no checksum in files")
        if self.text is not None:
            object.__setattr__(self, "text", _coerce(TextTower, self.text))
            for name in (self.text.file, self.text.tokenizer, *(v.file for v in self.text.variants)):
                check_relative(name, "text file")
                _check(name in self.files, f"text file {name!r} has no checksum in files")
        if self.head.kernel is not None:
            _check(self.head.kernel.replace("-", "").replace("_", "").isalnum(),
                   f"kernel head folder {self.head.kernel!r} must be a plain folder name inside the bundle")
            _check(f"{self.head.kernel}/{GALLERY_FILE}" in self.files,
                   f"kernel head folder {self.head.kernel!r} has no checksummed gallery.json in files")

    def extra_head(self, name: str) -> ExtraHead:
        for h in self.heads:
            if h.name == name:
                return h
        raise BundleError(f"bundle has no head {name!r}; it has {[DEFAULT_HEAD] + [h.name for h in self.heads]}")

    def variant(self, name: str | None = None) -> Variant:
        name = name or self.default_variant
        for v in self.variants:
            if v.name == name:
                return v
        raise BundleError(
            f"bundle has no variant {name!r}; it has {[v.name for v in self.variants]}")

    # --- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        # schema_version first: a reader of any version finds it before anything else.
        return {"schema_version": data.pop("schema_version"), **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        if not isinstance(data, dict):
            raise BundleError("invalid manifest: top level is not a JSON object")
        version = data.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise BundleError(f"invalid manifest: schema_version {version!r} is missing or not a positive integer")
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"bundle manifest has schema version {version}, but this clipfold reads versions "
                f"up to {SCHEMA_VERSION}; upgrade clipfold to open it")
        try:
            return _coerce(cls, data)
        except TypeError as exc:
            raise BundleError(f"invalid manifest: {exc}") from None

    @classmethod
    def read(cls, bundle_dir: str | Path) -> "Manifest":
        return cls.read_with_digest(bundle_dir)[0]

    @classmethod
    def read_with_digest(cls, bundle_dir: str | Path) -> tuple["Manifest", str]:
        """The manifest and the bundle's digest (:func:`bundle_digest`)."""
        path = Path(bundle_dir) / MANIFEST_NAME
        if not path.is_file():
            raise BundleError(f"{bundle_dir} is not a clipfold bundle: {MANIFEST_NAME} not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise BundleError(f"cannot read {path}: {exc}") from None
        return cls.from_dict(data), bundle_digest(data)


def _coerce(cls: type, value: Any) -> Any:
    """Build dataclass ``cls`` from a dict (recursively through __post_init__), pass instances."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise BundleError(f"invalid manifest: expected an object for {cls.__name__}, got {value!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(value) - names
    if unknown:
        raise BundleError(f"invalid manifest: unknown fields {sorted(unknown)} in {cls.__name__}")
    try:
        return cls(**value)
    except TypeError as exc:
        raise BundleError(f"invalid manifest: {cls.__name__}: {exc}") from None
