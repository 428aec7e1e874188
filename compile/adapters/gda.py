"""GDA: the training-free Gaussian discriminant head (Wang et al., ICLR 2024, "A hard-to-beat
baseline for training-free CLIP-based adaptation"), with inference as in the official code.

Class means ``mu`` of the unit support features, one shared covariance estimated from the
class-centred features (``main_few_shots.py`` ``run``: both from ``augment_epoch`` augmented passes
over the shots, every pass's unit features stacked with their labels, no plain view; at one shot a
plain view alone leaves a zero covariance), and its precision by the paper's KS estimator
``P = D * pinv((N - 1) S + tr(S) I)`` with ``S`` the unbiased covariance (``torch.cov``). Then

    logits = text_scale * f @ W_zs.T + alpha * (f @ (mu P).T + b),   b_k = log(1/K) - mu_k P mu_k / 2

``text_scale`` is 100 in the official code, whatever the model's own logit scale. Both terms are
linear in ``f``: the head folds to one MatMul with a bias. ``alpha`` is chosen on a validation
split from the official grid, never on test data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from clipfold.compile.adapters.base import Fitted, Support, floats_option
from clipfold.compile.heads.ir import Head, Linear
from clipfold.errors import ConfigError

FIT_OPTIONS = ("alpha_grid",)  # clipfold fit --set alpha_grid=0.01,0.1,1
ALPHA_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
DEFAULT_ALPHA = 0.1  # main_few_shots.py: best_alpha = 0.1 before the search (kept when nothing beats it)


@dataclass(frozen=True)
class GaussianFit:
    weight: torch.Tensor  # (K, D) = (mu P)
    bias: torch.Tensor  # (K,)


def _check_support(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ConfigError(f"support features must be (N, dim) with N labels; got features "
                          f"{tuple(features.shape)} and labels {tuple(labels.shape)}")
    if not torch.isfinite(features).all():
        raise ConfigError("support features hold NaN or inf values; expected finite embeddings")
    counts = torch.bincount(labels, minlength=num_classes)
    if len(counts) > num_classes:
        raise ConfigError(f"support labels go up to {int(labels.max())}, but the head has {num_classes} classes")
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ConfigError(f"classes {empty[:10]} have no support samples; GDA needs at least one per class")
    if num_classes < 2:
        raise ConfigError("GDA needs at least 2 classes")


@torch.no_grad()
def fit_gaussian(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> GaussianFit:
    """Class means, the KS shrinkage precision, and the resulting linear discriminant."""
    _check_support(features, labels, num_classes)
    f = features.double()
    means = torch.stack([f[labels == k].mean(0) for k in range(num_classes)])
    centred = f - means[labels]
    n, dim = centred.shape
    cov = centred.T.cov()
    precision = dim * torch.linalg.pinv((n - 1) * cov + cov.trace() * torch.eye(dim, dtype=f.dtype))
    weight = means @ precision
    prior = torch.full((num_classes,), 1.0 / num_classes, dtype=f.dtype)
    bias = prior.log() - 0.5 * (weight * means).sum(1)
    return GaussianFit(weight.float(), bias.float())


def gda_head(zero_shot: Head, fit: GaussianFit, alpha: float, text_scale: float = 100.0) -> Head:
    """``text_scale * f W_zs + alpha (f W + b)``; ``zero_shot`` holds unit class rows times its scale."""
    (branch,) = zero_shot.linears
    unit_rows = torch.nn.functional.normalize(branch.weight, dim=-1)
    return Head(linears=(Linear(text_scale * unit_rows), Linear(alpha * fit.weight, alpha * fit.bias)),
                activation="softmax", method="gda")


@torch.no_grad()
def select_alpha(zero_shot: Head, fit: GaussianFit, features: torch.Tensor, labels: torch.Tensor,
                 grid: Sequence[float] = ALPHA_GRID, text_scale: float = 100.0) -> tuple[float, dict[float, float]]:
    """The grid value with the best top-1 on held-out ``features`` (first best on ties, as the official loop)."""
    accuracy = {}
    for alpha in grid:
        logits = gda_head(zero_shot, fit, alpha, text_scale).logits(features)
        accuracy[alpha] = float((logits.argmax(1) == labels).float().mean())
    best = max(grid, key=lambda a: (accuracy[a], -grid.index(a)))
    # the official loop starts at best_alpha = 0.1, best_val_acc = 0 and takes `acc > best_val_acc`
    return (best if accuracy[best] > 0 else DEFAULT_ALPHA), accuracy


def _statistics_input(support: Support) -> tuple[torch.Tensor, torch.Tensor]:
    """Every augmented pass's features with their labels, stacked pass by pass as the official ``vecs``."""
    e, n, d = support.augmented.shape
    return support.augmented.reshape(e * n, d), support.labels.repeat(e)


def fit_gda(support: Support) -> Fitted:
    """alpha chosen on the validation split; without one the official loop's initial ``best_alpha`` (0.1)."""
    zero_shot = Head(linears=(Linear(support.logit_scale * support.text),))
    alpha_grid = floats_option(support.options, "alpha_grid", ALPHA_GRID)
    alpha, hyper = DEFAULT_ALPHA, {"alpha_grid": list(alpha_grid), "views": int(support.augmented.shape[0])}
    if support.has_val:
        alpha, grid = select_alpha(zero_shot, fit_gaussian(*_statistics_input(support), support.num_classes),
                                   support.val_features, support.val_labels, alpha_grid)
        hyper["val_accuracy"] = grid[alpha]
    hyper["alpha"] = alpha
    return refit_gda(support, hyper)


def refit_gda(support: Support, hyperparameters: dict) -> Fitted:
    """The head on every shot of ``support`` with alpha already chosen."""
    zero_shot = Head(linears=(Linear(support.logit_scale * support.text),))
    fit = fit_gaussian(*_statistics_input(support), support.num_classes)
    return Fitted(gda_head(zero_shot, fit, hyperparameters["alpha"]), dict(hyperparameters))
