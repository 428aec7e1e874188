"""Build the block graphs the CPU kernel runs (``python -m clipfold.kernels.graphs.build``).

Each graph scores one block of gallery rows for a batch of queries and keeps each query's top K
(K is an input, so one graph serves every k): ``Gemm(queries, rows^T) -> TopK``. The files are
committed beside this script because the runtime may not import ``onnx``; a test rebuilds them
and checks they are the same.

* fp32: ``Gemm(q, rows, transB=1)`` then TopK over the block.
* fp16: the block is widened to fp32 inside the graph (one pass, in C++) before the Gemm.
* int8: ``MatMulInteger(rows_int8, q_uint8^T)`` (int32 exact), times the per-row scale and the
  query's scale, TopK down the block; the query is quantized to uint8 per query by the caller.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
FILES = {"fp32": "topk_fp32.onnx", "fp16": "topk_fp16.onnx", "int8": "topk_int8.onnx"}


def build(storage: str):
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    k_input = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    outputs = [helper.make_tensor_value_info("scores", f, None),
               helper.make_tensor_value_info("indices", TensorProto.INT64, None)]
    if storage in ("fp32", "fp16"):
        rows_type = f if storage == "fp32" else TensorProto.FLOAT16
        inputs = [helper.make_tensor_value_info("queries", f, ["Q", "D"]),
                  helper.make_tensor_value_info("rows", rows_type, ["B", "D"]), k_input]
        nodes = []
        rows = "rows"
        if storage == "fp16":
            nodes.append(helper.make_node("Cast", ["rows"], ["rows32"], to=f))
            rows = "rows32"
        nodes += [helper.make_node("Gemm", ["queries", rows], ["s"], transB=1),
                  helper.make_node("TopK", ["s", "k"], ["scores", "indices"], axis=1)]
    elif storage == "int8":
        inputs = [helper.make_tensor_value_info("queries_t", TensorProto.UINT8, ["D", "Q"]),  # quantized, transposed
                  helper.make_tensor_value_info("query_zero", TensorProto.UINT8, ["Q"]),
                  helper.make_tensor_value_info("query_scale", f, ["Q"]),
                  helper.make_tensor_value_info("rows", TensorProto.INT8, ["B", "D"]),
                  helper.make_tensor_value_info("row_scale", f, ["B", 1]), k_input]
        nodes = [helper.make_node("MatMulInteger", ["rows", "queries_t", "", "query_zero"], ["dot"]),
                 helper.make_node("Cast", ["dot"], ["dotf"], to=f),
                 helper.make_node("Mul", ["dotf", "row_scale"], ["s1"]),
                 helper.make_node("Mul", ["s1", "query_scale"], ["s"]),  # (B, Q)
                 helper.make_node("TopK", ["s", "k"], ["scores_t", "indices_t"], axis=0),
                 helper.make_node("Transpose", ["scores_t"], ["scores"], perm=[1, 0]),
                 helper.make_node("Transpose", ["indices_t"], ["indices"], perm=[1, 0])]
    else:
        raise ValueError(storage)
    graph = helper.make_graph(nodes, f"clipfold_topk_{storage}", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="clipfold")
    model.ir_version = 9
    return model


def main() -> None:
    for storage, name in FILES.items():
        (HERE / name).write_bytes(build(storage).SerializeToString())
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
