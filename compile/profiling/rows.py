"""One profile row, measured inside a spawned worker (the worker side of :mod:`.run`).

``measure`` is what the worker runs: ``measure_engine`` imports only the runtime (no torch), so its
peak memory is the engine's; ``measure_eager`` loads open_clip (the eager reference rows, named by
``eager_name``). Both return plain dicts, plus ``predictions`` (top-1 index per image) that the
parent turns into agreement with fp32 and then drops. This module imports nothing of ``run``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

DEFAULT_SEED = 4321  # generated profiling images
EAGER = "open_clip eager"
# the modes of the open_clip eager reference rows (ProfileConfig.eager_modes says what each is)
EAGER_MODES = ("cpu", "cuda-fp16", "cuda-bf16", "cuda-fp16-compile")


def eager_name(mode: str) -> str:
    """The row name of the open_clip eager reference run in ``mode``."""
    return EAGER if mode == "cpu" else f"{EAGER} {mode.replace('-', ' ')}"


def measure(kind: str, job: dict, cfg: dict) -> dict:
    """One row (``kind`` "engine" or "eager"), run in a fresh spawned process; ``cfg`` is the
    ProfileConfig as plain data. A row that ran carries this process's peak memory."""
    row = measure_eager(job, cfg) if kind == "eager" else measure_engine(job, cfg)
    if row.get("status", "ok") == "ok":
        row["peak_rss_mb"] = peak_rss_mb()
    return row


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM belongs to the address space created at
    exec, so it excludes the parent; ``ru_maxrss`` would carry the parent's peak over the exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _images(cfg: dict):
    """(decoded images, label names or None)."""
    if cfg["data"] is not None:
        from clipfold.runtime.image_folders import read_folder
        from clipfold.runtime.images import load_image

        classes, paths, targets = read_folder(Path(cfg["data"]))
        return [load_image(p) for p in paths], [classes[t] for t in targets]
    from clipfold.compile.tiny import data

    return [s.image for s in data.generate(cfg["images"], seed=DEFAULT_SEED)], None


def _percentiles(times: list[float]) -> dict[str, float]:
    ms = np.asarray(times) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99))}


def _latencies(run, images, cfg: dict) -> tuple[dict, float]:
    latency = {}
    for batch in cfg["batches"]:
        chunk = [images[i % len(images)] for i in range(batch)]
        for _ in range(cfg["warmup"]):
            run(chunk)
        times = []
        for _ in range(cfg["rounds"]):
            start = time.perf_counter()
            run(chunk)
            times.append(time.perf_counter() - start)
        latency[str(batch)] = _percentiles(times)
    largest = max(cfg["batches"])
    return latency, largest / (latency[str(largest)]["p50"] / 1e3)


def _quality(predicted: list[str], truth: list[str] | None) -> float | None:
    if truth is None:
        return None
    return float(np.mean([p == t for p, t in zip(predicted, truth)]))


def measure_engine(job: dict, cfg: dict) -> dict:
    from clipfold.errors import BackendUnavailableError
    from clipfold.runtime import Engine
    from clipfold.runtime.bundle.schema import Manifest

    bundle = Path(job["bundle"])
    variant = Manifest.read(bundle).variant(job["variant"])
    path = bundle / variant.file
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    row = {"bundle": bundle.name, "variant": variant.name, "precision": variant.precision,
           "backend": cfg["backend"] or variant.backends[0], "file_mb": size / 1e6}
    start = time.perf_counter()
    try:
        engine = Engine.open(bundle, variant=variant.name, backend=cfg["backend"], threads=cfg["threads"],
                             batch_size=max(cfg["batches"]), verify_checksums=False)
    except BackendUnavailableError as exc:
        return {**row, "status": f"not run: {exc}"}
    row["load_s"] = time.perf_counter() - start
    images, truth = _images(cfg)
    row["latency_ms"], row["throughput_ips"] = _latencies(lambda chunk: engine.classify(chunk, k=1), images, cfg)
    predicted = [preds[0].index for preds in engine.classify(images, k=1)]
    row["accuracy"] = _quality([engine.labels[i] for i in predicted], truth)
    row["predictions"] = predicted
    return row


def measure_eager(job: dict, cfg: dict) -> dict:
    """open_clip eager on the bundle's model: torchvision preprocessing, encode_image, the zero-shot head."""
    import open_clip
    import torch
    import torch.nn.functional as F

    from clipfold.compile.heads.zero_shot import build_zero_shot_head
    from clipfold.compile.stages.load import load_model
    from clipfold.kernels.cpu_runtime import default_threads
    from clipfold.runtime.bundle.schema import Manifest

    torch.set_num_threads(cfg["threads"] or default_threads())
    bundle = Path(job["bundle"])
    m = Manifest.read(bundle)
    mode = job.get("mode", "cpu")
    dtype = {"cpu": torch.float32, "cuda-fp16": torch.float16, "cuda-bf16": torch.bfloat16,
             "cuda-fp16-compile": torch.float16}[mode]
    row = {"bundle": bundle.name, "variant": eager_name(mode), "precision": str(dtype).removeprefix("torch."),
           "backend": "torch" if mode == "cpu" else "torch-cuda"}
    if mode != "cpu" and not torch.cuda.is_available():
        return {**row, "status": "not run: needs an NVIDIA GPU (torch.cuda.is_available() is False)"}
    device = "cpu" if mode == "cpu" else "cuda"
    pretrained = m.model.pretrained
    if pretrained is not None and "/" in pretrained and not Path(pretrained).exists():
        return {**row, "status": f"not run: the checkpoint {pretrained} the bundle was compiled from is not here"}
    start = time.perf_counter()
    loaded = load_model(m.model.name, pretrained)
    spec = m.preprocess
    interpolation = "bilinear" if spec.interpolation == "nearest" else spec.interpolation
    transform = open_clip.image_transform(spec.image_size, is_train=False, mean=spec.mean, std=spec.std,
                                          resize_mode=spec.resize_mode, interpolation=interpolation,
                                          fill_color=spec.fill_color)
    comparable = m.head.method == "zero-shot" and (pretrained is not None or m.model.checkpoint_sha256 is not None)
    head = build_zero_shot_head(loaded.model, loaded.tokenizer, m.labels, m.head.templates) \
        if m.head.method == "zero-shot" else None
    row["load_s"] = time.perf_counter() - start

    model = loaded.model.to(device=device, dtype=dtype).eval()
    encode = torch.compile(model.encode_image) if mode.endswith("-compile") else model.encode_image

    @torch.inference_mode()
    def run(chunk):
        x = torch.stack([transform(image) for image in chunk]).to(device=device, dtype=dtype)
        features = F.normalize(encode(x).float(), dim=-1).cpu()  # .cpu() waits for the GPU
        return head.scores(features).argmax(-1) if head is not None else features

    images, truth = _images(cfg)
    row["latency_ms"], row["throughput_ips"] = _latencies(run, images, cfg)
    if comparable:
        bs = max(cfg["batches"])
        predicted = [int(i) for lo in range(0, len(images), bs) for i in run(images[lo:lo + bs])]
        row["accuracy"] = _quality([m.labels[i] for i in predicted], truth)
        row["predictions"] = predicted
    return row
