"""``compile_bundle``: plan → load → adapt → fold → export → verify → variants → text → write.

It only chains the stages: each step below is one small function over a stage of compile/stages/ or
compile/precision/, in the order the data flows. The eager model is dropped once the head, the
reference and the text tower are made, before the export and ONNX Runtime hold weights of their own.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import gc
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import clipfold.runtime.bundle.write as bundle
from clipfold.compile.config import CompileConfig, VerifyConfig
from clipfold.compile.precision.config import PRECISIONS, QuantConfig
from clipfold.compile.precision.native_variant import build_native_variant
from clipfold.compile.precision.native_variant import check_tower as check_native_tower
from clipfold.compile.precision.quantize import check_single_file
from clipfold.compile.precision.speed_check import keep_if_faster, resolve
from clipfold.compile.precision.variants import Sources, build_variants, check_early
from clipfold.compile.stages.adapt import Adaptation, HeadPlan, plan_head, resolve_head
from clipfold.compile.stages.export import ClassifierGraph, EmbeddingGraph, export_onnx, io_specs
from clipfold.compile.stages.fold import fold_input_normalization
from clipfold.compile.stages.load import LoadedModel, load_model
from clipfold.compile.stages.optimize import (
    FUSED_OPS,
    fuse_for_onnxruntime,
    keep_class_token_only,
    op_counts,
    use_sdpa_attention,
)
from clipfold.compile.stages.text_tower import build_text_variants, export_text
from clipfold.compile.stages.verify import Reference, eager_reference, verification_pixels, verify_onnx
from clipfold.errors import ExportError
from clipfold.kernels import Gallery
from clipfold.runtime.backends.kernel_head import KernelHead
from clipfold.runtime.bundle.layout import KERNEL_HEAD_DIR, ONNX_FILE, PORTABLE_FILE, row_width
from clipfold.runtime.bundle.schema import Manifest, PreprocessSpec, TextTower, Variant

__all__ = ["CompileConfig", "VerifyConfig", "CompileResult", "compile_bundle"]

NATIVE = "fp32-native"
Say = Callable[[str], None]


@dataclass(frozen=True)
class CompileResult:
    path: Path
    manifest: Manifest
    seconds: float


def _say(progress: Callable[[str], None] | None, message: str) -> None:
    if progress is not None:
        progress(message)


def compile_bundle(config: CompileConfig, progress: Callable[[str], None] | None = None) -> CompileResult:
    """Compile ``config.model`` with a zero-shot, fitted or imported head into a verified bundle."""
    start, say = time.perf_counter(), functools.partial(_say, progress)
    config, plan, conditional = _plan(config, say)  # cheap checks: nothing loaded, nothing written yet
    with bundle.staging_dir(config.out, config.overwrite) as stage:
        config, loaded = _load(config, conditional, say)
        adaptation = resolve_head(plan, loaded, (config.model, loaded.info.checkpoint_sha256),
                                  float(loaded.model.logit_scale.detach().exp()), progress)
        config = _check_native_head(config, conditional, adaptation, say)
        spec, top_k = loaded.preprocess, min(config.top_k, len(adaptation.labels))
        visual = _fold(config, adaptation.visual, spec)
        adaptation, kernel_head = _kernel_head(config, adaptation, stage, top_k, say)
        graph = (EmbeddingGraph(visual) if kernel_head is not None else
                 ClassifierGraph(visual, adaptation.head, top_k, adaptation.logits_module, adaptation.info.activation))
        pixels = verification_pixels(spec, config.verify)
        reference = eager_reference(adaptation.encoder, adaptation.reference, spec, pixels)
        text = _export_text(config, loaded, plan, adaptation.labels, stage, say) if config.text else None
        # The eager model has done its work (head, reference, text tower): it goes before the export
        # and ONNX Runtime, which hold copies of the weights of their own (peak memory, issue 24).
        loaded = dataclasses.replace(loaded, model=None, tokenizer=None)
        adaptation = dataclasses.replace(adaptation, encoder=None, visual=None)
        gc.collect()

        say("exporting ONNX (fp32, dynamic batch)")
        export_onnx(graph, stage / (PORTABLE_FILE if config.fuse else ONNX_FILE), spec.image_size, config.opset)
        if NATIVE not in config.precisions:  # the folded tower is needed by fp32-native only
            graph = visual = None
            gc.collect()
        fp32 = _verify_fp32(config, stage, spec, top_k, loaded.info.embed_dim, kernel_head, reference, say)
        native = _native_variant(config, visual, adaptation, stage, fp32, kernel_head, reference, say)
        graph = visual = None
        gc.collect()
        built = _reduced_variants(config, plan, stage, fp32, kernel_head, spec, adaptation.labels, reference, progress)
        if text is not None:
            text = build_text_variants(stage, text, config.text_precisions, adaptation.labels, config.quant,
                                       config.gate, progress)
        built = keep_if_faster(conditional, fp32, (*native, *built), stage, pixels, say)
        manifest = _manifest(loaded, adaptation, (fp32, *built), stage, text)
        path = bundle.commit(stage, manifest, config.out)
    return CompileResult(path=path, manifest=manifest, seconds=time.perf_counter() - start)


def _plan(config: CompileConfig, say: Say) -> tuple[CompileConfig, HeadPlan, tuple[str, ...]]:
    """Before the model loads: the head's request checked (adapter, method, labels, templates), the
    ``--if-faster`` alternatives this machine runs added, and every precision's options checked."""
    plan = plan_head(config, config.model)
    # --if-faster: the CPU alternatives to fp32 this machine runs, built and then kept only where faster
    conditional = resolve(config.precisions, config.if_faster, say)
    if config.if_faster:
        config = dataclasses.replace(config, precisions=(*config.precisions, *conditional), if_faster=())
    check_early(config.precisions, config.quant, config.gate)
    return config, plan, conditional


