"""Stage 2: the zero-shot head, built once at compile time so the text tower never runs at serving.

The head is the prompt ensemble of CLIP's zero-shot evaluation: embed every template filled with
the class name, L2-normalize each embedding, average per class, renormalize. Logits are
``exp(logit_scale) * f @ W.T`` (+ ``logit_bias`` for SigLIP-style models, scored with sigmoid).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from clipfold.compile import tiny
from clipfold.compile.heads.ir import Head, Linear
from clipfold.errors import ConfigError

TEMPLATE_PRESETS = ("imagenet80", "simple", "tiny", "label")


@dataclass(frozen=True)
class ZeroShotHead:
    class_embeddings: torch.Tensor  # (C, D), unit rows
    logit_scale: float  # already exponentiated
    logit_bias: float | None
    activation: str  # "softmax" or "sigmoid"
    templates: tuple[str, ...]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The unfolded reference: scaled cosine similarity of unit features to class rows."""
        out = self.logit_scale * features @ self.class_embeddings.T
        return out + self.logit_bias if self.logit_bias is not None else out

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.logits(features)
        return logits.softmax(-1) if self.activation == "softmax" else logits.sigmoid()

    def to_head(self) -> Head:
        """The ensemble as one linear branch of the general head (scale folded into the weight)."""
        bias = None
        if self.logit_bias is not None:
            bias = torch.full((self.class_embeddings.shape[0],), self.logit_bias)
        return Head(linears=(Linear(self.logit_scale * self.class_embeddings, bias),),
                    activation=self.activation, method="zero-shot")


def resolve_templates(spec: str | Sequence[str] | None, model_name: str) -> tuple[str, ...]:
    """A preset name, a file with one ``{}`` template per line, or explicit templates.

    The default is the tiny model's own ensemble for the tiny model, and the 80 ImageNet
    templates of CLIP's paper for every other model.
    """
    if spec is None:
        spec = "tiny" if model_name == tiny.MODEL_NAME else "imagenet80"
    if isinstance(spec, str):
        if spec == "imagenet80":
            from open_clip import OPENAI_IMAGENET_TEMPLATES as presets
        elif spec == "simple":
            from open_clip import SIMPLE_IMAGENET_TEMPLATES as presets
        elif spec == "tiny":
            return tuple(tiny.TEMPLATES)
        elif spec == "label":
            return ("{}",)
        elif Path(spec).is_file():
            lines = Path(spec).read_text(encoding="utf-8").splitlines()
            return _check_templates([ln.strip() for ln in lines if ln.strip()], source=spec)
        else:
            raise ConfigError(
                f"templates {spec!r} is neither a preset ({', '.join(TEMPLATE_PRESETS)}) nor a file")
        # open_clip keeps its presets as lambdas; calling them with "{}" recovers the template.
        return tuple(t("{}") for t in presets)
    return _check_templates(list(spec), source="the given templates")


def _check_templates(templates: list[str], source: str) -> tuple[str, ...]:
    if not templates:
        raise ConfigError(f"{source} holds no templates")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ConfigError(f"templates in {source} must contain exactly one '{{}}'; these do not: {bad[:3]}")
    return tuple(templates)


@torch.no_grad()
def build_zero_shot_head(model, tokenizer, labels: Sequence[str], templates: Sequence[str],
                         batch_size: int = 256, progress: Callable[[str], None] | None = None) -> ZeroShotHead:
    prompts = [t.format(label) for label in labels for t in templates]
    per_prompt = encode_prompts(model, tokenizer, prompts, batch_size, progress)
    per_prompt = per_prompt.reshape(len(labels), len(templates), -1)
    class_embeddings = F.normalize(per_prompt.mean(dim=1), dim=-1)

    bias = getattr(model, "logit_bias", None)
    return ZeroShotHead(
        class_embeddings=class_embeddings.contiguous(),
        logit_scale=float(model.logit_scale.exp().item()),
        logit_bias=float(bias.item()) if bias is not None else None,
        activation="sigmoid" if bias is not None else "softmax",
        templates=tuple(templates),
    )


# --- the text tower over many prompts ---------------------------------------------------------
# open_clip pads every prompt to the context length (77) and runs all of it; a prompt ensemble's
# prompts end around token 10-20. In a causal text tower that pools one token (CLIP: the
# end-of-text token), no token after it can reach it through the mask, so each batch is cut right
# after its longest prompt's end-of-text token without changing the result, and prompts are sorted
# by that length first so each batch is cut as short as its own prompts allow. Other towers
# (non-causal, or pooling over all tokens) run at full length.


