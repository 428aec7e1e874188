"""TensorRT: graphs TensorRT can parse, and serialized engines built from them on the target GPU.

Two steps, on two kinds of machine:

1. **TensorRT-bound graphs, anywhere.** The precisions ``tensorrt-fp16``, ``tensorrt-int8`` and
   ``fp8`` are built from the portable export (standard ONNX operators; the ONNX Runtime fusions
   are contrib operators TensorRT cannot parse) and gated against fp32 with ONNX Runtime like
   every variant. They are meant for a *strongly typed* TensorRT network, where each layer runs in
   the type its ONNX tensors have. That is TensorRT 10's recommended mode, because weak typing
   with precision flags is deprecated. So the fp32-kept layers are decided in the graph itself:
   LayerNorm, softmax, reductions, GELU's Erf, and the head after the L2-normalized ``embedding``
   stay fp32 (:func:`node_float_types` shows it). int8 and fp8 come from explicit QDQ pairs with
   zero points of 0, which TensorRT requires. :func:`tensorrt_problems` checks every operator,
   domain, opset and QDQ zero point against what TensorRT's ONNX parser accepts before a graph is
   written.
2. **Engines, on the GPU that will run them.** :func:`build_engine` parses such a graph with the
   TensorRT Python API into a strongly typed network, adds one optimization profile for the
   dynamic batch (min/opt/max), reuses and updates a timing cache kept beside the engine, and
   serializes the plan. An engine is tied to the GPU's compute capability and to the TensorRT
   version that built it. Its record (:func:`engine_record`) names both, and the runtime refuses
   a plan built for anything else (``runtime/backends/tensorrt.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipfold.errors import BackendUnavailableError, ConfigError, ExportError

# TensorRT 10's ONNX parser: opsets 9..20, standard domains only. Operators it lists as
# unsupported (onnx-tensorrt docs/operators.md), and ONNX Runtime's quantized operators, which
# are not QDQ and which TensorRT does not parse.
TENSORRT_OPSETS = (9, 20)
STANDARD_DOMAINS = ("", "ai.onnx")
UNSUPPORTED_OPS = frozenset({
    "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Bernoulli", "BlackmanWindow", "Col2Im",
    "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear", "HammingWindow",
    "HannWindow", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial",
    "NegativeLogLikelihoodLoss", "QLinearConv", "QLinearMatMul", "STFT", "SequenceAt", "SequenceConstruct",
    "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength", "SoftmaxCrossEntropyLoss",
    "SplitToSequence", "StringNormalizer", "StringConcat", "StringSplit", "RegexFullMatch", "TfIdfVectorizer",
    "Unique", "Optional", "OptionalGetElement", "OptionalHasElement",
})
TOPK_MAX = 3840  # TensorRT's largest K
# Where a strongly typed TensorRT network of a clipfold graph must compute in fp32.
FP32_OP_TYPES = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "ReduceL2", "TopK", "Erf")
TENSORRT_PRECISIONS = {"fp16": "tensorrt-fp16", "int8": "tensorrt-int8", "fp8": "fp8"}


def _onnx():
    import onnx

    return onnx


def tensorrt_problems(path: str | Path) -> list[str]:
    """Everything in the graph at ``path`` that TensorRT's ONNX parser would refuse (empty: none)."""
    onnx = _onnx()
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    problems = []
    opsets = {o.domain: o.version for o in model.opset_import}
    version = opsets.get("", opsets.get("ai.onnx"))
    if version is None or not TENSORRT_OPSETS[0] <= version <= TENSORRT_OPSETS[1]:
        problems.append(f"opset {version} is outside TensorRT's {TENSORRT_OPSETS[0]}..{TENSORRT_OPSETS[1]}")
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = value
    signed = (onnx.TensorProto.INT8, onnx.TensorProto.FLOAT8E4M3FN)
    for node in graph.node:
        where = f"node {node.name or '?'} ({(node.domain + '.') if node.domain else ''}{node.op_type})"
        if node.domain not in STANDARD_DOMAINS:
            problems.append(f"{where}: not a standard ONNX operator; TensorRT parses the standard domain only")
        elif node.op_type in UNSUPPORTED_OPS:
            problems.append(f"{where}: TensorRT's ONNX parser does not support it")
        elif node.op_type == "TopK":
            attributes = {a.name: a.i for a in node.attribute}
            k = constants.get(node.input[1])
            if attributes.get("sorted", 1) == 0:
                problems.append(f"{where}: sorted=0; TensorRT's TopK always sorts")
            if k is not None and int(numpy_helper.to_array(k).max()) > TOPK_MAX:
                problems.append(f"{where}: K above {TOPK_MAX}, TensorRT's largest")
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if zero is None:
                problems.append(f"{where}: no zero point: ONNX then means uint8, which TensorRT quantizes as int8; "
                                "give an int8 (or fp8) zero point of 0")
            elif zero.data_type not in signed or np.any(numpy_helper.to_array(zero).astype(np.float64) != 0):
                problems.append(f"{where}: zero point {node.input[2]!r} must be a constant int8 or fp8 0 (symmetric "
                                "quantization); TensorRT supports no other")
    return problems


