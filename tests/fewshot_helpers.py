"""Small helpers shared by the adapter tests: a relative difference, a synthetic few-shot task, and
the background-type task on real tiny-model features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipfold.compile.adapters.base import Support
from clipfold.compile.heads.zero_shot import build_zero_shot_head
from clipfold.compile.tiny import data

from .test_gda import BACKGROUNDS, _features, _shots


def rel_diff(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference|, in float64."""
    reference = reference.detach().double()
    return float((ours.detach().double() - reference).abs().max() / reference.abs().max())


def synthetic_task(seed=0, classes=4, dim=24, shots=3, views=3, val_per_class=8, noise=0.9, text_noise=0.8):
    """(views (E, N, D), labels, val features, val labels, text): unit class means plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    labels = torch.arange(classes).repeat_interleave(shots)
    views_t = F.normalize(means[labels] + noise * torch.randn(views, len(labels), dim, generator=g), dim=-1)
    val_y = torch.arange(classes).repeat(val_per_class)
    val_f = F.normalize(means[val_y] + noise * torch.randn(len(val_y), dim, generator=g), dim=-1)
    text = F.normalize(means + text_noise * torch.randn(classes, dim, generator=g), dim=-1)
    return views_t, labels, val_f, val_y, text


def raw_views(seed=0, classes=4, dim=24, shots=1, views=11, noise=0.9):
    """(raw features (E, N, D) of differing norms, labels, unit text): view 0 plain, 1..E-1 augmented."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    labels = torch.arange(classes).repeat_interleave(shots)
    raw = means[labels] + noise * torch.randn(views, len(labels), dim, generator=g)
    raw = raw * (0.5 + 3 * torch.rand(views, len(labels), 1, generator=g))  # CLIP features are not unit
    text = F.normalize(means + 0.8 * torch.randn(classes, dim, generator=g), dim=-1)
    return raw, labels, text


def support_of_raw(raw, labels, text, val_f=None, val_y=None, **kwargs):
    """A Support as ``fit`` builds it from raw features: unit views plus their norms."""
    dim = raw.shape[-1]
    val_f = torch.empty(0, dim) if val_f is None else val_f
    val_y = torch.empty(0, dtype=torch.long) if val_y is None else val_y
    return Support(views=F.normalize(raw, dim=-1), labels=labels, val_features=val_f, val_labels=val_y, text=text,
                   norms=raw.norm(dim=-1), **kwargs)


def background_task(tiny, shots=12, val=6, test=300):
    """The zero-shot head, a Support and test features for the background type (4 unseen classes)."""
    names = [f"{b} background" for b in BACKGROUNDS]
    zero_shot = build_zero_shot_head(tiny.model, tiny.tokenizer, names, ("a photo on a {}.", "a {}."))
    test_f, test_y = _features(tiny, data.generate(test, seed=4243))
    val_f, val_y = _features(tiny, _shots(val, 98))
    shots_f, shots_y = _features(tiny, _shots(shots, 11))
    support = Support(views=shots_f, labels=shots_y, val_features=val_f, val_labels=val_y,
                      text=zero_shot.class_embeddings, logit_scale=zero_shot.logit_scale, seed=0)
    return zero_shot, support, test_f, test_y


def assert_matches_and_adapts(ours, reference, zero_shot_logits, test_y, gain: float) -> tuple[float, float]:
    """``ours`` equals the official ``reference`` (<= 1e-5 relative, same top-1) and beats zero-shot by ``gain``."""
    assert rel_diff(ours, reference) <= 1e-5, rel_diff(ours, reference)
    assert torch.equal(ours.argmax(1), reference.argmax(1))
    zs = float((zero_shot_logits.argmax(1) == test_y).float().mean())
    adapted = float((ours.argmax(1) == test_y).float().mean())
    assert adapted >= zs + gain, (zs, adapted)
    return zs, adapted
