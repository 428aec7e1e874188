"""A large label head scored by the fused top-k kernel instead of a dense MatMul + TopK in the graph.

With 10^5 labels the head's logits are the cost of a classifier: a (B, C) float matrix written by
the graph's MatMul, normalized by Softmax, then read again by TopK. A bundle compiled with such a
head (``HeadInfo.kernel`` names its folder) has a graph that stops at the unit embedding; the head
is stored as a :class:`~clipfold.kernels.Gallery` of rows ``[w_c, b_c, 0, ...]`` (the weight with
``exp(logit_scale)`` folded in, the bias, and zeros up to a multiple of 16 floats so that every
row starts on a cache line), so ``[f, 1, 0, ...] . row_c`` is class ``c``'s logit.
The kernel streams the rows once, keeps each image's top-k and, for softmax heads, the log-sum-exp
over all C logits, so ``exp(logit - lse)`` are the exact top-k probabilities and the (B, C) matrix
never exists.

:class:`KernelHeadBackend` chains the graph's backend and the head so that callers see the same
outputs (``scores``, ``indices``, ``embedding``) as from a graph with the head inside.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from clipfold.errors import BundleError
from clipfold.kernels import Gallery, topk_similarity
from clipfold.runtime.backends.base import Backend
from clipfold.runtime.bundle.layout import row_width
from clipfold.runtime.bundle.schema import TensorSpec


class KernelHead:
    """Open a head folder and turn unit embeddings into top-k scores and indices."""

    def __init__(self, folder: Path, activation: str, top_k: int, classes: int, threads: int | None = None):
        try:
            self.gallery = Gallery.open(folder)
        except Exception as exc:
            raise BundleError(f"the bundle's kernel head {folder} cannot be opened: {exc}") from None
        if len(self.gallery) != classes:
            raise BundleError(f"the kernel head in {folder} has {len(self.gallery)} rows for {classes} labels")
        self.activation, self.top_k, self.threads = activation, int(top_k), threads

    def run(self, embedding: np.ndarray) -> dict[str, np.ndarray]:
        batch, dim = embedding.shape
        if self.gallery.dim != row_width(dim):
            raise BundleError(f"the kernel head's rows have width {self.gallery.dim}; {dim}-dim embeddings need "
                              f"{row_width(dim)} (weights, bias, zeros to 16 floats)")
        queries = np.zeros((batch, self.gallery.dim), np.float32)
        queries[:, :dim] = embedding
        queries[:, dim] = 1.0  # the bias column
        if self.activation == "softmax":
            logits, indices, lse = topk_similarity(queries, self.gallery, self.top_k, threads=self.threads,
                                                   logsumexp=True)
            scores = np.exp(logits - lse[:, None])
        else:  # sigmoid is monotonic: the top logits are the top scores
            logits, indices = topk_similarity(queries, self.gallery, self.top_k, threads=self.threads)
            scores = np.exp(-np.logaddexp(0.0, -logits))  # sigmoid without overflow at very negative logits
        return {"scores": scores.astype(np.float32), "indices": indices}


class KernelHeadBackend(Backend):
    """A graph that outputs ``embedding`` followed by a :class:`KernelHead`: the outputs of a graph
    with the head inside. ``last_latency_s`` covers both."""

    def __init__(self, graph: Backend, head: KernelHead):
        outputs = (TensorSpec("scores", "float32", ("batch", head.top_k)),
                   TensorSpec("indices", "int64", ("batch", head.top_k)), *graph.outputs)
        super().__init__(graph.path, graph.inputs, outputs)
        self.name = graph.name
        self.graph, self.head = graph, head

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.graph.run(inputs)
        return {**self.head.run(out["embedding"]), **out}

