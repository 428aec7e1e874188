"""The GEMM floor of an engine graph: its weight multiplications alone, as plain MatMuls.

A roofline for fp32 engines on the CPU. Every weight multiplication of the graph (``MatMul`` and
``Gemm`` with a constant operand, the packed QKV projection inside a fused ``Attention``, a
``Conv`` as the GEMM it is) is timed as one ONNX Runtime ``MatMul`` of the same ``[M, K] x [K, N]``,
with the row count ``M`` it really runs at, and nothing else: no attention softmax, LayerNorm,
GELU, preprocessing or head. No fp32 engine that does this arithmetic can be faster than this
graph on this machine, so ``eager time / floor time`` is the most any fp32 engine can gain over the
eager reference here, and ``engine time / floor time`` is how far the engine is from the floor.

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

# op -> index of the weight input (a constant [K, N] matrix, or a conv kernel)
WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "FusedMatMul": 1, "Attention": 1, "Conv": 1}


def gemm_shapes(model: Path, feeds: dict[str, np.ndarray], threads: int | None = None) -> list[tuple[int, int, int]]:
    """``(M, K, N)`` of every weight multiplication of ``model`` when run on ``feeds``."""
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(model), load_external_data=False).graph
    dims = {init.name: list(init.dims) for init in graph.initializer}
    weight_of = {node.name: dims[node.input[WEIGHT_INPUT[node.op_type]]] for node in graph.node
                 if node.op_type in WEIGHT_INPUT and len(node.input) > WEIGHT_INPUT[node.op_type]
                 and node.input[WEIGHT_INPUT[node.op_type]] in dims}
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "floor")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's own nodes
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    shapes = []
    for event in events:  # the profile lists activation shapes (constant inputs are pre-packed, not listed)
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        w = weight_of.get(name.removesuffix("_kernel_time"))
        if w is None:
            continue
        args = event["args"]
        x = next(iter(args["input_type_shape"][0].values()))
        if args["op_name"] == "Conv":  # im2col: one row per output position, K = C_in * kernel area
            out = next(iter(args["output_type_shape"][0].values()))
            shapes.append((math.prod(out[:1] + out[2:]), math.prod(w[1:]), w[0]))
        else:  # MatMul/FusedMatMul [K, N]; Gemm (transB or not: the same cost); Attention's packed [D, 3D]
            shapes.append((math.prod(x[:-1]), w[-2], w[-1]))
    if not shapes:
        raise ValueError(f"{model} has no weight multiplication that this floor recognizes")
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
