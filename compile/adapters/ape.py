"""APE, training-free (Zhu et al., ICCV 2023, "Not all features matter"), with inference as in the
official code (yangyangyang127/APE, ``main.py`` ``APE`` and ``utils.py`` ``cal_criterion``).

APE keeps Tip-Adapter's cache but compares on a subset of ``feat_num`` embedding channels, chosen
to make classes separable: with ``S_c`` the sum of class ``c``'s text row and its shot features,

    sim       = mean over class pairs i != j and all sample pairs of  S-products  (per channel)
    criterion = -w0 * sim + w1 * var(text, over classes)       (w = w_training_free = 0.7, 0.3)
    idx       = top-feat_num channels of the criterion

The official quadruple loop over pairs is the closed form ``((sum_c S_c)^2 - sum_c S_c^2) / count``.
The values are refined by how much each shot disagrees with its class text on those channels,
``d_n = KL(onehot_n || softmax(n(K_n[idx]) @ n(T[:, idx]).T))`` in bits, and then

    logits = 100 f @ T.T + alpha * exp(-beta (1 - n(f[idx]) @ n(K[:, idx]).T)) @ (L * exp(gamma d))

``beta``, ``alpha`` and ``gamma`` come from the official grids on the validation split (first best
in the official loop order: beta, then alpha, then gamma); without one the config's init values.
``feat_num`` is set per dataset by the official configs (``training_free_feat_num``: 400, 500, 700
or 800 of RN50's 1024 channels); with validation data each of those fractions of the width is tried
(first best), without it the ImageNet config's 500/1024; ``--set feat_num=N[,N...]`` gives the
channel count(s) to try, ``search_scale`` / ``search_step`` a dataset's grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipfold.compile.adapters.base import Fitted, Support, floats_option
from clipfold.compile.adapters.tip import cache_keys, search_grid
from clipfold.compile.heads.ir import Cache, Head, Linear
from clipfold.errors import ConfigError

TEXT_SCALE = 100.0
SEARCH_SCALE = (7.0, 7.0, 0.5)  # (beta, alpha, gamma): the official ImageNet config
SEARCH_STEP = (200, 20, 5)
INIT = {"beta": 1.0, "alpha": 2.0, "gamma": 0.1}
CRITERION_WEIGHTS = (0.7, 0.3)  # w_training_free
FEAT_FRACTION = 500 / 1024  # the ImageNet config's feat_num of 500 on RN50's 1024 channels
FEAT_CANDIDATES = (400 / 1024, 500 / 1024, 700 / 1024, 800 / 1024)  # training_free_feat_num over configs/*.yaml
FIT_OPTIONS = ("feat_num", "search_scale", "search_step")


def select_channels(text: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, feat_num: int,
                    weights: tuple[float, float] = CRITERION_WEIGHTS) -> torch.Tensor:
    """The official criterion's top-``feat_num`` channels; ``text`` (C, D) and ``keys`` (N, D)."""
    classes, dim = text.shape
    if not 1 <= feat_num <= dim:
        raise ConfigError(f"APE needs 1 <= feat_num <= {dim}, got {feat_num}")
    t, k = text.double(), keys.double()
    sums = t.clone().index_add_(0, labels, k)  # S_c: text row + every shot of the class
    samples = 1 + torch.bincount(labels, minlength=classes).double()
    pairs = samples.sum() ** 2 - (samples ** 2).sum()  # sample pairs across different classes
    sim = (sums.sum(0) ** 2 - (sums ** 2).sum(0)) / pairs
    criterion = -weights[0] * sim + weights[1] * t.T.var(dim=1)
    return criterion.topk(feat_num).indices


