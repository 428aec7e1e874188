"""``clipfold index --ray``: embed an image collection on a Ray cluster into the same ``Index``.

The pipeline is Ray Data's: the driver lists the files not yet indexed (path, size, mtime, as
:func:`~clipfold.runtime.retrieval.index.build_index` does), ``from_items`` turns them into a dataset,
``map_batches`` runs them through a pool of actors that each hold one runtime :class:`Engine`
(opened once per actor, ONNX Runtime with ``threads_per_actor`` threads), and the driver streams
the embeddings back and commits them as index shards with :class:`~clipfold.runtime.retrieval.index.IndexWriter`:
the same format, checksums and crash guarantee (a committed shard survives; a re-run embeds only
what is missing). Embeddings are small (``dim`` floats per image), so the driver's share of the
work is a few kilobytes per image.

On a multi-node cluster the actors open the bundle and read the images by path: both must be at the
same path on every node (a shared or network file system). Each actor checks that it opened the
same graph as the driver before embedding anything.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

import clipfold.runtime.retrieval.index as index_module
from clipfold import errors
from clipfold.errors import BundleError, ClipfoldError, ConfigError
from clipfold.runtime.retrieval.index import Index, IndexWriter, bundle_identity, embed_files


class _Embedder:
    """A Ray Data actor: one Engine, opened once; embeds a batch of paths."""

    def __init__(self, bundle: str, variant: str, identity: dict, threads: int, batch: int):
        from clipfold.runtime import Engine

        self.engine = Engine.open(bundle, variant=variant, threads=threads, batch_size=batch)
        if bundle_identity(self.engine) != identity:
            raise BundleError(f"a Ray worker opened {bundle} as {bundle_identity(self.engine)}, not the driver's "
                              f"{identity}: the bundle must be the same file at the same path on every node")

    def __call__(self, batch: dict) -> dict:
        # Ray Data re-raises a UDF's exception as its own UserCodeException holding only text, so a
        # clipfold error travels back as data, "Type: message" per row, and the driver raises it by
        # type; a broken image is its own row's error (recorded, unless --strict).
        n = len(batch["rel"])
        try:
            embedding, failures = embed_files(self.engine, list(batch["path"]))
            error = [f"{type(e).__name__}: {e}" if e is not None else "" for e in failures]
        except ClipfoldError as exc:
            embedding = np.zeros((n, self.engine.manifest.model.embed_dim), np.float32)
            error = [f"{type(exc).__name__}: {exc}"] * n
        return {"rel": batch["rel"], "embedding": embedding, "error": np.array(error)}


def _user_error(exc: BaseException) -> BaseException:
    """The ClipfoldError an actor raised (a bad image, another bundle), out of Ray's wrappers."""
    seen, frontier = set(), [exc]
    while frontier:
        error = frontier.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, ClipfoldError):
            return error
        frontier.extend(e for e in (getattr(error, "cause", None), error.__cause__, error.__context__)
                        if isinstance(e, BaseException))
    return ClipfoldError(f"a Ray worker failed while embedding: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")


def _ray():
    try:
        import ray
        import ray.data  # configures Ray Data's loggers: quieten them after this
    except ImportError:
        raise ConfigError("clipfold index --ray needs Ray Data: pip install 'clipfold[ray]'") from None
    return ray


def build_index_ray(bundle: str | Path, folder: str | Path, out: str | Path, storage: str = "fp32", *,
                    variant: str | None = None, address: str | None = None, actors: int = 2,
                    threads_per_actor: int = 1, batch_size: int = 64,
                    progress: Callable[[str], None] | None = None, strict: bool = False) -> Index:
    """Embed every image under ``folder`` not yet in the index ``out`` with ``actors`` Ray actors.

    A broken image is recorded in the index and tried again next run, as by
    :func:`~clipfold.runtime.retrieval.index.build_index`; ``strict`` raises it instead.

    ``address`` joins a running cluster (``"auto"``, ``"ray://host:10001"``); without it a local
    Ray instance with ``actors * threads_per_actor`` CPUs is started and stopped again.
    """
    from clipfold.runtime import Engine

    for label, value in (("actors", actors), ("threads per actor", threads_per_actor), ("batch size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{label} must be a positive integer, got {value!r}")
    engine = Engine.open(bundle, variant=variant)  # the driver checks the bundle; the actors embed
    writer = IndexWriter(engine, folder, out, storage)
    todo = writer.pending()
    if not todo:
        return writer.finish(progress)
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        _start(ray, address, actors * threads_per_actor)
    quiet = logging.getLogger("ray.data")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # Ray Data logs every execution plan at INFO; progress is ours
    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    try:
        context.enable_progress_bars = False
        dataset = _dataset(ray, engine, writer.identity, todo, actors, threads_per_actor, batch_size)
        try:
            for done in _commit(dataset, writer, strict):
                if progress is not None:
                    progress(f"indexed {done:,}/{len(todo):,} new or changed images (Ray, {actors} actors)")
        except ray.exceptions.RayError as exc:
            raise _user_error(exc) from None
    finally:
        context.enable_progress_bars = bars
        quiet.setLevel(level)
        if started:
            ray.shutdown()
    return writer.finish(progress)


def _start(ray, address: str | None, cpus: int) -> None:
    if address is None and not os.environ.get("RAY_ADDRESS"):
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    else:  # an existing cluster: --address, or RAY_ADDRESS as `ray job submit` sets it
        ray.init(address=address, logging_level="ERROR")


def _dataset(ray, engine, identity: dict, todo, actors: int, threads: int, batch_size: int):
    """The files to embed as a Ray dataset, mapped through a pool of ``actors`` :class:`_Embedder`."""
    items = [{"rel": rel, "path": str(path.resolve())} for rel, path in todo]
    blocks = max(1, -(-len(items) // batch_size))
    return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        _Embedder, batch_size=batch_size, batch_format="numpy", num_cpus=threads,
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"bundle": str(Path(engine.path).resolve()), "variant": engine.variant.name,
                               "identity": identity, "threads": threads, "batch": batch_size})


def _commit(dataset, writer: IndexWriter, strict: bool) -> Iterator[int]:
    """Stream the embeddings back and commit them as index shards, one batch at a time; yields the
    number of images committed so far after each."""
    done = 0
    for batch in dataset.iter_batches(batch_size=index_module.BATCH_FILES, batch_format="numpy"):
        reasons = [_failure(str(failed), strict) for failed in batch["error"]]
        writer.commit([str(rel) for rel in batch["rel"]], np.asarray(batch["embedding"], dtype=np.float32), reasons)
        done += len(batch["rel"])
        yield done


def _failure(failed: str, strict: bool) -> str | None:
    """An actor's "Type: message" for one image: the reason it is recorded as broken (None: embedded),
    raised as that ClipfoldError instead when it is not a bad image or ``strict`` (the batches committed
    so far stay; a re-run resumes after them)."""
    if not failed:
        return None
    kind, _, message = failed.partition(": ")
    kind = getattr(errors, kind, None)
    kind = kind if isinstance(kind, type) and issubclass(kind, ClipfoldError) else ClipfoldError
    if strict or not issubclass(kind, errors.ImageError):
        raise kind(message)
    return message
