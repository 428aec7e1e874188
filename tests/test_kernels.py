"""CPU similarity + top-k against the oracle: every storage, ties, shards, edge cases, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from clipfold import errors
from clipfold.kernels import Gallery, topk_reference, topk_similarity
from clipfold.kernels.cpu import dequantized_queries
from clipfold.kernels.gallery import quantize_rows
from clipfold.kernels.reference import same_topk


def _data(n=5000, d=64, q=7, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((q, d)).astype(np.float32), rng.standard_normal((n, d)).astype(np.float32)


def _stored(gallery: np.ndarray, storage: str) -> np.ndarray:
    """What a gallery of ``storage`` represents exactly (the oracle's input for that storage)."""
    rows, scales = quantize_rows(gallery, storage)
    return rows.astype(np.float64) * (scales[:, None] if scales is not None else 1.0)


@pytest.mark.parametrize("storage", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("k", [1, 10, 257])
def test_matches_the_oracle_for_every_storage(storage, k):
    queries, gallery = _data()
    g = Gallery.from_array(gallery, storage=storage)
    scores, indices = topk_similarity(queries, g, k, block_rows=700)  # many blocks, a ragged last one
    exact = _stored(gallery, storage)
    # int8 rows are scored with uint8-quantized queries (integer dot products): that is its oracle.
    scored_with = dequantized_queries(queries) if storage == "int8" else queries
    ref_scores, _ = topk_reference(scored_with, exact, k)
    assert scores.shape == indices.shape == (len(queries), k) and indices.dtype == np.int64
    assert np.all(np.diff(scores, axis=1) <= 0)
    assert same_topk(scores, indices, ref_scores, scored_with, exact, atol=1e-3)


def test_ties_allow_any_index_but_the_same_scores():
    rng = np.random.default_rng(1)
    base = rng.integers(-3, 4, size=(40, 16)).astype(np.float32)
    gallery = np.concatenate([base] * 25)  # every row 25 times: massive exact ties
    queries = rng.integers(-2, 3, size=(5, 16)).astype(np.float32)
    scores, indices = topk_similarity(queries, gallery, 30, block_rows=128)
    ref_scores, _ = topk_reference(queries, gallery, 30)
    assert same_topk(scores, indices, ref_scores, queries, gallery, atol=0)


def test_edge_cases():
    queries, gallery = _data(n=6, d=8, q=3)
    for k in (6, 10):  # k = N and k > N: every row, sorted
        scores, indices = topk_similarity(queries, gallery, k)
        assert scores.shape == (3, 6) and sorted(indices[0].tolist()) == list(range(6))
    scores, indices = topk_similarity(queries[0], gallery, 1)  # one query as a vector
    assert indices.shape == (1, 1) and indices[0, 0] == int(np.argmax(gallery @ queries[0]))
    scores, indices = topk_similarity(queries, np.zeros((0, 8), np.float32), 5)  # empty gallery
    assert scores.shape == (3, 0) and indices.shape == (3, 0)


def test_bad_input_is_named():
    queries, gallery = _data(n=10, d=8, q=2)
    with pytest.raises(errors.ConfigError, match="width 9 but the gallery rows have width 8"):
        topk_similarity(np.ones((2, 9), np.float32), gallery, 3)
    bad = queries.copy()
    bad[1, 2] = np.nan
    with pytest.raises(errors.ConfigError, match=r"queries \[1\] hold NaN"):
        topk_similarity(bad, gallery, 3)
    with pytest.raises(errors.ConfigError, match="k must be a positive integer"):
        topk_similarity(queries, gallery, 0)
    with pytest.raises(errors.ConfigError, match=r"gallery rows \[4\] hold NaN"):
        g = gallery.copy()
        g[4, 0] = np.inf
        Gallery.from_array(g)
    with pytest.raises(errors.ConfigError, match="unknown gallery storage 'int4'"):
        Gallery.from_array(gallery, storage="int4")
    with pytest.raises(errors.ConfigError, match="needs the fp32 rows"):
        topk_similarity(queries, Gallery.from_array(gallery, storage="int8"), 3, oversample=4)


def test_sharded_folder_round_trip_with_ids(tmp_path):
    queries, gallery = _data(n=3001, d=32, q=4, seed=3)
    ids = np.array([f"img-{i}" for i in range(len(gallery))])
    Gallery.from_array(gallery, storage="int8", ids=ids, keep_exact=True).save(tmp_path / "g", shard_rows=1000)
    opened = Gallery.open(tmp_path / "g")
    assert len(opened) == 3001 and len(opened.shards) == 4 and isinstance(opened.shards[0].rows, np.memmap)
    scores, indices = topk_similarity(queries, opened, 10, oversample=4, block_rows=256)
    _, ref_indices = topk_reference(queries, gallery, 10)
    # Rescored from the kept fp32 rows: exact scores; recall@10 of the int8 candidates is high.
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(indices, ref_indices)])
    assert recall >= 0.97, recall
    assert np.allclose(scores, np.einsum("qd,qkd->qk", queries, gallery[indices]), atol=1e-5)
    assert opened.ids_of(indices)[0, 0] == f"img-{indices[0, 0]}"
    with pytest.raises(errors.ConfigError, match="not a gallery folder"):
        Gallery.open(tmp_path)


def test_committed_block_graphs_are_current():
    """The runtime cannot import onnx, so the block graphs are committed; they must match the builder."""
    from importlib import resources

    from clipfold.kernels.graphs.build import FILES, build

    for storage, name in FILES.items():
        committed = resources.files("clipfold.kernels.graphs").joinpath(name).read_bytes()
        assert committed == build(storage).SerializeToString(), f"{name} is stale: run python -m clipfold.kernels.graphs.build"
