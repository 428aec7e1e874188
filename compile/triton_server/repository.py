"""``clipfold export triton``: a bundle as a Triton Inference Server model repository.

Triton already batches, schedules and scales engines across GPUs and nodes; clipfold hands it the
verified graph instead of growing its own cluster server. The repository holds four models::

    REPO/NAME/                 ensemble: IMAGE (encoded bytes) -> LABELS, SCORES, INDICES, EMBEDDING
    REPO/NAME_preprocess/      Python backend: bytes -> uint8 pixels, clipfold's exact open_clip transform
    REPO/NAME_onnx/            onnxruntime backend: the bundle's graph (1/model.onnx), dynamic batching
    REPO/NAME_labels/          Python backend: class indices -> label strings (labels.txt)

Every ``config.pbtxt`` is built as Triton's own ``ModelConfig`` protobuf (shipped in
``tritonclient.grpc.model_config_pb2``) and, once written, parsed back and checked against the
graph: names, dtypes and dims of the engine against the ONNX session's inputs and outputs, and
every tensor of the ensemble against the model that produces or consumes it
(:func:`validate_repository`). The repository is written to a hidden sibling folder and renamed
into place only after it validates, like a bundle.

The Python models import ``clipfold.runtime`` (numpy, Pillow, onnxruntime; no torch): install
clipfold in the Python backend's environment (``pip install clipfold`` in the Triton image, or an
``EXECUTION_ENV_PATH`` conda-pack).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clipfold.runtime.bundle.schema import Manifest, Variant
from clipfold.runtime.bundle.write import replace_dir

from clipfold.errors import BundleError, ConfigError, VerificationError

MARKER = "clipfold-export.json"  # Triton scans sub-folders only: a file at the root is ignored
KINDS = ("cpu", "gpu")
PLATFORMS = {"onnxruntime": ("onnxruntime_onnx", "onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "trt", "model.plan")}
PYTHON_MODELS = Path(__file__).with_name("python_models")

# manifest dtype -> Triton DataType name; the ONNX Runtime type string of each.
TRITON_DTYPES = {"uint8": "TYPE_UINT8", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
                 "float16": "TYPE_FP16", "float32": "TYPE_FP32", "bytes": "TYPE_STRING"}
ORT_DTYPES = {"tensor(uint8)": "TYPE_UINT8", "tensor(int32)": "TYPE_INT32", "tensor(int64)": "TYPE_INT64",
              "tensor(float16)": "TYPE_FP16", "tensor(float)": "TYPE_FP32", "tensor(string)": "TYPE_STRING"}


@dataclass(frozen=True)
class TritonExportConfig:
    bundle: Path
    out: Path
    name: str | None = None  # the ensemble's name; default: the bundle folder's name
    variant: str | None = None  # default: the bundle's default variant
    max_batch: int = 32
    preferred_batch: tuple[int, ...] = ()  # default: max_batch // 4 and max_batch
    max_queue_delay_us: int = 5000
    instances: int = 1  # engine instances per device
    preprocess_instances: int = 2  # Python instances decoding images (each one process)
    kind: str | None = None  # default: gpu for a TensorRT plan, else cpu
    overwrite: bool = False
    platform: str = "onnxruntime"  # or "tensorrt": the variant's TensorRT plan (clipfold engine build)
    compute_capability: str | None = None  # which plan, when the variant has plans for several GPUs

    def __post_init__(self) -> None:
        object.__setattr__(self, "bundle", Path(self.bundle))
        object.__setattr__(self, "out", Path(self.out))
        name = self.name if self.name is not None else re.sub(r"[^A-Za-z0-9_.-]", "_", self.bundle.resolve().name)
        name = re.sub(r"\.bundle$", "", name) or "clipfold"
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            raise ConfigError(f"model name {name!r} is not a valid Triton model name; expected letters, digits, "
                              "'_', '.' or '-' (not starting with '.' or '-')")
        object.__setattr__(self, "name", name)
        for label, value, low in (("max batch", self.max_batch, 1), ("max queue delay (us)", self.max_queue_delay_us, 0),
                                  ("instances", self.instances, 1), ("preprocess instances", self.preprocess_instances, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{label} must be an integer >= {low}, got {value!r}")
        preferred = tuple(self.preferred_batch) or tuple(sorted({max(1, self.max_batch // 4), self.max_batch}))
        if any(not isinstance(b, int) or not 1 <= b <= self.max_batch for b in preferred):
            raise ConfigError(f"preferred batch sizes {list(preferred)} must be integers in 1..{self.max_batch} (max batch)")
        object.__setattr__(self, "preferred_batch", preferred)
        if self.platform not in PLATFORMS:
            raise ConfigError(f"platform {self.platform!r} is not one of {sorted(PLATFORMS)}")
        if self.kind is None:
            object.__setattr__(self, "kind", "gpu" if self.platform == "tensorrt" else "cpu")
        if self.kind not in KINDS:
            raise ConfigError(f"instance kind {self.kind!r} is not one of {KINDS}")
        if self.platform == "tensorrt" and self.kind != "gpu":
            raise ConfigError("a TensorRT plan runs on a GPU: --kind gpu (the default with --platform tensorrt)")


@dataclass
class _Repo:
    """What :func:`validate_repository` found: every model's parsed config by name."""

    configs: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _pb():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise ConfigError(f"exporting a Triton repository needs Triton's model_config protobuf ({exc}); "
                          "install it with: pip install 'clipfold[tritonserver]'") from None
    return model_config_pb2, text_format


