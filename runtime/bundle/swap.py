"""Finishing a bundle replacement that a killed ``compile --overwrite`` left half done.

``compile --overwrite`` stages the new bundle as ``.NAME.partial-PID`` beside the target, then
renames the target to ``.NAME.old-PID`` and the stage onto the target (runtime/bundle/write.py,
``replace_dir``). A process killed between the two renames leaves no target at all. The next
compile of that target, and ``Engine.open`` of it, call :func:`recover_swap`, which, for every
``.NAME.old-PID`` whose process is gone:

* target absent, and the partial's manifest and every file it lists check out: the swap is
  finished (the new bundle was complete; only its rename was lost);
* target absent otherwise: the old bundle is put back;
* target present: the swap had finished; the old copy is removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from clipfold.errors import BundleError, ClipfoldError
from clipfold.runtime.bundle.files import verify_files
from clipfold.runtime.bundle.layout import MANIFEST_NAME, old_dir, partial_dir, pid_of
from clipfold.runtime.bundle.schema import Manifest


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _complete(stage: Path) -> bool:
    if not (stage / MANIFEST_NAME).is_file():
        return False
    try:
        verify_files(stage, Manifest.read(stage).files)
    except ClipfoldError:
        return False
    return True


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover_swap(target: str | Path) -> str | None:
    """Finish or undo an interrupted replacement of ``target`` (see the module docstring); returns
    what was done ("finished", "restored", "cleaned") or None when nothing was left over."""
    target = Path(target).absolute()
    parent, done = target.parent, None
    if not parent.is_dir():
        return None
    for old in sorted(parent.glob(old_dir(target, "*").name)):
        pid = pid_of(old)
        if pid is None or pid_alive(pid):
            continue  # not ours to touch: a replacement still in progress
        stage = partial_dir(target, pid)
        try:
            if target.exists():
                shutil.rmtree(old)
                done = done or "cleaned"
                continue
            if stage.is_dir() and _complete(stage):
                os.rename(stage, target)
                shutil.rmtree(old)
                done = "finished"
            else:
                os.rename(old, target)
                shutil.rmtree(stage, ignore_errors=True)
                done = "restored"
            fsync_dir(parent)
        except OSError as exc:
            raise BundleError(f"{target} was left half-replaced by a killed compile (process {pid}) and cannot be "
                              f"repaired: {exc}; move {old.name} back to {target.name} by hand") from None
    return done
