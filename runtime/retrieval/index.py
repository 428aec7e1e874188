"""Retrieval: embed a folder of images into an index, then search it by text or by image.

An index is a folder: ``index.json`` and one :class:`~clipfold.kernels.Gallery` folder per
completed batch of images (``shards/NNNNNN``). ``index.json`` names the bundle it was built with
(model and the sha256 of its image graph), the storage, and for every indexed file its size,
mtime and where its row lives; each shard's files are checksummed there too. It is rewritten
atomically after every batch, so a crash loses at most the batch in flight, and a re-run embeds
only files that are new or changed (path, size, mtime). A changed file's old row stays in its
shard but is no longer the file's row: searches skip it.

An image that cannot be read (corrupt, truncated, too many pixels) does not stop the build: every
other image is indexed, the failure is recorded with its reason under ``failed`` in ``index.json``
(``Index.failed``), and the next run tries it again. ``strict=True`` stops at the first one instead.

Search embeds the query with the same bundle (``Engine.embed_text`` or ``Engine.embed``) and
asks the fused top-k kernel for ``k`` plus the number of superseded rows, so the answer stays
exact after skipping them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from clipfold.errors import BundleError, ChecksumError, ConfigError, ImageError
from clipfold.kernels import STORAGES, Gallery, topk_similarity
from clipfold.kernels.topk.gallery import read_json, write_json
from clipfold.runtime.bundle.files import sha256_file
from clipfold.runtime.image_folders import IMAGE_SUFFIXES

INDEX_FILE = "index.json"
VERSION = 1
BATCH_FILES = 256  # images per shard: what a crash can lose


@dataclass(frozen=True)
class Hit:
    path: str  # relative to the indexed folder
    score: float  # cosine similarity
    index: str | None = None  # which index of a ShardedIndex holds it (None for a single Index)


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]  # best first
    query_truncated: bool = False  # the text query was longer than the context and was cut


def bundle_identity(engine) -> dict[str, str]:
    """What an index must match: the model and the sha256 of the image graph that embedded it (of
    an ONNX variant's file; of the sha256s of a folder variant's files, one per line)."""
    variant, files = engine.variant, engine.manifest.files
    stored = variant.stored_files()
    digest = files[stored[0]] if len(stored) == 1 else \
        hashlib.sha256("\n".join(files[name] for name in stored).encode()).hexdigest()
    return {"model": engine.manifest.model.name, "variant": variant.name, "sha256": digest}


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ConfigError(f"image folder {folder} not found")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def build_index(engine, folder: str | Path, out: str | Path, storage: str = "fp32",
                progress: Callable[[str], None] | None = None, strict: bool = False) -> "Index":
    """Embed every image under ``folder`` not yet in the index ``out`` (created if missing).

    An image that cannot be read is recorded in the index (``Index.failed``) and tried again on the
    next run; the others are indexed. ``strict``: raise its :class:`ImageError` instead (the batches
    committed before it stay)."""
    writer = IndexWriter(engine, folder, out, storage)
    todo = writer.pending()
    for start in range(0, len(todo), BATCH_FILES):
        batch = todo[start:start + BATCH_FILES]
        paths = [path for _, path in batch]
        if strict:
            embeddings, errors = engine.embed(paths), [None] * len(batch)
        else:
            embeddings, errors = embed_files(engine, paths)
        writer.commit([rel for rel, _ in batch], embeddings, errors)
        if progress is not None:
            progress(f"indexed {start + len(batch):,}/{len(todo):,} new or changed images")
    return writer.finish(progress)


def embed_files(engine, paths: Sequence[Path | str]) -> tuple[np.ndarray, list[ImageError | None]]:
    """Embeddings of ``paths`` (a zero row where an image cannot be read) and, per path, the
    :class:`ImageError` that stopped it (None if it was embedded). Images are embedded a batch at a
    time, as ``Engine.embed`` does; only a batch holding a broken image is embedded again one by one."""
    embeddings = np.zeros((len(paths), engine.manifest.model.embed_dim), np.float32)
    errors: list[ImageError | None] = [None] * len(paths)
    step = engine.batch_size
    for start in range(0, len(paths), step):
        chunk = list(paths[start:start + step])
        try:
            embeddings[start:start + len(chunk)] = engine.embed(chunk)
        except ImageError:
            for i, path in enumerate(chunk, start):
                try:
                    embeddings[i] = engine.embed([path])[0]
                except ImageError as exc:
                    errors[i] = exc
    return embeddings, errors


class IndexWriter:
    """Opens or creates the index ``out`` for ``folder`` and commits embedded batches to it, one shard each.

    Shared by :func:`build_index` (one process) and :func:`clipfold.runtime.retrieval.ray_index.build_index_ray`
    (a Ray cluster embeds; the driver commits), so both write the same format with the same guarantees.
    """

    def __init__(self, engine, folder: str | Path, out: str | Path, storage: str = "fp32"):
        self.folder, self.out = Path(folder), Path(out)
        if storage not in STORAGES:
            raise ConfigError(f"unknown index storage {storage!r}; expected one of {sorted(STORAGES)}")
        self.identity = bundle_identity(engine)
        if (self.out / INDEX_FILE).is_file():
            self.meta = _read_meta(self.out)
            _check_identity(self.meta, self.identity, self.out)
            if self.meta["storage"] != storage:
                raise ConfigError(f"index {self.out} stores {self.meta['storage']}, not {storage}; build a new index "
                                  "for another storage")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            self.meta = {"version": VERSION, "bundle": self.identity, "bundle_path": str(Path(engine.path).resolve()),
                         "folder": str(self.folder.resolve()), "dim": engine.manifest.model.embed_dim,
                         "storage": storage, "shards": [], "files": {}}
        self._stats: dict[str, os.stat_result] = {}
        self._dirty = False  # meta changed since index.json was written (a forgotten failure)

    def pending(self) -> list[tuple[str, Path]]:
        """(relative path, path) of every image that is new or changed since it was indexed, and of
        every image that failed before (tried again). A failure whose file is gone is forgotten."""
        todo = []
        images = _images(self.folder)
        present = {path.relative_to(self.folder).as_posix() for path in images}
        failed = self.meta.get("failed", {})
        for rel in [rel for rel in failed if rel not in present]:
            del failed[rel]
            self._dirty = True
        for path in images:
            rel, stat = path.relative_to(self.folder).as_posix(), path.stat()
            known = self.meta["files"].get(rel)
            if known is None or known[:2] != [stat.st_size, stat.st_mtime_ns]:
                todo.append((rel, path))
                self._stats[rel] = stat  # as listed: a file changed after this is re-embedded next run
        return todo

    def commit(self, rels: Sequence[str], embeddings: np.ndarray,
               errors: Sequence[BaseException | str | None] | None = None) -> None:
        """Write one shard for these files' embeddings, then rewrite index.json: the batch is committed.

        ``errors[i]`` (an exception or its message) marks file ``i`` as failed: its row is not
        stored, the reason is recorded under ``failed`` and a changed file's old row stops being its row."""
        if len(rels) != len(embeddings) or (errors is not None and len(errors) != len(rels)):
            raise ConfigError(f"{len(rels)} files but {len(embeddings)} embeddings"
                              + ("" if errors is None else f" and {len(errors)} errors"))
        errors = [None] * len(rels) if errors is None else list(errors)
        good = [i for i, error in enumerate(errors) if not error]
        failed = self.meta.setdefault("failed", {})
        if good:
            shard = len(self.meta["shards"])
            name = f"shards/{shard:06d}"
            shutil.rmtree(self.out / name, ignore_errors=True)  # left by a crash before its commit: not in index.json
            Gallery.from_array(np.asarray(embeddings)[good], storage=self.meta["storage"],
                               ids=[rels[i] for i in good]).save(self.out / name)
            files = {p.relative_to(self.out).as_posix(): sha256_file(p) for p in sorted((self.out / name).iterdir())}
            self.meta["shards"].append({"dir": name, "count": len(good), "files": files})
            for row, i in enumerate(good):
                stat = self._stats[rels[i]]
                self.meta["files"][rels[i]] = [stat.st_size, stat.st_mtime_ns, shard, row]
                failed.pop(rels[i], None)
        for rel, error in zip(rels, errors):
            if error:
                stat = self._stats[rel]
                self.meta["files"].pop(rel, None)  # its old row no longer describes the file
                failed[rel] = [stat.st_size, stat.st_mtime_ns, str(error)]
        write_json(self.out / INDEX_FILE, self.meta)
        self._dirty = False

    def finish(self, progress: Callable[[str], None] | None = None) -> "Index":
        if not self._stats and progress is not None:
            progress(f"index {self.out} is up to date ({len(self.meta['files']):,} images)")
        if self._dirty or not (self.out / INDEX_FILE).is_file():
            write_json(self.out / INDEX_FILE, self.meta)
        return Index.open(self.out)


