"""Text queries at serving time, without torch: CLIP's tokenizer as data, and the text graph.

CLIP's tokenizer is a ``tokenizers`` file written by compile from open_clip's own BPE vocabulary
and merges (byte-level alphabet and ``</w>`` word ends), applied after the same cleanup open_clip
does (ftfy, HTML unescaping twice, whitespace collapsed, lower case) and open_clip's own split
(:data:`CLIP_SPLIT`, run by the same ``regex`` engine with the same flags: special tokens in any
case, case-insensitive contractions, the same Unicode tables), so the ids are open_clip's. A
prompt longer than the context is cut, keeping the end token last, and the result says so.
A Hugging Face tokenizer (SigLIP's) is its own ``tokenizers`` file with truncation and padding
to the context set in it, after open_clip's cleanup of that model (:class:`PaddedTokenizer`).
Embeddings are cached by cleaned text (LRU): a server sees the same queries again and again.
"""

from __future__ import annotations

import html
import string
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from clipfold.errors import BackendUnavailableError, BundleError, ConfigError
from clipfold.runtime.bundle.schema import TextTower
from clipfold.runtime.text_bound import clean_enough

CACHE_SIZE = 4096


# open_clip's SimpleTokenizer split (open_clip/tokenizer.py, SimpleTokenizer.__init__), matched with
# the ``regex`` module and re.IGNORECASE as there: the special tokens first, in any case.
CLIP_SPLIT = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLEANUPS = ("lower", "canonicalize", "whitespace")  # open_clip's get_clean_fn names
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def clean_text(text: str, clean: str = "lower") -> str:
    """open_clip's ``basic_clean``, then its ``clean`` step (open_clip/tokenizer.py, get_clean_fn):
    ``lower`` (CLIP: whitespace collapsed, lower case), ``canonicalize`` (SigLIP: punctuation
    removed, lower case, whitespace collapsed) or ``whitespace`` (whitespace collapsed)."""
    try:
        import ftfy
    except ImportError:
        raise BackendUnavailableError("text queries need ftfy (pip install ftfy), as open_clip's tokenizer does") from None
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    if clean == "canonicalize":  # big_vision's canonicalize_text, as open_clip has it
        text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    text = " ".join(text.split()).strip()
    return text.lower() if clean == "lower" else text


class ClipTokenizer:
    """``tokenizers`` BPE with CLIP's cleanup: ``__call__(texts) -> (ids (N, context), truncated)``."""

    def __init__(self, path: Path, context_length: int, start_id: int, end_id: int):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise BackendUnavailableError("text queries need the tokenizers library (pip install tokenizers)") from None
        try:
            import regex
        except ImportError:
            raise BackendUnavailableError("text queries need the regex library (pip install regex), as open_clip's "
                                          "tokenizer does") from None
        self.bpe = Tokenizer.from_file(str(path))
        self.split = regex.compile(CLIP_SPLIT, regex.IGNORECASE)
        self.context_length, self.start_id, self.end_id = context_length, start_id, end_id

    @staticmethod
    def clean(text: str) -> str:
        return clean_text(text, "lower")

    def encode(self, cleaned: str) -> list[int]:
        """open_clip's pieces, each byte-level BPE'd as one word; a piece that is exactly a special
        token is that token (the file holds both as added tokens), any other case of it is BPE'd
        as open_clip does (its cache holds the lower-case strings only)."""
        pieces = self.split.findall(cleaned)
        return self.bpe.encode(pieces, is_pretokenized=True, add_special_tokens=False).ids if pieces else []

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


