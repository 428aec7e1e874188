"""Every method, end to end: checkpoint or support set -> ``compile_bundle`` -> the torch-free engine,
compared with the method's official formula (the tests' own transcriptions, unfolded, float64).

The per-method test files check the formulas on features; this file checks that what ships — the
exported, folded ONNX graph run by onnxruntime — still equals them on pixels.
"""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipfold.compile.adapters.fit import FitConfig, fit_adapter
from clipfold.compile.adapters.registry import FITTERS, IMPORTERS
from clipfold.compile.config import CompileConfig
from clipfold.compile.pipeline import compile_bundle

from . import test_cocoop, test_coop, test_lora, test_maple, test_taskres, test_tip_f
from .engine_parity import assert_engine_matches
from .test_fit import _write_folder
from .test_gda import _shots


def _compile(tmp_path, labels, method, checkpoint, templates=("{}",), **options):
    return compile_bundle(CompileConfig(labels=labels, out=tmp_path / f"{method}.bundle", adapter=checkpoint,
                                        method=method, method_options=options, templates=templates, top_k=3))


def _unit(model, x):
    return F.normalize(model.encode_image(x).double(), dim=-1)


def test_coop_engine(tiny, tmp_path):
    g = torch.Generator().manual_seed(1)
    ctx = test_coop.word_embeddings(tiny, "a photo of a") + 0.2 * torch.randn(4, 64, generator=g)
    official = test_coop.OfficialCoOp(tiny, test_coop.LABELS, ctx, "middle")
    test_coop.write_dassl_checkpoint(tmp_path / "out", "prompt_learner", {"ctx": ctx})
    result = _compile(tmp_path, test_coop.LABELS, "coop", tmp_path / "out", class_token_position="middle")
    assert result.manifest.head.adapter["options"] == {"class_token_position": "middle"}
    assert_engine_matches(result.path, tiny.preprocess, lambda x: official.logits(tiny.model.encode_image(x)))


def test_cocoop_engine_is_image_conditioned_and_flagged_slow(tiny, tmp_path):
    state = test_cocoop.cocoop_state(tiny)
    test_coop.write_dassl_checkpoint(tmp_path / "out", "prompt_learner", state)
    result = _compile(tmp_path, test_cocoop.LABELS, "cocoop", tmp_path / "out")
    assert result.manifest.head.slow and result.manifest.head.method == "cocoop"
    assert_engine_matches(result.path, tiny.preprocess, lambda x: test_cocoop.official_cocoop_logits(
        tiny, test_cocoop.LABELS, state, tiny.model.encode_image(x)), images=4)


def test_maple_engine_runs_the_prompted_image_tower(tiny, tmp_path):
    state = test_maple.maple_state(tiny, depth=3)
    test_coop.write_dassl_checkpoint(tmp_path / "out", "MultiModalPromptLearner", state, epoch=5)
    test_coop.write_dassl_log(tmp_path / "out", "MAPLE", test_maple.OFFICIAL_CONFIG)  # CTX_INIT "a photo of a"
    result = _compile(tmp_path, test_maple.LABELS, "maple", tmp_path / "out")
    official = test_maple.OfficialMaPLe(tiny, test_maple.LABELS, state, ctx_init="a photo of a")
    assert_engine_matches(result.path, tiny.preprocess, official.logits)


def test_clip_lora_engine_runs_the_merged_encoders(tiny, tmp_path):
    path = tmp_path / "lora_weights.pt"
    weights, _ = test_lora._lora_file(path, copy.deepcopy(tiny.model), "both", "qkvo", r=2, alpha=1)

    def layers_of(m):
        return [("text", b) for b in m.transformer.resblocks] + [("visual", b) for b in m.visual.transformer.resblocks]

    reference = test_lora._reference_model(tiny.model, weights, layers_of, scaling=1 / math.sqrt(2))
    result = _compile(tmp_path, test_lora.LABELS, "clip-lora", path, templates=test_lora.TEMPLATES)
    text = test_lora._ensemble(reference, tiny.tokenizer)
    assert_engine_matches(result.path, tiny.preprocess,
                          lambda x: reference.logit_scale.exp() * _unit(reference, x.double()) @ text.T)


def test_taskres_engine(tiny, tmp_path):
    base, residuals = test_taskres._checkpoint_tensors(classes=len(test_taskres.LABELS))
    path = test_taskres._write_dassl(tmp_path, base, residuals)
    result = _compile(tmp_path, test_taskres.LABELS, "taskres", path, alpha="0.5")
    scale = float(tiny.model.logit_scale.detach().exp())
    assert_engine_matches(result.path, tiny.preprocess, lambda x: test_taskres.official_taskres_logits(
        tiny.model.encode_image(x), base, residuals, 0.5, scale))


def test_tip_adapter_f_engine(tiny, tmp_path):
    path, weight, values = test_tip_f._official_files(tmp_path / "caches", dim=64)
    result = _compile(tmp_path, test_tip_f.LABELS, "tip-adapter-f", path, templates=test_tip_f.TEMPLATES,
                      beta="5.5", alpha="2.0")
    from clipfold.compile.heads.zero_shot import build_zero_shot_head

    text = build_zero_shot_head(tiny.model, tiny.tokenizer, test_tip_f.LABELS, test_tip_f.TEMPLATES).class_embeddings
    assert_engine_matches(result.path, tiny.preprocess, lambda x: test_tip_f.official_tip_f_logits(
        _unit(tiny.model, x), weight.float(), values, text.double().T, 2.0, 5.5))


