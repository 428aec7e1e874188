"""int8-static calibrates one image at a time with MinMax (issue 24, item 6: ORT's calibration graph keeps a
batch's activations alive until its ReduceMin/Max nodes run; ViT-L-14 at 8 images peaked 8 GiB higher),
and the quantized graph is byte-identical to the one calibrated 8 images at a time (a min of minimums)."""

from __future__ import annotations

import filecmp
import json

import pytest

from clipfold import errors
from clipfold.compile import pipeline
from clipfold.compile.config import CompileConfig
from clipfold.compile.precision import quantize
from clipfold.compile.precision.config import QuantConfig
from clipfold.compile.precision.image_sets import calibration_images


def test_minmax_calibration_runs_one_image_at_a_time_and_changes_nothing(tiny_bundle, tmp_path, monkeypatch):
    src = tmp_path / "unpacked.onnx"
    always = quantize.prepare(tiny_bundle.path / tiny_bundle.manifest.variant("fp32").file, src, unpack=True)
    calib, _ = calibration_images(tiny_bundle.manifest.preprocess, QuantConfig())
    batches, reader = [], quantize.PixelReader

    def recording(pixels, batch=8):
        r = reader(pixels, batch)
        batches.extend(len(b) for b in r.batches)
        return r

    monkeypatch.setattr(quantize, "PixelReader", recording)
    quantize.int8_static(src, tmp_path / "one.onnx", always, QuantConfig(), calib, tmp_path / "one.json")
    assert batches == [1] * len(calib)

    monkeypatch.setattr(quantize, "PixelReader", lambda pixels, batch=8: reader(pixels, 8))
    quantize.int8_static(src, tmp_path / "eight.onnx", always, QuantConfig(), calib, tmp_path / "eight.json")
    assert json.loads((tmp_path / "one.json").read_text()) == json.loads((tmp_path / "eight.json").read_text())
    assert filecmp.cmp(tmp_path / "one.onnx", tmp_path / "eight.onnx", shallow=False)

    batches.clear()  # the histogram methods keep 8: their ranges depend on the batching
    monkeypatch.setattr(quantize, "PixelReader", recording)
    quantize.int8_static(src, tmp_path / "entropy.onnx", always, QuantConfig(calibration="entropy"), calib,
                         tmp_path / "entropy.json")
    assert max(batches) == 8


def test_int8_static_is_one_file_equal_to_quantizing_in_memory(tiny_bundle, tmp_path):
    """ORT writes its calibration graph and the result with external data (lean); the variant is re-embedded."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src = tmp_path / "unpacked.onnx"
    always = quantize.prepare(tiny_bundle.path / tiny_bundle.manifest.variant("fp32").file, src, unpack=True)
    calib, _ = calibration_images(tiny_bundle.manifest.preprocess, QuantConfig())
    quantize.int8_static(src, tmp_path / "q.onnx", always, QuantConfig(), calib, tmp_path / "r.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "r.json", "unpacked.onnx"]
    # the same options in memory, as before (one file, no external data)
    quantize_static(src, tmp_path / "m.onnx", quantize.PixelReader(calib, 8), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Conv", "Gemm"], per_channel=False, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8, nodes_to_exclude=always,
                    calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=tmp_path / "r.json",
                    extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True, "ActivationSymmetric": False,
                                   "CalibMovingAverage": False, "QuantizeBias": True})
    a, b = onnx.load(str(tmp_path / "q.onnx")), onnx.load(str(tmp_path / "m.onnx"))
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    assert {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in a.graph.initializer} == \
        {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in b.graph.initializer}
    run = [ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]) for f in ("q.onnx", "m.onnx")]
    out = [r.run(None, {"pixels": calib[:4]}) for r in run]
    assert all(np.array_equal(x, y) for x, y in zip(*out))


def test_a_graph_over_2_gb_is_refused_in_one_line_before_quantizing(tiny_bundle, tmp_path, monkeypatch):
    """ViT-H-14's fp32 graph is 3.1 GB with its weights: the quantizers' single-file graphs cannot hold it."""
    import onnx
    import pytest

    from clipfold.errors import ExportError

    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", 10_000)  # stands for 2 GB
    with pytest.raises(ExportError, match=r"one file under 2 GB; model.onnx with its weights is .* drop --precision") as info:
        quantize.prepare(tiny_bundle.path / tiny_bundle.manifest.variant("fp32").file, tmp_path / "f.onnx", unpack=False)
    assert "\n" not in str(info.value) and not (tmp_path / "f.onnx").exists()


def test_a_tower_too_large_for_one_file_is_refused_before_any_export(monkeypatch, tmp_path):
    """ViT-H-14's int8 was refused only after the whole fp32 build (its 2.5 GB of weights pass the
    quantizers' single-file limit): the check now runs right after the model loads."""
    exported = []
    monkeypatch.setattr(quantize, "SINGLE_FILE_BYTES", 1000)  # the tiny tower's weights pass 1 kB
    monkeypatch.setattr(pipeline, "export_onnx", lambda *a, **k: exported.append(a))
    config = CompileConfig(labels=("cat", "dog"), out=tmp_path / "b.bundle", precisions=("fp32", "int8-dynamic"))
    with pytest.raises(errors.ExportError, match="int8-dynamic need the fp32 graph as one file under 2 GB"):
        pipeline.compile_bundle(config)
    assert exported == [] and not (tmp_path / "b.bundle").exists()
    quantize.check_single_file(("fp32", "fp32-native", "bf16"), 10**10)  # nothing rebuilt: nothing refused
