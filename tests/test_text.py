"""The text tower in the bundle: CLIP's tokenizer as data (open_clip's ids), the text graph
(open_clip's embeddings), text queries through the torch-free runtime."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipfold import errors
from clipfold.compile.config import CompileConfig
from clipfold.compile.pipeline import compile_bundle
from clipfold.runtime import Engine
from clipfold.runtime.text_encoder import ClipTokenizer

from .test_layout import BLOCK_TORCH


@pytest.fixture(scope="module")
def text_bundle(tiny_text_bundle):
    return tiny_text_bundle  # compiled once per session (conftest.py); only read here


def _varied_strings(n: int, seed: int = 0) -> list[str]:
    """Unicode letters and marks, CJK, emoji with joiners, punctuation, digits, HTML entities,
    whitespace runs, and strings far past the context length."""
    rng = random.Random(seed)
    alphabet = [chr(c) for c in [*range(32, 127), *range(0xA0, 0x250), *range(0x300, 0x310), *range(0x3040, 0x30FF),
                                 0x1F600, 0x1F408, 0x200D, 0x2B1B, 0xFE0F, 0x4E2D, 0x6587, 0x9, 0xA]]
    words = ["&amp;", "&lt;b&gt;", "don't", "I'M", "Ã©", "12.5%", "e-mail", "naïve"]
    out = ["", " ", "a photo of a cat.", "word " * 120]
    for _ in range(n):
        if rng.random() < 0.2:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))))
        else:
            out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90))))
    return out


def test_bundled_tokenizer_gives_open_clips_ids_on_10k_strings(text_bundle, tiny):
    tower = text_bundle.manifest.text
    tokenizer = ClipTokenizer(text_bundle.path / tower.tokenizer, tower.context_length, tower.start_id, tower.end_id)
    texts = _varied_strings(10_000)
    ids, truncated = tokenizer(texts)
    expected = tiny.tokenizer(texts).numpy()
    differ = [t for t, a, b in zip(texts, ids, expected) if not np.array_equal(a, b)]
    assert not differ, f"{len(differ)} strings differ, e.g. {differ[:3]!r}"
    assert truncated[3] and not truncated[2]  # "word " * 120 was cut at the context, "a photo..." was not


def test_text_queries_match_open_clip_and_are_cached(text_bundle, tiny):
    m = text_bundle.manifest
    assert m.text.parity.embedding_cosine_min >= 0.99999 and m.text.parity.prompts > 50
    engine = Engine.open(text_bundle.path)
    queries = ["a red circle", "a photo of a blue star on a green background", "word " * 120, "Émoji 🐈"]
    out = engine.embed_text(queries)
    with torch.no_grad():
        ref = F.normalize(tiny.model.encode_text(tiny.tokenizer(queries)).float(), dim=-1).numpy()
    assert out.embeddings.shape == ref.shape and float(np.abs(out.embeddings - ref).max()) <= 1e-5
    assert out.truncated.tolist() == [False, False, True, False]
    runs = []
    original = engine._text.graph.run
    engine._text.graph.run = lambda feeds: runs.append(feeds["tokens"].shape) or original(feeds)
    again = engine.embed_text(["A  red circle ", "a yellow ring"])  # the first is cached (same cleaned text)
    assert runs == [(1, runs[0][1])] and runs[0][1] <= 6  # one new query, cut after its end token
    assert np.allclose(again.embeddings[0], out.embeddings[0])
    # An image of a red circle is nearer the text "a red circle" than the text "a blue star".
    from clipfold.compile.tiny import data

    sample = next(s for s in data.generate(50, seed=5) if s.color == "red" and s.shape == "circle")
    image = engine.embed([sample.image])[0]
    texts = engine.embed_text(["a red circle", "a blue star"]).embeddings
    assert image @ texts[0] > image @ texts[1]


def test_bad_text_input(text_bundle, tiny_bundle):
    engine = Engine.open(text_bundle.path)
    with pytest.raises(errors.ConfigError, match="empty"):
        engine.embed_text(["a cat", "   "])
    with pytest.raises(errors.ConfigError, match="list of strings"):
        engine.embed_text("a cat")
    with pytest.raises(errors.BundleError, match="no text tower; compile it with --text"):
        Engine.open(tiny_bundle.path).embed_text(["a cat"])


def test_text_queries_run_with_torch_blocked(text_bundle):
    code = BLOCK_TORCH + textwrap.dedent(f"""
        import json
        from clipfold.runtime import Engine
        out = Engine.open({str(text_bundle.path)!r}).embed_text(["a red circle", "a green star"])
        assert 'torch' not in sys.modules
        print(json.dumps(out.embeddings.tolist()))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    same = Engine.open(text_bundle.path).embed_text(["a red circle", "a green star"]).embeddings
    assert np.allclose(np.array(json.loads(proc.stdout)), same, atol=1e-6)


