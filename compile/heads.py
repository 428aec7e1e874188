"""The classification head as data, between fitting an adapter and exporting the graph.

A head is a sum of branches over the unit image embedding ``f`` (1, D):

* :class:`Linear` — ``f @ W.T + b``: zero-shot ensembles, CoOp, TaskRes, GDA, LP++, linear probes;
* :class:`Cache` — ``alpha * exp(-beta * (1 - f @ K.T)) @ V``: Tip-Adapter's key-value cache
  (ProKeR's has dense values; APE's reads a channel subset of ``f``, renormalized, and has refined
  values);
* an optional :class:`ResidualMLP` feature transform applied to ``f`` before every branch
  (CLIP-Adapter: ``n(ratio * A(f) + (1 - ratio) * f)``).

``Head.logits`` is the unfolded reference formula. ``Head.fold`` rewrites it for export: every
linear branch summed into one ``(W, b)``; each cache's ``beta`` moved into its keys
(``exp(f @ (beta K).T - beta)``) and its ``alpha`` into its values, and the caches' outer GEMMs
merged with the linear one: ``[f, A_1, ...] @ [W.T; alpha_1 V_1; ...] + b``. One MatMul then
scores every branch; the graph never runs a branch twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    keys: torch.Tensor  # (N, D'), cached support features; D' = len(channels) with a channel gather
    values: torch.Tensor  # (N, C), e.g. one-hot labels
    beta: float  # sharpness
    alpha: float  # residual weight
    channels: torch.Tensor | None = None  # (D',) int64: the cache reads n(f[:, channels]) (APE)

    def __post_init__(self) -> None:
        if self.keys.ndim != 2 or self.values.ndim != 2 or self.keys.shape[0] != self.values.shape[0]:
            raise ConfigError(
                f"cache branch needs keys (N, dim) and values (N, classes) with the same N; got keys "
                f"{tuple(self.keys.shape)} and values {tuple(self.values.shape)}")
        _finite("cache keys", self.keys)
        _finite("cache values", self.values)
        if self.channels is not None:
            if self.channels.ndim != 1 or len(self.channels) != self.keys.shape[1] or self.channels.is_floating_point():
                raise ConfigError(f"cache channels must be {self.keys.shape[1]} integer indices (one per key "
                                  f"column); got shape {tuple(self.channels.shape)} of {self.channels.dtype}")
            if len(self.channels.unique()) != len(self.channels) or self.channels.min() < 0:
                raise ConfigError("cache channels must be distinct non-negative indices")

    def query(self, f: torch.Tensor) -> torch.Tensor:
        """What the keys are compared with: ``f``, or its channel subset renormalized."""
        return f if self.channels is None else F.normalize(f[:, self.channels], dim=-1)

    def affinity(self, f: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.beta * (1.0 - self.query(f) @ self.keys.T))

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.affinity(f) @ self.values


@dataclass(frozen=True)
class ResidualMLP:
    """CLIP-Adapter's transform: ``n(ratio * relu(relu(f @ W1.T) @ W2.T) + (1 - ratio) * f)``.

    The official adapter reads the unnormalized image feature ``x``; both linears are bias-free and
    ReLU is positively homogeneous, so ``A(x) = |x| A(f)`` and the renormalized result is the same
    on ``f = n(x)``: the head can work on the unit embedding like every other branch.
    """

    down: torch.Tensor  # (H, D)
    up: torch.Tensor  # (D, H)
    ratio: float = 0.2

    def __post_init__(self) -> None:
        if self.down.ndim != 2 or tuple(self.up.shape) != (self.down.shape[1], self.down.shape[0]):
            raise ConfigError(f"residual MLP needs down (hidden, dim) and up (dim, hidden); got "
                              f"{tuple(self.down.shape)} and {tuple(self.up.shape)}")
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"residual ratio must be in [0, 1], got {self.ratio}")
        _finite("residual MLP down weight", self.down)
        _finite("residual MLP up weight", self.up)

    @property
    def dim(self) -> int:
        return int(self.down.shape[1])

    def __call__(self, f: torch.Tensor) -> torch.Tensor:
        adapted = torch.relu(torch.relu(f @ self.down.T) @ self.up.T)
        return F.normalize(self.ratio * adapted + (1.0 - self.ratio) * f, dim=-1)


@dataclass(frozen=True)
class FoldedHead:
    """``logits = [g, exp(q_1 @ Kb_1.T - beta_1), ...] @ weight + bias`` with ``Kb = beta K``,
    ``g = transform(f)`` (or ``f``) and ``q_i`` = ``g`` or its renormalized channel subset."""

    weight: torch.Tensor  # (D + sum N_i, C)
    bias: torch.Tensor  # (C,)
    scaled_keys: tuple[torch.Tensor, ...]  # beta_i K_i, (N_i, D_i)
    betas: tuple[float, ...]
    channels: tuple[torch.Tensor | None, ...]
    transform: ResidualMLP | None
    activation: str

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:
            f = self.transform(f)
        queries = [f if ch is None else F.normalize(f[:, ch], dim=-1) for ch in self.channels]
        parts = [f] + [torch.exp(q @ k.T - b) for q, k, b in zip(queries, self.scaled_keys, self.betas)]
        features = torch.cat(parts, dim=-1) if len(parts) > 1 else f
        return features @ self.weight + self.bias


@dataclass(frozen=True)
class Head:
    linears: tuple[Linear, ...]
    caches: tuple[Cache, ...] = ()
    activation: str = "softmax"
    method: str = "zero-shot"
    transform: ResidualMLP | None = None  # applied to f before every branch

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
            key_dim = dim if cache.channels is None else len(cache.channels)
            if cache.keys.shape[1] != key_dim or cache.values.shape[1] != classes:
                raise ConfigError(
                    f"cache branch {i} has keys {tuple(cache.keys.shape)} and values {tuple(cache.values.shape)}; "
                    f"expected keys (N, {key_dim}) and values (N, {classes}) for {classes} classes of dim {dim}")
            if cache.channels is not None and int(cache.channels.max()) >= dim:
                raise ConfigError(f"cache branch {i} gathers channel {int(cache.channels.max())} of a {dim}-dim embedding")
        if self.transform is not None and self.transform.dim != dim:
            raise ConfigError(f"the feature transform works on dim {self.transform.dim}, the head on dim {dim}")

    @property
    def num_classes(self) -> int:
        return int(self.linears[0].weight.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.linears[0].weight.shape[1])

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        """The unfolded reference: every branch evaluated as written, then summed."""
        if self.transform is not None:
            f = self.transform(f)
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
            channels=tuple(c.channels for c in self.caches),
            transform=self.transform,
            activation=self.activation,
        )
