"""What a bundle records about its agreement with a reference, each measured before it is written:
parity (an artifact against open_clip eager, or an extra head against its unfolded formula) and gates
(a reduced-precision graph against the bundle's fp32 one). Sections of the manifest (runtime/bundle/schema.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Parity:
    """Agreement of an artifact with the eager open_clip reference, measured before writing."""

    images: int
    embedding_cosine_min: float
    embedding_cosine_mean: float
    topk_agreement: float  # fraction of images whose top-k matches (ties allowed)
    top1_agreement: float
    max_abs_score_diff: float


@dataclass(frozen=True)
class Gate:
    """A reduced-precision variant measured against the bundle's fp32 variant on held-out images.

    ``accuracy`` and ``reference_accuracy`` are top-1 on labelled images (``None`` without labels);
    ``top5_overlap`` compares the first min(5, top_k) indices;
    ``thresholds`` are the limits it was held to, ``kept_float`` the quantizable nodes the
    sensitivity search returned to float. ``selection`` (optional) records which images made the
    choices (calibration, the search) and which judged the result (the gate): they do not overlap.
    """

    reference: str
    images: int
    source: str
    embedding_cosine_min: float
    embedding_cosine_mean: float
    top1_agreement: float
    top5_overlap: float
    accuracy: float | None
    reference_accuracy: float | None
    thresholds: dict[str, float]
    kept_float: tuple[str, ...] = ()
    selection: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kept_float", tuple(self.kept_float))


@dataclass(frozen=True)
class HeadParity:
    """Agreement of an extra head's graph with its unfolded formula, on the bundle's own embeddings."""

    images: int
    topk_agreement: float
    top1_agreement: float
    max_abs_score_diff: float


@dataclass(frozen=True)
class TextParity:
    """Agreement of the text graph (and the bundled tokenizer) with open_clip's encode_text."""

    prompts: int
    embedding_cosine_min: float
    max_abs_diff: float


@dataclass(frozen=True)
class TextGate:
    """A reduced-precision text graph against the fp32 text graph on held-out prompts."""

    prompts: int
    embedding_cosine_min: float
    embedding_cosine_mean: float
    top1_agreement: float  # the nearest label (by fp32 label embeddings) is the same as fp32's
    thresholds: dict[str, float]
