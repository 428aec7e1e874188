"""The TensorRT backend: a variant's plan for this GPU, on the same Backend contract as ONNX Runtime.

Which plan: a variant carries one :class:`~.manifest.EngineRecord` per GPU it was built on
(``clipfold engine build``). :func:`select_engine` takes the one whose compute capability and
TensorRT version are this machine's, and otherwise refuses, naming what the bundle has, what this
machine is, and the command that builds a plan here. A plan is never run on hardware it was not built
for, and it is never rebuilt silently at start-up.

Running: device buffers for the profile's maximum batch are allocated once; each call copies the
pixels in on one CUDA stream, sets the input shape, enqueues the engine, and copies the outputs
back. For batch sizes listed in ``cuda_graph_batches`` the enqueue is captured into a CUDA graph
on its first call and replayed after that, which saves the per-layer launch cost at small batches.
Device memory is handled with cuda-python (``cuda.bindings.runtime``), so the runtime still
imports no torch. Everything here needs ``clipfold[gpu]`` and an NVIDIA GPU; the module imports
neither until a backend is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from clipfold.errors import BackendUnavailableError, ConfigError, EngineMismatchError

from .backend import Backend
from .manifest import EngineRecord, TensorSpec, Variant


def select_engine(variant: Variant, here: Mapping[str, str], bundle: str = "BUNDLE") -> EngineRecord:
    """The engine of ``variant`` built for this machine (``here``: gpu, compute_capability, tensorrt)."""
    rebuild = f"clipfold engine build {bundle} --variant {variant.name}"
    if not variant.engines:
        raise EngineMismatchError(f"variant {variant.name!r} has no TensorRT engine yet; build one on this GPU "
                                  f"({here['gpu']}, compute capability {here['compute_capability']}) with: {rebuild}")
    for record in variant.engines:
        if record.compute_capability == here["compute_capability"] and record.tensorrt == here["tensorrt"]:
            return record
    built = "; ".join(f"{r.file}: {r.gpu}, compute capability {r.compute_capability}, TensorRT {r.tensorrt}"
                      for r in variant.engines)
    raise EngineMismatchError(
        f"variant {variant.name!r} has TensorRT engines only for: {built}. This machine has {here['gpu']}, compute "
        f"capability {here['compute_capability']}, TensorRT {here['tensorrt']}. A plan runs only on the compute "
        f"capability and TensorRT version that built it: build one here with: {rebuild}")


def _cuda():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise BackendUnavailableError("the TensorRT backend needs cuda-python: install clipfold[gpu] on a machine "
                                      "with an NVIDIA GPU") from None
    return cudart


def _check(result):
    """cuda-python returns (error, *values): raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA call failed: {err}")
    return values[0] if len(values) == 1 else tuple(values)


def this_machine() -> dict[str, str]:
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError("backend 'tensorrt' needs TensorRT: install clipfold[gpu] on a machine with "
                                      "an NVIDIA GPU") from None
    cudart = _cuda()
    props = _check(cudart.cudaGetDeviceProperties(0))
    name = props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name, "compute_capability": f"{props.major}.{props.minor}", "tensorrt": trt.__version__}


class TensorRTBackend(Backend):
    """One deserialized plan with its execution context, stream and device buffers."""

    name = "tensorrt"

    def __init__(self, path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 record: EngineRecord, cuda_graph_batches: Sequence[int] = ()):
        super().__init__(path, inputs, outputs)
        import tensorrt as trt

        self.cudart = cudart = _cuda()
        self.record = record
        self.max_batch = record.profile["max"]
        self.trt_runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.trt_runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise BackendUnavailableError(f"TensorRT could not deserialize {path}; rebuild it with clipfold engine build")
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())
        self.buffers: dict[str, int] = {}
        self.dtypes: dict[str, np.dtype] = {}
        for spec in (*self.inputs, *self.outputs):
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(spec.name)))
            self.dtypes[spec.name] = dtype
            row = int(np.prod([d for d in spec.shape[1:]])) * dtype.itemsize
            self.buffers[spec.name] = _check(cudart.cudaMalloc(row * self.max_batch))
            self.context.set_tensor_address(spec.name, self.buffers[spec.name])
        self.graph_batches = set(int(b) for b in cuda_graph_batches)
        self.graphs: dict[int, object] = {}

    def _enqueue(self, batch: int) -> None:
        cudart = self.cudart
        if batch not in self.graph_batches:
            if not self.context.execute_async_v3(int(self.stream)):
                raise RuntimeError("TensorRT failed to enqueue the engine")
            return
        if batch not in self.graphs:
            self.context.execute_async_v3(int(self.stream))  # a first run outside capture sets up lazily created state
            mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            _check(cudart.cudaStreamBeginCapture(self.stream, mode))
            self.context.execute_async_v3(int(self.stream))
            graph = _check(cudart.cudaStreamEndCapture(self.stream))
            self.graphs[batch] = _check(cudart.cudaGraphInstantiate(graph, 0))
        _check(cudart.cudaGraphLaunch(self.graphs[batch], self.stream))

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self.cudart
        batch = len(next(iter(inputs.values())))
        if not 1 <= batch <= self.max_batch:
            raise ConfigError(f"batch {batch} is outside this engine's profile {self.record.profile['min']}.."
                              f"{self.max_batch}; rebuild it with a larger --max-batch")
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for spec in self.inputs:
            array = np.ascontiguousarray(inputs[spec.name], dtype=self.dtypes[spec.name])
            self.context.set_input_shape(spec.name, array.shape)
            _check(cudart.cudaMemcpyAsync(self.buffers[spec.name], array.ctypes.data, array.nbytes, h2d, self.stream))
        self._enqueue(batch)
        out = {}
        for spec in self.outputs:
            array = np.empty((batch, *spec.shape[1:]), dtype=self.dtypes[spec.name])
            _check(cudart.cudaMemcpyAsync(array.ctypes.data, self.buffers[spec.name], array.nbytes, d2h, self.stream))
            out[spec.name] = array
        _check(cudart.cudaStreamSynchronize(self.stream))
        return out

    def __del__(self):
        cudart = getattr(self, "cudart", None)
        if cudart is None:
            return
        for pointer in getattr(self, "buffers", {}).values():
            cudart.cudaFree(pointer)
        for graph in getattr(self, "graphs", {}).values():
            cudart.cudaGraphExecDestroy(graph)
        if getattr(self, "stream", None) is not None:
            cudart.cudaStreamDestroy(self.stream)


def open_tensorrt(variant: Variant, bundle: Path, cuda_graph_batches: Sequence[int] = ()) -> TensorRTBackend:
    record = select_engine(variant, this_machine(), str(bundle))
    return TensorRTBackend(bundle / record.file, variant.inputs, variant.outputs, record, cuda_graph_batches)
