"""The text tower as its own graph in the bundle, with CLIP's tokenizer as data (compile --text).

The graph maps token ids (batch, tokens) to the unit text embedding, with both dimensions
dynamic: for a causal tower that pools the end-of-text token (CLIP), the runtime cuts each batch
right after its longest prompt's end token (see :mod:`.head`), so short queries cost a few tokens,
not the full context. The tokenizer is written as a ``tokenizers`` file built from open_clip's own
BPE vocabulary and merges; both the graph and the tokenizer are checked against open_clip
(``tokenizer(...)`` then ``encode_text``) on prompts and odd strings before the bundle exists.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clipfold.errors import ConfigError, ExportError, GateError, VerificationError
from clipfold.runtime.manifest import TextGate, TextParity, TextTower, TextVariant

from .gate import embedding_failures, row_cosine
from .head import _encode_cut, pooled_positions

TEXT_FILE = "text.onnx"
TOKENIZER_FILE = "tokenizer.json"
# CLIP's pre-tokenizer split (open_clip's SimpleTokenizer pattern, matched on lower-cased text).
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Strings the verification adds to the label prompts: empty, unicode, emoji, HTML, over-long.
# The text gate's held-out prompts: each label in phrasings unlike the verification prompts.
GATE_PHRASES = ("{}", "a {}.", "there is a {} in the picture", "a close-up of the {}, seen from above",
                "my favourite {}!")
GATE_LABELS = 200  # labels phrased for the gate (the first ones); every label is a candidate answer
ODD_TEXTS = ("", "Émoji 🐈‍⬛ and ünïcödé", "don't STOP it's", "&amp; html &lt;b&gt;", "mojibake Ã©", "日本語",
             "tab\there\nnewline", "a.b,c;d:e!f?g 12.5%", "word " * 100)


class TextGraph(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(_encode_cut(self.model, tokens, tokens.shape[1]), dim=-1)


def unsupported(loaded) -> str | None:
    """Why this model's text tower cannot be carried yet (None when it can)."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = loaded.tokenizer
    if not isinstance(tok, SimpleTokenizer):
        return f"its tokenizer is {type(tok).__name__}; only CLIP's BPE tokenizer is carried so far"
    if getattr(tok, "reduction_fn", None) is not None or tok.clean_fn.__name__ != "_clean_lower":
        return "its tokenizer uses a text cleanup other than CLIP's lower-casing"
    probe = tok(["a"])
    if pooled_positions(loaded.model, probe) is None:
        return "its text tower is not a causal CLIP tower pooling the end-of-text token"
    if probe.shape[1] != loaded.model.attn_mask.shape[0]:
        return f"its tokenizer's context ({probe.shape[1]}) differs from the tower's ({loaded.model.attn_mask.shape[0]})"
    return None


