"""A bundle is trusted only as far as it is verified (issue 20, items 2, 3, 4, 8, 11, 12).

Containment (every manifest path relative and inside the bundle, not through a symlink that
leaves it), the bundle digest and pinning it, files checked when opened late (text tower and
tokenizer), an unloadable graph as one ClipfoldError naming it, a compile --overwrite killed
between its renames, and two concurrent head adds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from clipfold import errors
from clipfold.runtime import Engine


@pytest.fixture(scope="module")
def base_bundle(tiny_text_bundle):
    """The tiny model with its text tower, compiled once per session (conftest.py); tests copy it before
    changing it."""
    return tiny_text_bundle.path


@pytest.fixture
def bundle(base_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(base_bundle, tmp_path / "b" / "t.bundle"))


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _edit(bundle: Path, change) -> dict:
    data = json.loads((bundle / "manifest.json").read_text())
    change(data)
    (bundle / "manifest.json").write_text(json.dumps(data, indent=2))
    return data


def _digest(data: dict) -> str:
    # The documented definition (README "Security"), written out independently of runtime/bundle/schema.py.
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- item 2: containment ------------------------------------------------------------------------
def _variant_outside(bundle: Path, data: dict) -> str:
    outside = bundle.parent / "x"
    outside.mkdir(exist_ok=True)
    shutil.copy(bundle / "model.onnx", outside / "model.onnx")
    rel = "../x/model.onnx"
    data["variants"][0]["file"] = rel
    data["files"][rel] = data["files"]["model.onnx"]
    return rel


def _absolute(bundle: Path, data: dict) -> str:
    rel = str((bundle / "model.onnx").absolute())
    data["variants"][0]["file"] = rel
    data["files"][rel] = data["files"]["model.onnx"]
    return rel


def _files_escape(bundle: Path, data: dict) -> str:
    secret = bundle.parent / "secret.txt"
    secret.write_text("not the bundle's")
    rel = "../secret.txt"
    data["files"][rel] = _sha(secret)
    return rel


def _text_escape(bundle: Path, data: dict) -> str:
    shutil.copy(bundle / "tokenizer.json", bundle.parent / "tokenizer.json")
    rel = "../tokenizer.json"
    data["text"]["tokenizer"] = rel
    data["files"][rel] = data["files"]["tokenizer.json"]
    return rel


def _dotted(bundle: Path, data: dict) -> str:
    rel = "./model.onnx"
    data["variants"][0]["file"] = rel
    data["files"][rel] = data["files"]["model.onnx"]
    return rel


@pytest.mark.parametrize("escape", [_variant_outside, _absolute, _files_escape, _text_escape, _dotted])
def test_a_manifest_path_outside_the_bundle_is_refused_by_name(bundle, escape):
    named = {}
    _edit(bundle, lambda data: named.setdefault("rel", escape(bundle, data)))
    with pytest.raises(errors.BundleError, match="relative path inside the bundle") as info:
        Engine.open(bundle)
    assert named["rel"] in str(info.value)
    with pytest.raises(errors.BundleError):  # unchecked contents still never leave the bundle
        Engine.open(bundle, verify_checksums=False)


def test_a_symlink_that_leaves_the_bundle_is_refused(bundle):
    outside = bundle.parent / "elsewhere.onnx"
    shutil.move(bundle / "model.onnx", outside)
    (bundle / "model.onnx").symlink_to(outside)  # same bytes, same sha256: only the location is wrong
    with pytest.raises(errors.BundleError, match=r"model\.onnx .*outside the bundle"):
        Engine.open(bundle)
    with pytest.raises(errors.BundleError, match="outside the bundle"):
        Engine.open(bundle, verify_checksums=False)


def test_a_symlink_inside_the_bundle_is_allowed(bundle):
    (bundle / "graphs").mkdir()
    shutil.move(bundle / "model.onnx", bundle / "graphs" / "model.onnx")
    (bundle / "model.onnx").symlink_to(Path("graphs") / "model.onnx")
    engine = Engine.open(bundle)
    from PIL import Image

    assert engine.classify([Image.new("RGB", (40, 40), (200, 30, 30))], k=1)[0][0].label in engine.labels


def test_a_kernel_head_folder_holds_nothing_unlisted_and_names_nothing_outside(tmp_path, tiny_kernel_head_bundle):
    bundle = Path(shutil.copytree(tiny_kernel_head_bundle.path, tmp_path / "b" / "k.bundle"))
    folder = bundle / Engine.open(bundle).manifest.head.kernel
    (folder / "extra.npy").write_bytes(b"unlisted")
    with pytest.raises(errors.ChecksumError, match=r"extra\.npy"):
        Engine.open(bundle)
    (folder / "extra.npy").unlink()
    # gallery.json naming a shard outside its folder (with every checksum made to match)
    rows = sorted(folder.glob("*.rows.npy"))[0]
    shutil.copy(rows, bundle.parent / "outside.rows.npy")
    meta = json.loads((folder / "gallery.json").read_text())
    meta["shards"][0]["rows"] = "../../outside.rows.npy"
    (folder / "gallery.json").write_text(json.dumps(meta))
    rel = (folder / "gallery.json").relative_to(bundle).as_posix()
    _edit(bundle, lambda d: d["files"].update({rel: _sha(folder / "gallery.json")}))
    with pytest.raises(errors.BundleError, match="plain file name inside the folder"):
        Engine.open(bundle)


@pytest.mark.parametrize("version", [0, -3, "8", 7.5, True, None])
def test_schema_version_must_be_a_positive_integer(bundle, version):
    _edit(bundle, lambda data: data.update(schema_version=version))
    with pytest.raises(errors.BundleError, match="schema_version"):
        Engine.open(bundle)


# --- item 3: the digest ---------------------------------------------------------------------------
def test_inspect_prints_the_digest_of_manifest_and_files(bundle, capsys):
    from clipfold.cli import main

    expected = _digest(json.loads((bundle / "manifest.json").read_text()))
    assert main(["inspect", str(bundle)]) == 0
    assert f"digest      {expected}" in capsys.readouterr().out
    assert Engine.open(bundle).digest == expected
    # Re-indenting the manifest keeps the identity; any content change moves it.
    data = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps(data, indent=7))
    assert Engine.open(bundle).digest == expected


def test_an_edited_label_changes_the_digest_and_a_pinned_open_refuses_it(bundle):
    pinned = Engine.open(bundle).digest
    assert Engine.open(bundle, expect_digest=pinned).labels[0] != "renamed"
    assert Engine.open(bundle, expect_digest=pinned.removeprefix("sha256:")).digest == pinned
    data = _edit(bundle, lambda d: d["labels"].__setitem__(0, "renamed"))
    assert Engine.open(bundle).labels[0] == "renamed"  # unpinned, the edit is served (it is a valid bundle)
    with pytest.raises(errors.BundleError, match=f"has digest {_digest(data)}, not the expected {pinned}"):
        Engine.open(bundle, expect_digest=pinned)


def test_a_pinned_open_checks_files_even_when_asked_not_to(bundle):
    pinned = Engine.open(bundle).digest
    with open(bundle / "tokenizer.json", "ab") as fh:
        fh.write(b"\n")
    Engine.open(bundle, verify_checksums=False)  # unpinned and unchecked: the caller's choice
    with pytest.raises(errors.ChecksumError, match=r"tokenizer\.json"):
        Engine.open(bundle, verify_checksums=False, expect_digest=pinned)


def test_serve_expect_digest_refuses_another_bundle(bundle, capsys):
    pytest.importorskip("starlette")
    from clipfold.cli import main
    from clipfold.runtime.serve.app import open_models

    pinned = Engine.open(bundle).digest
    engines, _ = open_models([bundle], expect_digests={"t": pinned})
    assert engines["t"].digest == pinned
    _edit(bundle, lambda d: d["labels"].__setitem__(0, "renamed"))
    with pytest.raises(errors.BundleError, match="not the expected"):
        open_models([bundle], expect_digests={"t": pinned})
    with pytest.raises(errors.ConfigError, match="not served models"):
        open_models([bundle], expect_digests={"other": pinned})
    assert main(["serve", str(bundle), "--port", "0", "--expect-digest", f"t={pinned}"]) == 2
    assert "not the expected" in capsys.readouterr().err
    assert main(["serve", str(bundle), "--port", "0", "--expect-digest", "t"]) == 2
    assert "NAME=DIGEST" in capsys.readouterr().err


# --- item 4: files opened later are checked when opened -------------------------------------------
def test_a_text_tower_changed_after_open_is_refused(bundle):
    import onnx
    from onnx import numpy_helper

    engine = Engine.open(bundle)
    model = onnx.load(str(bundle / "text.onnx"))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    array = numpy_helper.to_array(init).copy()
    init.CopyFrom(numpy_helper.from_array(array * np.float32(1.5) if array.dtype.kind == "f" else array, init.name))
    onnx.save(model, str(bundle / "text.onnx"))  # a valid graph that embeds differently
    with pytest.raises(errors.ChecksumError, match=r"text\.onnx .*modified"):
        engine.embed_text(["a red circle"])


def test_a_tokenizer_changed_after_open_is_refused(bundle):
    engine = Engine.open(bundle)
    data = json.loads((bundle / "tokenizer.json").read_text())
    (bundle / "tokenizer.json").write_text(json.dumps(data))  # the same tokenizer, other bytes
    with pytest.raises(errors.ChecksumError, match=r"tokenizer\.json .*modified"):
        engine.embed_text(["a red circle"])


def test_a_server_answers_a_changed_tokenizer_with_503_naming_it_and_keeps_serving(bundle, caplog):
    """Changed under a running server: HTTP 503 and gRPC UNAVAILABLE naming the file, one log line
    without a traceback, and the image model still answers (on e4645d0: served, or a 500)."""
    import logging
    import urllib.error
    import urllib.request

    import grpc

    from clipfold.runtime.serve.app import ClipfoldServer, open_models
    from clipfold.runtime.serve.config import ServeConfig
    from clipfold.runtime.serve.grpc_service import status_of
    from tests.live_server import LiveServer

    engines, _ = open_models([bundle])
    running = LiveServer(ClipfoldServer(engines, ServeConfig(max_batch=4, max_delay_ms=1, grpc_port=0, ui=False)))
    try:
        data = json.loads((bundle / "tokenizer.json").read_text())
        (bundle / "tokenizer.json").write_text(json.dumps(data))  # the same tokenizer, other bytes
        request = urllib.request.Request(f"{running.url}/v1/models/t/embed", method="POST",
                                         data=json.dumps({"texts": ["a red circle"]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with caplog.at_level(logging.ERROR), pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=60)
        assert answer.value.code == 503
        assert "tokenizer.json" in json.loads(answer.value.read())["error"]
        refused = [r for r in caplog.records if "tokenizer.json" in r.getMessage()]
        assert refused and all(r.exc_info is None for r in refused)
        with urllib.request.urlopen(f"{running.url}/v2/models/t/ready", timeout=30) as ready:
            assert ready.status == 200
    finally:
        running.stop()
    code, message = status_of(errors.ChecksumError("tokenizer.json was modified"))
    assert code == grpc.StatusCode.UNAVAILABLE and "tokenizer.json" in message


def test_an_unchanged_text_tower_opens_on_first_use(bundle):
    assert Engine.open(bundle).embed_text(["a red circle"]).embeddings.shape[0] == 1


# --- item 8: an ONNX Runtime load error names the file ---------------------------------------------
def test_an_empty_graph_with_a_matching_checksum_is_one_clipfold_error(bundle):
    (bundle / "model.onnx").write_bytes(b"")
    _edit(bundle, lambda d: d["files"].update({"model.onnx": hashlib.sha256(b"").hexdigest()}))
    with pytest.raises(errors.ClipfoldError, match=r"ONNX Runtime cannot load graph model\.onnx .*0 bytes") as info:
        Engine.open(bundle)
    assert "\n" not in str(info.value)


# --- item 11: compile --overwrite killed between its two renames ----------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _crash_state(bundle: Path, partial: str) -> tuple[Path, Path, Path]:
    """The target moved aside as .NAME.old-PID, the new bundle staged as .NAME.partial-PID of a
    process that is gone; ``partial``: "complete" (with manifest), "incomplete" or "none"."""
    pid = _dead_pid()
    old = bundle.parent / f".{bundle.name}.old-{pid}"
    stage = bundle.parent / f".{bundle.name}.partial-{pid}"
    if partial != "none":
        shutil.copytree(bundle, stage)
        _edit(stage, lambda d: d["labels"].__setitem__(0, "from the new compile"))
        if partial == "incomplete":
            (stage / "manifest.json").unlink()
    os.rename(bundle, old)
    return bundle, old, stage


@pytest.mark.parametrize("partial, first_label", [("complete", "from the new compile"), ("incomplete", None),
                                                  ("none", None)])
def test_engine_open_finishes_or_undoes_a_killed_swap(bundle, partial, first_label):
    original = json.loads((bundle / "manifest.json").read_text())["labels"][0]
    target, old, stage = _crash_state(bundle, partial)
    assert not target.exists()
    engine = Engine.open(target)
    assert engine.labels[0] == (first_label or original)
    assert not old.exists() and not stage.exists()


def test_a_swap_that_finished_leaves_no_old_copy(bundle):
    pid = _dead_pid()
    old = bundle.parent / f".{bundle.name}.old-{pid}"
    shutil.copytree(bundle, old)
    Engine.open(bundle)
    assert not old.exists()


def test_a_swap_in_progress_is_left_alone(bundle):
    old = bundle.parent / f".{bundle.name}.old-{os.getpid()}"  # a live process: still replacing it
    os.rename(bundle, old)
    with pytest.raises(errors.BundleError, match="not found"):
        Engine.open(bundle)
    assert old.is_dir()


def test_the_next_compile_restores_the_target_first(bundle, tiny_labels):
    from clipfold.runtime.bundle.write import staging_dir

    target, old, _ = _crash_state(bundle, "incomplete")
    with pytest.raises(errors.BundleError, match="already exists"):  # restored before it looked
        with staging_dir(target, overwrite=False):
            pass
    assert (target / "manifest.json").is_file() and not old.exists()


# --- item 12: one atomic, locked manifest commit --------------------------------------------------
_HEAD_ADD = """
import sys, time
from pathlib import Path
from clipfold.compile.heads.add import HeadAddConfig, add_head