def refined_values(text: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """Each shot's divergence ``d`` (N, 1) from its class text on the selected channels."""
    sub_text = F.normalize(text[:, channels], dim=-1)
    sub_keys = F.normalize(keys[:, channels], dim=-1)
    key_logits = (sub_keys @ sub_text.T).softmax(1)
    return (values * torch.log2((values + 1e-6) / (key_logits + 1e-6))).sum(1, keepdim=True)


def ape_head(text: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, channels: torch.Tensor,
             divergence: torch.Tensor, beta: float, alpha: float, gamma: float) -> Head:
    cache = Cache(F.normalize(keys[:, channels], dim=-1), values * (divergence * gamma).exp(),
                  beta=beta, alpha=alpha, channels=channels)
    return Head(linears=(Linear(TEXT_SCALE * text),), caches=(cache,), method="ape")


@torch.no_grad()
def search(text, sub_keys, values, divergence, channels, features, targets, scale=SEARCH_SCALE,
           step=SEARCH_STEP) -> tuple[dict[str, float], float]:
    """The official 200 x 20 x 5 grid, first best in (beta, alpha, gamma) loop order."""
    betas = search_grid(scale[0], step[0])
    alphas = torch.tensor(search_grid(scale[1], step[1]), dtype=torch.float64)
    gammas = [i * scale[2] / step[2] for i in range(step[2])]
    text_logits = TEXT_SCALE * features.double() @ text.double().T
    affinity = F.normalize(features[:, channels], dim=-1).double() @ sub_keys.double().T
    acc = torch.empty(len(betas), len(alphas), len(gammas), dtype=torch.float64)
    for b, beta in enumerate(betas):
        weights = torch.exp(-(beta - beta * affinity))
        for g, gamma in enumerate(gammas):
            cache_logits = weights @ (values.double() * (divergence.double() * gamma).exp())
            logits = text_logits[None] + alphas[:, None, None] * cache_logits[None]
            acc[b, :, g] = (logits.argmax(-1) == targets[None]).double().mean(1)
    best = int(acc.flatten().argmax())  # the first maximum in C order = the official loop order
    b, a, g = best // (len(alphas) * len(gammas)), (best // len(gammas)) % len(alphas), best % len(gammas)
    return {"beta": betas[b], "alpha": float(alphas[a]), "gamma": gammas[g]}, float(acc.flatten()[best])


def _feat_nums(support: Support, dim: int) -> list[int]:
    if "feat_num" in support.options:
        return [int(v) for v in floats_option(support.options, "feat_num", ())]
    fractions = FEAT_CANDIDATES if support.has_val else (FEAT_FRACTION,)
    return list(dict.fromkeys(max(1, round(f * dim)) for f in fractions))


def fit_ape(support: Support) -> Fitted:
    keys = cache_keys(support.augmented_raw)
    values = F.one_hot(support.labels, support.num_classes).float()
    scale = floats_option(support.options, "search_scale", SEARCH_SCALE, 3)
    step = tuple(int(s) for s in floats_option(support.options, "search_step", SEARCH_STEP, 3))
    hyper: dict = {"criterion_weights": list(CRITERION_WEIGHTS), "search_scale": list(scale), "search_step": list(step)}
    best: tuple | None = None
    for feat_num in _feat_nums(support, keys.shape[1]):
        channels = select_channels(support.text, keys, support.labels, feat_num)
        divergence = refined_values(support.text, keys, values, channels)
        chosen, acc = dict(INIT), None
        if support.has_val:
            sub_keys = F.normalize(keys[:, channels], dim=-1)
            chosen, acc = search(support.text, sub_keys, values, divergence, channels,
                                 support.val_features, support.val_labels, scale, step)
        if best is None or (acc is not None and acc > best[1]):
            best = (feat_num, acc, chosen, channels, divergence)
    feat_num, acc, chosen, channels, divergence = best
    hyper.update(feat_num=feat_num, **chosen)
    if acc is not None:
        hyper["val_accuracy"] = acc
    return Fitted(ape_head(support.text, keys, values, channels, divergence, **chosen), hyper)


def refit_ape(support: Support, hyperparameters: dict) -> Fitted:
    """Channels, values and cache recomputed on every shot, with beta/alpha/gamma already chosen."""
    keys = cache_keys(support.augmented_raw)
    values = F.one_hot(support.labels, support.num_classes).float()
    channels = select_channels(support.text, keys, support.labels, hyperparameters["feat_num"])
    divergence = refined_values(support.text, keys, values, channels)
    chosen = {k: hyperparameters[k] for k in ("beta", "alpha", "gamma")}
    return Fitted(ape_head(support.text, keys, values, channels, divergence, **chosen), dict(hyperparameters))
