"""A fitted adapter saved to a file, compiled into a bundle, and run by the torch-free engine."""

from __future__ import annotations

import pytest
import torch

from clipfold import errors
from clipfold.compile import tiny as tiny_pkg
from clipfold.compile.adapters.gda import fit_gaussian, gda_head, select_alpha
from clipfold.compile.adapters.store import Adapter, Backbone, load_adapter, save_adapter
from clipfold.compile.config import CompileConfig
from clipfold.compile.heads.zero_shot import build_zero_shot_head
from clipfold.compile.pipeline import compile_bundle
from clipfold.compile.tiny import data
from clipfold.runtime import Engine
from clipfold.runtime.bundle.files import sha256_file

from .cli_run import run_cli
from .test_gda import BACKGROUNDS, _features, _shots

LABELS = tuple(f"{b} background" for b in BACKGROUNDS)


@pytest.fixture(scope="module")
def gda_adapter(tiny, tmp_path_factory):
    zero_shot = build_zero_shot_head(tiny.model, tiny.tokenizer, LABELS, ("a photo on a {}.", "a {}.")).to_head()
    support_f, support_y = _features(tiny, _shots(16, 11))
    val_f, val_y = _features(tiny, _shots(8, 98))
    fit = fit_gaussian(support_f, support_y, len(LABELS))
    alpha, _ = select_alpha(zero_shot, fit, val_f, val_y)
    adapter = Adapter(gda_head(zero_shot, fit, alpha), LABELS,
                      Backbone("clipfold-tiny", sha256_file(tiny_pkg.checkpoint_path())),
                      {"alpha": alpha, "shots": 16})
    return adapter, save_adapter(adapter, tmp_path_factory.mktemp("adapters") / "gda.safetensors")


def test_adapter_file_round_trip(gda_adapter):
    adapter, path = gda_adapter
    loaded = load_adapter(path)
    assert loaded.labels == adapter.labels and loaded.backbone == adapter.backbone
    assert loaded.hyperparameters == adapter.hyperparameters and loaded.head.method == "gda"
    for mine, theirs in zip(adapter.head.linears, loaded.head.linears):
        assert torch.equal(mine.weight, theirs.weight)
        assert (mine.bias is None and theirs.bias is None) or torch.equal(mine.bias, theirs.bias)


def test_cli_compiles_an_adapter_and_the_engine_is_adapted(gda_adapter, tmp_path):
    adapter, path = gda_adapter
    out = tmp_path / "gda.bundle"
    proc = run_cli("compile", "--adapter", path, "--out", out, "--top-k", "2")  # in-process: the command, not the process
    assert proc.returncode == 0, proc.stderr
    engine = Engine.open(out)
    m = engine.manifest
    assert m.labels == LABELS and m.head.method == "gda" and m.head.templates == ()
    assert m.head.adapter["sha256"] == sha256_file(path) and m.head.adapter["hyperparameters"]["shots"] == 16
    assert m.variant().parity.embedding_cosine_min >= 0.99999 and m.variant().parity.topk_agreement == 1.0
    samples = data.generate(200, seed=4244)
    preds = engine.classify([s.image for s in samples], k=1)
    accuracy = sum(p[0].label == f"{s.background} background" for p, s in zip(preds, samples)) / len(samples)
    assert accuracy >= 0.9, accuracy  # zero-shot on this task: about 0.8


def test_adapter_of_another_backbone_is_refused(gda_adapter, tmp_path):
    adapter, _ = gda_adapter
    other = Adapter(adapter.head, adapter.labels, Backbone("clipfold-tiny", "0" * 64))
    path = save_adapter(other, tmp_path / "other.safetensors")
    with pytest.raises(errors.CheckpointError, match=r"fitted on clipfold-tiny \(checkpoint sha256 000000000000.*fit the adapter again"):
        compile_bundle(CompileConfig(labels=LABELS, out=tmp_path / "b.bundle", adapter=path))
    assert not (tmp_path / "b.bundle").exists()


def test_adapter_labels_must_match(gda_adapter, tmp_path):
    _, path = gda_adapter
    with pytest.raises(errors.LabelError, match=r"differ from the adapter's 4 labels \(light background"):
        compile_bundle(CompileConfig(labels=("a", "b", "c", "d"), out=tmp_path / "b.bundle", adapter=path))


def test_a_checkpoint_is_not_an_adapter(tmp_path):
    with pytest.raises(errors.CheckpointError, match="not a clipfold adapter"):
        load_adapter(tiny_pkg.checkpoint_path())
    with pytest.raises(errors.CheckpointError, match="not found"):
        load_adapter(tmp_path / "missing.safetensors")
