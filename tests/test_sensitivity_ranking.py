"""The int8 sensitivity ranking streams its images (issue 24, item 6: ViT-L-14's all-at-once ranking
held every activation of 32 images in two graphs, over 20 GiB) and ranks exactly as all-at-once does.

The expectation is computed here independently: both graphs run once on every image with every
ranked node's input and output as graph outputs; a node's added error is the mean over images of
(1 - cosine) of its output minus the same of its input (compile/precision/variants.py docstring).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from clipfold.compile.precision import quantize, sensitivity
from clipfold.compile.precision.config import QuantConfig
from clipfold.compile.precision.image_sets import calibration_images
from clipfold.compile.stages.streamed_save import save_streamed, without_weights
from clipfold.compile.tiny import data
from clipfold.runtime.preprocess import preprocess

IMAGES = 32  # what the search ranks on (variants.py: search.pixels[:32])


def _all_at_once(quantized, reference, nodes, pixels) -> list[str]:
    graph = onnx.load(str(reference)).graph
    by_name = {n.name: n for n in graph.node}
    ios = {name: (by_name[name].input[0], by_name[name].output[0]) for name in nodes}
    tensors = sorted({t for pair in ios.values() for t in pair})

    def every_activation(path):
        model = onnx.load(str(path))
        model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs() if o.name in tensors]
        return dict(zip(names, session.run(names, {"pixels": pixels})))

    ref, got = every_activation(reference), every_activation(quantized)

    def error(t):
        if t not in ref or t not in got:
            return 0.0
        a = ref[t].reshape(len(pixels), -1).astype(np.float64)
        b = got[t].reshape(len(pixels), -1).astype(np.float64)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        return float(np.mean(1.0 - cos))

    added = {name: error(out) - error(inp) for name, (inp, out) in ios.items()}
    return sorted(added, key=lambda name: -added[name])


@pytest.fixture(scope="module")
def quantized(tiny_bundle, tmp_path_factory):
    """(precision -> (quantized graph, its fp32 source, ranked candidates)), and the probe images."""
    tmp = tmp_path_factory.mktemp("ranking")
    manifest = tiny_bundle.manifest
    fp32 = tiny_bundle.path / manifest.variant("fp32").file
    calib, _ = calibration_images(manifest.preprocess, QuantConfig())
    graphs = {}
    for precision, unpack, ops in (("int8-static", True, quantize.QUANTIZABLE),
                                   ("int8-dynamic", False, ("MatMul", "Attention"))):
        src, out = tmp / f"{precision}.src.onnx", tmp / f"{precision}.onnx"
        always = quantize.prepare(fp32, src, unpack=unpack)
        nodes = quantize.quantizable_nodes(onnx.load(str(src)), always, (), ops)
        if precision == "int8-static":
            quantize.int8_static(src, out, always, QuantConfig(), calib, tmp / "ranges.json")
        else:
            quantize.int8_dynamic(src, out, always, QuantConfig())
        graphs[precision] = (out, src, nodes)
    pixels = preprocess([s.image for s in data.generate(IMAGES, seed=4242)], manifest.preprocess)
    return graphs, pixels


@pytest.mark.parametrize("batch", [1, 5, IMAGES])
def test_streamed_ranking_of_int8_static_is_the_all_at_once_ranking(quantized, batch):
    graphs, pixels = quantized
    out, src, nodes = graphs["int8-static"]
    assert len(nodes) > 10
    expected = _all_at_once(out, src, nodes, pixels)
    # batch 5 leaves a short last batch: a mean of batch means would weigh its images differently
    assert sensitivity.rank_by_added_error(out, src, nodes, pixels, batch=batch) == expected


def test_the_default_batch_runs_all_images_at_once_when_they_fit(quantized):
    """int8-dynamic's activation scale is taken over the whole batch, so its ranking depends on the
    batching: within the budget (the tiny model's 32 images) it is the all-at-once ranking."""
    graphs, pixels = quantized
    out, src, nodes = graphs["int8-dynamic"]
    assert sensitivity.rank_by_added_error(out, src, nodes, pixels) == _all_at_once(out, src, nodes, pixels)


def test_the_ranking_holds_one_batch_of_activations_at_a_time(quantized, monkeypatch):
    graphs, pixels = quantized
    out, src, nodes = graphs["int8-static"]
    expected = _all_at_once(out, src, nodes, pixels)
    runs, call = [], sensitivity._Activations.__call__

    def recorded(self, batch_pixels):
        result = call(self, batch_pixels)
        runs.append((len(batch_pixels), sum(a.nbytes for a in result.values())))
        return result

    monkeypatch.setattr(sensitivity._Activations, "__call__", recorded)
    monkeypatch.setattr(sensitivity, "RANK_BATCH_BYTES", 1)  # less than one image's activations
    assert sensitivity.rank_by_added_error(out, src, nodes, pixels) == expected
    assert [n for n, _ in runs] == [1] * (2 + 2 * IMAGES)  # two runs size the batch, then one image at a time
    one_image = runs[0][1] + runs[1][1]  # both graphs' activations of one image

    runs.clear()
    monkeypatch.setattr(sensitivity, "RANK_BATCH_BYTES", 3 * one_image)
    assert sensitivity.rank_by_added_error(out, src, nodes, pixels) == expected
    sizes = [n for n, _ in runs[2:]]
    assert sizes == [3, 3] * (IMAGES // 3) + [IMAGES % 3] * 2
    assert max(nbytes for _, nbytes in runs) <= 3 * one_image


def test_rank_batch_fits_the_budget():
    assert sensitivity.rank_batch(one_image_bytes=100, images=32, budget=1000) == 10
    assert sensitivity.rank_batch(one_image_bytes=5000, images=32, budget=1000) == 1
    assert sensitivity.rank_batch(one_image_bytes=1, images=32, budget=1000) == 32


def test_a_streamed_save_parses_to_the_same_model(tiny_bundle, tmp_path):
    """save_streamed writes one initializer at a time (onnx.save holds three copies of the weights);
    the export, the fusion and the quantizers' graphs are written with it."""
    model = onnx.load(str(tiny_bundle.path / tiny_bundle.manifest.variant("fp32").file))
    expected = model.SerializeToString()
    save_streamed(model, tmp_path / "streamed.onnx")
    assert len(model.graph.initializer) == 0  # spent: its weights went to the file one by one
    assert onnx.load(str(tmp_path / "streamed.onnx")).SerializeToString() == expected


def test_types_are_inferred_the_same_without_the_weights(tiny_bundle):
    model = onnx.load(str(tiny_bundle.path / tiny_bundle.manifest.variant("fp32").file))
    light = without_weights(model, small=64)
    assert sum(t.ByteSize() for t in light.graph.initializer) < sum(t.ByteSize() for t in model.graph.initializer) / 10

    def types(m):
        return {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(m).graph.value_info}

    assert types(light) == types(model) and len(types(model)) > 20


def test_a_streamed_save_over_2_gb_is_refused_as_onnx_save_refuses(tmp_path, monkeypatch):
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [], "g", [], [], [onnx.numpy_helper.from_array(np.zeros(1000, np.float32), f"w{i}") for i in range(3)]))
    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", 5000)  # stands for 2 GB: three 4 kB tensors exceed it
    with pytest.raises(ValueError, match="larger than the 2 GB limit"):
        save_streamed(model, tmp_path / "big.onnx")
    assert not (tmp_path / "big.onnx").exists()
