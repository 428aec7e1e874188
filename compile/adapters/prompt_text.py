"""The open_clip text tower run on given token embeddings: the shared core of CoOp, CoCoOp and MaPLe.

Prompt learners replace some token embeddings of a tokenized prompt ("X X X X cat.") with learned
context vectors and run the rest of the text tower unchanged. The official ``TextEncoder``
(KaiyangZhou/CoOp ``trainers/coop.py``; muzairkhattak/multimodal-prompt-learning
``trainers/maple.py`` and ``clip/model.py``) computes, for embedded prompts ``E`` (N, L, W):

    x = E + positional_embedding
    for layer i:  [MaPLe, 1 <= i <= len(deep)] x[:, 1:1 + n_ctx] = deep[i - 1]   (no positions added)
                  x = block_i(x, causal mask)
    t = ln_final(x)[n, eot_n] @ text_projection

with ``eot_n`` the position of the end-of-text token of the tokenized prompt (CLIP's argmax pooling).
This equals open_clip's ``CLIP.encode_text`` when ``E`` is the token embedding of the prompt's ids.
Supported towers: ``open_clip.CLIP`` and ``CustomTextCLIP`` with an open_clip ``TextTransformer``
(no CoCa class token, no padding mask); anything else (HF text models) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from clipfold.errors import ConfigError

POOL_TYPES = ("argmax", "eos", "first", "last")


def _text_parts(model) -> tuple[nn.Module, str, int | None]:
    """(the module holding the text tower's parts, its pool type, its eos id) or a ConfigError."""
    import open_clip

    if isinstance(model, open_clip.model.CLIP):
        return model, model.text_pool_type, getattr(model, "text_eos_id", None)
    text = getattr(model, "text", None)
    if isinstance(model, open_clip.model.CustomTextCLIP) and isinstance(text, open_clip.transformer.TextTransformer):
        if text.cls_emb is not None or text.use_pad_mask:
            raise ConfigError("prompt learning needs a causal text transformer; this TextTransformer appends a "
                              "CoCa class token or uses a padding mask, which the official prompt learners never saw")
        return text, text.pool_type, getattr(text, "eos_id", None)
    inner = f" with text tower {type(text).__name__}" if text is not None else ""
    raise ConfigError(f"prompt learning (CoOp, CoCoOp, MaPLe) runs the text tower on learned token embeddings; "
                      f"it supports open_clip CLIP and CustomTextCLIP with an open_clip TextTransformer, not "
                      f"{type(model).__name__}{inner}")


class PromptTextTower(nn.Module):
    """``forward(embeddings (N, L, W), pool_index (N,), deep=None, n_ctx=0) -> (N, E)`` unnormalized.

    Holds the model's own modules (no copies): what it runs is exactly the model's text tower.
    """

    def __init__(self, model):
        super().__init__()
        parts, pool_type, eos_id = _text_parts(model)
        if pool_type not in POOL_TYPES:
            raise ConfigError(f"text pool type {pool_type!r} is not one of {POOL_TYPES}; a prompt's text "
                              "embedding must come from one token")
        self.pool_type = pool_type
        self.eos_id = eos_id
        self.transformer = parts.transformer
        self.ln_final = parts.ln_final
        self.register_buffer("positional_embedding", parts.positional_embedding.detach().clone(), persistent=False)
        mask = parts.attn_mask
        self.register_buffer("attn_mask", None if mask is None else mask.detach().clone(), persistent=False)
        projection = parts.text_projection
        if isinstance(projection, nn.Linear):
            self.projection = projection
        else:
            self.projection = None
            self.register_buffer("projection_matrix", None if projection is None else projection.detach().clone(),
                                 persistent=False)
        # Kept out of the module tree: the vocabulary table is only needed at import, never in an export.
        self.__dict__["_token_embedding"] = parts.token_embedding
        self.width = int(parts.positional_embedding.shape[1])
        self.context_length = int(parts.positional_embedding.shape[0])
        self.layers = len(self.transformer.resblocks)

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N,) position whose output is the prompt embedding, as open_clip's ``text_global_pool``."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        last = tokens.shape[1] - 1 if self.pool_type == "last" else 0
        return torch.full((tokens.shape[0],), last, dtype=torch.long)

    @torch.no_grad()
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._token_embedding(tokens).float()

    def forward(self, embeddings: torch.Tensor, pool_index: torch.Tensor,
                deep: Sequence[torch.Tensor] | None = None, n_ctx: int = 0) -> torch.Tensor:
        deep = list(deep or ())
        if len(deep) > self.layers - 1:
            raise ConfigError(f"{len(deep)} deep prompts need a text transformer of more than {len(deep)} layers; "
                              f"this one has {self.layers}")
        n, length, _ = embeddings.shape
        x = embeddings + self.positional_embedding[:length]
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        batch_first = getattr(self.transformer, "batch_first", True)
        for i, block in enumerate(self.transformer.resblocks):
            if 1 <= i <= len(deep):  # MaPLe: this layer's prompts replace the previous layer's outputs
                prompt = deep[i - 1].to(x.dtype).unsqueeze(0).expand(n, -1, -1)
                x = torch.cat([x[:, :1], prompt, x[:, 1 + n_ctx:]], dim=1)
            if batch_first:
                x = block(x, attn_mask=mask)
            else:
                x = block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        x = self.ln_final(x)
        # gather rather than fancy indexing: exports to ONNX with a dynamic N
        index = pool_index.view(-1, 1, 1).expand(-1, 1, x.shape[-1])
        pooled = x.gather(1, index).squeeze(1)
        if self.projection is not None:
            return self.projection(pooled)
        if self.projection_matrix is not None:
            return pooled @ self.projection_matrix
        return pooled


