"""Shared fixtures: bundles compiled once per session (compiling a real architecture takes ~10 s)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Without an NVIDIA GPU the Triton kernel is tested in Triton's interpreter. Triton reads the flag
# when it is imported, and torch may import triton while other test modules are collected, so it
# is set here, before any of them (a caller's explicit setting wins).
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `make test` runs the suite on two pytest-xdist workers, a file at a time each. A worker's torch
# and OpenMP then use one thread: two workers with two threads each on two cores made torch's
# small-op loops (LP++'s and ProKeR's official-loop replays) 8-15x slower as the threads wait on
# each other. Set before torch is imported; subprocesses the tests start inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Test files that share a session fixture too costly to build on both workers: each maps to the file
# it runs beside (random_bundle("RN50") takes ~15 s).
SAME_WORKER = {"tests/test_extra_heads.py": "tests/test_compile_parity.py"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` (``make test``), with the files of :data:`SAME_WORKER` sent as one unit."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedFixturesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return SAME_WORKER.get(path, path)

    return SharedFixturesTogether(config, log)


def _files(path: Path) -> dict[str, tuple[int, int]]:
    return {str(f.relative_to(path)): (f.stat().st_size, f.stat().st_mtime_ns) for f in path.rglob("*") if f.is_file()}


def shared(result):
    """Yield the session bundle ``result``; at the end of the session, fail if a test changed its files.
    Tests that change a shared bundle copy it first: one that wrote into it (a profile record, a head)
    would make the tests after it pass or fail by the order they run in, which pytest-xdist varies."""
    before = _files(result.path)
    yield result
    after = _files(result.path)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"a test changed the shared bundle {result.path}: {changed}; copy it first"


@pytest.fixture(scope="session")
def tiny_labels() -> tuple[str, ...]:
    from clipfold.compile.tiny import data

    return tuple(data.class_names())


@pytest.fixture(scope="session")
def tiny():
    """The embedded tiny model, loaded once (open_clip model, tokenizer, preprocess, info)."""
    from clipfold.compile.stages.load import load_model

    return load_model("clipfold-tiny")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_labels):
    """The embedded tiny model with its own templates over all colour x shape classes."""
    from clipfold.compile.config import CompileConfig
    from clipfold.compile.pipeline import compile_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny.bundle"
    yield from shared(compile_bundle(CompileConfig(labels=tiny_labels, out=out, top_k=5)))


@pytest.fixture(scope="session")
def tiny_text_bundle(tmp_path_factory, tiny_labels):
    """The same with its text tower: the serving tests' model ``tiny`` (and ``tiny-text``), test_text's and
    test_bundle_trust's bundle; tests that change it copy it first."""
    from clipfold.compile.config import CompileConfig
    from clipfold.compile.pipeline import compile_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny.bundle"
    yield from shared(compile_bundle(CompileConfig(labels=tiny_labels, out=out, top_k=5, text=True)))


@pytest.fixture(scope="session")
def tiny_native_bundle(tmp_path_factory, tiny_labels):
    """The tiny bundle with the fp32-native variant beside fp32 (test_native, test_backend_contract)."""
    from clipfold.compile.config import CompileConfig
    from clipfold.compile.pipeline import compile_bundle

    out = tmp_path_factory.mktemp("native") / "tiny.bundle"
    yield from shared(compile_bundle(CompileConfig(labels=tiny_labels, out=out, top_k=5,
                                                   precisions=("fp32", "fp32-native"))))


@pytest.fixture(scope="session")
def tiny_kernel_head_bundle(tmp_path_factory, tiny_labels):
    """The tiny bundle with its 30 classes scored by the top-k kernel (``kernel_head_classes=2``), and
    fp32-native beside fp32 (test_native, test_scale_out, test_bundle_trust, test_text); tests that change it
    copy it."""
    from clipfold.compile.config import CompileConfig
    from clipfold.compile.pipeline import compile_bundle

    out = tmp_path_factory.mktemp("kernel-head") / "k.bundle"
    yield from shared(compile_bundle(CompileConfig(labels=tiny_labels, out=out, top_k=5,
                                                   precisions=("fp32", "fp32-native"), kernel_head_classes=2)))


def compile_random(model: str, out, labels=("cat", "dog", "car", "tree", "boat", "house")):
    """A random-weight real architecture; one template keeps the text tower cheap."""
    from clipfold.compile.config import CompileConfig
    from clipfold.compile.pipeline import compile_bundle

    return compile_bundle(CompileConfig(labels=labels, out=out, model=model, templates="label", top_k=3))


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory):
    """``random_bundle(model)``: compile_random's bundle of that architecture (seed 0), compiled once per
    session and shared (test_compile_parity checks it, test_extra_heads copies it); never change it."""
    import torch

    built = {}
    kept = []

    def get(model: str):
        if model not in built:
            torch.manual_seed(0)
            kept.append(shared(compile_random(model, tmp_path_factory.mktemp("random") / f"{model}.bundle")))
            built[model] = next(kept[-1])
        return built[model]

    yield get
    for check in kept:
        next(check, None)


@pytest.fixture(scope="session")
def gda_task(tmp_path_factory):
    """A GDA head on the tiny model's background task, which it is confident about (so agreement
    between precisions is meaningful), with labelled support and test folders: (dir, adapter, test).
    Fitted once per session for six test files: they only read it and write bundles of their own
    names (bf16, trt, all, profiled, search) into dir."""
    from clipfold.compile.adapters.fit import FitConfig, fit_adapter
    from clipfold.compile.tiny import data
    from clipfold.compile.tiny.samples import write_background_folder

    tmp = tmp_path_factory.mktemp("gda-task")
    write_background_folder(tmp / "support", data.per_background(6, 11))
    test = write_background_folder(tmp / "test", data.per_background(20, 99))
    adapter = tmp / "gda.safetensors"
    fit_adapter(FitConfig("gda", tmp / "support", adapter, templates=("a photo on a {}.", "a {}."), cache_dir=None))
    return tmp, adapter, test
