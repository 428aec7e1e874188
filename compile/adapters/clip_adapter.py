"""CLIP-Adapter (Gao et al., IJCV 2023), with inference as in the official code
(gaopengcuhk/CLIP-Adapter, ``clip_adapter.py``: ``Adapter`` and ``CustomCLIP.forward``).

A bottleneck MLP ``A = ReLU . Linear(D/4 -> D, no bias) . ReLU . Linear(D -> D/4, no bias)`` is
blended into the image feature and the result renormalized:

    logits = exp(logit_scale) * n(0.2 A(x) + 0.8 x) @ T.T

with ``T`` the unit class text embeddings. The official code feeds the unnormalized feature
``x``; the head uses ``f = n(x)``, which is exact because ``A`` is positively homogeneous (see
:class:`~clipfold.compile.heads.ir.ResidualMLP`).

* import: the Dassl checkpoint ``clip_adapter/model.pth.tar-<epoch>`` (``{'state_dict':
  {'fc.0.weight', 'fc.2.weight'}, 'epoch', ...}``; the file or Dassl's output folder) plus class
  names; the text rows are built from ``--templates``, by default the single template the official
  ``TextEncoder`` uses (``CUSTOM_TEMPLATES``: ``a photo of a {}.`` for ImageNet, Caltech101, SUN397,
  StanfordCars; see ``registry.IMPORT_TEMPLATES``).
* fit: the MLP is trained on cached (augmented) features with cross-entropy, as the official
  trainer does on images; SGD with momentum and a cosine schedule, Dassl's defaults.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipfold.compile.adapters.base import Fitted, Imported, ImportRequest, Support, require_keys
from clipfold.compile.adapters.dassl import load_dassl_state
from clipfold.compile.heads.ir import Head, Linear, ResidualMLP
from clipfold.compile.heads.zero_shot import build_zero_shot_head
from clipfold.errors import CheckpointError, ConfigError

RATIO = 0.2
REDUCTION = 4
KEYS = ("fc.0.weight", "fc.2.weight")
EPOCHS, BATCH, LR, MOMENTUM, WEIGHT_DECAY = 200, 32, 2e-3, 0.9, 5e-4  # Dassl's SGD defaults


def clip_adapter_head(text: torch.Tensor, logit_scale: float, down: torch.Tensor, up: torch.Tensor,
                      ratio: float = RATIO) -> Head:
    return Head(linears=(Linear(logit_scale * F.normalize(text, dim=-1)),), method="clip-adapter",
                transform=ResidualMLP(down, up, ratio))


def import_clip_adapter(request: ImportRequest) -> Imported:
    state, file, epoch = load_dassl_state(request.checkpoint, "clip_adapter", request.options.get("epoch"))
    require_keys(state, KEYS, "CLIP-Adapter", file)
    if request.labels is None:
        raise ConfigError("importing CLIP-Adapter needs the class names (--labels), in the training order")
    model = request.loaded.model
    dim = request.loaded.info.embed_dim
    down, up = state["fc.0.weight"].float(), state["fc.2.weight"].float()
    if down.shape[1] != dim:
        raise CheckpointError(f"the CLIP-Adapter in {file} works on {down.shape[1]}-dim features, "
                              f"but {request.loaded.info.name} has {dim}-dim embeddings")
    names = [label.replace("_", " ") for label in request.labels]  # as the official TextEncoder
    text = build_zero_shot_head(model, request.loaded.tokenizer, names, request.templates).class_embeddings
    scale = float(model.logit_scale.detach().exp())
    head = clip_adapter_head(text, scale, down, up)
    return Imported(labels=tuple(request.labels), head=head, source=file,
                    hyperparameters={"ratio": RATIO, "reduction": dim // down.shape[0], "logit_scale": scale,
                                     "templates": list(request.templates), "epoch": epoch,
                                     "checkpoint": file.name})


def fit_clip_adapter(support: Support, epochs: int = EPOCHS) -> Fitted:
    gen = torch.Generator().manual_seed(support.seed)
    dim = support.text.shape[1]
    hidden = max(1, dim // REDUCTION)
    down = torch.nn.Linear(dim, hidden, bias=False)
    up = torch.nn.Linear(hidden, dim, bias=False)
    with torch.no_grad():  # nn.Linear's default init, drawn from the fit's own generator
        for layer in (down, up):
            bound = 1.0 / layer.in_features ** 0.5
            layer.weight.uniform_(-bound, bound, generator=gen)
    params = [down.weight, up.weight]
    optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    x = support.augmented.reshape(-1, dim)  # the official trainer sees training-transform images only
    y = support.labels.repeat(support.augmented.shape[0])
    steps = (len(x) + BATCH - 1) // BATCH
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps)
    weight = support.logit_scale * support.text
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), BATCH):
            idx = order[start:start + BATCH]
            adapted = torch.relu(up(torch.relu(down(x[idx]))))
            logits = F.normalize(RATIO * adapted + (1 - RATIO) * x[idx], dim=-1) @ weight.T
            loss = F.cross_entropy(logits, y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    head = clip_adapter_head(support.text, support.logit_scale, down.weight.detach().clone(), up.weight.detach().clone())
    hyper = {"ratio": RATIO, "reduction": REDUCTION, "epochs": epochs, "batch": BATCH, "lr": LR,
             "optimizer": "sgd", "views": int(support.views.shape[0])}
    if support.has_val:
        hyper["val_accuracy"] = float((head.logits(support.val_features).argmax(1) == support.val_labels).float().mean())
    return Fitted(head, hyper)


def refit_clip_adapter(support: Support, hyperparameters: dict) -> Fitted:
    """Trained again on every shot (nothing is chosen on the held-out ones; they only measure it)."""
    refit = fit_clip_adapter(support, hyperparameters.get("epochs", EPOCHS))
    return Fitted(refit.head, {**hyperparameters, **refit.hyperparameters})
