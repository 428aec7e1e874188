"""MaPLe import: the prompted image tower and text head against the official formula, fold and export."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipfold import errors
from clipfold.compile.adapters.base import ImportRequest
from clipfold.compile.adapters.maple import MapleVisual, import_maple
from clipfold.compile.stages.fold import find_input_conv, fold_input_normalization
from clipfold.compile.tiny import data
from clipfold.runtime.preprocess import preprocess

from .test_coop import LABELS, rel_diff, word_embeddings, write_dassl_checkpoint, write_dassl_log

P = "prompt_learner."


def maple_state(tiny, depth, seed=5, n_ctx=2):
    """The prompt learner's tensors as MaPLe saves them (text width 64, vision width 96), in fp16 as the
    official fp16 runs store them, plus frozen CLIP weights under image_encoder./text_encoder."""
    g = torch.Generator().manual_seed(seed)
    width, vision = 64, 96
    state = {
        P + "ctx": word_embeddings(tiny, "a photo")[:n_ctx] + 0.05 * torch.randn(n_ctx, width, generator=g),
        P + "proj.weight": 0.3 * torch.randn(vision, width, generator=g),
        P + "proj.bias": 0.05 * torch.randn(vision, generator=g),
        P + "token_prefix": torch.zeros(len(LABELS), 1, width),
        P + "token_suffix": torch.zeros(len(LABELS), 29, width),
        "image_encoder.conv1.weight": tiny.model.visual.conv1.weight.detach().clone(),
        "logit_scale": tiny.model.logit_scale.detach().clone(),
    }
    for i in range(depth - 1):
        state[P + f"compound_prompts_text.{i}"] = 0.1 * torch.randn(n_ctx, width, generator=g)
        state[P + f"compound_prompt_projections.{i}.weight"] = 0.3 * torch.randn(vision, width, generator=g)
        state[P + f"compound_prompt_projections.{i}.bias"] = 0.05 * torch.randn(vision, generator=g)
    return {k: v.half() if k.startswith(P) else v for k, v in state.items()}


class OfficialMaPLe:
    """trainers/maple.py and clip/model.py transcribed in float64 (open_clip's blocks are batch-first)."""

    def __init__(self, tiny, classnames, state, ctx_init="a photo of a"):
        self.clip = copy.deepcopy(tiny.model).double().eval()
        s = {k[len(P):]: v.double() for k, v in state.items() if k.startswith(P)}
        self.n_ctx = s["ctx"].shape[0]
        depth = 1 + sum(k.startswith("compound_prompts_text.") for k in s)
        self.text_prompts = [s[f"compound_prompts_text.{i}"] for i in range(depth - 1)]
        self.visual_prompts = [s[f"compound_prompts_text.{i}"] @ s[f"compound_prompt_projections.{i}.weight"].T
                               + s[f"compound_prompt_projections.{i}.bias"] for i in range(depth - 1)]
        self.shared_ctx = s["ctx"] @ s["proj.weight"].T + s["proj.bias"]
        classnames = [name.replace("_", " ") for name in classnames]
        # MultiModalPromptLearner: `if ctx_init and (n_ctx) <= 4: prompt_prefix = ctx_init`, else "X X ..."
        if ctx_init and self.n_ctx <= 4:
            prompt_prefix = ctx_init.replace("_", " ")
        else:
            prompt_prefix = " ".join(["X"] * self.n_ctx)
        self.tokenized = tiny.tokenizer([prompt_prefix + " " + name + "." for name in classnames])
        with torch.no_grad():
            embedding = self.clip.token_embedding(self.tokenized)
        ctx = s["ctx"].unsqueeze(0).expand(len(classnames), -1, -1)
        self.prompts = torch.cat([embedding[:, :1], ctx, embedding[:, 1 + self.n_ctx:]], dim=1)

    @staticmethod
    def _blocks(blocks, x, deeper, insert, attn_mask=None):
        counter = 0
        for i, block in enumerate(blocks):
            if i > 0 and len(deeper) > 0 and not counter > len(deeper) - 1:
                x = insert(x, deeper[counter])
                counter += 1
            x = block(x, attn_mask=attn_mask)
        return x

    @torch.no_grad()
    def text_features(self):
        clip, n = self.clip, self.n_ctx
        x = self.prompts + clip.positional_embedding

        def insert(x, ctx):
            return torch.cat([x[:, :1], ctx.expand(x.shape[0], -1, -1), x[:, 1 + n:]], dim=1)

        x = self._blocks(clip.transformer.resblocks, x, self.text_prompts, insert, clip.attn_mask)
        x = clip.ln_final(x)
        return x[torch.arange(x.shape[0]), self.tokenized.argmax(dim=-1)] @ clip.text_projection

    @torch.no_grad()
    def image_features(self, image):
        v, n = self.clip.visual, self.n_ctx
        x = v.conv1(image.double())
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype), x], dim=1)
        x = x + v.positional_embedding
        x = torch.cat([x, self.shared_ctx.expand(x.shape[0], -1, -1)], dim=1)
        x = v.ln_pre(x)

        def insert(x, ctx):
            return torch.cat([x[:, 0:x.shape[1] - n], ctx.expand(x.shape[0], -1, -1)], dim=1)

        x = self._blocks(v.transformer.resblocks, x, self.visual_prompts, insert)
        return v.ln_post(x[:, 0, :]) @ v.proj

    def logits(self, image):
        image_features = self.image_features(image)
        text_features = self.text_features()
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        return self.clip.logit_scale.exp() * image_features @ text_features.t()


