"""One check shared by the adapter tests: the exported engine equals a method's plain formula.

The engine (onnxruntime, through the torch-free runtime) and the reference see the same uint8
pixels; the reference encodes them with open_clip eager and applies the test's own transcription
of the official formula, unfolded, in float64. Scores must agree within 1e-5 and the top-k indices
must be identical (where the reference's own scores tie, either order is accepted).
"""

from __future__ import annotations

import numpy as np
import torch

from clipfold.compile.config import VerifyConfig
from clipfold.compile.stages.verify import verification_pixels
from clipfold.runtime import Engine


def normalized_pixels(pixels: np.ndarray, spec) -> torch.Tensor:
    x = torch.from_numpy(pixels).double() / 255.0
    return ((x - torch.tensor(spec.mean, dtype=torch.float64).view(1, 3, 1, 1))
            / torch.tensor(spec.std, dtype=torch.float64).view(1, 3, 1, 1)).float()


def assert_engine_matches(bundle_path, spec, reference_logits, images: int = 8, head: str | None = None) -> float:
    """``reference_logits(normalized pixels) -> (B, C)``; returns the max |score difference|. ``head``
    names an extra head of the bundle (``clipfold head add``) to score with instead of its own."""
    engine = Engine.open(bundle_path, head=head)
    pixels = verification_pixels(spec, VerifyConfig(random_images=images, generated_images=images, seed=7))
    out = engine.run_pixels(pixels)
    with torch.no_grad():
        logits = reference_logits(normalized_pixels(pixels, spec)).double()
    info = engine.manifest.head if head is None else engine.manifest.extra_head(head).head
    probs = logits.softmax(-1) if info.activation == "softmax" else logits.sigmoid()
    return assert_topk_matches(out["scores"], out["indices"], probs)


def assert_topk_matches(scores: np.ndarray, indices: np.ndarray, probs: torch.Tensor) -> float:
    """Engine top-k ``scores``/``indices`` against the reference's full score matrix ``probs``."""
    top = probs.double().topk(indices.shape[1])
    diff = float(np.abs(scores - top.values.numpy()).max())
    assert diff <= 1e-5, f"engine scores differ from the reference by {diff:.2e}"
    # Identical top-k, except where the reference itself ties (e.g. scores that underflow to 0).
    engine_ref = np.take_along_axis(probs.double().numpy(), indices, axis=1)
    differs = indices != top.indices.numpy()
    tied = np.abs(engine_ref - top.values.numpy()) <= 1e-7
    assert not (differs & ~tied).any(), f"engine top-k differs from the reference in {int((differs & ~tied).sum())} places"
    return diff
