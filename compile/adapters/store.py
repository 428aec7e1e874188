"""Adapter files: one safetensors file holding a fitted :class:`Head` and its JSON metadata.

Tensors are ``linear.<i>.weight``, ``linear.<i>.bias``, ``cache.<i>.keys``, ``cache.<i>.values``,
``cache.<i>.channels`` (a channel gather) and ``transform.down`` / ``transform.up`` (a residual MLP);
the safetensors header's ``clipfold`` entry is JSON with the format version, the method and its
hyperparameters, the labels, the activation, each cache's beta and alpha, and the backbone the
features came from (open_clip model name and checkpoint sha256). An adapter is only valid on that
backbone: compiling it onto another one is refused, naming both.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from clipfold.compile.heads.ir import Cache, Head, Linear, ResidualMLP
from clipfold.errors import CheckpointError, ConfigError

FORMAT_VERSION = 1
METADATA_KEY = "clipfold"


@dataclass(frozen=True)
class Backbone:
    model: str
    checkpoint_sha256: str | None  # None: random weights, which no adapter can rely on


@dataclass(frozen=True)
class Adapter:
    head: Head
    labels: tuple[str, ...]
    backbone: Backbone
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        if len(self.labels) != self.head.num_classes:
            raise ConfigError(f"adapter has {len(self.labels)} labels but its head scores {self.head.num_classes} classes")

    def check_backbone(self, model: str, checkpoint_sha256: str | None) -> None:
        if self.backbone.checkpoint_sha256 is None or checkpoint_sha256 is None:
            raise CheckpointError(
                "adapters need a backbone with fixed weights (a pretrained tag or checkpoint file); "
                f"this one was fitted on {self.backbone.model} with "
                f"{'random' if self.backbone.checkpoint_sha256 is None else 'fixed'} weights and the "
                f"compile uses {model} with {'random' if checkpoint_sha256 is None else 'fixed'} weights")
        if (self.backbone.model, self.backbone.checkpoint_sha256) != (model, checkpoint_sha256):
            raise CheckpointError(
                f"adapter was fitted on {self.backbone.model} (checkpoint sha256 {self.backbone.checkpoint_sha256[:12]}...) "
                f"but the compile uses {model} (sha256 {checkpoint_sha256[:12]}...); "
                "fit the adapter again on this backbone")


def save_adapter(adapter: Adapter, path: str | Path) -> Path:
    """Write atomically (temporary file, then rename)."""
    path = Path(path)
    head = adapter.head
    tensors: dict[str, torch.Tensor] = {}
    for i, branch in enumerate(head.linears):
        tensors[f"linear.{i}.weight"] = branch.weight.float().contiguous()
        if branch.bias is not None:
            tensors[f"linear.{i}.bias"] = branch.bias.float().contiguous()
    for i, cache in enumerate(head.caches):
        tensors[f"cache.{i}.keys"] = cache.keys.float().contiguous()
        tensors[f"cache.{i}.values"] = cache.values.float().contiguous()
        if cache.channels is not None:
            tensors[f"cache.{i}.channels"] = cache.channels.long().contiguous()
    if head.transform is not None:
        tensors["transform.down"] = head.transform.down.float().contiguous()
        tensors["transform.up"] = head.transform.up.float().contiguous()
    meta = {
        "format_version": FORMAT_VERSION, "method": head.method, "activation": head.activation,
        "labels": list(adapter.labels), "hyperparameters": adapter.hyperparameters,
        "caches": [{"beta": c.beta, "alpha": c.alpha} for c in head.caches],
        "linears": len(head.linears),
        "transform": None if head.transform is None else {"ratio": head.transform.ratio},
        "backbone": {"model": adapter.backbone.model, "checkpoint_sha256": adapter.backbone.checkpoint_sha256},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_adapter(path: str | Path) -> Adapter:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"adapter file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as fh:  # one read: tensors and header metadata
            header = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read adapter {path}: {exc}; expected a clipfold adapter (safetensors)") from None
    if METADATA_KEY not in header:
        raise CheckpointError(f"{path} is a safetensors file but not a clipfold adapter (no '{METADATA_KEY}' metadata)")
    meta = json.loads(header[METADATA_KEY])
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"adapter {path} has format version {meta['format_version']}, this clipfold reads up to "
                              f"{FORMAT_VERSION}; upgrade clipfold")
    try:
        linears = tuple(Linear(tensors[f"linear.{i}.weight"], tensors.get(f"linear.{i}.bias"))
                        for i in range(meta["linears"]))
        caches = tuple(Cache(tensors[f"cache.{i}.keys"], tensors[f"cache.{i}.values"], c["beta"], c["alpha"],
                             tensors.get(f"cache.{i}.channels"))
                       for i, c in enumerate(meta["caches"]))
        spec = meta.get("transform")
        transform = None if spec is None else ResidualMLP(tensors["transform.down"], tensors["transform.up"],
                                                          spec["ratio"])
        backbone = Backbone(**meta["backbone"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"adapter {path} is incomplete: missing {exc}; found tensors {sorted(tensors)}") from None
    head = Head(linears=linears, caches=caches, activation=meta["activation"], method=meta["method"],
                transform=transform)
    return Adapter(head, tuple(meta["labels"]), backbone, meta.get("hyperparameters", {}))