def _load(config: CompileConfig, conditional: tuple[str, ...], say: Say) -> tuple[CompileConfig, LoadedModel]:
    """The model, and fp32-native refused (or, under ``--if-faster``, skipped) for a tower the kernel cannot run."""
    say(f"loading {config.model} ({config.pretrained or 'default weights'})")
    loaded = load_model(config.model, config.pretrained, config.tokenizer)
    if NATIVE in conditional:  # --if-faster: a tower the kernel cannot run is skipped, not refused
        try:
            check_native_tower(loaded.model.visual)
        except ExportError as exc:
            config = _skip_native(config, str(exc), say)
    if NATIVE in config.precisions:  # refused now, not after the fp32 build and its verification
        check_native_tower(loaded.model.visual)
    check_single_file(config.precisions, sum(t.numel() * t.element_size() for t in loaded.model.visual.parameters()))
    return config, loaded


def _check_native_head(config: CompileConfig, conditional, adaptation: Adaptation, say: Say) -> CompileConfig:
    """fp32-native runs a folded head: an image-conditioned one skips it (``--if-faster``) or is refused."""
    if adaptation.logits_module is None:
        return config
    if NATIVE in conditional:
        config = _skip_native(config, "the head is image-conditioned and runs only inside the ONNX graph", say)
    if NATIVE in config.precisions:
        raise ExportError(f"{NATIVE} needs a folded head; the {config.method} head is image-conditioned and "
                          "runs only inside the ONNX graph (build fp32 and the other precisions)")
    return config


def _skip_native(config: CompileConfig, why: str, say: Say) -> CompileConfig:
    say(f"skipping {NATIVE} (--if-faster): {why}")
    return dataclasses.replace(config, precisions=tuple(p for p in config.precisions if p != NATIVE))


def _fold(config: CompileConfig, visual: torch.nn.Module, spec: PreprocessSpec) -> torch.nn.Module:
    """The image tower with the input normalization folded in (and, with ``fuse``, its attention ready for
    ONNX Runtime's fused operators and the last block computing the class token only)."""
    folded = fold_input_normalization(visual, spec.mean, spec.std, spec.image_size)
    if config.fuse:
        use_sdpa_attention(folded)
        keep_class_token_only(folded)
    return folded


def _kernel_head(config: CompileConfig, adaptation: Adaptation, stage: Path, top_k: int,
                 say: Say) -> tuple[Adaptation, KernelHead | None]:
    """A head that leaves the graph: its rows written as a kernel gallery, the head info naming the folder."""
    rows = _kernel_head_rows(config, adaptation, say)
    if rows is None:
        return adaptation, None
    Gallery.from_array(rows).save(stage / KERNEL_HEAD_DIR)
    kernel_head = KernelHead(stage / KERNEL_HEAD_DIR, adaptation.info.activation, top_k, len(adaptation.labels))
    return dataclasses.replace(adaptation, info=dataclasses.replace(adaptation.info, kernel=KERNEL_HEAD_DIR)), kernel_head


def _kernel_head_rows(config: CompileConfig, adaptation: Adaptation, say: Say) -> np.ndarray | None:
    """The head as kernel rows ``[w_c, b_c, 0...]`` (C, D + 1 rounded up to 16) when it should leave the graph: a purely
    linear head (no cache, no feature transform) with at least ``config.kernel_head_classes``
    classes. Other large heads stay in the graph, and the progress line says why."""
    classes = len(adaptation.labels)
    if config.kernel_head_classes is None or classes < config.kernel_head_classes:
        return None
    folded = adaptation.head.fold() if adaptation.head is not None else None
    if folded is None or folded.caches or folded.transform is not None:
        say(f"{classes} classes, but the {adaptation.info.method} head is not a plain linear map "
            "(cache, feature transform or image-conditioned): it stays in the graph")
        return None
    say(f"{classes} classes >= {config.kernel_head_classes}: the head leaves the graph and is scored "
        "by the top-k kernel at run time")
    weight, bias = folded.weight.detach().float(), folded.bias.detach().float()
    classes, dim = weight.shape[1], weight.shape[0]
    rows = torch.zeros(classes, row_width(dim))  # weights, bias, zeros: rows start on cache lines
    rows[:, :dim], rows[:, dim] = weight.T, bias
    return rows.numpy()