def _write_images(folder, samples):
    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(samples):
        s.image.save(folder / f"{i:03d}-{s.color}-{s.shape}.png")


def test_index_search_resume_and_refusals(text_bundle, tiny_kernel_head_bundle, tmp_path, capsys):
    from clipfold.cli import main
    from clipfold.compile.tiny import data
    from clipfold.runtime.retrieval.index import Index, build_index

    images = tmp_path / "images"
    _write_images(images, data.generate(40, seed=21))
    engine = Engine.open(text_bundle.path)
    messages = []
    index = build_index(engine, images, tmp_path / "idx", storage="fp16", progress=messages.append)
    assert len(index) == 40 and messages[-1].startswith("indexed 40/40")
    # A text query finds images of the asked colour and shape first.
    assert any("-green-triangle" in p.name for p in images.iterdir())
    result = index.search(engine, text="green triangle", k=3)
    assert "-green-triangle" in result.hits[0].path and all("-green-" in h.path for h in result.hits)
    scores = [h.score for h in result.hits]
    assert scores == sorted(scores, reverse=True) and not result.query_truncated
    assert index.search(engine, text="word " * 120, k=1).query_truncated
    # Resume: nothing new is embedded; a changed file is re-embedded and its old row is skipped.
    messages.clear()
    build_index(engine, images, tmp_path / "idx", storage="fp16", progress=messages.append)
    assert messages == ["index %s is up to date (40 images)" % (tmp_path / "idx")]
    first = sorted(images.iterdir())[0]
    data.generate(1, seed=99)[0].image.save(first)
    index = build_index(engine, images, tmp_path / "idx", storage="fp16")
    assert len(index) == 40 and len(index.gallery) == 41 and len(index.meta["shards"]) == 2
    by_image = index.search(engine, image=first, k=40).hits
    assert by_image[0].path == first.name and len({h.path for h in by_image}) == 40  # no stale duplicate
    # CLI round trip.
    assert main(["search", str(tmp_path / "idx"), "--text", "green triangle", "--k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert "-green-triangle" in hits[0]["path"] and len(hits) == 2
    # Another bundle's embeddings are refused, naming both (the same model, another graph).
    with pytest.raises(errors.BundleError, match="was built with clipfold-tiny .*not with this bundle"):
        index.search(Engine.open(tiny_kernel_head_bundle.path), image=first)
    # A corrupt shard is named.
    shard = tmp_path / "idx" / "shards" / "000000" / "0000.rows.npy"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(errors.ChecksumError, match="000000/0000.rows.npy is missing or corrupt"):
        Index.open(tmp_path / "idx")


def test_a_crash_loses_only_the_batch_in_flight(text_bundle, tmp_path, monkeypatch):
    import clipfold.runtime.retrieval.index as index_module
    from clipfold.compile.tiny import data

    images = tmp_path / "images"
    _write_images(images, data.generate(25, seed=3))
    engine = Engine.open(text_bundle.path)
    monkeypatch.setattr(index_module, "BATCH_FILES", 10)
    real_embed, calls = engine.embed, []

    def crash_on_the_third_batch(paths):
        calls.append(len(paths))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies mid-batch
        return real_embed(paths)

    monkeypatch.setattr(engine, "embed", crash_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        index_module.build_index(engine, images, tmp_path / "idx")
    assert len(index_module.Index.open(tmp_path / "idx")) == 20  # two committed batches survive
    monkeypatch.setattr(engine, "embed", real_embed)
    calls.clear()
    resumed = index_module.build_index(engine, images, tmp_path / "idx")
    assert len(resumed) == 25 and len(resumed.gallery) == 25  # only the last 5 were embedded again


def test_quantized_text_graphs_are_gated(tiny_labels, tmp_path):
    from clipfold.compile.precision.config import GateConfig
    from clipfold.compile.stages.optimize import op_counts

    # Both weight-only text variants in one compile, gated with no limits: the figures are recorded and
    # held to the default limits below (int8), or used to set limits this machine must miss (int4).
    loose = GateConfig(min_cosine=0.0, min_top1_agreement=0.0)
    result = compile_bundle(CompileConfig(labels=tiny_labels, out=tmp_path / "q.bundle", top_k=3, text=True,
                                          text_precisions=("int8-weight", "int4-weight"), gate=loose))
    tv, t4 = result.manifest.text.variants
    g = tv.gate
    assert (tv.name, t4.name) == ("int8-weight", "int4-weight") and tv.quantization["bits"] == 8
    assert g.prompts == t4.gate.prompts == 30 * 5 and t4.quantization["bits"] == 4
    assert g.embedding_cosine_min >= GateConfig().min_cosine and g.top1_agreement >= GateConfig().min_top1_agreement
    for v in (tv, t4):  # really quantized, not a copy of fp32
        assert op_counts(result.path / v.file).get("MatMulNBits", 0) > 0, v.name
    texts = ["a photo of a red star.", "there is a yellow cross", "naïve 🐈"]
    fp32 = Engine.open(result.path).embed_text(texts).embeddings
    engine = Engine.open(result.path, text_variant="int8-weight")
    q = engine.embed_text(texts).embeddings
    assert engine._text.variant == "int8-weight" and not np.array_equal(q, fp32)
    assert (q * fp32).sum(axis=1).min() >= 0.99
    with pytest.raises(errors.BundleError, match=r"no text variant 'fp16'.*'fp32', 'int8-weight', 'int4-weight'"):
        Engine.open(result.path, text_variant="fp16")

    # A text variant that misses the gate is refused, naming the figures; nothing written. How far
    # int4 weights move the tiny tower's embeddings depends on the CPU's int8 kernels (accuracy level
    # 4; 98.0 % top-1 agreement, cosine min 0.9929 on an AVX2-only EPYC), so the limits come from this
    # machine's own figures: half the worst cosine error, and every top-1 pick.
    q4 = t4.gate
    assert q4.embedding_cosine_min < 1.0
    limit = 1.0 - (1.0 - q4.embedding_cosine_min) / 2
    with pytest.raises(errors.GateError, match=r"^text variant int4-weight misses the gate") as info:
        compile_bundle(CompileConfig(labels=tiny_labels, out=tmp_path / "q4.bundle", text=True,
                                     text_precisions=("int4-weight",),
                                     gate=GateConfig(min_cosine=limit, min_top1_agreement=1.0)))
    failures = info.value.failures
    assert failures[0].startswith("text int4-weight: min embedding cosine 0.") and failures[0].endswith(f" < {limit}")
    flipped = [f"text int4-weight: top-1 agreement {q4.top1_agreement:.2%} < 100.00%"] if q4.top1_agreement < 1 else []
    assert failures[1:] == flipped
    assert not (tmp_path / "q4.bundle").exists()
    with pytest.raises(errors.ConfigError, match="needs --text"):
        CompileConfig(labels=tiny_labels, out=tmp_path / "x", text_precisions=("int8-weight",))
    with pytest.raises(errors.ConfigError, match="unknown text precision 'int8-static'"):
        CompileConfig(labels=tiny_labels, out=tmp_path / "x", text=True, text_precisions=("int8-static",))


def test_text_search_finds_every_class_first(text_bundle, tmp_path):
    """The demo's retrieval on the tiny model: for each colour x shape among 120 generated photos,
    a text query's top hit is an image of that class (measured: 30 of 30 with the 6,000-step model)."""
    from clipfold.compile.tiny import data
    from clipfold.runtime.retrieval.index import build_index

    samples = data.generate(120, seed=5)
    _write_images(tmp_path / "photos", samples)
    engine = Engine.open(text_bundle.path)
    index = build_index(engine, tmp_path / "photos", tmp_path / "idx")
    present = sorted({s.label for s in samples})
    misses = []
    for label in present:
        top = index.search(engine, text=f"a photo of a {label}.", k=1).hits[0].path
        if not top.endswith(f"-{label.replace(' ', '-')}.png"):
            misses.append((label, top))
    assert len(present) == 30 and misses == []
