"""Zero-shot head building: open_clip's ``encode_text`` over every prompt padded to 77 tokens
(reference) against :func:`clipfold.compile.heads.zero_shot.encode_prompts` (prompts sorted by length, each
batch cut after its longest end-of-text token), for random-weight ViT-B-32 on ImageNet class
names x CLIP's 80 templates, in the same run.

Pair ``head_build`` (> 1 means clipfold is faster). The full 1,000 x 80 head would take the
reference over an hour here, so both sides encode the same CLASSES x 80 prompts; the time per
prompt is what the ratio compares. ``max_abs_diff`` records the largest embedding difference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

CLASSES, BATCH = 10, 256


@pytest.fixture(scope="module")
def tower():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    # Every 100th class name: the same spread of name lengths as the 1,000.
    prompts = [t(c) for c in IMAGENET_CLASSNAMES[::1000 // CLASSES] for t in OPENAI_IMAGENET_TEMPLATES]
    return model, tokenizer, prompts


@torch.no_grad()
def _open_clip(model, tokenizer, prompts):
    return torch.cat([F.normalize(model.encode_text(tokenizer(prompts[i:i + BATCH])).float(), dim=-1)
                      for i in range(0, len(prompts), BATCH)])


def test_open_clip_encode_text(benchmark, tower):
    benchmark.extra_info.update(pair="head_build", role="reference", prompts=len(tower[2]))
    benchmark.pedantic(_open_clip, args=tower, rounds=1, iterations=1)


def test_clipfold_encode_prompts(benchmark, tower):
    from clipfold.compile.heads.zero_shot import encode_prompts

    model, tokenizer, prompts = tower
    fast = encode_prompts(model, tokenizer, prompts, BATCH)
    sample = slice(0, len(prompts), 7)  # the reference on every 7th prompt, to bound the check's time
    diff = float((fast[sample] - _open_clip(model, tokenizer, prompts[sample])).abs().max())
    assert diff <= 1e-5
    benchmark.extra_info.update(pair="head_build", role="candidate", prompts=len(prompts), max_abs_diff=diff)
    benchmark.pedantic(encode_prompts, args=(model, tokenizer, prompts, BATCH), rounds=3, iterations=1)
