"""`clipfold fit` on a support folder, then `compile --adapter`: an adapted engine end to end."""

from __future__ import annotations

import pytest
import torch

from clipfold import errors
from clipfold.compile.adapters.features import ViewConfig
from clipfold.compile.adapters.fit import FitConfig, fit_adapter
from clipfold.compile.tiny import data
from clipfold.compile.tiny.samples import write_background_folder
from clipfold.runtime import Engine
from clipfold.runtime.image_folders import evaluate_folder, read_folder

from .cli_run import run_cli
from .test_gda import BACKGROUNDS, _shots

_write_folder = write_background_folder


@pytest.fixture(scope="module")
def support(tmp_path_factory):
    return _write_folder(tmp_path_factory.mktemp("support"), _shots(12, 11))


_cli = run_cli  # in-process (no torch re-import per run); these tests are about the commands, not the process


@pytest.fixture(scope="module")
def test_folder(tmp_path_factory):
    return _write_folder(tmp_path_factory.mktemp("test"), data.generate(400, seed=4245))


def _accuracy(bundle, folder):
    return evaluate_folder(Engine.open(bundle), folder).top1


@pytest.fixture(scope="module")
def zero_shot_accuracy(support, test_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zs")
    labels = ",".join(sorted(f"{b} background" for b in BACKGROUNDS))
    proc = _cli("compile", "--labels", labels, "--templates", str(_templates(tmp)), "--out", str(tmp / "zs.bundle"))
    assert proc.returncode == 0, proc.stderr
    return _accuracy(tmp / "zs.bundle", test_folder)


# Measured with 12 shots (400 images): zero-shot 0.7575, GDA 0.9525, Tip-Adapter 0.8350.
@pytest.mark.parametrize("method, gain", [("gda", 0.10), ("tip-adapter", 0.03)])
def test_fit_then_compile_gives_an_adapted_engine(support, test_folder, tmp_path, zero_shot_accuracy, method, gain):
    adapter = tmp_path / f"{method}.safetensors"
    proc = _cli("fit", method, "--support", str(support), "--out", str(adapter),
                "--templates", str(_templates(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert "held-out support" in proc.stdout
    proc = _cli("compile", "--adapter", str(adapter), "--out", str(tmp_path / "b.bundle"), "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    engine = Engine.open(tmp_path / "b.bundle")
    assert engine.manifest.head.method == method
    assert engine.manifest.head.adapter["hyperparameters"]["selected_on"] == "held-out support"
    accuracy = _accuracy(tmp_path / "b.bundle", test_folder)
    proc = _cli("evaluate", str(tmp_path / "b.bundle"), str(test_folder))
    assert proc.returncode == 0 and f"top-1 {accuracy:.1%}" in proc.stdout, proc.stdout + proc.stderr
    assert accuracy >= zero_shot_accuracy + gain, (zero_shot_accuracy, accuracy)


def _templates(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a photo on a {}.\na {}.\n")
    return path


def test_read_folder_orders_classes_and_takes_shots(support):
    labels, paths, targets = read_folder(support, shots=3)
    assert labels == tuple(sorted(f"{b} background" for b in BACKGROUNDS))
    assert len(paths) == 12 and targets == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3


def test_bad_support_folders(tmp_path, support):
    one = _write_folder(tmp_path / "one", [s for s in _shots(2, 3) if s.background == "dark"])
    with pytest.raises(errors.ConfigError, match=r"1 class sub-folder\(s\) \['dark background'\]; a classifier needs at least 2"):
        read_folder(one)
    empty = _write_folder(tmp_path / "empty", _shots(1, 3))
    (empty / "zzz").mkdir()
    with pytest.raises(errors.ConfigError, match=r"zzz holds no images"):
        read_folder(empty)
    with pytest.raises(errors.ConfigError, match=r"has 12 images but 20 shots were requested"):
        read_folder(support, shots=20)
    with pytest.raises(errors.ConfigError, match="not found"):
        read_folder(tmp_path / "nothing")


def test_unreadable_support_image_is_named(tmp_path):
    root = _write_folder(tmp_path / "s", _shots(2, 3))
    bad = root / "dark background" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(errors.ImageError, match=r"broken\.png"):
        fit_adapter(FitConfig("gda", root, tmp_path / "a.safetensors"))
    assert not (tmp_path / "a.safetensors").exists()


def test_random_weights_cannot_be_adapted(tmp_path, support):
    with pytest.raises(errors.CheckpointError, match="random weights here; adapters need fixed weights"):
        fit_adapter(FitConfig("gda", support, tmp_path / "a.safetensors", model="RN50", shots=1))


def test_evaluate_refuses_classes_the_bundle_does_not_know(tiny_bundle, test_folder):
    with pytest.raises(errors.ConfigError, match=r"classes \['dark background'.*the bundle does not know"):
        evaluate_folder(Engine.open(tiny_bundle.path), test_folder)


def test_features_are_cached_by_model_and_file_with_augmented_views(support, tmp_path):
    from clipfold.compile.adapters.features import FeatureCache, ViewConfig
    from clipfold.compile.stages.load import load_model

    loaded = load_model("clipfold-tiny")
    _, paths, _ = read_folder(support, shots=2)
    cache = FeatureCache(loaded, loaded.info.checkpoint_sha256, ViewConfig(views=3, seed=1), tmp_path / "cache")
    first = cache.encode(paths)
    assert first.shape == (3, len(paths), 64) and (cache.hits, cache.misses) == (0, len(paths))
    assert torch.allclose(first.norm(dim=-1), torch.ones(3, len(paths)), atol=1e-5)
    assert (first[1] - first[0]).abs().max() > 1e-3 and (first[2] - first[1]).abs().max() > 1e-3  # views differ
    again = FeatureCache(loaded, loaded.info.checkpoint_sha256, ViewConfig(views=3, seed=1), tmp_path / "cache")
    second = again.encode(list(reversed(paths)))  # keyed by content, not by position
    assert (again.hits, again.misses) == (len(paths), 0) and torch.equal(second, first.flip(1))
    fresh = FeatureCache(loaded, loaded.info.checkpoint_sha256, ViewConfig(views=3, seed=1), None).encode(paths)
    assert torch.allclose(fresh, first, atol=1e-6)  # augmentation is a function of the file and the seed
    plain = encode_images_plain(loaded, paths)
    assert torch.allclose(first[0], plain, atol=1e-6)  # view 0 is exactly what the runtime feeds the engine


def encode_images_plain(loaded, paths):
    from clipfold.compile.stages.verify import encode_pixels
    from clipfold.runtime.images import load_image
    from clipfold.runtime.preprocess import preprocess

    return encode_pixels(loaded.model, loaded.preprocess, preprocess([load_image(p) for p in paths], loaded.preprocess))


def test_a_second_fit_encodes_nothing_and_every_fitter_runs_from_the_cli(support, tmp_path):
    cache = tmp_path / "cache"
    args = ("--support", str(support), "--shots", "4", "--views", "2", "--cache-dir", str(cache),
            "--templates", str(_templates(tmp_path)))
    proc = _cli("fit", "ape", *args, "--out", str(tmp_path / "ape.safetensors"))
    assert proc.returncode == 0, proc.stderr
    assert "encoding 16 images x 2 views (0 cached)" in proc.stderr
    proc = _cli("fit", "clip-adapter", *args, "--out", str(tmp_path / "ca.safetensors"))
    assert proc.returncode == 0, proc.stderr
    assert "encoding" not in proc.stderr and "'cached_features': 16" in proc.stdout
    proc = _cli("fit", "nope", *args, "--out", str(tmp_path / "x.safetensors"))
    assert proc.returncode != 0 and "invalid choice: 'nope'" in proc.stderr


def test_every_method_refits_on_all_shots_after_a_held_out_choice():
    from clipfold.compile.adapters import registry

    assert set(registry.REFITTERS) == set(registry.FITTERS)
    for method in registry.FITTERS:
        assert callable(registry.refitter(method))


def test_proker_refit_is_the_closed_form_on_every_shot(support, tmp_path):
    """Values chosen on a held-out quarter, then trainers/proker.py's closed form on every shot's augmented
    views: alpha_i = solve(K / lambda + I, Y - vecs @ clip_weights) with the chosen beta and lambda."""
    out = tmp_path / "proker.safetensors"
    adapter = fit_adapter(FitConfig("proker", support, out, shots=4, views=ViewConfig(views=3), cache_dir=None,
                                    templates=("a photo on a {}.", "a {}.")))
    hp = adapter.hyperparameters
    assert hp["selected_on"] == "held-out support" and hp["refit_on_all_shots"]
    cache = adapter.head.caches[0]
    assert cache.keys.shape[0] == 4 * 4 * 2  # 4 classes x 4 shots x 2 augmented views, not 3 of the 4 shots
    vecs, clip_weights = cache.keys.double(), adapter.head.linears[0].weight.double().T
    labels = torch.arange(4).repeat_interleave(4).repeat(2)  # read_folder's class-sorted order, pass by pass
    kernel = (-hp["beta"] * (1 - vecs @ vecs.T)).exp()
    official = torch.linalg.solve(kernel / hp["lmbda"] + torch.eye(len(vecs), dtype=torch.float64),
                                  torch.nn.functional.one_hot(labels).double() - vecs @ clip_weights)
    assert (cache.values.double() - official).abs().max() <= 1e-4 * official.abs().max()


def test_fit_options_reach_the_method_and_unknown_ones_are_refused(support, tmp_path):
    """`clipfold fit --set`: a dataset's official search range (Tip-Adapter's configs/*.yaml search_scale)."""
    out = tmp_path / "tip.safetensors"
    proc = _cli("fit", "tip-adapter", "--support", str(support), "--out", str(out), "--shots", "4", "--views", "2",
                "--no-cache", "--templates", str(_templates(tmp_path)), "--set", "search_scale=3,2",
                "--set", "search_step=20,5")
    assert proc.returncode == 0, proc.stderr
    from clipfold.compile.adapters.store import load_adapter

    hp = load_adapter(out).hyperparameters
    assert hp["search_scale"] == [3.0, 2.0] and hp["search_step"] == [20, 5] and hp["options"]["search_scale"] == "3,2"
    assert 0.1 <= hp["beta"] < 3.0 and 0.1 <= hp["alpha"] < 2.0
    with pytest.raises(errors.ConfigError, match=r"tip-adapter has no option feat_num; it takes search_scale, search_step"):
        FitConfig("tip-adapter", support, out, options={"feat_num": "5"})
