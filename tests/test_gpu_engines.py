"""GPU engines: TensorRT-bound graphs (checked here, on any machine), engine records tied to their
hardware, and the TensorRT / ONNX Runtime CUDA backends (run only where TensorRT and a GPU exist)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import onnx
import pytest

from clipfold import errors
from clipfold.cli import main
from clipfold.compile.config import CompileConfig
from clipfold.compile.pipeline import compile_bundle
from clipfold.compile.precision.config import GateConfig
from clipfold.compile.tensorrt.build import FP32_OP_TYPES, node_float_types, tensorrt_problems
from clipfold.runtime import Engine
from clipfold.runtime.bundle.schema import EngineRecord, Manifest

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _has_cuda_gpu() -> bool:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return False
    err, count = cudart.cudaGetDeviceCount()
    return int(err) == 0 and count > 0


GPU = HAS_TENSORRT and _has_cuda_gpu()
needs_tensorrt_gpu = pytest.mark.skipif(not GPU, reason="needs TensorRT, cuda-python and an NVIDIA GPU (clipfold[gpu])")


@pytest.fixture(scope="module")
def trt_bundle(gda_task):
    """The GDA head (a confident one, so the gate is meaningful) with TensorRT-bound fp16 and int8 graphs."""
    tmp, adapter, test = gda_task
    return compile_bundle(CompileConfig(labels=None, adapter=adapter, out=tmp / "trt.bundle", overwrite=True,
                                        precisions=("fp32", "tensorrt-fp16", "tensorrt-int8"), gate=GateConfig(data=test)))


def test_tensorrt_bound_graphs_use_only_what_tensorrt_parses(trt_bundle):
    path = trt_bundle.path
    for name in ("tensorrt-fp16", "tensorrt-int8"):
        variant = trt_bundle.manifest.variant(name)
        assert variant.backends == ("tensorrt",) and variant.gate is not None
        assert tensorrt_problems(path / variant.file) == []
    # The fp32 graph is fused for ONNX Runtime: its contrib operators are named as what TensorRT would refuse.
    problems = tensorrt_problems(path / "model.onnx")
    assert problems and all("com.microsoft" in p for p in problems)
    assert any("com.microsoft.Attention" in p for p in problems)
    # int8 is explicit QDQ with symmetric (zero) zero points on int8 tensors.
    graph = onnx.load(str(path / trt_bundle.manifest.variant("tensorrt-int8").file))
    qdq = [n for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    zeros = {t.name: t for t in graph.graph.initializer}
    assert len(qdq) >= 10
    assert all(zeros[n.input[2]].data_type == onnx.TensorProto.INT8 for n in qdq)


def test_tensorrt_problems_catch_what_the_parser_refuses(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.INT8, [1, 4])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    zero = helper.make_tensor("z0", TensorProto.INT8, [], [0])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], name="q"),
             helper.make_node("QuantizeLinear", ["x", "s"], ["y2"], name="q_default"),
             helper.make_node("Constant", [], ["zc"], value=zero),
             helper.make_node("QuantizeLinear", ["x", "s", "zc"], ["y3"], name="q_ok"),
             helper.make_node("TopK", ["x", "k"], ["v", "i"], name="top", sorted=0),
             helper.make_node("TopK", ["x", "k"], ["v2", "i2"], name="top_ok"),
             helper.make_node("FastGelu", ["x"], ["g"], name="gelu", domain="com.microsoft"),
             helper.make_node("QLinearMatMul", ["x"] * 8, ["m"], name="qmm")]
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.INT8, [], [3])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x, k], [y], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, tmp_path / "bad.onnx")
    problems = "\n".join(tensorrt_problems(tmp_path / "bad.onnx"))
    assert "opset 21 is outside TensorRT's 9..20" in problems
    assert "node q (QuantizeLinear): zero point 'z' must be a constant int8 or fp8 0" in problems
    assert "node q_default (QuantizeLinear): no zero point: ONNX then means uint8" in problems
    assert "node top (TopK): sorted=0" in problems
    assert "q_ok" not in problems and "top_ok" not in problems  # a Constant 0 and a tensor K are fine
    assert "node gelu (com.microsoft.FastGelu): not a standard ONNX operator" in problems
    assert "node qmm (QLinearMatMul): TensorRT's ONNX parser does not support it" in problems


def test_fp16_graph_keeps_the_right_layers_in_fp32(trt_bundle):
    path = trt_bundle.path / trt_bundle.manifest.variant("tensorrt-fp16").file
    types = node_float_types(path)
    graph = onnx.load(str(path))
    head = _head(graph)
    must_be_fp32 = [n for n in graph.graph.node if n.op_type in FP32_OP_TYPES or n.name in head]
    assert {n.op_type for n in must_be_fp32} >= {"LayerNormalization", "Softmax", "TopK", "Erf", "ReduceL2"}
    wrong = [(n.name, n.op_type, types[n.name]) for n in must_be_fp32 if types[n.name] - {"float32"}]
    assert wrong == []
    # ... and the bulk of the compute really is fp16: every MatMul/Conv with a weight outside the head
    # (query x key and attention x value stay fp32 beside the fp32 softmax).
    weights = {t.name for t in graph.graph.initializer}
    gemms = [n for n in graph.graph.node if n.op_type in ("MatMul", "Conv") and n.name not in head
             and n.input[1] in weights]
    assert gemms and all(types[n.name] == {"float16"} for n in gemms)


def _head(graph) -> set[str]:
    """Nodes after the unit embedding. The converter feeds the ``embedding`` output through an
    Identity or Cast, so start from the tensor behind those."""
    producers = {o: n for n in graph.graph.node for o in n.output}
    tensor = "embedding"
    while tensor in producers and producers[tensor].op_type in ("Identity", "Cast"):
        tensor = producers[tensor].input[0]
    consumers: dict[str, list] = {}
    for node in graph.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    seen, frontier = set(), [tensor]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.name not in seen:
                seen.add(node.name)
                frontier.extend(node.output)
    assert any(producers[t].op_type == "TopK" for t in producers if producers[t].name in seen)
    return seen


def _record(**changes) -> EngineRecord:
    base = dict(file="model.tensorrt-fp16.sm87-trt10.3.0.plan", timing_cache="c.timing-cache", tensorrt="10.3.0",
                gpu="Orin", compute_capability="8.7", profile={"min": 1, "opt": 8, "max": 64})
    return EngineRecord(**{**base, **changes})


def test_engines_are_tied_to_compute_capability_and_tensorrt_version(trt_bundle):
    from clipfold.runtime.backends.tensorrt import select_engine

    variant = trt_bundle.manifest.variant("tensorrt-fp16")
    h100 = {"gpu": "NVIDIA H100", "compute_capability": "9.0", "tensorrt": "10.3.0"}
    with pytest.raises(errors.EngineMismatchError, match=r"has no TensorRT engine yet.*clipfold engine build B "
                                                         r"--variant tensorrt-fp16"):
        select_engine(variant, h100, "B")
    orin = dataclasses.replace(variant, engines=(_record(),))
    with pytest.raises(errors.EngineMismatchError) as caught:
        select_engine(orin, h100, "B")
    message = str(caught.value)
    assert "Orin, compute capability 8.7, TensorRT 10.3.0" in message and "NVIDIA H100, compute capability 9.0" in message
    assert "clipfold engine build B --variant tensorrt-fp16" in message
    # Same GPU, another TensorRT version: refused too.
    with pytest.raises(errors.EngineMismatchError, match="TensorRT 10.8.0"):
        select_engine(orin, {"gpu": "Orin", "compute_capability": "8.7", "tensorrt": "10.8.0"}, "B")
    both = dataclasses.replace(variant, engines=(_record(), _record(file="h100.plan", gpu="NVIDIA H100",
                                                                    compute_capability="9.0")))
    assert select_engine(both, h100).file == "h100.plan"


def test_manifest_records_engines_and_checks_their_files(trt_bundle):
    manifest = trt_bundle.manifest
    variants = tuple(dataclasses.replace(v, engines=(_record(),)) if v.name == "tensorrt-fp16" else v
                     for v in manifest.variants)
    files = {**manifest.files, _record().file: "0" * 64, _record().timing_cache: "1" * 64}
    data = dataclasses.replace(manifest, variants=variants, files=files).to_dict()
    again = Manifest.from_dict(json.loads(json.dumps(data)))
    assert again.variant("tensorrt-fp16").engines[0].profile == {"min": 1, "opt": 8, "max": 64}
    for name in (_record().timing_cache, _record().file):
        del data["files"][name]
        with pytest.raises(errors.BundleError, match=f"engine file '{name}' of variant 'tensorrt-fp16' has no checksum"):
            Manifest.from_dict(data)
    with pytest.raises(errors.BundleError, match="invalid batch profile"):
        _record(profile={"min": 8, "opt": 4, "max": 64})


def test_fp8_plans_need_compute_capability_8_9():
    """engine build on a GPU below 8.9 (no FP8 tensor cores): the default list skips the fp8 variant
    and says so; asking for it by name is a ConfigError naming the GPU. From 8.9 on, all are built."""
    from types import SimpleNamespace

    from clipfold.compile.tensorrt.engines import _buildable

    targets = [SimpleNamespace(name=n, precision=n) for n in ("tensorrt-fp16", "fp8")]
    said: list[str] = []
    ampere = {"gpu": "NVIDIA A100", "compute_capability": "8.0"}
    assert [v.name for v in _buildable(targets, ampere, False, said.append)] == ["tensorrt-fp16"]
    assert said == ["skipping ['fp8']: FP8 needs compute capability 8.9 or newer, NVIDIA A100 has 8.0"]
    with pytest.raises(errors.ConfigError, match=r"\['fp8'\] need FP8 tensor cores .* NVIDIA A100 has 8.0"):
        _buildable(targets, ampere, True, said.append)
    assert _buildable(targets, {"gpu": "NVIDIA H100", "compute_capability": "9.0"}, True, said.append) == targets


@pytest.mark.skipif(GPU, reason="checks the messages of a machine without TensorRT or a GPU")
def test_without_tensorrt_the_gpu_paths_say_what_is_missing(trt_bundle, tiny_bundle, tmp_path, capsys):
    with pytest.raises(errors.BackendUnavailableError, match=r"clipfold\[gpu\]"):
        Engine.open(trt_bundle.path, variant="tensorrt-fp16", backend="tensorrt")
    with pytest.raises(errors.BackendUnavailableError, match="not for TensorRT"):
        Engine.open(trt_bundle.path, variant="fp32", backend="tensorrt")
    with pytest.raises(errors.BackendUnavailableError, match="onnxruntime-gpu"):
        Engine.open(tiny_bundle.path, backend="onnxruntime-cuda")
    assert main(["engine", "build", str(trt_bundle.path)]) == 2
    assert "needs TensorRT and an NVIDIA GPU" in capsys.readouterr().err
    # compile --backend tensorrt still builds and gates the TensorRT-bound graphs, and says where engines come from.
    out = tmp_path / "t.bundle"
    assert main(["compile", "--labels", "a photo,a drawing", "--out", str(out), "--backend", "tensorrt",
                 "--precision", "fp16", "--max-batch", "32"]) == 0
    printed = capsys.readouterr().out
    assert f"clipfold engine build {out} --min-batch 1 --opt-batch 8 --max-batch 32" in printed
    assert [v.name for v in Manifest.read(out).variants] == ["fp32", "tensorrt-fp16"]
    assert main(["compile", "--labels", "a,b", "--out", str(tmp_path / "x"), "--backend", "tensorrt",
                 "--precision", "int4-weight"]) == 2
    assert "backend tensorrt takes precisions from fp16, int8, fp8" in capsys.readouterr().err
    assert main(["compile", "--labels", "a,b", "--out", str(tmp_path / "x"), "--max-batch", "4"]) == 2
    assert "need --backend tensorrt" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_profiler_reports_gpu_references_it_cannot_run(tiny_bundle, tmp_path):
    import shutil

    import torch

    from clipfold.compile.profiling.run import ProfileConfig, profile

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CUDA rows run (covered by the GPU profile run)")
    bundle = shutil.copytree(tiny_bundle.path, tmp_path / "tiny.bundle")  # profile records into the bundle
    rows = profile(ProfileConfig(bundles=(bundle,), batches=(1,), rounds=3, eager_modes=("cuda-fp16",)))
    eager = [r for r in rows if r.variant.startswith("open_clip eager")]
    assert [(r.variant, r.backend, r.status) for r in eager] == [
        ("open_clip eager cuda fp16", "torch-cuda", "not run: needs an NVIDIA GPU (torch.cuda.is_available() is False)")]
    assert any(r.variant == "fp32" and r.status == "ok" for r in rows)
    with pytest.raises(errors.ConfigError, match="eager modes \\['cuda-fp64'\\] unknown"):
        ProfileConfig(bundles=(tiny_bundle.path,), eager_modes=("cuda-fp64",))


@needs_tensorrt_gpu
def test_tensorrt_engine_is_built_gated_and_matches_fp32(trt_bundle):
    from clipfold.compile.tensorrt.build import BatchProfile
    from clipfold.compile.tensorrt.engines import EngineBuildConfig, build_engines

    manifest = build_engines(EngineBuildConfig(trt_bundle.path, profile=BatchProfile(1, 8, 32)))
    for name in ("tensorrt-fp16", "tensorrt-int8"):
        (record,) = manifest.variant(name).engines
        assert record.gate is not None and record.gate.top1_agreement >= 0.99
        engine = Engine.open(trt_bundle.path, variant=name, backend="tensorrt")
        pixels = np.random.default_rng(0).integers(0, 256, (5, 3, 64, 64), dtype=np.uint8)
        got, ref = engine.run_pixels(pixels), Engine.open(trt_bundle.path).run_pixels(pixels)
        cos = np.sum(got["embedding"] * ref["embedding"], 1)
        assert cos.min() > 0.99


@needs_tensorrt_gpu
def test_cuda_graph_replay_equals_a_plain_enqueue(trt_bundle):
    from clipfold.runtime.backends.tensorrt import TensorRTBackend, select_engine, this_machine

    variant = Manifest.read(trt_bundle.path).variant("tensorrt-fp16")
    record = select_engine(variant, this_machine())
    plain = TensorRTBackend(trt_bundle.path / record.file, variant.inputs, variant.outputs, record)
    graphed = TensorRTBackend(trt_bundle.path / record.file, variant.inputs, variant.outputs, record, cuda_graph_batches=(4,))
    pixels = np.random.default_rng(1).integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)
    for _ in range(3):  # captured on the first call, replayed after
        assert np.array_equal(graphed.run({"pixels": pixels})["indices"], plain.run({"pixels": pixels})["indices"])


@pytest.mark.skipif(not _has_cuda_gpu() or "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="needs onnxruntime-gpu and an NVIDIA GPU")
def test_onnxruntime_cuda_backend_matches_cpu(tiny_bundle):
    pixels = np.random.default_rng(2).integers(0, 256, (8, 3, 64, 64), dtype=np.uint8)
    gpu = Engine.open(tiny_bundle.path, backend="onnxruntime-cuda").run_pixels(pixels)
    cpu = Engine.open(tiny_bundle.path).run_pixels(pixels)
    assert np.allclose(gpu["embedding"], cpu["embedding"], atol=1e-4)
