"""No byte of a checkpoint runs (issue 20, item 1): every format torch can save, at every entry point.

Each payload's ``__reduce__`` would call ``builtins.open(marker, "w")``, which leaves the marker
file behind if it ever runs. Every entry point that reads a checkpoint (``--pretrained``, each
importer, ``head add`` with and without ``--method``, the fit feature cache) is handed each
format; the marker must never exist and a :class:`ClipfoldError` must name the problem (or, for
a payload nested beside real tensors, the file loads with the payload inert).
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import pytest
import torch

from clipfold.errors import ClipfoldError


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _tar(path: Path, data: bytes) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("sys_info", "pickle", "storages", "tensors"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_payload(path: Path, kind: str, marker: Path) -> Path:
    """``path`` holding a payload as ``kind``: zip / legacy (torch.save), raw pickle, a pickle
    named .safetensors, or a legacy tar whose members are pickles."""
    evil = _Payload(marker)
    if kind == "zip":
        torch.save(evil, path)
    elif kind == "zip-nested":
        torch.save({"state_dict": {"x": torch.ones(2)}, "scheduler": evil}, path)
    elif kind == "legacy":
        torch.save(evil, path, _use_new_zipfile_serialization=False)
    elif kind == "legacy-nested":
        torch.save({"state_dict": {"x": torch.ones(2)}, "scheduler": evil}, path, _use_new_zipfile_serialization=False)
    elif kind == "raw-pickle":
        path.write_bytes(pickle.dumps(evil))
    elif kind == "safetensors-named":
        path = path.with_suffix(".safetensors")
        path.write_bytes(pickle.dumps(evil))
    elif kind == "tar":
        _tar(path, pickle.dumps(evil))
    else:
        raise AssertionError(kind)
    return path


KINDS = ("zip", "legacy", "raw-pickle", "safetensors-named", "tar", "zip-nested", "legacy-nested")


@pytest.mark.parametrize("kind", KINDS)
def test_the_reader_never_runs_a_payload(tmp_path, kind):
    from clipfold.compile.stages.checkpoint import read_checkpoint

    marker = tmp_path / "marker"
    path = write_payload(tmp_path / "ckpt.pt", kind, marker)
    if kind.endswith("nested"):  # the tensors load; the payload is an inert stand-in
        state = read_checkpoint(path)
        assert torch.equal(state["state_dict"]["x"], torch.ones(2))
        assert not isinstance(state["scheduler"], (torch.Tensor, dict))
    else:
        with pytest.raises(ClipfoldError, match="ckpt"):
            read_checkpoint(path)
    assert not marker.exists(), f"a {kind} checkpoint ran its payload"


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw-pickle", "zip-nested", "legacy-nested"])
def test_the_fallback_load_is_the_tensors_only_unpickler_and_runs_nothing(tmp_path, kind, monkeypatch):
    """The second ``torch.load`` in compile/stages/checkpoint.py passes ``weights_only=False``: every
    payload that reaches it is unpickled by the tensors-only unpickler, never by ``pickle``'s own."""
    from clipfold.compile.stages import checkpoint

    calls, real_load = [], torch.load

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "load", recording)
    marker = tmp_path / "marker"
    path = write_payload(tmp_path / "ckpt.pt", kind, marker)
    try:
        checkpoint.read_checkpoint(path)
    except ClipfoldError:
        pass
    fallback = [c for c in calls if c.get("weights_only") is False]
    assert fallback, f"the {kind} payload never reached the weights_only=False load: this test proves nothing"
    assert all(c["pickle_module"] is checkpoint._TENSORS_ONLY for c in fallback)
    assert not marker.exists(), f"a {kind} checkpoint ran its payload through the fallback load"


