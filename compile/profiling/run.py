"""``clipfold profile``: every variant of every bundle, and open_clip eager, measured in one run.

Each row is measured in its own spawned process, so its peak memory (max RSS) is its own and an
onnxruntime row never has torch loaded. Latency is end to end from decoded images to top-k
labels (preprocessing included on both sides), per batch size, after warm-up rounds.
Accuracy is top-1 on a labelled folder (``--data``); without one, agreement is top-1 agreement
with the bundle's fp32 variant on generated images. The JSON carries the machine and library
versions; the PNG draws latency against accuracy with the Pareto front.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

from clipfold.compile.profiling.rows import EAGER, EAGER_MODES, eager_name, measure
from clipfold.errors import BackendUnavailableError, ConfigError


@dataclass(frozen=True)
class ProfileConfig:
    bundles: tuple[Path, ...]
    data: Path | None = None
    batches: tuple[int, ...] = (1, 8)
    backend: str | None = None  # None: each variant's own first backend
    threads: int | None = None
    rounds: int = 10
    warmup: int = 2
    images: int = 64  # agreement images without --data
    eager: bool = True
    # open_clip eager references: "cpu" (fp32), and on an NVIDIA GPU "cuda-fp16", "cuda-bf16",
    # "cuda-fp16-compile" (torch.compile): the comparisons a GPU engine is measured against.
    eager_modes: tuple[str, ...] = ("cpu",)
    out: Path | None = None  # writes OUT.json and OUT.png

    def __post_init__(self) -> None:
        object.__setattr__(self, "bundles", tuple(Path(b) for b in self.bundles))
        object.__setattr__(self, "batches", tuple(int(b) for b in self.batches))
        if not self.bundles:
            raise ConfigError("profile needs at least one bundle")
        if not self.batches or min(self.batches) < 1:
            raise ConfigError(f"batch sizes must be >= 1, got {self.batches}")
        if self.rounds < 3:
            raise ConfigError(f"rounds must be >= 3 for percentiles, got {self.rounds}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        object.__setattr__(self, "eager_modes", tuple(self.eager_modes))
        unknown = [m for m in self.eager_modes if m not in EAGER_MODES]
        if unknown or not self.eager_modes:
            raise ConfigError(f"eager modes {list(unknown) or '(none)'} unknown; expected some of {EAGER_MODES}")
        if self.data is not None and not Path(self.data).is_dir():
            raise ConfigError(f"--data {self.data} is not a folder (expected one sub-folder of images per class)")


@dataclass
class Row:
    bundle: str
    variant: str
    precision: str
    backend: str
    status: str = "ok"
    file_mb: float | None = None
    load_s: float | None = None
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # batch -> p50/p90/p99
    throughput_ips: float | None = None  # images per second at the largest batch
    peak_rss_mb: float | None = None
    accuracy: float | None = None  # top-1 on --data
    agreement: float | None = None  # top-1 agreement with fp32 without --data


def parse_batches(spec: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in spec.split(",") if b.strip())
    except ValueError:
        raise ConfigError(f"--batch expects a comma list of integers, got {spec!r}") from None


def profile(cfg: ProfileConfig, progress: Callable[[str], None] | None = None) -> list[Row]:
    from clipfold.runtime.bundle.schema import Manifest

    say = progress or (lambda message: None)
    if cfg.backend is not None:
        check_backend(cfg.backend)
    jobs: list[tuple[str, dict]] = []
    for bundle in cfg.bundles:
        manifest = Manifest.read(bundle)
        if cfg.data is not None:
            from clipfold.runtime.image_folders import read_folder

            classes = read_folder(Path(cfg.data))[0]
            unknown = [c for c in classes if c not in manifest.labels]
            if unknown:
                raise ConfigError(f"--data {cfg.data} has classes {unknown[:5]} that {bundle} does not know; "
                                  f"its labels are {list(manifest.labels)[:8]}")
        if cfg.eager:
            jobs.extend(("eager", {"bundle": str(bundle), "mode": mode}) for mode in cfg.eager_modes)
        for variant in manifest.variants:
            jobs.append(("engine", {"bundle": str(bundle), "variant": variant.name,
                                    "backend": cfg.backend or variant.backends[0]}))
    raw = []
    for i, (kind, job) in enumerate(jobs, 1):
        name = eager_name(job["mode"]) if kind == "eager" else job["variant"]
        say(f"[{i}/{len(jobs)}] {Path(job['bundle']).name}: {name}")
        raw.append(_in_worker(kind, job, cfg))
    # Agreement: top-1 of each row against the same bundle's fp32 variant, on the same images.
    fp32 = {job["bundle"]: r.get("predictions") for (_, job), r in zip(jobs, raw) if r["variant"] == "fp32"}
    rows = []
    for (_, job), r in zip(jobs, raw):
        predictions, reference = r.pop("predictions", None), fp32.get(job["bundle"])
        if predictions is not None and reference is not None:
            r["agreement"] = sum(a == b for a, b in zip(predictions, reference)) / len(reference)
        rows.append(Row(**r))
    _record(cfg, jobs, rows, say)
    return rows


def _record(cfg: ProfileConfig, jobs: list[tuple[str, dict]], rows: list[Row], say: Callable[[str], None]) -> None:
    """Each bundle's engine rows, measured with each variant's own backend, as this CPU's profile
    record in the bundle (``variant="auto"`` reads it; see :mod:`clipfold.runtime.variant_choice`)."""
    from clipfold.errors import ClipfoldError
    from clipfold.runtime.variant_choice import write_record

    measured: dict[str, dict[str, dict]] = {}
    for (kind, job), row in zip(jobs, rows):
        if kind == "engine" and row.status == "ok" and cfg.backend is None:
            measured.setdefault(job["bundle"], {})[row.variant] = {
                "backend": row.backend,
                "ms_per_image": {b: lat["p50"] / int(b) for b, lat in row.latency_ms.items()}}
    for bundle, variants in measured.items():
        try:
            path = write_record(Path(bundle), variants, cfg.threads)
            say(f"recorded this CPU's profile of {len(variants)} variant(s) in {path}")
        except (OSError, ClipfoldError) as exc:  # a read-only bundle still gets its table and JSON
            say(f"profile not recorded in {bundle}: {exc}")


def _in_worker(kind: str, job: dict, cfg: ProfileConfig) -> dict:
    """One row in a fresh spawned process; a worker that fails or dies becomes a row saying so."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    base = {"bundle": Path(job["bundle"]).name, "variant": eager_name(job["mode"]) if kind == "eager" else job["variant"],
            "precision": "fp32" if kind == "eager" else "", "backend": "torch" if kind == "eager" else job["backend"]}
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(measure, kind, job, _plain(cfg)).result()
        except BrokenProcessPool:
            return {**base, "status": "failed: the worker process died (out of memory?)"}
        except Exception as exc:  # reported in the row; the other rows still run
            return {**base, "status": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}


