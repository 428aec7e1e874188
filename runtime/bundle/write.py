"""Stage 6: write a bundle atomically.

Everything is written into a hidden sibling directory; the manifest (with the sha256 of every
other file) is written last and fsynced, then the directory is renamed onto the target. A
compile killed at any point leaves at most a hidden ``.NAME.partial-PID`` directory, never a
half-written bundle at the target; the next compile of that target removes partials whose
process is gone, and finishes or undoes a replacement killed between its two renames
(:func:`~clipfold.runtime.bundle.swap.recover_swap`; ``Engine.open`` does the same).

Every later change of a bundle's manifest (``head add``, ``engine build``) goes through
:func:`update_manifest`: under an exclusive lock on the bundle directory it re-reads the manifest,
applies the change, writes it to a staged file, fsyncs it, renames it over ``manifest.json`` and
fsyncs the directory, so concurrent changes are applied one after the other and none is lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterator

from clipfold.errors import BundleError
from clipfold.runtime.bundle.files import sha256_file
from clipfold.runtime.bundle.layout import MANIFEST_NAME, old_dir, partial_dir, pid_of
from clipfold.runtime.bundle.schema import Manifest
from clipfold.runtime.bundle.swap import fsync_dir, pid_alive, recover_swap


def checksum_tree(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root`` except the manifest, by relative POSIX path."""
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(root)


def _remove_dead_partials(target: Path) -> None:
    for partial in target.parent.glob(partial_dir(target, "*").name):
        pid = pid_of(partial)
        if pid is not None and not pid_alive(pid):
            shutil.rmtree(partial, ignore_errors=True)


@contextlib.contextmanager
def staging_dir(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging directory beside ``target``; on error it is removed.

    The caller writes artifacts into it and calls :func:`commit` at the end of the block.
    """
    target = Path(target).absolute()
    recover_swap(target)  # before anything looks at the target: a killed replacement is finished or undone
    if target.exists() and not overwrite:
        raise BundleError(f"{target} already exists; pass --overwrite to replace it")
    if target.exists() and not (target / MANIFEST_NAME).is_file():
        raise BundleError(f"{target} exists and is not a clipfold bundle; refusing to replace it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(f"cannot create {target.parent}: {exc}") from None
    _remove_dead_partials(target)
    stage = partial_dir(target, os.getpid())
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def commit(stage: Path, manifest: Manifest, target: Path) -> Path:
    """Write the manifest into ``stage`` and move it onto ``target`` (replacing a bundle there)."""
    target = Path(target).absolute()
    _fsync_tree(stage)
    write_manifest(stage, manifest)
    replace_dir(stage, target)
    return target


def replace_dir(stage: Path, target: Path) -> None:
    """Move the finished directory ``stage`` onto ``target``, replacing what is there."""
    if target.exists():
        # rename() cannot replace a non-empty directory: move the old one aside first. Between
        # the two renames the target is briefly absent; if the second fails, the old one goes back.
        # A kill between them is repaired by recover_swap on the next compile or Engine.open.
        old = old_dir(target, os.getpid())
        os.rename(target, old)
        try:
            os.rename(stage, target)
        except BaseException:
            os.rename(old, target)
            raise
        fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(stage, target)
        fsync_dir(target.parent)


@contextlib.contextmanager
def manifest_lock(bundle: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the bundle directory, held while its manifest is read and replaced."""
    try:
        fd = os.open(bundle, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise BundleError(f"cannot open bundle {bundle} to lock it: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Stage, fsync, rename over ``manifest.json``, fsync the directory: the one way a manifest is written."""
    target = Path(folder) / MANIFEST_NAME
    staged = Path(folder) / f".{MANIFEST_NAME}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(staged, "w", encoding="utf-8") as fh:
            fh.write(manifest.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(staged, target)  # the commit point
    finally:
        staged.unlink(missing_ok=True)
    fsync_dir(Path(folder))


def update_manifest(bundle: Path, change: Callable[[Manifest], Manifest]) -> Manifest:
    """Apply ``change`` to the bundle's current manifest and commit the result atomically, under
    :func:`manifest_lock` (``change`` sees every change committed before it; it may raise to abort)."""
    with manifest_lock(Path(bundle)):
        updated = change(Manifest.read(bundle))
        write_manifest(Path(bundle), updated)
    return updated
