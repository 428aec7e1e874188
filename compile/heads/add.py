"""``add_head``: put another head (a label set, a fitted adapter, an imported head-only checkpoint)
into an existing bundle without re-exporting its image tower.

The new head is a small graph from the bundle's ``embedding`` output to top-k scores and indices
(:class:`~clipfold.compile.stages.export.HeadGraph`). It is verified before the manifest names it: the
bundle's own engine embeds the verification images, and the head graph's outputs on those
embeddings must equal the head's unfolded formula (scores within ``max_score_diff``, top-k equal up
to ties). The update is ordered so that no crash leaves a manifest naming a missing or partial
file: the graph is written under a fresh content-addressed name, then the manifest is replaced
atomically under the bundle's lock (:func:`~clipfold.runtime.bundle.write.update_manifest`: two head
adds at once keep both heads), then a replaced head's old file is removed.

Methods that change an encoder (CLIP-LoRA, MaPLe, CoCoOp) cannot share a backbone: they are
refused with a pointer to ``clipfold compile``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from clipfold.compile.config import VerifyConfig, normalize_labels
from clipfold.compile.heads.ir import Head
from clipfold.compile.stages.adapt import plan_head, resolve_head
from clipfold.compile.stages.export import HeadGraph, export_head_onnx, head_io_specs
from clipfold.compile.stages.load import load_model
from clipfold.compile.stages.verify import Reference, compare, verification_pixels
from clipfold.errors import BundleError, CheckpointError, ConfigError, VerificationError
from clipfold.runtime.backends.onnxruntime import OnnxRuntimeBackend
from clipfold.runtime.bundle.agreement import HeadParity
from clipfold.runtime.bundle.files import sha256_file
from clipfold.runtime.bundle.layout import HEADS_DIR, extra_head_file
from clipfold.runtime.bundle.schema import DEFAULT_HEAD, ExtraHead, HeadInfo, Manifest
from clipfold.runtime.bundle.write import update_manifest
from clipfold.runtime.engine import Engine

ENCODER_METHODS = ("clip-lora", "maple", "cocoop")  # they change an encoder: a new bundle, not a head
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class HeadAddConfig:
    bundle: Path
    name: str
    adapter: Path | None = None  # a clipfold adapter file, or with ``method`` an official checkpoint
    labels: tuple[str, ...] | None = None  # a zero-shot label set (or the class names of an import)
    templates: str | tuple[str, ...] | None = None
    method: str | None = None
    method_options: dict[str, str] = field(default_factory=dict)
    top_k: int = 10
    replace: bool = False  # replace an extra head of the same name
    opset: int = 18
    verify: VerifyConfig = field(default_factory=VerifyConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bundle", Path(self.bundle))
        if not NAME.match(self.name) or self.name == DEFAULT_HEAD:
            raise ConfigError(f"head name {self.name!r} must be 1-64 letters, digits, '.', '_' or '-' and not "
                              f"{DEFAULT_HEAD!r}")
        if self.adapter is None and self.labels is None:
            raise ConfigError("a head needs --adapter (a fitted adapter or, with --method, a checkpoint) or --labels")
        if self.method is not None and self.adapter is None:
            raise ConfigError(f"--method {self.method} imports a checkpoint: pass it with --adapter")
        if self.method in ENCODER_METHODS:
            raise ConfigError(f"{self.method} changes the image or text encoder, so it cannot share this bundle's "
                              "backbone; compile a new bundle with `clipfold compile --method "
                              f"{self.method} --adapter ...`")
        if self.labels is not None:
            object.__setattr__(self, "labels", normalize_labels(self.labels))
        if self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")


def _say(progress, message: str) -> None:
    if progress is not None:
        progress(message)


def _build(config: HeadAddConfig, manifest: Manifest, progress) -> tuple[Head, tuple[str, ...], HeadInfo]:
    """The head ``config`` asks for (:mod:`~clipfold.compile.stages.adapt`, as ``clipfold compile`` builds it),
    over the bundle's own backbone: its model is loaded only for a zero-shot or imported head."""
    model_info = manifest.model
    plan = plan_head(config, model_info.name)
    loaded = None
    if plan.needs_model:
        _say(progress, f"loading {model_info.name} for its text tower")
        loaded = load_model(model_info.name, model_info.pretrained)
        if loaded.info.checkpoint_sha256 != model_info.checkpoint_sha256:
            raise CheckpointError(f"the weights of {model_info.name} found now ({model_info.pretrained}) differ "
                                  "from those the bundle was compiled with (checksum mismatch); recompile the bundle")
    adaptation = resolve_head(plan, loaded, (model_info.name, model_info.checkpoint_sha256),
                              manifest.head.logit_scale, progress, shares_backbone=True)
    return adaptation.head, adaptation.labels, adaptation.info


