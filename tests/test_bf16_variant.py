"""The bf16 variant: OpenVINO's bf16 inference of the fp32 graph, gated, and refused where the CPU has no bf16."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clipfold import errors
from clipfold.compile.config import CompileConfig
from clipfold.compile.pipeline import compile_bundle
from clipfold.compile.precision.config import GateConfig
from clipfold.compile.precision.image_sets import held_out_images
from clipfold.runtime import Engine
from clipfold.runtime.preprocess import preprocess

ov_backend = pytest.importorskip("clipfold.runtime.backends.openvino")
pytest.importorskip("openvino")
needs_bf16 = pytest.mark.skipif(ov_backend.bf16_refusal() is not None,
                                reason="this CPU has no native bf16 (the refusal is tested below)")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def bf16_bundle(gda_task):
    if ov_backend.bf16_refusal() is not None:
        pytest.skip("this CPU has no native bf16")
    tmp, adapter, test = gda_task
    return compile_bundle(CompileConfig(labels=None, adapter=adapter, out=tmp / "bf16.bundle",
                                        precisions=("fp32", "bf16"), gate=GateConfig(data=test))), test


@needs_bf16
def test_bf16_is_the_fp32_graph_gated_under_openvino_bf16(bf16_bundle):
    result, test = bf16_bundle
    manifest = result.manifest
    bf16, fp32 = manifest.variant("bf16"), manifest.variant("fp32")
    assert bf16.file == fp32.file and bf16.backends == ("openvino",) and bf16.precision == "bf16"
    assert bf16.gate is not None and bf16.gate.images == len(list(test.rglob("*.png")))
    assert bf16.gate.embedding_cosine_min >= 0.99 and bf16.gate.top1_agreement >= 0.99

    engine = Engine.open(result.path, variant="bf16")
    assert engine.backend.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "bf16"
    # Independently of the gate code: the held-out images through both engines, compared here.
    pixels = held_out_images(manifest.preprocess, manifest.labels, GateConfig(data=test)).pixels
    fp32_out = Engine.open(result.path).run_pixels(pixels)
    bf16_out = engine.run_pixels(pixels)
    cos = _cosines(fp32_out["embedding"], bf16_out["embedding"])
    assert cos.min() == pytest.approx(bf16.gate.embedding_cosine_min, abs=1e-6)
    # bf16 really ran (8-bit mantissa inputs): not bit-identical to fp32, yet close.
    assert 0.999 < cos.min() < 1.0 - 1e-9
    assert np.mean(fp32_out["indices"][:, 0] == bf16_out["indices"][:, 0]) >= 0.99


@needs_bf16
def test_fp32_on_openvino_stays_fp32(bf16_bundle):
    """OpenVINO's own default on an AMX CPU is bf16: the fp32 variant must not run that way."""
    result, test = bf16_bundle
    engine = Engine.open(result.path, variant="fp32", backend="openvino")
    assert engine.backend.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    pixels = held_out_images(result.manifest.preprocess, result.manifest.labels, GateConfig(data=test)).pixels[:16]
    ort = Engine.open(result.path).run_pixels(pixels)["embedding"]
    assert _cosines(ort, engine.run_pixels(pixels)["embedding"]).min() > 1 - 1e-6


@needs_bf16
def test_bf16_gate_misses_are_refused(gda_task, tmp_path):
    _, adapter, test = gda_task
    with pytest.raises(errors.GateError, match=r"(?s)'bf16' misses .*min embedding cosine 0\.9\d+ < 1\.0"):
        compile_bundle(CompileConfig(labels=None, adapter=adapter, out=tmp_path / "b", precisions=("fp32", "bf16"),
                                     gate=GateConfig(data=test, min_cosine=1.0)))
    assert not (tmp_path / "b").exists()


def test_bf16_is_refused_without_native_bf16(gda_task, tmp_path, monkeypatch):
    """Forced: OpenVINO's CPU plugin reports no BF16 (an AVX2-only CPU)."""
    _, adapter, _ = gda_task
    monkeypatch.setattr(ov_backend, "cpu_capabilities", lambda: ("FP32", "FP16", "INT8"))
    reason = ov_backend.bf16_refusal()
    assert reason is not None and "AVX512-BF16 or AMX" in reason and "FP32, FP16, INT8" in reason
    with pytest.raises(errors.BackendUnavailableError, match=r"bf16 needs a CPU with native bfloat16"):
        compile_bundle(CompileConfig(labels=None, adapter=adapter, out=tmp_path / "b", precisions=("fp32", "bf16")))
    assert not (tmp_path / "b").exists()


def test_a_bf16_bundle_is_refused_at_open_without_native_bf16(bf16_bundle, monkeypatch):
    result, _ = bf16_bundle
    monkeypatch.setattr(ov_backend, "cpu_capabilities", lambda: ("FP32", "INT8"))
    with pytest.raises(errors.BackendUnavailableError, match=r"bf16 needs a CPU with native bfloat16"):
        Engine.open(result.path, variant="bf16")
    image = preprocess([Image.new("RGB", (32, 32))], result.manifest.preprocess)
    assert Engine.open(result.path).run_pixels(image)["embedding"].shape[0] == 1  # fp32 still opens
