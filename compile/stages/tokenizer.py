"""Which tokenizer a model's text tower reads, built offline.

open_clip picks it from the model config (open_clip/factory.py, ``get_tokenizer``): CLIP's BPE
(``SimpleTokenizer``, shipped with open_clip) unless ``text_cfg.hf_tokenizer_name`` names a Hugging
Face tokenizer (SigLIP, SigLIP2), which open_clip downloads through ``transformers``. clipfold
downloads nothing: the user passes a local copy (a folder holding ``tokenizer.json``, e.g. a
downloaded ``timm/ViT-B-16-SigLIP`` snapshot, or the file itself), read with the ``tokenizers``
library and set up as open_clip's ``HFTokenizer`` calls it: its ``clean`` step, then
``max_length=context, padding="max_length", truncation=True`` (the pad token from the folder's
``tokenizer_config.json`` or ``special_tokens_map.json``, as ``transformers`` reads it).
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch

from clipfold.errors import ConfigError, ModelError
from clipfold.runtime.text_encoder import CLEANUPS, clean_text

TOKENIZER_JSON = "tokenizer.json"


def text_config(name: str) -> dict:
    return (open_clip.get_model_config(name) or {}).get("text_cfg", {})


def check_buildable(name: str) -> None:
    """Refuse, before open_clip tries the network, a text tower open_clip builds from a Hugging Face
    model config (the multilingual towers: XLM-RoBERTa, mT5, NLLB, RoBERTa)."""
    hf_model = text_config(name).get("hf_model_name")
    if hf_model:
        raise ModelError(f"{name}'s text tower is the Hugging Face model {hf_model!r}, which open_clip builds through "
                         "transformers from a config it downloads; clipfold downloads nothing, so it cannot be built "
                         "here")


class MissingTokenizer:
    """Stands in for a Hugging Face tokenizer nobody passed: refuses, in one line, once text is needed."""

    def __init__(self, message: str):
        self.message = message

    def __call__(self, texts, context_length=None):
        raise ConfigError(self.message)


class LocalHFTokenizer:
    """open_clip's ``HFTokenizer`` from a local ``tokenizers`` file: ``(texts) -> LongTensor (N, context)``."""

    def __init__(self, file_tokenizer, context_length: int, clean: str, source: Path):
        self.tokenizer = file_tokenizer  # a tokenizers.Tokenizer with truncation and padding set
        self.context_length, self.clean, self.source = context_length, clean, source

    def save(self, path: Path) -> None:
        self.tokenizer.save(str(path))

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        if context_length not in (None, self.context_length):
            raise ConfigError(f"this tokenizer pads to {self.context_length} tokens, {context_length} were asked")
        texts = [texts] if isinstance(texts, str) else list(texts)
        encodings = self.tokenizer.encode_batch([clean_text(t, self.clean) for t in texts]) if texts else []
        return torch.tensor([e.ids for e in encodings], dtype=torch.long).reshape(len(texts), self.context_length)


def model_tokenizer(name: str, source: str | Path | None):
    """The tokenizer of ``name``'s text tower: open_clip's own for CLIP's BPE, a
    :class:`LocalHFTokenizer` from ``source`` for a Hugging Face one, or a :class:`MissingTokenizer`."""
    cfg = text_config(name)
    hf_name = cfg.get("hf_tokenizer_name")
    if not hf_name:
        if source is not None:
            raise ConfigError(f"--tokenizer applies to models with a Hugging Face tokenizer; {name} uses CLIP's BPE "
                              "tokenizer, which open_clip ships (drop --tokenizer)")
        return open_clip.get_tokenizer(name)
    if source is None:
        return MissingTokenizer(
            f"{name} reads text with the Hugging Face tokenizer {hf_name!r}, which clipfold does not download: pass "
            f"--tokenizer with a local copy (a folder holding {TOKENIZER_JSON}, e.g. a downloaded {hf_name} "
            f"snapshot, or the {TOKENIZER_JSON} file itself)")
    kwargs = dict(cfg.get("tokenizer_kwargs", {}))
    clean = kwargs.pop("clean", "whitespace")  # HFTokenizer's default
    if kwargs or cfg.get("tokenizer_mode") or clean not in CLEANUPS:
        raise ConfigError(f"{name}'s tokenizer options {cfg.get('tokenizer_kwargs')} / mode {cfg.get('tokenizer_mode')!r} "
                          "are not supported (only open_clip's clean step)")
    context = int(cfg.get("context_length", 77))
    return LocalHFTokenizer(read_hf_tokenizer(Path(source), context), context, clean, Path(source))


def read_hf_tokenizer(source: Path, context_length: int):
    """The ``tokenizers`` file at ``source`` (or ``source/tokenizer.json``), truncating and padding to
    ``context_length`` as ``transformers`` sets a fast tokenizer up for ``padding="max_length"``."""
    from tokenizers import Tokenizer

    folder = source if source.is_dir() else source.parent
    file = source / TOKENIZER_JSON if source.is_dir() else source
    if not file.is_file():
        raise ConfigError(f"tokenizer {file} not found; expected a folder holding {TOKENIZER_JSON} or that file")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust library's parse errors
        raise ConfigError(f"cannot read tokenizer {file}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                          "expected a Hugging Face tokenizers file") from None
    config = _json(folder / "tokenizer_config.json", file)
    specials = _json(folder / "special_tokens_map.json", file)
    pad = _token(config.get("pad_token")) or _token(specials.get("pad_token"))
    pad_id = tokenizer.token_to_id(pad) if pad is not None else None
    if pad_id is None and tokenizer.padding:  # a file that carries its own padding
        pad, pad_id = tokenizer.padding["pad_token"], tokenizer.padding["pad_id"]
    if pad_id is None:
        raise ConfigError(f"tokenizer {file} names no pad token in the vocabulary (tokenizer_config.json or "
                          "special_tokens_map.json pad_token); open_clip pads to the context with it")
    tokenizer.enable_truncation(max_length=context_length, direction=config.get("truncation_side", "right"))
    tokenizer.enable_padding(length=context_length, pad_id=pad_id, pad_token=pad,
                             direction=config.get("padding_side", "right"))
    return tokenizer


def _json(path: Path, file: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path} beside tokenizer {file}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _token(value) -> str | None:
    """A special token as transformers stores it: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
