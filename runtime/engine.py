"""``Engine``: open a bundle, check it, and classify or embed images with it. No torch.

A bundle's default head is fused into its graph, or, for a large linear head, scored by the top-k
kernel after it (:mod:`.backends.kernel_head`). An extra head (``clipfold head add``) is a
second, small graph fed by the fused graph's ``embedding`` output: ``Engine.open(path,
head="name")`` chains the two, and ``labels`` and ``classify`` then speak for that head.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from clipfold.errors import BundleError, ConfigError
from clipfold.runtime.backends.base import Backend
from clipfold.runtime.backends.kernel_head import KernelHead, KernelHeadBackend
from clipfold.runtime.backends.registry import open_backend
from clipfold.runtime.bundle.files import check_folder_listed, contained
from clipfold.runtime.bundle.files import verify_files as _verify_files
from clipfold.runtime.bundle.layout import MANIFEST_NAME
from clipfold.runtime.bundle.schema import DEFAULT_HEAD, ExtraHead, Manifest, Variant
from clipfold.runtime.bundle.swap import recover_swap
from clipfold.runtime.images import ImageSource, load_image
from clipfold.runtime.preprocess import preprocess
from clipfold.runtime.text_encoder import TextEmbeddings

if TYPE_CHECKING:
    from clipfold.runtime.batcher import DynamicBatcher

DEFAULT_BATCH = 32


class TopKClampedWarning(UserWarning):
    """``classify`` was asked for more labels than the graph returns and returned what it has."""


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    index: int


class Engine:
    """A verified bundle ready to run. Build it with :meth:`open`."""

    def __init__(self, path: Path, manifest: Manifest, variant: Variant, backend: Backend,
                 batch_size: int = DEFAULT_BATCH, head: ExtraHead | None = None, head_backend: Backend | None = None,
                 threads: int | None = None, text_variant: str | None = None, spin: bool = True):
        self.path = path
        self.manifest = manifest
        self.variant = variant
        self.backend = backend
        self.batch_size = batch_size
        self.head = head  # None: the default head fused into the variant
        self.head_backend = head_backend
        self.variant_reason: str | None = None  # why variant="auto" picked this variant
        self.threads, self.spin = threads, spin
        self._text = None  # the text encoder, opened on the first text query
        self.text_variant = text_variant  # None: the text variant named like ``variant``, else fp32
        self._k_clamped = False  # the clamp warning is given once per engine
        self.digest: str | None = None  # the bundle's digest, set by ``open``

    @classmethod
    def open(cls, path: str | Path, *, variant: str | None = None, backend: str | None = None,
             threads: int | None = None, batch_size: int = DEFAULT_BATCH,
             verify_checksums: bool = True, head: str | None = None, text_variant: str | None = None,
             spin: bool = True, expect_digest: str | None = None) -> "Engine":
        """Read the manifest (refusing newer schemas), check every checksum, open the backend(s).

        ``variant="auto"``: the fastest variant this CPU runs, from the bundle's profile record for
        this CPU, else timed here within a few seconds (:mod:`~clipfold.runtime.variant_choice`);
        ``variant_reason`` says which figures decided.

        ``backend=None`` opens the variant with its own first backend (``onnxruntime`` for the ONNX
        variants, ``native`` for ``fp32-native``); an extra head is an ONNX graph and runs in
        ONNX Runtime beside a native variant.

        ``spin=False`` stops ONNX Runtime's threads busy-waiting between calls (see
        :class:`~clipfold.runtime.backends.onnxruntime.OnnxRuntimeBackend`): for processes that share their
        cores with other work, such as a server.

        ``expect_digest``: open only the bundle of this digest (``clipfold inspect`` prints it; see
        :func:`~clipfold.runtime.bundle.files.bundle_digest`); its files are then always checked."""
        path = Path(path)
        manifest, digest = _read_checked(path, verify_checksums, expect_digest)
        if variant == "auto":  # the fastest variant that runs on this CPU (runtime/variant_choice.py)
            from clipfold.runtime.variant_choice import choose, log

            def reopen(name: str) -> "Engine":  # the files were checked above
                return cls.open(path, variant=name, backend=backend, threads=threads, batch_size=batch_size,
                                verify_checksums=False, head=head, text_variant=text_variant, spin=spin)

            name, reason = choose(path, manifest, batch_size, reopen)
            log.info("variant auto: %s (%s)", name, reason)
            engine = reopen(name)
            engine.variant_reason = reason
            return engine
        chosen = manifest.variant(variant)
        _check_text_variant(manifest, text_variant)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        backend = chosen.backends[0] if backend is None else backend
        extra = None if head in (None, DEFAULT_HEAD) else manifest.extra_head(head)
        head_with = "onnxruntime" if backend == "native" else backend
        head_backend = None if extra is None else open_backend(head_with, extra, path / extra.file, threads, spin)
        graph = open_backend(backend, chosen, path / chosen.file, threads, spin)
        if manifest.head.kernel is not None:  # the default head is scored by the top-k kernel
            graph = KernelHeadBackend(graph, KernelHead(path / manifest.head.kernel, manifest.head.activation,
                                                        chosen.top_k, len(manifest.labels), threads))
        engine = cls(path, manifest, chosen, graph, batch_size=batch_size, head=extra, head_backend=head_backend,
                     threads=threads, text_variant=text_variant, spin=spin)
        engine.digest = digest
        return engine

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels if self.head is None else self.head.labels

    @property
    def max_k(self) -> int:
        return self.variant.top_k if self.head is None else self.head.top_k

    def _run(self, pixels: np.ndarray, embedding_only: bool = False) -> dict[str, np.ndarray]:
        backend = self.backend
        if (embedding_only or self.head_backend is not None) and isinstance(backend, KernelHeadBackend):
            backend = backend.graph  # the kernel-scored default head is not wanted: skip its pass
        out = backend.run({"pixels": pixels})
        if self.head_backend is not None and not embedding_only:
            out = {**self.head_backend.run({"embedding": out["embedding"]}), "embedding": out["embedding"]}
        return out

    # --- inference --------------------------------------------------------------------------
    def run_pixels(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Run preprocessed uint8 NCHW pixels through the graph in batches; outputs concatenated."""
        outs: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(pixels), self.batch_size):
            for name, value in self._run(pixels[start:start + self.batch_size]).items():
                outs.setdefault(name, []).append(value)
        return {name: np.concatenate(values) for name, values in outs.items()}

    def batcher(self, *, max_batch: int = DEFAULT_BATCH, max_delay_ms: float = 5.0, max_queue: int = 1024,
                on_batch=None, preferred_batch: int | str | None = None) -> "DynamicBatcher":
        """A :class:`~clipfold.runtime.batcher.DynamicBatcher` over :meth:`run_pixels`: preprocessed
        pixel rows from many threads, run together. Close it (or use it as a context manager) when done.

        ``preferred_batch``: rows at which a batch starts without waiting for more (default
        ``max_batch``); ``"auto"`` times this engine first (:meth:`preferred_batch`)."""
        from clipfold.runtime.batcher import DynamicBatcher

        if preferred_batch == "auto":  # (the measurement checks max_batch before it runs anything)
            preferred_batch = self.preferred_batch(max_batch)[0]
        spec = self.variant.inputs[0]
        return DynamicBatcher(self.run_pixels, max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue,
                              row_shape=tuple(spec.shape[1:]), dtype=spec.dtype, on_batch=on_batch,
                              name=f"{self.path.name} batcher", preferred_batch=preferred_batch)

    def preferred_batch(self, max_batch: int = DEFAULT_BATCH) -> tuple[int, dict[int, float]]:
        """The smallest batch whose per-image time on this engine is within 10 % of the best
        (up to ``max_batch``), and the per-image seconds measured at each size."""
        from clipfold.runtime.batcher import measure_preferred_batch

        spec = self.variant.inputs[0]
        if not all(isinstance(d, int) for d in spec.shape[1:]):
            raise ConfigError(f"cannot time {spec.name}: its row shape {spec.shape[1:]} is not fixed")
        return measure_preferred_batch(self.run_pixels, np.zeros(spec.shape[1:], dtype=spec.dtype), max_batch)

    def _run_images(self, images: Iterable[ImageSource], embedding_only: bool = False) -> Iterable[dict[str, np.ndarray]]:
        """Decode and preprocess lazily, one batch at a time, so memory stays O(batch)."""
        batch: list = []
        for source in images:
            batch.append(load_image(source))
            if len(batch) == self.batch_size:
                yield self._run(preprocess(batch, self.manifest.preprocess), embedding_only)
                batch = []
        if batch:
            yield self._run(preprocess(batch, self.manifest.preprocess), embedding_only)

    def clamp_k(self, k: int) -> int:
        """``k``, or the most labels the graph returns when ``k`` asks for more (a 3-label bundle
        asked for the default 5): then a :class:`TopKClampedWarning` says so, once per engine."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        if k <= self.max_k:
            return int(k)
        if not self._k_clamped:
            self._k_clamped = True
            more = (f"it has {self.max_k} labels" if self.max_k >= len(self.labels) else
                    f"recompile, or add the head again, with --top-k {k} for more")
            warnings.warn(TopKClampedWarning(f"k={k} is more than this graph returns: top-{self.max_k} ({more}); "
                                             f"giving {self.max_k}"), stacklevel=3)
        return self.max_k

    def classify(self, images: Sequence[ImageSource], k: int = 5) -> list[list[Prediction]]:
        """Top-``k`` labels and scores per image (softmax probabilities, or sigmoid for SigLIP);
        ``k`` above what the graph returns is clamped to it (:meth:`clamp_k`)."""
        k = self.clamp_k(k)
        results = []
        for out in self._run_images(_as_list(images)):
            for scores, indices in zip(out["scores"], out["indices"]):
                results.append([
                    Prediction(self.labels[int(i)], float(s), int(i))
                    for s, i in zip(scores[:k], indices[:k])
                ])
        return results

    def embed_text(self, texts: Sequence[str]) -> TextEmbeddings:
        """Unit text embeddings (N, D) in the image embeddings' space, and which texts were cut at
        the context length; needs a bundle compiled with ``--text``. The text graph is
        ``Engine.open(text_variant=...)``, else the gated text variant named like this engine's
        variant (``--text-precision``), else fp32."""
        return self.text_encoder().embed(texts)

    def text_encoder(self):
        """The bundle's :class:`~.text.TextEncoder`, opened on first use (its ``embed`` is thread-safe)."""
        if self.manifest.text is None:
            raise BundleError(f"bundle {self.path} has no text tower; compile it with --text to embed text queries")
        if self._text is None:
            from clipfold.runtime.text_encoder import TextEncoder

            self._text = TextEncoder(self.path, self.manifest.text, self.threads, files=self.manifest.files,
                                     variant=self.text_variant or self.variant.name, spin=self.spin)
        return self._text

    def embed(self, images: Sequence[ImageSource]) -> np.ndarray:
        """L2-normalized image embeddings, (N, D) float32."""
        chunks = [out["embedding"] for out in self._run_images(_as_list(images), embedding_only=True)]
        if not chunks:
            dim = self.manifest.model.embed_dim
            return np.zeros((0, dim), dtype=np.float32)
        return np.concatenate(chunks)


