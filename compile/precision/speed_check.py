"""``compile --if-faster``: CPU alternatives to the fp32 engine, kept only where they are faster here.

``fp32-native`` (clipfold's own AVX2 ViT kernel) and ``bf16`` (OpenVINO on AMX / AVX512-BF16) exist
for speed alone. Which one wins depends on the CPU: on the AMD EPYC (AVX2) machines the native
kernel measured 6-17 % faster than ONNX Runtime's fp32 engine, on the Intel Xeon with AMX it lost
36 %, and bf16 does not run at all without native bf16. So a precision given with ``--if-faster`` is

1. skipped before anything is built where this machine cannot run it (the reason is said), and
2. after it is built and verified (or gated), timed against the fp32 variant at batch 1 on the
   same images, interleaved (:func:`time_pair`), and dropped, with both figures said, unless its
   median is below fp32's.

``--precision fp32-native`` (or ``bf16``) still builds the variant unconditionally.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from clipfold.errors import BackendUnavailableError, ConfigError
from clipfold.runtime.bundle.schema import Variant

IF_FASTER = ("fp32-native", "bf16")
ROUNDS = 15  # timed calls each, at most
BUDGET_S = 6.0  # per candidate, both sides together


def check_if_faster(names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [n for n in names if n not in IF_FASTER]
    if unknown:
        raise ConfigError(f"--if-faster takes {', '.join(IF_FASTER)} (CPU alternatives to the fp32 engine); "
                          f"got {', '.join(map(repr, unknown))}")
    return names


def unavailable(precision: str) -> str | None:
    """Why this machine cannot run ``precision``, or None."""
    if precision == "fp32-native":
        from clipfold.kernels.vit.tower import kernel_available

        return None if kernel_available() else "the ViT kernel needs an x86-64 CPU with AVX2 and FMA"
    from clipfold.runtime.backends.openvino import bf16_refusal

    return bf16_refusal()


def resolve(precisions: Sequence[str], if_faster: Sequence[str], say: Callable[[str], None]) -> tuple[str, ...]:
    """The ``--if-faster`` precisions this machine can run (and not already asked for outright)."""
    wanted = []
    for name in if_faster:
        if name in precisions:
            continue
        reason = unavailable(name)
        if reason is not None:
            say(f"skipping {name} (--if-faster): {reason}")
        else:
            wanted.append(name)
    return tuple(wanted)


def time_pair(reference, candidate, pixels: np.ndarray, rounds: int = ROUNDS,
              budget_s: float = BUDGET_S) -> tuple[float, float]:
    """Median seconds per call of two opened backends on ``pixels``: two warm-up calls each, then
    alternating calls (so load from other processes falls on both alike) until ``rounds`` pairs or
    ``budget_s``, whichever comes first (three pairs at least)."""
    feeds = {"pixels": pixels}
    for _ in range(2):
        reference.run(feeds)
        candidate.run(feeds)
    ref, cand = [], []
    start = time.perf_counter()
    while len(ref) < 3 or (len(ref) < rounds and time.perf_counter() - start < budget_s):
        for backend, times in ((reference, ref), (candidate, cand)):
            t0 = time.perf_counter()
            backend.run(feeds)
            times.append(time.perf_counter() - t0)
    return float(np.median(ref)), float(np.median(cand))


def keep_if_faster(conditional: Sequence[str], fp32: Variant, built: Sequence[Variant], stage: Path,
                   pixels: np.ndarray, say: Callable[[str], None]) -> list[Variant]:
    """``built`` without the ``conditional`` variants that are not faster than ``fp32`` at batch 1
    (their files removed from ``stage``)."""
    from clipfold.runtime.backends.registry import open_backend

    if not any(v.name in conditional for v in built):
        return list(built)
    reference = open_backend(fp32.backends[0], fp32, stage / fp32.file)
    kept = []
    for variant in built:
        if variant.name not in conditional:
            kept.append(variant)
            continue
        try:
            candidate = open_backend(variant.backends[0], variant, stage / variant.file)
        except BackendUnavailableError as exc:
            say(f"  {variant.name} (--if-faster) dropped: {exc}")
            continue
        fp32_s, own_s = time_pair(reference, candidate, pixels[:1])
        figures = f"{own_s * 1e3:.1f} ms vs fp32 {fp32_s * 1e3:.1f} ms at batch 1 (medians, interleaved)"
        if own_s < fp32_s:
            say(f"  {variant.name} (--if-faster) kept: {figures}")
            kept.append(variant)
        else:
            say(f"  {variant.name} (--if-faster) dropped, not faster than fp32 on this CPU: {figures}")
            if variant.file != fp32.file:
                target = stage / variant.file
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    return kept
