"""``k`` above what a bundle's graph returns (issue 20, item 13): clamped to it, said once.

A 3-label bundle's graph returns its top 3; the default k (5) of ``clipfold classify`` and of
``Engine.classify`` used to be refused there. Now each gives the 3 labels, best first, and says so
once: a :class:`TopKClampedWarning` per engine, one ``note:`` line from the CLI.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from clipfold import cli, errors
from clipfold.runtime import Engine
from clipfold.runtime.engine import TopKClampedWarning

LABELS = ("red circle", "blue square", "green triangle")


@pytest.fixture(scope="module")
def three_labels(tmp_path_factory):
    from clipfold.compile.config import CompileConfig
    from clipfold.compile.pipeline import compile_bundle
    from clipfold.compile.tiny import data

    tmp = tmp_path_factory.mktemp("three")
    bundle = compile_bundle(CompileConfig(labels=LABELS, out=tmp / "three.bundle")).path
    images = []
    for i, sample in enumerate(data.generate(3, seed=21)):
        images.append(tmp / f"{i}.png")
        sample.image.save(images[-1])
    return bundle, images


def test_engine_classify_clamps_k_and_warns_once(three_labels):
    bundle, images = three_labels
    engine = Engine.open(bundle)
    assert engine.max_k == 3
    with pytest.warns(TopKClampedWarning, match=r"k=5 is more than this graph returns: top-3 \(it has 3 labels\)") \
            as caught:
        first = engine.classify(images)  # the default k
        again = engine.classify(images, k=7)
    assert len(caught) == 1  # once per engine, not per call
    # Every label, best first: what k=3 gives.
    assert first == again == engine.classify(images, k=3)
    for row in first:
        assert sorted(p.label for p in row) == sorted(LABELS)
        scores = [p.score for p in row]
        assert scores == sorted(scores, reverse=True) and np.isclose(sum(scores), 1.0, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a k the graph returns warns about nothing
        assert [len(r) for r in Engine.open(bundle).classify(images, k=2)] == [2] * len(images)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(errors.ConfigError, match="k must be a positive integer"):
            engine.classify(images, k=bad)


def test_cli_classify_clamps_the_default_k_with_one_note(three_labels, capsys):
    bundle, images = three_labels
    assert cli.main(["classify", str(bundle), *map(str, images), "--json"]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.strip()]
    assert len(notes) == 1 and notes[0].startswith("note: k=5 is more than this graph returns: top-3"), notes
    rows = json.loads(captured.out)
    assert len(rows) == len(images) and all(len(r["predictions"]) == 3 for r in rows)
    assert cli.main(["classify", str(bundle), str(images[0]), "--top-k", "2"]) == 0
    assert capsys.readouterr().err == ""  # nothing to say when k fits