def _plain(cfg: ProfileConfig) -> dict:
    return {**asdict(cfg), "bundles": [str(b) for b in cfg.bundles], "data": None if cfg.data is None else str(cfg.data),
            "out": None}


# --- reporting --------------------------------------------------------------------------------
def table(rows: Sequence[Row], batches: Sequence[int]) -> str:
    head = ["bundle", "variant", "backend"] + [f"b{b} p50/p90/p99 ms" for b in batches] + [
        "img/s", "peak MB", "file MB", "load s", "accuracy"]
    lines = [head]
    for r in rows:
        if r.status != "ok":
            lines.append([r.bundle, r.variant, r.backend, r.status] + [""] * (len(head) - 4))
            continue
        lat = [("{p50:.1f}/{p90:.1f}/{p99:.1f}".format(**r.latency_ms[str(b)]) if str(b) in r.latency_ms else "-")
               for b in batches]
        quality = (f"{r.accuracy:.1%}" if r.accuracy is not None else
                   f"{r.agreement:.1%} agree" if r.agreement is not None else "n/a")
        lines.append([r.bundle, r.variant, r.backend, *lat, f"{r.throughput_ips:.1f}", f"{r.peak_rss_mb:.0f}",
                      "-" if r.file_mb is None else f"{r.file_mb:.1f}", f"{r.load_s:.2f}", quality])
    widths = [max(len(str(line[i])) for line in lines if i < len(line)) for i in range(len(head))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def machine() -> dict:
    info = {"machine": platform.machine(), "system": platform.system(), "python": platform.python_version()}
    try:
        import cpuinfo

        cpu = cpuinfo.get_cpu_info()
        info["cpu"] = cpu.get("brand_raw")
        info["cpu_flags"] = sorted(f for f in cpu.get("flags", []) if f.startswith(("avx", "fma", "amx", "vnni", "f16c")))
    except Exception:  # py-cpuinfo is optional
        info["cpu"] = platform.processor()
    info["cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for dist in ("clipfold", "onnxruntime", "onnx", "torch", "open_clip_torch", "numpy"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return info


def pareto(rows: Sequence[Row], batch: int) -> list[Row]:
    """Rows no other row beats on both batch-``batch`` p50 latency and accuracy (or agreement)."""
    points = [r for r in rows if r.status == "ok" and str(batch) in r.latency_ms and _quality(r) is not None]
    front = []
    for r in points:
        lat, q = r.latency_ms[str(batch)]["p50"], _quality(r)
        if not any(o is not r and o.latency_ms[str(batch)]["p50"] <= lat and _quality(o) >= q
                   and (o.latency_ms[str(batch)]["p50"] < lat or _quality(o) > q) for o in points):
            front.append(r)
    return sorted(front, key=lambda r: r.latency_ms[str(batch)]["p50"])


def _quality(row: Row) -> float | None:
    return row.accuracy if row.accuracy is not None else row.agreement


def write(rows: Sequence[Row], cfg: ProfileConfig) -> tuple[Path, Path | None]:
    """OUT.json always; OUT.png when matplotlib is installed (else the reason is returned in the JSON)."""
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    batch = cfg.batches[0]
    front = pareto(rows, batch)
    payload = {"machine": machine(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "config": {**_plain(cfg), "out": str(cfg.out)}, "rows": [asdict(r) for r in rows],
               "pareto_batch": batch, "pareto": [f"{r.bundle}:{r.variant}" for r in front]}
    png = out.with_suffix(".png")
    try:
        _plot(rows, front, batch, png, "accuracy" if cfg.data is not None else "top-1 agreement with fp32")
    except ImportError:
        payload["plot"] = "not drawn: matplotlib is not installed (pip install clipfold[profile])"
        png = None
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return json_path, png


def _plot(rows: Sequence[Row], front: Sequence[Row], batch: int, path: Path, quality: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, r in enumerate(rows):
        if r.status != "ok" or str(batch) not in r.latency_ms:
            continue
        if _quality(r) is None:  # timed only (e.g. eager with a fitted head): a vertical line at its latency
            ax.axvline(r.latency_ms[str(batch)]["p50"], color="tab:red", linestyle=":", label=f"{r.variant} (timed only)")
            continue
        x, y = r.latency_ms[str(batch)]["p50"], 100 * _quality(r)
        ax.scatter([x], [y], s=36, color="tab:red" if r.variant == EAGER else "tab:blue", zorder=3)
        ax.annotate(f"{r.variant}" if len({row.bundle for row in rows}) == 1 else f"{r.bundle}:{r.variant}",
                    (x, y), textcoords="offset points", xytext=(5, 4 + 10 * (i % 3)), fontsize=8)
    if front:
        ax.plot([r.latency_ms[str(batch)]["p50"] for r in front], [100 * _quality(r) for r in front],
                "--o", color="tab:green", markerfacecolor="none", markersize=11, label="Pareto front", zorder=2)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"latency p50 at batch {batch} (ms, log scale)")
    ax.set_ylabel(f"{quality} (%)")
    ax.set_title(f"latency vs {quality} ({machine().get('cpu') or platform.machine()})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def check_backend(name: str) -> None:
    """Refuse an unknown backend name up front; an uninstalled one is reported per row."""
    from clipfold.runtime.backends.registry import BACKENDS, GPU_BACKENDS

    known = set(BACKENDS) | set(GPU_BACKENDS)
    if name not in known:
        raise BackendUnavailableError(f"unknown backend {name!r}; expected one of {sorted(known)}")

