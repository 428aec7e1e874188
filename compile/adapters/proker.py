"""ProKeR, training-free (Bendou et al., CVPR 2025, "ProKeR: A Kernel Perspective on Few-Shot
Adaptation of Large Vision-Language Models"), with inference as in the official code.

The official code (Yassir Bendou's ProKeR release; github.com/ybendou/ProKeR holds only the project
page, so it was read from its public fork omarnust/BReg-Adapter at the last commit by the author,
f2ecb3d: ``trainers/proker.py`` ``ProKeR``/``RBF_Kernel``, ``main.py`` ``run``,
``configs/RN50/configs_proker/*.yaml`` and ``hyperparameters.json``).

Kernel ridge regression of the residual between the one-hot labels ``Y`` and the zero-shot text
logits, with the proximal (text) prior, solved in closed form on the cache ``S`` of every
augmented shot feature (every augmented view, not their mean, no plain view; labels repeated per view):

    k(x, y) = exp(-beta (1 - x . y))
    A       = (K_SS / lambda + I)^-1 (Y - S @ T.T)           (N_views*N, C)
    logits  = f @ T.T + k(f, S) @ A                           T: unit text rows, unscaled

A :class:`~clipfold.compile.heads.ir.Cache` with keys ``S``, dense values ``A`` and ``alpha = 1``
beside one linear branch. ``beta`` and ``lambda`` come from the official grid (``torch.linspace``
of the dataset config; the Caltech/Food/FGVC/UCF grid by default) on the validation split, first
best in (beta, lambda) order; without one, the official ImageNet-transferred values for the shot
count (``hp_selection='imagenet'``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from clipfold.compile.adapters.base import Fitted, Support, floats_option
from clipfold.compile.heads.ir import Cache, Head, Linear
from clipfold.errors import ConfigError

BETA_GRID = (0.5, 3.0, 20)  # (start, end, steps) of configs/RN50/configs_proker/caltech101.yaml
LAMBDA_GRID = (0.001, 1.0, 10)
FIT_OPTIONS = ("beta_grid", "lambda_grid")  # a dataset config's (start, end, steps): --set beta_grid=0.5,3,20
IMAGENET_HP = {1: (3.0, 0.05), 2: (2.6, 0.05), 4: (1.5, 0.05), 8: (1.66, 0.07), 16: (1.7, 0.1)}  # shots: (beta, lambda)


def rbf_kernel(x: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.exp(-beta * (1 - x @ y.T))


def solve_values(keys: torch.Tensor, targets: torch.Tensor, text: torch.Tensor, beta: float,
                 lmbda: float) -> torch.Tensor:
    """``A = (K / lambda + I)^-1 (Y - S T^T)`` in float64."""
    keys, text = keys.double(), text.double()
    system = rbf_kernel(keys, keys, beta) / lmbda + torch.eye(len(keys), dtype=torch.float64)
    return torch.linalg.solve(system, targets.double() - keys @ text.T)


def proker_head(text: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beta: float) -> Head:
    return Head(linears=(Linear(text.float()),), caches=(Cache(keys.float(), values.float(), beta=beta, alpha=1.0),),
                method="proker")


def cache_of(support: Support) -> tuple[torch.Tensor, torch.Tensor]:
    """Every augmented view of every shot (no plain view), view-major as the official augment loop appends them."""
    e, n, d = support.augmented.shape
    return support.augmented.reshape(e * n, d), support.labels.repeat(e)


def imagenet_hp(shots: int) -> tuple[float, float]:
    """The official ImageNet-transferred (beta, lambda) for the largest tabled shot count <= shots."""
    return IMAGENET_HP[max(k for k in IMAGENET_HP if k <= max(shots, 1))]


def grid(spec: tuple[float, float, int]) -> list[float]:
    if int(spec[2]) < 1:
        raise ConfigError(f"a (start, end, steps) grid needs steps >= 1, got {tuple(spec)}")
    return [float(v) for v in torch.linspace(spec[0], spec[1], int(spec[2]))]


@torch.no_grad()
def search(keys: torch.Tensor, targets: torch.Tensor, text: torch.Tensor, features: torch.Tensor,
           labels: torch.Tensor, betas: list[float], lambdas: list[float]) -> tuple[float, float, float]:
    """(beta, lambda, accuracy): the first strictly best point in the official loop order."""
    val_text = features.double() @ text.double().T
    best = (betas[0], lambdas[0], -1.0)
    for beta in betas:
        k_xs = rbf_kernel(features.double(), keys.double(), beta)
        for lmbda in lambdas:
            logits = val_text + k_xs @ solve_values(keys, targets, text, beta, lmbda)
            acc = float((logits.argmax(1) == labels).double().mean())
            if acc > best[2]:
                best = (beta, lmbda, acc)
    return best


def fit_proker(support: Support) -> Fitted:
    counts = torch.bincount(support.labels, minlength=support.num_classes)
    if (counts == 0).any():
        raise ConfigError(f"classes {torch.nonzero(counts == 0).flatten().tolist()[:10]} have no support samples; "
                          "ProKeR needs at least one per class")
    keys, labels = cache_of(support)
    targets = F.one_hot(labels, support.num_classes)
    shots = int(counts.min())
    beta_spec = floats_option(support.options, "beta_grid", BETA_GRID, 3)
    lambda_spec = floats_option(support.options, "lambda_grid", LAMBDA_GRID, 3)
    hyper: dict[str, Any] = {"beta_grid": list(beta_spec), "lambda_grid": list(lambda_spec),
                             "cache_size": len(keys), "views": int(support.augmented.shape[0])}
    if support.has_val:
        beta, lmbda, acc = search(keys, targets, support.text, support.val_features, support.val_labels,
                                  grid(beta_spec), grid(lambda_spec))
        hyper["val_accuracy"] = acc
    else:
        beta, lmbda = imagenet_hp(shots)
        hyper["defaults"] = f"official ImageNet values for {shots} shots"
    hyper.update(beta=beta, lmbda=lmbda)
    return refit_proker(support, hyper)


def refit_proker(support: Support, hyperparameters: dict) -> Fitted:
    """The closed form on every shot of ``support`` with beta and lambda already chosen."""
    keys, labels = cache_of(support)
    beta, lmbda = hyperparameters["beta"], hyperparameters["lmbda"]
    values = solve_values(keys, F.one_hot(labels, support.num_classes), support.text, beta, lmbda)
    return Fitted(proker_head(support.text, keys, values, beta), {**hyperparameters, "cache_size": len(keys)})
