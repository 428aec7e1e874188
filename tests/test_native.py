"""fp32-native: the image tower run by clipfold's own C kernel (kernels/vit/_vit.c), checked against
open_clip eager, inside a bundle, and refusing what it cannot run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn

from clipfold import errors
from clipfold.compile.precision.native_variant import build_native_variant, tower_tensors
from clipfold.compile.stages.optimize import keep_class_token_only, use_sdpa_attention
from clipfold.kernels.vit.tower import VitTower, VitWeights, kernel_available, pack_panels
from clipfold.runtime import Engine
from clipfold.runtime.bundle.schema import Manifest

pytestmark = pytest.mark.skipif(not kernel_available(), reason="the ViT kernel needs x86-64 with AVX2 and FMA")


def _vit(**overrides) -> VisionTransformer:
    """A small random open_clip ViT whose sizes hit every edge of the kernel's tiling: width 40 and
    output 20 are not multiples of the 24-column panels, 17 tokens not a multiple of the 4-row strips."""
    args = dict(image_size=24, patch_size=6, width=40, layers=2, heads=5, mlp_ratio=3.0, output_dim=20)
    args.update(overrides)
    torch.manual_seed(0)
    vit = VisionTransformer(**args).eval()
    with torch.no_grad():  # non-trivial LayerNorm affines, biases (q, k and v too) and per-channel layer scales
        for name, param in vit.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
            elif name.endswith("gamma") or (name.endswith("weight") and param.dim() == 1):
                param.normal_(1, 0.2)
    return vit


def _eager(vit: nn.Module, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return F.normalize(vit(torch.from_numpy(pixels).float()), dim=-1).numpy()


def _pixels(batch: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, 3, size, size), dtype=np.uint8)


CASES = {
    "gelu": {},
    "quick_gelu+layer_scale": dict(act_layer=QuickGELU, ls_init_value=0.5),
    "no_ln_pre": dict(no_ln_pre=True),
    "sdpa+class_token_block": {},
    "head_dim_9": dict(width=36, heads=4),  # head width not a multiple of 8
    "head_dim_65+non_square": dict(width=130, heads=2, image_size=(24, 30)),  # > 64, and a 4 x 5 grid
}


@pytest.mark.parametrize("variant", list(CASES))
def test_kernel_matches_open_clip_eager(variant):
    overrides = CASES[variant]
    vit = _vit(**overrides)
    reference_vit = _vit(**overrides)  # the eager reference stays the plain module
    if variant == "sdpa+class_token_block":  # the compile pipeline's rewrites, read back by the packer
        use_sdpa_attention(vit)
        assert keep_class_token_only(vit)
    weights = tower_tensors(vit)
    assert weights.config["act"] == (1 if "quick" in variant else 0)
    assert weights.config["ln_pre"] == (0 if variant == "no_ln_pre" else 1)
    size = overrides.get("image_size", (24, 24))
    for batch in (1, 3, 7):  # 7 class tokens span two 4-row strips
        pixels = np.random.default_rng(batch).integers(0, 256, (batch, 3, *size), dtype=np.uint8)
        expected = _eager(reference_vit, pixels)
        for threads in (1, 2, 5):  # 5: more threads than some stages have work items
            got = VitTower(weights, threads).embed(pixels)
            assert got.shape == expected.shape
            assert np.abs(got - expected).max() < 2e-6, (batch, threads, np.abs(got - expected).max())


def test_panels_hold_the_weight_columns_in_order():
    w = np.arange(5 * 30, dtype=np.float32).reshape(5, 30)
    packed = pack_panels(w).reshape(2, 5, 24)
    assert np.array_equal(packed[0], w[:, :24])
    assert np.array_equal(packed[1, :, :6], w[:, 24:]) and not packed[1, :, 6:].any()


def test_weights_round_trip_and_refuse_a_damaged_folder(tmp_path):
    weights = tower_tensors(_vit())
    weights.save(tmp_path / "native")
    loaded = VitWeights.load(tmp_path / "native")
    assert loaded.config == weights.config and np.array_equal(loaded.weights, weights.weights)
    assert loaded.weights.ctypes.data % 64 == 0
    pixels = _pixels(2, 24)
    assert np.array_equal(VitTower(loaded, 2).embed(pixels), VitTower(weights, 2).embed(pixels))
    with open(tmp_path / "native" / "vit.bin", "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(errors.BundleError, match="vit.bin holds 1000 bytes"):
        VitWeights.load(tmp_path / "native")
    meta = json.loads((tmp_path / "native" / "vit.json").read_text())
    for broken, named in (({**meta, "version": 99}, "not a clipfold-vit v1"), ({**meta, "eps": -1}, "eps"),
                          ({k: v for k, v in meta.items() if k != "config"}, "needs a 'config' object"),
                          ({**meta, "config": {**meta["config"], "heads": 3}}, "width a multiple of heads")):
        (tmp_path / "native" / "vit.json").write_text(json.dumps(broken))
        with pytest.raises(errors.BundleError, match=named):
            VitWeights.load(tmp_path / "native")


def test_bad_pixels_are_named():
    tower = VitTower(tower_tensors(_vit()), 1)
    with pytest.raises(errors.ConfigError, match=r"uint8 \(batch, 3, 24, 24\); got float32"):
        tower.embed(_pixels(1, 24).astype(np.float32))
    with pytest.raises(errors.ConfigError, match=r"got uint8 \(1, 3, 32, 32\)"):
        tower.embed(_pixels(1, 32))
    for threads in (0, 65):
        with pytest.raises(errors.ConfigError, match=f"threads must be between 1 and 64, got {threads}"):
            VitTower(tower.weights, threads)


@pytest.mark.parametrize("overrides, named", [
    (dict(pool_type="avg"), "pool_type 'avg'"),
    (dict(attentional_pool=True, attn_pooler_heads=5), "attentional pooling"),
    (dict(final_ln_after_pool=True), "final_ln_after_pool"),
    (dict(act_layer=nn.ReLU), "unsupported MLP activation ReLU"),
    (dict(image_size=26), "image size 26x26 is not a multiple of the patch 6"),
])
def test_unsupported_towers_are_refused_by_name(overrides, named):
    with pytest.raises(errors.ExportError, match=named):
        tower_tensors(_vit(**overrides))


def test_a_non_vit_tower_is_refused():
    with pytest.raises(errors.ExportError, match="VisionTransformer only; this tower is Sequential"):
        tower_tensors(nn.Sequential(nn.Conv2d(3, 8, 3)))


def test_an_image_conditioned_head_is_refused(tmp_path):
    with pytest.raises(errors.ExportError, match="image-conditioned head"):
        build_native_variant(_vit(), None, tmp_path, (), (), 3, None, None, None, 18)
    assert not (tmp_path / "native").exists()


@pytest.fixture(scope="module")
def native_bundle(tiny_native_bundle):
    return tiny_native_bundle  # compiled once per session (conftest.py)


def test_bundle_variant_runs_natively_and_equals_fp32(native_bundle, tiny_labels):
    manifest = Manifest.read(native_bundle.path)
    native = manifest.variant("fp32-native")
    assert (native.format, native.backends, native.precision) == ("clipfold-vit", ("native",), "fp32")
    assert {"native/vit.json", "native/vit.bin", "native/head.onnx"} <= set(manifest.files)
    assert native.parity.embedding_cosine_min > 0.99999 and native.parity.topk_agreement == 1.0
    engine = Engine.open(native_bundle.path, variant="fp32-native")  # its own backend by default
    assert engine.backend.name == "native"
    reference = Engine.open(native_bundle.path)
    pixels = _pixels(5, 64, seed=7)
    got, want = engine.run_pixels(pixels), reference.run_pixels(pixels)
    assert np.array_equal(got["indices"], want["indices"])
    assert np.abs(got["scores"] - want["scores"]).max() < 1e-5
    assert np.abs(got["embedding"] - want["embedding"]).max() < 1e-5


def test_an_index_built_by_the_native_variant(native_bundle, tmp_path):
    from PIL import Image

    from clipfold.runtime.retrieval.index import Index, build_index, bundle_identity

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(_pixels(1, 64, seed=i)[0].transpose(1, 2, 0)).save(folder / f"{i}.png")
    native = Engine.open(native_bundle.path, variant="fp32-native")
    fp32 = Engine.open(native_bundle.path)
    assert bundle_identity(native)["sha256"] != bundle_identity(fp32)["sha256"]
    index = build_index(native, folder, tmp_path / "photos.index")
    hits = Index.open(tmp_path / "photos.index").search(native, image=folder / "1.png", k=1).hits
    assert hits[0].path == "1.png" and hits[0].score > 0.9999
    with pytest.raises(errors.BundleError):
        index.search(fp32, image=folder / "1.png", k=1)


def test_bundle_variant_refuses_another_backend_and_a_corrupt_file(native_bundle, tmp_path):
    with pytest.raises(errors.BackendUnavailableError, match=r"runs on \['native'\], not on 'onnxruntime'"):
        Engine.open(native_bundle.path, variant="fp32-native", backend="onnxruntime")
    import shutil

    copy = tmp_path / "copy.bundle"
    shutil.copytree(native_bundle.path, copy)
    data = bytearray((copy / "native" / "vit.bin").read_bytes())
    data[100] ^= 0xFF
    (copy / "native" / "vit.bin").write_bytes(bytes(data))
    with pytest.raises(errors.ChecksumError, match="native/vit.bin"):
        Engine.open(copy, variant="fp32-native")


def test_kernel_scored_head_bundle(tiny_kernel_head_bundle):
    """A bundle whose head the top-k kernel scores: the native folder holds no head graph, and the
    native tower's embedding feeds the kernel head exactly as the ONNX graph's does."""
    result = tiny_kernel_head_bundle
    assert not (result.path / "native" / "head.onnx").exists()
    pixels = _pixels(3, 64, seed=3)
    got = Engine.open(result.path, variant="fp32-native").run_pixels(pixels)
    want = Engine.open(result.path).run_pixels(pixels)
    assert np.array_equal(got["indices"], want["indices"])
    assert np.abs(got["scores"] - want["scores"]).max() < 1e-5


def test_cli_compiles_inspects_and_profiles_the_native_variant(tmp_path, capsys):
    from clipfold import cli
    from clipfold.compile.profiling.run import ProfileConfig, profile

    out = tmp_path / "cli.bundle"
    assert cli.main(["compile", "--labels", "red circle,green square,blue star", "--out", str(out),
                     "--precision", "fp32-native", "--top-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert "fp32-native parity vs open_clip eager (16 images): cosine min 1.00000" in printed
    assert cli.main(["inspect", str(out)]) == 0
    assert "fp32-native: native (fp32, native)" in capsys.readouterr().out
    rows = {r.variant: r for r in profile(ProfileConfig(bundles=(out,), batches=(1,), rounds=3, images=8, eager=False))}
    native = rows["fp32-native"]
    assert (native.status, native.backend, rows["fp32"].backend) == ("ok", "native", "onnxruntime")
    assert native.file_mb > 1.0  # the folder's files, not the directory entry
    assert native.agreement == 1.0 and native.latency_ms["1"]["p50"] > 0
