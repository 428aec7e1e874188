"""Opening a bundle's files: only inside the bundle, only with the checksum the manifest records.

Every path a manifest names is relative and normalized (:func:`check_relative`, applied when the
manifest is read); here a path is also resolved on disk, so that a symlink inside the bundle
cannot lead out of it (:func:`contained`). :func:`verify_files` checks every file at
``Engine.open``; a file the engine opens later (the text tower and its tokenizer, on the first
text query) is checked again right before it is opened (:func:`verified`), so a file changed after
the engine started is refused, not served. :func:`bundle_digest` is a bundle's identity, read from
its manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from clipfold.errors import BundleError, ChecksumError


def check_relative(rel: object, what: str) -> str:
    """``rel`` if it is a plain relative POSIX path (no ``..``, ``.``, empty part, absolute root or
    backslash); a :class:`BundleError` naming ``what`` otherwise."""
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"invalid manifest: {what} {rel!r} is not a path")
    parts = PurePosixPath(rel).parts
    if (rel.startswith("/") or "\\" in rel or "\x00" in rel or any(p in ("", ".", "..") for p in rel.split("/"))
            or "/".join(parts) != rel or ":" in parts[0]):
        raise BundleError(f"invalid manifest: {what} {rel!r} must be a relative path inside the bundle "
                          "(no '..', '.', absolute or drive paths, backslashes or empty parts)")
    return rel


def contained(bundle: Path, rel: str) -> Path:
    """``bundle / rel``, refused if the path, through any symlink, resolves outside the bundle."""
    root = Path(os.path.realpath(bundle))
    path = Path(bundle) / check_relative(rel, "file")
    real = Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        raise BundleError(f"bundle file {rel} in {bundle} resolves to {real}, outside the bundle (a symlink that "
                          "leaves it); refusing to read it")
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes (what a manifest's ``files`` records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verified(bundle: Path, rel: str, files: Mapping[str, str]) -> Path:
    """The path of bundle file ``rel`` once it is inside the bundle, listed in ``files`` and holds
    the listed sha256: call it right before opening the file."""
    if rel not in files:
        raise ChecksumError(f"bundle {bundle} opens {rel}, which its manifest lists no checksum for")
    path = contained(bundle, rel)
    if not path.is_file():
        raise ChecksumError(f"bundle {bundle} is missing {rel}, listed in its manifest")
    actual = sha256_file(path)
    if actual != files[rel]:
        raise ChecksumError(
            f"bundle file {rel} in {bundle} is corrupt or was modified: sha256 {actual[:16]}... "
            f"but the manifest records {files[rel][:16]}...; recompile the bundle")
    return path


def verify_files(bundle: Path, files: Mapping[str, str]) -> None:
    """Every listed file exists inside the bundle with its recorded sha256."""
    for rel in files:
        verified(bundle, rel, files)


def check_folder_listed(bundle: Path, folder: str, files: Mapping[str, str]) -> None:
    """Every file under ``folder`` of the bundle is listed (so checked): a folder the runtime opens
    by its own index (a kernel head's gallery shards) holds nothing unverified."""
    base = contained(bundle, folder)
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(bundle).as_posix()
        if (path.is_file() or path.is_symlink()) and rel not in files:
            raise ChecksumError(f"bundle {bundle} holds {rel} in {folder}/, which its manifest lists no checksum for; "
                                "recompile the bundle")


def bundle_digest(data: dict[str, Any]) -> str:
    """A bundle's identity: ``sha256:`` + the sha256 of its manifest as canonical JSON (the parsed
    manifest.json dumped with sorted keys, no whitespace, UTF-8, non-ASCII kept). The manifest
    records the sha256 of every other file and each is checked when the bundle is opened, so the
    digest covers the manifest and every file; any edit (a label, a threshold, a file) changes it,
    re-indenting manifest.json does not."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return "sha256:" + hashlib.sha256(canonical).hexdigest()
