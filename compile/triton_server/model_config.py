"""The ``config.pbtxt`` of each model in an exported Triton repository, built as Triton's own
``ModelConfig`` protobuf (shipped in ``tritonclient.grpc.model_config_pb2``), and the names the
export (``repository.py``) and its check (``validate.py``) share: the marker file, the platforms
and the dtype tables. ``cfg`` is always the export's ``TritonExportConfig`` (``repository.py``; not
imported here, so that the export imports this module and not the reverse).
"""

from __future__ import annotations

from clipfold.errors import ConfigError
from clipfold.runtime.bundle.schema import Variant

MARKER = "clipfold-export.json"  # Triton scans sub-folders only: a file at the root is ignored
KINDS = ("cpu", "gpu")
# --backend -> (Triton platform, model-name suffix, file in the model's version folder)
PLATFORMS = {"onnxruntime": ("onnxruntime_onnx", "onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "trt", "model.plan")}

# manifest dtype -> Triton DataType name; the ONNX Runtime type string of each.
TRITON_DTYPES = {"uint8": "TYPE_UINT8", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
                 "float16": "TYPE_FP16", "float32": "TYPE_FP32", "bytes": "TYPE_STRING"}
ORT_DTYPES = {"tensor(uint8)": "TYPE_UINT8", "tensor(int32)": "TYPE_INT32", "tensor(int64)": "TYPE_INT64",
              "tensor(float16)": "TYPE_FP16", "tensor(float)": "TYPE_FP32", "tensor(string)": "TYPE_STRING"}


def protobuf():
    """Triton's ``model_config_pb2`` and protobuf's ``text_format``, or a ConfigError saying what to install."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise ConfigError(f"exporting a Triton repository needs Triton's model_config protobuf ({exc}); "
                          "install it with: pip install 'clipfold[tritonserver]'") from None
    return model_config_pb2, text_format


def batch_dims(shape, batched: bool) -> list[int]:
    """A manifest shape as Triton dims: without the batch dim when the model batches, -1 for dynamic dims."""
    dims = list(shape[1:] if batched else shape)
    return [d if isinstance(d, int) else -1 for d in dims]


def tensor(pb, name: str, dtype: str, dims: list[int]):
    return {"name": name, "data_type": pb.DataType.Value(dtype), "dims": dims}


def model_names(cfg) -> dict[str, str]:
    """The names of the three models the ensemble ``cfg.name`` chains."""
    suffix = PLATFORMS[cfg.platform][1]
    return {"preprocess": f"{cfg.name}_preprocess", "engine": f"{cfg.name}_{suffix}", "labels": f"{cfg.name}_labels"}


def repository_configs(pb, cfg, names: dict[str, str], variant: Variant) -> dict:
    """Every model's ModelConfig by model name: the ensemble, the engine and the two Python models."""
    pixels = variant.inputs[0]
    k = batch_dims(next(s for s in variant.outputs if s.name == "indices").shape, True)
    return {
        cfg.name: ensemble_config(pb, cfg, names, variant),
        names["engine"]: engine_config(pb, cfg, names["engine"], variant),
        names["preprocess"]: python_config(
            pb, names["preprocess"], cfg.max_batch, [tensor(pb, "IMAGE", "TYPE_STRING", [1])],
            [tensor(pb, "pixels", "TYPE_UINT8", batch_dims(pixels.shape, True))], cfg.preprocess_instances,
            batching=True),
        names["labels"]: python_config(
            pb, names["labels"], cfg.max_batch, [tensor(pb, "indices", "TYPE_INT64", k)],
            [tensor(pb, "labels", "TYPE_STRING", k)], 1),
    }


def engine_config(pb, cfg, name: str, variant: Variant):
    """The engine model: the graph (or plan) with dynamic batching, ``cfg.instances`` instances and a
    zero-filled warm-up batch of one."""
    config = pb.ModelConfig(name=name, platform=PLATFORMS[cfg.platform][0], max_batch_size=cfg.max_batch)
    for spec in variant.inputs:
        config.input.add(**tensor(pb, spec.name, TRITON_DTYPES[spec.dtype], batch_dims(spec.shape, True)))
    for spec in variant.outputs:
        config.output.add(**tensor(pb, spec.name, TRITON_DTYPES[spec.dtype], batch_dims(spec.shape, True)))
    config.dynamic_batching.preferred_batch_size.extend(cfg.preferred_batch)
    config.dynamic_batching.max_queue_delay_microseconds = cfg.max_queue_delay_us
    kind = pb.ModelInstanceGroup.Kind.Value("KIND_GPU" if cfg.kind == "gpu" else "KIND_CPU")
    config.instance_group.add(count=cfg.instances, kind=kind)
    warmup = config.model_warmup.add(name="zeros", batch_size=1)
    for spec in variant.inputs:
        warmup.inputs[spec.name].data_type = pb.DataType.Value(TRITON_DTYPES[spec.dtype])
        warmup.inputs[spec.name].dims.extend(batch_dims(spec.shape, True))
        warmup.inputs[spec.name].zero_data = True
    return config


def python_config(pb, name: str, max_batch: int, inputs: list[dict], outputs: list[dict], instances: int,
                  batching: bool = False):
    """A Python-backend model on CPU instances (preprocess decodes images, labels maps indices to names)."""
    config = pb.ModelConfig(name=name, backend="python", max_batch_size=max_batch)
    if batching:  # hand each instance every waiting request at once (execute takes a list)
        config.dynamic_batching.max_queue_delay_microseconds = 0
    for spec in inputs:
        config.input.add(**spec)
    for spec in outputs:
        config.output.add(**spec)
    config.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.Kind.Value("KIND_CPU"))
    return config


def ensemble_config(pb, cfg, names: dict[str, str], variant: Variant):
    """The ensemble: IMAGE -> preprocess -> engine -> labels, exposing the engine's outputs upper-cased."""
    outputs = {spec.name: spec for spec in variant.outputs}
    config = pb.ModelConfig(name=cfg.name, platform="ensemble", max_batch_size=cfg.max_batch)
    config.input.add(**tensor(pb, "IMAGE", "TYPE_STRING", [1]))
    k = batch_dims(outputs["indices"].shape, True)
    config.output.add(**tensor(pb, "LABELS", "TYPE_STRING", k))
    for spec in variant.outputs:
        config.output.add(**tensor(pb, spec.name.upper(), TRITON_DTYPES[spec.dtype], batch_dims(spec.shape, True)))
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
