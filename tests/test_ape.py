"""APE (training-free): the official criterion, refined values and formula; folded and exported."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipfold import errors
from clipfold.compile import tiny as tiny_pkg
from clipfold.compile.adapters import ape
from clipfold.compile.adapters.base import Support
from clipfold.compile.adapters.store import Adapter, Backbone, save_adapter
from clipfold.compile.config import CompileConfig
from clipfold.compile.heads.zero_shot import build_zero_shot_head
from clipfold.compile.pipeline import compile_bundle
from clipfold.runtime.bundle.files import sha256_file

from .engine_parity import assert_engine_matches
from .test_gda import BACKGROUNDS, _features, _shots


def official_criterion(clip_weights, cache_keys, shots, w, feat_num):
    """utils.cal_criterion with only_use_txt=False: the official quadruple loop, unchanged in order."""
    feat_dim, cate_num = clip_weights.shape
    feats = torch.cat([clip_weights.t().unsqueeze(1), cache_keys.reshape(cate_num, shots, feat_dim)], dim=1)
    sim_sum, count = torch.zeros(feat_dim, dtype=feats.dtype), 0
    for i in range(cate_num):
        for j in range(cate_num):
            for m in range(feats.shape[1]):
                for n in range(feats.shape[1]):
                    if i != j:
                        sim_sum += feats[i, m, :] * feats[j, n, :]
                        count += 1
    criterion = -1 * w[0] * (sim_sum / count) + w[1] * torch.var(clip_weights, dim=1)
    return torch.topk(criterion, k=feat_num).indices


def official_ape_logits(test_features, cache_keys, cache_values, clip_weights, indices, beta, alpha, gamma):
    """main.APE's final evaluation, transcribed: clip_weights (D, C), keys (N, D) sorted by class."""
    new_clip_weights = clip_weights[indices, :]
    new_cache_keys = cache_keys[:, indices]
    new_test_features = test_features[:, indices]
    new_clip_weights = new_clip_weights / new_clip_weights.norm(dim=0, keepdim=True)
    new_cache_keys = new_cache_keys / new_cache_keys.norm(dim=-1, keepdim=True)
    new_test_features = new_test_features / new_test_features.norm(dim=-1, keepdim=True)
    key_logits = (new_cache_keys @ new_clip_weights).softmax(1)
    cache_div = torch.sum(cache_values * torch.log2((cache_values + 1e-6) / (key_logits + 1e-6)), dim=1)[:, None]
    soft_cache_values = cache_values * (cache_div * gamma).exp()
    R_fF = new_test_features @ new_cache_keys.t()
    cache_logits = ((-1) * (beta - beta * R_fF)).exp() @ soft_cache_values
    return 100.0 * test_features @ clip_weights + cache_logits * alpha


