"""Build reduced-precision graphs from the verified fp32 graphs. Gating is :mod:`.variants`'s job.

Sources: ``fused`` is the fp32 variant (ONNX Runtime fused operators); ``portable`` is the
plain export (standard operators only), which TensorRT-bound graphs (fp8) start from.

* int8-dynamic: ORT's dynamic quantizer on the fused graph. Its ``Attention`` nodes become
  ``QAttention`` (int8 QKV projection), MatMuls become ``DynamicQuantizeMatMul``.
* int8-static, int8/int4-weight: on the fused graph with each ``Attention`` unpacked into a
  QKV MatMul + ``MultiHeadAttention`` (:func:`unpack_attention`), because the QDQ and
  MatMulNBits quantizers handle MatMul but not ``Attention``; ~25 % of the GEMM work of a ViT is
  that projection.
* fp16: ORT's float16 converter with normalization, softmax, reductions and the head blocked.
* fp8: QDQ with FLOAT8E4M3FN on the portable graph.

The head (every node after the L2-normalized ``embedding``) stays in float by default: its
scores decide the top-k directly and it costs a fraction of a percent of the FLOPs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from clipfold.compile.precision.config import QuantConfig
from clipfold.compile.stages.streamed_save import save_streamed, without_weights
from clipfold.errors import ConfigError, ExportError

log = logging.getLogger(__name__)

QUANTIZABLE = ("MatMul", "Conv", "Gemm")


def _onnx():
    import onnx

    return onnx


def head_nodes(model) -> list[str]:
    """Names of the nodes computing from the ``embedding`` output onwards (the head and top-k)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    if "embedding" not in producers:
        return []
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    seen, frontier = set(), ["embedding"]
    while frontier:
        tensor = frontier.pop()
        for node in consumers.get(tensor, []):
            if node.name not in seen:
                seen.add(node.name)
                frontier.extend(node.output)
    return sorted(seen)


def _name_nodes(model) -> None:
    """Give every node a unique name: quantizers address nodes by name."""
    used: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in used:
            node.name = f"{node.op_type}_{i}"
        used.add(node.name)


def unpack_attention(model):
    """Replace each ``com.microsoft.Attention(x, W, b)`` by ``MatMul(x, W) + b`` -> Split -> MultiHeadAttention.

    Exact: the contrib Attention computes the same projection, then scaled dot-product attention
    per head; MultiHeadAttention does the latter on separate Q, K and V.
    """
    onnx = _onnx()
    from onnx import helper

    if not any(o.domain in ("", "ai.onnx") and o.version >= 18 for o in model.opset_import):
        raise ConfigError("unpacking attention needs opset >= 18 (Split with num_outputs)")
    nodes = []
    for node in model.graph.node:
        if node.op_type != "Attention" or node.domain != "com.microsoft":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        sizes = attrs.pop("qkv_hidden_sizes", None)
        if attrs.get("unidirectional", 0) == 0:
            attrs.pop("unidirectional", None)
        unsupported = set(attrs) - {"num_heads", "scale"}
        if sizes is not None and len(set(sizes)) != 1:
            unsupported.add("qkv_hidden_sizes (unequal)")
        if len(node.input) < 3 or not node.input[2]:
            unsupported.add("no bias")
        if len(node.output) > 1 and any(node.output[1:]):
            unsupported.add("present state output")
        if len(node.input) > 3 and any(node.input[3:]) or unsupported:
            raise ConfigError(f"cannot unpack attention node {node.name}: masks or attributes {sorted(unsupported)}")
        x, w, b = node.input[:3]
        p = node.name
        nodes.append(helper.make_node("MatMul", [x, w], [f"{p}/qkv_mm"], name=f"{p}/qkv_matmul"))
        nodes.append(helper.make_node("Add", [f"{p}/qkv_mm", b], [f"{p}/qkv"], name=f"{p}/qkv_bias"))
        nodes.append(helper.make_node("Split", [f"{p}/qkv"], [f"{p}/q", f"{p}/k", f"{p}/v"], name=f"{p}/split",
                                      axis=-1, num_outputs=3))
        mha_attrs = {"num_heads": attrs["num_heads"]}
        if "scale" in attrs:
            mha_attrs["scale"] = attrs["scale"]
        nodes.append(helper.make_node("MultiHeadAttention", [f"{p}/q", f"{p}/k", f"{p}/v"], [node.output[0]],
                                      name=f"{p}/mha", domain="com.microsoft", **mha_attrs))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(without_weights(model), full_check=False)  # the new nodes; weights are as loaded
    return model


