"""ProKeR: the fitted head equals the official closed form and grid search, and it adapts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipfold import errors
from clipfold.compile.adapters.base import Support
from clipfold.compile.adapters.proker import fit_proker

from .fewshot_helpers import assert_matches_and_adapts, background_task, rel_diff, synthetic_task


def official_proker(vecs, labels, val_features, val_labels, test_features, clip_weights, hp=None):
    """trainers/proker.py ProKeR transcribed in float64; clip_weights (D, C); hp=None runs the grid."""
    kernel = lambda x, y, beta: (-beta * (1 - x @ y.T)).exp()  # noqa: E731  RBF_Kernel
    vecs, clip_weights = vecs.double(), clip_weights.double()
    cache = F.one_hot(labels, num_classes=len(labels.unique())).double()
    logits_text_shots = vecs @ clip_weights
    eye = torch.eye(vecs.size(0), dtype=torch.float64)
    if hp is None:
        best_val_acc = 0
        val_text = val_features.double() @ clip_weights
        for beta in torch.linspace(0.5, 3, 20).double():
            k_ss, k_xs = kernel(vecs, vecs, beta), kernel(val_features.double(), vecs, beta)
            for lmbda in torch.linspace(0.001, 1, 10).double():
                alpha_i = torch.linalg.solve(1 / lmbda * k_ss + eye, cache - logits_text_shots)
                acc = float(((val_text + k_xs @ alpha_i).argmax(1) == val_labels).double().mean())
                if acc > best_val_acc:
                    best_val_acc, hp = acc, (float(beta), float(lmbda))
    beta, lmbda = hp
    alpha_i = torch.linalg.solve(1 / lmbda * kernel(vecs, vecs, beta) + eye, cache - logits_text_shots)
    test_features = test_features.double()
    return test_features @ clip_weights + kernel(test_features, vecs, beta) @ alpha_i, hp


def test_matches_the_official_grid_search_and_closed_form():
    views, labels, val_f, val_y, text = synthetic_task()
    fitted = fit_proker(Support(views=views, labels=labels, val_features=val_f, val_labels=val_y, text=text))
    e, n, d = views.shape
    # the augment loop appends whole passes of the training transform; views[0] is the plain view, not one
    vecs, vec_labels = views[1:].reshape((e - 1) * n, d), labels.repeat(e - 1)
    test_f = F.normalize(torch.randn(50, d, generator=torch.Generator().manual_seed(9)), dim=-1)
    reference, (beta, lmbda) = official_proker(vecs, vec_labels, val_f, val_y, test_f, text.T)
    hyper = fitted.hyperparameters
    assert hyper["beta"] == pytest.approx(beta, abs=1e-6) and hyper["lmbda"] == pytest.approx(lmbda, abs=1e-6)
    assert hyper["cache_size"] == (e - 1) * n and 0 < hyper["val_accuracy"] <= 1
    for logits in (fitted.head.logits(test_f), fitted.head.fold().logits(test_f)):
        assert rel_diff(logits, reference) <= 1e-5, rel_diff(logits, reference)
        assert torch.equal(logits.topk(2).indices, reference.topk(2).indices)


@pytest.mark.parametrize("shots, hp", [(1, (3.0, 0.05)), (3, (2.6, 0.05)), (16, (1.7, 0.1))])
def test_without_validation_uses_the_official_imagenet_values(shots, hp):
    views, labels, val_f, val_y, text = synthetic_task(shots=shots, views=1)
    fitted = fit_proker(Support(views=views, labels=labels, val_features=val_f[:0], val_labels=val_y[:0], text=text))
    assert (fitted.hyperparameters["beta"], fitted.hyperparameters["lmbda"]) == hp
    reference, _ = official_proker(views[0], labels, None, None, val_f, text.T, hp=hp)
    assert rel_diff(fitted.head.fold().logits(val_f), reference) <= 1e-5


def test_on_real_features_beats_zero_shot(tiny):
    zero_shot, support, test_f, test_y = background_task(tiny)
    text, shots_f, shots_y = support.text, support.features, support.labels
    val_f, val_y = support.val_features, support.val_labels
    fitted = fit_proker(support)
    reference, _ = official_proker(shots_f, shots_y, val_f, val_y, test_f, text.T)
    assert_matches_and_adapts(fitted.head.fold().logits(test_f), reference, zero_shot.logits(test_f), test_y, 0.05)


def test_a_class_without_shots_is_refused():
    views, labels, val_f, val_y, text = synthetic_task()
    keep = labels != 2
    with pytest.raises(errors.ConfigError, match=r"classes \[2\] have no support samples"):
        fit_proker(Support(views=views[:, keep], labels=labels[keep], val_features=val_f, val_labels=val_y, text=text))
