"""Fused similarity + top-k on the GPU in Triton: query tile x gallery tile by ``tl.dot``, the
best k per query kept on chip, one small merge at the end. The Q x N score matrix is never stored.

``topk_similarity_triton(queries, gallery, k)`` takes torch tensors: a (N, D) gallery stored fp16,
bf16 or fp8 (``torch.float8_e4m3fn``, GPUs of capability 8.9 and up) on a CUDA device, or on the
CPU under ``TRITON_INTERPRET=1`` (how CI tests it). It returns ``(scores, indices)``: (Q, min(k, N))
float32 descending and int64, like :func:`clipfold.kernels.topk_similarity`.

Cost model (N x D gallery, Q queries, fp16 storage). The kernel reads the gallery once per query
tile: N * D * 2 bytes (10 GB for 10M x 512), and does 2 * Q * N * D flops (10 GFLOP per query):
Q flops per byte read (2Q for fp8). An H100 (~3.3 TB/s, ~990 TFLOP/s dense fp16) is
bandwidth-bound below ~300 flops/byte, so for Q <= 64 (one tile of <= 64 queries) the kernel
should run at the speed of one gallery read (~3 ms for 10 GB), however many queries the tile
holds; ``tl.dot`` on tensor cores makes the 64 x 128 x 64 tile products nearly free next to the
loads. For large Q (1,024) the same tiles become compute-bound: 10 TFLOP, ~11 ms at peak, while
``torch.mm`` + ``torch.topk`` writes and re-reads the Q x N score matrix (20 GB fp16 for 1,024 x
10M) and runs a full top-k over 10M columns per query. Query tiles sit on grid axis 0, so the
programs that share a gallery split run side by side and re-read it (Q / BLOCK_Q times in all)
from L2, not from memory.

Keeping the top-k on chip. Scores become int64 keys: the fp32 bits, mapped so that integer order
is float order, in the high word; ``2**31 - 1 - row`` in the low word (ties go to the lower row),
so a max or a sort moves a score and its row together (``tl.sort``/``tl.topk`` sort values only).
Each program keeps a (BLOCK_Q, K_TILE) buffer of keys, K_TILE = the power of two >= k, and each
query's K_TILE-th best score so far (its threshold: at most the k-th). Per gallery tile, after
``tl.dot``: one compare and one sum per score count the entries above their query's threshold;
a tile where none are (nearly all of them, after
the first few, for k << rows per split) costs nothing more. Otherwise, with at most EXTRACT (8)
entries for every query, each round moves each query's best remaining key over its buffer's
minimum (~6 operations per tile score per round); with more (warm-up, k near the tile size, data
sorted against us), a sorting network in registers: the tile's K_TILE best, ascending, and the
buffer sorted descending are a bitonic pair, so ``max`` of the two is the K_TILE best of both and
log2(K_TILE) compare-and-swap steps sort it. Each (query tile, gallery split) program writes its k
best to a (Q, splits, k) buffer (12 bytes per entry), and ``torch.topk`` over the splits * k
candidates per query makes the final answer: O(Q x splits x k) extra memory, never O(Q x N).

The k limit. K_TILE <= 2,048 (so k <= 2,048): a tile must hold at least K_TILE rows for the
sorting network, and the buffer, the tile's scores and its keys live in registers. Up to k = 256
the default tiles are 16 or 64 queries x 128 rows; above it, 16 queries x K_TILE rows with 8 warps,
where the buffer (16 x 1,024 int64 = 128 KB per program at k = 1,024) partly spills to local
memory; that costs on merges only, and after warm-up most merges are a few extraction rounds.

Storage. Queries are cast to the gallery's dtype (fp16, bf16); products accumulate in fp32. fp8
galleries halve the bytes again: each fp8 tile is widened to fp16 on chip and multiplied with fp16
queries (exactly: every e4m3 value is an fp16 value), so fp8 is a bandwidth format here, not an
fp8 x fp8 tensor-core product that would also round the queries to 3 mantissa bits.

Under the interpreter (numpy): fp16 runs as on the GPU. ``tl.dot`` on bf16 multiplies the raw
uint16 bit patterns there (triton-lang/triton#11584, unsupported upstream), so on the CPU the kernel
widens bf16 tiles to fp32 before the product; the result is the same as the GPU's fp32-accumulated
bf16 product. fp8 runs too (the interpreter converts e4m3 exactly), so its code path is tested, but
whether it compiles and how fast it is can only be seen on an 8.9+ GPU.

Nothing here is imported at package import: torch and triton are imported on the first call.
"""

from __future__ import annotations

import functools
import math
import numbers
import os

