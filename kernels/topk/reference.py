"""The oracle: exact top-k inner products from the full score matrix, in float64.

Everything in :mod:`clipfold.kernels` is tested against this. Ties are broken by the lower
gallery index, but kernels are compared by score multisets (see :func:`same_topk`), since any
index among equal scores is a correct answer.
"""

from __future__ import annotations

import numpy as np


def topk_reference(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores (Q, min(k, N)) float64 descending, indices (Q, min(k, N)) int64)."""
    q = np.atleast_2d(np.asarray(queries, dtype=np.float64))
    g = np.asarray(gallery, dtype=np.float64)
    kk = min(int(k), g.shape[0])
    if kk == 0:
        return np.zeros((q.shape[0], 0)), np.zeros((q.shape[0], 0), dtype=np.int64)
    scores = q @ g.T
    # Stable sort of -scores: among equal scores the lower index comes first.
    order = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
    return np.take_along_axis(scores, order, axis=1), order.astype(np.int64)


def same_topk(scores: np.ndarray, indices: np.ndarray, ref_scores: np.ndarray, queries: np.ndarray,
              gallery: np.ndarray, atol: float) -> bool:
    """A kernel's answer is correct when its scores are the reference's multiset (within ``atol``)
    and each returned index really has the returned score."""
    if scores.shape != ref_scores.shape:
        return False
    if not np.allclose(np.sort(scores, axis=1), np.sort(ref_scores, axis=1), atol=atol, rtol=0):
        return False
    q = np.atleast_2d(np.asarray(queries, dtype=np.float64))
    actual = np.einsum("qd,qkd->qk", q, np.asarray(gallery, dtype=np.float64)[indices])
    unique = all(len(set(row)) == len(row) for row in indices.tolist())
    return unique and np.allclose(actual, scores, atol=atol, rtol=0)
