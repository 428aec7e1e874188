"""LP++: the fitted head equals the official training loop run in float64, and it adapts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipfold import errors
from clipfold.compile.adapters.base import Support
from clipfold.compile.adapters.lpp import fit_lpp

from .fewshot_helpers import assert_matches_and_adapts, background_task, rel_diff, synthetic_task


def official_lpp(features, labels, text_weights, shots, val_features, val_labels, epochs, seed):
    """LinearProbe_P2.forward transcribed: features (N, D), text_weights (D, K); returns (W, b, alpha)."""
    features, text_weights, val_features = features.double(), text_weights.double(), val_features.double()
    n, d = features.shape
    k = text_weights.shape[1]
    one_hot = F.one_hot(labels, k).double()
    classifier = torch.nn.Linear(d, k, bias=True).double()
    classifier.weight.data = one_hot.T @ features  # compute_centroids: class sums
    g = torch.Generator().manual_seed(seed)
    classifier.bias.data = (torch.rand(k, generator=g, dtype=torch.float64) * 2 - 1) / d ** 0.5
    lr_temp = 4 * n / max(np.linalg.eigh((features.T @ features).numpy())[0])  # scipy's eigh in the official code
    # methods/utils.py compute_centroids_alpha: (one_hot * z_s / one_hot.sum(-2)).sum(1) with z_s the
    # (N, K) text logits: the elementwise product keeps each shot's logit for its own class only.
    z_s = features @ text_weights
    alpha_tilde = (one_hot * z_s / one_hot.sum(0, keepdim=True)).sum(0) * shots
    alpha_vec = (250 / shots * alpha_tilde).mean() * torch.ones(1, k, dtype=torch.float64)
    alpha_vec.requires_grad_(True)
    lr_alpha = n / (torch.sum((features @ text_weights) ** 2, dim=0).max() * 4)
    optimizer = torch.optim.SGD(classifier.parameters(), float(lr_temp), momentum=0.9)
    best_acc, best = 0.0, None
    for epoch in range(epochs):
        logits = classifier(features) + torch.ones(n, 1, dtype=torch.float64) @ alpha_vec * (features @ text_weights)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (epoch + 1) % 10 == 0:
            alpha_vec.data -= lr_alpha * alpha_vec.grad.data
        if len(val_labels):
            with torch.no_grad():
                val_logits = classifier(val_features) + alpha_vec * (val_features @ text_weights)
            acc = float((val_logits.argmax(1) == val_labels).double().mean())
            if acc >= best_acc:
                best_acc = acc
                best = (classifier.weight.detach().clone(), classifier.bias.detach().clone(), alpha_vec.detach().clone())
    if best is None:
        best = (classifier.weight.detach(), classifier.bias.detach(), alpha_vec.detach())
    return best


def official_logits(f, state, text_weights):
    w, b, alpha = state
    return f.double() @ w.T + b + alpha * (f.double() @ text_weights.double())


@pytest.mark.parametrize("with_val", [True, False])
def test_matches_the_official_loop(tiny, with_val):
    views, labels, val_f, val_y, text = synthetic_task(classes=5, dim=32, shots=4, views=2, val_per_class=10, noise=3.2 / 32 ** 0.5, text_noise=2.8 / 32 ** 0.5)
    if not with_val:
        val_f, val_y = val_f[:0], val_y[:0]
    support = Support(views=views, labels=labels, val_features=val_f, val_labels=val_y, text=text, seed=5)
    fitted = fit_lpp(support)
    # The official features are one augmented pass: views[1].
    state = official_lpp(views[1], labels, text.T, 4, val_f, val_y, 300, seed=5)
    g = torch.Generator().manual_seed(2)
    random_f = F.normalize(torch.randn(40, 32, generator=g), dim=-1)
    for f in (random_f, val_f if with_val else random_f[:5]):
        reference = official_logits(f, state, text.T)
        for logits in (fitted.head.logits(f), fitted.head.fold().logits(f)):
            assert rel_diff(logits, reference) <= 1e-5, rel_diff(logits, reference)
            assert torch.equal(logits.topk(2).indices, reference.topk(2).indices)
    hyper = fitted.hyperparameters
    assert hyper["epochs"] == 300 and hyper["view"] == 1
    if with_val:
        assert 0 <= hyper["best_epoch"] <= 299 and 0 <= hyper["val_accuracy"] <= 1
    else:
        assert hyper["best_epoch"] == 299 and "val_accuracy" not in hyper
    assert abs(float(state[2].mean()) - hyper["init_alpha"]) > 1e-6 or hyper["best_epoch"] < 9  # alpha moved


def test_init_alpha_is_each_class_against_its_own_text():
    """calculate_init_alpha (methods/linear_probe_p2.py) over compute_centroids_alpha (methods/utils.py):
    250 / shots * shots * mean_k mean_{i in k} f_i . t_k, not the mean over every (class, text) pair."""
    views, labels, val_f, val_y, text = synthetic_task(classes=5, dim=32, shots=4, views=2, val_per_class=2)
    f = views[1].double()
    one_hot = F.one_hot(labels, 5).double()
    z_s = f @ text.double().T
    shots = 4
    alpha_tilde = (one_hot * z_s / one_hot.sum(0, keepdim=True)).sum(0) * shots
    expected = float((250 / shots * alpha_tilde).mean())
    fitted = fit_lpp(Support(views=views, labels=labels, val_features=val_f, val_labels=val_y, text=text), epochs=1)
    assert abs(fitted.hyperparameters["init_alpha"] - expected) <= 1e-9 * abs(expected)
    all_pairs = float(250 * ((one_hot.T @ z_s) / one_hot.sum(0)[:, None]).mean())
    assert abs(expected - all_pairs) > 0.1 * abs(expected)  # the two starts differ on this task


def test_refit_on_every_shot_stops_at_the_chosen_epoch():
    """After the epoch is chosen on held-out shots, the official loop (LinearProbe_P2.forward) runs on all
    the shots, without validation data, for best_epoch + 1 epochs: its last state is the head."""
    from clipfold.compile.adapters.lpp import refit_lpp

    views, labels, val_f, val_y, text = synthetic_task(classes=5, dim=32, shots=4, views=2, val_per_class=2)
    support = Support(views=views, labels=labels, val_features=val_f[:0], val_labels=val_y[:0], text=text, seed=3)
    refit = refit_lpp(support, {"epochs": 300, "best_epoch": 37, "val_accuracy": 0.8})
    state = official_lpp(views[1], labels, text.T, 4, val_f[:0], val_y[:0], 38, seed=3)
    f = F.normalize(torch.randn(30, 32, generator=torch.Generator().manual_seed(4)), dim=-1)
    reference = official_logits(f, state, text.T)
    assert rel_diff(refit.head.logits(f), reference) <= 1e-5
    assert refit.hyperparameters["best_epoch"] == 37 and refit.hyperparameters["val_accuracy"] == 0.8


def test_on_real_features_beats_zero_shot(tiny):
    zero_shot, support, test_f, test_y = background_task(tiny)
    text, shots_f, shots_y = support.text, support.features, support.labels
    val_f, val_y = support.val_features, support.val_labels
    fitted = fit_lpp(support)
    reference = official_logits(test_f, official_lpp(shots_f, shots_y, text.T, 12, val_f, val_y, 300, 0), text.T)
    assert_matches_and_adapts(fitted.head.fold().logits(test_f), reference, zero_shot.logits(test_f), test_y, 0.05)
    assert np.isfinite(fitted.hyperparameters["val_accuracy"])


def test_bad_support_is_refused():
    views, labels, val_f, val_y, text = synthetic_task(classes=5, dim=32, shots=4, views=2, val_per_class=10, noise=3.2 / 32 ** 0.5, text_noise=2.8 / 32 ** 0.5)
    with pytest.raises(errors.ConfigError, match=r"classes \[4\] have no support samples"):
        fit_lpp(Support(views=views[:, :16], labels=labels[:16], val_features=val_f, val_labels=val_y, text=text))
    with pytest.raises(errors.ConfigError, match="NaN or inf"):
        Support(views=torch.full_like(views, float("nan")), labels=labels, val_features=val_f, val_labels=val_y, text=text)
    with pytest.raises(errors.ConfigError, match="do not match image features of dim 32"):
        Support(views=views, labels=labels, val_features=val_f, val_labels=val_y, text=text[:, :16])