def _as_list(images) -> list:
    if isinstance(images, (str, Path, bytes)) or hasattr(images, "getpixel"):
        return [images]
    return list(images)


def verify_files(path: Path, manifest: Manifest) -> None:
    """Every file the manifest lists must exist inside the bundle with its recorded sha256, and a
    kernel head's folder may hold no file the manifest does not list."""
    _verify_files(path, manifest.files)
    if manifest.head.kernel is not None:
        check_folder_listed(path, manifest.head.kernel, manifest.files)


def _read_checked(path: Path, verify_checksums: bool, expect_digest: str | None) -> tuple[Manifest, str]:
    """The bundle's manifest and digest, once an interrupted replacement is repaired, the digest is the
    pinned one (if any) and every file is inside the bundle with its checksum (or, unchecked, inside)."""
    recover_swap(path)  # a compile --overwrite killed between its two renames
    if not path.is_dir():
        raise BundleError(f"bundle {path} not found (expected a directory holding {MANIFEST_NAME})")
    manifest, digest = Manifest.read_with_digest(path)
    if expect_digest is not None and _bare(expect_digest) != _bare(digest):
        raise BundleError(f"bundle {path} has digest {digest}, not the expected {expect_digest}; refusing to open "
                          "another bundle than the one pinned")
    if verify_checksums or expect_digest is not None:
        verify_files(path, manifest)
    else:  # unchecked contents, but never a file outside the bundle
        for rel in manifest.files:
            contained(path, rel)
    return manifest, digest


def _check_text_variant(manifest: Manifest, text_variant: str | None) -> None:
    if text_variant is not None:
        names = ["fp32"] + [v.name for v in manifest.text.variants] if manifest.text is not None else []
        if text_variant not in names:
            raise BundleError(f"bundle has no text variant {text_variant!r}; it has {names or 'no text tower'}")


def _bare(digest: str) -> str:
    return digest.strip().lower().removeprefix("sha256:")
