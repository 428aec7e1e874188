"""Beyond one machine: the Triton model repository export, Ray Data indexing, sharded search."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from clipfold import errors
from clipfold.cli import main
from clipfold.runtime import Engine
from clipfold.runtime.bundle.schema import Manifest

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="the Triton export needs tritonclient[grpc]")


def _write_images(folder: Path, samples) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(samples):
        s.image.save(folder / f"{i:03d}-{s.color}-{s.shape}.png")
    return folder


# --- Triton repository ---------------------------------------------------------------------------
class _Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class _Error:
    def __init__(self, message):
        self._message = message

    def message(self):
        return self._message


class _Response:
    def __init__(self, output_tensors, error=None):
        self._outputs, self._error = list(output_tensors), error

    def output_tensors(self):
        return self._outputs

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error


def _pb_utils() -> types.ModuleType:
    """The part of Triton's ``triton_python_backend_utils`` the exported models use, as documented."""
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor, module.InferenceResponse, module.TritonError = _Tensor, _Response, _Error
    module.get_input_tensor_by_name = lambda request, name: _Tensor(name, request[name]) if name in request else None
    return module


class _MiniTriton:
    """Runs an exported repository the way Triton does: Python models through their ``TritonPythonModel``
    (initialize, then execute on a list of requests), ONNX models in onnxruntime, ensembles step by step
    through their input and output maps. Enough to check that the pieces fit and compute the right thing."""

    def __init__(self, repo: Path, monkeypatch):
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2

        monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _pb_utils())
        self.repo, self.configs, self.python, self.onnx = repo, {}, {}, {}
        for path in sorted(repo.glob("*/config.pbtxt")):
            config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
            self.configs[config.name] = config
            if config.backend == "python":
                spec = importlib.util.spec_from_file_location(f"model_{config.name}", path.parent / "1" / "model.py")
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                model = module.TritonPythonModel()
                model.initialize({"model_config": json.dumps({"name": config.name}), "model_name": config.name,
                                  "model_repository": str(path.parent), "model_version": "1"})
                self.python[config.name] = model
            elif config.platform == "onnxruntime_onnx":
                import onnxruntime as ort

                self.onnx[config.name] = ort.InferenceSession(str(path.parent / "1" / "model.onnx"),
                                                             providers=["CPUExecutionProvider"])

    def infer(self, name: str, requests: list[dict]) -> list:
        """One response per request: a dict of outputs, or the error message."""
        config = self.configs[name]
        if name in self.python:
            return [r.error().message() if r.has_error() else {t.name(): t.as_numpy() for t in r.output_tensors()}
                    for r in self.python[name].execute(requests)]
        if name in self.onnx:
            session = self.onnx[name]
            outputs = [o.name for o in config.output]
            return [dict(zip(outputs, session.run(outputs, request))) for request in requests]
        answers = []
        for request in requests:  # an ensemble
            tensors, failed = dict(request), None
            for step in config.ensemble_scheduling.step:
                inputs = {model_name: tensors[tensor] for model_name, tensor in step.input_map.items()}
                (answer,) = self.infer(step.model_name, [inputs])
                if isinstance(answer, str):
                    failed = answer
                    break
                tensors.update({step.output_map[k]: v for k, v in answer.items() if k in step.output_map})
            answers.append(failed or {o.name: tensors[o.name] for o in config.output})
        return answers


@pytest.fixture(scope="module")
def repository(tiny_bundle, tmp_path_factory):
    from clipfold.compile.triton_server.repository import TritonExportConfig, export_triton

    out = tmp_path_factory.mktemp("triton") / "repo"
    return export_triton(TritonExportConfig(tiny_bundle.path, out, name="tiny", max_batch=16))


def test_triton_repository_layout_and_configs(repository, tiny_bundle):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    assert sorted(p.name for p in repository.iterdir() if p.is_dir()) == ["tiny", "tiny_labels", "tiny_onnx",
                                                                          "tiny_preprocess"]
    config = text_format.Parse((repository / "tiny_onnx" / "config.pbtxt").read_text(), pb.ModelConfig())
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 16
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000
    assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in config.input] == [
        ("pixels", "TYPE_UINT8", [3, 64, 64])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("scores", [5]), ("indices", [5]), ("embedding", [64])]
    assert config.model_warmup[0].inputs["pixels"].zero_data
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    ensemble = text_format.Parse((repository / "tiny" / "config.pbtxt").read_text(), pb.ModelConfig())
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == ["tiny_preprocess", "tiny_onnx", "tiny_labels"]
    assert (repository / "tiny_labels" / "labels.txt").read_text().splitlines() == list(tiny_bundle.manifest.labels)
    assert (repository / "tiny_onnx" / "1" / "model.onnx").read_bytes() == (tiny_bundle.path / "model.onnx").read_bytes()


