"""``compile_bundle``: load → head → fold → export → verify → write. It only chains the stages."""

from __future__ import annotations

import datetime as _dt
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from clipfold.errors import LabelError
from clipfold.runtime.manifest import HeadInfo, Manifest, Variant, sha256_file

from . import bundle
from .adapters.store import load_adapter
from .config import CompileConfig, VerifyConfig
from .fold import fold_input_normalization
from .graph import ClassifierGraph, export_onnx, io_specs
from .head import build_zero_shot_head, resolve_templates
from .load import load_model
from .verify import eager_reference, verification_pixels, verify_onnx

__all__ = ["CompileConfig", "VerifyConfig", "CompileResult", "compile_bundle"]

ONNX_FILE = "model.onnx"


@dataclass(frozen=True)
class CompileResult:
    path: Path
    manifest: Manifest
    seconds: float


def _say(progress: Callable[[str], None] | None, message: str) -> None:
    if progress is not None:
        progress(message)


def compile_bundle(config: CompileConfig, progress: Callable[[str], None] | None = None) -> CompileResult:
    """Compile ``config.model`` with a zero-shot head over ``config.labels`` into a bundle."""
    start = time.perf_counter()
    # Cheap checks first: a bad template spec or existing target fails before the model loads.
    adapter = load_adapter(config.adapter) if config.adapter is not None else None
    if adapter is not None and adapter.labels != config.labels:
        raise LabelError(f"the labels differ from the adapter's {len(adapter.labels)} labels "
                         f"({', '.join(adapter.labels[:5])}{', ...' if len(adapter.labels) > 5 else ''}); "
                         "omit --labels to use the adapter's")
    templates = () if adapter is not None else resolve_templates(config.templates, config.model)
    with bundle.staging_dir(config.out, config.overwrite) as stage:
        _say(progress, f"loading {config.model} ({config.pretrained or 'default weights'})")
        loaded = load_model(config.model, config.pretrained)

        if adapter is not None:
            adapter.check_backbone(config.model, loaded.info.checkpoint_sha256)
            _say(progress, f"using the {adapter.head.method} adapter {config.adapter}")
            head, reference_head = adapter.head, adapter.head  # Head.logits is its unfolded formula
            head_info = HeadInfo(activation=head.activation, logit_scale=loaded.model.logit_scale.detach().exp().item(),
                                 logit_bias=None, templates=(), method=head.method,
                                 adapter={"file": Path(config.adapter).name, "sha256": sha256_file(config.adapter),
                                          "hyperparameters": adapter.hyperparameters})
        else:
            _say(progress, f"building the head: {len(config.labels)} labels x {len(templates)} templates")
            reference_head = build_zero_shot_head(loaded.model, loaded.tokenizer, config.labels, templates)
            head = reference_head.to_head()
            head_info = HeadInfo(activation=head.activation, logit_scale=reference_head.logit_scale,
                                 logit_bias=reference_head.logit_bias, templates=templates)

        top_k = min(config.top_k, len(config.labels))
        spec = loaded.preprocess
        visual = fold_input_normalization(loaded.model.visual, spec.mean, spec.std)
        graph = ClassifierGraph(visual, head, top_k)

        _say(progress, "exporting ONNX (fp32, dynamic batch)")
        onnx_path = stage / ONNX_FILE
        export_onnx(graph, onnx_path, spec.image_size, config.opset)

        _say(progress, "verifying against open_clip eager")
        inputs, outputs = io_specs(spec.image_size, top_k, loaded.info.embed_dim)
        pixels = verification_pixels(spec, config.verify)
        reference = eager_reference(loaded.model, reference_head, spec, pixels)
        parity = verify_onnx(onnx_path, inputs, outputs, reference, config.verify)

        variant = Variant(name="fp32", file=ONNX_FILE, format="onnx", precision="fp32",
                          inputs=inputs, outputs=outputs, parity=parity, top_k=top_k)
        manifest = Manifest(
            model=loaded.info,
            labels=config.labels,
            head=head_info,
            preprocess=spec,
            variants=(variant,),
            default_variant="fp32",
            files=bundle.checksum_tree(stage),
            producer=producer_versions(),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        path = bundle.commit(stage, manifest, config.out)
    return CompileResult(path=path, manifest=manifest, seconds=time.perf_counter() - start)


def producer_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("clipfold", "torch", "open_clip_torch", "onnx", "onnxscript", "onnxruntime", "timm"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions
