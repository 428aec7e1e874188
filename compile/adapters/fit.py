"""``fit_adapter``: support folder -> cached image features -> a fitted method -> an adapter file.

The support folder holds one sub-folder per class (the folder name is the label, classes in
sorted order) with the shots as image files. Features come from :class:`FeatureCache` (the plain
view plus ``views - 1`` augmented ones, cached on disk by model and file content). Hyperparameters
are chosen on ``val`` (a folder of the same layout) or, without one, on the last quarter of each
class's shots (at least one), never on test data; with a single shot per class and no ``val`` the
method's defaults are used, and the adapter records which it was. After a choice on held-out
shots every method refits on all the shots with the chosen values (``registry.REFITTERS``).
``options`` are the method's ``--set`` keys (its ``FIT_OPTIONS``: the official per-dataset search
ranges, APE's channel counts); an unknown key is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from clipfold.compile.adapters import registry
from clipfold.compile.adapters.base import Support
from clipfold.compile.adapters.features import FeatureCache, ViewConfig, default_cache_dir
from clipfold.compile.adapters.store import Adapter, Backbone, save_adapter
from clipfold.compile.config import DEFAULT_MODEL
from clipfold.compile.heads.zero_shot import build_zero_shot_head, resolve_templates
from clipfold.compile.stages.load import load_model
from clipfold.errors import CheckpointError, ConfigError
from clipfold.runtime.image_folders import read_folder

METHODS = tuple(registry.FITTERS)


@dataclass(frozen=True)
class FitConfig:
    method: str
    support: Path
    out: Path
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    templates: str | None = None
    shots: int | None = None  # use the first N images of each class (sorted by name)
    val: Path | None = None
    views: ViewConfig = ViewConfig()
    cache_dir: Path | None = field(default_factory=default_cache_dir)  # None: no feature cache
    seed: int = 0
    options: Mapping[str, str] = field(default_factory=dict)  # --set key=value, the method's FIT_OPTIONS

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; fit supports {', '.join(METHODS)}")
        allowed = registry.fit_options(self.method)
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise ConfigError(f"{self.method} has no option {', '.join(unknown)}; it takes "
                              f"{', '.join(allowed) if allowed else 'none'}")
        if self.shots is not None and self.shots < 1:
            raise ConfigError(f"shots must be >= 1, got {self.shots}")
        for name in ("support", "out") + (("val",) if self.val is not None else ()):
            object.__setattr__(self, name, Path(getattr(self, name)))


def _split(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, held out): the last quarter of each class's shots, at least one when it has 2+."""
    fit, held = [], []
    for k in targets.unique():
        idx = torch.nonzero(targets == k).flatten().tolist()
        n_held = max(1, len(idx) // 4) if len(idx) >= 2 else 0
        held += idx[len(idx) - n_held:]
        fit += idx[:len(idx) - n_held]
    return torch.tensor(fit), torch.tensor(held, dtype=torch.long)


def fit_adapter(config: FitConfig, progress: Callable[[str], None] | None = None) -> Adapter:
    say = progress or (lambda _: None)
    fit = registry.fitter(config.method)  # an unknown method fails before anything loads
    labels, paths, targets = read_folder(config.support, config.shots)
    val_paths: list[Path] = []
    if config.val is not None:
        _, val_paths, val_targets = read_folder(config.val, labels=labels)
    loaded = load_model(config.model, config.pretrained)
    if loaded.info.checkpoint_sha256 is None:
        raise CheckpointError(f"{config.model} has random weights here; adapters need fixed weights "
                              "(pass --pretrained with a tag or a checkpoint file)")
    templates = resolve_templates(config.templates, config.model)
    zero_shot = build_zero_shot_head(loaded.model, loaded.tokenizer, labels, templates)
    cache = FeatureCache(loaded, loaded.info.checkpoint_sha256, config.views, config.cache_dir)
    raw, y = cache.encode_raw(paths, say), torch.tensor(targets)
    views, norms = torch.nn.functional.normalize(raw, dim=-1), raw.norm(dim=-1)
    hits = cache.hits
    if val_paths:
        val_f, val_y = cache.encode(val_paths, say, views=1)[0], torch.tensor(val_targets)
        fit_views, fit_norms, fit_y, source = views, norms, y, "val folder"
    else:
        fit_idx, held_idx = _split(y)
        fit_views, fit_norms, fit_y = views[:, fit_idx], norms[:, fit_idx], y[fit_idx]
        val_f, val_y = views[0, held_idx], y[held_idx]
        source = "held-out support" if len(held_idx) else "defaults (1 shot per class, no validation data)"
    options = dict(config.options)
    support = Support(fit_views, fit_y, val_f, val_y, zero_shot.class_embeddings, zero_shot.logit_scale, config.seed,
                      norms=fit_norms, options=options)
    say(f"fitting {config.method} on {support.views.shape[1]} shots x {support.views.shape[0]} views; "
        f"hyperparameters from {source}")
    fitted = fit(support)
    refit = registry.refitter(config.method)
    if refit is not None and fit_views.shape[1] != views.shape[1]:
        say("refitting on every shot with the chosen hyperparameters")
        fitted = refit(Support(views, y, val_f[:0], val_y[:0], zero_shot.class_embeddings, zero_shot.logit_scale,
                               config.seed, norms=norms, options=options), fitted.hyperparameters)
    hyper = {**fitted.hyperparameters, "shots_per_class": int(torch.bincount(y).min()), "selected_on": source,
             "templates": list(templates), "views": config.views.views, "view_seed": config.views.seed,
             "view_crop_scale": list(config.views.crop_scale), "view_flip": config.views.flip,
             "options": options, "refit_on_all_shots": refit is not None and fit_views.shape[1] != views.shape[1],
             "cached_features": hits, "support": str(Path(config.support).resolve())}
    adapter = Adapter(fitted.head, labels, Backbone(config.model, loaded.info.checkpoint_sha256), hyper)
    save_adapter(adapter, config.out)
    return adapter