def test_triton_ensemble_computes_what_the_engine_computes(repository, tiny_bundle, monkeypatch):
    from clipfold.compile.tiny import data

    triton = _MiniTriton(repository, monkeypatch)
    images = []
    for sample in data.generate(6, seed=31):
        buffer = io.BytesIO()
        sample.image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    # Two requests with batch 3 each, as Triton's dynamic batcher may hand them to the models.
    requests = [{"IMAGE": np.array([[b] for b in images[:3]], dtype=object)},
                {"IMAGE": np.array([[b] for b in images[3:]], dtype=object)}]
    answers = triton.infer("tiny", requests)
    engine = Engine.open(tiny_bundle.path)
    expected = engine.classify(images, k=5)
    embeddings = engine.embed(images)
    got_labels = [[label.decode() for label in row] for answer in answers for row in answer["LABELS"]]
    assert got_labels == [[p.label for p in preds] for preds in expected]
    scores = np.concatenate([a["SCORES"] for a in answers])
    assert np.allclose(scores, [[p.score for p in preds] for preds in expected], atol=1e-6)
    assert np.allclose(np.concatenate([a["EMBEDDING"] for a in answers]), embeddings, atol=1e-6)
    # An undecodable image fails its own request only, when Triton batches it with a good one.
    bad = {"IMAGE": np.array([[b"not an image"]], dtype=object)}
    answers = triton.infer("tiny_preprocess", [bad, requests[0]])
    assert isinstance(answers[0], str) and "<bytes, 12 bytes>" in answers[0]
    assert np.array_equal(answers[1]["pixels"], engine_pixels(engine, images[:3]))


def engine_pixels(engine, images):
    from clipfold.runtime.images import load_image
    from clipfold.runtime.preprocess import preprocess

    return preprocess([load_image(b) for b in images], engine.manifest.preprocess)


@pytest.mark.parametrize("mutation, message", [
    (("tiny_onnx", "dims: 64\n  dims: 64\n}", "dims: 64\n  dims: 32\n}"),
     "tiny_onnx: input 'pixels' dims \\[3, 64, 32\\] in config.pbtxt, \\[3, 64, 64\\] in the graph"),
    (("tiny_onnx", "TYPE_UINT8", "TYPE_FP32"), "input 'pixels' is TYPE_FP32 in config.pbtxt but tensor\\(uint8\\)"),
    (("tiny", 'key: "indices"\n      value: "INDICES"', 'key: "indexes"\n      value: "INDICES"'),
     "step 2 \\(tiny_labels\\): input_map covers \\['indexes'\\], the model takes \\['indices'\\]"),
    (("tiny", 'model_name: "tiny_labels"', 'model_name: "tiny_names"'), "no model 'tiny_names' in the repository"),
    (("tiny_labels", "max_batch_size: 16", "max_batch_size: 8"), "max_batch_size 8 is below the ensemble's 16"),
    (("tiny_preprocess", "max_batch_size: 16", "max_batch_sise: 16"), "not a valid Triton ModelConfig"),
    (("tiny_onnx", 'name: "embedding"', 'name: "features"'), "config outputs .* differ from the ONNX graph's"),
    (("tiny_onnx", "dims: 64\n      zero_data", "dims: -1\n      zero_data"),
     "warm-up 'zeros' input 'pixels' has TYPE_UINT8 \\[3, 64, -1\\]; the input is TYPE_UINT8 \\[3, 64, 64\\]"),
    (("tiny", 'value: "INDICES"\n    }\n    output_map {\n      key: "scores"', 'value: "SCORES"\n    }\n    output_map {\n      key: "scores"'),
     "'SCORES' is already produced by an earlier step"),
])
def test_triton_validation_names_each_problem(repository, tmp_path, mutation, message):
    from clipfold.compile.triton_server.validate import validate_repository

    copy = shutil.copytree(repository, tmp_path / "repo")
    model, old, new = mutation
    config = copy / model / "config.pbtxt"
    assert old in config.read_text()
    config.write_text(config.read_text().replace(old, new))
    with pytest.raises(errors.VerificationError, match=message):
        validate_repository(copy)


