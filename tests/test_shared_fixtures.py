"""conftest.py's session bundles are read by many test files, which `make test` spreads over two
pytest-xdist workers: the guard that fails the session when a test changed one, and the scheduler
that keeps the readers of a costly session bundle on one worker."""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from .conftest import SAME_WORKER, pytest_xdist_make_scheduler, shared

TESTS = Path(__file__).parent


def _bundle(tmp_path: Path) -> SimpleNamespace:
    path = tmp_path / "b.bundle"
    (path / "heads").mkdir(parents=True)
    (path / "manifest.json").write_text("{}")
    (path / "heads" / "h.onnx").write_bytes(b"x")
    return SimpleNamespace(path=path)


CHANGES = {
    "a file added": (lambda p: (p / "profiles.json").write_text("{}"), "profiles.json"),
    "a file rewritten, same size": (lambda p: (p / "manifest.json").write_text("[]"), "manifest.json"),
    "a file touched": (lambda p: os.utime(p / "heads" / "h.onnx", ns=(1, 1)), "heads/h.onnx"),
    "a file removed": (lambda p: (p / "heads" / "h.onnx").unlink(), "heads/h.onnx"),
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_changed_shared_bundle_fails_at_the_end_naming_the_file(tmp_path, change):
    result = _bundle(tmp_path)
    guard = shared(result)
    assert next(guard) is result
    write, name = CHANGES[change]
    write(result.path)
    with pytest.raises(AssertionError, match=re.escape(f"a test changed the shared bundle {result.path}: ['{name}']")):
        next(guard)


def test_an_unchanged_shared_bundle_passes(tmp_path):
    guard = shared(_bundle(tmp_path))
    next(guard)
    with pytest.raises(StopIteration):
        next(guard)


def _config(dist: str) -> SimpleNamespace:
    return SimpleNamespace(getvalue=lambda name: {"dist": dist, "tx": ["2*popen"]}.get(name))


def test_the_readers_of_a_costly_session_bundle_are_one_unit_of_work():
    takes = re.compile(r"def test_\w+\([^)]*\brandom_bundle\b")
    readers = sorted(f"tests/{p.name}" for p in TESTS.glob("test_*.py") if takes.search(p.read_text()))
    assert readers == sorted({*SAME_WORKER, *SAME_WORKER.values()})  # random_bundle's readers, no stale name
    scheduler = pytest_xdist_make_scheduler(_config("loadfile"), None)
    assert {scheduler._split_scope(f"{path}::test_x[a]") for path in readers} == {"tests/test_compile_parity.py"}
    assert scheduler._split_scope("tests/test_cli.py::test_x") == "tests/test_cli.py"  # any other file: its own
    assert pytest_xdist_make_scheduler(_config("load"), None) is None  # another --dist is left to pytest-xdist
