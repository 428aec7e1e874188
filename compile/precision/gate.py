"""The accuracy gate: a reduced-precision variant against the fp32 variant on held-out images.

Figures: embedding cosine (min and mean), top-1 agreement, top-5 overlap and, with a labelled
folder, top-1 accuracy of both. Agreement is tie-aware: a different top-1 index still agrees
when fp32 scores it within ``tie_tolerance`` of its own top-1 (the two are tied in fp32).
The images come from compile/precision/image_sets.py: the figures recorded and held to the limits
are measured on the *gate* images, which no choice (calibration, sensitivity search) was made on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from clipfold.compile.precision.config import GateConfig
from clipfold.compile.precision.image_sets import HeldOut
from clipfold.runtime.backends.base import Backend
from clipfold.runtime.backends.kernel_head import KernelHead, KernelHeadBackend
from clipfold.runtime.backends.onnxruntime import OnnxRuntimeBackend
from clipfold.runtime.bundle.agreement import Gate
from clipfold.runtime.bundle.schema import TensorSpec


def run_graph(path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], pixels: np.ndarray,
              batch_size: int = 16, head: KernelHead | None = None) -> dict[str, np.ndarray]:
    """A graph's outputs on ``pixels`` in batches (and a kernel-scored head's, when given)."""
    return run_backend(OnnxRuntimeBackend(path, inputs, outputs), pixels, batch_size, head)


def run_backend(backend: Backend, pixels: np.ndarray, batch_size: int = 16,
                head: KernelHead | None = None) -> dict[str, np.ndarray]:
    """An opened backend's outputs on ``pixels`` in batches (and a kernel-scored head's, when given)."""
    if head is not None:
        backend = KernelHeadBackend(backend, head)
    parts: dict[str, list[np.ndarray]] = {}
    for lo in range(0, len(pixels), batch_size):
        for name, value in backend.run({"pixels": pixels[lo:lo + batch_size]}).items():
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row pair (rows flattened), in float64. NaN stays NaN (and fails every
    ``>=`` limit); a zero row scores 0 rather than 0/0."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    return np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def measure(reference: dict[str, np.ndarray], got: dict[str, np.ndarray], held: HeldOut, cfg: GateConfig,
            tie_tolerance: float = 1e-5, reference_name: str = "fp32") -> Gate:
    cos = row_cosine(reference["embedding"], got["embedding"])
    ref_idx, ref_scores, idx = reference["indices"], reference["scores"], got["indices"]
    same = idx[:, 0] == ref_idx[:, 0]
    # A different pick agrees when fp32 scores it as high as its own top-1 (within the tolerance).
    in_ref = idx[:, :1] == ref_idx
    tied = np.any(in_ref & (ref_scores >= ref_scores[:, :1] - tie_tolerance), axis=1)
    k = min(5, idx.shape[1])
    overlap = np.mean([len(set(r[:k]) & set(g[:k])) / k for r, g in zip(ref_idx, idx)])
    accuracy = reference_accuracy = None
    if held.targets is not None:
        accuracy = float(np.mean(idx[:, 0] == held.targets))
        reference_accuracy = float(np.mean(ref_idx[:, 0] == held.targets))
    return Gate(reference=reference_name, images=len(cos), source=held.source,
                embedding_cosine_min=float(cos.min()), embedding_cosine_mean=float(cos.mean()),
                top1_agreement=float(np.mean(same | tied)), top5_overlap=float(overlap),
                accuracy=accuracy, reference_accuracy=reference_accuracy, thresholds=cfg.thresholds())


def embedding_failures(cosine_min: float, top1_agreement: float, cfg: GateConfig) -> list[str]:
    """The figures every gate has (image and text): min cosine and top-1 agreement against their limits."""
    out = []  # written as "not >=" so that a NaN figure fails
    if not cosine_min >= cfg.min_cosine:
        out.append(f"min embedding cosine {cosine_min:.5f} < {cfg.min_cosine}")
    if not top1_agreement >= cfg.min_top1_agreement:
        out.append(f"top-1 agreement {top1_agreement:.2%} < {cfg.min_top1_agreement:.2%}")
    return out


def failures(gate: Gate, cfg: GateConfig) -> list[str]:
    """Every figure that misses its limit, with both numbers."""
    out = embedding_failures(gate.embedding_cosine_min, gate.top1_agreement, cfg)
    if not gate.top5_overlap >= cfg.min_top5_overlap:
        out.append(f"top-5 overlap {gate.top5_overlap:.2%} < {cfg.min_top5_overlap:.2%}")
    if gate.accuracy is not None and not gate.reference_accuracy - gate.accuracy <= cfg.max_accuracy_drop:
        out.append(f"accuracy {gate.accuracy:.2%} is {gate.reference_accuracy - gate.accuracy:.2%} below fp32's "
                   f"{gate.reference_accuracy:.2%} (limit {cfg.max_accuracy_drop:.2%})")
    return out