def test_triton_export_cli_and_refusals(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["export", "triton", str(tiny_bundle.path), "--out", str(out), "--max-batch", "8",
                 "--preferred-batch", "2,8", "--kind", "gpu", "--instances", "2"]) == 0
    assert "every config.pbtxt validated" in capsys.readouterr().out
    text = (out / "tiny_onnx" / "config.pbtxt").read_text()
    assert "KIND_GPU" in text and "count: 2" in text and "preferred_batch_size: 2" in text
    # Existing output: refused without --overwrite, replaced with it; a foreign folder is never replaced.
    assert main(["export", "triton", str(tiny_bundle.path), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "triton", str(tiny_bundle.path), "--out", str(out), "--overwrite"]) == 0
    assert "KIND_CPU" in (out / "tiny_onnx" / "config.pbtxt").read_text()
    foreign = tmp_path / "mine"
    (foreign / "keep").mkdir(parents=True)
    assert main(["export", "triton", str(tiny_bundle.path), "--out", str(foreign), "--overwrite"]) == 2
    assert "not a repository clipfold exported" in capsys.readouterr().err and (foreign / "keep").is_dir()
    for args, message in [(["--preferred-batch", "4,64"], "preferred batch sizes \\[4, 64\\] must be integers in 1..32"),
                          (["--name=-x"], "not a valid Triton model name"),
                          (["--variant", "int8"], "bundle has no variant 'int8'")]:
        assert main(["export", "triton", str(tiny_bundle.path), "--out", str(tmp_path / "r2"), *args]) == 2
        assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "r2").exists() and not list(tmp_path.glob(".r2.partial-*"))


def test_triton_export_refuses_a_kernel_head_bundle(tiny_kernel_head_bundle, tmp_path):
    from clipfold.compile.config import CompileConfig
    from clipfold.compile.pipeline import compile_bundle
    from clipfold.compile.triton_server.repository import TritonExportConfig, export_triton

    bundle = tiny_kernel_head_bundle
    with pytest.raises(errors.BundleError, match="kernel head"):
        export_triton(TritonExportConfig(bundle.path, tmp_path / "repo"))
    assert not (tmp_path / "repo").exists()
    # A label holding a line separator other than "\n" would shift every later label in labels.txt.
    odd = compile_bundle(CompileConfig(labels=("cat", "a\x85b", "dog"), out=tmp_path / "odd.bundle"))
    with pytest.raises(errors.BundleError, match="line separators"):
        export_triton(TritonExportConfig(odd.path, tmp_path / "repo"))


def test_triton_validation_counts_the_labels(repository, tmp_path):
    from clipfold.compile.triton_server.validate import validate_repository

    copy = shutil.copytree(repository, tmp_path / "repo")
    labels = copy / "tiny_labels" / "labels.txt"
    labels.write_text(labels.read_text() + "extra\n")
    with pytest.raises(errors.VerificationError, match="labels.txt has 31 labels; the bundle has 30 classes"):
        validate_repository(copy)


def _with_plan(tmp_path, profile=None, compiled=None):
    """A TensorRT-bound bundle carrying a plan record, as `clipfold engine build` leaves it on a GPU
    machine. The plan's bytes are a stand-in: without TensorRT nothing here can read a plan. With
    ``compiled`` (a bundle this function made before) its copy is used instead of a second compile:
    the plan, the record and the file list are all written again below."""
    import dataclasses

    from clipfold.compile.config import CompileConfig
    from clipfold.compile.pipeline import compile_bundle
    from clipfold.runtime.bundle.schema import EngineRecord
    from clipfold.runtime.bundle.write import checksum_tree, write_manifest

    if compiled is not None:
        bundle = Path(shutil.copytree(compiled, Path(tmp_path) / "t.bundle"))
    else:
        bundle = compile_bundle(CompileConfig(labels=("red circle", "green star", "blue square"), top_k=3,
                                              out=Path(tmp_path) / "t.bundle", precisions=("fp32", "tensorrt-fp16"))).path
    (bundle / "p.plan").write_bytes(b"plan for sm 8.7")
    (bundle / "p.cache").write_bytes(b"timing cache")
    record = EngineRecord(file="p.plan", timing_cache="p.cache", tensorrt="10.3.0", gpu="Orin",
                          compute_capability="8.7", profile=profile or {"min": 1, "opt": 8, "max": 32})
    manifest = Manifest.read(bundle)
    variants = tuple(dataclasses.replace(v, engines=(record,)) if v.name == "tensorrt-fp16" else v
                     for v in manifest.variants)
    manifest = dataclasses.replace(manifest, variants=variants, files=checksum_tree(bundle))
    write_manifest(bundle, manifest)
    return bundle


