"""The text tower as its own graph in the bundle, with its tokenizer as data (compile --text).

The graph maps token ids (batch, tokens) to the unit text embedding. For a causal tower that
pools the end-of-text token (CLIP, EVA) both dimensions are dynamic: the runtime cuts each batch
right after its longest prompt's end token (see :mod:`clipfold.compile.heads.zero_shot`), so short queries cost a few tokens,
not the full context. Any other open_clip text tower (SigLIP's and MobileCLIP's non-causal ones,
CoCa's with its appended class token) runs ``encode_text`` over the full context. The tokenizer is
a ``tokenizers`` file: CLIP's built from open_clip's own BPE vocabulary and merges, split at run
time by open_clip's own pattern (:data:`clipfold.runtime.text_encoder.CLIP_SPLIT`); a Hugging Face one
(SigLIP) copied from the local file the user passed, with truncation and padding to the context
set in it. Both the graph and the tokenizer are checked against open_clip (``tokenizer(...)`` then
``encode_text``) on prompts and odd strings before the bundle exists.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clipfold.compile.heads.zero_shot import _encode_cut, causal_text
from clipfold.compile.precision.gate import embedding_failures, row_cosine
from clipfold.compile.stages.tokenizer import LocalHFTokenizer
from clipfold.errors import ConfigError, ExportError, GateError, VerificationError
from clipfold.runtime.bundle.agreement import TextGate, TextParity
from clipfold.runtime.bundle.layout import TEXT_FILE, TOKENIZER_FILE, text_variant_file
from clipfold.runtime.bundle.schema import TextTower, TextVariant

# Strings the verification adds to the label prompts: empty, unicode, emoji, HTML, over-long.
# The text gate's held-out prompts: each label in phrasings unlike the verification prompts.
GATE_PHRASES = ("{}", "a {}.", "there is a {} in the picture", "a close-up of the {}, seen from above",
                "my favourite {}!")
GATE_LABELS = 200  # labels phrased for the gate (the first ones); every label is a candidate answer
ODD_TEXTS = ("", "Émoji 🐈‍⬛ and ünïcödé", "don't STOP it's", "&amp; html &lt;b&gt;", "mojibake Ã©", "日本語",
             "tab\there\nnewline", "a.b,c;d:e!f?g 12.5%", "word " * 100, "a <start_of_text> b <END_OF_TEXT>",
             "&lt;end_of_text&gt; it'ſ IT'S", "\u0345 \u1c89 ߺ")


class TextGraph(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.causal = causal_text(model) is not None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.causal:
            return F.normalize(_encode_cut(self.model, tokens, tokens.shape[1]), dim=-1)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


def context_length(model) -> int | None:
    """The token count the text tower reads (its positional table, less CoCa's appended class token)."""
    text = getattr(model, "text", None)
    own = getattr(model, "context_length", None) if text is None else getattr(text, "context_length", None)
    return int(own) if own is not None else None


def unsupported(loaded) -> str | None:
    """Why this model's text tower cannot be carried (None when it can)."""
    from open_clip.tokenizer import SimpleTokenizer
    from open_clip.transformer import TextTransformer

    from clipfold.compile.stages.tokenizer import MissingTokenizer

    tok, model = loaded.tokenizer, loaded.model
    if isinstance(tok, MissingTokenizer):
        return tok.message
    if isinstance(tok, SimpleTokenizer):
        if getattr(tok, "reduction_fn", None) is not None or tok.clean_fn.__name__ != "_clean_lower":
            return "its tokenizer uses a text cleanup other than CLIP's lower-casing"
    elif not isinstance(tok, LocalHFTokenizer):
        return f"its tokenizer is {type(tok).__name__}; CLIP's BPE and local Hugging Face tokenizer files are carried"
    from open_clip.model import CLIP

    if not isinstance(model, CLIP) and not isinstance(getattr(model, "text", None), TextTransformer):
        return f"its text tower is {type(getattr(model, 'text', None)).__name__}, not an open_clip text transformer"
    context, probe = context_length(model), tok(["a"])
    if context is None or probe.shape[1] != context:
        return f"its tokenizer's context ({probe.shape[1]}) differs from the tower's ({context})"
    return None


def write_tokenizer(tokenizer, path: Path) -> None:
    """open_clip's SimpleTokenizer as a ``tokenizers`` file (same vocabulary ids and merges, the
    special tokens as added tokens); the runtime splits text with open_clip's pattern first."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = dict(tokenizer.encoder)
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    bpe = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="")
    out = Tokenizer(bpe)
    out.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    specials = [t for t in vocab if vocab[t] in tokenizer.all_special_ids]
    out.add_special_tokens([AddedToken(t, normalized=False) for t in specials])
    out.save(str(path))


def export_text(loaded, stage: Path, prompts: Sequence[str], opset: int) -> TextTower:
    """Write the text graph and tokenizer into ``stage`` and verify them; the manifest entry."""
    reason = unsupported(loaded)
    if reason is not None:
        raise ConfigError(f"--text: {loaded.info.name}'s text tower cannot be carried: {reason}")
    model, tok = loaded.model, loaded.tokenizer
    context, graph = context_length(model), TextGraph(model).eval()
    example = tok(["a photo of a cat.", "a dog"])
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes = {0: batch}
    if graph.causal:
        example, shapes = example[:, :8], {0: batch, 1: torch.export.Dim("tokens", min=2, max=context)}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(graph, (example,), dynamo=True, verbose=False,
                                        opset_version=opset, input_names=["tokens"], output_names=["text_embedding"],
                                        dynamic_shapes={"tokens": shapes})
            program.save(str(stage / TEXT_FILE))
    except Exception as exc:
        from clipfold.compile.stages.export import one_line

        raise ExportError(f"ONNX export of the text tower failed: {one_line(exc)}") from exc
    if isinstance(tok, LocalHFTokenizer):
        tok.save(stage / TOKENIZER_FILE)
        tower = TextTower(file=TEXT_FILE, tokenizer=TOKENIZER_FILE, context_length=context, start_id=-1,
                          end_id=-1, cut_after_end=False, tokenizer_kind="hf", clean=tok.clean,
                          parity=TextParity(prompts=0, embedding_cosine_min=0.0, max_abs_diff=0.0))
    else:
        write_tokenizer(tok, stage / TOKENIZER_FILE)
        tower = TextTower(file=TEXT_FILE, tokenizer=TOKENIZER_FILE, context_length=context,
                          start_id=int(tok.sot_token_id), end_id=int(tok.eot_token_id), cut_after_end=graph.causal,
                          parity=TextParity(prompts=0, embedding_cosine_min=0.0, max_abs_diff=0.0))
    return _verify(loaded, stage, tower, list(prompts) + list(ODD_TEXTS))


def _verify(loaded, stage: Path, tower: TextTower, texts: list[str], min_cosine: float = 0.99999) -> TextTower:
    """The runtime's path (bundled tokenizer, cut batches, ONNX Runtime) against open_clip's."""
    from clipfold.runtime.text_encoder import TextEncoder

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


def build_text_variants(stage: Path, tower: TextTower, precisions: Sequence[str], labels: Sequence[str], quant,
                        gate_cfg, progress=None) -> TextTower:
    """Quantize the verified fp32 text graph into each precision and gate it against fp32.

    Gate, on held-out prompts (the first labels in :data:`GATE_PHRASES`): embedding cosine (min
    and mean) against the fp32 text graph, and top-1 agreement of the nearest label (all labels,
    embedded by the fp32 graph as ``a photo of a {label}.``), tie-aware like the image gate. The
    thresholds are the image gate's (``--gate-min-cosine``, ``--gate-min-top1``); a variant that
    misses raises :class:`GateError` and the bundle is not written.
    """
    import clipfold.compile.precision.quantize as quantize
    from clipfold.runtime.text_encoder import TextEncoder

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