def _export_text(config: CompileConfig, loaded: LoadedModel, plan: HeadPlan, labels: tuple[str, ...], stage: Path,
                 say: Say) -> TextTower:
    """The text tower and its tokenizer, verified on prompts of the first labels and templates."""
    say("exporting and verifying the text tower and its tokenizer")
    prompts = [t.format(label) for label in labels[:64] for t in (plan.templates or ("{}",))[:4]]
    return export_text(loaded, stage, prompts, config.opset)


def _verify_fp32(config: CompileConfig, stage: Path, spec: PreprocessSpec, top_k: int, embed_dim: int,
                 kernel_head: KernelHead | None, reference: Reference, say: Say) -> Variant:
    """The exported graph fused for ONNX Runtime (with ``fuse``), then verified: the fp32 variant."""
    onnx_path = stage / ONNX_FILE
    if config.fuse:
        say("fusing attention, LayerNorm and GELU for ONNX Runtime")
        fuse_for_onnxruntime(stage / PORTABLE_FILE, onnx_path)
    say("verifying against the eager model and the unfolded head")
    inputs, outputs = io_specs(spec.image_size, top_k, embed_dim, embedding_only=kernel_head is not None)
    parity = verify_onnx(onnx_path, inputs, outputs, reference, config.verify, head=kernel_head)
    fused = {op: n for op, n in sorted(op_counts(onnx_path).items()) if op in FUSED_OPS}
    return Variant(name="fp32", file=ONNX_FILE, format="onnx", precision="fp32",
                   inputs=inputs, outputs=outputs, parity=parity, top_k=top_k, fused_ops=fused)


def _native_variant(config: CompileConfig, visual, adaptation: Adaptation, stage: Path, fp32: Variant,
                    kernel_head: KernelHead | None, reference: Reference, say: Say) -> list[Variant]:
    """fp32-native (the clipfold-vit kernels), when asked for: built from the folded tower and verified."""
    if NATIVE not in config.precisions:
        return []
    say(f"building {NATIVE}: {PRECISIONS[NATIVE][0]}")
    head = adaptation.head if adaptation.logits_module is None else None
    native = build_native_variant(visual, head, stage, fp32.inputs, fp32.outputs, fp32.top_k, kernel_head,
                                  reference, config.verify, config.opset)
    say(f"  {NATIVE}: parity vs open_clip eager: cosine min {native.parity.embedding_cosine_min:.7f}")
    return [native]


def _reduced_variants(config: CompileConfig, plan: HeadPlan, stage: Path, fp32: Variant,
                      kernel_head: KernelHead | None, spec: PreprocessSpec, labels: tuple[str, ...],
                      reference: Reference, progress) -> list[Variant]:
    """Every other precision, each gated against fp32 (compile/precision/variants.py); the portable graph
    they start from is removed after."""
    portable = stage / (PORTABLE_FILE if config.fuse else ONNX_FILE)
    sources = Sources(stage / ONNX_FILE, portable, fp32.inputs, fp32.outputs, fp32.top_k, kernel_head)
    built = build_variants([p for p in config.precisions if p != NATIVE], stage, sources, spec, labels, reference,
                           config.verify, _calibration_default(config, plan.adapter_file), config.gate, progress)
    if config.fuse:
        portable.unlink()
    return list(built)


def _manifest(loaded: LoadedModel, adaptation: Adaptation, variants: tuple[Variant, ...], stage: Path,
              text: TextTower | None) -> Manifest:
    """The manifest of the staged bundle: every file's checksum, the producer's versions, fp32 the default."""
    return Manifest(
        model=loaded.info,
        labels=adaptation.labels,
        head=adaptation.info,
        preprocess=loaded.preprocess,
        variants=variants,
        default_variant="fp32",
        files=bundle.checksum_tree(stage),
        producer=producer_versions(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        text=text,
    )


def _calibration_default(config: CompileConfig, adapter_file) -> QuantConfig:
    """Without ``--calib``, a fitted adapter's own support folder (when it is still there)."""
    quant = config.quant
    support = (adapter_file.hyperparameters.get("support") if adapter_file is not None else None)
    if quant.calib is None and support and Path(support).is_dir():
        return dataclasses.replace(quant, calib=Path(support))
    return quant


def producer_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("clipfold", "torch", "open_clip_torch", "onnx", "onnxscript", "onnxruntime", "timm"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions
