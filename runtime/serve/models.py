"""The models ``clipfold serve`` answers for: one per bundle's image graph, and ``<name>-text`` for a
bundle with a text tower, each with its batcher, index and protocol tensor descriptions."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Mapping

from clipfold.errors import ConfigError, RequestError
from clipfold.runtime.batcher import DynamicBatcher
from clipfold.runtime.engine import Engine
from clipfold.runtime.retrieval.index import Index
from clipfold.runtime.serve.config import ServeConfig
from clipfold.runtime.serve.inference_protocol import TensorMeta, datatype_of

log = logging.getLogger("clipfold.serve")
VERSION = "1"  # every model has one version


class UnknownModel(RequestError):
    """No served model has that name (HTTP 404)."""


@dataclass
class ServedModel:
    """One protocol model: a bundle's image graph, or its text tower (``kind="text"``)."""

    name: str
    kind: str  # "image" | "text"
    engine: Engine
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    batcher: DynamicBatcher | None = None
    index: Index | None = None
    lock: threading.Lock | None = None  # the text encoder's cache is not thread-safe


def platform_of(m: ServedModel) -> str:
    """The protocol's platform string: the image model of an fp32-native variant is clipfold's own kernel."""
    return "clipfold_native" if m.kind == "image" and m.engine.variant.format == "clipfold-vit" else "onnxruntime_onnx"


def tensor_meta(spec) -> TensorMeta:
    """A manifest TensorSpec as the protocol describes it (dynamic dimensions -1)."""
    return TensorMeta(spec.name, datatype_of(spec.dtype), tuple(d if isinstance(d, int) else -1 for d in spec.shape))


def served_models(engines: Mapping[str, Engine], config: ServeConfig, metrics,
                  indexes: Mapping[str, Index]) -> dict[str, ServedModel]:
    """The image model of every engine, batched as ``config`` says (its queue depth and batches in
    ``metrics``), and the text model of every engine with a text tower."""
    models: dict[str, ServedModel] = {}
    for name, engine in engines.items():
        spec = engine.variant
        models[name] = ServedModel(name, "image", engine, tuple(map(tensor_meta, spec.inputs)),
                                   tuple(map(tensor_meta, spec.outputs)), _batcher(name, engine, config, metrics),
                                   indexes.get(name), threading.Lock())
        if engine.manifest.text is not None:
            dim = engine.manifest.model.embed_dim
            text = ServedModel(f"{name}-text", "text", engine, (TensorMeta("text", "BYTES", (-1,)),),
                               (TensorMeta("embedding", "FP32", (-1, dim)), TensorMeta("truncated", "BOOL", (-1,))),
                               lock=models[name].lock)
            if text.name in engines:
                raise ConfigError(f"bundle {text.name!r} clashes with the text model of bundle {name!r}")
            models[text.name] = text
    return models


def _batcher(name: str, engine: Engine, config: ServeConfig, metrics) -> DynamicBatcher:
    preferred = 1 if config.max_batch == 1 else config.preferred_batch
    if preferred is None:
        preferred, per_image = engine.preferred_batch(config.max_batch)
        log.info("preferred batch", extra={"fields": {"model": name, "preferred_batch": preferred,
                                                      "engine_ms_per_image": {size: round(seconds * 1e3, 3)
                                                                              for size, seconds in per_image.items()}}})
    batcher = engine.batcher(max_batch=config.max_batch, max_delay_ms=config.max_delay_ms,
                             max_queue=config.max_queue, on_batch=metrics.on_batch(name), preferred_batch=preferred)
    metrics.queue.labels(model=name).set_function(lambda b=batcher: b.queue_depth)
    return batcher
