"""CLIP-LoRA import: merged weights equal the official unmerged LoRA branches, and bad files are refused."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipfold import errors
from clipfold.compile.adapters.base import ImportRequest
from clipfold.compile.adapters.lora import import_lora
from clipfold.compile.stages.load import LoadedModel
from clipfold.compile.tiny import data
from clipfold.runtime.preprocess import preprocess

from .fewshot_helpers import rel_diff

LABELS = ("red circle", "blue square", "green triangle", "yellow star")
TEMPLATES = ("a photo of a {}.", "a {}.")


class ReferenceLoraAttention(nn.Module):
    """PlainMultiheadAttentionLoRA at eval: separate q/k/v/o linears plus ``x A^T B^T * alpha/sqrt(r)``."""

    def __init__(self, mha: nn.MultiheadAttention, loras: dict, scaling: float):
        super().__init__()
        e = mha.embed_dim
        w, b = mha.in_proj_weight.detach().double(), mha.in_proj_bias.detach().double()
        self.heads, self.scaling, self.loras = mha.num_heads, scaling, loras
        self.lin = {"q_proj": (w[:e], b[:e]), "k_proj": (w[e:2 * e], b[e:2 * e]), "v_proj": (w[2 * e:], b[2 * e:]),
                    "proj": (mha.out_proj.weight.detach().double(), mha.out_proj.bias.detach().double())}

    def _linear(self, name, x):
        w, b = self.lin[name]
        out = x @ w.T + b
        if name in self.loras:
            a, bb = self.loras[name]
            out = out + (x @ a.double().T @ bb.double().T) * self.scaling
        return out

    def forward(self, q_x, k_x, v_x, need_weights=False, attn_mask=None):  # batch first (N, L, E)
        n, length, e = q_x.shape
        h, d = self.heads, e // self.heads
        q, k, v = (self._linear(p, x).reshape(n, length, h, d).transpose(1, 2)
                   for p, x in (("q_proj", q_x), ("k_proj", k_x), ("v_proj", v_x)))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        if attn_mask is not None:
            scores = scores + attn_mask.double()
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, length, e)
        return self._linear("proj", out), None


def _lora_file(path, model, encoder, params, r=2, alpha=1, position="all", seed=0, scale=0.3):
    """A file as save_lora writes it: text layers first, then vision, in block order."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    if encoder in ("text", "both"):
        layers += [blk.attn for blk in model.transformer.resblocks]
    if encoder in ("vision", "both"):
        layers += [blk.attn for blk in model.visual.transformer.resblocks]
    weights = {}
    for i, attn in enumerate(layers):
        e = attn.embed_dim
        entry = {}
        for p in params:
            key = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}[p]
            entry[key] = {"w_lora_A": scale * torch.randn(r, e, generator=g), "w_lora_B": scale * torch.randn(e, r, generator=g)}
        weights[f"layer_{i}"] = entry
    torch.save({"weights": weights, "metadata": {"r": r, "alpha": alpha, "encoder": encoder, "params": list(params),
                                                 "position": position}}, path)
    return weights, layers


def _reference_model(model, weights, layers_of, scaling):
    ref = copy.deepcopy(model).double().eval()
    for i, (tower, block) in enumerate(layers_of(ref)):
        block.attn = ReferenceLoraAttention(block.attn, {k: (v["w_lora_A"], v["w_lora_B"])
                                                         for k, v in weights[f"layer_{i}"].items()}, scaling)
    return ref


def _request(tiny, model, path, **options):
    loaded = LoadedModel(model, tiny.tokenizer, tiny.preprocess, tiny.info)
    return ImportRequest(checkpoint=path, loaded=loaded, labels=LABELS, templates=TEMPLATES, options=options)


def _pixels(spec, n=12):
    x = torch.from_numpy(preprocess([s.image for s in data.generate(n, seed=7)], spec)).double() / 255.0
    return (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)


def _ensemble(model, tokenizer):
    """The prompt ensemble, written out: unit prompt embeddings, class mean, renormalized."""
    rows = []
    for label in LABELS:
        emb = F.normalize(model.encode_text(tokenizer([t.format(label) for t in TEMPLATES])).double(), dim=-1)
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


@pytest.mark.parametrize("encoder, params", [("both", "qkvo"), ("vision", "qv"), ("text", "ko")])
def test_merged_model_equals_the_unmerged_lora_branches(tiny, tmp_path, encoder, params):
    model = copy.deepcopy(tiny.model)
    path = tmp_path / "lora_weights.pt"
    weights, _ = _lora_file(path, model, encoder, params, r=2, alpha=1)

    def layers_of(m):
        out = []
        if encoder in ("text", "both"):
            out += [("text", b) for b in m.transformer.resblocks]
        if encoder in ("vision", "both"):
            out += [("visual", b) for b in m.visual.transformer.resblocks]
        return out

    reference = _reference_model(tiny.model, weights, layers_of, scaling=1 / math.sqrt(2))
    imported = import_lora(_request(tiny, model, path))
    assert imported.head.method == "clip-lora" and imported.labels == LABELS
    assert imported.hyperparameters["scaling"] == pytest.approx(1 / math.sqrt(2))
    assert len(imported.hyperparameters["merged_layers"]) == len(layers_of(model))

    pixels = _pixels(tiny.preprocess)
    with torch.no_grad():
        ref_img = F.normalize(reference.encode_image(pixels), dim=-1)
        ours_img = F.normalize(model.encode_image(pixels.float()), dim=-1)
        plain_img = F.normalize(tiny.model.encode_image(pixels.float()), dim=-1)
        ref_logits = reference.logit_scale.exp() * ref_img @ _ensemble(reference, tiny.tokenizer).T
        ours_logits = imported.head.logits(ours_img)
    assert rel_diff(ours_img, ref_img) <= 1e-5, rel_diff(ours_img, ref_img)
    assert rel_diff(ours_logits, ref_logits) <= 1e-5, rel_diff(ours_logits, ref_logits)
    assert torch.equal(ours_logits.topk(2).indices, ref_logits.topk(2).indices)
    # The update is not a no-op: the tower that got LoRA changed.
    if encoder != "text":
        assert (ours_img - plain_img).abs().max() > 1e-2
    else:
        assert torch.allclose(ours_img, plain_img)
        plain_text = tiny.model.encode_text(tiny.tokenizer(["a red circle."]))
        assert (model.encode_text(tiny.tokenizer(["a red circle."])) - plain_text).abs().max() > 1e-2


