"""Streamed similarity + top-k on the CPU: the score matrix is never materialized.

The gallery is read in blocks of rows. Each block goes through one small ONNX Runtime graph
(:mod:`.graphs.build`): a GEMM scores the block for the whole query batch and TopK keeps each
query's best k, both in C++ (MLAS GEMM, a heap-based TopK); the block's scores are the only
O(Q x block) buffer and are gone when the block is done. Blocks run on a thread pool (one ORT
thread each; ORT releases the GIL), and their k-best lists merge into a running top-k.

Cost model (1M x 512 fp32, Q queries): the GEMMs read the gallery once (2 GB) and do 2*Q*N*D flops
(1 GFLOP per query); selection reads the Q x block scores once from cache. numpy's
``q @ G.T`` + ``argpartition`` instead writes and re-reads the full Q x N matrix (64 MB at Q=16)
and runs small-M GEMMs through a BLAS tuned for large ones. int8 storage reads 4x fewer bytes and
multiplies in integer (exact int32 dots, then the per-row and per-query scales).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import numpy as np

from clipfold.errors import ConfigError

from .gallery import Gallery
from .graphs.build import FILES

# Extra memory: each worker holds one block's scores (Q x B float32), plus the block widened to
# fp32 for fp16 storage; B is chosen so that all workers together stay near this many bytes.
EXTRA_BYTES = 32 << 20


def default_threads() -> int:
    """All cores the process may use; ONNX Runtime's own default ignores CPU affinity masks."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


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


def block_rows_for(queries: int, dim: int, storage: str, workers: int) -> int:
    per_row = 4 * queries + (4 * dim if storage == "fp16" else 0) + 8 * queries  # scores (+ widened row, TopK)
    return int(max(1024, min(1 << 16, EXTRA_BYTES // max(per_row * workers, 1))))


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


_SESSIONS: dict[str, object] = {}
_LOCK = threading.Lock()


def _session(storage: str):
    """One ORT session per storage, shared by all threads (``run`` is thread-safe)."""
    with _LOCK:
        if storage not in _SESSIONS:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = 1  # parallelism comes from running blocks concurrently
            options.inter_op_num_threads = 1
            path = resources.files("clipfold.kernels.graphs").joinpath(FILES[storage])
            _SESSIONS[storage] = ort.InferenceSession(path.read_bytes(), options, providers=["CPUExecutionProvider"])
        return _SESSIONS[storage]


def dequantized_queries(queries: np.ndarray) -> np.ndarray:
    """The queries an int8 gallery is really scored with (the oracle of the int8 path)."""
    feed = _quantize_queries(queries)
    return (feed["queries_t"].T.astype(np.float64) - feed["query_zero"][:, None]) * feed["query_scale"][:, None]


def _quantize_queries(queries: np.ndarray) -> dict[str, np.ndarray]:
    """Per-query asymmetric uint8: q ~= scale * (u - zero). With int8 rows the dot products are
    exact integers (MatMulInteger), so the only error is this rounding and the rows' own."""
    lo, hi = np.minimum(queries.min(axis=1), 0), np.maximum(queries.max(axis=1), 0)
    scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, 255).astype(np.uint8)
    u = np.clip(np.rint(queries / scale[:, None]) + zero[:, None], 0, 255).astype(np.uint8)
    return {"queries_t": np.ascontiguousarray(u.T), "query_zero": zero, "query_scale": scale}


def topk_cpu(queries: np.ndarray, gallery: Gallery, k: int, block_rows: int | None = None,
             threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores (Q, min(k, N)) float32 descending, indices (Q, min(k, N)) int64), streamed."""
    n, nq = len(gallery), len(queries)
    kk = min(int(k), n)
    if kk == 0:
        return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
    workers = threads or default_threads()
    block = block_rows or block_rows_for(nq, gallery.dim, gallery.storage, workers)
    session = _session(gallery.storage)
    feeds = _quantize_queries(queries) if gallery.storage == "int8" else {"queries": queries}

    def score(item):
        offset, shard, lo, hi = item
        feed = {**feeds, "rows": shard.rows[lo:hi], "k": np.array([min(kk, hi - lo)], dtype=np.int64)}
        if gallery.storage == "int8":
            feed["row_scale"] = np.asarray(shard.scales[lo:hi], dtype=np.float32).reshape(-1, 1)
        values, indices = session.run(None, feed)
        return values, indices + offset

    top = RunningTopK(nq, kk)
    with ThreadPoolExecutor(workers) as pool:
        # map() keeps at most a few blocks in flight beyond the workers: results merge in order.
        for values, indices in _bounded_map(pool, score, gallery.blocks(block), workers * 2):
            top.add(values, indices)
    return top.scores, top.indices


def _bounded_map(pool: ThreadPoolExecutor, fn, items, window: int):
    """Like ``pool.map`` but with at most ``window`` tasks pending, so memory stays bounded."""
    pending = []
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.pop(0).result()
    for future in pending:
        yield future.result()


def rescore(queries: np.ndarray, gallery: Gallery, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact fp32 scores of candidate ``indices`` (Q, C) from the gallery's kept fp32 rows; top ``k``."""
    exact = gallery.gather("exact", indices)  # (Q, C, D)
    scores = np.einsum("qd,qcd->qc", queries, exact, dtype=np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(indices, order, axis=1)
