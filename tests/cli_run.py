"""``clipfold ARGS`` run in this process: the CLI's ``main`` with its stdout and stderr captured.

A subprocess re-imports torch (3-6 s a run); tests that are not about the process itself (signals,
exit on kill, what a fresh interpreter imports, the server processes) use this instead. The result
has a subprocess's shape (returncode, stdout, stderr), so a test reads the same either way.
"""

from __future__ import annotations

import contextlib
import io
import subprocess


def run_cli(*args) -> subprocess.CompletedProcess:
    """``main([...])``'s exit code (argparse's ``SystemExit`` code for a usage error) and its output."""
    from clipfold.cli import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: --help exits 0, a usage error 2
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return subprocess.CompletedProcess(["clipfold", *argv], code, out.getvalue(), err.getvalue())