def test_triton_export_of_a_tensorrt_plan(tmp_path, capsys):
    from clipfold.compile.triton_server.repository import TritonExportConfig, export_triton
    from clipfold.compile.triton_server.validate import validate_repository

    bundle = _with_plan(tmp_path)
    out = tmp_path / "repo"
    assert main(["export", "triton", str(bundle), "--out", str(out), "--variant", "tensorrt-fp16",
                 "--platform", "tensorrt", "--max-batch", "16"]) == 0
    assert "t_trt" in capsys.readouterr().out
    text = (out / "t_trt" / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in text and "KIND_GPU" in text
    assert (out / "t_trt" / "1" / "model.plan").read_bytes() == b"plan for sm 8.7"
    plan = json.loads((out / "clipfold-export.json").read_text())["plan"]
    assert plan["compute_capability"] == "8.7" and plan["inputs"] == {"pixels": ["TYPE_UINT8", [3, 64, 64]]}
    # The plan's config is checked against the graph it was built from.
    config = out / "t_trt" / "config.pbtxt"
    config.write_text(text.replace("dims: 3\n  dims: 64", "dims: 3\n  dims: 65", 1))
    with pytest.raises(errors.VerificationError, match="t_trt: config inputs .* differ from the plan's graph"):
        validate_repository(out)
    # A swapped plan is caught by its sha256.
    config.write_text(text)
    (out / "t_trt" / "1" / "model.plan").write_bytes(b"another plan")
    with pytest.raises(errors.VerificationError, match="1/model.plan is missing or is not the exported plan"):
        validate_repository(out)
    # Refusals: beyond the plan's profile, a CPU instance, a variant without a plan, an unknown GPU,
    # a TensorRT-bound graph as an ONNX Runtime model.
    for args, message in [(["--max-batch", "64"], "the plan runs batches 1..32"),
                          (["--kind", "cpu"], "a TensorRT plan runs on a GPU"),
                          (["--compute-capability", "9.0"], "has plans for Orin \\(compute capability 8.7"),
                          (["--platform", "onnxruntime"], "is a graph for \\['tensorrt'\\], not for ONNX Runtime")]:
        assert main(["export", "triton", str(bundle), "--out", str(tmp_path / "r2"), "--variant", "tensorrt-fp16",
                     "--platform", "tensorrt", *args]) == 2
        assert re.search(message, capsys.readouterr().err)
    # A plan whose profile starts above 1 cannot take Triton's single requests (nor its warm-up).
    later = _with_plan(tmp_path / "min8", profile={"min": 8, "opt": 8, "max": 32}, compiled=bundle)
    with pytest.raises(errors.ConfigError, match="batch profile starts at 8; Triton sends batches from 1"):
        export_triton(TritonExportConfig(later, tmp_path / "r4", variant="tensorrt-fp16", platform="tensorrt",
                                         max_batch=16))
    with pytest.raises(errors.BundleError, match="has no TensorRT plan; build one on the target GPU"):
        export_triton(TritonExportConfig(bundle, tmp_path / "r3", platform="tensorrt"))
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


# --- Ray Data indexing and sharded search ------------------------------------------------------
@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from clipfold.compile.tiny import data

    root = tmp_path_factory.mktemp("photos")
    samples = data.generate(90, seed=41)
    for part in range(3):  # three sub-folders: one index each for the sharded search
        _write_images(root / f"part{part}", samples[part * 30:(part + 1) * 30])
    return root


def _rows(index) -> dict[str, np.ndarray]:
    rows = np.concatenate([shard.rows for shard in index.gallery.shards]).astype(np.float32)
    live = {tuple(v[2:]) for v in index.meta["files"].values()}
    offsets = np.cumsum([0] + [s["count"] for s in index.meta["shards"]])
    ids = index.gallery.ids_of(np.arange(len(index.gallery)))
    return {str(ids[o + r]): rows[o + r] for shard, o in enumerate(offsets[:-1])
            for r in range(index.meta["shards"][shard]["count"]) if (shard, r) in live}


def test_ray_index_equals_the_single_process_index_and_resumes(tiny_bundle, photos, tmp_path, capsys, monkeypatch):
    pytest.importorskip("ray.data", reason="clipfold index --ray needs ray[data]")
    import clipfold.runtime.retrieval.index as index_module
    from clipfold.runtime.retrieval.index import Index, build_index

    monkeypatch.setattr(index_module, "BATCH_FILES", 32)  # several shards from the Ray stream
    assert main(["index", str(tiny_bundle.path), str(photos), "--out", str(tmp_path / "ray"), "--ray",
                 "--actors", "2"]) == 0
    assert "(Ray, 2 actors)" in capsys.readouterr().err
    ray_index = Index.open(tmp_path / "ray")
    single = build_index(Engine.open(tiny_bundle.path), photos, tmp_path / "single")
    assert len(ray_index) == len(single) == 90 and len(ray_index.meta["shards"]) == 3
    by_ray, by_one = _rows(ray_index), _rows(single)
    assert sorted(by_ray) == sorted(by_one)
    assert max(float(np.abs(by_ray[k] - by_one[k]).max()) for k in by_one) < 1e-5
    # Resumable: a re-run embeds nothing; a new image alone is embedded (by Ray) on the next run.
    assert main(["index", str(tiny_bundle.path), str(photos), "--out", str(tmp_path / "ray"), "--ray"]) == 0
    assert "is up to date (90 images)" in capsys.readouterr().err
    # The runs below join a Ray instance already running in this process, as a driver script would
    # start it, and leave it running (the first run started and stopped its own).
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    shutil.copy(next((photos / "part0").iterdir()), photos / "extra.png")
    try:
        assert main(["index", str(tiny_bundle.path), str(photos), "--out", str(tmp_path / "ray"), "--ray"]) == 0
        assert "indexed 1/1 new or changed images (Ray" in capsys.readouterr().err
        assert len(Index.open(tmp_path / "ray")) == 91
        # A broken image is recorded and named, as without Ray (exit 1); with --strict an actor's error
        # reaches the user as clipfold's own, not as a Ray traceback.
        broken = _write_images(tmp_path / "broken", [])
        (broken / "bad.png").write_bytes(b"\x89PNG not really")
        assert main(["index", str(tiny_bundle.path), str(broken), "--out", str(tmp_path / "broken.index"),
                     "--ray"]) == 1
        assert "  bad.png: cannot decode image" in capsys.readouterr().err
        assert list(Index.open(tmp_path / "broken.index").failed) == ["bad.png"]
        assert main(["index", str(tiny_bundle.path), str(broken), "--out", str(tmp_path / "strict.index"), "--ray",
                     "--strict"]) == 2
        err = capsys.readouterr().err
        assert "error: cannot decode image" in err and "bad.png" in err
        assert ray.is_initialized()  # not stopped by clipfold: it did not start it
    finally:
        ray.shutdown()
        (photos / "extra.png").unlink()


def test_sharded_search_equals_one_index(tiny_bundle, photos, tmp_path, capsys):
    from clipfold.runtime.retrieval.index import Index, ShardedIndex, build_index

    engine = Engine.open(tiny_bundle.path)
    whole = build_index(engine, photos, tmp_path / "whole")
    parts = [build_index(engine, photos / f"part{i}", tmp_path / f"part{i}") for i in range(3)]
    sharded = ShardedIndex(parts)
    assert len(sharded) == 90 and len(sharded.gallery.shards) == 3
    folder = {str(ix.path): Path(ix.meta["folder"]) for ix in parts}
    queries = [next((photos / "part1").iterdir()), next((photos / "part2").iterdir())]
    for query in queries:
        one = whole.search(engine, image=query, k=90).hits
        many = sharded.search(engine, image=query, k=90).hits
        assert [str(photos / h.path) for h in one] == [str(folder[h.index] / h.path) for h in many]
        assert np.allclose([h.score for h in one], [h.score for h in many], atol=1e-6)
    # k smaller than a shard and the CLI with several indexes.
    top = sharded.search(engine, image=queries[0], k=3).hits
    assert [h.path for h in top] == [Path(h.path).name for h in whole.search(engine, image=queries[0], k=3).hits]
    assert main(["search", *(str(tmp_path / f"part{i}") for i in range(3)), "--image", str(queries[0]), "--k", "2",
                 "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert hits[0]["path"] == queries[0].name and hits[0]["index"] == str(tmp_path / "part1")
    # Indexes of different bundles cannot be merged: refused naming both.
    other = Index.open(tmp_path / "part0")
    other.meta = {**other.meta, "bundle": {**other.meta["bundle"], "sha256": "0" * 64}}
    with pytest.raises(errors.BundleError, match="part1 and .*part0 were built with different bundles .*000000000000"):
        ShardedIndex([parts[1], other])
    # Overlapping folders would count images twice.
    with pytest.raises(errors.ConfigError, match="overlapping folders"):
        ShardedIndex([whole, parts[0]])