bundle, name, sync, labels = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), tuple(sys.argv[4:])

def progress(message):
    if message.startswith("exporting head"):  # this process has read the manifest and not written it
        (sync / name).touch()
        deadline = time.monotonic() + 300
        while len(list(sync.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)

add_head(HeadAddConfig(bundle=bundle, name=name, labels=labels, top_k=2), progress=progress)
"""


def test_two_concurrent_head_adds_keep_both_heads(bundle, tiny_labels, tmp_path):
    import sys

    sync = tmp_path / "sync"
    sync.mkdir()
    heads = {"first": tiny_labels[:3], "second": tiny_labels[3:6]}
    procs = [subprocess.Popen([sys.executable, "-c", _HEAD_ADD, str(bundle), name, str(sync), *labels],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, labels in heads.items()]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    assert sorted(p.name for p in sync.iterdir()) == ["first", "second"]  # both read before either wrote
    engine = Engine.open(bundle)
    assert sorted(h.name for h in engine.manifest.heads) == ["first", "second"]
    for name, labels in heads.items():
        assert Engine.open(bundle, head=name).labels == tuple(labels)
    assert not list(bundle.glob(".manifest.json.tmp-*")) and not list((bundle / "heads").glob(".*"))


def test_a_manifest_commit_is_fsynced_and_renamed(bundle, monkeypatch):
    import clipfold.runtime.bundle.write as bundle_module
    from clipfold.runtime.bundle.schema import Manifest

    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(bundle_module.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(bundle_module.os, "replace", lambda a, b: (calls.append(f"replace {Path(b).name}"),
                                                                  real_replace(a, b))[1])
    bundle_module.update_manifest(bundle, lambda m: m)
    assert calls[:2] == ["fsync", "replace manifest.json"]
    assert Manifest.read(bundle).labels


def test_an_engine_build_keeps_a_head_added_while_it_built(bundle, tiny_labels, monkeypatch):
    """engine build commits through the same locked re-read: a head committed during its (here
    simulated, CPU-only) TensorRT build survives, and the engine record and files are added."""
    import clipfold.compile.tensorrt.engines as engines
    import clipfold.runtime.backends.tensorrt as tensorrt_backend
    from clipfold.compile.heads.add import HeadAddConfig, add_head
    from clipfold.runtime.backends.onnxruntime import OnnxRuntimeBackend

    _edit(bundle, lambda d: d["variants"][0].update(backends=["onnxruntime", "tensorrt"]))
    here = {"tensorrt": "10.0.0", "gpu": "a test GPU", "compute_capability": "9.0"}

    def fake_build(onnx_path, plan_path, cache_path, input_name, image_size, profile, workspace_gib, say,
                   cache_out=None):
        plan_path.write_bytes(b"plan")
        (cache_out or cache_path).write_bytes(b"cache")
        add_head(HeadAddConfig(bundle=bundle, name="meanwhile", labels=tuple(tiny_labels[:3]), top_k=2))
        return {**here, "file": plan_path.name, "timing_cache": Path(cache_out).name,
                "profile": {"min": profile.min, "opt": profile.opt, "max": profile.max}, "build_seconds": 0.0}

    class FakeTensorRT(OnnxRuntimeBackend):  # the fp32 graph stands in for the plan
        def __init__(self, path, inputs, outputs, record):
            super().__init__(bundle / "model.onnx", inputs, outputs)

    monkeypatch.setattr(engines, "gpu_identity", lambda: here)
    monkeypatch.setattr(engines, "build_engine", fake_build)
    monkeypatch.setattr(tensorrt_backend, "TensorRTBackend", FakeTensorRT)
    updated = engines.build_engines(engines.EngineBuildConfig(bundle))
    assert [h.name for h in updated.heads] == ["meanwhile"]
    (record,) = updated.variants[0].engines
    assert record.gpu == "a test GPU" and (bundle / record.file).read_bytes() == b"plan"
    reread = Engine.open(bundle).manifest  # every checksum, the new plan's included
    assert reread == updated and record.file in reread.files
