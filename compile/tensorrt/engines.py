"""``clipfold engine build``: TensorRT plans for this machine's GPU, gated, added to a bundle.

For each TensorRT-bound variant (``tensorrt-fp16``, ``tensorrt-int8``, ``fp8``; see
:mod:`.build`), a plan is built from the variant's verified graph, run on the held-out gate
images on this GPU, and compared with the fp32 variant (run by ONNX Runtime) under the same gate as
every variant. Only a plan that passes is added. The bundle's manifest is rewritten atomically,
and the plan's record names the GPU, compute capability, TensorRT version and batch profile. A
bundle can carry plans for several GPUs, for example a Jetson Orin (8.7) and an H100 (9.0), and
the runtime picks the one for its own machine (``runtime/backends/tensorrt.py``). Re-building for
the same GPU and TensorRT version replaces that plan; the timing cache kept beside it makes the
re-build fast.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

import clipfold.compile.precision.gate as gating
import clipfold.compile.precision.image_sets as image_sets
from clipfold.compile.precision.config import GateConfig
from clipfold.compile.tensorrt.build import BatchProfile, build_engine, gpu_identity
from clipfold.errors import BundleError, ConfigError, GateError
from clipfold.runtime import Engine
from clipfold.runtime.backends.kernel_head import KernelHead, KernelHeadBackend
from clipfold.runtime.bundle.files import sha256_file
from clipfold.runtime.bundle.layout import engine_files
from clipfold.runtime.bundle.schema import EngineRecord
from clipfold.runtime.bundle.write import update_manifest


@dataclass(frozen=True)
class EngineBuildConfig:
    bundle: Path
    variants: tuple[str, ...] = ()  # default: every TensorRT-bound variant of the bundle
    profile: BatchProfile = field(default_factory=BatchProfile)
    gate: GateConfig = field(default_factory=GateConfig)
    workspace_gib: float = 4.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "bundle", Path(self.bundle))
        object.__setattr__(self, "variants", tuple(self.variants))
        if self.workspace_gib <= 0:
            raise ConfigError(f"workspace must be positive, got {self.workspace_gib} GiB")


def tensorrt_variants(manifest, wanted: tuple[str, ...] = ()) -> list:
    bound = [v for v in manifest.variants if "tensorrt" in v.backends]
    if not wanted:
        if not bound:
            raise BundleError("this bundle has no TensorRT-bound variant; compile it with --backend tensorrt "
                              "--precision fp16,int8,fp8 (or --precision tensorrt-fp16,...) first")
        return bound
    missing = [name for name in wanted if name not in {v.name for v in bound}]
    if missing:
        raise BundleError(f"variants {missing} are not TensorRT-bound graphs; this bundle has "
                          f"{[v.name for v in bound] or 'none'} (TensorRT cannot parse ONNX Runtime's fused graphs)")
    return [v for v in bound if v.name in wanted]


def build_engines(cfg: EngineBuildConfig, progress: Callable[[str], None] | None = None):
    """Build, gate and add a plan for every requested variant; returns the new manifest."""
    say = progress or (lambda message: None)
    fp32 = Engine.open(cfg.bundle)  # checks the schema and every checksum
    manifest = fp32.manifest
    targets = tensorrt_variants(manifest, cfg.variants)  # before gpu_identity: no TensorRT variant says so first
    here = gpu_identity()
    targets = _buildable(targets, here, bool(cfg.variants), say)
    held = image_sets.held_out_images(manifest.preprocess, manifest.labels, cfg.gate)
    reference = fp32.run_pixels(held.pixels)
    built, new_files, written, obsolete = {}, {}, [], []
    try:
        for variant in targets:
            staged = _staged_paths(cfg.bundle, variant)
            written.extend(staged)
            record, digests = _build_plan(cfg, manifest, variant, here, staged, say)
            figures = _gate_plan(cfg, manifest, variant, record, staged[0], held, reference, here)
            say(f"  {variant.name} on {here['gpu']}: min cosine {figures.embedding_cosine_min:.5f}, top-1 agreement "
                f"{figures.top1_agreement:.1%}")
            built[variant.name] = dataclasses.replace(record, gate=figures)
            for path, name, digest in zip(staged, (record.file, record.timing_cache), digests):
                os.replace(path, cfg.bundle / name)
                if name not in manifest.files:  # a byte-identical rebuild keeps its listed name: never remove it
                    written.append(cfg.bundle / name)
                new_files[name] = digest
        # the commit point, under the bundle's lock
        updated = update_manifest(cfg.bundle, _add_records(cfg.bundle, built, new_files, obsolete))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    for name in obsolete:
        if name not in updated.files:  # a byte-identical rebuild kept the name: that file is listed again
            (cfg.bundle / name).unlink(missing_ok=True)
    return updated


def _buildable(targets: list, here: dict, explicit: bool, say: Callable[[str], None]) -> list:
    """The targets this GPU can build: TensorRT's FP8 needs Ada or Hopper (compute capability 8.9+).
    FP8 variants asked for by name are an error on an older GPU; the default list skips them."""
    if float(here["compute_capability"]) >= 8.9:
        return targets
    fp8 = [v.name for v in targets if v.precision == "fp8"]
    if fp8 and explicit:
        raise ConfigError(f"{fp8} need FP8 tensor cores (compute capability 8.9 or newer); {here['gpu']} has "
                          f"{here['compute_capability']}")
    if fp8:
        say(f"skipping {fp8}: FP8 needs compute capability 8.9 or newer, {here['gpu']} has {here['compute_capability']}")
    return [v for v in targets if v.precision != "fp8"]


def _staged_paths(bundle: Path, variant) -> tuple[Path, Path]:
    """Temporary names for the plan and its timing cache. They are renamed to names holding their
    sha256 once gated, so that no file the current manifest lists is ever overwritten: a crash
    before the commit leaves the bundle valid."""
    stem = Path(variant.file).stem
    return bundle / f".{stem}.plan.tmp-{os.getpid()}", bundle / f".{stem}.cache.tmp-{os.getpid()}"


def _same_build(record, compute_capability: str, tensorrt: str) -> bool:
    """A plan built on a GPU of this compute capability by this TensorRT version (the pair that ties a plan)."""
    return (record.compute_capability, record.tensorrt) == (compute_capability, tensorrt)


def _build_plan(cfg: EngineBuildConfig, manifest, variant, here: dict, staged: tuple[Path, Path],
                say: Callable[[str], None]) -> tuple[EngineRecord, list[str]]:
    """Build the plan into ``staged``, reusing this GPU's earlier timing cache; returns its record,
    which names the final, content-addressed file names, and the two files' sha256."""
    old_cache = next((cfg.bundle / e.timing_cache for e in variant.engines
                      if _same_build(e, here["compute_capability"], here["tensorrt"])), staged[1])
    info = build_engine(cfg.bundle / variant.file, staged[0], old_cache, variant.inputs[0].name,
                        manifest.preprocess.image_size, cfg.profile, cfg.workspace_gib, say, cache_out=staged[1])
    tag = f"sm{here['compute_capability'].replace('.', '')}-trt{here['tensorrt']}"
    digests = [sha256_file(path) for path in staged]
    plan, cache = engine_files(variant.file, tag, *digests)
    fields = {f.name for f in dataclasses.fields(EngineRecord)}
    record = EngineRecord(**{k: v for k, v in {**info, "file": plan, "timing_cache": cache}.items() if k in fields})
    return record, digests


