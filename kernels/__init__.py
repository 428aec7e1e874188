"""Fused similarity + top-k over large label sets and galleries; the score matrix is never stored.

``topk_similarity(queries, gallery, k)`` -> ``(scores, indices)``: inner products, descending, at
most ``k`` per query (fewer when the gallery has fewer rows). ``gallery`` is an array or a
:class:`Gallery` (fp32, fp16 or int8 storage, in memory or memory-mapped shards). The CPU work is
a small C kernel loaded with ctypes (see :mod:`.topk.launcher`); importing this package does no work.
"""

from __future__ import annotations

import numpy as np

from clipfold.errors import ConfigError
from clipfold.kernels.topk.gallery import STORAGES, Gallery
from clipfold.kernels.topk.launcher import check_queries, rescore, topk_cpu
from clipfold.kernels.topk.reference import topk_reference

__all__ = ["Gallery", "STORAGES", "topk_similarity", "topk_reference"]


def topk_similarity(queries, gallery, k: int, *, oversample: int = 0, block_rows: int | None = None,
                    threads: int | None = None, logsumexp: bool = False):
    """Top-``k`` inner products of each query over the gallery rows: ``(scores, indices)``.

    With a quantized gallery that kept its fp32 rows (``keep_exact=True``), ``oversample=m``
    takes the ``m * k`` best candidates from the quantized scores and returns exact fp32 scores
    for the final ``k``. ``logsumexp=True`` adds a third output, (Q,) ``log(sum(exp(score)))``
    over every row: with a label head's logits as scores, ``exp(scores - lse)`` are the top-k
    softmax probabilities, computed without storing the other scores.
    """
    if not isinstance(gallery, Gallery):
        gallery = Gallery.from_array(gallery)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if oversample < 0:
        raise ConfigError(f"oversample must be >= 0, got {oversample}")
    q = check_queries(queries, gallery.dim)
    if oversample and gallery.storage != "fp32":
        if logsumexp:
            raise ConfigError("logsumexp is computed from the stored rows' scores; it cannot be combined with "
                              "oversample-then-rescore (use an fp32 gallery, or oversample=0)")
        if not gallery.has_exact:
            raise ConfigError("oversample-then-rescore needs the fp32 rows: build the gallery with keep_exact=True")
        _, candidates = topk_cpu(q, gallery, min(len(gallery), oversample * int(k)), block_rows, threads)
        return rescore(q, gallery, candidates, min(int(k), len(gallery)))
    return topk_cpu(q, gallery, int(k), block_rows, threads, logsumexp=logsumexp)