class PaddedTokenizer:
    """A Hugging Face tokenizer (SigLIP's) as its ``tokenizers`` file, truncation and padding to the
    context set in the file by compile, after open_clip's cleanup of the model: open_clip's
    ``HFTokenizer`` (its ``tokenizer(texts, max_length=context, padding="max_length", truncation=True)``
    is this file's ``encode_batch``, special tokens added by its post-processor)."""

    def __init__(self, path: Path, context_length: int, clean: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise BackendUnavailableError("text queries need the tokenizers library (pip install tokenizers)") from None
        self.bpe = Tokenizer.from_file(str(path))
        truncation, padding = self.bpe.truncation, self.bpe.padding
        if not truncation or truncation["max_length"] != context_length or not padding \
                or padding["length"] != context_length:
            raise BundleError(f"tokenizer {path.name} does not truncate and pad to the text context {context_length} "
                              "(compile writes both); the bundle is damaged")
        self.context_length, self.clean_kind = context_length, clean

    def clean(self, text: str) -> str:
        return clean_text(text, self.clean_kind)

    def __call__(self, texts: Sequence[str], cleaned: bool = False) -> tuple[np.ndarray, np.ndarray]:
        texts = [t if cleaned else self.clean(t) for t in texts]
        encodings = self.bpe.encode_batch(texts) if texts else []
        ids = np.array([e.ids for e in encodings], np.int64).reshape(len(texts), self.context_length)
        return ids, np.array([bool(e.overflowing) for e in encodings], bool)


def tokenizer_for(bundle: Path, tower: TextTower) -> ClipTokenizer | PaddedTokenizer:
    """The tower's tokenizer: CLIP's BPE, or a Hugging Face tokenizer file (``tower.tokenizer_kind``)."""
    path = Path(bundle) / tower.tokenizer
    if tower.tokenizer_kind == "hf":
        return PaddedTokenizer(path, tower.context_length, tower.clean)
    return ClipTokenizer(path, tower.context_length, tower.start_id, tower.end_id)


@dataclass(frozen=True)
class TextEmbeddings:
    embeddings: np.ndarray  # (N, D) float32, unit rows
    truncated: np.ndarray  # (N,) bool: the prompt was longer than the context and was cut


class TextEncoder:
    """Tokenize, run the text graph (batches cut after their last end token when the tower is
    causal), cache by cleaned text.

    ``files``: the manifest's checksums; given (as ``Engine`` does), the tokenizer and the graph are
    each checked against theirs right before they are opened, however long after ``Engine.open``."""

    def __init__(self, bundle: Path, tower: TextTower, threads: int | None = None, cache_size: int = CACHE_SIZE,
                 variant: str | None = None, spin: bool = True, files: dict[str, str] | None = None):
        from clipfold.runtime.backends.onnxruntime import OnnxRuntimeBackend
        from clipfold.runtime.bundle.files import verified
        from clipfold.runtime.bundle.schema import TensorSpec

        self.tower = tower
        self.variant, file = tower.graph_for(variant)  # the text graph that goes with that image variant
        if files is not None:
            verified(Path(bundle), tower.tokenizer, files)
        self.tokenizer = tokenizer_for(Path(bundle), tower)
        if files is not None:
            verified(Path(bundle), file, files)
        self.graph = OnnxRuntimeBackend(Path(bundle) / file, (TensorSpec("tokens", "int64", ("batch", "tokens")),),
                                        (TensorSpec("text_embedding", "float32", ("batch", "dim")),), threads, spin)
        self.cache: OrderedDict[str, tuple[np.ndarray, bool]] = OrderedDict()
        self.cache_size = cache_size
        self._lock = threading.Lock()  # the cache and the graph call; cleaning runs outside it

    def clean(self, text: str) -> str:
        """The tokenizer's cleanup of ``text`` (the cache key); CLIP's tokenizer cleans only as many
        whole lines as fill the context (text_bound.py: the same ids as cleaning it all)."""
        if not isinstance(self.tokenizer, ClipTokenizer):  # another tokenizer's split: the whole text
            return clean_enough(text, self.tokenizer.clean, None)
        need = self.tokenizer.context_length - 1  # content tokens that fill the context and show the cut
        return clean_enough(text, self.tokenizer.clean, lambda cleaned: len(self.tokenizer.encode(cleaned)) >= need)

    def embed(self, texts: Sequence[str], cleaned: bool = False) -> TextEmbeddings:
        """Thread-safe: concurrent callers clean their texts in parallel and share the cache.
        ``cleaned=True``: the texts are :meth:`clean`'s results already (a caller that cleans
        them one at a time, to stop between them)."""
        if isinstance(texts, str):
            raise ConfigError("embed_text takes a list of strings; wrap a single query in a list")
        keys = list(texts) if cleaned else [self.clean(t) for t in texts]
        if not keys or not all(keys):
            raise ConfigError("a text query is empty (or only whitespace); expected at least one word per query")
        with self._lock:
            return self._embed_cleaned(keys)

    def _embed_cleaned(self, keys: list[str]) -> TextEmbeddings:
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