def test_every_importer_has_an_engine_test():
    tested = {"coop", "cocoop", "maple", "clip-lora", "taskres", "tip-adapter-f"}
    assert set(IMPORTERS) == tested | {"clip-adapter"}  # clip-adapter: tests/test_clip_adapter.py


@pytest.fixture(scope="module")
def support(tmp_path_factory):
    root = tmp_path_factory.mktemp("support")
    return _write_folder(root / "support", _shots(4, 21)), _write_folder(root / "val", _shots(2, 22))


# Fitted methods whose head another test compiles into a bundle's one graph (folded with the image
# tower, as below for the others): here each is added to a copy of a compiled bundle instead (`head
# add` exports the same HeadModule alone), which checks the same per-method math without another
# export of the image tower.
COMPILED_ELSEWHERE = {"gda": "test_fit_then_compile_gives_an_adapted_engine",
                      "tip-adapter": "test_fit_then_compile_gives_an_adapted_engine",
                      "clip-adapter": "test_imported_checkpoint_compiles_to_the_official_formula",
                      "ape": "test_exported_engine_equals_the_official_formula",
                      "taskres": "test_taskres_engine", "tip-adapter-f": "test_tip_adapter_f_engine"}


@pytest.mark.parametrize("method", sorted(FITTERS))
def test_every_fitted_method_ships_as_its_head(tiny, tiny_bundle, support, tmp_path, method):
    """fit -> adapter file -> compile (or head add) -> engine equals the fitted head's unfolded formula."""
    from clipfold.compile.adapters.features import ViewConfig
    from clipfold.compile.heads.add import HeadAddConfig, add_head

    adapter = fit_adapter(FitConfig(method, support[0], tmp_path / "a.safetensors", val=support[1], cache_dir=None,
                                    views=ViewConfig(views=2), templates="label"))
    if method in COMPILED_ELSEWHERE:
        bundle, head = Path(shutil.copytree(tiny_bundle.path, tmp_path / "b")), method
        added = add_head(HeadAddConfig(bundle, method, adapter=tmp_path / "a.safetensors", top_k=2))
        info = added.extra_head(method).head
    else:
        result = compile_bundle(CompileConfig(labels=None, adapter=tmp_path / "a.safetensors", out=tmp_path / "b",
                                              top_k=2))
        bundle, head, info = result.path, None, result.manifest.head
    assert info.method == method == adapter.head.method
    assert_engine_matches(bundle, tiny.preprocess, lambda x: adapter.head.logits(_unit(tiny.model, x).float()),
                          head=head)


def test_the_methods_compiled_elsewhere_are_compiled_there():
    """COMPILED_ELSEWHERE names tests that exist: a rename or removal there fails here."""
    sources = "".join(f.read_text() for f in Path(__file__).parent.glob("test_*.py"))
    assert [t for t in COMPILED_ELSEWHERE.values() if f"def {t}(" not in sources] == []
    assert set(COMPILED_ELSEWHERE) < set(FITTERS)


def test_cli_imports_a_checkpoint_and_bad_ones_write_nothing(tiny, tmp_path):
    from clipfold import errors

    from .cli_run import run_cli as cli

    # in-process: this test is about the command, not the process

    ctx = test_coop.word_embeddings(tiny, "a photo of a")
    test_coop.write_dassl_checkpoint(tmp_path / "out", "prompt_learner", {"ctx": ctx}, epoch=7)
    labels = ",".join(test_coop.LABELS)
    proc = cli("compile", "--adapter", str(tmp_path / "out"), "--method", "coop", "--labels", labels,
               "--set", "class_token_position=front", "--out", str(tmp_path / "coop.bundle"), "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    head = __import__("clipfold.runtime", fromlist=["Engine"]).Engine.open(tmp_path / "coop.bundle").manifest.head
    assert head.method == "coop" and head.adapter["file"] == "model.pth.tar-7"
    assert head.adapter["hyperparameters"]["class_token_position"] == "front"

    proc = cli("compile", "--adapter", str(tmp_path / "out"), "--method", "coop", "--labels", labels,
               "--set", "class_token_position", "--out", str(tmp_path / "x.bundle"))
    assert proc.returncode == 2 and "--set expects KEY=VALUE, got 'class_token_position'" in proc.stderr
    proc = cli("compile", "--adapter", str(tmp_path / "out"), "--method", "coop", "--out", str(tmp_path / "x.bundle"))
    assert proc.returncode != 0 and "compile needs --labels" in proc.stderr

    torch.save({"state_dict": {"prompt": torch.zeros(4, 64)}, "epoch": 1}, tmp_path / "bad.pth.tar")
    with pytest.raises(errors.CheckpointError, match=r"missing keys \['ctx'\].*found \['prompt'\]"):
        _compile(tmp_path / "fail", test_coop.LABELS, "coop", tmp_path / "bad.pth.tar")
    with pytest.raises(errors.CheckpointError, match="width"):
        _compile(tmp_path / "fail", test_coop.LABELS, "coop", test_coop.write_dassl_checkpoint(
            tmp_path / "wide", "prompt_learner", {"ctx": torch.zeros(4, 512)}))
    assert not any((tmp_path / "fail").iterdir())  # no bundle, no partial directory left behind
    assert not (tmp_path / "x.bundle").exists()