def normalized_pixels(tiny, n=6, seed=9):
    raw = torch.from_numpy(preprocess([s.image for s in data.generate(n, seed=seed)], tiny.preprocess)).float()
    mean = torch.tensor(tiny.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny.preprocess.std).view(1, 3, 1, 1)
    return raw, (raw / 255.0 - mean) / std


OFFICIAL_CONFIG = {"N_CTX": 2, "CTX_INIT": "a photo of a", "PREC": "fp16", "PROMPT_DEPTH": 9}  # vit_b16_c2_ep5_batch4_2ctx.yaml


def _import(tiny, tmp_path, state, labels=LABELS, options=None, config=OFFICIAL_CONFIG):
    write_dassl_checkpoint(tmp_path, "MultiModalPromptLearner", state, epoch=5)
    if config is not None:
        write_dassl_log(tmp_path, "MAPLE", config)
    return import_maple(ImportRequest(tmp_path, tiny, labels, (), options or {}))


def _logits(imported, pixels):
    with torch.no_grad():
        return imported.head.logits(F.normalize(imported.visual(pixels), dim=-1))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_matches_the_official_formula(tiny, tmp_path, depth):
    state = maple_state(tiny, depth)
    imported = _import(tiny, tmp_path, state)
    assert imported.hyperparameters["prompt_depth"] == depth and imported.head.method == "maple"
    reference_model = OfficialMaPLe(tiny, LABELS, state)
    _, real = normalized_pixels(tiny)
    noise = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for pixels in (noise, real):
        reference = reference_model.logits(pixels)
        logits = _logits(imported, pixels)
        assert rel_diff(logits, reference) <= 1e-5
        assert torch.equal(logits.topk(2).indices, reference.topk(2).indices)
        # the prompts change the image embedding (else this test could not see a misplaced token)
        with torch.no_grad():
            plain = F.normalize(tiny.model.encode_image(pixels), dim=-1)
            assert float((F.normalize(imported.visual(pixels), dim=-1) - plain).abs().max()) > 1e-3


@pytest.mark.parametrize("source", ["log", "log-dated", "option", "file-with-log"])
def test_the_init_words_past_n_ctx_stay_in_the_prompt(tiny, tmp_path, source):
    """The official configs (N_CTX 2, CTX_INIT "a photo of a") prompt [SOS, ctx, ctx, "of", "a", name, ".", EOT]."""
    state = maple_state(tiny, 2)
    write_dassl_checkpoint(tmp_path, "MultiModalPromptLearner", state, epoch=5)
    options, checkpoint = {}, tmp_path
    if source == "option":
        options = {"ctx_init": "a_photo_of_a"}
    else:
        write_dassl_log(tmp_path, "MAPLE", OFFICIAL_CONFIG, name="log.txt-2024-01-02-03-04-05" if source == "log-dated" else "log.txt")
    if source == "file-with-log":
        checkpoint = tmp_path / "MultiModalPromptLearner" / "model.pth.tar-5"
    imported = import_maple(ImportRequest(checkpoint, tiny, LABELS, (), options))
    assert imported.hyperparameters["ctx_init"] == "a photo of a"
    assert imported.hyperparameters["prompt_prefix"] == "a photo of a"
    _, pixels = normalized_pixels(tiny)
    reference = OfficialMaPLe(tiny, LABELS, state, ctx_init="a photo of a").logits(pixels)
    logits = _logits(imported, pixels)
    assert rel_diff(logits, reference) <= 1e-5
    assert torch.equal(logits.argmax(1), reference.argmax(1))
    without_words = OfficialMaPLe(tiny, LABELS, state, ctx_init="").logits(pixels)
    assert rel_diff(without_words, reference) > 1e-2  # the words matter: a "X X name." prompt is caught


