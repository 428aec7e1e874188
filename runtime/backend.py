"""One Backend protocol for every engine: ONNX Runtime here, TensorRT and eager torch elsewhere.

The public ``run`` checks inputs against the manifest's tensor specs and times the call;
subclasses implement only ``_load`` and ``_run``. Heavy libraries are imported lazily so that a
missing backend is reported by name instead of breaking ``import clipfold.runtime``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from clipfold.errors import BackendUnavailableError, BundleError, ConfigError
from clipfold.kernels.cpu import default_threads

from .manifest import ExtraHead, TensorSpec, Variant


class Backend:
    """Runs one variant's graph. ``last_latency_s`` holds the wall time of the last ``run``."""

    name = "base"

    def __init__(self, path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]):
        self.path = Path(path)
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.last_latency_s = 0.0

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for spec in self.inputs:
            if spec.name not in inputs:
                raise ConfigError(f"missing input {spec.name!r}; the graph takes {[s.name for s in self.inputs]}")
            _check_tensor(spec, inputs[spec.name])
        start = time.perf_counter()
        outputs = self._run(inputs)
        self.last_latency_s = time.perf_counter() - start
        return outputs

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def _check_tensor(spec: TensorSpec, array: np.ndarray) -> None:
    if not isinstance(array, np.ndarray):
        raise ConfigError(f"input {spec.name!r} must be a numpy array, got {type(array).__name__}")
    if array.dtype != np.dtype(spec.dtype):
        raise ConfigError(f"input {spec.name!r} has dtype {array.dtype}, expected {spec.dtype}")
    if array.ndim != len(spec.shape) or any(
        isinstance(dim, int) and dim != got for dim, got in zip(spec.shape, array.shape)
    ):
        raise ConfigError(f"input {spec.name!r} has shape {array.shape}, expected {spec.shape}")


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU execution provider (the base install).

    ``spin``: whether ONNX Runtime's worker threads busy-wait between and after calls (its
    default). Spinning shaves the thread wake-up off each call when the process does nothing
    else, but the spinning threads take the cores from any other work of the process; a server,
    whose event loop decodes requests on the same cores, opens its graphs with ``spin=False``
    (``benchmarks/bench_serve.py`` measures both).

    ONNX Runtime's own ``SkipLayerNormFusion`` is turned off: its CPU kernel is about 4x slower
    than the ``Add`` + ``LayerNormalization`` that clipfold's graphs carry instead (see
    ``clipfold.compile.optimize.split_skip_layer_norm``), and would otherwise re-fuse some of them.
    """

    name = "onnxruntime"

    def __init__(self, path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 threads: int | None = None, spin: bool = True):
        super().__init__(path, inputs, outputs)
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailableError(
                "backend 'onnxruntime' is not installed; install clipfold (its base install includes it)") from None
        self.session = open_session(ort, path, cpu_session_options(threads, spin), ["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.outputs]

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {spec.name: inputs[spec.name] for spec in self.inputs}
        values = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, values))


def open_session(ort, path: Path, options, providers):
    """``ort.InferenceSession``, its failures (an empty, truncated or invalid graph file; an operator
    this ONNX Runtime lacks) as one :class:`BundleError` naming the file instead of ONNX Runtime's
    own exception and traceback."""
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime's pybind errors (InvalidProtobuf, Fail, ...) share no base class
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        size = Path(path).stat().st_size if Path(path).is_file() else None
        raise BundleError(f"ONNX Runtime cannot load graph {Path(path).name} ({path}, "
                          f"{'missing' if size is None else f'{size} bytes'}): {type(exc).__name__}: "
                          f"{lines[0][:300] if lines else 'no message'}; the bundle file is damaged or was "
                          "written for a newer ONNX Runtime") from None


def cpu_session_options(threads: int | None = None, spin: bool = True):
    """The ``onnxruntime.SessionOptions`` every CPU session of the runtime opens with.

    ``session.dynamic_block_base=4`` makes the thread pool hand out each parallel loop in smaller,
    shrinking blocks, which balances the two threads better on the small per-layer loops of batch
    1: ViT-B-32 fp32 measured 1.2-2.5 ms faster at batch 1 (of ~58) and 5 ms at batch 8 (of ~390)
    in interleaved comparisons on the 2-core machine.
    """
    options = session_options(threads, spin)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("optimization.disable_specified_optimizers", "SkipLayerNormFusion")
    options.add_session_config_entry("session.dynamic_block_base", "4")
    return options


def session_options(threads: int | None = None, spin: bool = True):
    """What every ONNX Runtime session of the runtime shares: intra-op threads, all graph
    optimizations, and whether the threads spin (see :class:`OnnxRuntimeBackend`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxRuntimeCudaBackend(Backend):
    """ONNX Runtime's CUDA execution provider (onnxruntime-gpu) with I/O binding.

    Inputs are copied to the GPU once per call and the outputs are bound to GPU memory, so ONNX
    Runtime does no copies of its own between its nodes and the host; only the results come back.
    """

    name = "onnxruntime-cuda"

    def __init__(self, path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 threads: int | None = None, spin: bool = True, device: int = 0):
        super().__init__(path, inputs, outputs)
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailableError("backend 'onnxruntime-cuda' needs onnxruntime-gpu: install clipfold[gpu]") from None
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailableError(
                f"backend 'onnxruntime-cuda' needs onnxruntime-gpu and an NVIDIA GPU; this onnxruntime "
                f"{ort.__version__} offers {ort.get_available_providers()}: install clipfold[gpu]")
        self.ort, self.device = ort, device
        options = session_options(threads, spin)  # CPU threads run the nodes that stay on the CPU
        self.session = open_session(ort, path, options, [("CUDAExecutionProvider", {"device_id": device}),
                                                         "CPUExecutionProvider"])
        if self.session.get_providers()[0] != "CUDAExecutionProvider":  # e.g. cuDNN missing: never a silent CPU run
            raise BackendUnavailableError(f"ONNX Runtime could not start its CUDA provider for {path.name} (it offers "
                                          f"{self.session.get_providers()}); check the CUDA and cuDNN libraries")
        self.output_names = [o.name for o in self.outputs]

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        binding = self.session.io_binding()
        for spec in self.inputs:
            value = self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(inputs[spec.name]), "cuda", self.device)
            binding.bind_ortvalue_input(spec.name, value)
        for name in self.output_names:
            binding.bind_output(name, "cuda", self.device)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))