def _dims(shape, batched: bool) -> list[int]:
    dims = list(shape[1:] if batched else shape)
    return [d if isinstance(d, int) else -1 for d in dims]


def _tensor(pb, name: str, dtype: str, dims: list[int]):
    return {"name": name, "data_type": pb.DataType.Value(dtype), "dims": dims}


def _engine_config(pb, cfg: TritonExportConfig, name: str, variant: Variant):
    config = pb.ModelConfig(name=name, platform=PLATFORMS[cfg.platform][0], max_batch_size=cfg.max_batch)
    for spec in variant.inputs:
        config.input.add(**_tensor(pb, spec.name, TRITON_DTYPES[spec.dtype], _dims(spec.shape, True)))
    for spec in variant.outputs:
        config.output.add(**_tensor(pb, spec.name, TRITON_DTYPES[spec.dtype], _dims(spec.shape, True)))
    config.dynamic_batching.preferred_batch_size.extend(cfg.preferred_batch)
    config.dynamic_batching.max_queue_delay_microseconds = cfg.max_queue_delay_us
    kind = pb.ModelInstanceGroup.Kind.Value("KIND_GPU" if cfg.kind == "gpu" else "KIND_CPU")
    config.instance_group.add(count=cfg.instances, kind=kind)
    warmup = config.model_warmup.add(name="zeros", batch_size=1)
    for spec in variant.inputs:
        warmup.inputs[spec.name].data_type = pb.DataType.Value(TRITON_DTYPES[spec.dtype])
        warmup.inputs[spec.name].dims.extend(_dims(spec.shape, True))
        warmup.inputs[spec.name].zero_data = True
    return config


def _python_config(pb, name: str, max_batch: int, inputs: list[dict], outputs: list[dict], instances: int,
                   batching: bool = False):
    config = pb.ModelConfig(name=name, backend="python", max_batch_size=max_batch)
    if batching:  # hand each instance every waiting request at once (execute takes a list)
        config.dynamic_batching.max_queue_delay_microseconds = 0
    for spec in inputs:
        config.input.add(**spec)
    for spec in outputs:
        config.output.add(**spec)
    config.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.Kind.Value("KIND_CPU"))
    return config


def _ensemble_config(pb, cfg: TritonExportConfig, names: dict[str, str], variant: Variant):
    outputs = {spec.name: spec for spec in variant.outputs}
    config = pb.ModelConfig(name=cfg.name, platform="ensemble", max_batch_size=cfg.max_batch)
    config.input.add(**_tensor(pb, "IMAGE", "TYPE_STRING", [1]))
    k = _dims(outputs["indices"].shape, True)
    config.output.add(**_tensor(pb, "LABELS", "TYPE_STRING", k))
    for spec in variant.outputs:
        config.output.add(**_tensor(pb, spec.name.upper(), TRITON_DTYPES[spec.dtype], _dims(spec.shape, True)))
    pixels = variant.inputs[0].name
    steps = config.ensemble_scheduling.step
    step = steps.add(model_name=names["preprocess"], model_version=-1)
    step.input_map["IMAGE"] = "IMAGE"
    step.output_map["pixels"] = "pixels"
    step = steps.add(model_name=names["engine"], model_version=-1)
    step.input_map[pixels] = "pixels"
    for spec in variant.outputs:
        step.output_map[spec.name] = spec.name.upper()
    step = steps.add(model_name=names["labels"], model_version=-1)
    step.input_map["indices"] = "INDICES"
    step.output_map["labels"] = "LABELS"
    return config


