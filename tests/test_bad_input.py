"""Every bad input gets a specific ClipfoldError naming the problem; nothing is half-written."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from clipfold import errors
from clipfold.compile.config import CompileConfig, read_labels
from clipfold.compile.pipeline import compile_bundle
from clipfold.runtime import Engine
from clipfold.runtime.bundle.schema import SCHEMA_VERSION

from .cli_run import run_cli


def _compile(tmp_path, **kw):
    kw.setdefault("labels", ("red circle", "blue square"))
    return compile_bundle(CompileConfig(out=tmp_path / "b.bundle", **kw))


def _nothing_written(tmp_path):
    assert not (tmp_path / "b.bundle").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".b.bundle")] == []


def test_unknown_model_suggests_close_names(tmp_path):
    with pytest.raises(errors.UnknownModelError, match=r"unknown model 'ViT-B-33'.*did you mean.*ViT-B-32"):
        _compile(tmp_path, model="ViT-B-33")
    _nothing_written(tmp_path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(errors.CheckpointError, match=r"checkpoint file .*nope\.safetensors not found"):
        _compile(tmp_path, pretrained=str(tmp_path / "nope.safetensors"))
    _nothing_written(tmp_path)


@pytest.mark.parametrize("name, payload, pattern", [
    ("corrupt.pt", os.urandom(4096), r"cannot read checkpoint .*corrupt\.pt.*weights_only=True"),
    ("corrupt.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", r"cannot read checkpoint .*corrupt\.safetensors"),
    ("empty.pt", b"", r"checkpoint .*empty\.pt is empty \(0 bytes\)"),
])
def test_corrupt_checkpoint(tmp_path, name, payload, pattern):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(errors.CheckpointError, match=pattern):
        _compile(tmp_path, pretrained=str(path))
    _nothing_written(tmp_path)


def test_checkpoint_of_another_architecture(tmp_path):
    from clipfold.compile.stages.load import load_model

    state = {k: v.clone() for k, v in load_model("clipfold-tiny").model.state_dict().items()}
    del state["visual.proj"]
    state["text_projection"] = torch.zeros(3, 3)
    path = tmp_path / "other.safetensors"
    save_file(state, str(path))
    with pytest.raises(errors.CheckpointError) as info:
        _compile(tmp_path, pretrained=str(path))
    message = str(info.value)
    assert "does not fit the architecture" in message
    assert "missing keys" in message and "visual.proj" in message
    assert "shape mismatches" in message and "text_projection" in message
    _nothing_written(tmp_path)


def test_unknown_pretrained_tag_lists_tags(tmp_path):
    with pytest.raises(errors.CheckpointError, match=r"'no_such_tag'.*tags are \[.*openai"):
        _compile(tmp_path, model="ViT-B-32", pretrained="no_such_tag")
    _nothing_written(tmp_path)


@pytest.mark.parametrize("labels, pattern", [
    ((), r"no labels given"),
    (("cat", " ", "dog"), r"positions \[1\] are empty"),
    (("cat", "dog", "cat"), r"duplicate labels: 'cat' \(positions 0 and 2\)"),
])
def test_bad_labels(tmp_path, labels, pattern):
    with pytest.raises(errors.LabelError, match=pattern):
        CompileConfig(labels=labels, out=tmp_path / "b.bundle")


def test_labels_file_and_comma_list(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_text("# classes\ncat\n\n dog \n")
    assert read_labels(str(f)) == ("cat", "dog")
    assert read_labels("cat, dog") == ("cat", "dog")
    with pytest.raises(errors.LabelError, match="not found"):
        read_labels(str(tmp_path / "missing.txt"))


def test_bad_templates(tmp_path):
    with pytest.raises(errors.ConfigError, match="neither a preset"):
        _compile(tmp_path, templates="imagenet81")
    with pytest.raises(errors.ConfigError, match="exactly one"):
        _compile(tmp_path, templates=("a photo",))
    _nothing_written(tmp_path)


# --- bundles ---------------------------------------------------------------------------------
@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "copy.bundle"
    shutil.copytree(tiny_bundle.path, dst)
    return dst


def test_tampered_bundle_file(bundle_copy):
    model = bundle_copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(errors.ChecksumError, match=r"model\.onnx .* corrupt or was modified"):
        Engine.open(bundle_copy)


def test_bundle_missing_listed_file(bundle_copy):
    (bundle_copy / "model.onnx").unlink()
    with pytest.raises(errors.ChecksumError, match=r"missing model\.onnx"):
        Engine.open(bundle_copy)


def test_newer_schema_is_refused(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(errors.SchemaVersionError, match=rf"schema version {SCHEMA_VERSION + 1}.*upgrade clipfold"):
        Engine.open(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(errors.BundleError, match="not found"):
        Engine.open(tmp_path / "missing")
    with pytest.raises(errors.BundleError, match="manifest.json not found"):
        Engine.open(tmp_path)


def test_unknown_variant_and_bad_k(tiny_bundle):
    with pytest.raises(errors.BundleError, match=r"no variant 'int4'; it has \['fp32'\]"):
        Engine.open(tiny_bundle.path, variant="int4")
    engine = Engine.open(tiny_bundle.path)
    with pytest.raises(errors.ConfigError, match=r"k must be a positive integer, got 0"):
        engine.classify([], k=0)
    # More than the graph returns is clamped to it (issue 20, item 13), saying how to get more.
    from clipfold.runtime.engine import TopKClampedWarning

    with pytest.warns(TopKClampedWarning, match=r"top-5 \(recompile.*--top-k 6 for more\); giving 5"):
        assert engine.classify([], k=6) == []


# --- CLI: one error line, non-zero exit, no traceback ------------------------------------------
_cli = run_cli  # in-process: main() itself turns a ClipfoldError into one line (an escaped exception fails here)


def test_cli_reports_errors_without_traceback(bundle_copy, tmp_path):
    (bundle_copy / "model.onnx").write_bytes(b"tampered")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    cases = [
        (["classify", str(bundle_copy), str(truncated)], "corrupt or was modified"),
        (["compile", "--labels", "a,a", "--out", str(tmp_path / "x")], "duplicate labels"),
        (["compile", "--labels", "a,b", "--model", "RN5O", "--out", str(tmp_path / "x")], "did you mean"),
        (["inspect", str(tmp_path / "nothing")], "not found"),
    ]
    for args, expected in cases:
        proc = _cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        # Progress lines may come first (stderr); the error is one line, and the last.
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and expected in lines[-1], proc.stderr
        assert sum(line.startswith("error: ") for line in lines) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_cli_bad_image_is_a_clear_error(tiny_bundle, tmp_path):
    zero = tmp_path / "zero.jpg"
    zero.write_bytes(b"")
    proc = _cli("classify", str(tiny_bundle.path), str(zero))
    assert proc.returncode == 2 and "zero.jpg" in proc.stderr and "Traceback" not in proc.stderr


def test_local_checkpoint_load_is_not_reported_as_random(caplog):
    """open_clip's 'initialized randomly' warning is wrong when clipfold loads weights next."""
    import logging

    from clipfold.compile.stages.load import load_model

    with caplog.at_level(logging.WARNING):
        load_model("clipfold-tiny")
    assert not [r for r in caplog.records if "random" in r.getMessage()], caplog.text
    with caplog.at_level(logging.WARNING):
        load_model("RN50")
    assert "RN50 has random weights" in caplog.text
