"""``clipfold export triton``: a bundle as a Triton Inference Server model repository.

Triton already batches, schedules and scales engines across GPUs and nodes; clipfold hands it the
verified graph instead of growing its own cluster server. The repository holds four models::

    REPO/NAME/                 ensemble: IMAGE (encoded bytes) -> LABELS, SCORES, INDICES, EMBEDDING
    REPO/NAME_preprocess/      Python backend: bytes -> uint8 pixels, clipfold's exact open_clip transform
    REPO/NAME_onnx/            onnxruntime backend: the bundle's graph (1/model.onnx), dynamic batching
    REPO/NAME_labels/          Python backend: class indices -> label strings (labels.txt)

Every ``config.pbtxt`` is built as Triton's own ``ModelConfig`` protobuf (``model_config.py``)
and, once written, parsed back and checked against the graph: names, dtypes and dims of the engine
against the ONNX session's inputs and outputs, and every tensor of the ensemble against the model
that produces or consumes it (``validate.py``). The repository is written to a hidden sibling
folder and renamed into place only after it validates, like a bundle. This module holds the export
config, what makes a variant exportable, and the copying of the files.

The Python models import ``clipfold.runtime`` (numpy, Pillow, onnxruntime; no torch): install
clipfold in the Python backend's environment (``pip install clipfold`` in the Triton image, or an
``EXECUTION_ENV_PATH`` conda-pack).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from clipfold.compile.triton_server.model_config import (
    KINDS,
    MARKER,
    ORT_DTYPES,
    PLATFORMS,
    model_names,
    protobuf,
    repository_configs,
)
from clipfold.compile.triton_server.validate import validate_repository
from clipfold.errors import BundleError, ConfigError
from clipfold.runtime.bundle.schema import Manifest, Variant
from clipfold.runtime.bundle.write import replace_dir

PYTHON_MODELS = Path(__file__).with_name("python_models")


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
            raise ConfigError("a TensorRT plan runs on a GPU: --device gpu (the default with --backend tensorrt)")


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
                          "for ONNX Runtime; export its TensorRT plan with --backend tensorrt, or another variant")
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

    pb, text_format = protobuf()
    manifest = Manifest.read(cfg.bundle)  # refuses newer schemas
    verify_files(cfg.bundle, manifest)  # every checksum
    variant = manifest.variant(cfg.variant)
    _check_exportable(manifest, variant, cfg.platform)
    target = _target(cfg)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    record = _plan(variant, cfg) if cfg.platform == "tensorrt" else None
    names = model_names(cfg)
    configs = repository_configs(pb, cfg, names, variant)
    try:
        for name, config in configs.items():
            (stage / name / "1").mkdir(parents=True)
            (stage / name / "config.pbtxt").write_text(text_format.MessageToString(config), encoding="utf-8")
        plan = _copy_engine(cfg, manifest, variant, record, stage / names["engine"])
        _copy_python_models(manifest, stage, names)
        (stage / MARKER).write_text(json.dumps({
            "bundle": str(cfg.bundle.resolve()), "model": manifest.model.name, "variant": variant.name,
            "sha256": manifest.files[variant.file], "ensemble": cfg.name, "models": sorted(configs),
            "labels_model": names["labels"], "classes": len(manifest.labels), **plan}, indent=2) + "\n",
            encoding="utf-8")
        validate_repository(stage)
        replace_dir(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def _target(cfg: TritonExportConfig) -> Path:
    """``cfg.out`` as an absolute path, refused if it exists unless --overwrite and clipfold exported it."""
    target = cfg.out.absolute()
    if target.exists():
        if not cfg.overwrite:
            raise ConfigError(f"{target} already exists; pass --overwrite to replace it")
        if not (target / MARKER).is_file():
            raise ConfigError(f"{target} exists and is not a repository clipfold exported; refusing to replace it")
    return target


def _copy_engine(cfg: TritonExportConfig, manifest: Manifest, variant: Variant, record, engine_dir: Path) -> dict:
    """Copy the graph (and its external weights) or the plan into ``engine_dir/1``; for a plan, return the
    marker's ``plan`` entry (a plan cannot be read without TensorRT: it records the tensors of the graph
    it was built from), else nothing."""
    engine_file = engine_dir / "1" / PLATFORMS[cfg.platform][2]
    if record is None:
        shutil.copyfile(cfg.bundle / variant.file, engine_file)
        for location in _external_data(cfg.bundle / variant.file):  # weights of graphs over ~1.5 GB
            (engine_dir / "1" / location).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cfg.bundle / location, engine_dir / "1" / location)
        return {}
    shutil.copyfile(cfg.bundle / record.file, engine_file)
    return {"plan": {"model": engine_dir.name, "file": record.file, "sha256": manifest.files[record.file],
                     "gpu": record.gpu, "compute_capability": record.compute_capability, "tensorrt": record.tensorrt,
                     "profile": record.profile, **_onnx_io(cfg.bundle / variant.file)}}


def _copy_python_models(manifest: Manifest, stage: Path, names: dict[str, str]) -> None:
    """The preprocess model with the bundle's preprocessing, and the labels model with its labels."""
    shutil.copyfile(PYTHON_MODELS / "preprocess.py", stage / names["preprocess"] / "1" / "model.py")
    (stage / names["preprocess"] / "preprocess.json").write_text(
        json.dumps(asdict(manifest.preprocess), indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(PYTHON_MODELS / "labels.py", stage / names["labels"] / "1" / "model.py")
    (stage / names["labels"] / "labels.txt").write_text("\n".join(manifest.labels) + "\n", encoding="utf-8")
