"""Tip-Adapter-F: official files import to the official formula; fitting follows the official loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipfold import errors
from clipfold.compile.adapters.base import ImportRequest, Support
from clipfold.compile.adapters.tip_f import fit_tip_f, import_tip_f, train_adapter
from clipfold.compile.heads.zero_shot import build_zero_shot_head
from clipfold.compile.tiny import data

from .fewshot_helpers import background_task, rel_diff
from .test_gda import _features

LABELS = ("red circle", "blue square", "green triangle")
TEMPLATES = ("a photo of a {}.", "a {}.")


def official_tip_f_logits(f, adapter_weight, cache_values, clip_weights, alpha, beta):
    """run_tip_adapter_F at test time: affinity = adapter(f); clip_weights (D, C)."""
    adapter = nn.Linear(adapter_weight.shape[1], adapter_weight.shape[0], bias=False).double()
    adapter.weight = nn.Parameter(adapter_weight.double())
    with torch.no_grad():
        affinity = adapter(f.double())
        cache_logits = ((-1) * (beta - beta * affinity)).exp() @ cache_values.double()
        clip_logits = 100. * f.double() @ clip_weights.double()
    return clip_logits + cache_logits * alpha


def _official_files(cache_dir, dim, classes=3, shots=4, seed=0, dtype=torch.float16):
    """What build_cache_model and run_tip_adapter_F save: keys (D, N), values (N, C), best_F (N, D)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(shots)
    keys = F.normalize(torch.randn(len(labels), dim, generator=g), dim=-1).permute(1, 0)
    values = F.one_hot(labels).half()
    weight = nn.Parameter((keys.t() + 0.05 * torch.randn(len(labels), dim, generator=g)).to(dtype))
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(keys.to(dtype), cache_dir / f"keys_{shots}shots.pt")
    torch.save(values, cache_dir / f"values_{shots}shots.pt")
    torch.save(weight, cache_dir / f"best_F_{shots}shots.pt")
    return cache_dir / f"best_F_{shots}shots.pt", weight.detach(), values


def _request(tiny, path, labels=LABELS, **options):
    return ImportRequest(checkpoint=path, loaded=tiny, labels=labels, templates=TEMPLATES, options=options)


@pytest.mark.parametrize("options, beta, alpha", [({}, 1.0, 1.17), ({"beta": "5.5", "alpha": "2.0"}, 5.5, 2.0)])
def test_import_matches_the_official_formula(tiny, tmp_path, options, beta, alpha):
    path, weight, values = _official_files(tmp_path / "caches" / "imagenet", dim=64)
    imported = import_tip_f(_request(tiny, path, **options))
    assert imported.head.method == "tip-adapter-f"
    assert (imported.hyperparameters["beta"], imported.hyperparameters["alpha"]) == (beta, alpha)
    assert imported.hyperparameters["keys_checked"] and imported.hyperparameters["shots"] == 4
    text = build_zero_shot_head(tiny.model, tiny.tokenizer, LABELS, TEMPLATES).class_embeddings
    clip_weights = torch.stack([F.normalize(r, dim=0) for r in text.double()], dim=1)
    random_f = F.normalize(torch.randn(40, 64, generator=torch.Generator().manual_seed(3)), dim=-1)
    real_f, _ = _features(tiny, data.generate(24, seed=5))
    for f in (random_f, real_f):
        reference = official_tip_f_logits(f, weight.float(), values, clip_weights, alpha, beta)
        for logits in (imported.head.logits(f), imported.head.fold().logits(f)):
            assert rel_diff(logits, reference) <= 1e-5, rel_diff(logits, reference)
            assert torch.equal(logits.topk(2).indices, reference.topk(2).indices)


@pytest.mark.parametrize("case, error, pattern", [
    ("dict", errors.CheckpointError, r"not a Tip-Adapter-F adapter weight: found \['state_dict'\]; expected one tensor"),
    ("width", errors.CheckpointError, r"adapter weight has shape \(12, 512\); expected \(N, 64\)"),
    ("nan", errors.CheckpointError, r"adapter weight holds NaN"),
    ("values", errors.CheckpointError, r"values have shape \(11, 3\); expected \(12, classes\)"),
    ("keys", errors.CheckpointError, r"keys have shape \(64, 10\); expected \(64, 12\)"),
    ("no_values", errors.CheckpointError, r"values_4shots.pt not found"),
    ("name", errors.CheckpointError, r"not named like the official adapter file best_F_<shots>shots.pt"),
    ("labels", errors.ConfigError, r"2 labels given, but values_4shots.pt has 3 classes"),
    ("alpha", errors.ConfigError, r"alpha='x' is not a number"),
])
def test_bad_files_are_refused(tiny, tmp_path, case, error, pattern):
    path, weight, values = _official_files(tmp_path, dim=512 if case == "width" else 64)
    labels, options = LABELS, {}
    if case == "dict":
        torch.save({"state_dict": {"weight": weight}}, path)
    elif case == "nan":
        torch.save(torch.full_like(weight, float("nan")), path)
    elif case == "values":
        torch.save(values[:11], tmp_path / "values_4shots.pt")
    elif case == "keys":
        torch.save(torch.zeros(64, 10), tmp_path / "keys_4shots.pt")
    elif case == "no_values":
        (tmp_path / "values_4shots.pt").unlink()
    elif case == "name":
        path = path.rename(tmp_path / "adapter.pt")
    elif case == "labels":
        labels = LABELS[:2]
    elif case == "alpha":
        options = {"alpha": "x"}
    with pytest.raises(error, match=pattern):
        import_tip_f(_request(tiny, path, labels=labels, **options))