def _external_data(path: Path) -> list[str]:
    """The side files holding a graph's weights (relative paths), if it keeps them outside the protobuf."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for tensor in model.graph.initializer
                 if tensor.data_location == onnx.TensorProto.EXTERNAL
                 for entry in tensor.external_data if entry.key == "location"}
    return sorted(locations)


def _check_exportable(manifest: Manifest, variant: Variant, platform: str) -> None:
    if manifest.head.kernel is not None:
        raise BundleError("this bundle scores its head with clipfold's top-k kernel after the graph (a kernel head); "
                          "Triton would run the graph only, without the head: export a bundle whose head is in the graph")
    if variant.format != "onnx":
        raise BundleError(f"variant {variant.name!r} is a {variant.format} engine; the Triton export takes ONNX variants")
    if platform == "onnxruntime" and "onnxruntime" not in variant.backends:
        raise BundleError(f"variant {variant.name!r} ({variant.precision}) is a graph for {list(variant.backends)}, not "
                          "for ONNX Runtime; export its TensorRT plan with --platform tensorrt, or another variant")
    names = [spec.name for spec in variant.outputs]
    if len(variant.inputs) != 1 or variant.inputs[0].dtype != "uint8" or {"scores", "indices"} - set(names):
        raise BundleError(f"variant {variant.name!r} is not a pixels -> top-k graph (inputs "
                          f"{[(s.name, s.dtype) for s in variant.inputs]}, outputs {names}); expected one uint8 "
                          "input and scores and indices outputs")
    if any(spec.shape[0] != "batch" for spec in (*variant.inputs, *variant.outputs)):
        raise BundleError(f"variant {variant.name!r} has a fixed batch dimension; Triton batching needs a dynamic one")
    bad = [label for label in manifest.labels if len(label.splitlines()) != 1 or label != label.splitlines()[0]]
    if bad:
        raise BundleError(f"labels {bad[:3]} contain line breaks (or other line separators); labels.txt holds one "
                          "label per line")


def _plan(variant: Variant, cfg: TritonExportConfig):
    """The TensorRT engine record of ``variant`` to export (one per GPU it was built on)."""
    if not variant.engines:
        raise BundleError(f"variant {variant.name!r} has no TensorRT plan; build one on the target GPU with "
                          f"clipfold engine build {cfg.bundle} --variant {variant.name}")
    wanted = [e for e in variant.engines if cfg.compute_capability in (None, e.compute_capability)]
    if len(wanted) != 1:
        have = ", ".join(f"{e.gpu} (compute capability {e.compute_capability}, TensorRT {e.tensorrt})"
                         for e in variant.engines)
        raise ConfigError(f"variant {variant.name!r} has plans for {have}; pick one with --compute-capability"
                          if not wanted or cfg.compute_capability is None else f"two plans match: {have}")
    record = wanted[0]
    if record.profile["min"] != 1:  # Triton sends any batch from 1 up (a lone request, the warm-up) and never pads
        raise ConfigError(f"the plan's batch profile starts at {record.profile['min']}; Triton sends batches from 1: "
                          f"rebuild it with clipfold engine build --min-batch 1")
    if cfg.max_batch > record.profile["max"]:
        raise ConfigError(f"the plan runs batches 1..{record.profile['max']}; max batch {cfg.max_batch} must lie inside")
    return record


def _onnx_io(path: Path) -> dict:
    """The graph's inputs and outputs as Triton sees them with batching: name -> [TYPE_*, dims].
    Read from the protobuf, not a session: a TensorRT-bound graph need not run on ONNX Runtime's CPU."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}

    def spec(value):
        tensor = value.type.tensor_type
        dtype = f"tensor({onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name.replace('float32', 'float')})"
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim][1:]
        return [ORT_DTYPES.get(dtype, dtype), dims]

    return {"inputs": {v.name: spec(v) for v in graph.input if v.name not in initializers},
            "outputs": {v.name: spec(v) for v in graph.output}}


