"""Stage 2: the head, and the one place that chooses it. ``clipfold compile`` and ``clipfold head add`` both
ask here for a head: a clipfold adapter file (``adapter`` without ``method``), an official checkpoint
imported by ``method``, or a zero-shot head over ``labels`` x ``templates``.

:func:`plan_head` does the cheap checks (the adapter file read, the method's name, the labels against
the adapter's, the templates) before any model loads; :func:`resolve_head` then builds the head and its
:class:`~clipfold.runtime.bundle.schema.HeadInfo`. An adapter file needs no model: its head is already fitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Protocol

import torch

from clipfold.compile.adapters import registry
from clipfold.compile.adapters.base import ImportRequest
from clipfold.compile.adapters.store import Adapter, load_adapter
from clipfold.compile.heads.ir import Head
from clipfold.compile.heads.zero_shot import build_zero_shot_head
from clipfold.errors import ConfigError, LabelError
from clipfold.runtime.bundle.files import sha256_file
from clipfold.runtime.bundle.schema import HeadInfo


class HeadSpec(Protocol):
    """What a head is asked for with: the fields ``CompileConfig`` and ``HeadAddConfig`` share."""

    adapter: Path | None
    method: str | None
    method_options: Mapping[str, str]
    labels: tuple[str, ...] | None
    templates: str | tuple[str, ...] | None


@dataclass(frozen=True)
class HeadPlan:
    """A head request checked before any model loads."""

    adapter: Path | None  # the adapter file or the checkpoint to import
    method: str | None
    options: dict[str, str]
    adapter_file: Adapter | None  # read when ``adapter`` is a clipfold adapter file
    labels: tuple[str, ...] | None  # None: an imported checkpoint's own class names
    templates: tuple[str, ...]  # () for an adapter file

    @property
    def needs_model(self) -> bool:
        """False for an adapter file: its head is built, only its backbone's checksum is compared."""
        return self.adapter_file is None


@dataclass(frozen=True)
class Adaptation:
    """What the head stage hands to export and verification."""

    labels: tuple[str, ...]
    head: Head | None  # folded into the graph
    logits_module: torch.nn.Module | None  # or an image-conditioned head (CoCoOp)
    reference: object  # unfolded formula: anything with ``scores(unit features)``
    encoder: object  # anything with ``encode_image(normalized pixels)``: the eager image tower
    visual: torch.nn.Module | None  # the image tower to export (input normalization not yet folded)
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


def _say(progress: Callable[[str], None] | None, message: str) -> None:
    if progress is not None:
        progress(message)


def plan_head(spec: HeadSpec, model: str) -> HeadPlan:
    """Cheap checks first: a bad adapter, method, label set or template spec fails before the model loads."""
    adapter_file = None
    if spec.adapter is not None and spec.method is None:
        adapter_file = load_adapter(spec.adapter)
    if spec.method is not None:
        registry.importer(spec.method)
    labels = spec.labels if spec.labels is not None or adapter_file is None else adapter_file.labels
    if adapter_file is not None and adapter_file.labels != labels:
        shown = ", ".join(adapter_file.labels[:5]) + (", ..." if len(adapter_file.labels) > 5 else "")
        raise LabelError(f"the labels differ from the adapter's {len(adapter_file.labels)} labels ({shown}); "
                         "omit --labels to use the adapter's")
    templates = () if adapter_file is not None else registry.import_templates(spec.method, spec.templates, model)
    return HeadPlan(spec.adapter, spec.method, dict(spec.method_options), adapter_file, labels, tuple(templates))


def adapter_record(path: Path, hyperparameters: Mapping, **extra) -> dict:
    """The manifest's ``adapter`` entry. The support folder's local path (the default calibration set) stays
    out of the bundle."""
    public = {k: v for k, v in hyperparameters.items() if k != "support"}
    return {"file": Path(path).name, "sha256": sha256_file(path), "hyperparameters": public, **extra}


def resolve_head(plan: HeadPlan, loaded, backbone: tuple[str, str | None], logit_scale: float,
                 progress: Callable[[str], None] | None = None, *, shares_backbone: bool = False) -> Adaptation:
    """The head ``plan`` asks for, over ``loaded`` (a ``LoadedModel``; None for an adapter file).

    ``backbone`` is (model name, checkpoint sha256) an adapter file must have been fitted on;
    ``logit_scale`` is recorded for fitted and imported heads. With ``shares_backbone`` (a head added
    to a bundle) an import that changes an encoder is refused."""
    if plan.adapter_file is not None:
        return _adapter_head(plan, backbone, logit_scale, loaded, progress)
    if plan.method is not None:
        return _imported_head(plan, loaded, logit_scale, progress, shares_backbone)
    _say(progress, f"building the head: {len(plan.labels)} labels x {len(plan.templates)} templates")
    model = loaded.model
    zero_shot = build_zero_shot_head(model, loaded.tokenizer, plan.labels, plan.templates, progress=progress)
    info = HeadInfo(activation=zero_shot.activation, logit_scale=zero_shot.logit_scale,
                    logit_bias=zero_shot.logit_bias, templates=plan.templates)
    return Adaptation(plan.labels, zero_shot.to_head(), None, zero_shot, model, model.visual, info)


def _adapter_head(plan: HeadPlan, backbone, logit_scale: float, loaded, progress) -> Adaptation:
    adapter = plan.adapter_file
    adapter.check_backbone(*backbone)
    _say(progress, f"using the {adapter.head.method} adapter {plan.adapter}")
    head = adapter.head  # Head.logits is its unfolded formula
    info = HeadInfo(activation=head.activation, logit_scale=logit_scale, logit_bias=None, templates=(),
                    method=head.method, adapter=adapter_record(plan.adapter, adapter.hyperparameters))
    model = loaded.model if loaded is not None else None
    return Adaptation(adapter.labels, head, None, head, model, model.visual if model is not None else None, info)


def _imported_head(plan: HeadPlan, loaded, logit_scale: float, progress, shares_backbone: bool) -> Adaptation:
    _say(progress, f"importing the {plan.method} checkpoint {plan.adapter}")
    request = ImportRequest(Path(plan.adapter), loaded, plan.labels, plan.templates, dict(plan.options))
    imported = registry.importer(plan.method)(request)
    if plan.labels is not None and imported.labels != plan.labels:
        raise LabelError(f"the {plan.method} checkpoint scores {len(imported.labels)} classes, "
                         f"{len(plan.labels)} labels were given")
    if shares_backbone and (imported.head is None or imported.visual is not None):
        raise ConfigError(f"{plan.method} changes the encoder; compile a new bundle instead")
    model = loaded.model
    visual = imported.visual if imported.visual is not None else model.visual
    encoder = _Tower(imported.visual) if imported.visual is not None else model
    reference = imported.head if imported.head is not None else _ModuleScores(imported.logits_module,
                                                                             imported.activation)
    record = adapter_record(imported.source or plan.adapter, imported.hyperparameters, imported=True,
                            options=dict(plan.options))
    info = HeadInfo(activation=imported.activation, logit_scale=logit_scale, logit_bias=None,
                    templates=plan.templates, method=plan.method, slow=imported.slow, adapter=record)
    return Adaptation(imported.labels, imported.head, imported.logits_module, reference, encoder, visual, info)
