"""Large label heads scored by the top-k kernel instead of a dense MatMul + TopK in the graph."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from clipfold import errors
from clipfold.cli import main
from clipfold.compile.config import CompileConfig
from clipfold.compile.pipeline import compile_bundle
from clipfold.kernels import Gallery
from clipfold.runtime import SCHEMA_VERSION, Engine
from clipfold.runtime.backends.kernel_head import KernelHead

from .engine_parity import assert_engine_matches


def _labels(n: int) -> tuple[str, ...]:
    colours = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
    shapes = ("circle", "square", "triangle", "star", "cross", "ring", "bar", "dot")
    return tuple(f"{c} {s} {i}" for i in range(n // 64 + 1) for c in colours for s in shapes)[:n]


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """The tiny model with 3,000 zero-shot labels: in the graph, and routed to the kernel."""
    tmp = tmp_path_factory.mktemp("kernel-head")
    labels = _labels(3000)
    dense = compile_bundle(CompileConfig(labels=labels, out=tmp / "dense.bundle", templates="label", top_k=7,
                                         kernel_head_classes=None))
    routed = compile_bundle(CompileConfig(labels=labels, out=tmp / "routed.bundle", templates="label", top_k=7,
                                          kernel_head_classes=2048))
    return dense, routed


def test_a_large_head_leaves_the_graph_and_scores_the_same(large, tiny):
    dense, routed = large
    assert dense.manifest.head.kernel is None and routed.manifest.head.kernel == "head"
    graph = onnx.load(str(routed.path / "model.onnx"), load_external_data=False)
    ops = {node.op_type for node in graph.graph.node}
    assert [o.name for o in graph.graph.output] == ["embedding"] and "TopK" not in ops and "Softmax" not in ops
    head = Gallery.open(routed.path / "head")
    width = -(-(tiny.info.embed_dim + 1) // 16) * 16  # the bias column, then zeros to a 64-byte row
    assert (len(head), head.dim, head.storage) == (3000, width, "fp32")
    assert not np.asarray(head.shards[0].rows)[:, tiny.info.embed_dim + 1:].any()
    assert "head/gallery.json" in routed.manifest.files and routed.manifest.variant().parity.topk_agreement == 1.0

    a, b = Engine.open(dense.path), Engine.open(routed.path)
    pixels = np.random.default_rng(3).integers(0, 256, (9, 3, 64, 64), dtype=np.uint8)
    out_a, out_b = a.run_pixels(pixels), b.run_pixels(pixels)
    assert set(out_b) == {"scores", "indices", "embedding"} and out_b["indices"].shape == (9, 7)
    assert np.allclose(out_a["scores"], out_b["scores"], atol=1e-6)  # softmax over all 3,000 classes
    assert np.allclose(out_a["embedding"], out_b["embedding"], atol=1e-6)
    # Same picks, up to ties: each routed index scores what the dense engine's pick at that rank scores.
    full = out_b["embedding"] @ np.asarray(head.shards[0].rows)[:, :tiny.info.embed_dim].T
    assert np.allclose(np.take_along_axis(full, out_b["indices"], 1), np.take_along_axis(full, out_a["indices"], 1),
                       atol=1e-5)


def test_gda_head_with_bias_and_int8_variant_through_the_kernel(gda_task, tiny, tmp_path):
    """A fitted head (weights and a bias per class) and a quantized variant, gated through the kernel."""
    tmp, adapter, test = gda_task
    result = compile_bundle(CompileConfig(labels=None, adapter=adapter, out=tmp_path / "gda.bundle",
                                          kernel_head_classes=2, precisions=("int8-dynamic",)))
    manifest = result.manifest
    assert manifest.head.kernel == "head" and [v.name for v in manifest.variants] == ["fp32", "int8-dynamic"]
    assert manifest.variant("int8-dynamic").gate.top1_agreement >= 0.99
    from clipfold.compile.adapters.store import load_adapter

    head = load_adapter(adapter).head
    assert assert_engine_matches(result.path, manifest.preprocess, lambda x: head.logits(
        torch.nn.functional.normalize(tiny.model.encode_image(x), dim=-1))) <= 1e-5


def test_non_linear_heads_stay_in_the_graph(gda_task, tmp_path):
    """A cache head (Tip-Adapter) is not a similarity: it is compiled into the graph as before."""
    from clipfold.compile.adapters.fit import FitConfig, fit_adapter

    tmp, _, _ = gda_task
    tip = tmp_path / "tip.safetensors"
    fit_adapter(FitConfig("tip-adapter", tmp / "support", tip, templates=("a {}.",), cache_dir=None))
    messages = []
    result = compile_bundle(CompileConfig(labels=None, adapter=tip, out=tmp_path / "tip.bundle", kernel_head_classes=2),
                            progress=messages.append)
    assert result.manifest.head.kernel is None
    assert any("stays in the graph" in m for m in messages)


def test_sigmoid_heads_and_a_damaged_head_folder(tmp_path):
    rng = np.random.default_rng(0)
    rows = np.zeros((500, 16), np.float32)
    rows[:, :9] = rng.standard_normal((500, 9))  # 8 weights, the bias, zero padding
    Gallery.from_array(rows).save(tmp_path / "head")
    emb = rng.standard_normal((4, 8)).astype(np.float32)
    out = KernelHead(tmp_path / "head", "sigmoid", 5, 500).run(emb)
    logits = emb @ rows[:, :8].T + rows[:, 8]
    expected = np.sort(1 / (1 + np.exp(-logits)), axis=1)[:, ::-1][:, :5]
    assert np.allclose(out["scores"], expected, atol=1e-6)
    with pytest.raises(errors.BundleError, match="16-dim embeddings need 32"):
        KernelHead(tmp_path / "head", "sigmoid", 5, 500).run(np.ones((1, 16), np.float32))
    with pytest.raises(errors.BundleError, match="has 500 rows for 400 labels"):
        KernelHead(tmp_path / "head", "softmax", 5, 400)
    (tmp_path / "head" / "0000.rows.npy").unlink()
    with pytest.raises(errors.BundleError, match="cannot be opened.*missing"):
        KernelHead(tmp_path / "head", "softmax", 5, 500)


def test_cli_threshold_option(large, capsys):
    _, routed = large
    assert main(["inspect", str(routed.path)]) == 0
    assert "scored by the top-k kernel from head/" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["compile", "--labels", "a,b", "--out", "x", "--kernel-head-classes", "0"])
    assert "expected at least 1 class" in capsys.readouterr().err
    manifest = json.loads((routed.path / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["head"]["kernel"] == "head"
