"""The GEMM floor of an engine graph: its weight multiplications alone, as plain MatMuls.

A roofline for fp32 engines on the CPU. Every weight multiplication of the graph (``MatMul`` and
``Gemm`` with a constant operand, the packed QKV projection inside a fused ``Attention``, a
``Conv`` as the GEMM it is) is timed as one ONNX Runtime ``MatMul`` of the same ``[M, K] x [K, N]``,
with the row count ``M`` it really runs at (the projection and head multiplications included),
and nothing else: no attention softmax, LayerNorm, GELU or preprocessing. An fp32 engine built
on ONNX Runtime's MatMul cannot beat this graph on this machine, so ``eager time / floor time`` is
the most such an engine can gain over the eager reference here, and ``engine time / floor time``
is how far the engine is from the floor. (A faster fp32 GEMM would lower the floor: ONNX Runtime's
MatMul measured 172-186 GFLOP/s on these shapes with warm caches, against 150-159 in this graph.)

The row counts are read from one profiled run of the engine graph itself (ONNX Runtime records
every node's input shapes), so the floor follows the graph: a class-token-only last block
contributes its ``M = 1`` rows.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np

WEIGHT_OPS = ("MatMul", "FusedMatMul", "Gemm", "Attention", "Conv")


def _activation(listed: list[list[int]], weight: list[int]) -> list[int]:
    """The activation among a node's profiled input shapes (pre-packed weights are not listed;
    a weight ONNX Runtime did not pre-pack is, and is told apart by its shape)."""
    candidates = [shape for shape in listed[:2] if shape != weight]
    if not candidates:
        raise ValueError(f"cannot tell the activation from the weight {weight} among inputs {listed}")
    return candidates[0]


Weights = dict  # node name -> (weight input slot, weight dims, node)


def _weight_nodes(model: Path, graph) -> Weights:
    """The nodes of ``WEIGHT_OPS`` with a constant operand, by (unique) name."""
    dims = {init.name: list(init.dims) for init in graph.initializer}
    weights: Weights = {}
    for node in graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        slots = [i for i in ((1, 0) if node.op_type in ("MatMul", "FusedMatMul") else (1,))
                 if i < len(node.input) and node.input[i] in dims]
        if not slots:
            continue
        if not node.name or node.name in weights:
            raise ValueError(f"{model}: a {node.op_type} node has an empty or repeated name ({node.name!r}); "
                             "the profile could not be matched to it")
        weights[node.name] = (slots[0], dims[node.input[slots[0]]], node)
    return weights


def _profile(model: Path, feeds: dict[str, np.ndarray], threads: int | None) -> list[dict]:
    """ONNX Runtime's profile events of one run of the graph's own (unoptimized) nodes."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "floor")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's own nodes
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        return json.loads(Path(session.end_profiling()).read_text())


def _weight_events(events: list[dict]):
    """(node name, event args) of each profiled kernel run of a ``WEIGHT_OPS`` node."""
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") \
                and args.get("op_name") in WEIGHT_OPS:
            yield event["name"].removesuffix("_kernel_time"), args


def _shape(args: dict, slot: int, w: list[int], node) -> tuple[int, int, int]:
    """``(M, K, N)`` of one profiled weight node, from its input (and output) shapes."""
    x = _activation([next(iter(shape.values())) for shape in args["input_type_shape"]], w)
    if args["op_name"] == "Conv":  # im2col: one row per output position, K = C_in/groups * kernel area
        out = next(iter(args["output_type_shape"][0].values()))
        return math.prod(out[:1] + out[2:]), math.prod(w[1:]), w[0]
    if args["op_name"] == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return (x[1] if trans_a else x[0], *((w[1], w[0]) if trans_b else (w[0], w[1])))
    if slot == 0:  # W @ x: W [M, K], x [..., K, N]
        return w[-2], w[-1], math.prod(x[:-2]) * x[-1]
    return math.prod(x[:-1]), w[-2], w[-1]  # x @ W with W [K, N]; Attention's packed QKV weight [D, 3D]


def gemm_shapes(model: Path, feeds: dict[str, np.ndarray], threads: int | None = None) -> list[tuple[int, int, int]]:
    """``(M, K, N)`` of every weight multiplication of ``model`` when run on ``feeds``.

    Raises ``ValueError`` rather than leave out a multiplication it cannot size (a missed GEMM
    would lower the floor): weight nodes need unique names to be found in the profile, and every
    profiled node of the kinds above must be either sized here or an activation x activation MatMul.
    """
    import onnx

    weights = _weight_nodes(model, onnx.load(str(model), load_external_data=False).graph)
    shapes, seen = [], set()
    for name, args in _weight_events(_profile(model, feeds, threads)):
        if name not in weights:
            if args["op_name"] in ("MatMul", "FusedMatMul"):
                continue  # activation x activation (attention scores): not a weight GEMM
            raise ValueError(f"{model}: {args['op_name']} node {name!r} has no constant weight this floor can size")
        seen.add(name)
        shapes.append(_shape(args, *weights[name]))
    if missed := set(weights) - seen:
        raise ValueError(f"{model}: weight nodes {sorted(missed)[:5]} did not appear in the profiled run")
    return shapes


def floor_model(shapes: list[tuple[int, int, int]], path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the floor graph (one independent MatMul per shape) to ``path``; returns its feeds."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, weights, inputs, outputs, feeds = [], [], {}, [], {}
    for i, (m, k, n) in enumerate(shapes):
        x = f"x_{m}_{k}"
        if x not in inputs:
            inputs[x] = helper.make_tensor_value_info(x, TensorProto.FLOAT, [m, k])
            feeds[x] = rng.standard_normal((m, k), dtype=np.float32)
        weights.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [m, n]))
    graph = helper.make_graph(nodes, "gemm_floor", list(inputs.values()), outputs, weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path), save_as_external_data=True, location=Path(path).name + ".data")
    return feeds


def gflop(shapes: list[tuple[int, int, int]]) -> float:
    return sum(2 * m * k * n for m, k, n in shapes) / 1e9
