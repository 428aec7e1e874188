"""LP++ (Huang et al., CVPR 2024, "LP++: A Surprisingly Strong Linear Probe for Few-Shot CLIP"),
trained as in the official code (FereshteShakeri/FewShot-CLIP-Strong-Baseline,
``methods/linear_probe_p2.py``: ``LinearProbe_P2.forward``, ``calculate_lr_w``,
``calculate_init_alpha``, ``calculate_lr_alpha``; ``methods/utils.py`` ``compute_centroids``;
``configs/base.yaml``: 300 epochs).

A linear probe on the image features plus class-wise multiples of the text logits:

    logits = f @ W.T + b + alpha ⊙ (f @ T.T)            T: unit text rows, no logit scale

which folds into one linear branch ``(W + alpha[:, None] T, b)``. Everything is full batch on the
N shot features ``F`` with the official data-driven constants:

* ``W`` starts at the class *sums* of the features (``compute_centroids`` does not divide), ``b``
  at nn.Linear's default ``U(-1/sqrt(D), 1/sqrt(D))`` (drawn here from ``support.seed``);
* ``W, b`` by SGD (momentum 0.9) with ``lr_w = 4 N / lambda_max(F^T F)``;
* ``alpha`` starts at ``250 * mean_k mean_{i in k} f_i . t_k``: ``compute_centroids_alpha``
  multiplies the text logits by the one-hot labels, so each class's shots count only their
  similarity to their *own* class text (``250 / shots`` times shots times that mean). Every 10th
  epoch takes ``alpha -= lr_alpha * grad`` with ``lr_alpha = N / (4 max_c sum_i (f_i . t_c)^2)``.
  The official loop never zeroes alpha's gradient, so ``grad`` is the sum of every epoch's gradient so far; that is kept.

The official run keeps the epoch with the best validation accuracy (``>=``: the last of ties);
without validation data the last epoch is kept. The official features are one augmented pass over
the shots: the first augmented view of ``support.views`` (the plain view when there is none).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from clipfold.compile.adapters.base import Fitted, Support
from clipfold.compile.heads.ir import Head, Linear
from clipfold.errors import ConfigError

EPOCHS = 300  # configs/base.yaml train_epoch
MOMENTUM = 0.9
ALPHA_EVERY = 10  # alpha is updated when (epoch + 1) % 10 == 0
INIT_ALPHA_SCALE = 250.0


def lr_w(features: torch.Tensor) -> float:
    """``calculate_lr_w``: 4 N over the largest eigenvalue of F^T F."""
    return float(4 * features.shape[0] / torch.linalg.eigvalsh(features.T @ features).max())


def lr_alpha(features: torch.Tensor, text: torch.Tensor) -> float:
    """``calculate_lr_alpha``: N over 4 times the largest column energy of the text logits."""
    return float(features.shape[0] / (4 * ((features @ text.T) ** 2).sum(0).max()))


def init_alpha(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, num_classes: int) -> float:
    """``calculate_init_alpha``: 250 times the mean over classes of each class's shots' similarity to its own text."""
    own = (features * text[labels]).sum(1)  # f_i . t_{y_i}: compute_centroids_alpha's one_hot * z_s
    counts = torch.bincount(labels, minlength=num_classes).to(features.dtype)
    per_class = torch.zeros(num_classes, dtype=features.dtype).index_add_(0, labels, own) / counts
    return float(INIT_ALPHA_SCALE * per_class.mean())


def _check(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    counts = torch.bincount(labels, minlength=num_classes)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ConfigError(f"classes {empty[:10]} have no support samples; LP++ needs at least one per class")


def lpp_head(weight: torch.Tensor, bias: torch.Tensor, alpha: torch.Tensor, text: torch.Tensor) -> Head:
    folded = weight.double() + alpha.double()[:, None] * text.double()
    return Head(linears=(Linear(folded.float(), bias.float()),), method="lp++")


def fit_lpp(support: Support, epochs: int = EPOCHS, keep_epoch: int | None = None) -> Fitted:
    """The official loop; ``keep_epoch`` (a refit on every shot) keeps that epoch's state, chosen before."""
    num_classes = support.num_classes
    view = min(1, support.views.shape[0] - 1)
    f = support.views[view].double()
    labels = support.labels
    text = support.text.double()
    _check(f, labels, num_classes)
    n, dim = f.shape

    gen = torch.Generator().manual_seed(support.seed)
    bound = 1.0 / dim ** 0.5
    weight = (F.one_hot(labels, num_classes).double().T @ f).requires_grad_(True)
    bias = ((torch.rand(num_classes, generator=gen, dtype=torch.float64) * 2 - 1) * bound).requires_grad_(True)
    alpha0, step_w, step_alpha = init_alpha(f, labels, text, num_classes), lr_w(f), lr_alpha(f, text)
    alpha = torch.full((num_classes,), alpha0, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([weight, bias], lr=step_w, momentum=MOMENTUM)

    text_logits = f @ text.T
    val_text = support.val_features.double() @ text.T
    best: dict[str, Any] | None = None
    for epoch in range(epochs if keep_epoch is None else keep_epoch + 1):
        loss = F.cross_entropy(f @ weight.T + bias + alpha * text_logits, labels)
        optimizer.zero_grad()  # W and b only: alpha's gradient accumulates, as in the official loop
        loss.backward()
        optimizer.step()
        if (epoch + 1) % ALPHA_EVERY == 0:
            with torch.no_grad():
                alpha -= step_alpha * alpha.grad
        if support.has_val:
            with torch.no_grad():
                val_logits = support.val_features.double() @ weight.T + bias + alpha * val_text
                acc = float((val_logits.argmax(1) == support.val_labels).double().mean())
            if best is None or acc >= best["val_accuracy"]:
                state = [t.detach().clone() for t in (weight, bias, alpha)]
                best = {"val_accuracy": acc, "epoch": epoch, "state": state}
    state = best["state"] if best else [t.detach() for t in (weight, bias, alpha)]
    if keep_epoch is not None:
        return Fitted(lpp_head(weight.detach(), bias.detach(), alpha.detach(), text),
                      {"epochs": epochs, "best_epoch": keep_epoch, "lr_w": step_w, "lr_alpha": step_alpha,
                       "init_alpha": alpha0, "momentum": MOMENTUM, "view": view,
                       "alpha_mean": float(alpha.detach().mean())})
    hyper: dict[str, Any] = {"epochs": epochs, "lr_w": step_w, "lr_alpha": step_alpha, "init_alpha": alpha0,
                             "momentum": MOMENTUM, "view": view, "alpha_mean": float(state[2].mean())}
    if best:
        hyper.update(best_epoch=best["epoch"], val_accuracy=best["val_accuracy"])
    else:
        hyper["best_epoch"] = epochs - 1
    return Fitted(lpp_head(state[0], state[1], state[2], text), hyper)


def refit_lpp(support: Support, hyperparameters: dict) -> Fitted:
    """The loop on every shot of ``support``, stopped at the epoch chosen on the held-out shots."""
    refit = fit_lpp(support, hyperparameters["epochs"], keep_epoch=hyperparameters["best_epoch"])
    return Fitted(refit.head, {**hyperparameters, **refit.hyperparameters})
