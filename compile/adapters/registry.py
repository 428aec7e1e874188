"""Which methods ``clipfold fit`` and ``clipfold compile --method`` know, and where each lives.

Entries name ``module:function`` and are imported on first use, so listing the methods (or
failing on an unknown one) imports no method code. A fitter module may also define ``refit_<name>``:
``fit`` then chooses hyperparameters on a held-out part of the shots and refits on all of them.
"""

from __future__ import annotations

import importlib
from typing import Callable

from clipfold.errors import ConfigError

FITTERS: dict[str, str] = {
    "gda": "gda:fit_gda",
    "tip-adapter": "tip:fit_tip",
    "tip-adapter-f": "tip_f:fit_tip_f",
    "ape": "ape:fit_ape",
    "proker": "proker:fit_proker",
    "lp++": "lpp:fit_lpp",
    "taskres": "taskres:fit_taskres",
    "clip-adapter": "clip_adapter:fit_clip_adapter",
}

# Every fitter: after a choice on held-out shots, the head is rebuilt on all of them with the chosen values.
REFITTERS: dict[str, str] = {
    "gda": "gda:refit_gda",
    "tip-adapter": "tip:refit_tip",
    "tip-adapter-f": "tip_f:refit_tip_f",
    "ape": "ape:refit_ape",
    "proker": "proker:refit_proker",
    "lp++": "lpp:refit_lpp",
    "taskres": "taskres:refit_taskres",
    "clip-adapter": "clip_adapter:refit_clip_adapter",
}

IMPORTERS: dict[str, str] = {
    "coop": "coop:import_coop",
    "cocoop": "cocoop:import_cocoop",
    "maple": "maple:import_maple",
    "clip-lora": "lora:import_lora",
    "taskres": "taskres:import_taskres",
    "tip-adapter-f": "tip_f:import_tip_f",
    "clip-adapter": "clip_adapter:import_clip_adapter",
}


# The template set each importer's official evaluation scores with, used when --templates is not given:
# CLIP-LoRA's evaluate_lora (lora.py) encodes dataset.template[0], CLIP-Adapter's TextEncoder
# (clip_adapter.py) CUSTOM_TEMPLATES[dataset]; both are "a photo of a {}." for Caltech101, SUN397,
# StanfordCars (and CLIP-Adapter's ImageNet). Other datasets: pass their template with --templates.
IMPORT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "clip-lora": ("a photo of a {}.",),
    "clip-adapter": ("a photo of a {}.",),
}


def import_templates(method: str | None, spec, model_name: str) -> tuple[str, ...]:
    """``--templates`` when given; else the imported method's official template set, else the model's default."""
    from clipfold.compile.heads.zero_shot import resolve_templates

    if spec is None and method in IMPORT_TEMPLATES:
        return IMPORT_TEMPLATES[method]
    return resolve_templates(spec, model_name)


def _resolve(table: dict[str, str], name: str, what: str) -> Callable:
    if name not in table:
        raise ConfigError(f"unknown method {name!r} for {what}; expected one of {', '.join(sorted(table))}")
    module, function = table[name].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), function)


def fitter(name: str) -> Callable:
    return _resolve(FITTERS, name, "fitting")


def fit_options(name: str) -> tuple[str, ...]:
    """The ``--set`` keys a fitter reads (its module's ``FIT_OPTIONS``)."""
    module = FITTERS[name].split(":")[0] if name in FITTERS else None
    if module is None:
        raise ConfigError(f"unknown method {name!r} for fitting; expected one of {', '.join(sorted(FITTERS))}")
    return tuple(getattr(importlib.import_module(f"{__package__}.{module}"), "FIT_OPTIONS", ()))


def refitter(name: str) -> Callable | None:
    return _resolve(REFITTERS, name, "refitting") if name in REFITTERS else None


def importer(name: str) -> Callable:
    return _resolve(IMPORTERS, name, "importing a checkpoint")
