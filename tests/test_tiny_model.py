"""The embedded tiny model: trained deterministically, accurate far above chance through the engine."""

from __future__ import annotations

import json

import torch

from clipfold.compile import tiny
from clipfold.compile.tiny import data, train
from clipfold.runtime import Engine
from clipfold.runtime.bundle.files import sha256_file


def _recorded() -> dict:
    return json.loads(train.RESULTS.read_text())


def test_recorded_accuracy_belongs_to_the_committed_checkpoint():
    record = _recorded()
    assert record["checkpoint_sha256"] == sha256_file(tiny.checkpoint_path())
    zs = record["zero_shot"]
    assert zs["classes"] == len(data.class_names()) == 30
    # Far above chance (1/30). The model knows colour almost perfectly and shape only partly,
    # hence the top-5 bar (the 5 shapes of the right colour).
    assert zs["top1"] >= 5 * zs["chance"] and zs["top5"] >= 0.9, zs


def test_engine_zero_shot_accuracy_on_held_out_images(tiny_bundle):
    """Through the whole runtime path (PNG bytes -> decode -> preprocess -> ONNX graph)."""
    import io

    engine = Engine.open(tiny_bundle.path)
    samples = data.generate(300, seed=train.HELD_OUT_SEED + 1)
    encoded = []
    for s in samples:
        buf = io.BytesIO()
        s.image.save(buf, format="PNG")
        encoded.append(buf.getvalue())
    preds = engine.classify(encoded, k=5)
    top1 = sum(p[0].label == s.label for p, s in zip(preds, samples)) / len(samples)
    top5 = sum(s.label in [x.label for x in p] for p, s in zip(preds, samples)) / len(samples)
    chance = 1 / len(data.class_names())
    assert top1 >= 5 * chance and top5 >= 0.9, (top1, top5)
    # The engine agrees with the eager figure recorded at training time (different images: 10 points).
    assert abs(top1 - _recorded()["zero_shot"]["top1"]) <= 0.10, top1


def test_training_is_deterministic():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [train.train(steps=2, batch=8, lr=1e-3, seed=7, progress=lambda _: None)[0] for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    a, b = (m.state_dict() for m in runs)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # And it actually trained: the weights moved from the seeded initialisation.
    torch.manual_seed(7)
    import open_clip

    init = open_clip.create_model(tiny.MODEL_NAME).state_dict()
    assert not torch.equal(init["visual.conv1.weight"], a["visual.conv1.weight"])
