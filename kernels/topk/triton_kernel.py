"""The Triton kernels of :mod:`clipfold.kernels.topk.triton_launcher` (the launcher; read its docstring for
the algorithm and the cost model): ``topk_kernel`` and the helpers it calls (jit functions are inlined
into the kernel: the split costs nothing on the GPU).

This module imports triton at its top and is imported only by the launcher, on its first call:
``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates, so the interpreter flag must be set
before this import, and nothing here runs when triton is absent. The helpers are module-level
because a jit function finds the names it calls in its module's globals (the interpreter ignores
closures).
"""

from __future__ import annotations

import triton
import triton.language as tl


# Sorting networks on (rows, 2, ..., 2) "cubes": axis a > 0 is bit m - a of the position in a
# row of 2**m. A compare-and-swap along one bit is a max and a min over that size-2 axis, which
# the GPU does in registers and the interpreter in numpy (tl.sort's xor_sum runs per element
# there, ~100x slower); tl.topk/tl.sort would also sort values only, not (score, row) pairs.
@triton.jit
def _bit(m: tl.constexpr, j: tl.constexpr):
    """1 where bit ``j`` of the position is set, shaped to broadcast over a cube of ``m`` bits."""
    return tl.reshape(tl.arange(0, 2), [1] * (m - j) + [2] + [1] * j)


@triton.jit
def _merge(h, m: tl.constexpr, stage: tl.constexpr, order: tl.constexpr):
    """Bitonic merge of every run of 2**stage: descending (order 0), ascending (1), or
    alternating with bit ``stage`` (2, the inner stages of a sort)."""
    if order == 2:
        flip = _bit(m, stage)
    else:
        flip = order
    for i in tl.static_range(stage):
        j: tl.constexpr = stage - 1 - i
        high = tl.max(h, axis=m - j, keep_dims=True)
        low = tl.min(h, axis=m - j, keep_dims=True)
        h = tl.where((_bit(m, j) ^ flip) == 0, high, low)
    return h


@triton.jit
def _topk_rows(x, LOG_N: tl.constexpr, LOG_K: tl.constexpr, ASCENDING: tl.constexpr):
    """The 2**LOG_K largest of each row of ``x`` (rows, 2**LOG_N), sorted. As in tl.topk: sort
    runs of 2**LOG_K in alternating order, then halve: the element-wise max of two neighbouring
    runs (one descending, one ascending) is their top half, bitonic, merged in LOG_K steps."""
    h = tl.reshape(x, [x.shape[0]] + [2] * LOG_N)
    for s in tl.static_range(1, LOG_K + 1):
        h = _merge(h, LOG_N, s, 2 if s < LOG_N else ASCENDING)
    for i in tl.static_range(LOG_K + 1, LOG_N + 1):
        h = tl.max(h, axis=LOG_N - i + 1)  # bit LOG_K: pairs of neighbouring runs
        h = _merge(h, LOG_N - i + LOG_K, LOG_K, 2 if i < LOG_N else ASCENDING)
    return tl.reshape(h, [x.shape[0], 2**LOG_K])


@triton.jit
def _merge_sorted(best, top, LOG_K: tl.constexpr):
    """``best`` descending and ``top`` ascending (rows, 2**LOG_K) -> the 2**LOG_K best, descending."""
    h = tl.reshape(tl.maximum(best, top), [best.shape[0]] + [2] * LOG_K)
    return tl.reshape(_merge(h, LOG_K, LOG_K, 0), best.shape)