def test_random_init_and_unknown_init(tiny, tmp_path):
    state = maple_state(tiny, 2)
    imported = _import(tiny, tmp_path, state, config=dict(OFFICIAL_CONFIG, CTX_INIT=""))
    assert imported.hyperparameters["prompt_prefix"] == "X X"
    _, pixels = normalized_pixels(tiny, n=3)
    reference = OfficialMaPLe(tiny, LABELS, state, ctx_init="").logits(pixels)
    assert rel_diff(_logits(imported, pixels), reference) <= 1e-5
    with pytest.raises(errors.ConfigError, match=r"CTX_INIT cannot be known .* --set ctx_init='a photo of a'"):
        _import(tiny, tmp_path / "bare", state, config=None)


def test_visual_folds_its_input_normalization_and_exports(tiny, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    state = maple_state(tiny, 3)
    imported = _import(tiny, tmp_path, state)
    visual = imported.visual
    assert isinstance(visual, MapleVisual)
    _, _, conv = find_input_conv(visual)
    assert torch.equal(conv.weight, tiny.model.visual.conv1.weight)
    raw, normalized = normalized_pixels(tiny, n=4)
    spec = tiny.preprocess
    folded = fold_input_normalization(visual, spec.mean, spec.std)
    with torch.no_grad():
        assert rel_diff(folded(raw), visual(normalized).double()) <= 1e-5

    path = tmp_path / "maple_visual.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(visual, (normalized[:2],), dynamo=True, opset_version=18,
                                    input_names=["pixels"], output_names=["embedding"],
                                    dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1, max=1024)}})
        program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference_model = OfficialMaPLe(tiny, LABELS, state)
    for pixels in (normalized[:1], normalized[1:4]):
        (embedding,) = session.run(None, {"pixels": pixels.numpy()})
        assert rel_diff(torch.from_numpy(embedding), reference_model.image_features(pixels)) <= 1e-5
        logits = imported.head.logits(F.normalize(torch.from_numpy(embedding), dim=-1))
        reference = reference_model.logits(pixels)
        assert rel_diff(logits, reference) <= 1e-5
        assert np.array_equal(logits.topk(2).indices.numpy(), reference.topk(2).indices.numpy())


def _without(state, key):
    return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize("edit, pattern", [
    (lambda s: _without(s, P + "proj.weight"),
     r"not a MaPLe checkpoint: missing keys \['prompt_learner.proj.weight'\]; expected \['prompt_learner.ctx', "
     r"'prompt_learner.proj.weight', 'prompt_learner.proj.bias'\]; found \["),
    (lambda s: {"ctx": s[P + "ctx"]}, r"missing keys \['prompt_learner.ctx', .*found \['ctx'\]"),
    (lambda s: dict(s, **{P + "ctx": torch.zeros(2, 512)}), r"prompt_learner.ctx has shape \(2, 512\); expected \(n_ctx, 64\)"),
    (lambda s: dict(s, **{P + "proj.weight": torch.zeros(768, 64)}),
     r"needs text width 64 -> vision width 96; the checkpoint was trained on another backbone"),
    (lambda s: dict(s, **{P + "compound_prompts_text.1": torch.full((2, 64), float("nan"))}),
     r"compound_prompts_text.1 holds 128 NaN or inf values"),
    (lambda s: _without(s, P + "compound_prompt_projections.0.bias"),
     r"missing keys \['prompt_learner.compound_prompt_projections.0.bias'\]"),
    (lambda s: dict(s, **{P + "compound_prompts_text.2": torch.zeros(2, 64),
                          P + "compound_prompt_projections.2.weight": torch.zeros(96, 64),
                          P + "compound_prompt_projections.2.bias": torch.zeros(96)}),
     r"has 3 compound prompts \(depth 4\), but this model's transformers have 3 layers"),
    (lambda s: dict(s, **{"image_encoder.conv1.weight": torch.zeros(768, 3, 16, 16)}),
     r"trained on another backbone: its image_encoder.conv1.weight has shape \(768, 3, 16, 16\), this model's "
     r"has \(96, 3, 8, 8\)"),
])
def test_bad_checkpoints_are_refused(tiny, tmp_path, edit, pattern):
    with pytest.raises(errors.CheckpointError, match=pattern):
        _import(tiny, tmp_path, edit(maple_state(tiny, 3)))


def test_non_vit_image_towers_are_refused():
    with pytest.raises(errors.ConfigError, match="image tower is Conv2d, expected open_clip's VisionTransformer"):
        MapleVisual(torch.nn.Conv2d(3, 8, 3), torch.zeros(2, 8), [])
