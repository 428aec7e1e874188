"""The Backend protocol every engine follows, and nothing else.

The public ``run`` checks inputs against the manifest's tensor specs and times the call;
subclasses open their graph in ``__init__`` and implement ``_run``. The backends that exist are
ONNX Runtime on the CPU and on CUDA (:mod:`.onnxruntime`), OpenVINO
(:mod:`.openvino`), the native ViT kernel (:mod:`.native`) and TensorRT
(:mod:`.tensorrt`); :mod:`.registry` maps their names to them and imports each
only when it is asked for, so a missing library is reported by name instead of breaking
``import clipfold.runtime``. This module imports none of them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from clipfold.errors import ConfigError
from clipfold.runtime.bundle.schema import TensorSpec


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