def export_triton(cfg: TritonExportConfig) -> Path:
    """Write the repository for ``cfg.bundle`` at ``cfg.out``, validated, atomically. Returns the path."""
    from clipfold.runtime.engine import verify_files

    pb, text_format = _pb()
    manifest = Manifest.read(cfg.bundle)  # refuses newer schemas
    verify_files(cfg.bundle, manifest)  # every checksum
    variant = manifest.variant(cfg.variant)
    bundle = Path(cfg.bundle)
    _check_exportable(manifest, variant, cfg.platform)
    target = cfg.out.absolute()
    if target.exists():
        if not cfg.overwrite:
            raise ConfigError(f"{target} already exists; pass --overwrite to replace it")
        if not (target / MARKER).is_file():
            raise ConfigError(f"{target} exists and is not a repository clipfold exported; refusing to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    record = _plan(variant, cfg) if cfg.platform == "tensorrt" else None
    _, suffix, engine_file = PLATFORMS[cfg.platform]
    names = {"preprocess": f"{cfg.name}_preprocess", "engine": f"{cfg.name}_{suffix}", "labels": f"{cfg.name}_labels"}
    pixels = variant.inputs[0]
    k = _dims(next(s for s in variant.outputs if s.name == "indices").shape, True)
    configs = {
        cfg.name: _ensemble_config(pb, cfg, names, variant),
        names["engine"]: _engine_config(pb, cfg, names["engine"], variant),
        names["preprocess"]: _python_config(
            pb, names["preprocess"], cfg.max_batch, [_tensor(pb, "IMAGE", "TYPE_STRING", [1])],
            [_tensor(pb, "pixels", "TYPE_UINT8", _dims(pixels.shape, True))], cfg.preprocess_instances, batching=True),
        names["labels"]: _python_config(
            pb, names["labels"], cfg.max_batch, [_tensor(pb, "indices", "TYPE_INT64", k)],
            [_tensor(pb, "labels", "TYPE_STRING", k)], 1),
    }
    try:
        for name, config in configs.items():
            (stage / name / "1").mkdir(parents=True)
            (stage / name / "config.pbtxt").write_text(text_format.MessageToString(config), encoding="utf-8")
        extra = {}
        if record is None:
            shutil.copyfile(bundle / variant.file, stage / names["engine"] / "1" / engine_file)
            for location in _external_data(bundle / variant.file):  # weights of graphs over ~1.5 GB
                (stage / names["engine"] / "1" / location).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(bundle / location, stage / names["engine"] / "1" / location)
        else:  # a plan cannot be read without TensorRT: record the tensors of the graph it was built from
            shutil.copyfile(bundle / record.file, stage / names["engine"] / "1" / engine_file)
            extra = {"plan": {"model": names["engine"], "file": record.file, "sha256": manifest.files[record.file],
                              "gpu": record.gpu,
                              "compute_capability": record.compute_capability, "tensorrt": record.tensorrt,
                              "profile": record.profile, **_onnx_io(bundle / variant.file)}}
        shutil.copyfile(PYTHON_MODELS / "preprocess.py", stage / names["preprocess"] / "1" / "model.py")
        (stage / names["preprocess"] / "preprocess.json").write_text(
            json.dumps(asdict(manifest.preprocess), indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(PYTHON_MODELS / "labels.py", stage / names["labels"] / "1" / "model.py")
        (stage / names["labels"] / "labels.txt").write_text("\n".join(manifest.labels) + "\n", encoding="utf-8")
        (stage / MARKER).write_text(json.dumps({
            "bundle": str(bundle.resolve()), "model": manifest.model.name, "variant": variant.name,
            "sha256": manifest.files[variant.file], "ensemble": cfg.name, "models": sorted(configs),
            "labels_model": names["labels"], "classes": len(manifest.labels), **extra}, indent=2) + "\n",
            encoding="utf-8")
        validate_repository(stage)
        replace_dir(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


# --- validation --------------------------------------------------------------------------------
def _io(config) -> tuple[dict, dict]:
    """Inputs and outputs of a parsed config as name -> (DataType name, dims)."""
    pb, _ = _pb()
    name = pb.DataType.Name
    return ({t.name: (name(t.data_type), list(t.dims)) for t in config.input},
            {t.name: (name(t.data_type), list(t.dims)) for t in config.output})


def _check_onnx(model_dir: Path, config, problems: list[str]) -> None:
    import onnxruntime as ort

    path = model_dir / "1" / "model.onnx"
    if not path.is_file():
        problems.append(f"{config.name}: {path} is missing")
        return
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types; report, do not crash
        problems.append(f"{config.name}: ONNX Runtime cannot load {path}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]}")
        return
    inputs, outputs = _io(config)
    batched = config.max_batch_size > 0
    for kind, declared, actual in (("input", inputs, session.get_inputs()), ("output", outputs, session.get_outputs())):
        graph = {arg.name: arg for arg in actual}
        if set(declared) != set(graph):
            problems.append(f"{config.name}: config {kind}s {sorted(declared)} differ from the ONNX graph's {sorted(graph)}")
            continue
        for tensor, (dtype, dims) in declared.items():
            arg = graph[tensor]
            if ORT_DTYPES.get(arg.type) != dtype:
                problems.append(f"{config.name}: {kind} {tensor!r} is {dtype} in config.pbtxt but {arg.type} in the graph")
            shape = list(arg.shape)
            if batched and (not shape or isinstance(shape[0], int)):
                problems.append(f"{config.name}: max_batch_size {config.max_batch_size} needs a dynamic first dim on "
                                f"{kind} {tensor!r}; the graph has {shape}")
                continue
            expected = [d if isinstance(d, int) else -1 for d in (shape[1:] if batched else shape)]
            if dims != expected:
                problems.append(f"{config.name}: {kind} {tensor!r} dims {dims} in config.pbtxt, {expected} in the graph")


def _check_plan(root: Path, model_dir: Path, config, problems: list[str]) -> None:
    """A plan is checked against the tensors of the ONNX graph it was built from (kept in the marker)."""
    from clipfold.runtime.bundle.files import sha256_file

    marker = root / MARKER
    plan = json.loads(marker.read_text(encoding="utf-8")).get("plan") if marker.is_file() else None
    if not plan or plan.get("model") != config.name:
        problems.append(f"{config.name}: no record of the graph its plan was built from ({MARKER}); export it with "
                        "clipfold export triton")
        return
    file = model_dir / "1" / "model.plan"
    if not file.is_file() or sha256_file(file) != plan["sha256"]:
        problems.append(f"{config.name}: 1/model.plan is missing or is not the exported plan {plan['file']} "
                        "(sha256 differs)")
    if any(group.kind != group.KIND_GPU for group in config.instance_group):
        problems.append(f"{config.name}: a TensorRT plan runs on GPU instances only (instance_group kind KIND_GPU)")
    if plan["profile"]["min"] != 1:
        problems.append(f"{config.name}: the plan's batch profile starts at {plan['profile']['min']}; Triton sends "
                        "batches from 1")
    inputs, outputs = _io(config)
    for kind, declared in (("inputs", inputs), ("outputs", outputs)):
        expected = {name: (dtype, list(dims)) for name, (dtype, dims) in plan[kind].items()}
        if declared != expected:
            problems.append(f"{config.name}: config {kind} {declared} differ from the plan's graph {expected}")
    if config.max_batch_size > plan["profile"]["max"]:
        problems.append(f"{config.name}: max_batch_size {config.max_batch_size} exceeds the plan's profile "
                        f"maximum {plan['profile']['max']}")


def _check_ensemble(config, repo: _Repo) -> None:
    problems, name = repo.problems, config.name
    inputs, outputs = _io(config)
    available = dict(inputs)  # ensemble tensor -> (dtype, dims) once something produces it
    used: set[str] = set()
    for index, step in enumerate(config.ensemble_scheduling.step):
        where = f"{name}: step {index} ({step.model_name})"
        model = repo.configs.get(step.model_name)
        if model is None:
            problems.append(f"{where}: no model {step.model_name!r} in the repository")
            continue
        if model.max_batch_size < config.max_batch_size:
            problems.append(f"{where}: max_batch_size {model.max_batch_size} is below the ensemble's {config.max_batch_size}")
        model_in, model_out = _io(model)
        if set(step.input_map) != set(model_in):
            problems.append(f"{where}: input_map covers {sorted(step.input_map)}, the model takes {sorted(model_in)}")
        for model_tensor, ensemble_tensor in step.input_map.items():
            used.add(ensemble_tensor)
            if ensemble_tensor not in available:
                problems.append(f"{where}: reads {ensemble_tensor!r} before anything produces it")
            elif model_tensor in model_in and available[ensemble_tensor] != model_in[model_tensor]:
                problems.append(f"{where}: {ensemble_tensor!r} is {available[ensemble_tensor]} but input {model_tensor!r} "
                                f"expects {model_in[model_tensor]}")
        for model_tensor, ensemble_tensor in step.output_map.items():
            if model_tensor not in model_out:
                problems.append(f"{where}: output_map names {model_tensor!r}; the model outputs {sorted(model_out)}")
            elif ensemble_tensor in available:
                problems.append(f"{where}: {ensemble_tensor!r} is already produced by an earlier step or the input")
            else:
                available[ensemble_tensor] = model_out[model_tensor]
    for tensor in sorted(set(inputs) - used):
        problems.append(f"{name}: input {tensor!r} is read by no step")
    for tensor, spec in outputs.items():
        if tensor not in available:
            problems.append(f"{name}: output {tensor!r} is produced by no step")
        elif available[tensor] != spec:
            problems.append(f"{name}: output {tensor!r} is declared {spec} but its step produces {available[tensor]}")


def validate_repository(repo_path: str | Path) -> dict:
    """Parse every ``config.pbtxt`` with Triton's ModelConfig and check it; raise listing every problem.

    Returns the parsed configs by model name.
    """
    pb, text_format = _pb()
    root = Path(repo_path)
    repo = _Repo()
    model_dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not model_dirs:
        raise VerificationError(f"{root} holds no model folders; expected a Triton model repository")
    for model_dir in model_dirs:
        path = model_dir / "config.pbtxt"
        if not path.is_file():
            repo.problems.append(f"{model_dir.name}: config.pbtxt is missing")
            continue
        try:
            config = text_format.Parse(path.read_text(encoding="utf-8"), pb.ModelConfig())
        except text_format.ParseError as exc:
            repo.problems.append(f"{path}: not a valid Triton ModelConfig: {exc}")
            continue
        if config.name != model_dir.name:
            repo.problems.append(f"{path}: name {config.name!r} differs from its folder {model_dir.name!r}")
        declared = {t.name: (t.data_type, list(t.dims)) for t in config.input}
        for warmup in config.model_warmup:
            for tensor, data in warmup.inputs.items():
                if tensor not in declared:
                    repo.problems.append(f"{config.name}: warm-up {warmup.name!r} feeds {tensor!r}, not an input")
                elif (data.data_type, list(data.dims)) != declared[tensor] or any(d < 1 for d in data.dims):
                    repo.problems.append(f"{config.name}: warm-up {warmup.name!r} input {tensor!r} has "
                                         f"{pb.DataType.Name(data.data_type)} {list(data.dims)}; the input is "
                                         f"{pb.DataType.Name(declared[tensor][0])} {declared[tensor][1]} with every "
                                         "dim fixed")
        batching = config.dynamic_batching
        if any(b > config.max_batch_size for b in batching.preferred_batch_size):
            repo.problems.append(f"{config.name}: preferred batch sizes {list(batching.preferred_batch_size)} exceed "
                                 f"max_batch_size {config.max_batch_size}")
        repo.configs[config.name] = config
    for config in repo.configs.values():
        model_dir = root / config.name
        if config.platform == "onnxruntime_onnx":
            _check_onnx(model_dir, config, repo.problems)
        elif config.platform == "tensorrt_plan":
            _check_plan(root, model_dir, config, repo.problems)
        elif config.backend == "python":
            if not (model_dir / "1" / "model.py").is_file():
                repo.problems.append(f"{config.name}: 1/model.py is missing")
        elif config.platform == "ensemble":
            _check_ensemble(config, repo)
        else:
            repo.problems.append(f"{config.name}: platform {config.platform!r} / backend {config.backend!r} "
                                 "is not one clipfold exports")
    marker = root / MARKER
    if marker.is_file():
        record = json.loads(marker.read_text(encoding="utf-8"))
        labels = root / record["labels_model"] / "labels.txt"
        count = len(labels.read_text(encoding="utf-8").split("\n")[:-1]) if labels.is_file() else 0
        if count != record["classes"]:
            repo.problems.append(f"{record['labels_model']}: labels.txt has {count} labels; the bundle has "
                                 f"{record['classes']} classes")
    if repo.problems:
        raise VerificationError(f"Triton repository {root} is invalid:\n  " + "\n  ".join(repo.problems), repo.problems)
    return repo.configs
