"""``validate_repository``: every ``config.pbtxt`` of a Triton model repository parsed with Triton's
``ModelConfig`` and checked against what it serves: names, dtypes and dims of the engine against the
ONNX session's inputs and outputs (or, for a TensorRT plan, the graph it was built from, kept in the
export's marker), every tensor of the ensemble against the model that produces or consumes it,
warm-up inputs, preferred batch sizes, and the label count. Every problem is listed, not only the first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from clipfold.compile.triton_server.model_config import MARKER, ORT_DTYPES, protobuf
from clipfold.errors import VerificationError


@dataclass
class _Repo:
    """What :func:`validate_repository` found: every model's parsed config by name."""

    configs: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def validate_repository(repo_path: str | Path) -> dict:
    """Parse every ``config.pbtxt`` with Triton's ModelConfig and check it; raise listing every problem.

    Returns the parsed configs by model name.
    """
    protobuf()  # without Triton's protobuf, say what to install before anything else
    root = Path(repo_path)
    model_dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not model_dirs:
        raise VerificationError(f"{root} holds no model folders; expected a Triton model repository")
    repo = _Repo()
    for model_dir in model_dirs:
        config = _parse(model_dir, repo.problems)
        if config is not None:
            _check_warmup(config, repo.problems)
            _check_batching(config, repo.problems)
            repo.configs[config.name] = config
    for config in repo.configs.values():
        _check_model(root, config, repo)
    _check_labels(root, repo.problems)
    if repo.problems:
        raise VerificationError(f"Triton repository {root} is invalid:\n  " + "\n  ".join(repo.problems), repo.problems)
    return repo.configs


def _parse(model_dir: Path, problems: list[str]):
    """The folder's config.pbtxt as a ModelConfig named like its folder, or None (its problem noted)."""
    pb, text_format = protobuf()
    path = model_dir / "config.pbtxt"
    if not path.is_file():
        problems.append(f"{model_dir.name}: config.pbtxt is missing")
        return None
    try:
        config = text_format.Parse(path.read_text(encoding="utf-8"), pb.ModelConfig())
    except text_format.ParseError as exc:
        problems.append(f"{path}: not a valid Triton ModelConfig: {exc}")
        return None
    if config.name != model_dir.name:
        problems.append(f"{path}: name {config.name!r} differs from its folder {model_dir.name!r}")
    return config


def _check_warmup(config, problems: list[str]) -> None:
    """Each warm-up feeds declared inputs with their dtype and fully fixed dims."""
    pb, _ = protobuf()
    declared = {t.name: (t.data_type, list(t.dims)) for t in config.input}
    for warmup in config.model_warmup:
        for tensor, data in warmup.inputs.items():
            if tensor not in declared:
                problems.append(f"{config.name}: warm-up {warmup.name!r} feeds {tensor!r}, not an input")
            elif (data.data_type, list(data.dims)) != declared[tensor] or any(d < 1 for d in data.dims):
                problems.append(f"{config.name}: warm-up {warmup.name!r} input {tensor!r} has "
                                f"{pb.DataType.Name(data.data_type)} {list(data.dims)}; the input is "
                                f"{pb.DataType.Name(declared[tensor][0])} {declared[tensor][1]} with every "
                                "dim fixed")


def _check_batching(config, problems: list[str]) -> None:
    batching = config.dynamic_batching
    if any(b > config.max_batch_size for b in batching.preferred_batch_size):
        problems.append(f"{config.name}: preferred batch sizes {list(batching.preferred_batch_size)} exceed "
                        f"max_batch_size {config.max_batch_size}")


def _check_model(root: Path, config, repo: _Repo) -> None:
    """What the model's platform or backend needs in its folder, and an ensemble's wiring."""
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


def _check_labels(root: Path, problems: list[str]) -> None:
    """labels.txt holds as many labels as the exported bundle has classes (recorded in the marker)."""
    marker = root / MARKER
    if not marker.is_file():
        return
    record = json.loads(marker.read_text(encoding="utf-8"))
    labels = root / record["labels_model"] / "labels.txt"
    count = len(labels.read_text(encoding="utf-8").split("\n")[:-1]) if labels.is_file() else 0
    if count != record["classes"]:
        problems.append(f"{record['labels_model']}: labels.txt has {count} labels; the bundle has "
                        f"{record['classes']} classes")


def _io(config) -> tuple[dict, dict]:
    """Inputs and outputs of a parsed config as name -> (DataType name, dims)."""
    pb, _ = protobuf()
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