@triton.jit
def _decode(keys):
    """Keys -> their fp32 scores (the high word, made order-preserving again)."""
    high = (keys >> 32).to(tl.int32)
    return tl.where(high >= 0, high, high ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _tile_scores(q_ptr, g_ptr, q_rows, q_live, rows, row_live, dim, stride_q, stride_g,
                 BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WIDEN: tl.constexpr):
    """(BLOCK_Q, BLOCK_N) inner products of the query block with one tile of gallery rows; -inf
    where the query or the row is past the end."""
    acc = tl.zeros((BLOCK_Q, BLOCK_N), tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_live = cols < dim
        q = tl.load(q_ptr + q_rows[:, None].to(tl.int64) * stride_q + cols[None, :],
                    mask=q_live[:, None] & col_live[None, :], other=0.0)
        # (BLOCK_D, BLOCK_N): the gallery tile, transposed by the addressing; int64 offsets
        # because N * D passes 2**31 for real galleries (10M x 512).
        g = tl.load(g_ptr + rows[None, :].to(tl.int64) * stride_g + cols[:, None],
                    mask=row_live[None, :] & col_live[:, None], other=0.0)
        if WIDEN == 1:
            g = g.to(tl.float16)
        if WIDEN == 2:
            acc = tl.dot(q.to(tl.float32), g.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(q, g, acc)
    return tl.where(q_live[:, None] & row_live[None, :], acc, float("-inf"))


@triton.jit
def _insert(best, keys, need, LOG_N: tl.constexpr, LOG_K: tl.constexpr, EXTRACT: tl.constexpr):
    """The running top-k ``best`` with a tile's ``keys`` merged in; ``need``: the most keys any
    query takes from this tile."""
    if need <= EXTRACT:
        # The common case once the buffer is warm: a few new entries. Each round moves every
        # query's best remaining key over its buffer's minimum, if larger (~6 operations per
        # tile element, against ~100 for the sorting network).
        for _ in range(0, need):
            top = tl.max(keys, axis=1)
            low = tl.min(best, axis=1)
            take = (best == low[:, None]) & (top > low)[:, None]
            best = tl.where(take, top[:, None], best)
            keys = tl.where(keys == top[:, None], -9223372036854775807 - 1, keys)
    else:
        # Warm-up, or data sorted against us: the tile's K_TILE best (ascending) and the buffer
        # sorted descending form a bitonic pair.
        best = _merge_sorted(_topk_rows(best, LOG_K, LOG_K, 0), _topk_rows(keys, LOG_N, LOG_K, 1), LOG_K)
    return best


@triton.jit
def topk_kernel(
    # pointers
    q_ptr, g_ptr, out_scores_ptr, out_rows_ptr,
    # sizes
    n_queries, n_rows, dim, rows_per_split, k,
    # strides (the last dimension of each is contiguous)
    stride_q, stride_g, stride_oq, stride_os,
    # tuning
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K_TILE: tl.constexpr,
    LOG_N: tl.constexpr, LOG_K: tl.constexpr,  # log2(BLOCK_N), log2(K_TILE)
    WIDEN: tl.constexpr,  # 0: multiply as stored; 1: gallery tile to fp16 (fp8); 2: both to fp32
    EXTRACT: tl.constexpr,  # up to this many insertions per query, extract maxima; above, sort
):
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    q_rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_live = q_rows < n_queries
    lo = pid_s * rows_per_split
    hi = tl.minimum(lo + rows_per_split, n_rows)

    # The running top-k: (BLOCK_Q, K_TILE) keys, unsorted; ``kth`` is each query's k-th score.
    # Empty slots hold -inf keys made distinct by their slot number, so that "replace the
    # minimum" replaces one slot. -inf's key is (bits(-inf) ^ 0x7FFFFFFF) << 32.
    best = tl.full((BLOCK_Q, K_TILE), -9187343244130779136, tl.int64) | tl.arange(0, K_TILE)[None, :]
    kth = tl.full((BLOCK_Q,), float("-inf"), tl.float32)

    for start in range(lo, hi, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        scores = _tile_scores(q_ptr, g_ptr, q_rows, q_live, rows, rows < hi, dim, stride_q, stride_g,
                              BLOCK_Q, BLOCK_N, BLOCK_D, WIDEN)
        # Merge only when some query's k-th best is beaten (strictly: an equal score changes
        # nothing but which of the tied rows is returned).
        need = tl.max(tl.sum((scores > kth[:, None]).to(tl.int32), axis=1), axis=0)
        if need > 0:
            # Keys: fp32 bits made order-preserving (negative floats count down) in the high
            # word, 2**31 - 1 - row in the low one.
            bits = scores.to(tl.int32, bitcast=True)
            bits = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
            keys = (bits.to(tl.int64) << 32) | (0x7FFFFFFF - rows)[None, :].to(tl.int64)
            best = _insert(best, keys, need, LOG_N, LOG_K, EXTRACT)
            kth = _decode(tl.min(best, axis=1))

    best = _topk_rows(best, LOG_K, LOG_K, 0)  # sorted, descending
    slots = tl.arange(0, K_TILE)
    scores = _decode(best)
    found = (0x7FFFFFFF - (best & 0x7FFFFFFF)).to(tl.int64)
    found = tl.where(scores == float("-inf"), -1, found)  # fewer than k rows in this split
    offsets = q_rows[:, None].to(tl.int64) * stride_oq + pid_s * stride_os + slots[None, :]
    mask = q_live[:, None] & (slots < k)[None, :]
    tl.store(out_scores_ptr + offsets, scores, mask=mask)
    tl.store(out_rows_ptr + offsets, found, mask=mask)
