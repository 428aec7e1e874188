"""The ``native`` backend: a ``clipfold-vit`` variant folder run by :mod:`clipfold.kernels.vit.tower`.

The folder holds the image tower's packed weights (``vit.json`` + ``vit.bin``) and, when the
bundle's head is inside its graphs, the head alone as ``head.onnx`` (unit embedding -> top-k
scores and indices), which ONNX Runtime runs on one thread: the tower has the cores, and a head
session with no worker threads leaves none spinning beside the kernel's. A bundle whose head the
top-k kernel scores has no ``head.onnx``; the variant then outputs the embedding alone, as its
ONNX graphs do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from clipfold.errors import BundleError
from clipfold.kernels.vit.tower import VitTower, VitWeights
from clipfold.runtime.backends.base import Backend
from clipfold.runtime.backends.onnxruntime import OnnxRuntimeBackend
from clipfold.runtime.bundle.layout import NATIVE_HEAD_FILE
from clipfold.runtime.bundle.schema import TensorSpec


class NativeBackend(Backend):
    """``threads``: the kernel's (default: every usable core). ``spin`` changes nothing: the
    kernel's threads exist only during a call, so none wait between calls."""

    name = "native"

    def __init__(self, path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 threads: int | None = None, spin: bool = True):
        super().__init__(path, inputs, outputs)
        if not self.path.is_dir():
            raise BundleError(f"the native variant's folder {self.path} is missing")
        self.tower = VitTower(VitWeights.load(self.path), threads)
        pixels = next((s for s in self.inputs if s.name == "pixels"), None)
        if pixels is None or tuple(pixels.shape[1:]) != (3, *self.tower.image_size):
            raise BundleError(f"the native variant's tower takes (batch, 3, {self.tower.image_size[0]}, "
                              f"{self.tower.image_size[1]}) pixels; the manifest declares {pixels}")
        names = {s.name for s in self.outputs}
        self.head = None
        if names & {"scores", "indices"}:
            head_inputs = (TensorSpec("embedding", "float32", ("batch", self.tower.weights.config["out_dim"])),)
            head_outputs = tuple(s for s in self.outputs if s.name in ("scores", "indices"))
            if not (self.path / NATIVE_HEAD_FILE).is_file():
                raise BundleError(f"the native variant's head {self.path / NATIVE_HEAD_FILE} is missing")
            self.head = OnnxRuntimeBackend(self.path / NATIVE_HEAD_FILE, head_inputs, head_outputs, threads=1, spin=False)

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        embedding = self.tower.embed(inputs["pixels"])
        out = {"embedding": embedding}
        if self.head is not None:
            out.update(self.head.run({"embedding": embedding}))
        return out
