"""Precision variants: every precision's build + gate path, the gate refusing, and the fused fp32 graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from clipfold import cli, errors
from clipfold.compile.config import CompileConfig
from clipfold.compile.pipeline import compile_bundle
from clipfold.compile.precision.config import GateConfig, QuantConfig, parse_precisions
from clipfold.compile.precision.gate import run_graph
from clipfold.compile.precision.image_sets import held_out_images
from clipfold.compile.precision.quantize import prepare
from clipfold.compile.stages.optimize import op_counts
from clipfold.compile.tiny import data
from clipfold.compile.tiny.samples import write_background_folder
from clipfold.runtime import Engine
from clipfold.runtime.bundle.schema import Manifest

TEMPLATES = ("a photo on a {}.", "a {}.")
ALL = ("int8-dynamic", "int8-static", "int8-weight", "int4-weight", "fp16", "fp8")
# The operators that show each precision was really applied (not silently left in fp32).
SIGNATURE = {"int8-dynamic": "QAttention", "int8-static": "QuantizeLinear", "int8-weight": "MatMulNBits",
             "int4-weight": "MatMulNBits", "fp8": "QuantizeLinear"}


@pytest.fixture(scope="module")
def variants_bundle(gda_task):
    tmp, adapter, test = gda_task
    # No --calib: the adapter's own support folder is the default calibration set. The search's choices
    # are made on their own folder, so all 80 test images judge (none of them chose anything).
    search = write_background_folder(tmp / "search", data.per_background(20, 98))
    return compile_bundle(CompileConfig(labels=None, adapter=adapter, out=tmp / "all.bundle", precisions=("fp32", *ALL),
                                        gate=GateConfig(data=test, search_data=search)))


def test_fp32_graph_is_fused_for_onnxruntime(variants_bundle):
    fp32 = variants_bundle.manifest.variant("fp32")
    layers = 3  # clipfold-tiny's vision tower
    # The last block computes its query for the class token only: separate projections, one MultiHeadAttention.
    # Every LayerNorm is one operator: two per layer, ln_pre and ln_post; the fused SkipLayerNormalization,
    # slower on ONNX Runtime's CPU provider, is split back into its adds.
    assert fp32.fused_ops == {"Attention": layers - 1, "MultiHeadAttention": 1, "BiasGelu": layers}
    ops = op_counts(variants_bundle.path / fp32.file)
    assert ops["LayerNormalization"] == 2 * layers + 2 and "SkipLayerNormalization" not in ops
    # What fusion removes: the per-layer reshapes/transposes of attention, the elementwise GELU, and
    # LayerNorm's pieces; what the split leaves: a bias add and a residual add before each LayerNorm.
    assert ops.get("Transpose", 0) <= 1 and "Erf" not in ops and "Softmax" in ops  # the head's softmax only
    assert not {"ReduceMean", "Pow", "Sqrt"} & set(ops) and ops["Add"] >= 4 * layers
    assert fp32.parity.embedding_cosine_min >= 0.99999 and fp32.parity.topk_agreement == 1.0


def test_every_precision_is_built_gated_and_recorded(variants_bundle):
    manifest = Manifest.read(variants_bundle.path)
    assert [v.name for v in manifest.variants] == ["fp32", *ALL]
    for v in manifest.variants[1:]:
        g = v.gate
        assert g.reference == "fp32" and g.images == 80 and g.accuracy is not None
        assert g.selection["search"] == "80 labelled images from search/" and g.selection["dropped_overlap"] == 0
        assert g.embedding_cosine_min >= 0.99 and g.top1_agreement >= 0.99, (v.name, g)
        assert g.reference_accuracy - g.accuracy <= 0.01, (v.name, g)
        assert v.quantization and v.quantization["method"], v.name
        # How many nodes the search returns to float depends on the CPU's kernels (on an AVX2-only
        # EPYC: fp8 19 of 26 MatMuls, its calibration fitting the tiny model's activations poorly;
        # int4 weights 10 of 16, whose int8 compute differs on VNNI/AMX; int8 recipes none). What
        # holds on every CPU: each one kept is recorded, and never all of them.
        if g.kept_float:
            q = v.quantization
            assert len(g.kept_float) == q["returned_to_float"] < q["quantizable"], (v.name, g.kept_float, q)
        if v.name in SIGNATURE:
            assert v.fused_ops.get(SIGNATURE[v.name], 0) > 0, (v.name, v.fused_ops)
    for name in ("int8-static", "fp8"):  # the adapter's support folder, every class of it
        assert manifest.variant(name).quantization["calibration_source"] == "24 images from support/ (4 folders)"
    assert "support" not in manifest.head.adapter["hyperparameters"]  # no local path in the bundle
    assert manifest.variant("fp8").backends == ("tensorrt",)


def test_fp8_graph_is_float8_qdq(variants_bundle):
    model = onnx.load(str(variants_bundle.path / "model.fp8.onnx"))
    onnx.checker.check_model(model)
    inits = {i.name: i for i in model.graph.initializer}
    quant = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quant and all(inits[n.input[2]].data_type == onnx.TensorProto.FLOAT8E4M3FN for n in quant)
    # Standard operators only: TensorRT parses no com.microsoft contrib operators.
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}


def test_variants_run_in_the_engine_and_agree_with_fp32(variants_bundle, gda_task):
    images = sorted(gda_task[2].rglob("*.png"))[:12]
    fp32 = [p[0].index for p in Engine.open(variants_bundle.path).classify(images, k=1)]
    for name in ("int8-dynamic", "int8-static", "int4-weight", "fp16"):
        assert [p[0].index for p in Engine.open(variants_bundle.path, variant=name).classify(images, k=1)] == fp32, name
    with pytest.raises(errors.BackendUnavailableError, match=r"runs on \['tensorrt'\].*clipfold\[gpu\]"):
        Engine.open(variants_bundle.path, variant="fp8", backend="onnxruntime")
    # by default a variant opens with its own backend: here TensorRT, which is not installed
    with pytest.raises(errors.BackendUnavailableError, match=r"backend 'tensorrt' needs TensorRT: install clipfold\[gpu\]"):
        Engine.open(variants_bundle.path, variant="fp8")
    with pytest.raises(errors.BundleError, match=r"no variant 'int2'.*'int8-dynamic'"):
        Engine.open(variants_bundle.path, variant="int2")


def test_fp16_keeps_the_head_and_logits_in_fp32(variants_bundle):
    model = onnx.load(str(variants_bundle.path / "model.fp16.onnx"))
    casts = {n.output[0]: n for n in model.graph.node if n.op_type == "Cast"}
    to = {n.output[0]: next(a.i for a in n.attribute if a.name == "to") for n in casts.values()}
    round_trips = [n for n in casts.values() if to[n.output[0]] == onnx.TensorProto.FLOAT
                   and n.input[0] in to and to[n.input[0]] == onnx.TensorProto.FLOAT16]
    assert not round_trips, [n.name for n in round_trips]
    # The residual stream stays fp32, as ORT's fused SkipLayerNormalization kept it: the position
    # add, per layer two residual adds and their bias adds, and the class-token slice before the
    # last block; no LayerNorm reads a Cast, and no add reads or writes fp16.
    assert variants_bundle.manifest.variant("fp16").quantization["residual_nodes_kept_fp32"] == 1 + 4 * 3 + 1
    producers = {o: n for n in model.graph.node for o in n.output}
    layer_norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert len(layer_norms) == 8 and not [n.name for n in layer_norms if producers[n.input[0]].op_type == "Cast"]
    dtypes = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    dtypes.update({i.name: i.data_type for i in model.graph.initializer})
    fp16 = [n.name for n in model.graph.node if n.op_type == "Add"
            and onnx.TensorProto.FLOAT16 in {dtypes.get(t) for t in (*n.input, *n.output)}]
    assert not fp16, fp16
    # The converter had put such pairs between the head's MatMul and softmax; they were removed.
    assert variants_bundle.manifest.variant("fp16").quantization["fp32_round_trips_removed"] >= 1
    weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert weights, "no weight was converted to fp16"
    onnx.checker.check_model(model, full_check=True)  # typed and ordered, for tools stricter than ORT


def test_unpacked_attention_is_exact(variants_bundle, tmp_path):
    """int8-static and weight-only start from a graph whose Attention nodes are unpacked; it must equal fp32."""
    manifest, fp32 = variants_bundle.manifest, variants_bundle.manifest.variant("fp32")
    prepare(variants_bundle.path / fp32.file, tmp_path / "unpacked.onnx", unpack=True)
    assert op_counts(tmp_path / "unpacked.onnx").get("MultiHeadAttention") == 3
    pixels = held_out_images(manifest.preprocess, manifest.labels, GateConfig(images=16)).pixels
    a = run_graph(variants_bundle.path / fp32.file, fp32.inputs, fp32.outputs, pixels)
    b = run_graph(tmp_path / "unpacked.onnx", fp32.inputs, fp32.outputs, pixels)
    assert np.abs(a["embedding"] - b["embedding"]).max() < 1e-5
    assert (a["indices"][:, 0] == b["indices"][:, 0]).all()


def test_the_search_keeps_the_fewest_nodes_in_float_or_refuses(tiny_labels, tmp_path, monkeypatch):
    """30 colour x shape labels. Whether fully quantized int8-static passes the default gate depends on
    the CPU's int8 kernels (it flipped 2.3 % of top-1 picks on an AVX2-only EPYC and passed on an
    AVX-512/AMX Xeon), so the case is built from what this machine's kernels give: the gate asks for
    half the fully quantized graph's worst embedding error. That misses by construction and is in
    reach with sensitive nodes back in float; a limit of cosine 1.0 misses even with all but one (any
    quantized node adds error), and the search must not pass off an all-float graph.
    A real compile makes the search's choices on images disjoint from the gate's (test_gate_selection);
    here the search sees the gate's own images, so the fewest count it finds is judged on the very
    images it passed on, on every CPU, rather than on a second set where it may fall either side of
    the limit. (Top-1 at 0.95: the cosine limit is what drives this search.)"""
    import clipfold.compile.precision.gate as gating
    import clipfold.compile.precision.image_sets as image_sets

    split = image_sets.selection_images
    monkeypatch.setattr(image_sets, "selection_images",
                        lambda *a, **kw: (lambda s: image_sets.Selection(s.gate, s.gate, s.record))(split(*a, **kw)))
    measured = []  # every figure the gate measures, in order: the first is the fully quantized graph's
    measure = gating.measure
    monkeypatch.setattr(gating, "measure", lambda *a, **kw: measured.append(measure(*a, **kw)) or measured[-1])

    # A limit of cosine 1.0: the search returns all but one node to float and still misses; refused.
    out = tmp_path / "refused.bundle"
    with pytest.raises(errors.GateError) as info:
        compile_bundle(CompileConfig(labels=tiny_labels, out=out, precisions="int8-static",
                                     gate=GateConfig(min_cosine=1.0)))
    assert not out.exists() and not list(tmp_path.glob(".*"))  # no partial bundle, no scratch
    refused, worst = str(info.value), measured[0].embedding_cosine_min
    assert worst < 1.0
    assert f"fully quantized (on the search images):\n  - min embedding cosine {worst:.5f} < 1.0" in refused
    assert "int8-static" in refused and "still missed" in refused and "fp32 graph under another name" in refused

    limit = 1.0 - (1.0 - worst) / 2
    said: list[str] = []
    result = compile_bundle(CompileConfig(labels=tiny_labels, out=tmp_path / "searched", precisions="int8-static",
                                          gate=GateConfig(min_cosine=limit, min_top1_agreement=0.95)),
                            progress=said.append)
    v = result.manifest.variant("int8-static")
    quantizable = v.quantization["quantizable"]
    kept = len(v.gate.kept_float)
    assert 0 < kept == v.quantization["returned_to_float"] < quantizable
    assert v.gate.embedding_cosine_min >= limit and v.gate.top1_agreement >= 0.95
    assert v.fused_ops.get("QuantizeLinear", 0) > 0
    on = [m.removeprefix("gate: fp32 on ").split("; choices on ") for m in said if m.startswith("gate: fp32 on ")]
    assert on and all(gate == search for gate, search in on), on  # the search chose on the gate's images
    # The fewest: one node fewer in float was tried and missed (or none fewer: fully quantized missed).
    tried = [m.strip() for m in said if m.strip().startswith(f"int8-static: {kept - 1} of {quantizable} in float: ")]
    assert kept == 1 or (tried and not tried[-1].endswith("passes")), said
    assert f"returned up to {quantizable - 1} of {quantizable}" in refused


def test_keep_float_applies_to_every_quantizer(gda_task, tmp_path):
    _, adapter, test = gda_task
    result = compile_bundle(CompileConfig(labels=None, adapter=adapter, out=tmp_path / "k", gate=GateConfig(data=test),
                                          precisions="int8-dynamic,int4-weight",
                                          quant=QuantConfig(keep_float=("Attention", "Conv"))))
    dynamic, weight = result.manifest.variant("int8-dynamic"), result.manifest.variant("int4-weight")
    assert "QAttention" not in dynamic.fused_ops and dynamic.fused_ops["MatMulInteger"] > 0
    ops = op_counts(result.path / weight.file)
    assert ops["Conv"] == 1 and ops["MatMulNBits"] > 0


def test_an_unreachable_gate_is_refused(gda_task, tmp_path):
    """With the search off, a miss is refused at once, saying so; nothing is written."""
    _, adapter, test = gda_task
    with pytest.raises(errors.GateError, match=r"(?s)min embedding cosine 0\.\d+ < 1\.0.*search was off"):
        compile_bundle(CompileConfig(labels=None, adapter=adapter, out=tmp_path / "b", precisions="int4-weight",
                                     gate=GateConfig(min_cosine=1.0, data=test), quant=QuantConfig(search=False)))
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".*"))


def test_bad_precision_input_is_named(gda_task, tmp_path, capsys, monkeypatch):
    _, adapter, _ = gda_task
    with pytest.raises(errors.ConfigError, match=r"unknown precision 'int3'.*int8-dynamic"):
        parse_precisions("fp32,int3")
    assert parse_precisions("int8-static,fp32,int8-static") == ("fp32", "int8-static")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(errors.ConfigError, match=r"calibration folder .*empty holds no images"):
        compile_bundle(CompileConfig(labels=None, adapter=adapter, out=tmp_path / "a", precisions="int8-static",
                                     quant=QuantConfig(calib=empty)))
    (empty / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(errors.ImageError, match=r"calibration image .*broken.png"):
        compile_bundle(CompileConfig(labels=None, adapter=adapter, out=tmp_path / "a", precisions="int8-static",
                                     quant=QuantConfig(calib=empty)))
    # bf16 on a CPU without it (forced: OpenVINO's CPU plugin reports no BF16); tests/test_bf16_variant.py has the rest
    import clipfold.runtime.backends.openvino as ov_backend

    monkeypatch.setattr(ov_backend, "cpu_capabilities", lambda: ("FP32", "INT8"))
    with pytest.raises(errors.BackendUnavailableError, match=r"bf16 needs a CPU with native bfloat16"):
        compile_bundle(CompileConfig(labels=None, adapter=adapter, out=tmp_path / "a", precisions="bf16"))
    with pytest.raises(errors.ConfigError, match="unknown calibration method 'kl'"):
        QuantConfig(calibration="kl")
    with pytest.raises(errors.ConfigError, match=r"min_cosine must be in \[0, 1\]"):
        GateConfig(min_cosine=1.5)
    assert not (tmp_path / "a").exists()
    assert cli.main(["compile", "--adapter", str(adapter), "--out", str(tmp_path / "a"), "--precision", "int3"]) == 2
    assert "unknown precision 'int3'" in capsys.readouterr().err and not (tmp_path / "a").exists()
