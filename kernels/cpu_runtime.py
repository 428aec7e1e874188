"""What every CPU kernel needs: how many threads the process may use, and loading a compiled C kernel."""

from __future__ import annotations

import ctypes
import os
from importlib import machinery
from pathlib import Path

from clipfold.errors import ConfigError


def default_threads() -> int:
    """All cores the process may use; ONNX Runtime's own default ignores CPU affinity masks."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def load_extension(here: Path, stem: str, what: str) -> ctypes.CDLL:
    """The C kernel ``stem`` built at install into the folder ``here`` (no Python API); without it there
    is no CPU path for it (and no silent slow one). CDLL, not PyDLL: calls release the GIL."""
    for suffix in machinery.EXTENSION_SUFFIXES:
        path = here / f"{stem}{suffix}"
        if path.is_file():
            return ctypes.CDLL(str(path))
    raise ConfigError(f"the compiled {what} ({stem}{machinery.EXTENSION_SUFFIXES[0]}) is missing from {here}; "
                      "reinstall clipfold with a C compiler available (pip install clipfold, or pip install -e .)")
