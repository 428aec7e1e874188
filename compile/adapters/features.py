"""Image features for fitting: the plain view plus augmented views, cached on disk.

Views follow the official Tip-Adapter / APE cache construction: view 0 is the eval transform
(exactly what the runtime feeds the engine); views 1..E-1 are ``RandomResizedCrop(size,
scale=(0.5, 1), bicubic)`` + ``RandomHorizontalFlip`` of the decoded image, each drawn from a
generator seeded by the image's content hash, the view index and the seed, so a view does not
depend on which other files are encoded with it.

The cache is one safetensors file per (model, checkpoint, augmentation) under ``cache_dir``,
mapping an image's sha256 to its (E, D) unit features. A second fit on the same
images (another method, more shots, another validation split) encodes only the new files; the
file is rewritten atomically.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clipfold.errors import ConfigError
from clipfold.runtime.images import load_image
from clipfold.runtime.preprocess import preprocess

from ..verify import encode_pixels

AUG_SCALE = (0.5, 1.0)  # RandomResizedCrop scale in the official cache builders


@dataclass(frozen=True)
class ViewConfig:
    views: int = 1  # 1: the plain view only; the official caches use 1 + augment_epoch (10)
    seed: int = 1

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ConfigError(f"views must be >= 1 (1 = no augmentation), got {self.views}")

    @property
    def key(self) -> str:
        return f"views{self.views}-seed{self.seed}-rrc{AUG_SCALE[0]}-{AUG_SCALE[1]}-flip"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clipfold" / "features"


def _augmented(image, spec, view: int, digest: str, seed: int) -> np.ndarray:
    from torchvision.transforms import InterpolationMode, RandomHorizontalFlip, RandomResizedCrop

    torch.manual_seed(int(digest[:15], 16) ^ (seed * 1_000_003 + view))
    crop = RandomResizedCrop(spec.image_size, scale=AUG_SCALE, interpolation=InterpolationMode.BICUBIC)
    out = RandomHorizontalFlip(0.5)(crop(image.convert("RGB")))
    return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)


class FeatureCache:
    """Unit features (E, D) of image files for one model, keyed by file content."""

    def __init__(self, loaded, checkpoint_sha256: str, views: ViewConfig, cache_dir: Path | None):
        self.loaded, self.views = loaded, views
        name = f"{loaded.info.name}-{checkpoint_sha256[:16]}-{views.key}.safetensors"
        self.path = None if cache_dir is None else Path(cache_dir) / name
        self.hits = self.misses = 0

    def _read(self) -> dict[str, torch.Tensor]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            return load_file(str(self.path))
        except (SafetensorError, OSError):  # a damaged cache is rebuilt, not trusted
            return {}

    def _write(self, table: dict[str, torch.Tensor]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            save_file({k: v.contiguous() for k, v in table.items()}, str(tmp))
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    @torch.no_grad()
    def encode(self, paths: list[Path], say: Callable[[str], None] = lambda _: None,
               views: int | None = None, batch: int = 64) -> torch.Tensor:
        """(E, N, D) unit features; ``views`` = 1 returns the plain view only."""
        views = self.views.views if views is None else views
        table = self._read()
        digests = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]
        todo = [i for i, d in enumerate(digests) if d not in table]
        self.hits, self.misses = len(paths) - len(todo), len(todo)
        if todo:
            say(f"encoding {len(todo)} images x {self.views.views} views "
                f"({self.hits} cached{'' if self.path else ', cache off'})")
        spec = self.loaded.preprocess
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            images = [load_image(paths[i]) for i in chunk]  # an unreadable file is named here
            per_view = [preprocess(images, spec)]
            for v in range(1, self.views.views):
                per_view.append(np.stack([_augmented(im, spec, v, digests[i], self.views.seed)
                                          for im, i in zip(images, chunk)]))
            feats = torch.stack([encode_pixels(self.loaded.model, spec, px) for px in per_view], dim=1)
            if not torch.isfinite(feats).all():
                raise ConfigError("the model produced NaN or inf features for the support images")
            for j, i in enumerate(chunk):
                table[digests[i]] = feats[j]
            if len(todo) > batch:
                say(f"  {min(start + batch, len(todo))}/{len(todo)} images")
        if todo:
            self._write(table)
        return torch.stack([table[d][:views] for d in digests], dim=1) if paths else torch.empty(views, 0, 0)

