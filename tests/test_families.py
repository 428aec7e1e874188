"""Every open_clip family compiles or is refused in one line naming why (issue 24).

The default run checks each mechanism on small random towers of the real open_clip / timm classes
(EVA's CustomTextCLIP text tower, CoCa's tuple outputs, MobileCLIP's MobileOne stem, the
fp32-native and multilingual refusals). The slow test (``make test-families``) compiles one
registered model of every family with random weights and ``--text``: each passes parity against
open_clip eager or is refused by a one-line :class:`ClipfoldError`.
"""

from __future__ import annotations

import types

import numpy as np
import onnxruntime as ort
import open_clip
import pytest
import torch
import torch.nn.functional as F

from clipfold.compile.config import CompileConfig
from clipfold.compile.heads.zero_shot import encode_prompts, pooled_positions
from clipfold.compile.pipeline import compile_bundle
from clipfold.compile.stages.export import EmbeddingGraph, export_onnx
from clipfold.compile.stages.fold import fold_input_normalization, input_readers
from clipfold.compile.stages.load import load_model
from clipfold.errors import ClipfoldError, ExportError, ModelError

from .families_helpers import make_unigram_tokenizer

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SMALL_VIT = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16}
SMALL_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}


def official_embedding(model, pixels: torch.Tensor) -> torch.Tensor:
    """open_clip's eval path on uint8 pixels: /255, Normalize(mean, std), encode_image, unit rows."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return F.normalize(model.encode_image((pixels.float() / 255 - mean) / std).float(), dim=-1)


def run_onnx(path, pixels: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: pixels.numpy()})[0]


# --- EVA: a CustomTextCLIP whose text tower is CLIP's causal one (item 4) --------------------------


def test_custom_text_clip_causal_tower_is_pooled_and_cut_like_open_clip():
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(32, SMALL_VIT, SMALL_TEXT).eval()  # EVA02-B-16's model class
    tokenizer = open_clip.get_tokenizer("EVA02-B-16")
    prompts = ["a photo of a cat.", "dog", "a much longer prompt about a small red car parked by the sea"]
    tokens = tokenizer(prompts)
    assert pooled_positions(model, tokens).tolist() == tokens.argmax(dim=-1).tolist()
    with torch.no_grad():
        official = F.normalize(model.encode_text(tokens), dim=-1)  # full context, open_clip's TextTransformer
    assert torch.allclose(encode_prompts(model, tokenizer, prompts), official, atol=1e-5)


def test_custom_text_clip_text_tower_is_carried(tmp_path):
    from clipfold.compile.stages.text_tower import export_text
    from clipfold.runtime.text_encoder import TextEncoder

    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(32, SMALL_VIT, SMALL_TEXT).eval()
    loaded = types.SimpleNamespace(model=model, tokenizer=open_clip.get_tokenizer("EVA02-B-16"),
                                   info=types.SimpleNamespace(name="EVA02-like"))
    tower = export_text(loaded, tmp_path, ["a photo of a cat.", "a dog"], opset=18)
    assert tower.cut_after_end and tower.parity.embedding_cosine_min >= 0.99999
    got = TextEncoder(tmp_path, tower).embed(["a red car", "sky"]).embeddings
    with torch.no_grad():
        ref = F.normalize(model.encode_text(loaded.tokenizer(["a red car", "sky"])), dim=-1).numpy()
    assert np.abs(got - ref).max() < 1e-5


# --- CoCa: towers that return (pooled, tokens) (item 3) -------------------------------------------


def small_coca():
    torch.manual_seed(0)
    vision = {**SMALL_VIT, "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True}
    text = {**SMALL_TEXT, "context_length": 76, "embed_cls": True, "output_tokens": True}
    multimodal = {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                  "attn_pooler_heads": 2}
    return open_clip.CoCa(32, multimodal, text, vision).eval()


def test_coca_image_tower_exports_its_pooled_embedding(tmp_path):
    model = small_coca()
    graph = EmbeddingGraph(fold_input_normalization(model.visual, MEAN, STD))
    export_onnx(graph, tmp_path / "coca.onnx", (32, 32), 18)
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    got = run_onnx(tmp_path / "coca.onnx", pixels)
    assert np.abs(got - official_embedding(model, pixels).numpy()).max() < 1e-5


def test_an_export_failure_is_one_line_with_its_cause(tmp_path):
    class Broken(torch.nn.Module):
        image_size = (32, 32)

        def forward(self, x):
            raise ValueError("the cause\nwith a second line\nand a third")

    with pytest.raises(ExportError) as info:
        export_onnx(EmbeddingGraph(Broken()), tmp_path / "broken.onnx", (32, 32), 18)
    assert "\n" not in str(info.value) and "the cause" in str(info.value)


# --- MobileCLIP: a stem whose input two branches read (item 2) -------------------------------------


def test_mobileone_stem_is_reparameterized_and_folded_exactly():
    from open_clip.timm_model import TimmModel

    torch.manual_seed(0)
    tower = TimmModel("fastvit_mci0", embed_dim=32, image_size=64, pool="avg", proj=None).eval()
    for bn in (m for m in tower.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # stats a fusion must carry
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    calls, _ = input_readers(tower, (64, 64))
    assert len(calls) >= 2  # MobileCLIP's stem: the 3x3 and the 1x1 branch both read the pixels
    folded = fold_input_normalization(tower, MEAN, STD)
    assert len(input_readers(folded, (64, 64))[0]) == 1
    pixels = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    model = types.SimpleNamespace(encode_image=tower)
    with torch.no_grad():
        got = F.normalize(folded(pixels.float()), dim=-1)
    cosine = (got * official_embedding(model, pixels)).sum(-1)
    assert float(cosine.min()) > 0.99999


def test_a_tower_whose_input_two_operators_read_is_normalized_in_the_graph():
    class TwoReaders(torch.nn.Module):  # like an unfused MobileOne stem: a padded 3x3 and a 1x1 branch
        image_size = (16, 16)

        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.b = torch.nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return (self.a(x) + self.b(x)).mean(dim=(2, 3))

    torch.manual_seed(0)
    tower = TwoReaders().eval()
    folded = fold_input_normalization(tower, MEAN, STD)
    pixels = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(folded(pixels.float()), tower((pixels.float() / 255 - mean) / std), atol=1e-5)


# --- early and one-line refusals (items 7 and the multilingual towers) ----------------------------


def test_fp32_native_on_a_resnet_is_refused_before_any_export(tmp_path, monkeypatch):
    import clipfold.compile.pipeline as pipeline

    def no_head(*args, **kwargs):
        raise AssertionError("the refusal must come before the head is built and the tower exported")

    monkeypatch.setattr(pipeline, "resolve_head", no_head)
    config = CompileConfig(labels=("cat", "dog"), out=tmp_path / "rn.bundle", model="RN50", templates="label",
                           precisions=("fp32-native",))
    with pytest.raises(ExportError, match="VisionTransformer only; this tower is ModifiedResNet"):
        compile_bundle(config)
    assert not (tmp_path / "rn.bundle").exists()


@pytest.mark.parametrize("name", ["xlm-roberta-base-ViT-B-32", "nllb-clip-base", "mt5-base-ViT-B-32"])
def test_multilingual_towers_are_refused_in_one_line(name):
    with pytest.raises(ModelError, match="Hugging Face model .* downloads nothing") as info:
        load_model(name)
    assert "\n" not in str(info.value)


# --- one model of every family, compiled (slow) ---------------------------------------------------

TOKENIZER = "unigram"  # the test's own Hugging Face tokenizer folder (families_helpers)
FAMILIES = [  # (family, model, tokenizer, refusal expected (a regex) or None)
    ("ViT", "ViT-B-32", None, None),
    ("ResNet", "RN50", None, None),
    ("ConvNeXt", "convnext_tiny", None, None),
    ("EVA", "EVA02-B-16", None, None),
    ("SigLIP", "ViT-B-16-SigLIP", TOKENIZER, None),
    ("SigLIP without a tokenizer", "ViT-B-16-SigLIP", None, r"Hugging Face tokenizer .*pass\s+--tokenizer"),
    ("SigLIP2", "ViT-B-32-SigLIP2-256", TOKENIZER, None),
    ("MobileCLIP", "MobileCLIP-S1", None, None),
    ("MobileCLIP2", "MobileCLIP2-S0", None, None),
    ("CoCa", "coca_ViT-B-32", None, None),
    ("ViTamin", "ViTamin-S", None, None),
    ("PE-Core", "PE-Core-T-16-384", None, None),
    ("multilingual (XLM-RoBERTa)", "xlm-roberta-base-ViT-B-32", None, r"Hugging Face model 'xlm-roberta-base'"),
]


@pytest.mark.slow
@pytest.mark.parametrize("family, model, tokenizer, refusal", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_every_family_compiles_or_is_refused_in_one_line(tmp_path, family, model, tokenizer, refusal):
    if tokenizer == TOKENIZER:
        tokenizer = make_unigram_tokenizer(tmp_path / "tokenizer")
    config = CompileConfig(labels=("cat", "dog", "car"), out=tmp_path / "b.bundle", model=model, templates="label",
                           text=True, tokenizer=tokenizer)
    try:
        result = compile_bundle(config)
    except ClipfoldError as exc:
        assert "\n" not in str(exc), f"{family}: a refusal must be one line: {exc}"
        assert refusal is not None, f"{family} ({model}) was refused: {exc}"
        assert __import__("re").search(refusal, str(exc)), str(exc)
        return
    assert refusal is None, f"{family} ({model}) compiled but should have been refused"
    manifest = result.manifest
    assert manifest.variants[0].parity.embedding_cosine_min >= 0.99999
    assert manifest.variants[0].parity.top1_agreement == 1.0
    assert manifest.text is not None and manifest.text.parity.embedding_cosine_min >= 0.99999
    if tokenizer is not None:
        assert manifest.text.tokenizer_kind == "hf" and manifest.head.activation == "sigmoid"
        assert manifest.head.logit_bias is not None
