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
from clipfold.runtime.backends.base import Backend
from clipfold.runtime.bundle.schema import EngineRecord, TensorSpec, Variant


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
    """One deserialized plan with its execution context(s), stream and device buffers.

    Not thread-safe (one stream, one set of buffers): the runtime calls it from one thread (the
    batcher's, or the caller's).
    """

    name = "tensorrt"

    def __init__(self, path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 record: EngineRecord, cuda_graph_batches: Sequence[int] = ()):
        super().__init__(path, inputs, outputs)
        import tensorrt as trt

        self.cudart = cudart = _cuda()
        self.record = record
        self.trt_runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.trt_runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise BackendUnavailableError(f"TensorRT could not deserialize {path}; rebuild it with clipfold engine build")
        first = self.inputs[0].name
        low, _, high = self.engine.get_tensor_profile_shape(first, 0)
        self.min_batch, self.max_batch = int(low[0]), int(high[0])
        self.dtypes: dict[str, np.dtype] = {}
        for spec in (*self.inputs, *self.outputs):  # the plan must be the graph the manifest describes
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(spec.name)))
            shape = tuple(self.engine.get_tensor_shape(spec.name))[1:]
            if dtype != np.dtype(spec.dtype) or shape != tuple(spec.shape[1:]):
                raise BackendUnavailableError(f"the plan {Path(path).name} has {spec.name!r} as {dtype} {shape}, the "
                                              f"manifest says {spec.dtype} {tuple(spec.shape[1:])}: rebuild it")
            self.dtypes[spec.name] = dtype
        self.stream = _check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
        self.buffers: dict[str, int] = {}
        for spec in (*self.inputs, *self.outputs):
            row = int(np.prod(spec.shape[1:])) * self.dtypes[spec.name].itemsize
            self.buffers[spec.name] = _check(cudart.cudaMalloc(row * self.max_batch))
        self.context = self._context()
        # A CUDA graph replays the kernels of the shapes it was captured with: one context per
        # captured batch size, never re-shaped, so a plain call at another size cannot go stale.
        self.graph_batches = {int(b) for b in cuda_graph_batches if self.min_batch <= int(b) <= self.max_batch}
        self.graph_contexts: dict[int, object] = {}
        self.graphs: dict[int, object] = {}

    def _context(self):
        context = self.engine.create_execution_context()
        for name, pointer in self.buffers.items():
            context.set_tensor_address(name, pointer)
        return context

    def _capture(self, batch: int) -> None:
        cudart = self.cudart
        context = self.graph_contexts[batch] = self._context()
        for spec in self.inputs:
            context.set_input_shape(spec.name, (batch, *spec.shape[1:]))
        context.execute_async_v3(int(self.stream))  # a first run outside capture sets up lazily created state
        _check(cudart.cudaStreamBeginCapture(self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        graph = None
        try:
            context.execute_async_v3(int(self.stream))
        finally:
            graph = _check(cudart.cudaStreamEndCapture(self.stream))  # always ends the capture
        try:
            self.graphs[batch] = _check(cudart.cudaGraphInstantiate(graph, 0))
        finally:
            cudart.cudaGraphDestroy(graph)

    def _chunk(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self.cudart
        batch = len(next(iter(inputs.values())))
        padded = max(batch, self.min_batch)  # below the profile's minimum: pad with copies of the last row
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        context = self.context
        if padded in self.graph_batches and padded not in self.graphs:
            self._capture(padded)
        for spec in self.inputs:
            array = np.ascontiguousarray(inputs[spec.name], dtype=self.dtypes[spec.name])
            if padded > batch:
                array = np.concatenate([array, np.repeat(array[-1:], padded - batch, axis=0)])
            if padded not in self.graphs and not context.set_input_shape(spec.name, array.shape):
                raise ConfigError(f"TensorRT refused input shape {array.shape} for {spec.name!r}")
            _check(cudart.cudaMemcpyAsync(self.buffers[spec.name], array.ctypes.data, array.nbytes, h2d, self.stream))
        if padded in self.graphs:
            _check(cudart.cudaGraphLaunch(self.graphs[padded], self.stream))
        elif not context.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT failed to enqueue the engine")
        out = {}
        for spec in self.outputs:
            array = np.empty((padded, *spec.shape[1:]), dtype=self.dtypes[spec.name])
            _check(cudart.cudaMemcpyAsync(array.ctypes.data, self.buffers[spec.name], array.nbytes, d2h, self.stream))
            out[spec.name] = array
        _check(cudart.cudaStreamSynchronize(self.stream))
        return {name: value[:batch] for name, value in out.items()}

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Batches above the profile's maximum run in chunks of it; below its minimum, padded."""
        batch = len(next(iter(inputs.values())))
        parts = [self._chunk({k: v[lo:lo + self.max_batch] for k, v in inputs.items()})
                 for lo in range(0, batch, self.max_batch)]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def __del__(self):
        cudart = getattr(self, "cudart", None)
        if cudart is None:
            return
        for graph in getattr(self, "graphs", {}).values():
            cudart.cudaGraphExecDestroy(graph)
        for pointer in getattr(self, "buffers", {}).values():
            cudart.cudaFree(pointer)
        if getattr(self, "stream", None) is not None:
            cudart.cudaStreamDestroy(self.stream)


def open_tensorrt(variant: Variant, bundle: Path, cuda_graph_batches: Sequence[int] = ()) -> TensorRTBackend:
    """The plan of ``variant`` for this machine; ``cuda_graph_batches``: batch sizes replayed as CUDA graphs."""
    record = select_engine(variant, this_machine(), str(bundle))
    return TensorRTBackend(bundle / record.file, variant.inputs, variant.outputs, record, cuda_graph_batches)
