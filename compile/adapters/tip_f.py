"""Tip-Adapter-F (Zhang et al., ECCV 2022), the fine-tuned cache, with training and inference as
in the official code (gaopengcuhk/Tip-Adapter: ``main.py`` / ``main_imagenet.py``
``run_tip_adapter_F``, ``utils.py`` ``build_cache_model`` and ``search_hp``,
``configs/imagenet.yaml``).

The cache keys become a learnable ``nn.Linear(D, N, bias=False)`` initialised with the keys (the
renormalised mean of the shots' augmented views); the values stay one-hot. Then

    logits = 100 f @ W_zs.T + alpha * exp(-(beta - beta * f @ W.T)) @ L

which is Tip-Adapter's head with keys ``W`` (rows no longer unit after training). Training
follows the official loop on cached features: AdamW (lr 1e-3, eps 1e-4, torch's default weight
decay 0.01), cosine annealing over every step (``train_epoch * batches``), batch 256, 20 epochs,
cross-entropy at the config's ``init_beta = 1``, ``init_alpha = 1.17``; each epoch every shot takes
one of its augmented views at random (the official loader re-augments each epoch). The official
code keeps the epoch with the best *test* accuracy; here the validation split decides (the last
epoch without one). ``beta`` and ``alpha`` are then searched on the validation split over the
official grid with the trained adapter.

Import reads the official files: ``best_F_<shots>shots.pt`` (``torch.save(adapter.weight)``,
(N, D)), its sibling ``values_<shots>shots.pt`` (N, C) and, when present, ``keys_<shots>shots.pt``
(D, N; checked for shape). The searched ``beta``/``alpha`` are printed, not saved, by the official
code: ``--set beta=... alpha=...``, defaulting to the config's ``init_beta``/``init_alpha``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipfold.compile.adapters.base import (
    Fitted,
    Imported,
    ImportRequest,
    Support,
    float_option,
    floats_option,
    load_torch_checkpoint,
)
from clipfold.compile.adapters.tip import SEARCH_SCALE, SEARCH_STEP, cache_keys, search_hp
from clipfold.compile.heads.ir import Cache, Head, Linear
from clipfold.compile.heads.zero_shot import build_zero_shot_head
from clipfold.errors import CheckpointError, ConfigError

TEXT_SCALE = 100.0
INIT_BETA, INIT_ALPHA = 1.0, 1.17  # configs/imagenet.yaml
LR, EPS, WEIGHT_DECAY = 1e-3, 1e-4, 0.01  # AdamW(lr=cfg['lr'], eps=1e-4), torch's default decay
EPOCHS, BATCH = 20, 256
FILE_PATTERN = re.compile(r"best_F_(\d+)shots\.pt$")
FIT_OPTIONS = ("search_scale", "search_step")


def tip_f_head(text: torch.Tensor, adapter: torch.Tensor, values: torch.Tensor, beta: float, alpha: float) -> Head:
    """``text`` unit (C, D); ``adapter`` the trained keys (N, D); ``values`` (N, C)."""
    return Head(linears=(Linear(TEXT_SCALE * F.normalize(text.float(), dim=-1)),),
                caches=(Cache(adapter.float(), values.float(), beta=beta, alpha=alpha),), method="tip-adapter-f")


def _training_view(views: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Which view each shot shows this epoch: an augmented one (1..E-1) when there are any."""
    e = views.shape[0]
    return torch.zeros(n, dtype=torch.long) if e == 1 else 1 + torch.randint(e - 1, (n,), generator=gen)


