"""fp32 parity of the exported graph with open_clip eager, per architecture family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipfold.compile.config import VerifyConfig
from clipfold.compile.heads.zero_shot import build_zero_shot_head
from clipfold.compile.stages.fold import fold_input_normalization
from clipfold.compile.stages.load import load_model
from clipfold.compile.stages.verify import compare, eager_reference
from clipfold.compile.tiny import data
from clipfold.runtime import Engine
from clipfold.runtime.preprocess import preprocess


def _check_manifest_parity(result):
    variant = result.manifest.variant()
    p = variant.parity
    assert p.images == 16
    assert p.embedding_cosine_min >= 0.99999
    assert p.topk_agreement == 1.0
    assert p.max_abs_score_diff <= 1e-4


def _engine_matches_eager(bundle_path, model_name, seed):
    """Independent of compile's own check: fresh images, through the runtime's whole path."""
    engine = Engine.open(bundle_path)
    m = engine.manifest
    loaded = load_model(model_name, m.model.pretrained)
    head = build_zero_shot_head(loaded.model, loaded.tokenizer, m.labels, m.head.templates)
    images = [s.image for s in data.generate(6, seed=seed)]
    pixels = preprocess(images, m.preprocess)
    ref = eager_reference(loaded.model, head, m.preprocess, pixels)
    out = engine.run_pixels(pixels)
    parity, failures = compare(ref, out["scores"], out["indices"], out["embedding"], VerifyConfig())
    assert failures == []
    assert parity.embedding_cosine_min >= 0.99999
    # classify() goes through decoding and preprocessing: same labels as the raw graph run.
    preds = engine.classify(images, k=engine.max_k)
    assert [[p.index for p in row] for row in preds] == out["indices"].tolist()


def test_tiny_parity(tiny_bundle):
    _check_manifest_parity(tiny_bundle)
    assert tiny_bundle.manifest.model.family == "vit"
    _engine_matches_eager(tiny_bundle.path, "clipfold-tiny", seed=123)


@pytest.mark.parametrize("model_name, family", [
    ("ViT-B-32", "vit"),
    ("RN50", "modified-resnet"),
    ("convnext_tiny", "timm"),
])
def test_random_weight_architecture_parity(random_bundle, model_name, family):
    result = random_bundle(model_name)  # compile_random under seed 0, once per session (conftest.py)
    assert result.manifest.model.family == family
    assert result.manifest.model.pretrained is None
    _check_manifest_parity(result)
    engine = Engine.open(result.path)
    assert engine.variant.inputs[0].shape[0] == "batch"
    emb = engine.embed([s.image for s in data.generate(3, seed=5)])
    assert emb.shape == (3, result.manifest.model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("padding", [0, 1])
def test_fold_is_exact_for_padded_and_unpadded_convs(padding):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=padding, bias=padding == 0)
    tower = torch.nn.Sequential(conv, torch.nn.ReLU())
    mean, std = (0.48, 0.45, 0.40), (0.27, 0.26, 0.28)
    folded = fold_input_normalization(tower, mean, std)
    raw = torch.randint(0, 256, (2, 3, 17, 17)).float()
    normalized = (raw / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(folded(raw), tower(normalized), atol=1e-5, rtol=1e-5)
    # The original tower is untouched (fold works on a copy).
    assert tower[0] is conv and conv.in_channels == 3


def test_compare_allows_ties_but_not_wrong_picks():
    ref_scores = np.array([[0.4, 0.4, 0.2]], dtype=np.float32)
    emb = np.eye(1, 4, dtype=np.float32)
    from clipfold.compile.stages.verify import Reference

    ref = Reference(np.zeros((1, 3, 2, 2), np.uint8), emb, ref_scores)
    cfg = VerifyConfig()
    _, fails = compare(ref, np.array([[0.4]], np.float32), np.array([[1]]), emb, cfg)
    assert fails == []  # index 1 ties with index 0
    # Index 2 is a wrong pick; its score is right for index 2, so only the indices check fails.
    _, fails = compare(ref, np.array([[0.2]], np.float32), np.array([[2]]), emb, cfg)
    assert [f.split(":")[0] for f in fails] == ["indices"]
    # A wrong pick reported with a wrong score fails both checks.
    _, fails = compare(ref, np.array([[0.4]], np.float32), np.array([[2]]), emb, cfg)
    assert [f.split(":")[0] for f in fails] == ["scores", "indices"]
    _, fails = compare(ref, np.array([[0.4]], np.float32), np.array([[0]]), -emb, cfg)
    assert any(f.startswith("embedding: min cosine -1") for f in fails)


def test_head_matches_open_clip_zero_shot_classifier():
    """Our ensemble equals open_clip's own build_zero_shot_classifier."""
    from open_clip import build_zero_shot_classifier

    from clipfold.compile.tiny import TEMPLATES

    loaded = load_model("clipfold-tiny")
    labels = data.class_names()[:5]
    head = build_zero_shot_head(loaded.model, loaded.tokenizer, labels, TEMPLATES)
    theirs = build_zero_shot_classifier(
        loaded.model, loaded.tokenizer, labels, [lambda c, t=t: t.format(c) for t in TEMPLATES],
        num_classes_per_batch=5, device="cpu", use_tqdm=False)
    torch.testing.assert_close(head.class_embeddings, theirs.T, atol=1e-6, rtol=1e-5)
    f = F.normalize(torch.randn(2, head.class_embeddings.shape[1]), dim=-1)
    expected = (loaded.model.logit_scale.exp() * f @ theirs).softmax(-1)
    torch.testing.assert_close(head.scores(f), expected)


