"""``variant="auto"``: the fastest gated variant on this CPU, from the bundle's profile records or a
short measurement.

Every variant in a bundle passed its gate (a variant that misses is never written), so "auto" is a
speed choice among the variants this machine can run: not GPU-bound ones without a GPU, not the
native kernel without AVX2, not bf16 without native bf16 (each backend's own refusal decides).

Profile records (``profiles.json`` beside the manifest, written by ``clipfold profile``) hold, per
CPU signature (model name and the SIMD / matrix flags that pick kernels), each variant's measured
milliseconds per image at each batch size. The file is measurements, not part of the compiled
contract, so it is not in the manifest's checksums; it is plain JSON, read and checked here.
Without a record for this CPU, each candidate is timed on zero pixels at ``min(batch_size, 8)``
rows: one warm-up call, then up to :data:`MAX_ROUNDS` timed calls within its share of ``budget_s``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np

from clipfold.errors import BundleError, ClipfoldError
from clipfold.runtime.bundle.layout import PROFILES_FILE
from clipfold.runtime.bundle.schema import Manifest, Variant

log = logging.getLogger("clipfold.runtime")

AUTO = "auto"
FORMAT, VERSION = "clipfold-profiles", 1
FLAG_PREFIXES = ("avx", "amx", "fma", "f16c", "vnni", "sse4")
MAX_ROUNDS = 5
MEASURE_BATCH = 8
DEFAULT_BUDGET_S = 10.0


def cpu_signature() -> dict:
    """``{"key", "model", "flags"}`` of this CPU: the model name and the instruction-set flags that
    choose kernels (AVX*, AMX*, FMA, F16C, VNNI, SSE4); ``key`` names the pair in one string."""
    model, flags = None, None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first core's lines
            name, _, value = (part.strip() for part in line.partition(":"))
            if name == "model name" and model is None:
                model = value
            elif name == "flags" and flags is None:
                flags = sorted(f for f in value.split() if f.startswith(FLAG_PREFIXES))
    except OSError:  # not Linux: the model name alone
        pass
    model, flags = model or platform.processor() or platform.machine(), flags or []
    digest = hashlib.sha256(" ".join(flags).encode()).hexdigest()[:12]
    return {"key": f"{model} [{platform.machine()}, flags {digest}]", "model": model, "flags": flags}


def read_records(bundle: Path) -> list[dict]:
    """The bundle's profile records (none without the file); a damaged file is refused by name."""
    path = Path(bundle) / PROFILES_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} cannot be read as JSON ({exc}); delete it or run clipfold profile again") from None
    ok = isinstance(data, dict) and data.get("format") == FORMAT and data.get("version") == VERSION \
        and isinstance(data.get("records"), list) and all(_valid(r) for r in data["records"])
    if not ok:
        raise BundleError(f"{path} is not a {FORMAT} v{VERSION} file of records {{signature, variants: {{name: "
                          "{ms_per_image: {batch: ms}}}}}; delete it or run clipfold profile again")
    return data["records"]


def _valid(record) -> bool:
    if not isinstance(record, dict) or not isinstance(record.get("signature"), str) \
            or not isinstance(record.get("variants"), dict):
        return False
    for figures in record["variants"].values():
        per = figures.get("ms_per_image") if isinstance(figures, dict) else None
        if not isinstance(per, dict) or not per or not all(
                str(b).isdigit() and isinstance(ms, (int, float)) and ms > 0 for b, ms in per.items()):
            return False
    return True


