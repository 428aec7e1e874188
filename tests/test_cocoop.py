"""CoCoOp import: the image-conditioned logits module against the official formula, and its ONNX export."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from clipfold import errors
from clipfold.compile.adapters.base import ImportRequest
from clipfold.compile.adapters.cocoop import import_cocoop

from .test_coop import (
    LABELS,
    random_unit,
    real_features,
    rel_diff,
    word_embeddings,
    write_dassl_checkpoint,
    write_dassl_log,
)


def cocoop_state(tiny, seed=3):
    """A prompt learner as CoCoOp trains it: ctx near "a photo of a", meta_net D -> D//16 -> W."""
    g = torch.Generator().manual_seed(seed)
    dim, width = tiny.info.embed_dim, 64
    ctx = word_embeddings(tiny, "a photo of a") + 0.05 * torch.randn(4, width, generator=g)
    return {
        "ctx": ctx,
        "meta_net.linear1.weight": 0.3 * torch.randn(dim // 16, dim, generator=g),
        "meta_net.linear1.bias": 0.1 * torch.randn(dim // 16, generator=g),
        "meta_net.linear2.weight": 0.3 * torch.randn(width, dim // 16, generator=g),
        "meta_net.linear2.bias": 0.02 * torch.randn(width, generator=g),
        "token_prefix": torch.zeros(len(LABELS), 1, width),  # saved, then ignored by the official load_model
        "token_suffix": torch.zeros(len(LABELS), 27, width),
    }


@torch.no_grad()
def official_cocoop_logits(tiny, classnames, state, image_features, ctx_init=""):
    """trainers/cocoop.py transcribed in float64: PromptLearner.forward, TextEncoder, CustomCLIP.forward."""
    clip = copy.deepcopy(tiny.model).double().eval()
    n_ctx = state["ctx"].shape[0]
    # PromptLearner.__init__: with CTX_INIT, n_ctx = its word count and the prompt prefix is the init text
    prompt_prefix = ctx_init.replace("_", " ") if ctx_init else " ".join(["X"] * n_ctx)
    assert not ctx_init or len(prompt_prefix.split(" ")) == n_ctx
    classnames = [name.replace("_", " ") for name in classnames]
    tokenized = tiny.tokenizer([prompt_prefix + " " + name + "." for name in classnames])
    embedding = clip.token_embedding(tokenized)
    prefix, suffix = embedding[:, :1, :], embedding[:, 1 + n_ctx:, :]
    w1, b1 = state["meta_net.linear1.weight"].double(), state["meta_net.linear1.bias"].double()
    w2, b2 = state["meta_net.linear2.weight"].double(), state["meta_net.linear2.bias"].double()

    image_features = image_features.double()
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    bias = (torch.relu(image_features @ w1.T + b1) @ w2.T + b2).unsqueeze(1)
    ctx_shifted = state["ctx"].double().unsqueeze(0) + bias
    logits = []
    for ctx_i, imf_i in zip(ctx_shifted, image_features):
        ctx_i = ctx_i.unsqueeze(0).expand(len(classnames), -1, -1)
        prompts = torch.cat([prefix, ctx_i, suffix], dim=1)
        x = prompts + clip.positional_embedding
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        text = x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ clip.text_projection
        text = text / text.norm(dim=-1, keepdim=True)
        logits.append(clip.logit_scale.exp() * imf_i @ text.t())
    return torch.stack(logits)


def _import(tiny, tmp_path, state, labels=LABELS):
    write_dassl_checkpoint(tmp_path, "prompt_learner", state)
    return import_cocoop(ImportRequest(tmp_path, tiny, labels, (), {}))


def test_init_words_of_several_tokens_stay_in_the_prompt(tiny, tmp_path):
    """CTX_INIT "a clipfold photo of": 4 words (n_ctx 4), 5 tokens; the official prompt keeps "of"."""
    state = cocoop_state(tiny)
    write_dassl_checkpoint(tmp_path, "prompt_learner", state)
    write_dassl_log(tmp_path, "COCOOP", {"N_CTX": 4, "CTX_INIT": "a clipfold photo of", "PREC": "fp16"})
    imported = import_cocoop(ImportRequest(tmp_path, tiny, LABELS, (), {}))
    assert imported.hyperparameters["ctx_init"] == "a clipfold photo of"
    f = real_features(tiny)[:4]
    reference = official_cocoop_logits(tiny, LABELS, state, f, ctx_init="a clipfold photo of")
    with torch.no_grad():
        assert rel_diff(imported.logits_module(f), reference) <= 1e-5
    assert rel_diff(official_cocoop_logits(tiny, LABELS, state, f), reference) > 1e-3


def test_matches_the_official_formula(tiny, tmp_path):
    state = cocoop_state(tiny)
    imported = _import(tiny, tmp_path, state)
    assert imported.head is None and imported.slow and imported.labels == LABELS
    assert imported.hyperparameters["n_ctx"] == 4 and imported.hyperparameters["meta_hidden"] == 4
    for f in (random_unit(7, tiny.info.embed_dim), real_features(tiny)):
        reference = official_cocoop_logits(tiny, LABELS, state, f)
        with torch.no_grad():
            logits = imported.logits_module(f)
        assert rel_diff(logits, reference) <= 1e-5
        assert torch.equal(logits.topk(2).indices, reference.topk(2).indices)
    # The meta-net matters: the same images without it score differently.
    no_meta = dict(state, **{"meta_net.linear2.weight": torch.zeros(64, 4), "meta_net.linear2.bias": torch.zeros(64)})
    f = real_features(tiny)
    with_meta = official_cocoop_logits(tiny, LABELS, state, f)
    assert rel_diff(official_cocoop_logits(tiny, LABELS, no_meta, f), with_meta) > 1e-3


def test_exports_to_onnx_with_a_dynamic_batch(tiny, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    state = cocoop_state(tiny)
    module = _import(tiny, tmp_path, state).logits_module
    path = tmp_path / "cocoop.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (random_unit(2, tiny.info.embed_dim),), dynamo=True, opset_version=18,
                                    input_names=["f"], output_names=["logits"],
                                    dynamic_shapes={"f": {0: torch.export.Dim("batch", min=1, max=1024)}})
        program.save(str(path))
    assert path.stat().st_size < 4_000_000  # the 49408-token vocabulary table (12.6 MB) stays out
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    features = real_features(tiny, n=4)
    for f in (features[:1], features[1:4]):
        (logits,) = session.run(None, {"f": f.numpy()})
        reference = official_cocoop_logits(tiny, LABELS, state, f)
        assert logits.shape == (len(f), len(LABELS))
        assert rel_diff(torch.from_numpy(logits), reference) <= 1e-5
        assert np.array_equal(np.argsort(-logits, axis=1)[:, :2], reference.topk(2).indices.numpy())


@pytest.mark.parametrize("change, error, pattern", [
    ({"meta_net.linear1.weight": None}, errors.CheckpointError,
     r"not a CoCoOp checkpoint: missing keys \['meta_net.linear1.weight'\]; expected \['ctx', "
     r"'meta_net.linear1.weight', .*found \['ctx', 'meta_net.linear1.bias'"),
    ({"meta_net.linear1.weight": torch.zeros(32, 512), "meta_net.linear1.bias": torch.zeros(32),
      "meta_net.linear2.weight": torch.zeros(64, 32)}, errors.CheckpointError,
     r"meta_net.linear1.weight has shape \(32, 512\), expected \(32, 64\) for image embeddings of width 64"),
    ({"ctx": torch.zeros(4, 512)}, errors.CheckpointError, r"ctx has width 512, but this model's text width is 64"),
    ({"meta_net.linear2.bias": torch.full((64,), float("nan"))}, errors.CheckpointError,
     r"meta_net.linear2.bias holds 64 NaN or inf values"),
    ({"ctx": torch.zeros(2, 4, 64)}, errors.CheckpointError, r"CoCoOp learns one \(n_ctx, width\) context"),
])
def test_bad_checkpoints_are_refused(tiny, tmp_path, change, error, pattern):
    state = cocoop_state(tiny)
    for key, value in change.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    with pytest.raises(error, match=pattern):
        _import(tiny, tmp_path, state)


def test_labels_are_required(tiny, tmp_path):
    with pytest.raises(errors.ConfigError, match="do not store class names"):
        _import(tiny, tmp_path, cocoop_state(tiny), labels=None)
