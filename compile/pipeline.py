"""``compile_bundle``: load → head → fold → export → verify → write. It only chains the stages."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import clipfold.runtime.bundle.write as bundle
import numpy as np
import torch
from clipfold.compile.adapters import registry
from clipfold.compile.adapters.base import ImportRequest
from clipfold.compile.adapters.store import load_adapter
from clipfold.compile.config import CompileConfig, VerifyConfig
from clipfold.compile.heads.ir import Head
from clipfold.compile.heads.zero_shot import build_zero_shot_head, resolve_templates
from clipfold.compile.precision.config import PRECISIONS, QuantConfig
from clipfold.compile.precision.native_variant import build_native_variant
from clipfold.compile.precision.native_variant import check_tower as check_native_tower
from clipfold.compile.precision.speed_check import keep_if_faster, resolve
from clipfold.compile.precision.variants import Sources, build_variants, check_early
from clipfold.compile.stages.export import ClassifierGraph, EmbeddingGraph, export_onnx, io_specs
from clipfold.compile.stages.fold import fold_input_normalization
from clipfold.compile.stages.load import load_model
from clipfold.compile.stages.optimize import (
    FUSED_OPS,
    fuse_for_onnxruntime,
    keep_class_token_only,
    op_counts,
    use_sdpa_attention,
)
from clipfold.compile.stages.text_tower import build_text_variants, export_text
from clipfold.compile.stages.verify import eager_reference, verification_pixels, verify_onnx
from clipfold.kernels import Gallery
from clipfold.runtime.backends.kernel_head import KernelHead
from clipfold.runtime.bundle.files import sha256_file
from clipfold.runtime.bundle.layout import KERNEL_HEAD_DIR, row_width
from clipfold.runtime.bundle.schema import HeadInfo, Manifest, Variant

from clipfold.errors import ExportError, LabelError

__all__ = ["CompileConfig", "VerifyConfig", "CompileResult", "compile_bundle"]

ONNX_FILE = "model.onnx"
NATIVE = "fp32-native"
PORTABLE_FILE = "model.portable.onnx"  # standard operators only; fp8 starts from it, then it is removed


@dataclass(frozen=True)
class CompileResult:
    path: Path
    manifest: Manifest
    seconds: float


def _say(progress: Callable[[str], None] | None, message: str) -> None:
    if progress is not None:
        progress(message)


@dataclass(frozen=True)
class _Adaptation:
    """What the head stage hands to export and verification."""

    labels: tuple[str, ...]
    head: Head | None  # folded into the graph
    logits_module: torch.nn.Module | None  # or an image-conditioned head (CoCoOp)
    reference: object  # unfolded formula: anything with ``scores(unit features)``
    encoder: object  # anything with ``encode_image(normalized pixels)``: the eager image tower
    visual: torch.nn.Module  # the image tower to export (input normalization not yet folded)
    info: HeadInfo


class _ModuleScores:
    def __init__(self, module: torch.nn.Module, activation: str):
        self.module, self.activation = module, activation

    @torch.no_grad()
    def scores(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.module(features)
        return logits.softmax(-1) if self.activation == "softmax" else logits.sigmoid()


class _Tower:
    def __init__(self, visual: torch.nn.Module):
        self.encode_image = visual


def _adapter_info(path: Path, method: str, hyperparameters: dict, **extra) -> dict:
    # The support folder's local path (the default calibration set) stays out of the bundle.
    public = {k: v for k, v in hyperparameters.items() if k != "support"}
    return {"file": Path(path).name, "sha256": sha256_file(path), "hyperparameters": public, **extra}


def _adapt(config: CompileConfig, loaded, labels, templates, adapter_file, progress) -> _Adaptation:
    """The head stage: zero-shot, a clipfold adapter file, or an imported official checkpoint."""
    model = loaded.model
    scale = float(model.logit_scale.detach().exp())
    if adapter_file is not None:
        adapter_file.check_backbone(config.model, loaded.info.checkpoint_sha256)
        _say(progress, f"using the {adapter_file.head.method} adapter {config.adapter}")
        head = adapter_file.head  # Head.logits is its unfolded formula
        info = HeadInfo(activation=head.activation, logit_scale=scale, logit_bias=None, templates=(),
                        method=head.method, adapter=_adapter_info(config.adapter, head.method,
                                                                  adapter_file.hyperparameters))
        return _Adaptation(labels, head, None, head, model, model.visual, info)
    if config.method is not None:
        _say(progress, f"importing the {config.method} checkpoint {config.adapter}")
        request = ImportRequest(Path(config.adapter), loaded, labels, templates, dict(config.method_options))
        imported = registry.importer(config.method)(request)
        if imported.labels != labels:
            raise LabelError(f"the {config.method} checkpoint scores {len(imported.labels)} classes, "
                             f"{len(labels)} labels were given")
        visual = imported.visual if imported.visual is not None else model.visual
        encoder = _Tower(imported.visual) if imported.visual is not None else model
        reference = imported.head if imported.head is not None else _ModuleScores(imported.logits_module,
                                                                                 imported.activation)
        info = HeadInfo(activation=imported.activation, logit_scale=scale, logit_bias=None,
                        templates=tuple(templates), method=config.method, slow=imported.slow,
                        adapter=_adapter_info(imported.source or config.adapter, config.method, imported.hyperparameters,
                                              imported=True, options=dict(config.method_options)))
        return _Adaptation(labels, imported.head, imported.logits_module, reference, encoder, visual, info)
    _say(progress, f"building the head: {len(labels)} labels x {len(templates)} templates")
    zero_shot = build_zero_shot_head(model, loaded.tokenizer, labels, templates, progress=progress)
    info = HeadInfo(activation=zero_shot.activation, logit_scale=zero_shot.logit_scale,
                    logit_bias=zero_shot.logit_bias, templates=templates)
    return _Adaptation(labels, zero_shot.to_head(), None, zero_shot, model, model.visual, info)


def compile_bundle(config: CompileConfig, progress: Callable[[str], None] | None = None) -> CompileResult:
    """Compile ``config.model`` with a zero-shot, fitted or imported head into a verified bundle."""
    start = time.perf_counter()
    # Cheap checks first: a bad adapter, method, template spec or existing target fails before the model loads.
    adapter_file = None
    if config.adapter is not None and config.method is None:
        adapter_file = load_adapter(config.adapter)
    if config.method is not None:
        registry.importer(config.method)
    labels = config.labels if config.labels is not None else adapter_file.labels
    if adapter_file is not None and adapter_file.labels != labels:
        raise LabelError(f"the labels differ from the adapter's {len(adapter_file.labels)} labels "
                         f"({', '.join(adapter_file.labels[:5])}{', ...' if len(adapter_file.labels) > 5 else ''}); "
                         "omit --labels to use the adapter's")
    templates = () if adapter_file is not None else registry.import_templates(config.method, config.templates,
                                                                               config.model)
    # --if-faster: the CPU alternatives to fp32 this machine runs, built and then kept only where faster
    conditional = resolve(config.precisions, config.if_faster, lambda message: _say(progress, message))
    if config.if_faster:
        config = dataclasses.replace(config, precisions=(*config.precisions, *conditional), if_faster=())
    check_early(config.precisions, config.quant, config.gate)
    with bundle.staging_dir(config.out, config.overwrite) as stage:
        _say(progress, f"loading {config.model} ({config.pretrained or 'default weights'})")
        loaded = load_model(config.model, config.pretrained, config.tokenizer)
        if NATIVE in conditional:  # --if-faster: a tower the kernel cannot run is skipped, not refused
            try:
                check_native_tower(loaded.model.visual)
            except ExportError as exc:
                config = _skip_native(config, str(exc), progress)
        if NATIVE in config.precisions:  # refused now, not after the fp32 build and its verification
            check_native_tower(loaded.model.visual)
        adaptation = _adapt(config, loaded, labels, templates, adapter_file, progress)

        if NATIVE in conditional and adaptation.logits_module is not None:
            config = _skip_native(config, "the head is image-conditioned and runs only inside the ONNX graph", progress)
        if NATIVE in config.precisions and adaptation.logits_module is not None:
            raise ExportError(f"{NATIVE} needs a folded head; the {config.method} head is image-conditioned and "
                              "runs only inside the ONNX graph (build fp32 and the other precisions)")
        top_k = min(config.top_k, len(labels))
        spec = loaded.preprocess
        visual = fold_input_normalization(adaptation.visual, spec.mean, spec.std, spec.image_size)
        if config.fuse:
            use_sdpa_attention(visual)
            keep_class_token_only(visual)
        head_rows = _kernel_head_rows(config, adaptation, progress)
        kernel_head = None
        if head_rows is not None:
            Gallery.from_array(head_rows).save(stage / KERNEL_HEAD_DIR)
            kernel_head = KernelHead(stage / KERNEL_HEAD_DIR, adaptation.info.activation, top_k, len(labels))
            adaptation = dataclasses.replace(adaptation, info=dataclasses.replace(adaptation.info, kernel=KERNEL_HEAD_DIR))
            graph = EmbeddingGraph(visual)
        else:
            graph = ClassifierGraph(visual, adaptation.head, top_k, adaptation.logits_module,
                                    adaptation.info.activation)

        pixels = verification_pixels(spec, config.verify)
        reference = eager_reference(adaptation.encoder, adaptation.reference, spec, pixels)
        text = None
        if config.text:
            _say(progress, "exporting and verifying the text tower and its tokenizer")
            prompts = [t.format(label) for label in labels[:64] for t in (templates or ("{}",))[:4]]
            text = export_text(loaded, stage, prompts, config.opset)
        # The eager model has done its work (head, reference, text tower): it goes before the export
        # and ONNX Runtime, which hold copies of the weights of their own (peak memory, issue 24).
        loaded = dataclasses.replace(loaded, model=None, tokenizer=None)
        adaptation = dataclasses.replace(adaptation, encoder=None, visual=None)
        gc.collect()

        _say(progress, "exporting ONNX (fp32, dynamic batch)")
        onnx_path, portable_path = stage / ONNX_FILE, stage / PORTABLE_FILE
        export_onnx(graph, portable_path if config.fuse else onnx_path, spec.image_size, config.opset)
        if NATIVE not in config.precisions:  # the folded tower is needed by fp32-native only
            del graph, visual
            gc.collect()
        if config.fuse:
            _say(progress, "fusing attention, LayerNorm and GELU for ONNX Runtime")
            fuse_for_onnxruntime(portable_path, onnx_path)

        _say(progress, "verifying against the eager model and the unfolded head")
        inputs, outputs = io_specs(spec.image_size, top_k, loaded.info.embed_dim, embedding_only=kernel_head is not None)
        parity = verify_onnx(onnx_path, inputs, outputs, reference, config.verify, head=kernel_head)
        fused = {op: n for op, n in sorted(op_counts(onnx_path).items()) if op in FUSED_OPS}

        variant = Variant(name="fp32", file=ONNX_FILE, format="onnx", precision="fp32",
                          inputs=inputs, outputs=outputs, parity=parity, top_k=top_k, fused_ops=fused)
        native = []
        if NATIVE in config.precisions:
            _say(progress, f"building {NATIVE}: {PRECISIONS[NATIVE][0]}")
            native = [build_native_variant(visual, adaptation.head if adaptation.logits_module is None else None, stage,
                                           inputs, outputs, top_k, kernel_head, reference, config.verify,
                                           config.opset)]
            parity_min = native[0].parity.embedding_cosine_min
            _say(progress, f"  {NATIVE}: parity vs open_clip eager: cosine min {parity_min:.7f}")
            del graph, visual
            gc.collect()
        sources = Sources(onnx_path, portable_path if config.fuse else onnx_path, inputs, outputs, top_k, kernel_head)
        extra = build_variants([p for p in config.precisions if p != NATIVE], stage, sources, spec, labels, reference,
                               config.verify, _calibration_default(config, adapter_file), config.gate, progress)
        if config.fuse:
            portable_path.unlink()
        if text is not None:
            text = build_text_variants(stage, text, config.text_precisions, labels, config.quant, config.gate, progress)
        built = keep_if_faster(conditional, variant, (*native, *extra), stage, pixels,
                               lambda message: _say(progress, message))
        manifest = Manifest(
            model=loaded.info,
            labels=labels,
            head=adaptation.info,
            preprocess=spec,
            variants=(variant, *built),
            default_variant="fp32",
            files=bundle.checksum_tree(stage),
            producer=producer_versions(),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            text=text,
        )
        path = bundle.commit(stage, manifest, config.out)
    return CompileResult(path=path, manifest=manifest, seconds=time.perf_counter() - start)


def _skip_native(config: CompileConfig, why: str, progress) -> CompileConfig:
    _say(progress, f"skipping {NATIVE} (--if-faster): {why}")
    return dataclasses.replace(config, precisions=tuple(p for p in config.precisions if p != NATIVE))


def _kernel_head_rows(config: CompileConfig, adaptation: _Adaptation, progress) -> np.ndarray | None:
    """The head as kernel rows ``[w_c, b_c, 0...]`` (C, D + 1 rounded up to 16) when it should leave the graph: a purely
    linear head (no cache, no feature transform) with at least ``config.kernel_head_classes``
    classes. Other large heads stay in the graph, and the progress line says why."""
    classes = len(adaptation.labels)
    if config.kernel_head_classes is None or classes < config.kernel_head_classes:
        return None
    folded = adaptation.head.fold() if adaptation.head is not None else None
    if folded is None or folded.caches or folded.transform is not None:
        _say(progress, f"{classes} classes, but the {adaptation.info.method} head is not a plain linear map "
                       "(cache, feature transform or image-conditioned): it stays in the graph")
        return None
    _say(progress, f"{classes} classes >= {config.kernel_head_classes}: the head leaves the graph and is scored "
                   "by the top-k kernel at run time")
    weight, bias = folded.weight.detach().float(), folded.bias.detach().float()
    classes, dim = weight.shape[1], weight.shape[0]
    rows = torch.zeros(classes, row_width(dim))  # weights, bias, zeros: rows start on cache lines
    rows[:, :dim], rows[:, dim] = weight.T, bias
    return rows.numpy()


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
