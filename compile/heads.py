"""The classification head as data, between fitting an adapter and exporting the graph.

A head is a sum of branches over the unit image embedding ``f`` (1, D):

* :class:`Linear` — ``f @ W.T + b``: zero-shot ensembles, CoOp, TaskRes, GDA, LP++, linear probes;
* :class:`Cache` — ``alpha * exp(-beta * (1 - f @ K.T)) @ V``: Tip-Adapter's key-value cache
  (APE and ProKeR are caches too, with other keys and values).

``Head.logits`` is the unfolded reference formula. ``Head.fold`` rewrites it for export: every
linear branch summed into one ``(W, b)``; each cache's ``beta`` moved into its keys
(``exp(f @ (beta K).T - beta)``) and its ``alpha`` into its values, and the caches' outer GEMMs
merged with the linear one: ``[f, A_1, ...] @ [W.T; alpha_1 V_1; ...] + b``. One MatMul then
scores every branch; the graph never runs a branch twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipfold.errors import ConfigError

ACTIVATIONS = ("softmax", "sigmoid")


def _finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ConfigError(f"{name} holds {bad} non-finite values (NaN or inf); expected finite numbers")


@dataclass(frozen=True)
class Linear:
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor | None = None  # (C,)

    def __post_init__(self) -> None:
        if self.weight.ndim != 2:
            raise ConfigError(f"linear branch weight must be (classes, dim), got shape {tuple(self.weight.shape)}")
        if self.bias is not None and tuple(self.bias.shape) != (self.weight.shape[0],):
            raise ConfigError(f"linear branch bias has shape {tuple(self.bias.shape)}, "
                              f"expected ({self.weight.shape[0]},) to match its weight")
        _finite("linear branch weight", self.weight)
        if self.bias is not None:
            _finite("linear branch bias", self.bias)

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        out = f @ self.weight.T
        return out if self.bias is None else out + self.bias


@dataclass(frozen=True)
class Cache:
    keys: torch.Tensor  # (N, D), unit rows (cached support features)
    values: torch.Tensor  # (N, C), e.g. one-hot labels
    beta: float  # sharpness
    alpha: float  # residual weight

    def __post_init__(self) -> None:
        if self.keys.ndim != 2 or self.values.ndim != 2 or self.keys.shape[0] != self.values.shape[0]:
            raise ConfigError(
                f"cache branch needs keys (N, dim) and values (N, classes) with the same N; got keys "
                f"{tuple(self.keys.shape)} and values {tuple(self.values.shape)}")
        _finite("cache keys", self.keys)
        _finite("cache values", self.values)

    def affinity(self, f: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.beta * (1.0 - f @ self.keys.T))

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.affinity(f) @ self.values


@dataclass(frozen=True)
class FoldedHead:
    """``logits = [f, exp(f @ Kb_1.T - beta_1), ...] @ weight + bias`` with ``Kb = beta K``."""

    weight: torch.Tensor  # (D + sum N_i, C)
    bias: torch.Tensor  # (C,)
    scaled_keys: tuple[torch.Tensor, ...]  # beta_i K_i, (N_i, D)
    betas: tuple[float, ...]
    activation: str

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        parts = [f] + [torch.exp(f @ k.T - b) for k, b in zip(self.scaled_keys, self.betas)]
        features = torch.cat(parts, dim=-1) if len(parts) > 1 else f
        return features @ self.weight + self.bias


@dataclass(frozen=True)
class Head:
    linears: tuple[Linear, ...]
    caches: tuple[Cache, ...] = ()
    activation: str = "softmax"
    method: str = "zero-shot"

    def __post_init__(self) -> None:
        object.__setattr__(self, "linears", tuple(self.linears))
        object.__setattr__(self, "caches", tuple(self.caches))
        if not self.linears:
            raise ConfigError("a head needs at least one linear branch (the class weights)")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"head activation {self.activation!r} is not one of {ACTIVATIONS}")
        classes, dim = self.linears[0].weight.shape
        for i, branch in enumerate(self.linears):
            if tuple(branch.weight.shape) != (classes, dim):
                raise ConfigError(f"linear branch {i} has shape {tuple(branch.weight.shape)}, "
                                  f"expected ({classes}, {dim}) like branch 0")
        for i, cache in enumerate(self.caches):
            if cache.keys.shape[1] != dim or cache.values.shape[1] != classes:
                raise ConfigError(
                    f"cache branch {i} has keys {tuple(cache.keys.shape)} and values {tuple(cache.values.shape)}; "
                    f"expected keys (N, {dim}) and values (N, {classes}) for {classes} classes of dim {dim}")

    @property
    def num_classes(self) -> int:
        return int(self.linears[0].weight.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.linears[0].weight.shape[1])

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        """The unfolded reference: every branch evaluated as written, then summed."""
        out = sum(branch.logits(f) for branch in self.linears)
        for cache in self.caches:
            out = out + cache.logits(f)
        return out

    def scores(self, f: torch.Tensor) -> torch.Tensor:
        logits = self.logits(f)
        return logits.softmax(-1) if self.activation == "softmax" else logits.sigmoid()

    @torch.no_grad()
    def fold(self) -> FoldedHead:
        # Sum in float64 so that folding adds no rounding beyond the final cast.
        weight = sum(b.weight.double() for b in self.linears).T
        bias = sum((b.bias.double() for b in self.linears if b.bias is not None),
                   torch.zeros(self.num_classes, dtype=torch.float64))
        blocks = [weight] + [c.alpha * c.values.double() for c in self.caches]
        return FoldedHead(
            weight=torch.cat(blocks, dim=0).float().contiguous(),
            bias=bias.float(),
            scaled_keys=tuple((c.beta * c.keys.double()).float().contiguous() for c in self.caches),
            betas=tuple(float(c.beta) for c in self.caches),
            activation=self.activation,
        )
