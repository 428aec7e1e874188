"""Text queries at serving time, without torch: CLIP's tokenizer as data, and the text graph.

The tokenizer is a ``tokenizers`` file written by compile from open_clip's own BPE vocabulary and
merges (CLIP's split pattern, byte-level alphabet and ``</w>`` word ends), applied after the same
cleanup open_clip does (ftfy, HTML unescaping twice, whitespace collapsed, lower case), so the
ids are open_clip's. A prompt longer than the context is cut, keeping the end token last, and
the result says so. Embeddings are cached by cleaned text (LRU): a server sees the same queries
again and again.
"""

from __future__ import annotations

import html
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from clipfold.errors import BackendUnavailableError, ConfigError

from .manifest import TextTower

CACHE_SIZE = 4096


def clean_text(text: str) -> str:
    """open_clip's ``basic_clean`` + ``whitespace_clean`` + lower case."""
    try:
        import ftfy
    except ImportError:
        raise BackendUnavailableError("text queries need ftfy (pip install ftfy), as open_clip's tokenizer does") from None
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


class ClipTokenizer:
    """``tokenizers`` BPE with CLIP's cleanup: ``__call__(texts) -> (ids (N, context), truncated)``."""

    def __init__(self, path: Path, context_length: int, start_id: int, end_id: int):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise BackendUnavailableError("text queries need the tokenizers library (pip install tokenizers)") from None
        self.bpe = Tokenizer.from_file(str(path))
        self.context_length, self.start_id, self.end_id = context_length, start_id, end_id

    def encode(self, cleaned: str) -> list[int]:
        return self.bpe.encode(cleaned, add_special_tokens=False).ids if cleaned else []

    def __call__(self, texts: Sequence[str], cleaned: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``cleaned=True``: the texts already went through :func:`clean_text` (it is not idempotent:
        HTML entities unescape once more each time)."""
        ids = np.zeros((len(texts), self.context_length), np.int64)
        truncated = np.zeros(len(texts), bool)
        for row, text in enumerate(texts):
            tokens = [self.start_id, *self.encode(text if cleaned else clean_text(text)), self.end_id]
            if len(tokens) > self.context_length:
                tokens = tokens[:self.context_length]
                tokens[-1] = self.end_id
                truncated[row] = True
            ids[row, :len(tokens)] = tokens
        return ids, truncated


@dataclass(frozen=True)
class TextEmbeddings:
    embeddings: np.ndarray  # (N, D) float32, unit rows
    truncated: np.ndarray  # (N,) bool: the prompt was longer than the context and was cut


class TextEncoder:
    """Tokenize, run the text graph (batches cut after their last end token when the tower is
    causal), cache by cleaned text."""

    def __init__(self, bundle: Path, tower: TextTower, threads: int | None = None, cache_size: int = CACHE_SIZE,
                 variant: str | None = None, spin: bool = True):
        from .backend import OnnxRuntimeBackend
        from .manifest import TensorSpec

        self.tower = tower
        self.variant, file = tower.graph_for(variant)  # the text graph that goes with that image variant
        self.tokenizer = ClipTokenizer(Path(bundle) / tower.tokenizer, tower.context_length, tower.start_id,
                                       tower.end_id)
        self.graph = OnnxRuntimeBackend(Path(bundle) / file, (TensorSpec("tokens", "int64", ("batch", "tokens")),),
                                        (TensorSpec("text_embedding", "float32", ("batch", "dim")),), threads, spin)
        self.cache: OrderedDict[str, tuple[np.ndarray, bool]] = OrderedDict()
        self.cache_size = cache_size

    def embed(self, texts: Sequence[str]) -> TextEmbeddings:
        if isinstance(texts, str):
            raise ConfigError("embed_text takes a list of strings; wrap a single query in a list")
        keys = [clean_text(t) for t in texts]
        if not keys or not all(keys):
            raise ConfigError("a text query is empty (or only whitespace); expected at least one word per query")
        found = {k: self.cache[k] for k in keys if k in self.cache}
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        if missing:
            ids, truncated = self.tokenizer(missing, cleaned=True)
            if self.tower.cut_after_end:
                ids = ids[:, :int((ids == self.tower.end_id).argmax(axis=1).max()) + 1]
            vectors = self.graph.run({"tokens": ids})["text_embedding"]
            found.update({k: (v, bool(c)) for k, v, c in zip(missing, vectors, truncated)})
        for key in dict.fromkeys(keys):  # most recently used last; the oldest fall out
            self.cache[key] = found[key]
            self.cache.move_to_end(key)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return TextEmbeddings(np.stack([found[k][0] for k in keys]), np.array([found[k][1] for k in keys]))
