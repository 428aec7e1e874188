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
(``exp(f @ (beta K).T - beta)``). A cache whose values are one positive entry per row (one-hot
labels, possibly reweighted) becomes a reduction: ``alpha`` and the weights go into a per-key bias
and the keys are sorted by label, so the branch is ``exp(...).reshape(B, C, shots).sum(-1)``. Any
other cache keeps ``alpha V`` as rows of the outer GEMM, merged with the linear one:
``[f, A_1, ...] @ [W.T; alpha_1 V_1; ...] + b``. The graph never runs a branch twice.
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


PAD_BIAS = -1e4  # exp(q . 0 - 1e4) is exactly 0 in float32 and float64: padded keys add nothing


@dataclass(frozen=True)
class FoldedCache:
    """One cache branch as exported: ``a = exp(q @ keys.T + key_bias)``, then either its own rows of
    the merged GEMM (``slots`` None) or, for one-hot values, a per-class sum: the keys are sorted by
    label and padded to ``slots`` per class, so ``a.reshape(B, C, slots).sum(-1)`` is the branch."""

    keys: torch.Tensor  # (N', D_i): beta K, label-sorted and padded when reduced
    key_bias: torch.Tensor  # (N',): -beta, plus log(alpha * value) when reduced; PAD_BIAS on padding
    channels: torch.Tensor | None
    slots: int | None

    def activations(self, f: torch.Tensor) -> torch.Tensor:
        query = f if self.channels is None else F.normalize(f[:, self.channels], dim=-1)
        return torch.exp(query @ self.keys.T + self.key_bias)


@dataclass(frozen=True)
class FoldedHead:
    """``logits = [g, a_i (GEMM caches)] @ weight + bias + sum_i reduce(a_i) (reduced caches)`` with
    ``g = transform(f)`` (or ``f``) and ``a_i`` each cache's activations (:class:`FoldedCache`)."""

    weight: torch.Tensor  # (D + sum N_i over GEMM caches, C)
    bias: torch.Tensor  # (C,)
    caches: tuple[FoldedCache, ...]
    transform: ResidualMLP | None
    activation: str

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:
            f = self.transform(f)
        parts, reduced = [f], 0.0
        for cache in self.caches:
            a = cache.activations(f)
            if cache.slots is None:
                parts.append(a)
            else:
                reduced = reduced + a.reshape(a.shape[0], -1, cache.slots).sum(-1)
        features = torch.cat(parts, dim=-1) if len(parts) > 1 else f
        return features @ self.weight + self.bias + reduced


def _fold_cache(cache: Cache, classes: int) -> tuple[FoldedCache, torch.Tensor | None]:
    """The folded branch, and its GEMM rows ``alpha V`` (None when it folds to a reduction).

    Cost model per image, N keys and C classes: the GEMM rows cost N*C multiply-adds and N*C stored
    weights (Tip-Adapter on ImageNet, 16 shots: 16M of each, 64 MB fp32); the reduction costs N'
    additions and stores nothing. It applies when every value row has one positive entry (one-hot
    labels, APE's refined values) and ``alpha > 0``, so ``alpha * v * exp(x) = exp(x + log(alpha v))``,
    and when padding to equal shots per class at most doubles the keys.
    """
    keys = cache.beta * cache.keys.double()
    values = cache.values.double()
    nonzero = values != 0
    one_per_row = bool((nonzero.sum(1) == 1).all()) and bool((values[nonzero] > 0).all())
    if one_per_row and cache.alpha > 0 and len(values):
        labels = nonzero.double().argmax(1)
        weights = values[torch.arange(len(values)), labels]
        counts = torch.bincount(labels, minlength=classes)
        slots = int(counts.max())
        if slots * classes <= 2 * len(values):
            padded_keys = torch.zeros(classes * slots, keys.shape[1], dtype=torch.float64)
            padded_bias = torch.full((classes * slots,), PAD_BIAS, dtype=torch.float64)
            for k in range(classes):
                rows = torch.nonzero(labels == k).flatten()
                at = k * slots + torch.arange(len(rows))
                padded_keys[at] = keys[rows]
                padded_bias[at] = -cache.beta + torch.log(cache.alpha * weights[rows])
            return FoldedCache(padded_keys.float().contiguous(), padded_bias.float(), cache.channels, slots), None
    bias = torch.full((len(keys),), -float(cache.beta), dtype=torch.float32)
    return FoldedCache(keys.float().contiguous(), bias, cache.channels, None), cache.alpha * values


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
        folded = [_fold_cache(c, self.num_classes) for c in self.caches]
        blocks = [weight] + [rows for _, rows in folded if rows is not None]
        return FoldedHead(
            weight=torch.cat(blocks, dim=0).float().contiguous(),
            bias=bias.float(),
            caches=tuple(cache for cache, _ in folded),
            transform=self.transform,
            activation=self.activation,
        )