def _gate_plan(cfg: EngineBuildConfig, manifest, variant, record: EngineRecord, plan: Path, held, reference,
               here: dict):
    """Run the plan on the held-out gate images in profile-sized batches and gate it against fp32."""
    from clipfold.runtime.backends.tensorrt import TensorRTBackend

    backend = TensorRTBackend(plan, variant.inputs, variant.outputs, record)
    if manifest.head.kernel is not None:  # the head is scored by the top-k kernel after the graph
        backend = KernelHeadBackend(backend, KernelHead(cfg.bundle / manifest.head.kernel, manifest.head.activation,
                                                        variant.top_k, len(manifest.labels)))
    out: dict = {}
    for lo in range(0, len(held.pixels), cfg.profile.max):
        for name, value in backend.run({"pixels": held.pixels[lo:lo + cfg.profile.max]}).items():
            out.setdefault(name, []).append(value)
    del backend  # its device memory, before the next variant's build
    figures = gating.measure(reference, {k: np.concatenate(v) for k, v in out.items()}, held, cfg.gate)
    missed = gating.failures(figures, cfg.gate)
    if missed:
        raise GateError(f"the TensorRT engine of {variant.name!r} on {here['gpu']} misses the accuracy gate "
                        f"against fp32 on {figures.images} images ({figures.source}):\n  - "
                        + "\n  - ".join(missed), missed)
    return figures


def _add_records(bundle: Path, built: dict, new_files: dict, obsolete: list) -> Callable:
    """The manifest change that adds the gated records, replacing each variant's plan for the same
    GPU and TensorRT version (whose files it appends to ``obsolete``). It is applied to the manifest
    as committed at that moment (a head add may have finished meanwhile)."""

    def change(current):
        variants, files = {v.name: v for v in current.variants}, dict(current.files)
        for name, record in built.items():
            if name not in variants:
                raise BundleError(f"variant {name!r} left bundle {bundle} while its engine was built; build again")
            variant = variants[name]
            replaced = [e for e in variant.engines if _same_build(e, record.compute_capability, record.tensorrt)]
            for old in replaced:
                files.pop(old.file, None)
                files.pop(old.timing_cache, None)
                obsolete.extend([old.file, old.timing_cache])
            variants[name] = dataclasses.replace(
                variant, engines=tuple(e for e in variant.engines if e not in replaced) + (record,))
        files.update(new_files)
        return dataclasses.replace(current, variants=tuple(variants[v.name] for v in current.variants), files=files)

    return change