def _verify(path: Path, graph_specs, head: Head, embeddings, cfg: VerifyConfig, name: str) -> HeadParity:
    inputs, outputs = graph_specs
    out = OnnxRuntimeBackend(path, inputs, outputs).run({"embedding": embeddings})
    with torch.no_grad():
        scores = head.scores(torch.from_numpy(embeddings)).numpy()
    reference = Reference(pixels=embeddings, embeddings=embeddings, scores=scores)
    parity, failures = compare(reference, out["scores"], out["indices"], embeddings, cfg)
    if failures:
        raise VerificationError(f"head {name!r} does not match its unfolded formula on {parity.images} "
                                "embeddings:\n  - " + "\n  - ".join(failures), failures)
    return HeadParity(parity.images, parity.topk_agreement, parity.top1_agreement, parity.max_abs_score_diff)


def add_head(config: HeadAddConfig, progress: Callable[[str], None] | None = None) -> Manifest:
    """Add (or with ``replace``, replace) the extra head ``config.name``; returns the new manifest."""
    engine = Engine.open(config.bundle)  # checks the manifest version and every checksum
    manifest = engine.manifest
    existing = [h for h in manifest.heads if h.name == config.name]
    if existing and not config.replace:
        raise BundleError(f"bundle {config.bundle} already has a head {config.name!r}; pass --overwrite (HeadAddConfig replace=True) to replace it")
    head, labels, info = _build(config, manifest, progress)
    if head.embed_dim != manifest.model.embed_dim:
        raise ConfigError(f"the head reads {head.embed_dim}-dim embeddings, the bundle produces "
                          f"{manifest.model.embed_dim}-dim ones")
    top_k = min(config.top_k, len(labels))
    specs = head_io_specs(manifest.model.embed_dim, top_k)
    heads_dir = config.bundle / HEADS_DIR
    heads_dir.mkdir(exist_ok=True)
    tmp = heads_dir / f".{config.name}.tmp-{os.getpid()}.onnx"
    try:
        _say(progress, f"exporting head {config.name!r} ({head.method}, {len(labels)} labels)")
        export_head_onnx(HeadGraph(head, top_k), tmp, manifest.model.embed_dim, config.opset)
        _say(progress, "verifying on the bundle's own embeddings")
        embeddings = engine.run_pixels(verification_pixels(manifest.preprocess, config.verify))["embedding"]
        parity = _verify(tmp, specs, head, embeddings, config.verify, config.name)
        digest = sha256_file(tmp)
        rel = extra_head_file(config.name, digest)
        os.replace(tmp, config.bundle / rel)
    finally:
        tmp.unlink(missing_ok=True)
    extra = ExtraHead(name=config.name, file=rel, labels=labels, head=info, inputs=specs[0], outputs=specs[1],
                      top_k=top_k, parity=parity)
    replaced: list[ExtraHead] = []

    def change(current: Manifest) -> Manifest:
        # The manifest as committed now (another head add may have finished meanwhile), not as read above.
        if current.model != manifest.model or not (config.bundle / rel).is_file():
            raise BundleError(f"bundle {config.bundle} was replaced by another compile while head {config.name!r} "
                              "was built; add the head again")
        before = [h for h in current.heads if h.name == config.name]
        if before and not config.replace:
            raise BundleError(f"bundle {config.bundle} already has a head {config.name!r}; pass --overwrite (HeadAddConfig replace=True) to replace it")
        replaced.extend(before)
        files = {k: v for k, v in current.files.items() if not any(k == h.file for h in before)}
        files[rel] = digest
        return replace(current, heads=tuple(h for h in current.heads if h.name != config.name) + (extra,), files=files)

    try:
        updated = update_manifest(config.bundle, change)  # the commit point, under the bundle's lock
    except BaseException:
        if rel not in Manifest.read(config.bundle).files:  # our graph, named by no committed manifest
            (config.bundle / rel).unlink(missing_ok=True)
        raise
    for old in replaced:
        if old.file != rel:
            (config.bundle / old.file).unlink(missing_ok=True)
    return updated