def _drop_equal_qkv_sizes(model) -> None:
    """``qkv_hidden_sizes`` with three equal sizes is the default; ORT's int8 quantizer skips
    Attention nodes that carry it (QAttention has no such attribute)."""
    from onnx import helper

    for node in model.graph.node:
        if node.op_type == "Attention":
            for attr in list(node.attribute):
                if attr.name == "qkv_hidden_sizes" and len(set(helper.get_attribute_value(attr))) == 1:
                    node.attribute.remove(attr)


def activation_matmuls(model) -> list[str]:
    """MatMuls of two activations (attention scores and context in an unfused graph). They stay
    in float: one per-tensor scale cannot cover softmax probabilities and raw scores alike."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for n in model.graph.node if n.op_type == "Constant" for out in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in constants]


def prepare(src: Path, dst: Path, unpack: bool) -> list[str]:
    """Copy ``src`` to ``dst`` with named nodes (and attention unpacked); return the nodes that
    always stay in float: the head and activation-by-activation MatMuls."""
    onnx = _onnx()
    release_memory()  # what the fp32 gate runs freed, before this stage's copies of the weights
    model = onnx.load(str(src))
    _name_nodes(model)
    _drop_equal_qkv_sizes(model)
    if unpack:
        unpack_attention(model)
    always = sorted(set(head_nodes(model)) | set(activation_matmuls(model)))
    try:
        save_streamed(model, dst)
    except ValueError:  # the quantizers read and write single-file graphs (protobuf's 2 GB limit)
        raise ExportError(f"reduced-precision variants need the fp32 graph as one file under 2 GB; {Path(src).name} "
                          f"with its weights is {_weight_gb(model):.1f} GB (the fp32 variant builds; drop --precision)") \
            from None
    del model
    release_memory()
    return always


# The quantizers read and write single-file graphs: protobuf's limit (onnx.checker.MAXIMUM_PROTOBUF).
SINGLE_FILE_BYTES = 2**31
REBUILT_ELSEWHERE = ("fp32", "fp32-native", "bf16")  # precisions that never pass through prepare()


def check_single_file(precisions, weight_bytes: int) -> None:
    """Refuse, before any export, reduced-precision variants of a tower whose weights alone pass the
    single-file limit that :func:`prepare` would hit after the whole fp32 build (ViT-H-14: 2.5 GB)."""
    rebuilt = [p for p in precisions if p not in REBUILT_ELSEWHERE]
    if rebuilt and weight_bytes > SINGLE_FILE_BYTES:
        raise ExportError(f"{', '.join(rebuilt)} need the fp32 graph as one file under 2 GB; this image tower's "
                          f"weights are {weight_bytes / 1e9:.1f} GB (the fp32 variant builds; drop --precision)")


def _weight_gb(model) -> float:
    return sum(t.ByteSize() for t in model.graph.initializer) / 1e9


def release_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the system (glibc's ``malloc_trim``):
    protobuf and ONNX Runtime free model-sized buffers that glibc otherwise keeps resident."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to hand back
        trim = None
    if trim is not None:
        trim(0)


def nodes_of_types(model, op_types: Iterable[str]) -> list[str]:
    """Names of the nodes whose operator type is one of ``op_types`` (``--keep-float``)."""
    types = set(op_types)
    return [n.name for n in model.graph.node if n.op_type in types]


def quantizable_nodes(model, exclude: Iterable[str], keep_float_types: Iterable[str],
                      op_types: Iterable[str] = QUANTIZABLE) -> list[str]:
    """Nodes of ``op_types`` with a constant weight that are not excluded, in graph order."""
    constants = {init.name for init in model.graph.initializer}
    excluded, keep, types = set(exclude), set(keep_float_types), set(op_types)
    return [n.name for n in model.graph.node
            if n.op_type in types and n.op_type not in keep and n.name not in excluded
            and len(n.input) > 1 and n.input[1] in constants]


class PixelReader:
    """ORT calibration data reader over uint8 pixels, ``batch`` images per call."""

    def __init__(self, pixels: np.ndarray, batch: int = 8):
        self.batches = [pixels[i:i + batch] for i in range(0, len(pixels), batch)]
        self.position = 0

    def get_next(self):
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {"pixels": self.batches[self.position - 1]}

    def rewind(self):
        self.position = 0

    def __len__(self):
        return len(self.batches)


@contextlib.contextmanager
def quiet():
    """ORT's quantizers log pre-processing advice at WARNING on every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def int8_dynamic(src: Path, dst: Path, exclude: list[str], cfg: QuantConfig) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = ["MatMul", "Attention"]
    with quiet():
        quantize_dynamic(src, dst, op_types_to_quantize=ops, per_channel=cfg.per_channel, weight_type=QuantType.QInt8,
                         nodes_to_exclude=exclude, extra_options={"MatMulConstBOnly": True})
    return {"method": "dynamic", "weights": "int8 symmetric", "activations": "uint8 per batch",
            "per_channel": cfg.per_channel, "op_types": ops}


_CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def int8_static(src: Path, dst: Path, exclude: list[str], cfg: QuantConfig, calib: np.ndarray,
                cache: Path, fp8: bool = False, symmetric: bool = False) -> dict:
    """QDQ quantization of every MatMul/Conv not in ``exclude``; ranges cached in ``cache``.

    ``symmetric``: s8 activations with zero points of 0, the only int8 QDQ TensorRT accepts.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = getattr(CalibrationMethod, _CALIBRATION[cfg.calibration])
    calibration = cfg.calibration
    if fp8:
        # ORT calibrates float8 scales from the activation distribution only (its std deviation);
        # --calibration applies to int8-static.
        method, calibration = CalibrationMethod.Distribution, "distribution"
        weight_type = activation_type = QuantType.QFLOAT8E4M3FN
    elif symmetric:
        weight_type = activation_type = QuantType.QInt8
    else:
        # u8 activations x s8 weights: the combination x86 int8 GEMM kernels are fastest on.
        weight_type, activation_type = QuantType.QInt8, QuantType.QUInt8
    ops = ["MatMul", "Conv", "Gemm"]
    extra = {"MatMulConstBOnly": True, "WeightSymmetric": True, "ActivationSymmetric": fp8 or symmetric,
             "CalibMovingAverage": False,
             # TensorRT dequantizes int8/fp8 only; ORT would store Conv biases as int32 QDQ.
             "QuantizeBias": not (fp8 or symmetric)}
    if cfg.calibration == "percentile":
        extra["CalibPercentile"] = 99.999
    # MinMax ranges are the min and max over every batch's, so batch size changes nothing but memory: ORT's
    # calibration graph keeps a batch's activations alive until its ReduceMin/Max nodes run (ViT-L-14 at 8
    # images: +8 GiB). The histogram methods keep every activation anyway and depend on the batching.
    reader = PixelReader(calib, batch=1 if method == CalibrationMethod.MinMax else 8)
    with quiet():
        quantize_static(src, dst, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=ops,
                        per_channel=cfg.per_channel and not fp8, weight_type=weight_type,
                        activation_type=activation_type, nodes_to_exclude=exclude, calibrate_method=method,
                        calibration_cache_path=cache, extra_options=extra,
                        # its calibration graph written with onnx.save held 3 more copies of the weights
                        use_external_data_format=True)
    _embed_external_data(dst)
    release_memory()
    return {"method": "static QDQ", "calibration": calibration, "calibration_images": int(len(calib)),
            "weights": "fp8 e4m3" if fp8 else "int8 symmetric",
            "activations": "fp8 e4m3" if fp8 else "int8 symmetric" if symmetric else "uint8",
            "per_channel": cfg.per_channel and not fp8, "op_types": ops}


def _embed_external_data(path: Path) -> None:
    """Rewrite ``path`` (saved with its weights in ``path.name + '.data'``) as one self-contained file."""
    onnx = _onnx()
    data = path.with_name(path.name + ".data")
    if not data.exists():
        return
    model = onnx.load(str(path))  # reads the weights in
    for tensor in model.graph.initializer:
        del tensor.external_data[:]
        tensor.ClearField("data_location")
    save_streamed(model, path)
    data.unlink()


def weight_only(src: Path, dst: Path, exclude: list[str], cfg: QuantConfig, bits: int) -> dict:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    onnx = _onnx()
    with quiet():
        # accuracy_level 4: activations are quantized per block to int8 and the product runs on
        # int8 kernels; measured on ViT-B-32 (2-core AVX2) at batch 1, int4 takes 63 ms this way and
        # 85 ms with fp32 compute (fp32 graph: 76 ms).
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=cfg.block_size, is_symmetric=True,
                                         accuracy_level=4, nodes_to_exclude=exclude)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), False)
    return {"method": "weight-only MatMulNBits", "bits": bits, "block_size": cfg.block_size, "symmetric": True,
            "compute": "int8 activations per block (accuracy_level 4)"}


def scratch_dir(stage: Path) -> tempfile.TemporaryDirectory:
    """A scratch folder inside the bundle's staging directory, removed before the bundle is
    committed; a killed compile leaves it inside the partial directory the next compile removes."""
    return tempfile.TemporaryDirectory(prefix=".quant-", dir=stage)


def fused_op_counts(path: Path) -> dict[str, int]:
    """Counts of ONNX Runtime fused and quantized operators in a graph (what optimization achieved)."""
    from clipfold.compile.stages.optimize import FUSED_OPS, op_counts

    interesting = set(FUSED_OPS) | {"QAttention", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits",
                                    "QuantizeLinear", "DequantizeLinear", "MultiHeadAttention"}
    return {op: n for op, n in sorted(op_counts(path).items()) if op in interesting}