def train_adapter(views: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, keys: torch.Tensor, seed: int,
                  epochs: int = EPOCHS, val: tuple[torch.Tensor, torch.Tensor] | None = None,
                  beta: float = INIT_BETA, alpha: float = INIT_ALPHA,
                  keep_epoch: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The adapter weight (N, D) after the official loop, and the epoch it comes from; ``keep_epoch``
    (a refit on every shot) returns that epoch's weight, chosen before on held-out shots."""
    gen = torch.Generator().manual_seed(seed)
    views, text = views.double(), F.normalize(text.double(), dim=-1)
    values = F.one_hot(labels, text.shape[0]).double()
    weight = keys.double().clone().requires_grad_(True)
    n = views.shape[1]
    steps = epochs * math.ceil(n / BATCH)
    optimizer = torch.optim.AdamW([weight], lr=LR, eps=EPS, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    best: dict[str, Any] = {"epoch": epochs - 1, "weight": None, "val_accuracy": 0.0}
    for epoch in range(epochs):
        which = _training_view(views, n, gen)
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, BATCH):
            idx = order[start:start + BATCH]
            f = views[which[idx], idx]
            cache_logits = torch.exp(-(beta - beta * f @ weight.T)) @ values
            loss = F.cross_entropy(TEXT_SCALE * f @ text.T + alpha * cache_logits, labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        if epoch == keep_epoch:
            return weight.detach().clone(), {"epoch": epoch}
        if val is not None:
            with torch.no_grad():
                vf = val[0].double()
                logits = TEXT_SCALE * vf @ text.T + alpha * torch.exp(-(beta - beta * vf @ weight.T)) @ values
                acc = float((logits.argmax(1) == val[1]).double().mean())
            if acc > best["val_accuracy"]:
                best = {"epoch": epoch, "weight": weight.detach().clone(), "val_accuracy": acc}
    if best["weight"] is None:
        best["weight"] = weight.detach()
        best["epoch"] = epochs - 1
    return best.pop("weight"), best


def fit_tip_f(support: Support, epochs: int = EPOCHS) -> Fitted:
    keys = cache_keys(support.augmented_raw)
    val = (support.val_features, support.val_labels) if support.has_val else None
    scale = floats_option(support.options, "search_scale", SEARCH_SCALE, 2)
    steps = tuple(int(s) for s in floats_option(support.options, "search_step", SEARCH_STEP, 2))
    adapter, chosen = train_adapter(support.views, support.labels, support.text, keys, support.seed, epochs, val)
    hyper: dict[str, Any] = {"epochs": epochs, "lr": LR, "eps": EPS, "weight_decay": WEIGHT_DECAY, "batch_size": BATCH,
                             "schedule": "cosine per step", "train_beta": INIT_BETA, "train_alpha": INIT_ALPHA,
                             "best_epoch": chosen["epoch"], "views": int(support.views.shape[0]),
                             "search_scale": list(scale), "search_step": list(steps)}
    beta, alpha = INIT_BETA, INIT_ALPHA
    if val is not None:
        hyper["epoch_val_accuracy"] = chosen["val_accuracy"]
        zero_shot = Head(linears=(Linear(support.text),))
        beta, alpha, acc = search_hp(zero_shot, adapter.float(), support.labels, *val, scale, steps)
        hyper["val_accuracy"] = acc
    hyper.update(beta=beta, alpha=alpha)
    values = F.one_hot(support.labels, support.num_classes)
    return Fitted(tip_f_head(support.text, adapter, values, beta, alpha), hyper)


def refit_tip_f(support: Support, hyperparameters: dict) -> Fitted:
    """The adapter trained on every shot of ``support`` up to the chosen epoch, with the chosen beta/alpha."""
    keys = cache_keys(support.augmented_raw)
    adapter, _ = train_adapter(support.views, support.labels, support.text, keys, support.seed,
                               hyperparameters["epochs"], keep_epoch=hyperparameters["best_epoch"])
    values = F.one_hot(support.labels, support.num_classes)
    return Fitted(tip_f_head(support.text, adapter, values, hyperparameters["beta"], hyperparameters["alpha"]),
                  dict(hyperparameters))


def _tensor(obj: Any, path: Path, what: str) -> torch.Tensor:
    if not isinstance(obj, torch.Tensor):
        found = sorted(obj)[:20] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path} is not a Tip-Adapter-F {what}: found {found}; expected one tensor as the "
                              "official code saves it (torch.save(tensor))")
    if not torch.isfinite(obj.float()).all():
        raise CheckpointError(f"{path}: the {what} holds NaN or inf values")
    return obj.detach().float()


def import_tip_f(request: ImportRequest) -> Imported:
    path = Path(request.checkpoint)
    match = FILE_PATTERN.search(path.name)
    if match is None:
        raise CheckpointError(f"{path.name} is not named like the official adapter file best_F_<shots>shots.pt; "
                              "its values_<shots>shots.pt is found by that name")
    shots = match.group(1)
    adapter = _tensor(load_torch_checkpoint(path), path, "adapter weight")
    dim = int(request.loaded.info.embed_dim)
    if adapter.ndim != 2 or adapter.shape[1] != dim:
        raise CheckpointError(f"{path}: adapter weight has shape {tuple(adapter.shape)}; expected (N, {dim}) for "
                              f"{request.loaded.info.name}'s {dim}-dim embedding")
    n = adapter.shape[0]
    values_path = path.with_name(f"values_{shots}shots.pt")
    values = _tensor(load_torch_checkpoint(values_path), values_path, "cache values")
    if values.ndim != 2 or values.shape[0] != n:
        raise CheckpointError(f"{values_path}: values have shape {tuple(values.shape)}; expected ({n}, classes) "
                              f"to match the {n} adapter rows of {path.name}")
    keys_path = path.with_name(f"keys_{shots}shots.pt")
    if keys_path.is_file():
        keys = _tensor(load_torch_checkpoint(keys_path), keys_path, "cache keys")
        if tuple(keys.shape) != (dim, n):
            raise CheckpointError(f"{keys_path}: keys have shape {tuple(keys.shape)}; expected ({dim}, {n}) "
                                  f"(dim, shots) beside {path.name}")
    classes = values.shape[1]
    if not request.labels:
        raise ConfigError(f"Tip-Adapter-F files hold no class names; pass --labels with {classes} classes")
    if len(request.labels) != classes:
        raise ConfigError(f"{len(request.labels)} labels given, but {values_path.name} has {classes} classes")
    beta = float_option(request, "beta", INIT_BETA)
    alpha = float_option(request, "alpha", INIT_ALPHA)
    zero_shot = build_zero_shot_head(request.loaded.model, request.loaded.tokenizer, request.labels, request.templates)
    head = tip_f_head(zero_shot.class_embeddings, adapter, values, beta, alpha)
    hyper = {"beta": beta, "alpha": alpha, "shots": int(shots), "cache_size": n, "text_scale": TEXT_SCALE,
             "keys_checked": keys_path.is_file(), "templates": list(request.templates),
             "beta_alpha_source": {k: "option" if k in request.options else
                                   "config init value (the official searched value is not saved)"
                                   for k in ("beta", "alpha")}}
    return Imported(labels=tuple(request.labels), head=head, hyperparameters=hyper)