from clipfold.errors import BackendUnavailableError, ConfigError

MAX_K = 2048  # K_TILE bound: see "The k limit" above
MAX_ROWS = 2**31 - 2**16  # row numbers (int32 in the kernel, plus a tile) stay below 2**31
EXTRACT = 8  # see the kernel: insertions per tile below which maxima are extracted one by one
PROGRAMS_PER_SM = 4  # enough programs in flight to saturate memory at Q = 1 (one query tile)
FP8_CAPABILITY = (8, 9)
MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1 (the splits)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """True when triton imports and there is somewhere to run it: a CUDA device, or the interpreter."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return interpreting() or torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def _kernel():
    """The jit kernel, its module imported on first use: ``triton.jit`` reads TRITON_INTERPRET when it
    decorates, and nothing imports triton before a call (see :mod:`.triton_kernel`)."""
    from clipfold.kernels.topk.triton_kernel import topk_kernel

    return topk_kernel


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _import_torch():
    try:
        import torch
        import triton  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(f"the Triton top-k kernel needs torch and triton ({exc.name} is missing): "
                                      "pip install triton") from None
    return torch


def _storage_dtypes(torch):
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8_e4m3"}


def _check_inputs(torch, queries, gallery, k):
    """(queries (Q, D) in the multiply dtype, gallery, k, WIDEN), or a ConfigError naming the problem."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    if k > MAX_K:
        raise ConfigError(f"k = {k} is above the Triton kernel's limit of {MAX_K} (its on-chip top-k buffer); "
                          "use clipfold.kernels.topk_similarity, or torch.topk over gallery blocks")
    if not isinstance(gallery, torch.Tensor):
        raise ConfigError(f"the gallery must be a torch tensor on the device that searches it, got "
                          f"{type(gallery).__name__}")
    if gallery.ndim != 2:
        raise ConfigError(f"the gallery must be a 2-D tensor (rows, dim), got shape {tuple(gallery.shape)}")
    storages = _storage_dtypes(torch)
    if gallery.dtype not in storages:
        raise ConfigError(f"gallery dtype {gallery.dtype} is not supported; store it as one of "
                          f"{[str(d) for d in storages]}")
    if gallery.shape[0] > MAX_ROWS:
        raise ConfigError(f"the gallery has {gallery.shape[0]} rows; the kernel's int32 row numbers allow at most "
                          f"{MAX_ROWS}: search it in parts and merge the results")
    if not isinstance(queries, torch.Tensor):
        queries = torch.as_tensor(queries)
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2:
        raise ConfigError(f"queries must be (Q, D) or (D,), got shape {tuple(queries.shape)}")
    if not queries.is_floating_point():
        raise ConfigError(f"queries must be floating point, got {queries.dtype}")
    if queries.shape[1] != gallery.shape[1]:
        raise ConfigError(f"queries have width {queries.shape[1]} but the gallery rows have width {gallery.shape[1]}")
    queries = queries.to(gallery.device)  # Q x D: small next to the gallery
    if gallery.device.type == "cuda":
        widen = 0
        if gallery.dtype == torch.float8_e4m3fn:
            capability = torch.cuda.get_device_capability(gallery.device)
            if capability < FP8_CAPABILITY:
                raise ConfigError(f"fp8 galleries need a GPU of capability {FP8_CAPABILITY} or newer; "
                                  f"{torch.cuda.get_device_name(gallery.device)} is {capability}: store fp16")
    elif gallery.device.type == "cpu" and interpreting():
        widen = 2 if gallery.dtype == torch.bfloat16 else 0  # see "Under the interpreter" above
    else:
        raise BackendUnavailableError(f"the Triton kernel runs on a CUDA device, or on the CPU with "
                                      f"TRITON_INTERPRET=1 set before triton is imported; got {gallery.device}")
    if gallery.dtype == torch.float8_e4m3fn:
        widen = max(widen, 1)
    bad = ~torch.isfinite(queries).all(dim=1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()[:5].tolist()
        raise ConfigError(f"queries {rows} hold NaN or infinity; every query must be finite")
    multiply = torch.float16 if gallery.dtype == torch.float8_e4m3fn else gallery.dtype
    q = queries.to(multiply).contiguous()
    bad = ~torch.isfinite(q).all(dim=1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()[:5].tolist()
        raise ConfigError(f"queries {rows} overflow {multiply} (the gallery's precision); scale them down "
                          "(CLIP embeddings are normally unit-norm)")
    if gallery.shape[0] and gallery.stride(1) != 1:
        gallery = gallery.contiguous()
    return q, gallery, k, widen


def _check_block(name: str, value: int, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least or value & (value - 1):
        raise ConfigError(f"{name} must be a power of two >= {least}, got {value!r}")
    return int(value)


def _plan(torch, n_queries: int, n_rows: int, dim: int, kk: int, device, block_q, block_n, splits):
    """Tile sizes, warps and the number of gallery splits (grid axis 1) for one call."""
    k_tile = _next_pow2(kk)
    # Defaults from the cost model, not yet tuned on a GPU (bench_triton_topk.py sweeps them): one
    # tile of 16 queries (tl.dot's least M) or 64; above k = 256, 16 queries x k_tile rows.
    if block_q is None:
        block_q = 16 if k_tile > 256 or n_queries <= 16 else 64
    if block_n is None:
        block_n = max(128, k_tile)
    block_q = _check_block("block_q", block_q, 16)  # tl.dot needs M, N, K >= 16
    block_n = _check_block("block_n", block_n, 16)
    if block_n < k_tile:
        raise ConfigError(f"block_n = {block_n} is below k rounded up to a power of two ({k_tile}): a tile must "
                          f"hold at least that many rows; use block_n >= {k_tile}")
    block_d = min(64, max(16, _next_pow2(dim)))
    warps = 4 if block_q * block_n <= 16 * 128 else 8  # 64 x 128 int64 keys: 64 registers a thread
    tiles = math.ceil(n_rows / block_n)
    q_tiles = math.ceil(n_queries / block_q)
    if splits is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        splits = max(1, math.ceil(PROGRAMS_PER_SM * sms / q_tiles))
    elif isinstance(splits, bool) or not isinstance(splits, numbers.Integral) or splits < 1:
        raise ConfigError(f"splits must be a positive integer, got {splits!r}")
    rows_per_split = math.ceil(tiles / min(splits, tiles, MAX_GRID_Y)) * block_n
    splits = math.ceil(n_rows / rows_per_split)  # no empty split
    meta = dict(BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d, K_TILE=k_tile,
                LOG_N=block_n.bit_length() - 1, LOG_K=k_tile.bit_length() - 1, num_warps=warps)
    return meta, (q_tiles, splits), rows_per_split


def plan(queries: int, rows: int, dim: int, k: int, *, device="cpu", block_q=None, block_n=None, splits=None) -> dict:
    """The launch a call would make (tiles, warps, grid, rows per split), for benchmarks and tests."""
    torch = _import_torch()
    meta, grid, rows_per_split = _plan(torch, queries, rows, dim, min(k, rows), torch.device(device), block_q,
                                       block_n, splits)
    return {**meta, "grid": grid, "rows_per_split": rows_per_split}


def topk_similarity_triton(queries, gallery, k: int, *, block_q: int | None = None, block_n: int | None = None,
                           splits: int | None = None):
    """Top-``k`` inner products of each query over the gallery rows (see the module docstring).

    ``block_q``/``block_n``: query and gallery rows per tile (powers of two >= 16); ``splits``:
    gallery splits per query tile (grid axis 1); by default about 4 programs per SM.
    """
    torch = _import_torch()
    q, gallery, k, widen = _check_inputs(torch, queries, gallery, k)
    n_queries, (n_rows, dim) = q.shape[0], gallery.shape
    kk = min(k, n_rows)
    if kk == 0 or n_queries == 0:
        return (torch.empty((n_queries, kk), dtype=torch.float32, device=gallery.device),
                torch.empty((n_queries, kk), dtype=torch.int64, device=gallery.device))
    meta, grid, rows_per_split = _plan(torch, n_queries, n_rows, dim, kk, gallery.device, block_q, block_n, splits)
    part_scores = torch.empty((n_queries, grid[1], kk), dtype=torch.float32, device=gallery.device)
    part_rows = torch.empty((n_queries, grid[1], kk), dtype=torch.int64, device=gallery.device)
    _kernel()[grid](
        q, gallery, part_scores, part_rows,
        n_queries, n_rows, dim, rows_per_split, kk,
        q.stride(0), gallery.stride(0), part_scores.stride(0), part_scores.stride(1),
        WIDEN=widen, EXTRACT=EXTRACT, **meta,
    )
    if grid[1] == 1:  # one split: its list is the answer, already sorted
        return part_scores[:, 0], part_rows[:, 0]
    # The merge: splits * k candidates per query; at least k of them are real rows (splits are
    # never empty and hold k rows between them), so the -inf placeholders never make the cut.
    scores, where = torch.topk(part_scores.view(n_queries, -1), kk, dim=1, sorted=True)
    return scores, torch.gather(part_rows.view(n_queries, -1), 1, where)