def _random_support(classes=3, shots=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    views = F.normalize(torch.randn(4, classes * shots, dim, generator=g), dim=-1)
    labels = torch.arange(classes).repeat_interleave(shots)  # sorted by class, as the official cache
    text = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    val = F.normalize(torch.randn(12, dim, generator=g), dim=-1)
    return Support(views, labels, val, torch.arange(12) % classes, text)


def test_channel_criterion_equals_the_official_loop():
    support = _random_support()
    keys = F.normalize(support.views.mean(0), dim=-1)
    for feat_num in (1, 5, 16):
        mine = ape.select_channels(support.text, keys, support.labels, feat_num)
        theirs = official_criterion(support.text.T.double(), keys.double(), 2, ape.CRITERION_WEIGHTS, feat_num)
        assert torch.equal(mine.sort().values, theirs.sort().values)


@pytest.mark.parametrize("feat_num", [None, "6"])
def test_fit_equals_the_official_formula_and_folds_exactly(feat_num):
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(4, 6, 16, generator=g) * (0.5 + 3 * torch.rand(4, 6, 1, generator=g))
    base = _random_support()
    support = Support(F.normalize(raw, dim=-1), base.labels, base.val_features, base.val_labels, base.text,
                      norms=raw.norm(dim=-1), options={"feat_num": feat_num} if feat_num else {})
    fitted = ape.fit_ape(support)
    hp = fitted.hyperparameters
    candidates = [round(c * 16) for c in ape.FEAT_CANDIDATES]  # the configs' 400..800 of 1024, searched on val
    assert hp["feat_num"] == (int(feat_num) if feat_num else hp["feat_num"]) and 0.0 <= hp["val_accuracy"] <= 1.0
    assert feat_num or hp["feat_num"] in candidates
    # utils.py build_cache_model: the raw features of the augmented passes averaged, then normalized
    keys = raw[1:].mean(0)
    keys = (keys / keys.norm(dim=-1, keepdim=True)).double()
    indices = official_criterion(support.text.T.double(), keys, 2, ape.CRITERION_WEIGHTS, hp["feat_num"])
    f = F.normalize(torch.randn(50, 16, generator=torch.Generator().manual_seed(3)), dim=-1)
    reference = official_ape_logits(f.double(), keys, F.one_hot(support.labels).double(), support.text.T.double(),
                                    indices, hp["beta"], hp["alpha"], hp["gamma"])
    for logits in (fitted.head.logits(f), fitted.head.fold().logits(f)):
        assert (logits.double() - reference).abs().max() / reference.abs().max() <= 1e-5
        assert torch.equal(logits.topk(2).indices, reference.topk(2).indices)


def test_search_picks_the_first_best_in_the_official_loop_order():
    support = _random_support(seed=5)
    keys = F.normalize(support.views.mean(0), dim=-1)
    values = F.one_hot(support.labels).float()
    channels = ape.select_channels(support.text, keys, support.labels, 8)
    div = ape.refined_values(support.text, keys, values, channels)
    sub_keys = F.normalize(keys[:, channels], dim=-1)
    chosen, acc = ape.search(support.text, sub_keys, values, div, channels, support.val_features, support.val_labels)
    # The official search loop, literally (main.APE), in float64 like ours.
    R_fF = F.normalize(support.val_features[:, channels], dim=-1).double() @ sub_keys.double().t()
    R_fW = 100.0 * support.val_features.double() @ support.text.double().T
    best, first = 0.0, None
    for beta in [i * (7 - 0.1) / 200 + 0.1 for i in range(200)]:
        for alpha in [i * (7 - 0.1) / 20 + 0.1 for i in range(20)]:
            for gamma in [i * 0.5 / 5 for i in range(5)]:
                soft = values.double() * (div.double() * gamma).exp()
                logits = R_fW + ((-1) * (beta - beta * R_fF)).exp() @ soft * alpha
                a = float((logits.argmax(1) == support.val_labels).double().mean())
                if a > best:
                    best, first = a, (beta, alpha, gamma)
    assert (chosen["beta"], chosen["alpha"], chosen["gamma"]) == pytest.approx(first) and acc == pytest.approx(best)


def test_bad_feat_num_is_refused():
    support = _random_support()
    with pytest.raises(errors.ConfigError, match="feat_num"):
        ape.select_channels(support.text, support.features, support.labels, 17)


def test_exported_engine_equals_the_official_formula(tiny, tmp_path):
    labels = tuple(f"{b} background" for b in BACKGROUNDS)
    text = build_zero_shot_head(tiny.model, tiny.tokenizer, labels, ("a photo on a {}.", "a {}.")).class_embeddings
    shots_f, shots_y = _features(tiny, _shots(4, 11))
    order = shots_y.argsort(stable=True)
    shots_f, shots_y = shots_f[order], shots_y[order]
    val_f, val_y = _features(tiny, _shots(4, 98))
    fitted = ape.fit_ape(Support(shots_f, shots_y, val_f, val_y, text))
    adapter = Adapter(fitted.head, labels, Backbone("clipfold-tiny", sha256_file(tiny_pkg.checkpoint_path())),
                      fitted.hyperparameters)
    path = save_adapter(adapter, tmp_path / "ape.safetensors")
    result = compile_bundle(CompileConfig(labels=None, adapter=path, out=tmp_path / "ape.bundle", top_k=3))
    assert result.manifest.head.method == "ape"
    hp = fitted.hyperparameters
    indices = official_criterion(text.T.double(), shots_f.double(), 4, ape.CRITERION_WEIGHTS, hp["feat_num"])

    def reference(x):
        f = F.normalize(tiny.model.encode_image(x).double(), dim=-1)
        return official_ape_logits(f, shots_f.double(), F.one_hot(shots_y).double(), text.T.double(), indices,
                                   hp["beta"], hp["alpha"], hp["gamma"])

    assert_engine_matches(result.path, tiny.preprocess, reference)