def write_tokenizer(tokenizer, path: Path) -> None:
    """open_clip's SimpleTokenizer as a ``tokenizers`` file (same vocabulary ids and merges)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = dict(tokenizer.encoder)
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    bpe = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="")
    out = Tokenizer(bpe)
    out.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    out.save(str(path))


def export_text(loaded, stage: Path, prompts: Sequence[str], opset: int) -> TextTower:
    """Write the text graph and tokenizer into ``stage`` and verify them; the manifest entry."""
    reason = unsupported(loaded)
    if reason is not None:
        raise ConfigError(f"--text: {loaded.info.name}'s text tower cannot be carried: {reason}")
    model, tok = loaded.model, loaded.tokenizer
    context = int(model.attn_mask.shape[0])
    example = tok(["a photo of a cat.", "a dog"])[:, :8]
    batch, tokens = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("tokens", min=2, max=context)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(TextGraph(model).eval(), (example,), dynamo=True, verbose=False,
                                        opset_version=opset, input_names=["tokens"], output_names=["text_embedding"],
                                        dynamic_shapes={"tokens": {0: batch, 1: tokens}})
            program.save(str(stage / TEXT_FILE))
    except Exception as exc:
        raise ExportError(f"ONNX export of the text tower failed: {type(exc).__name__}: {exc}") from exc
    write_tokenizer(tok, stage / TOKENIZER_FILE)
    tower = TextTower(file=TEXT_FILE, tokenizer=TOKENIZER_FILE, context_length=context, start_id=int(tok.sot_token_id),
                      end_id=int(tok.eot_token_id), cut_after_end=True,
                      parity=TextParity(prompts=0, embedding_cosine_min=0.0, max_abs_diff=0.0))
    return _verify(loaded, stage, tower, list(prompts) + list(ODD_TEXTS))


def _verify(loaded, stage: Path, tower: TextTower, texts: list[str], min_cosine: float = 0.99999) -> TextTower:
    """The runtime's path (bundled tokenizer, cut batches, ONNX Runtime) against open_clip's."""
    from clipfold.runtime.text import TextEncoder

    ids_ref = loaded.tokenizer(texts).numpy()
    encoder = TextEncoder(stage, tower)
    ids, _ = encoder.tokenizer(texts)
    if not np.array_equal(ids, ids_ref):
        bad = [t for t, a, b in zip(texts, ids, ids_ref) if not np.array_equal(a, b)]
        raise VerificationError(f"the bundled tokenizer differs from open_clip's on {len(bad)} of {len(texts)} "
                                f"texts (first: {bad[0]!r})", [f"tokenizer: {len(bad)} texts differ"])
    words = [t for t in texts if t.strip()]
    got = np.concatenate([encoder.embed(words[i:i + 64]).embeddings for i in range(0, len(words), 64)])
    with torch.no_grad():
        ref = torch.cat([F.normalize(loaded.model.encode_text(loaded.tokenizer(words[i:i + 64])).float(), dim=-1)
                         for i in range(0, len(words), 64)]).numpy()
    cos, diff = row_cosine(got, ref), float(np.abs(got - ref).max())
    parity = TextParity(prompts=len(words), embedding_cosine_min=float(cos.min()), max_abs_diff=diff)
    if not parity.embedding_cosine_min >= min_cosine:
        raise VerificationError(f"the text graph does not match open_clip's encode_text: min cosine "
                                f"{parity.embedding_cosine_min:.7f} < {min_cosine} (max abs diff {diff:.3g})",
                                [f"text: min cosine {parity.embedding_cosine_min:.7f}"])
    return TextTower(**{**tower.__dict__, "parity": parity})


def text_variant_file(precision: str) -> str:
    return f"text.{precision}.onnx"


def build_text_variants(stage: Path, tower: TextTower, precisions: Sequence[str], labels: Sequence[str], quant,
                        gate_cfg, progress=None) -> TextTower:
    """Quantize the verified fp32 text graph into each precision and gate it against fp32.

    Gate, on held-out prompts (the first labels in :data:`GATE_PHRASES`): embedding cosine (min
    and mean) against the fp32 text graph, and top-1 agreement of the nearest label (all labels,
    embedded by the fp32 graph as ``a photo of a {label}.``), tie-aware like the image gate. The
    thresholds are the image gate's (``--gate-min-cosine``, ``--gate-min-top1``); a variant that
    misses raises :class:`GateError` and the bundle is not written.
    """
    from clipfold.runtime.text import TextEncoder

    from . import quantize

    if not precisions:
        return tower
    say = progress or (lambda message: None)
    prompts = [p.format(label) for label in labels[:GATE_LABELS] for p in GATE_PHRASES]
    reference = TextEncoder(stage, tower)
    ref = _embed_all(reference, prompts)
    bank = _embed_all(reference, [f"a photo of a {label}." for label in labels])
    ref_scores = ref @ bank.T
    ref_best = ref_scores.max(axis=1)
    variants = []
    for precision in precisions:
        file = text_variant_file(precision)
        src, dst = stage / tower.file, stage / file
        if precision == "int8-dynamic":
            scheme = quantize.int8_dynamic(src, dst, [], quant)
        else:
            scheme = quantize.weight_only(src, dst, [], quant, bits=8 if precision == "int8-weight" else 4)
        got = _embed_all(TextEncoder(stage, dataclasses.replace(tower, file=file)), prompts)
        cos = row_cosine(got, ref)
        picks = (got @ bank.T).argmax(axis=1)
        agreement = float(np.mean(ref_scores[np.arange(len(picks)), picks] >= ref_best - 1e-6))
        gate = TextGate(prompts=len(prompts), embedding_cosine_min=float(cos.min()),
                        embedding_cosine_mean=float(cos.mean()), top1_agreement=agreement,
                        thresholds={"min_cosine": gate_cfg.min_cosine, "min_top1_agreement": gate_cfg.min_top1_agreement})
        missed = embedding_failures(gate.embedding_cosine_min, agreement, gate_cfg)  # NaN fails too
        if missed:
            dst.unlink(missing_ok=True)
            raise GateError(f"text variant {precision} misses the gate against the fp32 text graph on {len(prompts)} "
                            f"held-out prompts: {'; '.join(missed)}; it is not written (drop it from --text-precision "
                            "or relax the gate)", [f"text {precision}: {m}" for m in missed])
        say(f"text {precision}: cosine min {gate.embedding_cosine_min:.5f}, top-1 agreement {agreement:.1%} "
            f"on {len(prompts)} prompts")
        variants.append(TextVariant(precision, file, precision, gate, scheme))
    return dataclasses.replace(tower, variants=tuple(variants))


def _embed_all(encoder, texts: list[str]) -> np.ndarray:
    return np.concatenate([encoder.embed(texts[i:i + 256]).embeddings for i in range(0, len(texts), 256)])
