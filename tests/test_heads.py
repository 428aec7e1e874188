"""The head as data: folding is exact, and a cache branch survives export and verification."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from clipfold import errors
from clipfold.compile.config import VerifyConfig
from clipfold.compile.heads.ir import Cache, Head, Linear
from clipfold.compile.heads.zero_shot import build_zero_shot_head
from clipfold.compile.stages.export import ClassifierGraph, export_onnx, io_specs
from clipfold.compile.stages.fold import fold_input_normalization
from clipfold.compile.stages.load import load_model
from clipfold.compile.stages.verify import eager_reference, encode_pixels, verification_pixels, verify_onnx
from clipfold.compile.tiny import TEMPLATES, data
from clipfold.runtime.preprocess import preprocess


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _random_head(classes=7, dim=16, support=20, activation="softmax"):
    g = torch.Generator().manual_seed(1)
    one_hot = F.one_hot(torch.arange(support) % classes, classes).float()
    return Head(
        linears=(Linear(50 * _unit(classes, dim, seed=2)),
                 Linear(torch.randn(classes, dim, generator=g), torch.randn(classes, generator=g))),
        caches=(Cache(_unit(support, dim, seed=3), one_hot, beta=5.5, alpha=1.7),
                Cache(_unit(support // 2, dim, seed=4), torch.rand(support // 2, classes, generator=g), beta=1.0, alpha=0.3)),
        activation=activation,
    )


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_fold_equals_unfolded_formula(activation):
    head = _random_head(activation=activation)
    f = _unit(64, head.embed_dim, seed=9)
    reference = head.logits(f)
    folded = head.fold().logits(f)
    relative = (folded - reference).abs().max() / reference.abs().max()
    assert relative <= 1e-5, float(relative)
    assert torch.equal(folded.topk(3).indices, reference.topk(3).indices)
    # The caches matter: dropping them changes the logits well beyond the tolerance.
    linear_only = Head(linears=head.linears, activation=activation).logits(f)
    assert (linear_only - reference).abs().max() / reference.abs().max() > 1e-2


def test_folded_matrix_merges_every_branch():
    head = _random_head()
    folded = head.fold()
    # The one-hot cache (20 keys over 7 classes, 2-3 each) folds to a per-class sum over 3 padded
    # slots, so only the dense cache's 10 value rows join the outer GEMM.
    assert folded.weight.shape == (head.embed_dim + 10, head.num_classes)
    assert [c.slots for c in folded.caches] == [3, None] and folded.caches[0].keys.shape == (21, head.embed_dim)
    torch.testing.assert_close(folded.bias, head.linears[1].bias)


@pytest.mark.parametrize("case", ["weighted", "imbalanced", "negative-alpha", "two-per-row"])
def test_cache_reduction_and_its_fallbacks_are_exact(case):
    g = torch.Generator().manual_seed(5)
    classes, dim = 5, 12
    labels = torch.tensor([0] * 12 + [1, 2, 3, 4]) if case == "imbalanced" else torch.arange(15) % classes
    values = F.one_hot(labels, classes).double()
    if case == "weighted":  # APE's refined values: one positive entry per row
        values = values * (0.5 + torch.rand(len(labels), 1, generator=g, dtype=torch.float64))
    if case == "two-per-row":
        values[:, 0] = 0.5
    alpha = -0.7 if case == "negative-alpha" else 2.3
    head = Head(linears=(Linear(30 * _unit(classes, dim, seed=6)),),
                caches=(Cache(_unit(len(labels), dim, seed=7), values.float(), beta=4.0, alpha=alpha),))
    folded = head.fold()
    reduced = case == "weighted"
    assert (folded.caches[0].slots is not None) == reduced
    f = _unit(50, dim, seed=8)
    reference = head.logits(f.double().float()).double()
    assert (folded.logits(f).double() - reference).abs().max() / reference.abs().max() <= 1e-5


def test_zero_shot_head_converts_to_one_linear_branch():
    loaded = load_model("clipfold-tiny")
    zs = build_zero_shot_head(loaded.model, loaded.tokenizer, data.class_names()[:6], TEMPLATES)
    head = zs.to_head()
    assert len(head.linears) == 1 and not head.caches and head.linears[0].bias is None
    f = _unit(5, head.embed_dim, seed=3)
    torch.testing.assert_close(head.scores(f), zs.scores(f))


def test_cache_head_exports_and_verifies(tmp_path):
    """A Tip-Adapter-shaped head (zero-shot + one-hot cache of support features) through ONNX."""
    loaded = load_model("clipfold-tiny")
    labels = data.class_names()
    spec = loaded.preprocess
    zs = build_zero_shot_head(loaded.model, loaded.tokenizer, labels, TEMPLATES)
    support = data.generate(60, seed=31)
    keys = encode_pixels(loaded.model, spec, preprocess([s.image for s in support], spec))
    values = F.one_hot(torch.tensor([labels.index(s.label) for s in support]), len(labels)).float()
    head = Head(linears=zs.to_head().linears, caches=(Cache(keys, values, beta=5.5, alpha=1.0),), method="tip-adapter")

    graph = ClassifierGraph(fold_input_normalization(loaded.model.visual, spec.mean, spec.std), head, 5)
    path = tmp_path / "tip.onnx"
    export_onnx(graph, path, spec.image_size, opset=18)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert "Exp" in ops and "Concat" in ops  # the cache branch is in the graph

    check = verification_pixels(spec, VerifyConfig())
    reference = eager_reference(loaded.model, head, spec, check)
    zero_shot = eager_reference(loaded.model, zs, spec, check)
    assert not np.allclose(reference.scores, zero_shot.scores, atol=1e-3)  # the cache changes scores
    inputs, outputs = io_specs(spec.image_size, 5, loaded.info.embed_dim)
    parity = verify_onnx(path, inputs, outputs, reference, VerifyConfig())
    assert parity.embedding_cosine_min >= 0.99999 and parity.topk_agreement == 1.0


@pytest.mark.parametrize("build, pattern", [
    (lambda: Linear(torch.zeros(3, 4), torch.zeros(4)), r"bias has shape \(4,\), expected \(3,\)"),
    (lambda: Linear(torch.tensor([[float("nan"), 0.0]])), r"1 non-finite values"),
    (lambda: Cache(torch.zeros(5, 4), torch.zeros(6, 3), 1.0, 1.0), r"same N; got keys \(5, 4\) and values \(6, 3\)"),
    (lambda: Head(linears=(Linear(torch.zeros(3, 4)), Linear(torch.zeros(3, 5)))), r"branch 1 has shape \(3, 5\), expected \(3, 4\)"),
    (lambda: Head(linears=(Linear(torch.zeros(3, 4)),), caches=(Cache(torch.zeros(2, 8), torch.zeros(2, 3), 1.0, 1.0),)),
     r"expected keys \(N, 4\) and values \(N, 3\)"),
    (lambda: Head(linears=()), r"at least one linear branch"),
    (lambda: Head(linears=(Linear(torch.zeros(3, 4)),), activation="relu"), r"'relu' is not one of"),
])
def test_bad_heads_are_refused(build, pattern):
    with pytest.raises(errors.ConfigError, match=pattern):
        build()