def _native(path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], threads: int | None = None,
            spin: bool = True) -> Backend:
    from .native import NativeBackend  # imports the kernel's ctypes wrapper only when asked for

    return NativeBackend(path, inputs, outputs, threads=threads, spin=spin)


def _openvino(path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], threads: int | None = None,
              spin: bool = True, precision: str = "fp32") -> Backend:
    from .openvino_backend import OpenVinoBackend  # imports openvino only when asked for

    return OpenVinoBackend(path, inputs, outputs, threads=threads, spin=spin, precision=precision)


BACKENDS = {"onnxruntime": OnnxRuntimeBackend, "onnxruntime-cuda": OnnxRuntimeCudaBackend, "native": _native,
            "openvino": _openvino}
GPU_BACKENDS = ("tensorrt", "onnxruntime-cuda")  # known names whose backends come with clipfold[gpu]


def open_backend(name: str, graph: Variant | ExtraHead, path: Path, threads: int | None = None,
                 spin: bool = True) -> Backend:
    """A backend for one graph of the bundle: a variant, or an extra head. ``threads`` and
    ``spin`` (see :class:`OnnxRuntimeBackend`) apply to the ONNX Runtime backends."""
    if name not in BACKENDS and name != "tensorrt":
        raise BackendUnavailableError(f"unknown backend {name!r}; available: {sorted([*BACKENDS, 'tensorrt'])}")
    runs_on = getattr(graph, "backends", (name,))
    if name == "onnxruntime-cuda":
        runs_on = ("onnxruntime-cuda",) if "onnxruntime" in runs_on else runs_on  # the same graphs, on the GPU
    if name == "openvino" and isinstance(graph, Variant) and graph.format == "onnx" and graph.precision == "fp32":
        runs_on = (*runs_on, "openvino")  # OpenVINO reads the fp32 graph too, and runs it in f32
    if name == "tensorrt":
        if not isinstance(graph, Variant):
            raise BackendUnavailableError(f"extra head {graph.name!r} runs on onnxruntime only; open it with that backend")
        if "tensorrt" not in graph.backends and not graph.engines:
            import importlib.util

            missing = "" if importlib.util.find_spec("tensorrt") else \
                " (and TensorRT is not installed here: install clipfold[gpu] on a machine with an NVIDIA GPU)"
            raise BackendUnavailableError(
                f"variant {graph.name!r} ({graph.precision}) is a graph for {list(graph.backends)}, not for TensorRT; "
                f"TensorRT runs the tensorrt-* and fp8 variants (compile --target tensorrt){missing}")
        from .tensorrt_backend import open_tensorrt

        return open_tensorrt(graph, Path(path).parent)
    if name not in runs_on:
        hint = " (install clipfold[gpu] on a machine with an NVIDIA GPU)" if "tensorrt" in runs_on else ""
        raise BackendUnavailableError(
            f"variant {graph.name!r} ({getattr(graph, 'precision', '?')}) runs on {list(runs_on)}, not on {name!r}"
            f"{hint}; pick another variant with --variant")
    if name == "openvino":  # OpenVINO's inference precision follows the variant's (bf16 or fp32)
        return _openvino(path, graph.inputs, graph.outputs, threads, spin, getattr(graph, "precision", "fp32"))
    return BACKENDS[name](path, graph.inputs, graph.outputs, threads=threads, spin=spin)
