"""One unreadable image does not stop ``clipfold index`` (issue 20, item 10).

Every other image is indexed; the failure is recorded with its reason in ``index.json``, named at
the end (exit 1), and tried again on the next run; ``--strict`` stops at the first one (exit 2).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import clipfold.runtime.retrieval.index as index_module
from clipfold.cli import main
from clipfold.runtime import Engine
from clipfold.runtime.retrieval.index import Index


@pytest.fixture()
def folder(tmp_path):
    from clipfold.compile.tiny import data

    root = tmp_path / "photos"
    root.mkdir()
    for i, sample in enumerate(data.generate(7, seed=13)):
        sample.image.save(root / f"good{i}.png")
    whole = (root / "good0.png").read_bytes()
    (root / "bad.png").write_bytes(whole[: len(whole) // 2])  # a truncated PNG: sorted between the good ones
    return root, whole


def _index(bundle, root, out, *extra):
    return main(["index", str(bundle), str(root), "--out", str(out), *extra])


def test_a_broken_image_is_recorded_reported_and_retried(tiny_bundle, folder, tmp_path, capsys, monkeypatch):
    root, whole = folder
    monkeypatch.setattr(index_module, "BATCH_FILES", 3)  # bad.png sits in the first of three batches
    out = tmp_path / "idx"
    assert _index(tiny_bundle.path, root, out) == 1
    err = capsys.readouterr().err
    assert "1 image(s) could not be indexed" in err and "indexed 8/8" in err
    assert "  bad.png: " in err and "truncated" in err
    index = Index.open(out)
    assert len(index) == 7 and set(index.meta["files"]) == {f"good{i}.png" for i in range(7)}
    assert list(index.failed) == ["bad.png"] and "truncated" in index.failed["bad.png"]
    recorded = json.loads((out / "index.json").read_text())["failed"]["bad.png"]
    assert recorded[:2] == [(root / "bad.png").stat().st_size, (root / "bad.png").stat().st_mtime_ns]
    # The good images of the broken image's batch are embedded as the engine embeds them alone.
    engine = Engine.open(tiny_bundle.path)
    hits = index.search(engine, image=root / "good1.png", k=7).hits
    assert hits[0].path == "good1.png" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert len({h.path for h in hits}) == 7

    # The next run tries the failure again (only it), and still says so.
    assert _index(tiny_bundle.path, root, out) == 1
    err = capsys.readouterr().err
    assert "indexed 1/1 new or changed images" in err and "  bad.png: " in err
    # Repaired, it is indexed and the failure is gone.
    (root / "bad.png").write_bytes(whole)
    assert _index(tiny_bundle.path, root, out) == 0
    index = Index.open(out)
    assert len(index) == 8 and index.failed == {} and "could not be indexed" not in capsys.readouterr().err
    same = index.search(engine, image=root / "good0.png", k=2).hits
    assert {h.path for h in same} == {"good0.png", "bad.png"}
    # An indexed image that breaks loses its old row (it no longer describes the file) and is recorded.
    (root / "good3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert _index(tiny_bundle.path, root, out) == 1
    index = Index.open(out)
    assert len(index) == 7 and "good3.png" in index.failed and "good3.png" not in index.meta["files"]
    assert "good3.png" not in {h.path for h in index.search(engine, image=root / "good0.png", k=8).hits}
    # A failed image that was deleted is forgotten.
    (root / "good3.png").unlink()
    capsys.readouterr()
    assert _index(tiny_bundle.path, root, out) == 0
    assert Index.open(out).failed == {} and "is up to date (7 images)" in capsys.readouterr().err


def test_strict_stops_at_the_first_broken_image(tiny_bundle, folder, tmp_path, capsys, monkeypatch):
    root, _ = folder
    monkeypatch.setattr(index_module, "BATCH_FILES", 3)
    (root / "bad.png").rename(root / "good2b.png")  # now in the second batch: the first one is committed
    out = tmp_path / "strict"
    assert _index(tiny_bundle.path, root, out, "--strict") == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["indexed 3/8 new or changed images", err.splitlines()[-1]]
    assert err.splitlines()[-1].startswith("error: ") and "good2b.png: the file is truncated" in err
    assert len(Index.open(out)) == 3 and Index.open(out).failed == {}