@dataclass(frozen=True)
class CausalText:
    """The parts of an open_clip text transformer that is causal and pools one token: on the model
    itself for ``CLIP``, in ``model.text`` (a ``TextTransformer``) for ``CustomTextCLIP`` (EVA, ...)."""

    token_embedding: torch.nn.Module
    positional_embedding: torch.Tensor
    transformer: torch.nn.Module
    attn_mask: torch.Tensor
    ln_final: torch.nn.Module
    text_projection: object
    pool_type: str
    eos_id: int | None


def causal_text(model) -> CausalText | None:
    """The tower's parts when it is a causal open_clip text transformer pooling the end-of-text token
    (``argmax``: the end-of-text id is the largest, or ``eos``), decided from the tower, not the
    model class; None for any other tower (no causal mask, a class token appended, padding masks,
    Hugging Face encoders)."""
    from open_clip.model import CLIP
    from open_clip.transformer import TextTransformer

    if isinstance(model, CLIP):
        parts = CausalText(model.token_embedding, model.positional_embedding, model.transformer, model.attn_mask,
                           model.ln_final, model.text_projection, model.text_pool_type,
                           getattr(model, "text_eos_id", None))
    elif isinstance(getattr(model, "text", None), TextTransformer):
        text = model.text
        if text.cls_emb is not None or getattr(text, "use_pad_mask", False):
            return None
        parts = CausalText(text.token_embedding, text.positional_embedding, text.transformer, text.attn_mask,
                           text.ln_final, text.text_projection, text.pool_type, getattr(text, "eos_id", None))
    else:
        return None
    if parts.attn_mask is None or parts.pool_type not in ("argmax", "eos"):
        return None
    if parts.pool_type == "eos" and parts.eos_id is None:
        return None
    return parts


def pooled_positions(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """The token each prompt's embedding is read from, when ``model``'s text tower is causal and
    pools one token (:func:`causal_text`); else None."""
    parts = causal_text(model)
    if parts is None:
        return None
    if parts.pool_type == "argmax":
        return tokens.argmax(dim=-1)
    return (tokens == parts.eos_id).int().argmax(dim=-1)


def _encode_cut(model, tokens: torch.Tensor, length: int) -> torch.Tensor:
    """open_clip's ``encode_text`` on the first ``length`` tokens (positions and causal mask cut
    alike): ``CLIP.encode_text`` and ``TextTransformer.forward`` without a class token compute the same."""
    from open_clip.transformer import text_global_pool

    parts = causal_text(model)
    tokens = tokens[:, :length]
    cast = parts.transformer.get_cast_dtype()
    x = parts.token_embedding(tokens).to(cast) + parts.positional_embedding[:length].to(cast)
    x = parts.transformer(x, attn_mask=parts.attn_mask[:length, :length])
    x = parts.ln_final(x)
    x = text_global_pool(x, tokens, parts.pool_type, eos_token_id=parts.eos_id)
    projection = parts.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
    return x


@torch.no_grad()
def encode_prompts(model, tokenizer, prompts: Sequence[str], batch_size: int = 256,
                   progress: Callable[[str], None] | None = None) -> torch.Tensor:
    """Unit text embeddings (N, D) of ``prompts``, as ``F.normalize(model.encode_text(tokenizer(p)))``."""
    tokens = tokenizer(list(prompts))
    positions = pooled_positions(model, tokens)
    order = torch.argsort(positions, stable=True) if positions is not None else torch.arange(len(tokens))
    parts, step, reported = [], max(1, len(order) // 10), 0
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        if positions is not None:
            features = _encode_cut(model, tokens[index], int(positions[index].max()) + 1)
        else:
            features = model.encode_text(tokens[index])
        parts.append(F.normalize(features.float(), dim=-1))
        done = start + len(index)
        if progress is not None and len(order) > batch_size and (done - reported >= step or done == len(order)):
            progress(f"  text tower: {done:,}/{len(order):,} prompts")
            reported = done
    if not parts:
        return torch.empty(0, 0)
    embeddings = torch.cat(parts)
    out = torch.empty_like(embeddings)
    out[order] = embeddings  # back to the prompts' order
    return out