def _read_meta(path: Path) -> dict:
    return read_json(path / INDEX_FILE, "index", VERSION)


def _check_identity(meta: dict, identity: dict, path: Path) -> None:
    if meta["bundle"] != identity:
        raise BundleError(f"index {path} was built with {meta['bundle']['model']} ({meta['bundle']['variant']}, image "
                          f"graph {meta['bundle']['sha256'][:12]}), not with this bundle's {identity['model']} "
                          f"({identity['variant']}, {identity['sha256'][:12]}); embeddings from different graphs "
                          "cannot be compared: rebuild the index with this bundle")


class Index:
    """An opened index: every shard checked against its checksums, then memory-mapped."""

    def __init__(self, path: Path, meta: dict, gallery: Gallery, live: np.ndarray):
        self.path, self.meta, self.gallery, self.live = path, meta, gallery, live

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "Index":
        path = Path(path)
        meta = _read_meta(path)
        shards = []
        for shard in meta["shards"]:
            if verify:
                for rel, expected in shard["files"].items():
                    file = path / rel
                    if not file.is_file() or sha256_file(file) != expected:
                        raise ChecksumError(f"index shard file {file} is missing or corrupt (sha256 differs from "
                                            f"{INDEX_FILE}); rebuild the index or remove that shard")
            shards.extend(Gallery.open(path / shard["dir"]).shards)
        gallery = Gallery(shards, meta["dim"], meta["storage"])
        # Which rows are each file's current one (a changed file's old row is superseded).
        offsets = np.cumsum([0] + [s["count"] for s in meta["shards"]])
        live = np.zeros(len(gallery), bool)
        for _, _, shard, row in meta["files"].values():
            live[offsets[shard] + row] = True
        return cls(path, meta, gallery, live)

    def __len__(self) -> int:
        return int(self.live.sum())

    @property
    def failed(self) -> dict[str, str]:
        """Images the last build could not read: relative path -> why (tried again on the next build)."""
        return {rel: entry[2] for rel, entry in self.meta.get("failed", {}).items()}

    def search(self, engine, *, text: str | None = None, image=None, k: int = 10) -> SearchResult:
        """The ``k`` indexed images nearest a text query or a query image, best first."""
        _check_identity(self.meta, bundle_identity(engine), self.path)
        query, truncated = _query(engine, text, image, k)
        scores, rows = _nearest_live(query, self.gallery, self.live, k)
        ids = self.gallery.ids_of(rows) if len(rows) else []
        return SearchResult([Hit(str(i), float(s)) for i, s in zip(ids, scores)], truncated)


