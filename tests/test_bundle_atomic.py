"""Bundles appear whole or not at all."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipfold import errors
from clipfold.compile import pipeline
from clipfold.compile.config import CompileConfig
from clipfold.runtime import Engine
from clipfold.runtime.bundle.schema import Manifest


def test_bundle_layout_and_manifest(tiny_bundle):
    path = tiny_bundle.path
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.onnx"]
    m = Manifest.read(path)
    assert m == tiny_bundle.manifest
    assert set(m.files) == {"model.onnx"}
    assert m.model.checkpoint_sha256 and len(m.model.checkpoint_sha256) == 64
    assert m.preprocess.folded and m.preprocess.image_size == (64, 64)
    assert [t.name for t in m.variant().outputs] == ["scores", "indices", "embedding"]
    assert m.variant().inputs[0].dtype == "uint8"
    for dist in ("torch", "open_clip_torch", "onnx", "onnxruntime"):
        assert dist in m.producer


def test_failure_after_export_leaves_nothing(tmp_path, monkeypatch):
    def broken_verify(*args, **kwargs):
        raise errors.VerificationError("injected", ["embedding: injected"])

    monkeypatch.setattr(pipeline, "verify_onnx", broken_verify)
    with pytest.raises(errors.VerificationError, match="injected"):
        pipeline.compile_bundle(CompileConfig(labels=("a", "b"), out=tmp_path / "b.bundle"))
    assert list(tmp_path.iterdir()) == []


def test_existing_target_needs_overwrite(tmp_path, tiny_bundle):
    out = Path(shutil.copytree(tiny_bundle.path, tmp_path / "b.bundle"))  # a bundle compile wrote
    with pytest.raises(errors.BundleError, match="already exists; pass --overwrite"):
        pipeline.compile_bundle(CompileConfig(labels=("a", "b"), out=out))
    assert Engine.open(out).labels == tiny_bundle.manifest.labels
    pipeline.compile_bundle(CompileConfig(labels=("green cross", "red star", "x"), out=out, overwrite=True))
    assert Engine.open(out).labels == ("green cross", "red star", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bundle"]


def test_refuses_to_replace_a_non_bundle(tmp_path):
    (tmp_path / "b.bundle").mkdir()
    (tmp_path / "b.bundle" / "precious.txt").write_text("keep me")
    with pytest.raises(errors.BundleError, match="not a clipfold bundle"):
        pipeline.compile_bundle(CompileConfig(labels=("a", "b"), out=tmp_path / "b.bundle", overwrite=True))
    assert (tmp_path / "b.bundle" / "precious.txt").read_text() == "keep me"


def test_compile_killed_midway_leaves_no_bundle(tmp_path):
    out = tmp_path / "b.bundle"
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipfold", "compile", "--labels", "red circle,blue square", "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    partial = None
    try:
        # Kill once the ONNX file exists in the staging directory: export done, verify not yet.
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(tmp_path.glob(".b.bundle.partial-*/model.onnx"))
            if found:
                partial = found[0].parent
                break
            time.sleep(0.02)
        assert partial is not None, "compile never reached the export stage"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    # The dead process's partial directory is removed by the next compile of the same target.
    pipeline.compile_bundle(CompileConfig(labels=("red circle", "blue square"), out=out))
    assert not partial.exists()
    assert Engine.open(out).labels == ("red circle", "blue square")