def test_sigmoid_head_with_logit_bias_parity(tmp_path):
    """SigLIP-style heads: sigmoid(scale * cos + bias), verified through export like softmax."""
    from clipfold.compile.stages.export import ClassifierGraph, export_onnx, io_specs
    from clipfold.compile.stages.verify import verification_pixels, verify_onnx

    loaded = load_model("clipfold-tiny")
    loaded.model.logit_bias = torch.nn.Parameter(torch.tensor([-4.0]))
    labels = data.class_names()[:7]
    head = build_zero_shot_head(loaded.model, loaded.tokenizer, labels, ("a photo of a {}.",))
    assert head.activation == "sigmoid" and head.logit_bias == -4.0
    spec = loaded.preprocess
    graph = ClassifierGraph(fold_input_normalization(loaded.model.visual, spec.mean, spec.std), head.to_head(), 4)
    export_onnx(graph, tmp_path / "m.onnx", spec.image_size, opset=18)
    pixels = verification_pixels(spec, VerifyConfig())
    ref = eager_reference(loaded.model, head, spec, pixels)
    # Sigmoid scores are independent per class: they need not sum to one.
    assert not np.allclose(ref.scores.sum(axis=1), 1.0)
    inputs, outputs = io_specs(spec.image_size, 4, loaded.info.embed_dim)
    parity = verify_onnx(tmp_path / "m.onnx", inputs, outputs, ref, VerifyConfig())
    assert parity.embedding_cosine_min >= 0.99999 and parity.topk_agreement == 1.0


