"""The ONNX Runtime backends: the CPU execution provider (the base install) and the CUDA one
(onnxruntime-gpu), plus the session options every ONNX Runtime session of the runtime opens with.

``onnxruntime`` itself is imported only when a session is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from clipfold.errors import BackendUnavailableError, BundleError
from clipfold.kernels.cpu_runtime import default_threads
from clipfold.runtime.backends.base import Backend
from clipfold.runtime.bundle.schema import TensorSpec


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU execution provider (the base install).

    ``spin``: whether ONNX Runtime's worker threads busy-wait between and after calls (its
    default). Spinning shaves the thread wake-up off each call when the process does nothing
    else, but the spinning threads take the cores from any other work of the process; a server,
    whose event loop decodes requests on the same cores, opens its graphs with ``spin=False``
    (``benchmarks/bench_serve.py`` measures both).

    ONNX Runtime's own ``SkipLayerNormFusion`` is turned off: its CPU kernel is about 4x slower
    than the ``Add`` + ``LayerNormalization`` that clipfold's graphs carry instead (see
    ``clipfold.compile.stages.optimize.split_skip_layer_norm``), and would otherwise re-fuse some of them.
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
