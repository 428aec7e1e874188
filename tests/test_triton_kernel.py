"""The Triton similarity + top-k kernel against the oracle, on a GPU or in Triton's interpreter.

Without a CUDA device the kernel runs under TRITON_INTERPRET=1 (numpy, one program at a time), so
sizes stay small: a few hundred to ~1,000 rows of width 16-32, chosen so that every path is hit
(ragged last tiles, several query tiles and gallery splits, both merge paths, k = N, k > N, k = 1,024).
The oracle scores the values the kernel actually multiplies: queries rounded to the gallery's dtype.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    # Read when the kernel is first defined (triton.jit) and by the launcher, so setting it before
    # the first call is enough; setdefault keeps a caller's explicit choice.
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import clipfold.kernels.topk.triton_launcher as triton_topk
from clipfold import errors  # noqa: E402
from clipfold.kernels.topk.reference import same_topk, topk_reference  # noqa: E402
from clipfold.kernels.topk.triton_launcher import plan, topk_similarity_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STORAGES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ATOL = 1e-3  # fp32 accumulation of <= 32 products of N(0, 1) values: errors ~1e-5


def _data(n, d, q, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((q, d)).astype(np.float32), rng.standard_normal((n, d)).astype(np.float32)


def _run(queries, gallery, storage, k, **kwargs):
    """The kernel's answer and the oracle's, both on the values the kernel multiplies."""
    dtype = STORAGES.get(storage, storage)
    g = torch.from_numpy(gallery).to(DEVICE).to(dtype)
    scores, indices = topk_similarity_triton(torch.from_numpy(queries), g, k, **kwargs)
    multiply = torch.float16 if dtype == torch.float8_e4m3fn else dtype
    q_exact = torch.from_numpy(queries).to(multiply).double().numpy()
    g_exact = g.cpu().double().numpy()
    ref_scores, _ = topk_reference(q_exact, g_exact, k)
    return scores.cpu().numpy().astype(np.float64), indices.cpu().numpy(), ref_scores, q_exact, g_exact


def _check(scores, indices, ref_scores, q_exact, g_exact, atol=ATOL):
    assert scores.shape == indices.shape == ref_scores.shape and indices.dtype == np.int64
    assert np.all(np.diff(scores, axis=1) <= 0), "scores must be descending"
    assert same_topk(scores, indices, ref_scores, q_exact, g_exact, atol=atol)


@pytest.mark.parametrize("storage", ["fp16", "bf16"])
@pytest.mark.parametrize("k", [1, 10])
def test_matches_the_oracle(storage, k):
    queries, gallery = _data(n=1100, d=24, q=5)  # 1,100 = 8 tiles of 128 + a ragged one
    assert plan(5, 1100, 24, k, device=DEVICE)["grid"][1] > 1  # several gallery splits: the final merge runs
    _check(*_run(queries, gallery, storage, k))


def test_ragged_query_tiles_and_splits():
    queries, gallery = _data(n=1000, d=20, q=37, seed=1)  # 3 query tiles of 16, the last ragged
    launch = plan(37, 1000, 20, 7, device=DEVICE, block_q=16, block_n=32, splits=5)
    assert launch["grid"] == (3, 5) and launch["rows_per_split"] % 32 == 0
    _check(*_run(queries, gallery, "fp16", 7, block_q=16, block_n=32, splits=5))


@pytest.mark.parametrize("k", [300, 500])  # k = N and k > N: every row, sorted
def test_k_at_or_above_the_gallery_size(k):
    queries, gallery = _data(n=300, d=16, q=3, seed=2)
    scores, indices, *rest = _run(queries, gallery, "fp16", k, splits=3)
    assert scores.shape == (3, 300) and all(sorted(row) == list(range(300)) for row in indices.tolist())
    _check(scores, indices, *rest)


def test_k_1024():
    queries, gallery = _data(n=1030, d=16, q=3, seed=3)
    launch = plan(3, 1030, 16, 1024, device=DEVICE)
    assert launch["K_TILE"] == launch["BLOCK_N"] == 1024 and launch["grid"][1] == 2
    _check(*_run(queries, gallery, "fp16", 1024))


@pytest.mark.parametrize("extract", [0, 1 << 20])  # only the sorting network / only extraction
@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_both_merge_paths_on_sorted_galleries(monkeypatch, extract, order):
    """A gallery sorted by ascending score makes every tile merge; descending, almost none."""
    queries, gallery = _data(n=700, d=16, q=1, seed=4)
    ranks = np.argsort(gallery @ queries[0])
    gallery = gallery[ranks if order == "ascending" else ranks[::-1]]
    monkeypatch.setattr(triton_topk, "EXTRACT", extract)
    _check(*_run(queries, gallery, "fp16", 10, block_n=64, splits=2))


def test_ties_return_the_same_scores():
    rng = np.random.default_rng(5)
    base = rng.integers(-3, 4, size=(40, 16)).astype(np.float32)
    gallery = np.concatenate([base] * 15)  # every row 15 times: exact ties across tiles and splits
    queries = rng.integers(-2, 3, size=(4, 16)).astype(np.float32)
    _check(*_run(queries, gallery, "fp16", 30, block_n=64, splits=3), atol=0)


def test_strided_gallery_and_vector_query():
    queries, gallery = _data(n=600, d=16, q=1, seed=6)
    g = torch.from_numpy(gallery).to(DEVICE).half()
    every_other = g[::2]  # row stride 2 * D: read through the stride, not copied
    scores, indices = topk_similarity_triton(torch.from_numpy(queries[0]), every_other, 5)
    q_exact = torch.from_numpy(queries).half().double().numpy()
    ref_scores, _ = topk_reference(q_exact, every_other.cpu().double().numpy(), 5)
    assert scores.shape == (1, 5)
    assert same_topk(scores.cpu().double().numpy(), indices.cpu().numpy(), ref_scores, q_exact,
                     every_other.cpu().double().numpy(), atol=ATOL)
    columns = g.t().contiguous().t()  # column-major: made contiguous first
    assert columns.stride(1) != 1
    again, again_rows = topk_similarity_triton(torch.from_numpy(queries), columns, 5)
    assert torch.equal(again_rows.cpu(), topk_similarity_triton(torch.from_numpy(queries), g, 5)[1].cpu())


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="fp8 galleries need a GPU of capability 8.9 or newer")
def test_fp8_gallery():
    queries, gallery = _data(n=500, d=32, q=4, seed=7)
    _check(*_run(queries, gallery, torch.float8_e4m3fn, 10, splits=2))


def test_empty_gallery():
    scores, indices = topk_similarity_triton(torch.ones(3, 8), torch.zeros((0, 8), dtype=torch.float16,
                                                                          device=DEVICE), 5)
    assert scores.shape == indices.shape == (3, 0) and indices.dtype == torch.int64


def test_bad_input_is_named():
    queries, gallery = _data(n=10, d=8, q=2)
    g = torch.from_numpy(gallery).to(DEVICE).half()
    with pytest.raises(errors.ConfigError, match="width 9 but the gallery rows have width 8"):
        topk_similarity_triton(torch.ones(2, 9), g, 3)
    bad = torch.from_numpy(queries.copy())
    bad[1, 2] = float("nan")
    with pytest.raises(errors.ConfigError, match=r"queries \[1\] hold NaN"):
        topk_similarity_triton(bad, g, 3)
    with pytest.raises(errors.ConfigError, match=r"queries \[0\] overflow torch.float16"):
        topk_similarity_triton(torch.full((1, 8), 1e6), g, 3)
    with pytest.raises(errors.ConfigError, match="k must be a positive integer"):
        topk_similarity_triton(torch.from_numpy(queries), g, 0)
    with pytest.raises(errors.ConfigError, match="above the Triton kernel's limit of 2048"):
        topk_similarity_triton(torch.from_numpy(queries), g, 4096)
    with pytest.raises(errors.ConfigError, match=r"gallery dtype torch.float32 is not supported"):
        topk_similarity_triton(torch.from_numpy(queries), g.float(), 3)
    with pytest.raises(errors.ConfigError, match=r"2-D tensor \(rows, dim\), got shape \(10,\)"):
        topk_similarity_triton(torch.from_numpy(queries), g[:, 0], 3)
    with pytest.raises(errors.ConfigError, match="block_n = 16 is below k rounded up to a power of two"):
        topk_similarity_triton(torch.from_numpy(queries), torch.zeros((100, 8), dtype=torch.float16,
                                                                      device=DEVICE), 20, block_n=16)
    with pytest.raises(errors.ConfigError, match="block_q must be a power of two >= 16, got 24"):
        topk_similarity_triton(torch.from_numpy(queries), g, 3, block_q=24)


def test_importing_kernels_loads_neither_torch_nor_triton():
    code = textwrap.dedent("""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'triton'):
                    raise ImportError(f'{name} is blocked in this test')
        sys.meta_path.insert(0, _Block())
        import clipfold.kernels
        from clipfold.kernels.topk import triton_launcher as triton_topk
        assert 'torch' not in sys.modules and 'triton' not in sys.modules
        assert 'clipfold.kernels.topk.triton_kernel' not in sys.modules
        assert triton_topk.available() is False
        try:
            triton_topk.topk_similarity_triton([[1.0]], None, 1)
        except Exception as exc:
            print(type(exc).__name__, exc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("BackendUnavailableError") and "pip install triton" in proc.stdout


def test_the_kernels_are_module_level_in_their_own_module():
    """The jit kernel and its helpers live at the top of kernels/topk/triton_kernel.py, imported on
    the first call; the launcher's namespace is never written into."""
    from triton.runtime.jit import KernelInterface  # JITFunction on a GPU, InterpretedFunction here

    before = set(vars(triton_topk))
    queries, gallery = _data(40, 16, 3)
    _check(*_run(queries, gallery, "fp16", 5))
    import clipfold.kernels.topk.triton_kernel as triton_topk_kernel

    assert triton_topk._kernel() is triton_topk_kernel.topk_kernel
    for name in ("_bit", "_merge", "_topk_rows", "_merge_sorted", "topk_kernel"):
        assert isinstance(getattr(triton_topk_kernel, name), KernelInterface), name
    assert set(vars(triton_topk)) == before  # no tl, no helpers put into the launcher's globals
