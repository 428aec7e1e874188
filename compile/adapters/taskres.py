"""TaskRes (Yu et al., CVPR 2023, "Task Residual for Tuning Vision-Language Models"), with
inference as in the official code (geekyutao/TaskRes, ``trainers/taskres.py``: ``TaskResLearner``,
``CustomCLIP.forward``; optimisation from ``configs/trainers/TaskRes/adam_lr2e-3_B256_ep100.yaml``
and ``scripts/taskres/main.sh``, run by Dassl).

The classifier is the base text embedding ``t`` plus a learned residual ``x`` of the same shape
(zeros at start), scaled by ``alpha`` (``TRAINER.TaskRes.RESIDUAL_SCALE``):

    logits = logit_scale * n(f) @ n(t + alpha * x).T        n(.) = L2 normalisation per row

one linear branch after folding. The official base is the mean of the *unnormalised* prompt
embeddings; a checkpoint carries it (``base_text_features``) beside ``text_feature_residuals``,
in Dassl's ``prompt_learner/model.pth.tar-<epoch>`` ``{'state_dict': ..., 'epoch', 'optimizer',
'scheduler'}`` (the file, or Dassl's output folder). ``alpha`` is not in the checkpoint: ``--set
alpha=``, else ``TRAINER.TaskRes.RESIDUAL_SCALE`` from the run's Dassl ``log.txt``, else 0.5, the
value ``scripts/taskres/main.sh`` is run with for 10 of the 11 datasets (1.0 for Flowers).

Fitting trains ``x`` with the official recipe on cached features: Adam (lr 2e-3, Dassl's weight
decay 5e-4), batch 256, 100 epochs, one constant warm-up epoch at 1e-5 then cosine per epoch.
Dassl re-augments each epoch; here each shot takes one of its augmented cached views
(``views[1:]``, the plain view when there is no other) at random per epoch. The base is
``support.text`` (the unit prompt ensemble, not the unnormalised mean: the support carries no
other), so the residual's relative size differs from the official run by the base's norm.
``alpha`` is chosen from the scripts' values on the validation split.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from clipfold.compile.adapters.base import (
    Fitted,
    Imported,
    ImportRequest,
    Support,
    float_option,
    floats_option,
    require_keys,
)
from clipfold.compile.adapters.dassl import load_dassl_state, run_config
from clipfold.compile.heads.ir import Head, Linear
from clipfold.errors import CheckpointError, ConfigError

IMPORT_ALPHA = 0.5  # scripts/taskres/main.sh's SCALE for 10 of the 11 datasets (train.py's default is 1.0)
ALPHA_GRID = (0.5, 1.0)  # the values scripts/taskres/main.sh is run with
DEFAULT_FIT_ALPHA = 0.5  # the scripts' value for 10 of the 11 datasets
LR, EPOCHS, BATCH = 2e-3, 100, 256  # adam_lr2e-3_B256_ep100.yaml
WEIGHT_DECAY, BETAS = 5e-4, (0.9, 0.999)  # Dassl OPTIM defaults
WARMUP_EPOCHS, WARMUP_LR = 1, 1e-5
KEYS = ("base_text_features", "text_feature_residuals")
FIT_OPTIONS = ("alpha_grid",)


def taskres_head(base: torch.Tensor, residuals: torch.Tensor, alpha: float, logit_scale: float) -> Head:
    classifier = F.normalize(base.double() + alpha * residuals.double(), dim=-1)
    return Head(linears=(Linear((logit_scale * classifier).float()),), method="taskres")


def epoch_lr(epoch: int, lr: float = LR, epochs: int = EPOCHS) -> float:
    """Dassl's ConstantWarmupScheduler over CosineAnnealingLR(T_max=epochs), stepped per epoch."""
    if epoch < WARMUP_EPOCHS:
        return WARMUP_LR
    return 0.5 * lr * (1 + math.cos(math.pi * (epoch - WARMUP_EPOCHS) / epochs))