def official_training(views, labels, clip_weights, keys, seed, epochs, val_f, val_y, beta=1.0, alpha=1.17, lr=1e-3):
    """run_tip_adapter_F's loop on features (float64): AdamW(eps 1e-4), per-step cosine, batch 256."""
    g = torch.Generator().manual_seed(seed)
    values = F.one_hot(labels).double()
    adapter = nn.Linear(keys.shape[0], keys.shape[1], bias=False).double()
    adapter.weight = nn.Parameter(keys.t().double().clone())
    e, n, _ = views.shape
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, eps=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * math.ceil(n / 256))
    best_acc, best = 0.0, None
    for _ in range(epochs):
        which = 1 + torch.randint(e - 1, (n,), generator=g)  # an augmented view of each shot
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, 256):
            i = perm[s:s + 256]
            image_features = views[which[i], i].double()
            affinity = adapter(image_features)
            cache_logits = ((-1) * (beta - beta * affinity)).exp() @ values
            tip_logits = 100. * image_features @ clip_weights + cache_logits * alpha
            loss = F.cross_entropy(tip_logits, labels[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        acc = float((official_tip_f_logits(val_f, adapter.weight.detach(), values, clip_weights, alpha, beta)
                     .argmax(1) == val_y).double().mean())
        if acc > best_acc:
            best_acc, best = acc, adapter.weight.detach().clone()
    return best


def _task(seed=0, classes=4, dim=24, shots=70, views=3):
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    labels = torch.arange(classes).repeat_interleave(shots)  # 280 shots: two batches per epoch
    views_t = F.normalize(means[labels] + 1.2 * torch.randn(views, len(labels), dim, generator=g), dim=-1)
    val_y = torch.arange(classes).repeat(10)
    val_f = F.normalize(means[val_y] + 1.2 * torch.randn(len(val_y), dim, generator=g), dim=-1)
    text = F.normalize(means + 1.0 * torch.randn(classes, dim, generator=g), dim=-1)
    return views_t, labels, val_f, val_y, text


def test_training_matches_the_official_loop():
    views, labels, val_f, val_y, text = _task()
    keys = F.normalize(views.mean(0), dim=-1).t()  # build_cache_model: (D, N)
    ours, chosen = train_adapter(views, labels, text, keys.t(), seed=4, epochs=6, val=(val_f, val_y))
    reference = official_training(views, labels, text.T.double(), keys, seed=4, epochs=6, val_f=val_f, val_y=val_y)
    assert (ours - keys.t()).abs().max() > 1e-3  # it trained
    assert rel_diff(ours, reference) <= 1e-5, rel_diff(ours, reference)
    assert 0 < chosen["val_accuracy"] <= 1


def test_fit_beats_zero_shot_on_real_features(tiny):
    zero_shot, support, test_f, test_y = background_task(tiny)
    shots_y = support.labels
    fitted = fit_tip_f(support)
    hyper = fitted.hyperparameters
    cache = fitted.head.caches[0]
    assert (hyper["beta"], hyper["alpha"]) == (cache.beta, cache.alpha) and 0 < hyper["val_accuracy"] <= 1
    reference = official_tip_f_logits(test_f, cache.keys, F.one_hot(shots_y).float(),
                                      zero_shot.class_embeddings.T, hyper["alpha"], hyper["beta"])
    ours = fitted.head.fold().logits(test_f)
    assert rel_diff(ours, reference) <= 1e-5, rel_diff(ours, reference)
    zs = float((zero_shot.logits(test_f).argmax(1) == test_y).float().mean())
    adapted = float((ours.argmax(1) == test_y).float().mean())
    assert adapted >= zs + 0.03, (zs, adapted)


def test_without_validation_the_config_values_are_used():
    views, labels, val_f, val_y, text = _task(shots=5)
    fitted = fit_tip_f(Support(views=views, labels=labels, val_features=val_f[:0], val_labels=val_y[:0], text=text),
                       epochs=2)
    assert (fitted.hyperparameters["beta"], fitted.hyperparameters["alpha"]) == (1.0, 1.17)
    assert fitted.hyperparameters["best_epoch"] == 1 and "val_accuracy" not in fitted.hyperparameters
