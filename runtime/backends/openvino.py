"""The ``openvino`` backend: a variant's ONNX graph run by OpenVINO's CPU plugin (``clipfold[openvino]``).

OpenVINO reads the same ONNX file ONNX Runtime does. What it adds on Intel CPUs is bfloat16
inference: on a CPU with AVX512-BF16 or AMX it runs the graph's matrix multiplications in bf16
(AMX tiles where present) while keeping fp32 weights on disk. That is the ``bf16`` variant's
backend. OpenVINO's own default on such CPUs is already bf16, so every graph is compiled with an
explicit ``INFERENCE_PRECISION_HINT``: ``f32`` for an fp32 variant (never silently bf16) and
``bf16`` for the ``bf16`` variant, which is refused on a CPU without bf16 rather than emulated.

Imported only when the backend is asked for; ``openvino`` is torch-free.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from clipfold.errors import BackendUnavailableError
from clipfold.kernels.cpu_runtime import default_threads
from clipfold.runtime.backends.base import Backend
from clipfold.runtime.bundle.schema import TensorSpec

# variant precision -> OpenVINO inference precision
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}


def _openvino():
    try:
        import openvino
    except ImportError:
        raise BackendUnavailableError("backend 'openvino' is not installed: pip install clipfold[openvino]") from None
    return openvino


@lru_cache(maxsize=1)
def _core():
    return _openvino().Core()


def cpu_capabilities() -> tuple[str, ...]:
    """What OpenVINO's CPU plugin says this CPU can do (e.g. ``FP32``, ``BF16``, ``INT8``)."""
    return tuple(str(c) for c in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def bf16_refusal() -> str | None:
    """Why a bf16 variant cannot run here, or None when it can: OpenVINO must be installed and its
    CPU plugin must report native bf16 (AVX512-BF16 or AMX); it is never emulated in fp32."""
    try:
        capabilities = cpu_capabilities()
    except BackendUnavailableError as exc:
        return f"bf16 runs on OpenVINO's CPU plugin, and {exc}"
    if "BF16" not in capabilities:
        return (f"bf16 needs a CPU with native bfloat16 (AVX512-BF16 or AMX); OpenVINO reports only "
                f"{', '.join(capabilities)} here, and clipfold does not emulate bf16 in fp32 (use fp32 or an int8 variant)")
    return None


class OpenVinoBackend(Backend):
    """``precision``: the variant's (``fp32`` or ``bf16``), compiled as OpenVINO's inference
    precision. ``threads``: OpenVINO's inference threads (default: every usable core); ``spin`` has
    no OpenVINO counterpart and changes nothing."""

    name = "openvino"

    def __init__(self, path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 threads: int | None = None, spin: bool = True, precision: str = "fp32"):
        super().__init__(path, inputs, outputs)
        if precision not in PRECISION_HINTS:
            raise BackendUnavailableError(f"backend 'openvino' runs fp32 and bf16 graphs, not {precision!r}")
        if precision == "bf16" and (reason := bf16_refusal()) is not None:
            raise BackendUnavailableError(reason)
        config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": int(threads or default_threads())}
        self.precision = precision
        self.compiled = _core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.output_names = [o.name for o in self.outputs]
        ports = {name for port in self.compiled.outputs for name in port.get_names()}
        missing = [n for n in self.output_names if n not in ports]
        if missing:
            raise BackendUnavailableError(f"OpenVINO compiled {Path(path).name} without outputs {missing}")

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.request.infer({spec.name: np.ascontiguousarray(inputs[spec.name]) for spec in self.inputs})
        by_name = {name: value for port, value in results.items() for name in port.get_names()}
        return {name: np.array(by_name[name], copy=True) for name in self.output_names}
