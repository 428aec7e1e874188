"""Retrieval: embed a folder of images into an index, then search it by text or by image.

An index is a folder: ``index.json`` and one :class:`~clipfold.kernels.Gallery` folder per
completed batch of images (``shards/NNNNNN``). ``index.json`` names the bundle it was built with
(model and the sha256 of its image graph), the storage, and for every indexed file its size,
mtime and where its row lives; each shard's files are checksummed there too. It is rewritten
atomically after every batch, so a crash loses at most the batch in flight, and a re-run embeds
only files that are new or changed (path, size, mtime). A changed file's old row stays in its
shard but is no longer the file's row: searches skip it.

Search embeds the query with the same bundle (``Engine.embed_text`` or ``Engine.embed``) and
asks the fused top-k kernel for ``k`` plus the number of superseded rows, so the answer stays
exact after skipping them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from clipfold.errors import BundleError, ChecksumError, ConfigError
from clipfold.kernels import STORAGES, Gallery, topk_similarity
from clipfold.kernels.gallery import read_json, write_json

from .folders import IMAGE_SUFFIXES
from .manifest import sha256_file

INDEX_FILE = "index.json"
VERSION = 1
BATCH_FILES = 256  # images per shard: what a crash can lose


@dataclass(frozen=True)
class Hit:
    path: str  # relative to the indexed folder
    score: float  # cosine similarity


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]  # best first
    query_truncated: bool = False  # the text query was longer than the context and was cut


def bundle_identity(engine) -> dict[str, str]:
    """What an index must match: the model and the sha256 of the image graph that embedded it."""
    variant = engine.variant
    return {"model": engine.manifest.model.name, "variant": variant.name, "sha256": engine.manifest.files[variant.file]}


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ConfigError(f"image folder {folder} not found")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def build_index(engine, folder: str | Path, out: str | Path, storage: str = "fp32",
                progress: Callable[[str], None] | None = None) -> "Index":
    """Embed every image under ``folder`` not yet in the index ``out`` (created if missing)."""
    folder, out = Path(folder), Path(out)
    if storage not in STORAGES:
        raise ConfigError(f"unknown index storage {storage!r}; expected one of {sorted(STORAGES)}")
    identity = bundle_identity(engine)
    if (out / INDEX_FILE).is_file():
        meta = _read_meta(out)
        _check_identity(meta, identity, out)
        if meta["storage"] != storage:
            raise ConfigError(f"index {out} stores {meta['storage']}, not {storage}; build a new index for another storage")
    else:
        out.mkdir(parents=True, exist_ok=True)
        meta = {"version": VERSION, "bundle": identity, "bundle_path": str(Path(engine.path).resolve()),
                "folder": str(folder.resolve()), "dim": engine.manifest.model.embed_dim, "storage": storage,
                "shards": [], "files": {}}
    todo = []
    for path in _images(folder):
        rel, stat = path.relative_to(folder).as_posix(), path.stat()
        known = meta["files"].get(rel)
        if known is None or known[:2] != [stat.st_size, stat.st_mtime_ns]:
            todo.append((rel, path, stat))
    for start in range(0, len(todo), BATCH_FILES):
        batch = todo[start:start + BATCH_FILES]
        embeddings = engine.embed([path for _, path, _ in batch])
        shard = len(meta["shards"])
        name = f"shards/{shard:06d}"
        Gallery.from_array(embeddings, storage=storage, ids=[rel for rel, _, _ in batch]).save(out / name)
        files = {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted((out / name).iterdir())}
        meta["shards"].append({"dir": name, "count": len(batch), "files": files})
        for row, (rel, _, stat) in enumerate(batch):
            meta["files"][rel] = [stat.st_size, stat.st_mtime_ns, shard, row]
        write_json(out / INDEX_FILE, meta)  # the batch is committed only now
        if progress is not None:
            progress(f"indexed {start + len(batch):,}/{len(todo):,} new or changed images")
    if not todo and progress is not None:
        progress(f"index {out} is up to date ({len(meta['files']):,} images)")
    if not (out / INDEX_FILE).is_file():
        write_json(out / INDEX_FILE, meta)
    return Index.open(out)


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

    def search(self, engine, *, text: str | None = None, image=None, k: int = 10) -> SearchResult:
        """The ``k`` indexed images nearest a text query or a query image, best first."""
        _check_identity(self.meta, bundle_identity(engine), self.path)
        if (text is None) == (image is None):
            raise ConfigError("search takes exactly one query: text=... or image=...")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        truncated = False
        if text is not None:
            embedded = engine.embed_text([text])
            query, truncated = embedded.embeddings, bool(embedded.truncated[0])
        else:
            query = engine.embed([image])
        if not len(self):
            return SearchResult([], truncated)
        stale = len(self.gallery) - len(self)  # superseded rows may rank first: ask for that many more
        scores, rows = topk_similarity(query, self.gallery, min(k + stale, len(self.gallery)))
        keep = self.live[rows[0]]
        ids = self.gallery.ids_of(rows[0][keep][:k])
        return SearchResult([Hit(str(i), float(s)) for i, s in zip(ids, scores[0][keep][:k])], truncated)
