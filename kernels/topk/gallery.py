"""``Gallery``: embeddings to search, stored fp32, fp16 or int8 with a scale per row.

A gallery comes from arrays (:meth:`Gallery.from_array`) or from a folder of memory-mapped shards
(:meth:`Gallery.open`, written by :meth:`Gallery.save`), so a 10^8-row gallery is never loaded
whole. int8 rows are symmetric per row: ``row ~= scale * q`` with ``q`` in [-127, 127], so a score
is ``scale * (q . query)`` and one multiply per row restores it. A quantized gallery may keep the
fp32 rows beside it (``exact``) to rescore the final candidates exactly.

Folder layout: ``gallery.json`` (dim, storage, shards), and per shard ``NNNN.rows.npy``
(+ ``NNNN.scales.npy`` for int8, ``NNNN.exact.npy`` when kept, ``NNNN.ids.npy`` when ids exist).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from clipfold.errors import ConfigError

STORAGES = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}
MANIFEST = "gallery.json"
QUANTIZE_ROWS = 1 << 14  # rows quantized at a time (32 MB of fp32 temporaries at D=512)
VERSION = 1


@dataclass(frozen=True)
class Shard:
    rows: np.ndarray  # (n, D) in the storage dtype (possibly a memmap)
    scales: np.ndarray | None  # (n,) float32 for int8
    exact: np.ndarray | None  # (n, D) float32 rows for rescoring
    ids: np.ndarray | None  # (n,) the caller's ids


class Gallery:
    """Rows to search, in one or more shards; ``len(gallery)`` rows of width ``dim``."""

    def __init__(self, shards: Sequence[Shard], dim: int, storage: str):
        if storage not in STORAGES:
            raise ConfigError(f"unknown gallery storage {storage!r}; expected one of {sorted(STORAGES)}")
        self.shards, self.dim, self.storage = tuple(shards), int(dim), storage
        for shard in self.shards:
            if shard.rows.ndim != 2 or shard.rows.shape[1] != self.dim or shard.rows.dtype != STORAGES[storage]:
                raise ConfigError(f"a {storage} gallery of width {self.dim} got rows {shard.rows.dtype} {shard.rows.shape}")
        self.offsets = np.cumsum([0] + [len(s.rows) for s in self.shards])
        self.has_ids = bool(self.shards) and all(s.ids is not None for s in self.shards)
        self.has_exact = bool(self.shards) and all(s.exact is not None for s in self.shards)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"Gallery({len(self)} x {self.dim}, {self.storage}, {len(self.shards)} shard(s))"

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_array(cls, embeddings, storage: str = "fp32", ids: Sequence | None = None,
                   keep_exact: bool = False) -> "Gallery":
        """Wrap (fp32 without a copy when possible) or quantize ``embeddings`` (N, D)."""
        x = np.asarray(embeddings)
        if x.ndim != 2:
            raise ConfigError(f"gallery embeddings must be a 2-D array (rows, dim), got shape {x.shape}")
        if x.shape[1] == 0:
            raise ConfigError(f"gallery embeddings have width 0 (shape {x.shape}); expected at least one dimension")
        if storage not in STORAGES:
            raise ConfigError(f"unknown gallery storage {storage!r}; expected one of {sorted(STORAGES)}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ConfigError(f"gallery embeddings must be floating point, got {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.size and not np.isfinite(x).all():
            bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
            raise ConfigError(f"gallery rows {bad[:5].tolist()} hold NaN or infinity; every row must be finite")
        if ids is not None:
            ids = np.asarray(ids)
            if ids.shape != (len(x),):
                raise ConfigError(f"{len(ids)} ids for {len(x)} rows; give one id per row")
        rows, scales = quantize_rows(x, storage)
        exact = x if keep_exact and storage != "fp32" else None
        return cls([Shard(rows, scales, exact, ids)], x.shape[1], storage)

    def save(self, folder: str | Path, shard_rows: int = 1 << 20) -> Path:
        """Write the gallery as memory-mappable shards of ``shard_rows`` rows."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        shards = []
        for n, (lo, hi) in enumerate(_spans(len(self), shard_rows)):
            stem = f"{n:04d}"
            entry = {"count": hi - lo}
            for name, array in (("rows", self.take("rows", lo, hi)), ("scales", self.take("scales", lo, hi)),
                                ("exact", self.take("exact", lo, hi)), ("ids", self.take("ids", lo, hi))):
                if array is not None:
                    with open(folder / f"{stem}.{name}.npy", "wb") as fh:
                        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
                        fh.flush()
                        os.fsync(fh.fileno())  # on disk before any JSON that names it
                    entry[name] = f"{stem}.{name}.npy"
            shards.append(entry)
        write_json(folder / MANIFEST, {"version": VERSION, "dim": self.dim, "storage": self.storage, "shards": shards})
        return folder

    @classmethod
    def open(cls, folder: str | Path) -> "Gallery":
        """Memory-map a folder written by :meth:`save`."""
        folder = Path(folder)
        meta = read_json(folder / MANIFEST, "gallery", VERSION)
        shards = []
        for entry in meta["shards"]:
            arrays = {}
            for name in ("rows", "scales", "exact", "ids"):
                if name in entry:
                    if not isinstance(entry[name], str) or Path(entry[name]).name != entry[name] \
                            or entry[name] in ("", ".", ".."):  # nothing outside the folder is read
                        raise ConfigError(f"gallery shard file {entry[name]!r} in {folder / MANIFEST} must be a "
                                          "plain file name inside the folder")
                    path = folder / entry[name]
                    if not path.is_file():
                        raise ConfigError(f"gallery shard file {path} is missing")
                    arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
            rows = arrays["rows"]
            if rows.shape != (entry["count"], meta["dim"]) or rows.dtype != STORAGES[meta["storage"]]:
                raise ConfigError(f"gallery shard {entry['rows']} has shape {rows.shape} {rows.dtype}, expected "
                                  f"({entry['count']}, {meta['dim']}) {meta['storage']}")
            expected = {"scales": (entry["count"],), "exact": (entry["count"], meta["dim"]), "ids": (entry["count"],)}
            if meta["storage"] == "int8" and "scales" not in arrays:
                raise ConfigError(f"int8 gallery shard {entry['rows']} has no scales file")
            for name, shape in expected.items():
                if name in arrays and arrays[name].shape != shape:
                    raise ConfigError(f"gallery shard file {entry[name]} has shape {arrays[name].shape}, expected {shape}")
            shards.append(Shard(rows, arrays.get("scales"), arrays.get("exact"), arrays.get("ids")))
        return cls(shards, meta["dim"], meta["storage"])

    # --- access -------------------------------------------------------------------------------
    def blocks(self, block_rows: int) -> Iterator[tuple[int, Shard, int, int]]:
        """(global offset, shard, lo, hi) for consecutive blocks of at most ``block_rows`` rows."""
        for shard, offset in zip(self.shards, self.offsets):
            for lo, hi in _spans(len(shard.rows), block_rows):
                yield int(offset) + lo, shard, lo, hi

    def take(self, field: str, lo: int, hi: int) -> np.ndarray | None:
        """Rows ``lo:hi`` (global) of ``rows``, ``scales``, ``exact`` or ``ids`` across shards."""
        parts = []
        for shard, offset in zip(self.shards, self.offsets):
            a, b = max(lo - offset, 0), min(hi - offset, len(shard.rows))
            if a < b:
                value = getattr(shard, field)
                if value is None:
                    return None
                parts.append(value[a:b])
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def gather(self, field: str, indices: np.ndarray) -> np.ndarray:
        """Rows of ``field`` at global ``indices`` (any shape), e.g. exact rows for rescoring."""
        flat = np.asarray(indices).ravel()
        shard_of = np.searchsorted(self.offsets, flat, side="right") - 1
        first = getattr(self.shards[0], field)
        out = np.empty((len(flat),) + first.shape[1:], dtype=first.dtype)
        for s in np.unique(shard_of):
            sel = shard_of == s
            out[sel] = getattr(self.shards[s], field)[flat[sel] - self.offsets[s]]
        return out.reshape(np.shape(indices) + first.shape[1:])

    def ids_of(self, indices: np.ndarray) -> np.ndarray:
        if not self.has_ids:
            raise ConfigError("this gallery has no ids; build it with ids=... to map indices to ids")
        return self.gather("ids", indices)


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON atomically and durably: a temporary file, fsynced, renamed over
    ``path``, then the directory fsynced (so a power loss leaves the old or the new file, and
    never one naming shards that are not on disk: :meth:`Gallery.save` fsyncs them first)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=1) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path, what: str, version: int) -> dict:
    """A versioned JSON description of a folder (``what``: gallery, index), refusing newer versions."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path.parent} is not a clipfold {what} folder: {path.name} not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if meta.get("version", 0) > version:
        raise ConfigError(f"{path.parent} was written by a newer clipfold ({what} version {meta['version']})")
    return meta


def quantize_rows(x: np.ndarray, storage: str) -> tuple[np.ndarray, np.ndarray | None]:
    """fp32 rows -> storage rows (and int8 per-row scales)."""
    if storage == "fp32":
        return x, None
    if storage == "fp16":
        big = np.abs(x).max(axis=1) > np.finfo(np.float16).max if x.size else np.zeros(0, bool)
        if big.any():
            raise ConfigError(f"gallery rows {np.flatnonzero(big)[:5].tolist()} exceed fp16's range (|x| <= 65504); "
                              "store them as fp32 or int8")
        return x.astype(np.float16), None
    peak = np.abs(x).max(axis=1) if x.size else np.zeros(len(x), dtype=np.float32)
    scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.empty(x.shape, np.int8)
    for lo, hi in _spans(len(x), QUANTIZE_ROWS):  # fp32 temporaries of one span, not of the gallery
        q[lo:hi] = np.clip(np.rint(x[lo:hi] / scales[lo:hi, None]), -127, 127)
    return q, scales


def _spans(n: int, size: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, max(1, int(size))):
        yield lo, min(n, lo + size)
