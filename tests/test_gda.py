"""GDA: equal to the official formula, folded exactly, exported and verified, and it adapts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipfold import errors
from clipfold.compile.adapters.gda import ALPHA_GRID, fit_gaussian, gda_head, select_alpha
from clipfold.compile.config import VerifyConfig
from clipfold.compile.heads.ir import Head, Linear
from clipfold.compile.heads.zero_shot import build_zero_shot_head
from clipfold.compile.stages.export import ClassifierGraph, export_onnx, io_specs
from clipfold.compile.stages.fold import fold_input_normalization
from clipfold.compile.stages.verify import eager_reference, encode_pixels, verification_pixels, verify_onnx
from clipfold.compile.tiny import data
from clipfold.runtime.preprocess import preprocess

BACKGROUNDS = list(data.BACKGROUNDS)


def official_gda_logits(f, support, labels, clip_weights, alpha):
    """The official inference, transcribed unfolded (float64): class means, KS precision, Bayes."""
    f, support, clip_weights = f.double(), support.double(), clip_weights.double()
    k = clip_weights.shape[1]
    mus = torch.cat([support[labels == i].mean(dim=0, keepdim=True) for i in range(k)])
    center = torch.cat([support[labels == i] - mus[i].unsqueeze(0) for i in range(k)])
    cov_inv = center.shape[1] * torch.linalg.pinv(
        (center.shape[0] - 1) * center.T.cov() + center.T.cov().trace() * torch.eye(center.shape[1], dtype=torch.float64))
    ps = torch.ones(k, dtype=torch.float64) / k
    W = torch.einsum("nd, dc -> cn", mus, cov_inv)
    b = ps.log() - torch.einsum("nd, dc, nc -> n", mus, cov_inv, mus) / 2
    return 100.0 * f @ clip_weights + alpha * (f @ W + b)


def test_matches_the_official_formula_and_folds_exactly():
    g = torch.Generator().manual_seed(0)
    classes, dim = 6, 24
    labels = torch.arange(60) % classes
    support = F.normalize(torch.randn(60, dim, generator=g) + 2 * F.one_hot(labels, dim).float(), dim=-1)
    text = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    zero_shot = Head(linears=(Linear(13.0 * text),))  # any model scale: GDA uses 100 on unit rows
    fit = fit_gaussian(support, labels, classes)
    f = F.normalize(torch.randn(50, dim, generator=g), dim=-1)
    for alpha in (0.01, 1.0, 100.0):
        reference = official_gda_logits(f, support, labels, text.T, alpha)
        ours = gda_head(zero_shot, fit, alpha).fold().logits(f).double()
        assert (ours - reference).abs().max() / reference.abs().max() <= 1e-5
        assert torch.equal(ours.topk(3).indices, reference.topk(3).indices)


def _features(loaded, samples):
    f = encode_pixels(loaded.model, loaded.preprocess, preprocess([s.image for s in samples], loaded.preprocess))
    return f, torch.tensor([BACKGROUNDS.index(s.background) for s in samples])


def _shots(n, seed):
    """``n`` samples of each background, from the seeded stream."""
    return data.per_background(n, seed)


def test_beats_zero_shot_on_a_task_the_model_was_not_trained_to_name(tiny, tmp_path):
    """Background type (light/dark/gray/noisy) as the class: 16 shots, alpha from a validation split."""
    zero_shot = build_zero_shot_head(tiny.model, tiny.tokenizer, [f"{b} background" for b in BACKGROUNDS],
                                     ("a photo on a {}.", "a {}.")).to_head()
    test_f, test_y = _features(tiny, data.generate(400, seed=4243))
    val_f, val_y = _features(tiny, _shots(8, 98))
    support_f, support_y = _features(tiny, _shots(16, 11))
    fit = fit_gaussian(support_f, support_y, len(BACKGROUNDS))
    alpha, grid = select_alpha(zero_shot, fit, val_f, val_y)
    assert set(grid) == set(ALPHA_GRID)
    head = gda_head(zero_shot, fit, alpha)

    def accuracy(h):
        return float((h.logits(test_f).argmax(1) == test_y).float().mean())

    zs, adapted = accuracy(zero_shot), accuracy(head)
    assert adapted >= zs + 0.10 and adapted >= 0.9, (zs, adapted)  # measured: 0.795 -> 0.972

    # The fitted head exports to one graph and verifies against eager like any head.
    spec = tiny.preprocess
    graph = ClassifierGraph(fold_input_normalization(tiny.model.visual, spec.mean, spec.std), head, 2)
    assert graph.head.has_bias
    export_onnx(graph, tmp_path / "gda.onnx", spec.image_size, opset=18)
    reference = eager_reference(tiny.model, head, spec, verification_pixels(spec, VerifyConfig()))
    inputs, outputs = io_specs(spec.image_size, 2, tiny.info.embed_dim)
    parity = verify_onnx(tmp_path / "gda.onnx", inputs, outputs, reference, VerifyConfig())
    assert parity.topk_agreement == 1.0


@pytest.mark.parametrize("features, labels, classes, pattern", [
    (torch.randn(6, 4), torch.tensor([0, 0, 0, 2, 2, 2]), 3, r"classes \[1\] have no support samples"),
    (torch.randn(4, 4), torch.zeros(4, dtype=torch.long), 1, r"at least 2 classes"),
    (torch.full((4, 4), float("nan")), torch.tensor([0, 0, 1, 1]), 2, r"NaN or inf"),
    (torch.randn(4, 4), torch.tensor([0, 1, 2, 3]), 2, r"labels go up to 3, but the head has 2 classes"),
    (torch.randn(4, 4), torch.tensor([0, 1]), 2, r"N labels; got features \(4, 4\) and labels \(2,\)"),
])
def test_bad_support_is_refused(features, labels, classes, pattern):
    with pytest.raises(errors.ConfigError, match=pattern):
        fit_gaussian(features, labels, classes)


def test_one_shot_statistics_come_from_the_augmented_passes():
    """main_few_shots.py run(): vecs = unit features of augment_epoch passes of train_tranform over the
    shots (no plain view), labels repeated per pass; mus and the KS covariance from those. At 1 shot a
    plain view alone has zero covariance and leaves zero-shot; the augmented passes do not."""
    from clipfold.compile.adapters.gda import fit_gda

    from .fewshot_helpers import raw_views, support_of_raw

    raw, labels, text = raw_views(shots=1, views=11)
    fitted = fit_gda(support_of_raw(raw, labels, text))
    vecs = F.normalize(raw[1:].reshape(-1, raw.shape[-1]), dim=-1)  # 10 passes, each stacked as the loader yields
    vec_labels = labels.repeat(10)
    f = F.normalize(torch.randn(30, raw.shape[-1], generator=torch.Generator().manual_seed(1)), dim=-1)
    reference = official_gda_logits(f, vecs, vec_labels, text.T, 0.1)  # no val: best_alpha = 0.1
    ours = fitted.head.fold().logits(f).double()
    assert fitted.hyperparameters["alpha"] == 0.1
    assert (ours - reference).abs().max() / reference.abs().max() <= 1e-5
    assert torch.equal(ours.topk(2).indices, reference.topk(2).indices)
    assert (reference - 100.0 * f.double() @ text.double().T).abs().max() > 1e-2  # not zero-shot
