"""No choice is made on the images that judge a variant: calibration, search and gate images are
disjoint, the sensitivity search decides on the search images only, and the gate reports on the rest."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import clipfold.compile.precision.image_sets as image_sets
from clipfold import errors
from clipfold.compile.precision.config import GateConfig, QuantConfig
from clipfold.compile.precision.variants import _Builder
from clipfold.compile.tiny import data
from clipfold.compile.tiny.samples import write_background_folder
from clipfold.runtime.bundle.agreement import Gate

LABELS = tuple(f"{b} background" for b in data.BACKGROUNDS)


def _rows(pixels: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in pixels}


@pytest.fixture(scope="module")
def spec():
    from clipfold.compile.stages.load import load_model

    return load_model("clipfold-tiny").preprocess


def test_labelled_gate_data_is_split_and_calibration_images_are_set_apart(spec, tmp_path):
    gate_dir = write_background_folder(tmp_path / "gate", data.per_background(8, 21))
    calib_dir = write_background_folder(tmp_path / "calib", data.per_background(3, 22))
    # two gate files are also calibration files (a user passing overlapping folders)
    shared = sorted(gate_dir.rglob("*.png"))[:2]
    for i, path in enumerate(shared):
        shutil.copy(path, calib_dir / path.parent.name / f"shared{i}.png")
    calib_files = image_sets.calibration_paths(QuantConfig(calib=calib_dir))
    selection = image_sets.selection_images(spec, LABELS, GateConfig(data=gate_dir), calib_files)
    search, gate = selection.search, selection.gate
    calib_rows = _rows(image_sets._load(calib_files, spec, "calibration"))
    assert not _rows(search.pixels) & _rows(gate.pixels)
    assert not (_rows(search.pixels) | _rows(gate.pixels)) & calib_rows
    assert len(search.pixels) + len(gate.pixels) == 32 - 2 and selection.record["dropped_overlap"] == 2
    assert set(gate.targets.tolist()) == set(range(len(LABELS)))  # every class still judged
    assert 12 <= len(search.pixels) <= 16  # half of each class (4 of 8; 3 of a class that lost 2)
    assert selection.record["gate"] == gate.source and "search" in selection.record


def test_generated_search_gate_and_calibration_images_are_disjoint(spec):
    cfg = GateConfig(images=16)
    selection = image_sets.selection_images(spec, LABELS, cfg)
    calib, _ = image_sets.calibration_images(spec, QuantConfig(calib_images=16))
    assert len(selection.gate.pixels) == 16 and len(selection.search.pixels) == 16
    assert not _rows(selection.search.pixels) & _rows(selection.gate.pixels)
    assert not (_rows(selection.search.pixels) | _rows(selection.gate.pixels)) & _rows(calib)


def test_a_separate_search_folder_and_a_gate_of_only_calibration_images(spec, tmp_path):
    gate_dir = write_background_folder(tmp_path / "gate", data.per_background(3, 31))
    search_dir = write_background_folder(tmp_path / "search", data.per_background(2, 32))
    selection = image_sets.selection_images(spec, LABELS, GateConfig(data=gate_dir, search_data=search_dir))
    assert len(selection.gate.pixels) == 12 and len(selection.search.pixels) == 8  # the whole gate folder judges
    with pytest.raises(errors.ConfigError, match="no image that is not also a calibration or search image"):
        image_sets.selection_images(spec, LABELS, GateConfig(data=gate_dir, search_data=search_dir),
                                    image_sets.calibration_paths(QuantConfig(calib=gate_dir)))
    with pytest.raises(errors.ConfigError, match="has 0 usable image.* once calibration images are set apart"):
        image_sets.selection_images(spec, LABELS, GateConfig(data=gate_dir),
                                    image_sets.calibration_paths(QuantConfig(calib=gate_dir)))


def _figures(cosine: float) -> Gate:
    return Gate(reference="fp32", images=4, source="x", embedding_cosine_min=cosine, embedding_cosine_mean=cosine,
                top1_agreement=1.0, top5_overlap=1.0, accuracy=None, reference_accuracy=None, thresholds={})


class _FakeBuilder(_Builder):
    """_Builder's search with the quantizer replaced: nodes n0..n7; the variant passes once 3 are in float."""

    def __init__(self):
        self.precision, self.quant, self.out = "int8-dynamic", QuantConfig(), Path("/nonexistent/x.onnx")
        self.in_float: tuple[str, ...] = ()

    def _build(self, returned):
        self.in_float = tuple(returned)
        return {"method": "fake"}

    def _rank(self):
        return [f"n{i}" for i in range(8)]


def test_the_search_decides_on_search_images_and_the_gate_only_judges():
    builder, calls = _FakeBuilder(), {"search": [], "gate": []}

    def search(path):
        calls["search"].append(builder.in_float)
        return _figures(1.0 if len(builder.in_float) >= 3 else 0.5)

    def gate(path):
        calls["gate"].append(builder.in_float)
        return _figures(0.995)

    details, figures, kept = builder.build_and_gate(gate, search, GateConfig(), lambda message: None)
    assert kept == ["n0", "n1", "n2"] and figures.embedding_cosine_min == 0.995
    assert calls["gate"] == [("n0", "n1", "n2")]  # measured once, on the final build: no choice made on it
    assert len(calls["search"]) >= 3  # every step of the bisection
    assert details["returned_to_float"] == 3


def test_a_gate_miss_after_the_search_is_refused():
    builder = _FakeBuilder()
    with pytest.raises(errors.GateError, match=r"misses the accuracy gate against fp32 on 4 images"):
        builder.build_and_gate(lambda path: _figures(0.5), lambda path: _figures(1.0), GateConfig(),
                               lambda message: None)