@pytest.mark.parametrize("pool_type, output_tokens, applies", [
    ("tok", False, True),
    ("avg", False, False),  # pooling over all tokens needs every token of the last block
    ("tok", True, False),   # the tower's token outputs are wanted too
])
def test_last_block_for_the_class_token_only(pool_type, output_tokens, applies):
    import copy

    from clipfold.compile.stages.optimize import ClassTokenBlock, keep_class_token_only, use_sdpa_attention

    torch.manual_seed(0)
    visual = load_model("clipfold-tiny").model.visual.eval()
    visual.pool_type, visual.output_tokens = pool_type, output_tokens
    pruned = copy.deepcopy(visual)
    use_sdpa_attention(pruned)
    assert keep_class_token_only(pruned) is applies
    assert isinstance(pruned.transformer.resblocks[-1], ClassTokenBlock) is applies
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        want, got = visual(x), pruned(x)
    want, got = (want[0], got[0]) if output_tokens else (want, got)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_runtime_sessions_keep_the_split_layernorms(tiny_bundle, tmp_path):
    """The fp32 graph carries Add + LayerNormalization (no SkipLayerNormalization, whose ORT CPU
    kernel is ~4x slower), and the runtime's session options stop ONNX Runtime from re-fusing them,
    which its defaults do for some of them."""
    import onnxruntime as ort

    from clipfold.compile.stages.optimize import op_counts
    from clipfold.runtime.backends.onnxruntime import cpu_session_options

    graph = tiny_bundle.path / tiny_bundle.manifest.variant("fp32").file
    assert "SkipLayerNormalization" not in op_counts(graph)

    def skip_layer_norms_after_optimization(options, name):
        options.optimized_model_filepath = str(tmp_path / name)
        ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        return op_counts(tmp_path / name).get("SkipLayerNormalization", 0)

    assert skip_layer_norms_after_optimization(ort.SessionOptions(), "default.onnx") >= 1
    assert skip_layer_norms_after_optimization(cpu_session_options(), "runtime.onnx") == 0


def _skip_layer_norm_chain(bias: bool, epsilon: float | None, names: bool, read_mean: bool = False):
    """Two chained SkipLayerNormalization nodes over [2, 4] inputs; the second reads the first's
    output and residual sum, and the graph outputs the second's."""
    from onnx import TensorProto, helper

    params = [helper.make_tensor(n, TensorProto.FLOAT, [4], [v * k for v in (1.0, -2.0, 3.0, 0.5)])
              for k, n in enumerate(("gamma", "beta", "bias"), 1)]  # distinct, so a swapped input shows
    inputs = ["gamma", "beta", *(["bias"] if bias else [])]
    attributes = {"epsilon": epsilon} if epsilon is not None else {}
    nodes = [helper.make_node("SkipLayerNormalization", [a, b, *inputs], [y, mean, "", total], domain="com.microsoft",
                              name=name if names else "", **attributes)
             for a, b, y, mean, total, name in (("x", "skip", "y1", "mean1", "sum1", "first"),
                                                ("y1", "sum1", "y", "mean", "sum", "second"))]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in ("y", "sum")]
    outputs += [helper.make_tensor_value_info("mean", TensorProto.FLOAT, None)] if read_mean else []
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in ("x", "skip")],
                              outputs, params)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("bias, epsilon, names", [(True, 1e-3, True), (False, None, False), (True, None, False)])
def test_split_skip_layer_norm_computes_what_the_fused_operator_does(bias, epsilon, names):
    """Small-variance rows make epsilon matter: a dropped epsilon, or the standard LayerNorm's
    default in place of the fused operator's 1e-12, would show. Unnamed nodes get unique values."""
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    from clipfold.compile.stages.optimize import split_skip_layer_norm

    fused = _skip_layer_norm_chain(bias, epsilon, names)
    split = ir.serde.deserialize_model(fused)
    assert split_skip_layer_norm(split) == 2
    assert [n.op_type for n in split.graph] == (["Add"] * (2 if bias else 1) + ["LayerNormalization"]) * 2
    proto = ir.serde.serialize_model(split)
    onnx.checker.check_model(proto, full_check=True)  # unique names, typed, ordered
    rng = np.random.default_rng(0)
    feeds = {name: (0.01 * rng.normal(size=(2, 4))).astype(np.float32) for name in ("x", "skip")}
    want, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y", "sum"], feeds)
                 for m in (fused, proto))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)  # the normalized output
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-9)  # the residual sum the next layer reads


def test_split_skip_layer_norm_refuses_when_its_statistics_are_read():
    import onnx_ir as ir

    from clipfold.compile.stages.optimize import split_skip_layer_norm
    from clipfold.errors import ExportError

    with pytest.raises(ExportError, match="second: a SkipLayerNormalization whose mean"):
        split_skip_layer_norm(ir.serde.deserialize_model(_skip_layer_norm_chain(True, 1e-5, True, read_mean=True)))