def train_residuals(views: torch.Tensor, labels: torch.Tensor, base: torch.Tensor, alpha: float,
                    logit_scale: float, seed: int, epochs: int = EPOCHS, lr: float = LR,
                    batch: int = BATCH) -> torch.Tensor:
    """The residual after the official schedule; deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)
    e, n, _ = views.shape
    residuals = torch.zeros_like(base, requires_grad=True)
    optimizer = torch.optim.Adam([residuals], lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
    rows = torch.arange(n)
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(epoch, lr, epochs)
        # Dassl re-augments every epoch: an augmented view (1..E-1) of each shot when there are any.
        which = torch.zeros(n, dtype=torch.long) if e == 1 else 1 + torch.randint(e - 1, (n,), generator=gen)
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            f = views[which[idx], rows[idx]]
            classifier = F.normalize(base + alpha * residuals, dim=-1)
            loss = F.cross_entropy(logit_scale * f @ classifier.T, labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return residuals.detach()


def _accuracy(head: Head, features: torch.Tensor, labels: torch.Tensor) -> float:
    return float((head.logits(features).argmax(1) == labels).float().mean())


def fit_taskres(support: Support, alpha_grid: Sequence[float] | None = None, epochs: int = EPOCHS) -> Fitted:
    alpha_grid = floats_option(support.options, "alpha_grid", ALPHA_GRID) if alpha_grid is None else alpha_grid
    grid = tuple(alpha_grid) if support.has_val else (DEFAULT_FIT_ALPHA,)
    hyper: dict[str, Any] = {"alpha_grid": list(alpha_grid), "lr": LR, "epochs": epochs, "batch_size": BATCH,
                             "optimizer": f"Adam(weight_decay={WEIGHT_DECAY})",
                             "schedule": f"constant {WARMUP_LR} for {WARMUP_EPOCHS} epoch, then cosine",
                             "views": int(support.views.shape[0]), "logit_scale": support.logit_scale}
    best = None
    accuracy = {}
    for alpha in grid:
        residuals = train_residuals(support.views, support.labels, support.text, alpha, support.logit_scale,
                                    support.seed, epochs)
        head = taskres_head(support.text, residuals, alpha, support.logit_scale)
        if support.has_val:
            accuracy[alpha] = _accuracy(head, support.val_features, support.val_labels)
        if best is None or (support.has_val and accuracy[alpha] > accuracy[best[0]]):
            best = (alpha, head)
    alpha, head = best
    hyper["alpha"] = alpha
    if support.has_val:
        hyper["val_accuracy"] = accuracy[alpha]
        hyper["val_accuracy_by_alpha"] = {str(a): acc for a, acc in accuracy.items()}
    return Fitted(head, hyper)


def refit_taskres(support: Support, hyperparameters: dict) -> Fitted:
    """The residual trained on every shot of ``support`` with alpha already chosen."""
    alpha, epochs = hyperparameters["alpha"], hyperparameters["epochs"]
    residuals = train_residuals(support.views, support.labels, support.text, alpha, support.logit_scale,
                                support.seed, epochs)
    return Fitted(taskres_head(support.text, residuals, alpha, support.logit_scale), dict(hyperparameters))


def _alpha(request: ImportRequest, file) -> tuple[float, str]:
    if "alpha" in request.options:
        return float_option(request, "alpha", IMPORT_ALPHA), "option"
    logged = (run_config(file) or {}).get("TRAINER.TaskRes.RESIDUAL_SCALE")
    if logged:
        try:
            return float(logged), "TRAINER.TaskRes.RESIDUAL_SCALE of the run's log.txt"
        except ValueError:
            raise CheckpointError(f"the Dassl log beside {file} has RESIDUAL_SCALE {logged!r}, not a number") from None
    return IMPORT_ALPHA, "default: the official scripts' 0.5 (not saved in the checkpoint)"


def import_taskres(request: ImportRequest) -> Imported:
    state, file, epoch = load_dassl_state(request.checkpoint, "prompt_learner", request.options.get("epoch"))
    require_keys(state, KEYS, "TaskRes", file)
    base, residuals = state["base_text_features"], state["text_feature_residuals"]
    dim = int(request.loaded.info.embed_dim)
    for name, t in (("base_text_features", base), ("text_feature_residuals", residuals)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            raise CheckpointError(f"{file}: {name} is not a (classes, dim) tensor")
        if t.shape[1] != dim:
            raise CheckpointError(f"{file}: {name} has shape {tuple(t.shape)}, but "
                                  f"{request.loaded.info.name} embeds in {dim} dims; "
                                  "was it trained on another backbone?")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{file}: {name} holds NaN or inf values")
    if base.shape != residuals.shape:
        raise CheckpointError(f"{file}: base_text_features {tuple(base.shape)} and "
                              f"text_feature_residuals {tuple(residuals.shape)} differ; expected the same shape")
    if not request.labels:
        raise ConfigError(f"TaskRes checkpoints hold no class names; pass --labels with {base.shape[0]} classes")
    if len(request.labels) != base.shape[0]:
        raise ConfigError(f"{len(request.labels)} labels given, but the checkpoint has {base.shape[0]} classes")
    alpha, source = _alpha(request, file)
    logit_scale = float(request.loaded.model.logit_scale.exp().item())
    hyper: dict[str, Any] = {"alpha": alpha, "alpha_source": source, "logit_scale": logit_scale,
                             "checkpoint": file.name}
    if isinstance(epoch, int):
        hyper["epoch"] = epoch
    return Imported(labels=tuple(request.labels), head=taskres_head(base.float(), residuals.float(), alpha, logit_scale),
                    hyperparameters=hyper, source=file)
