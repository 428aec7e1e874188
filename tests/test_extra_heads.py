"""Swappable heads: one bundle, several heads over its image tower, selected by name at runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clipfold import errors
from clipfold.compile.adapters.fit import FitConfig, fit_adapter
from clipfold.compile.heads.add import HeadAddConfig, add_head
from clipfold.runtime import Engine
from clipfold.runtime.bundle.schema import SCHEMA_VERSION

from .cli_run import run_cli
from .engine_parity import assert_topk_matches, normalized_pixels
from .test_fit import _write_folder
from .test_gda import BACKGROUNDS, _shots

BG = tuple(sorted(f"{b} background" for b in BACKGROUNDS))
TEMPLATES = ("a photo on a {}.", "a {}.")


@pytest.fixture(scope="module")
def bundle(tiny_bundle, tmp_path_factory):
    """The session's tiny bundle (conftest.py), copied: these tests add heads to it."""
    return Path(shutil.copytree(tiny_bundle.path, tmp_path_factory.mktemp("heads") / "multi.bundle"))


@pytest.fixture(scope="module")
def gda_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gda")
    support = _write_folder(tmp / "support", _shots(6, 11))
    path = tmp / "gda.safetensors"
    fit_adapter(FitConfig("gda", support, path, templates=TEMPLATES, cache_dir=None))
    return path


def test_heads_are_added_without_touching_the_backbone_and_selected_by_name(tiny, bundle, gda_file):
    fused = (bundle / "model.onnx").read_bytes()
    add_head(HeadAddConfig(bundle, "backgrounds", labels=BG, templates=TEMPLATES, top_k=2))
    manifest = add_head(HeadAddConfig(bundle, "gda", adapter=gda_file, top_k=3))
    assert (bundle / "model.onnx").read_bytes() == fused  # the image tower was not re-exported
    assert [h.name for h in manifest.heads] == ["backgrounds", "gda"] and manifest.schema_version == SCHEMA_VERSION
    assert manifest.extra_head("gda").head.method == "gda" and manifest.extra_head("gda").parity.topk_agreement == 1.0

    from clipfold.compile.adapters.store import load_adapter

    head = load_adapter(gda_file).head
    engine = Engine.open(bundle, head="gda")
    assert engine.labels == BG and engine.max_k == 3
    pixels = np.stack([np.asarray(s.image.resize((64, 64))).transpose(2, 0, 1) for s in _shots(3, 77)])
    out = engine.run_pixels(pixels)
    with torch.no_grad():
        f = torch.nn.functional.normalize(tiny.model.encode_image(normalized_pixels(pixels, tiny.preprocess)), dim=-1)
        reference = head.scores(f.double().float()).double()
    assert_topk_matches(out["scores"], out["indices"], reference)
    default = Engine.open(bundle)  # the fused head is untouched and still the default
    assert default.labels != BG and default.classify(pixels_to_images(pixels), k=1)


def pixels_to_images(pixels):
    from PIL import Image

    return [Image.fromarray(p.transpose(1, 2, 0)) for p in pixels]


def test_replace_and_refusals(bundle, gda_file, tmp_path, random_bundle):
    add_head(HeadAddConfig(bundle, "bg2", labels=BG, templates=TEMPLATES))
    old = Engine.open(bundle, head="bg2").head.file
    with pytest.raises(errors.BundleError, match="already has a head 'bg2'; pass --overwrite"):
        add_head(HeadAddConfig(bundle, "bg2", labels=BG, templates=("{}",)))
    manifest = add_head(HeadAddConfig(bundle, "bg2", labels=BG, templates=("{}",), replace=True))
    new = manifest.extra_head("bg2").file
    assert new != old and not (bundle / old).exists() and (bundle / new).exists()
    with pytest.raises(errors.ConfigError, match="changes the image or text encoder.*clipfold compile"):
        HeadAddConfig(bundle, "lora", adapter=gda_file, method="clip-lora", labels=BG)
    with pytest.raises(errors.ConfigError, match="must be 1-64 letters"):
        HeadAddConfig(bundle, "default", labels=BG)
    with pytest.raises(errors.BundleError, match=r"no head 'nope'; it has \['default'"):
        Engine.open(bundle, head="nope")
    # A random-weight RN50 bundle (the session's, conftest.py random_bundle), copied: the refusal must write nothing.
    other = Path(shutil.copytree(random_bundle("RN50").path, tmp_path / "rn.bundle"))
    with pytest.raises(errors.CheckpointError, match="adapters need a backbone with fixed weights"):
        add_head(HeadAddConfig(other, "gda", adapter=gda_file))
    assert not (other / "heads").exists() or not any((other / "heads").iterdir())


def test_cli_head_add_classify_and_inspect(bundle, tmp_path):
    cli = run_cli  # in-process: this test is about the commands, not the process

    proc = cli("head", "add", str(bundle), "--name", "cli-bg", "--labels", ",".join(BG), "--templates", "label",
               "--top-k", "2")
    assert proc.returncode == 0 and "added head 'cli-bg'" in proc.stdout, proc.stderr
    image = tmp_path / "x.png"
    _shots(1, 5)[0].image.save(image)
    proc = cli("classify", str(bundle), str(image), "--head", "cli-bg", "--k", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert {p["label"] for p in json.loads(proc.stdout)[0]["predictions"]} <= set(BG)
    proc = cli("inspect", str(bundle))
    assert proc.returncode == 0 and "head +      cli-bg: zero-shot, 4 labels, top-2" in proc.stdout
