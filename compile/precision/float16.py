"""Mixed fp16: ONNX Runtime's float16 converter, then the clean-up it needs to be exact and valid.

The converter blocks the listed operator types (they stay fp32) but still routes tensors between
two blocked nodes through an fp16 Cast pair, which only rounds (e.g. the logits before softmax:
a 0.4 % step at logit 30), wraps fp32 weights of blocked nodes in no-op Casts, declares some
fp32 initializers as fp16 in ``value_info`` and leaves nodes out of topological order. ORT
tolerates the last two, the ONNX checker and other tools do not; all four are repaired here.
"""

from __future__ import annotations

import collections
from pathlib import Path

from clipfold.compile.precision.config import QuantConfig

# Always fp32: reductions and normalization (the L2 norm included: ReduceL2, Clip, Expand, Div),
# softmax/sigmoid and top-k, and attention (its softmax runs inside).
ALWAYS_FP32 = ("ReduceL2", "ReduceMean", "ReduceSum", "Softmax", "TopK", "Sigmoid", "Div", "Clip", "Expand",
               "Attention", "MultiHeadAttention")


def convert(src: Path, dst: Path, exclude: list[str], cfg: QuantConfig, residual_fp32: bool = False) -> dict:
    """``residual_fp32``: the residual stream stays fp32 too (:func:`_residual_stream`: the
    residual and bias adds LayerNorms read, and the slices between), as ONNX Runtime's fused
    ``SkipLayerNormalization`` kept it; the ONNX Runtime fp16 variant asks for it."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from clipfold.compile.precision.quantize import quiet

    blocked = sorted(set(cfg.keep_float) | set(ALWAYS_FP32))
    model = onnx.load(str(src))
    residual = _residual_stream(model) if residual_fp32 else []
    exclude = sorted(set(exclude) | set(residual))
    with quiet():
        model = convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked, node_block_list=exclude)
    del model.graph.value_info[:]  # partly wrong after conversion; optional, ORT infers what it needs
    kept = {n.name for n in model.graph.node if n.op_type in blocked or n.name in set(exclude)}
    round_trips = _drop_round_trips(model, kept)
    noops = _drop_noop_casts(model, kept)
    _toposort(model)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(dst))
    return {"method": "mixed fp16", "kept_fp32_op_types": blocked, "fp32_round_trips_removed": round_trips,
            "noop_casts_removed": noops, **({"residual_nodes_kept_fp32": len(residual)} if residual_fp32 else {})}


# Operators that only move or select elements: the residual stream passes through them unchanged
# (the class-token slice before a last block that runs for the class token only, pooling gathers).
_MOVES = ("Slice", "Gather", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Flatten")


def _residual_stream(model) -> list[str]:
    """Names of the nodes of the residual stream: walking back from every LayerNormalization's
    input through element-moving operators (``_MOVES``), each ``Add`` reached and everything
    between; from an ``Add``, on through both its inputs (the previous residual, a bias add)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    stream: dict[int, object] = {}
    pending = [n.input[0] for n in model.graph.node if n.op_type == "LayerNormalization"]
    while pending:
        node, moved = producers.get(pending.pop()), []
        while node is not None and node.op_type in _MOVES:
            moved.append(node)
            node = producers.get(node.input[0])
        if node is None or node.op_type != "Add":
            continue
        seen = id(node) in stream
        for n in (*moved, node):
            stream[id(n)] = n
        if not seen:
            pending.extend(node.input)
    if any(not n.name for n in stream.values()):
        raise ValueError("the residual stream's nodes need names to be kept in fp32")
    return sorted({n.name for n in stream.values()})


def _cast_to(node) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


def _float_tensors(model, kept: set[str]) -> set[str]:
    """Tensors known to be fp32: fp32 graph inputs and initializers, outputs of Casts to fp32, and
    the float outputs of the nodes kept in fp32 (``kept``; TopK's second output is its indices)."""
    from onnx import TensorProto

    known = {i.name for i in model.graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    for node in model.graph.node:
        if node.name in kept and node.op_type not in ("Cast", "Shape"):
            known.update(out for j, out in enumerate(node.output) if not (node.op_type == "TopK" and j == 1))
    known |= {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
    known |= {n.output[0] for n in model.graph.node if _cast_to(n) == TensorProto.FLOAT}
    return known


def _consumers(model) -> dict[str, list]:
    out: dict[str, list] = collections.defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            out[name].append(node)
    return out


def _bypass(model, cast, source: str, outputs: set[str], consumers) -> None:
    """Make ``cast``'s consumers read ``source``; a graph output keeps its name through an Identity."""
    if cast.output[0] in outputs:
        cast.op_type = "Identity"
        del cast.attribute[:]
        cast.input[0] = source
        return
    for node in consumers.get(cast.output[0], []):
        for i, name in enumerate(node.input):
            if name == cast.output[0]:
                node.input[i] = source
    model.graph.node.remove(cast)


def _drop_round_trips(model, kept: set[str]) -> int:
    """fp32 -> fp16 -> fp32 Cast pairs between fp32 nodes; only pairs whose source is known fp32
    (a uint8 input cast to fp16 is a real conversion and stays). The fp32 readers of such a Cast
    read its source directly; the Cast to fp16 stays only for its fp16 readers."""
    from onnx import TensorProto

    floats, outputs, consumers = _float_tensors(model, kept), {o.name for o in model.graph.output}, _consumers(model)
    dropped = 0
    for first in list(model.graph.node):
        if _cast_to(first) != TensorProto.FLOAT16 or first.input[0] not in floats:
            continue
        users = consumers.get(first.output[0], [])
        backs = [u for u in users if _cast_to(u) == TensorProto.FLOAT]
        for second in backs:
            _bypass(model, second, first.input[0], outputs, consumers)
        dropped += len(backs)
        if backs and len(backs) == len(users) and first.output[0] not in outputs:
            model.graph.node.remove(first)
    return dropped


def _drop_noop_casts(model, kept: set[str]) -> int:
    """Casts to fp32 of tensors that already are fp32 (the converter wraps blocked nodes' weights)."""
    from onnx import TensorProto

    floats = _float_tensors(model, kept)
    outputs, consumers = {o.name for o in model.graph.output}, _consumers(model)
    dropped = 0
    for node in list(model.graph.node):
        if _cast_to(node) == TensorProto.FLOAT and node.input[0] in floats:
            _bypass(model, node, node.input[0], outputs, consumers)
            dropped += 1
    return dropped


def _toposort(model) -> None:
    """Kahn's algorithm over the top-level graph, stable in the original order."""
    available = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError(f"graph has a cycle or a missing input near {pending[0].name}")
        for node in ready:
            available.update(node.output)
            ordered.append(node)
        done = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in done]
    del model.graph.node[:]
    model.graph.node.extend(ordered)