@dataclass(frozen=True)
class Prompts:
    """The official prompts ``"X X ... X {name}."`` of every class, tokenized and embedded."""

    tokens: torch.Tensor  # (C, L) int64
    embeddings: torch.Tensor  # (C, L, W) token embeddings; positions 1..n_ctx are the placeholders
    pool_index: torch.Tensor  # (C,) the EOT position of each prompt
    name_lens: tuple[int, ...]  # tokens of each class name (CoOp's middle/front positions)
    n_ctx: int


def class_names(labels: Sequence[str]) -> tuple[str, ...]:
    """Class names as the official prompt learners use them: ``_`` becomes a space."""
    return tuple(name.replace("_", " ") for name in labels)


@torch.no_grad()
def build_prompts(tower: PromptTextTower, tokenizer, labels: Sequence[str], n_ctx: int,
                  prefix: str | None = None) -> Prompts:
    """Tokenize ``prefix + " " + name + "."`` per class and embed it, as the official PromptLearner.

    ``prefix`` is the run's ``CTX_INIT`` words when they initialised the context (the official
    ``prompt_prefix``), else ``"X" * n_ctx``. Positions ``1..n_ctx`` are replaced by the learned
    context; init tokens past ``n_ctx`` stay in the prompt as words (MaPLe's 2 context vectors from
    "a photo of a" leave "of a" before the class name).
    """
    if not labels:
        raise ConfigError("prompt learning needs at least one class name")
    names = class_names(labels)
    prefix = " ".join(["X"] * n_ctx) if prefix is None else prefix
    tokens = tokenizer([f"{prefix} {name}." for name in names])
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has no encode(); the official prompt learners "
                          "count class-name tokens with CLIP's BPE tokenizer")
    name_lens = tuple(len(encode(name)) for name in names)
    pool_index = tower.pool_index(tokens)
    # SOS + context + name + "." + EOT must fit, or the tokenizer has cut the end-of-text token off.
    prefix_len = max(n_ctx, len(encode(prefix)))
    needed = [prefix_len + k + 3 for k in name_lens]
    too_long = [name for name, k in zip(names, needed) if k > tokens.shape[1]]
    if too_long:
        raise ConfigError(f"prompts with {n_ctx} context tokens do not fit the text context of {tokens.shape[1]} "
                          f"tokens for classes {too_long[:5]}; use shorter class names")
    return Prompts(tokens=tokens, embeddings=tower.embed_tokens(tokens), pool_index=pool_index,
                   name_lens=name_lens, n_ctx=n_ctx)
