"""``fit_adapter``: support folder -> image features -> a fitted method -> an adapter file.

The support folder holds one sub-folder per class (the folder name is the label, classes in
sorted order) with the shots as image files. Hyperparameters are chosen on ``val`` (a folder of the
same layout) or, without one, on the last quarter of each class's shots (at least one), never on
test data; with a single shot per class and no ``val`` the method's defaults are used, and the
adapter records which it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from clipfold.errors import CheckpointError, ConfigError
from clipfold.runtime.folders import read_folder
from clipfold.runtime.images import load_image
from clipfold.runtime.preprocess import preprocess

from ..config import DEFAULT_MODEL
from ..head import build_zero_shot_head, resolve_templates
from ..load import LoadedModel, load_model
from ..verify import encode_pixels
from . import gda, tip
from .store import Adapter, Backbone, save_adapter

METHODS = ("gda", "tip-adapter")


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

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; fit supports {', '.join(METHODS)}")
        if self.shots is not None and self.shots < 1:
            raise ConfigError(f"shots must be >= 1, got {self.shots}")
        for name in ("support", "out") + (("val",) if self.val is not None else ()):
            object.__setattr__(self, name, Path(getattr(self, name)))


@torch.no_grad()
def encode_images(loaded: LoadedModel, paths: list[Path], batch: int = 64) -> torch.Tensor:
    """Unit image features, preprocessed exactly as the runtime does (an unreadable file is named)."""
    chunks = []
    for start in range(0, len(paths), batch):
        images = [load_image(p) for p in paths[start:start + batch]]
        chunks.append(encode_pixels(loaded.model, loaded.preprocess, preprocess(images, loaded.preprocess)))
    return torch.cat(chunks)


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
    labels, paths, targets = read_folder(config.support, config.shots)
    loaded = load_model(config.model, config.pretrained)
    if loaded.info.checkpoint_sha256 is None:
        raise CheckpointError(f"{config.model} has random weights here; adapters need fixed weights "
                              "(pass --pretrained with a tag or a checkpoint file)")
    templates = resolve_templates(config.templates, config.model)
    zero_shot = build_zero_shot_head(loaded.model, loaded.tokenizer, labels, templates).to_head()
    say(f"encoding {len(paths)} support images of {len(labels)} classes")
    features, y = encode_images(loaded, paths), torch.tensor(targets)
    if not torch.isfinite(features).all():
        raise ConfigError("the model produced NaN or inf features for the support images")
    if config.val is not None:
        _, val_paths, val_targets = read_folder(config.val, labels=labels)
        val_f, val_y = encode_images(loaded, val_paths), torch.tensor(val_targets)
        fit_f, fit_y, source = features, y, "val folder"
    else:
        fit_idx, held_idx = _split(y)
        fit_f, fit_y = features[fit_idx], y[fit_idx]
        val_f, val_y = features[held_idx], y[held_idx]
        source = "held-out support" if len(held_idx) else "defaults (1 shot per class, no validation data)"
    say(f"fitting {config.method}; hyperparameters from {source}")
    hyper: dict = {"shots_per_class": int(torch.bincount(y).min()), "selected_on": source, "templates": list(templates)}
    if config.method == "gda":
        alpha = 1.0
        if len(val_f):
            alpha, grid = gda.select_alpha(zero_shot, gda.fit_gaussian(fit_f, fit_y, len(labels)), val_f, val_y)
            hyper["val_accuracy"] = grid[alpha]
        # The head uses every shot, with alpha chosen on data it was not fitted to.
        head = gda.gda_head(zero_shot, gda.fit_gaussian(features, y, len(labels)), alpha)
        hyper.update(alpha=alpha, alpha_grid=list(gda.ALPHA_GRID))
    else:
        beta, alpha = 1.0, 1.0
        if len(val_f):
            beta, alpha, acc = tip.search_hp(zero_shot, fit_f, fit_y, val_f, val_y)
            hyper["val_accuracy"] = acc
        head = tip.tip_adapter_head(zero_shot, features, y, alpha=alpha, beta=beta)
        hyper.update(alpha=alpha, beta=beta, search_scale=list(tip.SEARCH_SCALE), search_step=list(tip.SEARCH_STEP))
    adapter = Adapter(head, labels, Backbone(config.model, loaded.info.checkpoint_sha256), hyper)
    save_adapter(adapter, config.out)
    return adapter
