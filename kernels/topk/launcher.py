"""Streamed similarity + top-k on the CPU: the score matrix is never materialized.

The work is a small C kernel (``_topk.c``, built at install): it walks a range of gallery rows in
blocks of 96, scores each block for the whole query batch in registers, and pushes every score
into its query's running top-k (a min-heap; one compare against the k-th best per score). The
scoring path is chosen at run time from cpuid (:func:`kernel_isa`), or forced per call (``isa=``)
or per process (``CLIPFOLD_TOPK_ISA``): ``avx512`` (1-4 queries: dot tiles over the rows as
stored; more: 16-query panels x rows broadcast from memory, ``_topk_avx512.h``), ``avx2`` (one
query streams the rows one by one; a few use tiles of 4 queries x 3 rows; 64 or more, packed
16 x 6 panels) or ``portable`` (plain C). Python splits the gallery into one row range per thread
(ctypes releases the GIL) and merges the threads' k-lists.

Cost model (1M x 512 fp32, Q queries): the gallery is read from memory once (2 GB) whatever Q, and
2*Q*N*D flops (1 GFLOP per query) run at the FMA ports' pace once Q is past a few queries; numpy's
``q @ G.T`` + ``argpartition`` instead writes and re-reads the full Q x N matrix (64 MB at Q=16)
and runs small-M GEMMs through a BLAS tuned for large ones. Extra memory is O(Q x 96 + 96 x D) per
thread plus the k-lists (and a copy of the queries). fp16 rows read 2x and int8 rows 4x fewer bytes; they are widened to fp32
a block at a time, so every storage is scored in fp32 with the queries as given.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from importlib import machinery
from pathlib import Path

import numpy as np

from clipfold.errors import ConfigError
from clipfold.kernels.cpu_runtime import default_threads, load_extension
from clipfold.kernels.topk.gallery import STORAGES, Gallery

STORAGE_CODES = {"fp32": 0, "fp16": 1, "int8": 2}
# A range is split across threads only when each part keeps at least this many multiply-adds
# (~0.1 ms of work): below it, waking a thread costs more than it saves (small label heads).
MIN_TASK_MACS = 1 << 23

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """One long-lived pool per thread count: a server calls the kernel per request."""
    with _POOLS_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="clipfold-topk")
        return _POOLS[workers]


def _forget_pools_after_fork() -> None:
    """A forked child (gunicorn --preload, multiprocessing's fork) inherits the pools but none of
    their threads: work submitted there would wait forever. The child starts its own."""
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_after_fork)


def check_queries(queries, dim: int) -> np.ndarray:
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2:
        raise ConfigError(f"queries must be (Q, D) or (D,), got shape {np.shape(queries)}")
    if not np.issubdtype(q.dtype, np.floating):
        raise ConfigError(f"queries must be floating point, got {q.dtype}")
    if q.shape[1] != dim:
        raise ConfigError(f"queries have width {q.shape[1]} but the gallery rows have width {dim}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(q).all():
        bad = np.flatnonzero(~np.isfinite(q).all(axis=1))
        raise ConfigError(f"queries {bad[:5].tolist()} hold NaN or infinity; every query must be finite")
    return q


class RunningTopK:
    """Per-query running top-k (scores descending), merged block by block."""

    def __init__(self, queries: int, k: int):
        self.k = k
        self.scores = np.full((queries, k), -np.inf, dtype=np.float32)
        self.indices = np.full((queries, k), -1, dtype=np.int64)

    def add(self, scores: np.ndarray, indices: np.ndarray) -> None:
        """Merge candidates (Q, c) with their global indices; only those above the k-th best count."""
        rows, cols = np.nonzero(scores > self.scores[:, -1][:, None])
        if rows.size == 0:
            return
        q, k = self.scores.shape
        s = np.concatenate([self.scores.ravel(), scores[rows, cols]])
        r = np.concatenate([np.repeat(np.arange(q), k), rows])
        i = np.concatenate([self.indices.ravel(), indices[rows, cols]])
        order = np.lexsort((-s, r))  # by query, then score descending
        starts = np.searchsorted(r[order], np.arange(q))
        keep = order[(starts[:, None] + np.arange(k)).ravel()]
        self.scores = s[keep].reshape(q, k)
        self.indices = i[keep].reshape(q, k)


@lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    lib = load_extension(Path(__file__).parent, "_topk", "top-k kernel")
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.clipfold_topk.argtypes = [pointer, size, size, pointer, ctypes.c_int, pointer, size, size, size,
                                  pointer, pointer, pointer, ctypes.c_int]
    lib.clipfold_topk.restype = ctypes.c_int
    lib.clipfold_topk_isa.restype = ctypes.c_int
    return lib


ISAS = ("portable", "avx2", "avx512")  # the kernel's scoring paths, in the C side's order
ISA_ENV = "CLIPFOLD_TOPK_ISA"  # forces one path (benchmarks, tests); unset: the best this CPU runs


def kernel_isa() -> str:
    """The best scoring path this CPU runs: ``avx512`` (AVX-512 F/BW/DQ/VL), ``avx2`` (AVX2 + FMA +
    F16C) or ``portable`` (plain C loops). Chosen at run time from cpuid, so one build runs anywhere."""
    return ISAS[_library().clipfold_topk_isa()]


def available_isas() -> tuple[str, ...]:
    """Every path this CPU can run, slowest first (each one is tested against the oracle)."""
    return ISAS[: _library().clipfold_topk_isa() + 1]


def resolve_isa(isa: str | None = None) -> str:
    """``isa``, else ``$CLIPFOLD_TOPK_ISA``, else :func:`kernel_isa`; refused when this CPU lacks it."""
    name = isa or os.environ.get(ISA_ENV) or kernel_isa()
    if name not in ISAS:
        raise ConfigError(f"unknown top-k kernel path {name!r}; expected one of {list(ISAS)}")
    if name not in available_isas():
        raise ConfigError(f"this CPU cannot run the {name} top-k path (it runs {list(available_isas())}); "
                          f"unset {ISA_ENV} or pick one of those")
    return name


def _run(queries: np.ndarray, rows: np.ndarray, scales: np.ndarray | None, storage: str, base: int, k: int,
         isa: str, logsumexp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One kernel call over ``rows`` (contiguous): each query's best ``k`` (and the log-sum-exp of
    all its scores when asked)."""
    # The C side trusts these: raw pointers, float32 queries, rows of the storage's dtype and width.
    if queries.dtype != np.float32 or queries.ndim != 2 or not queries.flags.c_contiguous:
        raise ConfigError(f"the kernel takes C-contiguous float32 (Q, D) queries, got {queries.dtype} {queries.shape}")
    if rows.dtype != STORAGES[storage] or rows.ndim != 2 or rows.shape[1] != queries.shape[1]:
        raise ConfigError(f"{storage} gallery rows must be {STORAGES[storage].__name__} (N, {queries.shape[1]}), "
                          f"got {rows.dtype} {rows.shape}")
    if storage == "int8" and (scales is None or len(scales) != len(rows)):
        raise ConfigError(f"int8 gallery rows need one scale each: {len(rows)} rows, "
                          f"{'no' if scales is None else len(scales)} scales")
    rows = np.ascontiguousarray(rows)
    if scales is not None:
        scales = np.ascontiguousarray(scales, dtype=np.float32)
    nq = len(queries)
    out_scores = np.empty((nq, k), np.float32)
    out_indices = np.empty((nq, k), np.int64)
    lse = np.empty(nq, np.float32) if logsumexp else None
    status = _library().clipfold_topk(
        queries.ctypes.data, nq, queries.shape[1], rows.ctypes.data, STORAGE_CODES[storage],
        None if scales is None else scales.ctypes.data, len(rows), base, k,
        out_scores.ctypes.data, out_indices.ctypes.data, None if lse is None else lse.ctypes.data, ISAS.index(isa))
    if status == -2:  # resolve_isa checked it: only a CPU that changed under us gets here
        raise ConfigError(f"this CPU cannot run the {isa} top-k path")
    if status != 0:
        raise MemoryError(f"the top-k kernel could not allocate its scratch for {nq} queries x {queries.shape[1]} dims")
    return out_scores, out_indices, lse


def topk_cpu(queries: np.ndarray, gallery: Gallery, k: int, block_rows: int | None = None,
             threads: int | None = None, isa: str | None = None, logsumexp: bool = False):
    """(scores (Q, min(k, N)) float32 descending, indices (Q, min(k, N)) int64), streamed; with
    ``logsumexp``, also (Q,) float32: log of the sum of exp over every score (softmax's normalizer).

    Each shard is split into one contiguous range per thread (fewer for small work, see
    :data:`MIN_TASK_MACS`), or into ranges of ``block_rows`` rows;
    ``isa`` forces one scoring path (see :func:`resolve_isa`; tests run each against the oracle).
    """
    isa = resolve_isa(isa)
    n, nq = len(gallery), len(queries)
    kk = min(int(k), n)
    if kk == 0:
        empty = np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
        return (*empty, np.full(nq, -np.inf, np.float32)) if logsumexp else empty
    workers = threads or default_threads()
    tasks = []
    for shard, offset in zip(gallery.shards, gallery.offsets):
        parts = max(1, min(workers, len(shard.rows) * nq * gallery.dim // MIN_TASK_MACS))
        size = block_rows or -(-len(shard.rows) // parts)
        for lo in range(0, len(shard.rows), max(1, int(size))):
            hi = min(len(shard.rows), lo + int(size))
            tasks.append((shard, int(offset), lo, hi))

    def score(task):
        shard, offset, lo, hi = task
        scales = None if shard.scales is None else shard.scales[lo:hi]
        return _run(queries, shard.rows[lo:hi], scales, gallery.storage, offset + lo, min(kk, hi - lo), isa,
                    logsumexp)

    if len(tasks) == 1:  # small work: one call on this thread, its k-list is the answer
        values, indices, lse = score(tasks[0])
        return (values, indices, lse) if logsumexp else (values, indices)
    top, parts = RunningTopK(nq, kk), []
    for values, indices, lse in _pool(workers).map(score, tasks):
        top.add(values, indices)
        parts.append(lse)
    if logsumexp:
        return top.scores, top.indices, np.logaddexp.reduce(np.stack(parts), axis=0).astype(np.float32)
    return top.scores, top.indices


def rescore(queries: np.ndarray, gallery: Gallery, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact fp32 scores of candidate ``indices`` (Q, C) from the gallery's kept fp32 rows; top ``k``."""
    exact = gallery.gather("exact", indices)  # (Q, C, D)
    scores = np.einsum("qd,qcd->qc", queries, exact, dtype=np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(indices, order, axis=1)