class ShardedIndex:
    """Several indexes of the same bundle (one per node, per Ray job or per folder) searched as one.

    Their shards form one gallery: the fused top-k kernel scores every shard in parallel (a task
    per shard or row range on its thread pool) and merges the per-task k-lists exactly, so the
    result equals a search of one index holding all the images (``tests/test_scale_out.py``).
    """

    def __init__(self, indexes: Sequence[Index]):
        if not indexes:
            raise ConfigError("a sharded index needs at least one index")
        first = indexes[0]
        folders: dict[Path, Path] = {}
        for index in indexes:
            folder = Path(index.meta["folder"]).resolve()
            for seen, path in folders.items():
                if folder == seen or seen in folder.parents or folder in seen.parents:
                    raise ConfigError(f"indexes {path} and {index.path} cover overlapping folders ({seen} and "
                                      f"{folder}): their images would be counted twice")
            folders[folder] = index.path
        for other in indexes[1:]:
            if other.meta["bundle"] != first.meta["bundle"]:
                a, b = first.meta["bundle"], other.meta["bundle"]
                raise BundleError(f"indexes {first.path} and {other.path} were built with different bundles "
                                  f"({a['model']} {a['variant']} {a['sha256'][:12]} and {b['model']} {b['variant']} "
                                  f"{b['sha256'][:12]}); their embeddings cannot be compared")
            if (other.meta["storage"], other.meta["dim"]) != (first.meta["storage"], first.meta["dim"]):
                raise ConfigError(f"index {other.path} stores {other.meta['storage']} x {other.meta['dim']}, "
                                  f"{first.path} {first.meta['storage']} x {first.meta['dim']}: a sharded index "
                                  "needs one storage")
        self.indexes = tuple(indexes)
        self.meta = first.meta
        self.gallery = Gallery([shard for ix in indexes for shard in ix.gallery.shards], first.meta["dim"],
                               first.meta["storage"])
        self.live = np.concatenate([ix.live for ix in indexes])
        self.owner = np.repeat(np.arange(len(indexes)), [len(ix.gallery) for ix in indexes])

    @classmethod
    def open(cls, paths: Sequence[str | Path], verify: bool = True) -> "ShardedIndex":
        return cls([Index.open(path, verify=verify) for path in paths])

    def __len__(self) -> int:
        return int(self.live.sum())

    def search(self, engine, *, text: str | None = None, image=None, k: int = 10) -> SearchResult:
        """The ``k`` nearest images over every index, best first; each hit names its index."""
        _check_identity(self.meta, bundle_identity(engine), self.indexes[0].path)
        query, truncated = _query(engine, text, image, k)
        scores, rows = _nearest_live(query, self.gallery, self.live, k)
        ids = self.gallery.ids_of(rows) if len(rows) else []
        return SearchResult([Hit(str(i), float(s), str(self.indexes[o].path))
                             for i, s, o in zip(ids, scores, self.owner[rows])], truncated)


def _query(engine, text, image, k) -> tuple[np.ndarray, bool]:
    """The query embedding (1, dim) and whether the text was cut at the context length."""
    if (text is None) == (image is None):
        raise ConfigError("search takes exactly one query: text=... or image=...")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if text is not None:
        embedded = engine.embed_text([text])
        return embedded.embeddings, bool(embedded.truncated[0])
    return engine.embed([image]), False


def _nearest_live(query: np.ndarray, gallery: Gallery, live: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and rows of the ``k`` best live rows. Superseded rows (a changed file's old row) may
    rank first, so the kernel is asked for that many more; the answer stays exact after skipping them."""
    if not live.any():
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    stale = len(gallery) - int(live.sum())
    scores, rows = topk_similarity(query, gallery, min(k + stale, len(gallery)))
    keep = live[rows[0]]
    return scores[0][keep][:k], rows[0][keep][:k]
