"""The two contracts every adaptation method implements: fitting on features, importing a checkpoint.

* A **fitter** takes a :class:`Support` (unit image features of the shots, their labels, a
  validation split, the class text embeddings) and returns a :class:`Fitted` head. It never sees
  images or the model: features are encoded (and cached on disk) once by ``fit.py``.
* An **importer** takes an :class:`ImportRequest` (an official checkpoint and the loaded backbone)
  and returns an :class:`Imported`: a head over the unit image embedding, and, for methods that
  change an encoder, the changed image tower (MaPLe) or an image-conditioned logits module
  (CoCoOp). Importers that merge weights (CLIP-LoRA) change ``request.loaded.model`` in place.

Methods register themselves in :data:`FITTERS` / :data:`IMPORTERS` (see ``registry.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from clipfold.compile.heads.ir import Head
from clipfold.errors import ConfigError


@dataclass(frozen=True)
class Support:
    """Few-shot features for fitting; every feature row is unit-norm float32."""

    views: torch.Tensor  # (E, N, D): E views of N shots; views[0] is the plain (unaugmented) view
    labels: torch.Tensor  # (N,) int64 in 0..C-1
    val_features: torch.Tensor  # (M, D); M may be 0 (then a method uses its defaults)
    val_labels: torch.Tensor  # (M,)
    text: torch.Tensor  # (C, D) unit class embeddings of the prompt ensemble
    logit_scale: float = 100.0  # exp(logit_scale) of the model, CLIP's 100
    seed: int = 0
    norms: torch.Tensor | None = None  # (E, N) norms of the raw (unnormalized) features; None: all 1
    options: Mapping[str, str] = field(default_factory=dict)  # `clipfold fit --set key=value`, e.g. search ranges

    def __post_init__(self) -> None:
        if self.views.ndim == 2:
            object.__setattr__(self, "views", self.views[None])
        e, n, d = self.views.shape
        if self.norms is not None:
            norms = self.norms[None] if self.norms.ndim == 1 else self.norms
            if norms.shape != (e, n) or not torch.isfinite(norms).all() or (norms <= 0).any():
                raise ConfigError(f"feature norms must be positive and finite of shape ({e}, {n}); got "
                                  f"{tuple(self.norms.shape)}")
            object.__setattr__(self, "norms", norms)
        if self.labels.shape != (n,):
            raise ConfigError(f"support has {n} shots but labels of shape {tuple(self.labels.shape)}")
        if self.text.ndim != 2 or self.text.shape[1] != d:
            raise ConfigError(f"text embeddings {tuple(self.text.shape)} do not match image features of dim {d}")
        if self.val_features.shape[0] != self.val_labels.shape[0] or (
                len(self.val_features) and self.val_features.shape[1] != d):
            raise ConfigError(f"validation features {tuple(self.val_features.shape)} and labels "
                              f"{tuple(self.val_labels.shape)} do not match (expected (M, {d}) and (M,))")
        for name in ("views", "val_features", "text"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ConfigError(f"support {name} hold NaN or inf values; expected finite embeddings")
        if n and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise ConfigError(f"support labels must be in 0..{self.num_classes - 1}")

    @property
    def features(self) -> torch.Tensor:
        """(N, D): the plain view of every shot."""
        return self.views[0]

    @property
    def augmented(self) -> torch.Tensor:
        """(E-1, N, D) the augmented views the official recipes use (their caches and GDA's statistics
        come from ``augment_epoch`` passes of the training transform, no plain view); the plain view
        (1, N, D) when there is no other."""
        return self.views[1:] if self.views.shape[0] > 1 else self.views

    @property
    def augmented_raw(self) -> torch.Tensor:
        """:attr:`augmented` before normalization (the official cache keys average these)."""
        raw = self.views if self.norms is None else self.views * self.norms[..., None]
        return raw[1:] if raw.shape[0] > 1 else raw

    @property
    def num_classes(self) -> int:
        return int(self.text.shape[0])

    @property
    def has_val(self) -> bool:
        return len(self.val_labels) > 0


@dataclass(frozen=True)
class Fitted:
    head: Head
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # chosen values, grids, val accuracy


@dataclass(frozen=True)
class ImportRequest:
    checkpoint: Path
    loaded: Any  # compile.load.LoadedModel: model, tokenizer, preprocess, info
    labels: tuple[str, ...] | None  # class names; importers whose checkpoint lacks them require these
    templates: tuple[str, ...]  # prompt templates, for importers that build a text head
    options: Mapping[str, str] = field(default_factory=dict)  # method options, e.g. {"class_token_position": "end"}


@dataclass(frozen=True)
class Imported:
    labels: tuple[str, ...]
    head: Head | None  # over the unit image embedding; None only with ``logits_module``
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    visual: nn.Module | None = None  # a replacement image tower taking normalized pixels (MaPLe)
    logits_module: nn.Module | None = None  # unit f (B, D) -> logits (B, C), image-conditioned (CoCoOp)
    activation: str = "softmax"
    slow: bool = False  # the graph runs heavy per-image work (CoCoOp's text tower): flagged in the manifest
    source: Path | None = None  # the file read, when the request named a directory (Dassl's output)

    def __post_init__(self) -> None:
        if (self.head is None) == (self.logits_module is None):
            raise ConfigError("an imported adapter needs exactly one of a head or an image-conditioned logits module")


def option(request: ImportRequest, name: str, default: str, choices: tuple[str, ...] | None = None) -> str:
    """A method option from ``--set name=value``, checked against its allowed values."""
    value = request.options.get(name, default)
    if choices is not None and value not in choices:
        raise ConfigError(f"option {name}={value!r} is not one of {', '.join(choices)}")
    return value


def floats_option(options: Mapping[str, str], name: str, default: tuple[float, ...],
                  count: int | None = None) -> tuple[float, ...]:
    """A comma list of numbers from ``--set name=a,b,...`` (``count`` of them when given)."""
    raw = options.get(name)
    if raw is None:
        return tuple(default)
    try:
        values = tuple(float(v) for v in raw.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"option {name}={raw!r} is not a comma list of numbers") from None
    if not values or (count is not None and len(values) != count):
        raise ConfigError(f"option {name}={raw!r} needs {count or 'at least one'} comma-separated number(s)")
    return values


def float_option(request: ImportRequest, name: str, default: float) -> float:
    raw = request.options.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"option {name}={raw!r} is not a number") from None


def load_torch_checkpoint(path: Path) -> Any:
    """A checkpoint's tensors and containers; no code in it runs (see :mod:`clipfold.compile.stages.checkpoint`)."""
    from clipfold.compile.stages.checkpoint import read_checkpoint

    return read_checkpoint(path)


def require_keys(state: Mapping[str, Any], expected: tuple[str, ...], method: str, path: Path) -> None:
    """Refuse a checkpoint of unknown layout, naming the keys found and those expected."""
    from clipfold.errors import CheckpointError

    missing = [k for k in expected if k not in state]
    if missing:
        found = sorted(state)[:20]
        raise CheckpointError(f"{path} is not a {method} checkpoint: missing keys {missing}; expected "
                              f"{list(expected)}; found {found}{' ...' if len(state) > 20 else ''}")
