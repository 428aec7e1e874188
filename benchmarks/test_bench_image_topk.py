"""Image → top-k for random-weight ViT-B-32: clipfold's ONNX Runtime fp32 engine vs open_clip eager.

Both sides start from decoded PIL images and end at top-k labels, so preprocessing is counted on
both (torchvision on the eager side, Pillow + numpy in the runtime). Run with ``make bench``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipfold.compile.config import CompileConfig
from clipfold.compile.head import build_zero_shot_head
from clipfold.compile.load import load_model
from clipfold.compile.pipeline import compile_bundle
from clipfold.compile.tiny import data
from clipfold.runtime import Engine

LABELS = tuple(data.class_names())
MODEL = "ViT-B-32"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bench") / "vitb32.bundle"
    compile_bundle(CompileConfig(labels=LABELS, out=out, model=MODEL, templates="label", top_k=5))
    engine = Engine.open(out)
    torch.manual_seed(0)
    loaded = load_model(MODEL)
    head = build_zero_shot_head(loaded.model, loaded.tokenizer, LABELS, ("{}",))
    import open_clip

    _, _, transform = open_clip.create_model_and_transforms(MODEL)
    images = [s.image for s in data.generate(8, seed=3)]
    return engine, loaded.model, head, transform, images


def _eager_topk(model, head, transform, images, k=5):
    with torch.inference_mode():
        x = torch.stack([transform(im) for im in images])
        f = F.normalize(model.encode_image(x), dim=-1)
        return head.scores(f).topk(k, dim=-1)


@pytest.mark.parametrize("batch", [1, 8])
def test_eager(benchmark, setup, batch):
    engine, model, head, transform, images = setup
    benchmark.extra_info.update(pair=f"vitb32_image_to_top5_b{batch}", role="reference")
    benchmark.pedantic(_eager_topk, args=(model, head, transform, images[:batch]), rounds=15, warmup_rounds=2)


@pytest.mark.parametrize("batch", [1, 8])
def test_clipfold_onnxruntime_fp32(benchmark, setup, batch):
    engine, model, head, transform, images = setup
    benchmark.extra_info.update(pair=f"vitb32_image_to_top5_b{batch}", role="candidate")
    result = benchmark.pedantic(engine.classify, args=(images[:batch],), kwargs={"k": 5}, rounds=15, warmup_rounds=2)
    assert len(result) == batch
