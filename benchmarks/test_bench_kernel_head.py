"""Where a label head should leave the graph: the dense head (MatMul + bias + Softmax + TopK in
ONNX Runtime, as compiled into a bundle's graph) against the kernel head (runtime/backends/kernel_head.py:
the fused top-k kernel with the softmax normalizer), from unit embeddings to top-10
probabilities, D=512, at 8k / 128k / 512k classes and batch 1 / 32, in the same run.

Pairs: ``head_c{C}_b{B}`` (reference: dense graph, candidate: kernel head; > 1 means the kernel
head is faster). Memory is not compared here: ONNX Runtime keeps its B x C logits and
probabilities in an arena that outlives the call, so a per-call high-water mark reads 0 for both.
``compile --kernel-head-classes`` defaults to 2^20 (see compile/config.py for why).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipfold.kernels import Gallery
from clipfold.kernels.topk.launcher import kernel_isa
from clipfold.runtime.backends.kernel_head import KernelHead

D, K = 512, 10
CLASSES = (8192, 131072, 524288)
BATCHES = (1, 32)


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    made = {}
    for c in CLASSES:
        weight = (rng.standard_normal((D, c)) * (100.0 / np.sqrt(D))).astype(np.float32)  # logit scale folded in
        bias = rng.standard_normal(c).astype(np.float32)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["embedding", "weight"], ["mm"]),
             helper.make_node("Add", ["mm", "bias"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
             helper.make_node("TopK", ["probs", "k"], ["scores", "indices"], axis=-1)],
            "dense_head",
            [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", D])],
            [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", K]),
             helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", K])],
            [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias"),
             numpy_helper.from_array(np.array([K], np.int64), "k")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        folder = Path(tmp_path_factory.mktemp(f"head{c}"))
        onnx.save(model, str(folder / "dense.onnx"))
        dense = ort.InferenceSession(str(folder / "dense.onnx"), providers=["CPUExecutionProvider"])
        rows = np.zeros((c, D + 16), np.float32)  # as compile writes them: weights, bias, zeros to 64 bytes
        rows[:, :D], rows[:, D] = weight.T, bias
        Gallery.from_array(rows).save(folder / "head")
        made[c] = (dense, KernelHead(folder / "head", "softmax", K, c))
    return made


def _embeddings(batch: int) -> np.ndarray:
    x = np.random.default_rng(batch).standard_normal((batch, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("classes", CLASSES)
def test_dense_head(benchmark, heads, classes, batch):
    dense, kernel = heads[classes]
    emb = _embeddings(batch)
    scores, _ = dense.run(None, {"embedding": emb})
    # The same probabilities (logits of ~20 differ in the last fp32 bits with summation order).
    assert np.allclose(scores, kernel.run(emb)["scores"], rtol=1e-4, atol=1e-6)
    benchmark.extra_info.update(pairs={f"head_c{classes}_b{batch}": "reference"})
    benchmark.pedantic(dense.run, args=(None, {"embedding": emb}), rounds=15, warmup_rounds=2)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("classes", CLASSES)
def test_kernel_head(benchmark, heads, classes, batch):
    emb = _embeddings(batch)
    benchmark.extra_info.update(pairs={f"head_c{classes}_b{batch}": "candidate"}, isa=kernel_isa())
    benchmark.pedantic(heads[classes][1].run, args=(emb,), rounds=15, warmup_rounds=2)