def check_tensorrt_graph(path: str | Path, precision: str) -> None:
    problems = tensorrt_problems(path)
    if problems:
        shown = "\n  - ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise ExportError(f"the {precision} graph is meant for TensorRT, but TensorRT could not parse it:\n  - {shown}")


def node_float_types(path: str | Path) -> dict[str, set[str]]:
    """Node name -> the float element types of its inputs ('float32', 'float16'; QDQ types as such).

    In a strongly typed network this is the precision each layer computes in.
    """
    onnx = _onnx()
    from onnx import TensorProto, shape_inference

    inferred = Path(path).with_name(f".{Path(path).name}.shapes")
    try:  # through files: works for graphs past protobuf's 2 GB
        shape_inference.infer_shapes_path(str(path), str(inferred))
        model = onnx.load(str(inferred), load_external_data=False)
    finally:
        inferred.unlink(missing_ok=True)
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input,
                                                            *model.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    floats = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
    return {node.name: {floats[types[i]] for i in node.input if types.get(i) in floats} for node in model.graph.node}


# --- engines (TensorRT and an NVIDIA GPU) --------------------------------------------------------
@dataclass(frozen=True)
class BatchProfile:
    """The optimization profile's batch sizes: an engine runs any batch in ``min..max``, fastest at ``opt``."""

    min: int = 1
    opt: int = 8
    max: int = 64

    def __post_init__(self) -> None:
        for name in ("min", "opt", "max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name}-batch must be a positive integer, got {value!r}")
        if not self.min <= self.opt <= self.max:
            raise ConfigError(f"batch profile needs min <= opt <= max, got {self.min}, {self.opt}, {self.max}")


def tensorrt_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError("building TensorRT engines needs TensorRT and an NVIDIA GPU: install "
                                      "clipfold[gpu] on the machine that will run the engine") from None
    return trt


def gpu_identity() -> dict[str, str]:
    """This machine's GPU 0 and TensorRT version: what an engine built here is tied to (the same
    identity the runtime matches plans against)."""
    _tensorrt()  # the builder's own message when TensorRT is missing
    from clipfold.runtime.backends.tensorrt import this_machine

    return this_machine()


def build_engine(onnx_path: Path, plan_path: Path, cache_path: Path, input_name: str, image_size: tuple[int, int],
                 profile: BatchProfile, workspace_gib: float = 4.0, say=print, cache_out: Path | None = None) -> dict:
    """Build a strongly typed engine from a TensorRT-bound graph; returns what the manifest records.

    The timing cache is read from ``cache_path`` when it exists and written to ``cache_out``
    (default: the same file).
    """
    trt = _tensorrt()
    here = gpu_identity()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT {here['tensorrt']} could not parse {onnx_path.name}:\n  - " + "\n  - ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # e.g. from another GPU model: start afresh
        say(f"the timing cache {cache_path.name} does not fit this GPU; starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    shapes = [(b, 3, *image_size) for b in (profile.min, profile.opt, profile.max)]
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(input_name, *shapes)
    config.add_optimization_profile(opt_profile)
    say(f"building a TensorRT {here['tensorrt']} engine for {here['gpu']} (sm {here['compute_capability']}), "
        f"batch {profile.min}..{profile.max} (opt {profile.opt})")
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path.name}; its log above says why")
    plan_path.write_bytes(bytes(plan))
    timing = config.get_timing_cache()
    (cache_out or cache_path).write_bytes(bytes(timing.serialize()) if timing is not None else b"")
    return {**here, "file": plan_path.name, "timing_cache": cache_path.name,
            "profile": {"min": profile.min, "opt": profile.opt, "max": profile.max},
            "build_seconds": round(time.perf_counter() - start, 1)}
