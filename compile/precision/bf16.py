"""The ``bf16`` variant: the verified fp32 graph run in bfloat16 by OpenVINO on CPUs that have it.

On an Intel CPU with AMX or AVX512-BF16, OpenVINO runs the graph's matrix multiplications in bf16
(8-bit mantissa inputs, fp32 accumulation) from the same fp32 ONNX file: no second graph is written,
the variant points at ``model.onnx`` and names the ``openvino`` backend, which compiles it with
``INFERENCE_PRECISION_HINT=bf16``. On ViT-B-32 at 2 cores this measured 2-3.5x the fp32 ONNX Runtime
engine at embedding cosine ~0.99994 (see the README's benchmark section for this machine's figures).

It is gated like every variant: run on the held-out images and compared with fp32 (cosine, top-1
agreement, accuracy). There is nothing to return to float node by node (OpenVINO picks bf16 per
operator), so a miss raises :class:`~clipfold.errors.GateError` with the figures. A CPU without
native bf16 refuses the variant with the reason (:func:`~clipfold.runtime.backends.openvino.bf16_refusal`);
it is never emulated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import clipfold.compile.precision.gate as gating
import clipfold.compile.precision.image_sets as image_sets
from clipfold.compile.precision.config import GateConfig
from clipfold.errors import BackendUnavailableError, ClipfoldError, ExportError, GateError
from clipfold.runtime.bundle.agreement import Gate
from clipfold.runtime.bundle.schema import Variant

BACKENDS = ("openvino",)
DETAILS = {"method": "OpenVINO bf16 inference (INFERENCE_PRECISION_HINT=bf16) of the fp32 graph",
           "weights": "fp32 on disk", "compute": "bf16 inputs, fp32 accumulation (AMX or AVX512-BF16)"}


def check_bf16() -> None:
    """Refuse before anything is built on a CPU (or an install) that cannot run bf16 natively."""
    from clipfold.runtime.backends.openvino import bf16_refusal

    reason = bf16_refusal()
    if reason is not None:
        raise BackendUnavailableError(reason)


def run_bf16(path: Path, sources, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The fp32 graph's outputs under OpenVINO bf16; OpenVINO's own failure is an export failure, named."""
    from clipfold.runtime.backends.openvino import OpenVinoBackend

    try:
        backend = OpenVinoBackend(path, sources.inputs, sources.outputs, precision="bf16")
        return gating.run_backend(backend, pixels, head=sources.head)
    except ClipfoldError:
        raise
    except Exception as exc:  # openvino raises its own RuntimeError subclasses
        raise ExportError(f"the bf16 variant could not be run by OpenVINO: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from exc


def build_bf16(sources, held: image_sets.HeldOut, fp32_out: dict[str, np.ndarray], gate_cfg: GateConfig,
               tie_tolerance: float, parity_of, say) -> Variant:
    """Gate OpenVINO bf16 on ``sources.fused`` against fp32 on the held-out images; the variant,
    or :class:`GateError` naming every figure that missed. ``parity_of(run)`` gives the figures
    against open_clip eager (for information)."""
    check_bf16()
    figures = gating.measure(fp32_out, run_bf16(sources.fused, sources, held.pixels), held, gate_cfg, tie_tolerance)
    missed = gating.failures(figures, gate_cfg)
    if missed:
        raise GateError(f"variant 'bf16' misses the accuracy gate against fp32 on {figures.images} images "
                        f"({figures.source}):\n  - " + "\n  - ".join(missed) + "\nOpenVINO chooses bf16 per operator, "
                        "so no node can be returned to float; lower the limits (--gate-min-cosine, --gate-min-top1) "
                        "or drop the variant.", missed)
    say(f"  bf16: min cosine {figures.embedding_cosine_min:.5f}, top-1 agreement {figures.top1_agreement:.1%}"
        + (f", accuracy {figures.accuracy:.1%} (fp32 {figures.reference_accuracy:.1%})"
           if figures.accuracy is not None else ""))
    return Variant(name="bf16", file=sources.fused.name, format="onnx", precision="bf16", inputs=sources.inputs,
                   outputs=sources.outputs, parity=parity_of(lambda pixels: run_bf16(sources.fused, sources, pixels)),
                   top_k=sources.top_k, backends=BACKENDS, quantization=dict(DETAILS), gate=Gate(**figures.__dict__))
