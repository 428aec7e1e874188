"""Tip-Adapter (training-free; Zhang et al., ECCV 2022), with inference as in the official code.

The cache holds the support set: keys are the shots' features as the official ``build_cache_model``
makes them: the mean of the *raw* image features of ``augment_epoch`` augmented passes (no plain
view), then normalized; values their one-hot labels. Then

    logits = text_scale * f @ W_zs.T + alpha * exp(-(beta - beta * f @ K.T)) @ L

with ``text_scale`` = 100 as in the official code. ``beta`` and ``alpha`` come from the official
search grid, ``0.1 + i * (scale - 0.1) / steps``, evaluated on a validation split (first best wins).
The result is a :class:`~clipfold.compile.heads.ir.Head` with one linear and one cache branch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from clipfold.compile.adapters.base import Fitted, Support, floats_option
from clipfold.compile.heads.ir import Cache, Head, Linear
from clipfold.errors import ConfigError

# (beta, alpha) search ranges. The official configs set them per dataset: alpha up to 3 for ImageNet
# and Oxford Pets, 10 for EuroSAT and Food-101, 13 for DTD, 50 for Flowers. Without a dataset to
# look up, the range must hold the task's best alpha: on the tiny model's background task (text
# that knows the class names a little) alpha <= 3 found nothing above zero-shot (82.5 %), while
# alpha 9.0 from this range reached 94.2 %. The search picks on validation data, so a wider range
# only adds candidates.
SEARCH_SCALE = (7.0, 10.0)
SEARCH_STEP = (200, 20)
FIT_OPTIONS = ("search_scale", "search_step")  # a dataset's config: --set search_scale=7,3 search_step=200,20


def cache_keys(views: torch.Tensor) -> torch.Tensor:
    """Keys from the raw features of ``E`` augmented views of ``N`` shots, ``(E, N, D)`` -> ``(N, D)``:
    their mean, normalized (pass :attr:`Support.augmented_raw`)."""
    if views.ndim == 2:
        views = views[None]
    if views.ndim != 3:
        raise ConfigError(f"cache features must be (views, shots, dim) or (shots, dim); got {tuple(views.shape)}")
    if not torch.isfinite(views).all():
        raise ConfigError("cache features hold NaN or inf values; expected finite embeddings")
    return F.normalize(views.mean(dim=0), dim=-1)


def tip_adapter_head(zero_shot: Head, keys: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float,
                     text_scale: float = 100.0) -> Head:
    (branch,) = zero_shot.linears
    classes = zero_shot.num_classes
    if labels.shape != (keys.shape[0],):
        raise ConfigError(f"the cache has {keys.shape[0]} keys but {tuple(labels.shape)} labels; expected one label per key")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise ConfigError(f"cache labels must be in 0..{classes - 1} for {classes} classes; got {int(labels.min())}..{int(labels.max())}")
    values = F.one_hot(labels, classes).float()
    return Head(linears=(Linear(text_scale * F.normalize(branch.weight, dim=-1)),),
                caches=(Cache(keys, values, beta=beta, alpha=alpha),), activation="softmax", method="tip-adapter")


def search_grid(scale: float, steps: int) -> list[float]:
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


@torch.no_grad()
def search_hp(zero_shot: Head, keys: torch.Tensor, labels: torch.Tensor, features: torch.Tensor, targets: torch.Tensor,
              scale: Sequence[float] = SEARCH_SCALE, steps: Sequence[int] = SEARCH_STEP) -> tuple[float, float, float]:
    """(beta, alpha, validation top-1) of the first best grid point on ``features``/``targets``."""
    head = tip_adapter_head(zero_shot, keys, labels, alpha=1.0, beta=1.0)
    text_logits = head.linears[0].logits(features)
    affinity = features @ keys.T
    values = head.caches[0].values
    best = (0.0, 0.0, -1.0)
    for beta in search_grid(scale[0], steps[0]):
        cache_logits = torch.exp(-(beta - beta * affinity)) @ values
        for alpha in search_grid(scale[1], steps[1]):
            acc = float(((text_logits + alpha * cache_logits).argmax(1) == targets).float().mean())
            if acc > best[2]:
                best = (beta, alpha, acc)
    return best


def fit_tip(support: Support) -> Fitted:
    """beta and alpha from the official grid on the validation split; (1, 1) without one."""
    zero_shot = Head(linears=(Linear(support.logit_scale * support.text),))
    scale = floats_option(support.options, "search_scale", SEARCH_SCALE, 2)
    steps = tuple(int(s) for s in floats_option(support.options, "search_step", SEARCH_STEP, 2))
    hyper: dict = {"beta": 1.0, "alpha": 1.0, "search_scale": list(scale), "search_step": list(steps)}
    if support.has_val:
        beta, alpha, acc = search_hp(zero_shot, cache_keys(support.augmented_raw), support.labels,
                                     support.val_features, support.val_labels, scale, steps)
        hyper.update(beta=beta, alpha=alpha, val_accuracy=acc)
    return refit_tip(support, hyper)


def refit_tip(support: Support, hyperparameters: dict) -> Fitted:
    zero_shot = Head(linears=(Linear(support.logit_scale * support.text),))
    head = tip_adapter_head(zero_shot, cache_keys(support.augmented_raw), support.labels,
                            alpha=hyperparameters["alpha"], beta=hyperparameters["beta"])
    return Fitted(head, dict(hyperparameters))
