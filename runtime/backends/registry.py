"""Backend names -> the module and class that run them, imported only when a backend is opened.

Every backend subclasses :class:`~.base.Backend` (the protocol, in a module that imports no
backend); this registry is the only module that knows them all, and no backend module imports it,
so the base, the backends and the registry form no circle. A backend whose library is absent
(``openvino``, TensorRT, onnxruntime-gpu) costs nothing until it is asked for by name, and is then
reported by name.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from clipfold.errors import BackendUnavailableError
from clipfold.runtime.backends.base import Backend
from clipfold.runtime.bundle.schema import ExtraHead, Variant

# name -> (module of clipfold.runtime.backends, class)
BACKENDS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("onnxruntime", "OnnxRuntimeBackend"),
    "onnxruntime-cuda": ("onnxruntime", "OnnxRuntimeCudaBackend"),
    "native": ("native", "NativeBackend"),
    "openvino": ("openvino", "OpenVinoBackend"),
    "tensorrt": ("tensorrt", "TensorRTBackend"),
}
GPU_BACKENDS = ("tensorrt", "onnxruntime-cuda")  # known names whose backends come with clipfold[gpu]


def backend_class(name: str) -> type[Backend]:
    """The class registered as ``name``, its module imported now (the library it wraps is imported
    only when the class opens a graph)."""
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; available: {sorted(BACKENDS)}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(f".{module}", __package__), cls)


def open_backend(name: str, graph: Variant | ExtraHead, path: Path, threads: int | None = None,
                 spin: bool = True) -> Backend:
    """A backend for one graph of the bundle: a variant, or an extra head. ``threads`` and
    ``spin`` (see :class:`~.onnxruntime.OnnxRuntimeBackend`) apply to the ONNX Runtime backends."""
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; available: {sorted(BACKENDS)}")
    runs_on = getattr(graph, "backends", (name,))
    if name == "onnxruntime-cuda":
        runs_on = ("onnxruntime-cuda",) if "onnxruntime" in runs_on else runs_on  # the same graphs, on the GPU
    if name == "openvino" and isinstance(graph, Variant) and graph.format == "onnx" and graph.precision == "fp32":
        runs_on = (*runs_on, "openvino")  # OpenVINO reads the fp32 graph too, and runs it in f32
    if name == "tensorrt":
        if not isinstance(graph, Variant):
            raise BackendUnavailableError(f"extra head {graph.name!r} runs on onnxruntime only; open it with that backend")
        if "tensorrt" not in graph.backends and not graph.engines:
            missing = "" if importlib.util.find_spec("tensorrt") else \
                " (and TensorRT is not installed here: install clipfold[gpu] on a machine with an NVIDIA GPU)"
            raise BackendUnavailableError(
                f"variant {graph.name!r} ({graph.precision}) is a graph for {list(graph.backends)}, not for TensorRT; "
                f"TensorRT runs the tensorrt-* and fp8 variants (compile --backend tensorrt){missing}")
        from clipfold.runtime.backends.tensorrt import open_tensorrt

        return open_tensorrt(graph, Path(path).parent)
    if name not in runs_on:
        hint = " (install clipfold[gpu] on a machine with an NVIDIA GPU)" if "tensorrt" in runs_on else ""
        raise BackendUnavailableError(
            f"variant {graph.name!r} ({getattr(graph, 'precision', '?')}) runs on {list(runs_on)}, not on {name!r}"
            f"{hint}; pick another variant with --variant")
    cls = backend_class(name)
    if name == "openvino":  # OpenVINO's inference precision follows the variant's (bf16 or fp32)
        return cls(path, graph.inputs, graph.outputs, threads=threads, spin=spin,
                   precision=getattr(graph, "precision", "fp32"))
    return cls(path, graph.inputs, graph.outputs, threads=threads, spin=spin)