@pytest.mark.parametrize("save", ["zip", "legacy", "safetensors"])
def test_the_reader_loads_benign_tensors_in_every_format(tmp_path, save):
    from safetensors.torch import save_file

    from clipfold.compile.stages.checkpoint import read_checkpoint

    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}
    path = tmp_path / "ok.bin"
    if save == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path, _use_new_zipfile_serialization=save == "zip")
    loaded = read_checkpoint(path)
    assert set(loaded) == {"a", "b"} and all(torch.equal(loaded[k], state[k]) for k in state)


IMPORTERS = ("taskres", "clip-adapter", "clip-lora", "coop", "cocoop", "maple", "tip-adapter-f")
ENTRY_KINDS = ("zip", "legacy", "raw-pickle", "safetensors-named", "tar", "zip-nested")


@pytest.mark.parametrize("kind", ENTRY_KINDS)
@pytest.mark.parametrize("method", IMPORTERS)
def test_no_importer_runs_a_payload(tmp_path, tiny, tiny_labels, method, kind):
    from clipfold.compile.adapters import registry
    from clipfold.compile.adapters.base import ImportRequest

    marker = tmp_path / "marker"
    name = "best_F_4shots.pt" if method == "tip-adapter-f" else "adapter.pt"  # the official file name
    path = write_payload(tmp_path / name, kind, marker)
    if method == "tip-adapter-f" and kind == "safetensors-named":
        path = path.rename(tmp_path / name)  # a .safetensors name is refused before reading
    with pytest.raises(ClipfoldError):
        registry.importer(method)(ImportRequest(path, tiny, tiny_labels, ("a {}.",)))
    assert not marker.exists(), f"{method} ran a {kind} payload"


@pytest.mark.parametrize("kind", ENTRY_KINDS)
def test_pretrained_never_runs_a_payload(tmp_path, kind):
    from clipfold.compile.stages.load import load_model

    marker = tmp_path / "marker"
    path = write_payload(tmp_path / "weights.pt", kind, marker)
    with pytest.raises(ClipfoldError):
        load_model("clipfold-tiny", str(path))
    assert not marker.exists(), f"--pretrained ran a {kind} payload"


@pytest.mark.parametrize("kind", ("raw-pickle", "legacy", "zip"))
@pytest.mark.parametrize("method", (None, "taskres", "tip-adapter-f"))
def test_head_add_never_runs_a_payload(tmp_path, tiny_bundle, kind, method):
    import shutil

    from clipfold.compile.heads.add import HeadAddConfig, add_head

    bundle = shutil.copytree(tiny_bundle.path, tmp_path / "tiny.bundle")
    marker = tmp_path / "marker"
    name = "best_F_4shots.pt" if method == "tip-adapter-f" else "adapter.pt"
    path = write_payload(tmp_path / name, kind, marker)
    labels = None if method is None else ("a", "b")
    before = (bundle / "manifest.json").read_bytes()
    with pytest.raises(ClipfoldError):
        add_head(HeadAddConfig(bundle=bundle, name="evil", adapter=path, method=method, labels=labels))
    assert not marker.exists(), f"head add ran a {kind} payload"
    assert (bundle / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("kind", ("raw-pickle", "zip", "safetensors-named"))
def test_a_poisoned_fit_cache_is_rebuilt_not_run(tmp_path, tiny, kind):
    from clipfold.compile.adapters.features import FeatureCache, ViewConfig
    from clipfold.compile.tiny import data
    from clipfold.compile.tiny.samples import write_background_folder

    marker = tmp_path / "marker"
    cache = FeatureCache(tiny, "0" * 64, ViewConfig(views=1), tmp_path / "cache")
    cache.path.parent.mkdir(parents=True)
    write_payload(tmp_path / "payload.pt", kind, marker).rename(cache.path)
    folder = write_background_folder(tmp_path / "support", data.per_background(1, 3))
    images = sorted(p for p in folder.rglob("*.png"))[:2]
    features = cache.encode(images)
    assert features.shape[:2] == (1, 2) and cache.misses == 2
    assert not marker.exists(), f"the fit cache ran a {kind} payload"
