"""Stage 5: verify an exported graph against open_clip eager before anything is written.

The reference is the *unfolded* model: open_clip's ``encode_image`` on torchvision-normalized
pixels, then the head's formula in plain torch. Both sides see the same uint8 pixels, so any
difference comes from folding, export or the engine. Top-k comparison allows ties, as faiss's
evaluation does: an index may differ from the reference's only where their reference scores are
equal within ``tie_tolerance``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clipfold.compile.config import VerifyConfig, generated_images
from clipfold.compile.precision.gate import row_cosine
from clipfold.errors import VerificationError
from clipfold.runtime.backends.kernel_head import KernelHead, KernelHeadBackend
from clipfold.runtime.backends.onnxruntime import OnnxRuntimeBackend
from clipfold.runtime.bundle.agreement import Parity
from clipfold.runtime.bundle.schema import PreprocessSpec, TensorSpec
from clipfold.runtime.preprocess import preprocess


@dataclass
class Reference:
    pixels: np.ndarray  # (N, 3, H, W) uint8
    embeddings: np.ndarray  # (N, D) float32, unit rows
    scores: np.ndarray  # (N, C) float32, full score matrix


def verification_pixels(spec: PreprocessSpec, cfg: VerifyConfig) -> np.ndarray:
    """Uniform noise images plus generated images (:func:`~clipfold.compile.config.generated_images`),
    preprocessed like the runtime does."""
    rng = np.random.default_rng(cfg.seed)
    h, w = spec.image_size
    noise = rng.integers(0, 256, size=(cfg.random_images, 3, h, w), dtype=np.uint8)
    images = generated_images(cfg.generated_images, cfg.seed + 1) if cfg.generated_images else []
    generated = preprocess(images, spec) if images else noise[:0]
    return np.concatenate([noise, generated])


@torch.no_grad()
def encode_pixels(model, spec: PreprocessSpec, pixels: np.ndarray) -> torch.Tensor:
    """open_clip eager on uint8 NCHW pixels: ToTensor's /255, Normalize, encode_image, unit rows."""
    x = torch.from_numpy(pixels).float() / 255.0
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return F.normalize(model.encode_image((x - mean) / std).float(), dim=-1)


@torch.no_grad()
def eager_reference(model, head, spec: PreprocessSpec, pixels: np.ndarray) -> Reference:
    """``head`` is the unfolded formula: a ZeroShotHead or a Head (anything with ``scores``)."""
    features = encode_pixels(model, spec, pixels)
    return Reference(pixels, features.numpy(), head.scores(features).numpy())


def compare(reference: Reference, scores: np.ndarray, indices: np.ndarray, embedding: np.ndarray,
            cfg: VerifyConfig, min_cosine: float | None = None) -> tuple[Parity, list[str]]:
    """Parity figures and the list of failed checks (empty when everything holds)."""
    min_cosine = cfg.min_cosine if min_cosine is None else min_cosine
    cos = row_cosine(embedding, reference.embeddings)
    ref_at_indices = np.take_along_axis(reference.scores, indices, axis=1)
    score_diff = float(np.max(np.abs(ref_at_indices - scores)))
    k = indices.shape[1]
    ref_topk = -np.sort(-reference.scores, axis=1)[:, :k]
    # Tie-aware: the engine's picks, scored by the reference, must be a valid reference top-k.
    topk_ok = np.all(np.abs(np.sort(ref_at_indices, axis=1)[:, ::-1] - ref_topk) <= cfg.tie_tolerance, axis=1)
    top1_ok = np.abs(ref_at_indices[:, 0] - ref_topk[:, 0]) <= cfg.tie_tolerance

    parity = Parity(
        images=int(len(cos)),
        embedding_cosine_min=float(cos.min()),
        embedding_cosine_mean=float(cos.mean()),
        topk_agreement=float(topk_ok.mean()),
        top1_agreement=float(top1_ok.mean()),
        max_abs_score_diff=score_diff,
    )
    failures = []
    if not parity.embedding_cosine_min >= min_cosine:  # NaN fails
        failures.append(
            f"embedding: min cosine {parity.embedding_cosine_min:.7f} < {min_cosine} "
            f"(max abs diff {float(np.max(np.abs(embedding - reference.embeddings))):.3g})")
    if score_diff > cfg.max_score_diff:
        failures.append(f"scores: max abs diff {score_diff:.3g} > {cfg.max_score_diff}")
    if not topk_ok.all():
        bad = np.flatnonzero(~topk_ok)
        failures.append(
            f"indices: top-{k} differs from the reference beyond ties on {len(bad)}/{len(cos)} images "
            f"(first: image {int(bad[0])})")
    return parity, failures


def verify_onnx(path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                reference: Reference, cfg: VerifyConfig, name: str = "fp32", batch_size: int = 8,
                head: KernelHead | None = None) -> Parity:
    """Run the ONNX file in ONNX Runtime (then ``head``, for a kernel-scored head) on the
    reference pixels; raise listing every failure.

    The first batch has one image and the rest up to ``batch_size``, exercising the dynamic
    batch dimension at more than one size.
    """
    backend = OnnxRuntimeBackend(path, inputs, outputs)
    if head is not None:
        backend = KernelHeadBackend(backend, head)
    return verify_backend(backend, reference, cfg, name, Path(path).name, batch_size)


def verify_backend(backend, reference: Reference, cfg: VerifyConfig, name: str, what: str,
                   batch_size: int = 8) -> Parity:
    """:func:`verify_onnx` for an opened backend (``what`` names its file in the error)."""
    outs = {"scores": [], "indices": [], "embedding": []}
    bounds = [0, 1, *range(1 + batch_size, len(reference.pixels), batch_size), len(reference.pixels)]
    for lo, hi in zip(bounds, bounds[1:]):
        if lo >= hi:
            continue
        result = backend.run({"pixels": reference.pixels[lo:hi]})
        for key in outs:
            outs[key].append(result[key])
    scores, indices, embedding = (np.concatenate(outs[n]) for n in ("scores", "indices", "embedding"))
    parity, failures = compare(reference, scores, indices, embedding, cfg)
    if failures:
        raise VerificationError(
            f"variant {name!r} ({what}) does not match open_clip eager on "
            f"{parity.images} images:\n  - " + "\n  - ".join(failures), failures)
    return parity
