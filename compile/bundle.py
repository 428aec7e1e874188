"""Stage 6: write a bundle atomically.

Everything is written into a hidden sibling directory; the manifest (with the sha256 of every
other file) is written last and fsynced, then the directory is renamed onto the target. A
compile killed at any point leaves at most a hidden ``.NAME.partial-PID`` directory, never a
half-written bundle at the target; the next compile of that target removes partials whose
process is gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from clipfold.errors import BundleError
from clipfold.runtime.manifest import MANIFEST_NAME, Manifest, sha256_file


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
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_partials(target: Path) -> None:
    for partial in target.parent.glob(f".{target.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


@contextlib.contextmanager
def staging_dir(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging directory beside ``target``; on error it is removed.

    The caller writes artifacts into it and calls :func:`commit` at the end of the block.
    """
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise BundleError(f"{target} already exists; pass --overwrite to replace it")
    if target.exists() and not (target / MANIFEST_NAME).is_file():
        raise BundleError(f"{target} exists and is not a clipfold bundle; refusing to replace it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(f"cannot create {target.parent}: {exc}") from None
    _remove_dead_partials(target)
    stage = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def commit(stage: Path, manifest: Manifest, target: Path) -> Path:
    """Write the manifest into ``stage`` and move it onto ``target`` (replacing a bundle there)."""
    target = Path(target).absolute()
    (stage / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    _fsync_tree(stage)
    replace_dir(stage, target)
    return target


def replace_dir(stage: Path, target: Path) -> None:
    """Move the finished directory ``stage`` onto ``target``, replacing what is there."""
    if target.exists():
        # rename() cannot replace a non-empty directory: move the old one aside first. Between
        # the two renames the target is briefly absent; if the second fails, the old one goes back.
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, old)
        try:
            os.rename(stage, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(stage, target)
