"""Fast head building: prompts sorted by length, each batch cut after its longest end-of-text token,
must give open_clip's own ``encode_text`` embeddings."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from clipfold.compile.heads.zero_shot import build_zero_shot_head, encode_prompts, pooled_positions


def _prompts(classes: int, templates: int = 80) -> list[str]:
    return [t(c) for c in IMAGENET_CLASSNAMES[:classes] for t in OPENAI_IMAGENET_TEMPLATES[:templates]]


def _reference(model, tokenizer, prompts):
    with torch.no_grad():
        return F.normalize(model.encode_text(tokenizer(prompts)).float(), dim=-1)


def test_tiny_model_matches_encode_text(tiny):
    prompts = _prompts(12, 10) + ["", "a " * 100, "émoji 🐈 ünïcode"]  # empty, cut at the context, unicode
    positions = pooled_positions(tiny.model, tiny.tokenizer(prompts))
    assert positions is not None and int(positions.max()) == tiny.tokenizer(prompts).shape[1] - 1  # one full-length prompt
    messages = []
    fast = encode_prompts(tiny.model, tiny.tokenizer, prompts, batch_size=16, progress=messages.append)
    assert float((fast - _reference(tiny.model, tiny.tokenizer, prompts)).abs().max()) <= 1e-5
    assert messages and messages[-1].endswith(f"{len(prompts):,}/{len(prompts):,} prompts")


def test_random_vit_b32_text_tower_matches_encode_text():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    prompts = _prompts(3, 20)  # 60 prompts of 5-15 tokens
    fast = encode_prompts(model, tokenizer, prompts, batch_size=16)
    assert float((fast - _reference(model, tokenizer, prompts)).abs().max()) <= 1e-5


def test_head_is_the_normalized_mean_of_the_prompt_embeddings(tiny):
    labels, templates = ["red circle", "blue square", "green star"], ("a {}.", "a photo of a {}.", "{}")
    head = build_zero_shot_head(tiny.model, tiny.tokenizer, labels, templates, batch_size=4)
    ref = _reference(tiny.model, tiny.tokenizer, [t.format(c) for c in labels for t in templates])
    expected = F.normalize(ref.reshape(3, 3, -1).mean(1), dim=-1)
    assert torch.allclose(head.class_embeddings, expected, atol=1e-6)


def test_non_causal_towers_run_at_full_length():
    class Plain(torch.nn.Module):  # not an open_clip CLIP: nothing is known about its mask
        def encode_text(self, tokens):
            return tokens[:, :4].float() + tokens.sum(1, keepdim=True).float()  # reads every token

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    prompts = ["a cat", "a much longer prompt about a dog"]
    assert pooled_positions(Plain(), tokenizer(prompts)) is None
    fast = encode_prompts(Plain(), tokenizer, prompts, batch_size=1)
    assert torch.allclose(fast, _reference(Plain(), tokenizer, prompts))


@pytest.mark.parametrize("pool", ["first", "last"])
def test_towers_pooling_other_tokens_are_not_cut(tiny, pool, monkeypatch):
    monkeypatch.setattr(tiny.model, "text_pool_type", pool)
    assert pooled_positions(tiny.model, tiny.tokenizer(["a cat"])) is None
