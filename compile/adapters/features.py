"""Image features for fitting: the plain view plus augmented views, cached on disk.

Views follow the official Tip-Adapter / APE cache construction: view 0 is the eval transform
(exactly what the runtime feeds the engine); views 1..E-1 are ``RandomResizedCrop(size,
scale=(0.5, 1), bicubic)`` + ``RandomHorizontalFlip`` of the decoded image, each drawn from a
generator seeded by the image's content hash, the view index and the seed, so a view does not
depend on which other files are encoded with it.

The official recipes use ``augment_epoch`` = 10 augmented passes and no plain view for their
caches and statistics (``Support.augmented``), so the default is 11 views: the plain one (for the
validation features and LP++'s fallback) and 10 augmented. The crop scale and the flip are options.

The cache is one safetensors file per (model, checkpoint, augmentation) under ``cache_dir``,
mapping an image's sha256 to its (E, D) *raw* features (Tip-Adapter's and APE's keys average raw
features before normalizing); :meth:`FeatureCache.encode` returns them as unit rows and norms. A second fit on the same
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
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clipfold.errors import ConfigError
from clipfold.runtime.images import load_image
from clipfold.runtime.preprocess import preprocess

AUG_SCALE = (0.5, 1.0)  # RandomResizedCrop scale in the official cache builders
OFFICIAL_VIEWS = 11  # the plain view + augment_epoch (10) augmented passes


@dataclass(frozen=True)
class ViewConfig:
    views: int = OFFICIAL_VIEWS  # 1: the plain view only (then methods use it in place of augmented views)
    seed: int = 1
    crop_scale: tuple[float, float] = AUG_SCALE  # RandomResizedCrop(scale=...)
    flip: bool = True  # RandomHorizontalFlip(0.5)

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ConfigError(f"views must be >= 1 (1 = no augmentation), got {self.views}")
        lo, hi = (float(v) for v in self.crop_scale)
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"crop_scale must be 0 < min <= max <= 1, got {tuple(self.crop_scale)}")
        object.__setattr__(self, "crop_scale", (lo, hi))

    @property
    def key(self) -> str:
        flip = "-flip" if self.flip else ""
        return f"raw-views{self.views}-seed{self.seed}-rrc{self.crop_scale[0]}-{self.crop_scale[1]}{flip}"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clipfold" / "features"


def _augmented(image, spec, view: int, digest: str, views: ViewConfig) -> np.ndarray:
    from torchvision.transforms import InterpolationMode, RandomHorizontalFlip, RandomResizedCrop

    torch.manual_seed(int(digest[:15], 16) ^ (views.seed * 1_000_003 + view))
    crop = RandomResizedCrop(spec.image_size, scale=views.crop_scale, interpolation=InterpolationMode.BICUBIC)
    out = crop(image.convert("RGB"))
    out = RandomHorizontalFlip(0.5)(out) if views.flip else out
    return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)


def _encode_raw(model, spec, pixels: np.ndarray) -> torch.Tensor:
    """open_clip eager on uint8 NCHW pixels (ToTensor's /255, Normalize), before normalization."""
    x = torch.from_numpy(pixels).float() / 255.0
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return model.encode_image((x - mean) / std).float()


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

    def encode(self, paths: list[Path], say: Callable[[str], None] = lambda _: None,
               views: int | None = None, batch: int = 64) -> torch.Tensor:
        """(E, N, D) unit features; ``views`` = 1 returns the plain view only."""
        return F.normalize(self.encode_raw(paths, say, views, batch), dim=-1)

    @torch.no_grad()
    def encode_raw(self, paths: list[Path], say: Callable[[str], None] = lambda _: None,
                   views: int | None = None, batch: int = 64) -> torch.Tensor:
        """(E, N, D) raw image features (before normalization)."""
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
                per_view.append(np.stack([_augmented(im, spec, v, digests[i], self.views)
                                          for im, i in zip(images, chunk)]))
            feats = torch.stack([_encode_raw(self.loaded.model, spec, px) for px in per_view], dim=1)
            if not torch.isfinite(feats).all():
                raise ConfigError("the model produced NaN or inf features for the support images")
            for j, i in enumerate(chunk):
                table[digests[i]] = feats[j]
            if len(todo) > batch:
                say(f"  {min(start + batch, len(todo))}/{len(todo)} images")
        if todo:
            self._write(table)
        return torch.stack([table[d][:views] for d in digests], dim=1) if paths else torch.empty(views, 0, 0)