def write_record(bundle: Path, variants: dict[str, dict], threads: int | None, created: str | None = None) -> Path:
    """Replace this CPU's record in ``bundle/profiles.json`` (others are kept); written to a
    temporary file and renamed, so a reader never sees half a file. ``variants``: name ->
    ``{"backend": str, "ms_per_image": {batch: ms}}``."""
    bundle = Path(bundle)
    signature = cpu_signature()
    records = [r for r in read_records(bundle) if r["signature"] != signature["key"]]
    records.append({"signature": signature["key"], "cpu": {"model": signature["model"], "flags": signature["flags"]},
                    "threads": threads, "created": created or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "variants": {name: {"backend": v["backend"],
                                        "ms_per_image": {str(b): float(ms) for b, ms in v["ms_per_image"].items()}}
                                 for name, v in variants.items()}})
    path = bundle / PROFILES_FILE
    tmp = path.with_name(f".{PROFILES_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, "records": records}, indent=1) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)
    return path


def runnable(variant: Variant) -> str | None:
    """Why ``variant`` cannot run on this machine with its own backend, or None when it can."""
    from clipfold.runtime.backends.registry import GPU_BACKENDS

    backend = variant.backends[0]
    if backend in (*GPU_BACKENDS, "tensorrt"):
        return f"its backend {backend} needs an NVIDIA GPU"
    if backend == "native":
        from clipfold.kernels.vit.tower import kernel_available

        return None if kernel_available() else "the native kernel needs AVX2 and FMA"
    if backend == "openvino":
        from clipfold.runtime.backends.openvino import bf16_refusal

        try:
            import openvino  # noqa: F401
        except ImportError:
            return "OpenVINO is not installed (pip install clipfold[openvino])"
        return bf16_refusal() if variant.precision == "bf16" else None
    return None


def _nearest(per: dict[str, float], batch: int) -> tuple[int, float]:
    sizes = sorted(int(b) for b in per)
    size = min(sizes, key=lambda b: (abs(b - batch), -b))
    return size, per[str(size)]


def choose(bundle: Path, manifest: Manifest, batch_size: int, open_engine: Callable[[str], object],
           budget_s: float = DEFAULT_BUDGET_S, clock: Callable[[], float] = time.perf_counter) -> tuple[str, str]:
    """``(variant name, why)``: the fastest runnable variant per image at the batch nearest
    ``batch_size``, from this CPU's profile record when it covers every candidate, else measured
    (``open_engine(name)`` returns an engine with ``run_pixels``)."""
    skipped = {v.name: why for v in manifest.variants if (why := runnable(v)) is not None}
    candidates = [v for v in manifest.variants if v.name not in skipped]
    if not candidates:
        raise BundleError(f"no variant of {bundle} runs here: " + "; ".join(f"{n}: {w}" for n, w in skipped.items()))
    note = f"; not runnable here: {', '.join(f'{n} ({w})' for n, w in skipped.items())}" if skipped else ""
    signature = cpu_signature()
    record = next((r for r in read_records(bundle) if r["signature"] == signature["key"]), None)
    if record is not None and all(v.name in record["variants"] for v in candidates):
        figures = {v.name: _nearest(record["variants"][v.name]["ms_per_image"], batch_size) for v in candidates}
        best = min(figures, key=lambda n: figures[n][1])
        listed = ", ".join(f"{n} {ms:.2f}" for n, (_, ms) in sorted(figures.items(), key=lambda kv: kv[1][1]))
        return best, (f"fastest in this CPU's profile record ({record['created']}, {signature['model']}): "
                      f"ms per image at batch {figures[best][0]} (the recorded size nearest {batch_size}): "
                      f"{listed}{note}")
    why = "no profile record for this CPU" if record is None else "this CPU's profile record lacks " + ", ".join(
        v.name for v in candidates if v.name not in record["variants"])
    measured = _measure(candidates, min(batch_size, MEASURE_BATCH), open_engine, budget_s, clock)
    best = min(measured, key=lambda n: measured[n][0])
    listed = ", ".join(f"{n} {ms:.2f} ({rounds} round{'s' if rounds > 1 else ''})"
                       for n, (ms, rounds) in sorted(measured.items(), key=lambda kv: kv[1][0]))
    return best, (f"{why}; measured here at batch {min(batch_size, MEASURE_BATCH)} within {budget_s:g} s, "
                  f"ms per image: {listed}{note} (clipfold profile records a profile)")


def _measure(candidates: list[Variant], batch: int, open_engine, budget_s: float, clock) -> dict[str, tuple[float, int]]:
    """Per candidate: median ms per image and rounds. One warm-up and one timed call each at
    least; more (up to MAX_ROUNDS) while the candidate's share of the budget lasts."""
    out = {}
    share = budget_s / len(candidates)
    for variant in candidates:
        try:
            engine = open_engine(variant.name)
        except ClipfoldError as exc:  # e.g. a backend that refuses at open: not a candidate
            log.info("variant auto: %s not measured: %s", variant.name, exc)
            continue
        spec = variant.inputs[0]
        pixels = np.zeros((batch, *spec.shape[1:]), dtype=spec.dtype)
        engine.run_pixels(pixels)  # warm-up: first-call allocations and kernel selection
        start, times = clock(), []
        while not times or (len(times) < MAX_ROUNDS and clock() - start < share):
            t0 = clock()
            engine.run_pixels(pixels)
            times.append(clock() - t0)
        out[variant.name] = (float(np.median(times)) * 1e3 / batch, len(times))
    if not out:
        raise BundleError("variant auto: no variant of the bundle could be opened here")
    return out
