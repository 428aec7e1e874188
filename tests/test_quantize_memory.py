"""int8-static calibrates one image at a time with MinMax (issue 24, item 6: ORT's calibration graph keeps a
batch's activations alive until its ReduceMin/Max nodes run; ViT-L-14 at 8 images peaked 8 GiB higher),
and the quantized graph is byte-identical to the one calibrated 8 images at a time (a min of minimums)."""

from __future__ import annotations

import filecmp
import json

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
