"""compile_bundle as a chain of small stages: one head resolver for ``compile`` and ``head add``, the
default images chosen in one place, the image sets apart from the gate's figures."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from clipfold import errors
from clipfold.compile.adapters.fit import FitConfig, fit_adapter
from clipfold.compile.config import CompileConfig, VerifyConfig, generated_images
from clipfold.compile.heads.add import HeadAddConfig, add_head
from clipfold.compile.pipeline import compile_bundle
from clipfold.compile.tiny import data
from clipfold.compile.tiny.samples import write_background_folder

COMPILE = Path(__file__).resolve().parents[1] / "compile"
TEMPLATES = ("a photo on a {}.", "a {}.")


def _tree(rel: str) -> ast.Module:
    path = COMPILE / rel
    assert path.is_file(), f"compile/{rel} is missing"
    return ast.parse(path.read_text())


def _imports(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def _functions(tree: ast.Module) -> dict[str, int]:
    return {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A GDA adapter fitted by ``fit_adapter``: its hyperparameters hold the local support folder."""
    tmp = tmp_path_factory.mktemp("resolver")
    path = tmp / "gda.safetensors"
    fit_adapter(FitConfig("gda", write_background_folder(tmp / "support", data.per_background(4, 11)), path, templates=TEMPLATES,
                          cache_dir=None))
    bundle = compile_bundle(CompileConfig(labels=None, adapter=path, out=tmp / "gda.bundle",
                                          verify=VerifyConfig(random_images=2, generated_images=2))).path
    return path, bundle


def test_head_add_records_an_adapter_as_compile_does(fitted):
    """One resolver: the head compile fuses and the head ``head add`` adds from the same adapter file are
    described alike, and neither carries the support folder's local path (e4645d0's head add did)."""
    path, bundle = fitted
    manifest = add_head(HeadAddConfig(bundle, "again", adapter=path, top_k=2))
    compiled, added = manifest.head, manifest.extra_head("again").head
    assert added == compiled
    assert added.method == "gda" and added.adapter["file"] == path.name
    assert "support" not in added.adapter["hyperparameters"] and added.adapter["hyperparameters"]
    assert manifest.extra_head("again").labels == manifest.labels


def test_head_add_refuses_other_labels_as_compile_does(fitted, tmp_path):
    path, bundle = fitted
    other = ("a", "b", "c", "d")
    pattern = r"the labels differ from the adapter's 4 labels \(.*\); omit --labels"
    with pytest.raises(errors.LabelError, match=pattern):
        add_head(HeadAddConfig(bundle, "other", adapter=path, labels=other))
    with pytest.raises(errors.LabelError, match=pattern):
        compile_bundle(CompileConfig(labels=other, adapter=path, out=tmp_path / "b.bundle"))
    assert not (tmp_path / "b.bundle").exists()


def test_compile_and_head_add_choose_the_head_in_one_place():
    adapt = _functions(_tree("stages/adapt.py"))
    assert {"plan_head", "resolve_head"} <= set(adapt)
    for rel in ("pipeline.py", "heads/add.py"):
        imported = _imports(_tree(rel))
        assert {"clipfold.compile.stages.adapt.plan_head", "clipfold.compile.stages.adapt.resolve_head"} <= imported
        # the choice's own pieces belong to the resolver alone
        assert not imported & {"clipfold.compile.adapters.registry", "clipfold.compile.adapters.store",
                               "clipfold.compile.heads.zero_shot.build_zero_shot_head"}, rel


def test_compile_bundle_is_a_short_chain_of_stage_calls():
    tree = _tree("pipeline.py")
    lengths = _functions(tree)
    assert len((COMPILE / "pipeline.py").read_text().splitlines()) < 400
    assert max(lengths.values()) <= 60, {k: v for k, v in lengths.items() if v > 60}
    # every branch of e4645d0's compile_bundle is a function of its own
    assert {"_plan", "_load", "_fold", "_kernel_head", "_verify_fp32", "_native_variant", "_reduced_variants",
            "_export_text", "_manifest"} <= set(lengths)


def test_stages_take_no_images_from_the_demo_model():
    """Which images compile uses when the user gives none is chosen in compile/config.py alone."""
    for rel in ("stages/verify.py", "precision/gate.py", "precision/image_sets.py", "pipeline.py",
                "heads/add.py", "stages/adapt.py"):
        imported = _imports(_tree(rel))
        assert not any(name.startswith("clipfold.compile.tiny") for name in imported), rel
    images = generated_images(3, seed=5)
    expected = [s.image for s in data.generate(3, seed=5)]
    assert [np.asarray(a).tobytes() for a in images] == [np.asarray(b).tobytes() for b in expected]


def test_verification_and_gate_images_come_from_the_one_default(tiny):
    from clipfold.compile.precision.config import GateConfig, QuantConfig
    from clipfold.compile.precision.image_sets import CALIB_SEED, calibration_images, held_out_images
    from clipfold.compile.stages.verify import verification_pixels
    from clipfold.runtime.preprocess import preprocess

    spec = tiny.preprocess
    pixels = verification_pixels(spec, VerifyConfig(random_images=1, generated_images=3, seed=9))
    assert np.array_equal(pixels[1:], preprocess(generated_images(3, 10), spec))
    held = held_out_images(spec, tuple(data.class_names()), GateConfig(images=4, seed=3))
    assert np.array_equal(held.pixels, preprocess(generated_images(4, 3), spec)) and held.targets is None
    calib, source = calibration_images(spec, QuantConfig(calib_images=2))
    assert np.array_equal(calib, preprocess(generated_images(2, CALIB_SEED), spec)) and "2 generated" in source


def test_the_gate_module_measures_and_image_sets_choose():
    own = {n.name for n in _tree("precision/gate.py").body if isinstance(n, ast.FunctionDef)}
    assert {"measure", "failures", "row_cosine"} <= own
    assert not own & {"selection_images", "held_out_images", "calibration_images", "calibration_paths"}
    chosen = {n.name for n in _tree("precision/image_sets.py").body if isinstance(n, ast.FunctionDef)}
    assert {"selection_images", "held_out_images", "calibration_images", "calibration_paths"} <= chosen