def test_position_restricts_blocks_and_the_fixture_is_untouched(tiny, tmp_path):
    """'top1' is text block 11 only: the tiny 3-block tower has none, so the file must hold no layers."""
    model = copy.deepcopy(tiny.model)
    path = tmp_path / "top1.pt"
    torch.save({"weights": {}, "metadata": {"r": 2, "alpha": 1, "encoder": "text", "params": ["q"], "position": "top1"}}, path)
    before = model.transformer.resblocks[0].attn.in_proj_weight.clone()
    imported = import_lora(_request(tiny, model, path))
    assert imported.hyperparameters["merged_layers"] == []
    assert torch.equal(model.transformer.resblocks[0].attn.in_proj_weight, before)


def _bad(tmp_path, tiny, mutate):
    model = copy.deepcopy(tiny.model)
    path = tmp_path / "bad.pt"
    weights, _ = _lora_file(path, model, "both", "qv")
    obj = torch.load(path, weights_only=True)
    mutate(obj)
    torch.save(obj, path)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    return model, path, snapshot


@pytest.mark.parametrize("mutate, pattern", [
    (lambda o: o.pop("metadata"), r"missing keys \['metadata'\]; expected \['weights', 'metadata'\]; found \['weights'\]"),
    (lambda o: o["weights"]["layer_4"]["q_proj"].update(w_lora_A=torch.randn(2, 64)),
     r"layer_4.q_proj \(visual.transformer.resblocks.1.attn\) has A \(2, 64\).*expected A \(2, 96\)"),
    (lambda o: o["weights"]["layer_0"]["v_proj"]["w_lora_B"].fill_(float("nan")), r"layer_0.v_proj .*NaN"),
    (lambda o: o["weights"].pop("layer_5"), r"selects 6 attention layers"),
    (lambda o: o["weights"]["layer_2"].pop("v_proj"), r"layer_2 .* has no 'v_proj' entry"),
    (lambda o: o["metadata"].update(encoder="audio"), r"encoder='audio'"),
])
def test_bad_files_are_refused_before_any_weight_changes(tiny, tmp_path, mutate, pattern):
    model, path, snapshot = _bad(tmp_path, tiny, mutate)
    with pytest.raises(errors.CheckpointError, match=pattern):
        import_lora(_request(tiny, model, path))
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def test_unknown_layout_and_missing_labels(tiny, tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, path)
    with pytest.raises(errors.CheckpointError, match=r"found \['state_dict'\]"):
        import_lora(_request(tiny, copy.deepcopy(tiny.model), path))
    request = _request(tiny, copy.deepcopy(tiny.model), path)
    with pytest.raises(errors.ConfigError, match="--labels"):
        import_lora(ImportRequest(path, request.loaded, None, TEMPLATES))
    _lora_file(path, tiny.model, "vision", "q")
    with pytest.raises(errors.ConfigError, match="backbone"):
        import_lora(_request(tiny, copy.deepcopy(tiny.model), path, backbone="RN50"))


def test_vision_table_follows_the_backbone(tiny, tmp_path):
    """ViT-B/32 has no 'top3' vision entry in the official table: refused with the known positions."""
    path = tmp_path / "b32.pt"
    torch.save({"weights": {}, "metadata": {"r": 2, "alpha": 1, "encoder": "vision", "params": ["q"], "position": "top3"}}, path)
    with pytest.raises(errors.CheckpointError, match=r"no vision blocks for ViT-B/32"):
        import_lora(_request(tiny, copy.deepcopy(tiny.model), path, backbone="ViT-B/32"))


def test_compile_defaults_to_the_single_template_evaluate_lora_uses(tiny, tmp_path):
    """lora.py evaluate_lora encodes ``dataset.template[0]`` per class ('a photo of a {}.' for Caltech101,
    SUN397, StanfordCars), not an ensemble: without --templates the bundle's head does the same."""
    from clipfold.compile.config import CompileConfig
    from clipfold.compile.pipeline import compile_bundle

    from .engine_parity import assert_engine_matches

    path = tmp_path / "lora_weights.pt"
    weights, _ = _lora_file(path, copy.deepcopy(tiny.model), "text", "qv", r=2, alpha=1)
    reference = _reference_model(tiny.model, weights, lambda m: [("text", b) for b in m.transformer.resblocks],
                                 scaling=1 / math.sqrt(2))
    result = compile_bundle(CompileConfig(labels=LABELS, adapter=path, method="clip-lora", out=tmp_path / "b", top_k=2))
    assert tuple(result.manifest.head.templates) == ("a photo of a {}.",)

    def official(image):
        with torch.no_grad():
            texts = tiny.tokenizer(["a photo of a {}.".format(c.replace("_", " ")) for c in LABELS])
            text = F.normalize(reference.encode_text(texts), dim=-1)
            image_features = F.normalize(reference.encode_image(image.double()), dim=-1)
            return (reference.logit_scale.exp() * image_features @ text.T).float()

    assert_engine_matches(result.path, tiny.preprocess, official)
