"""The images a reduced-precision variant is calibrated, searched and gated on: three sets that never overlap.

No choice is made on the images that judge a variant (:func:`selection_images`): calibration, search and
gate images never overlap. The sensitivity search ranks nodes and bisects on the *search* images; the
figures recorded and held to the limits (compile/precision/gate.py) come from the *gate* images only.
Where the user gives no folder, the images are generated (:func:`~clipfold.compile.config.generated_images`,
the one place that chooses them) with three disjoint seeds; a labelled ``--gate-data`` folder is split per
class (half of each class's images to the search, at least one image in all), or the search takes its own
``--search-data`` folder; gate and search images that are byte-identical to a calibration (or search) image
are dropped from the gate. The split is recorded in each variant's gate figures.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from clipfold.compile.config import generated_images
from clipfold.compile.precision.config import GateConfig, QuantConfig
from clipfold.errors import ConfigError, ImageError
from clipfold.runtime.bundle.schema import PreprocessSpec
from clipfold.runtime.image_folders import IMAGE_SUFFIXES, read_folder
from clipfold.runtime.images import load_image
from clipfold.runtime.preprocess import preprocess

CALIB_SEED = 777  # generated calibration images; the gate's default seed is different
SEARCH_SEED_OFFSET = 7919  # generated search images: gate seed + this (never the calibration seed)
SEARCH_FRACTION = 0.5  # of each class's --gate-data images, when no --search-data is given: a choice made
# on a handful of images does not carry over (the minimum cosine is a minimum over images)


@dataclass(frozen=True)
class HeldOut:
    pixels: np.ndarray  # (N, 3, H, W) uint8
    targets: np.ndarray | None  # label index per image, with a labelled folder
    source: str


@dataclass(frozen=True)
class Selection:
    """Disjoint image sets: ``search`` for every choice (sensitivity ranking, bisection), ``gate`` for the
    figures that judge the result; ``record`` describes the split for the manifest."""

    search: HeldOut
    gate: HeldOut
    record: dict = field(default_factory=dict)


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _labelled(folder: Path, labels: Sequence[str], what: str) -> tuple[list[Path], np.ndarray]:
    classes, paths, targets = read_folder(folder)
    unknown = [c for c in classes if c not in labels]
    if unknown:
        raise ConfigError(f"{what} data {folder} has classes {unknown[:5]} that are not labels of this model; "
                          f"expected sub-folders named like the labels {list(labels)[:6]}")
    index = {label: i for i, label in enumerate(labels)}
    return list(paths), np.array([index[classes[t]] for t in targets], dtype=np.int64)


def _split_per_class(targets: np.ndarray, fraction: float) -> tuple[list[int], list[int]]:
    """(search, gate) indices: the last ``fraction`` of each class's images to the search (at least one overall)."""
    search, gate = [], []
    for k in np.unique(targets):
        idx = np.flatnonzero(targets == k).tolist()
        n = int(len(idx) * fraction)
        search += idx[len(idx) - n:] if n else []
        gate += idx[:len(idx) - n]
    if not search:  # every class too small for its share: one image of the largest class
        biggest = max(np.unique(targets), key=lambda k: int(np.sum(targets == k)))
        one = int(np.flatnonzero(targets == biggest)[-1])
        search, gate = [one], [i for i in gate if i != one]
    return sorted(search), sorted(gate)


def selection_images(spec: PreprocessSpec, labels: Sequence[str], cfg: GateConfig,
                     calibration: Sequence[Path] = ()) -> Selection:
    """Search and gate images that overlap neither each other nor the ``calibration`` files."""
    if cfg.data is None and cfg.search_data is None:
        gate = held_out_images(spec, labels, cfg)
        n = cfg.images  # generated images are free: as many as the gate, so the choice carries over
        seed = cfg.seed + SEARCH_SEED_OFFSET
        search = HeldOut(preprocess(generated_images(n, seed), spec), None, f"{n} generated images (seed {seed})")
        return Selection(search, gate, {"search": search.source, "gate": f"{gate.source} (seed {cfg.seed})",
                                        "disjoint": "separate seeds"})
    taken = {_digest(p) for p in calibration}
    record: dict = {}
    if cfg.search_data is not None:
        search_paths, search_targets = _labelled(cfg.search_data, labels, "search")
        search_keep = [i for i, p in enumerate(search_paths) if _digest(p) not in taken]
        search_paths, search_targets = [search_paths[i] for i in search_keep], search_targets[search_keep]
        search = HeldOut(_load(search_paths, spec, "search"), search_targets,
                         f"{len(search_paths)} labelled images from {cfg.search_data.name}/")
        taken |= {_digest(p) for p in search_paths}
    if cfg.data is None:  # a search folder but generated gate images
        gate = held_out_images(spec, labels, cfg)
    else:
        paths, targets = _labelled(cfg.data, labels, "gate")
        keep = [i for i, p in enumerate(paths) if _digest(p) not in taken]
        record["dropped_overlap"] = len(paths) - len(keep)
        paths, targets = [paths[i] for i in keep], targets[keep]
        if cfg.search_data is None:
            if len(paths) < 2:
                raise ConfigError(f"gate data {cfg.data} has {len(paths)} usable image(s) once calibration images "
                                  "are set apart; the search and the gate need at least one each (pass more images, "
                                  "or --search-data)")
            s_idx, g_idx = _split_per_class(targets, SEARCH_FRACTION)
            search = HeldOut(_load([paths[i] for i in s_idx], spec, "search"), targets[s_idx],
                             f"{len(s_idx)} labelled images from {cfg.data.name}/ (half of each class)")
            paths, targets = [paths[i] for i in g_idx], targets[g_idx]
        if not paths:
            raise ConfigError(f"gate data {cfg.data} holds no image that is not also a calibration or search image; "
                              "the gate needs images no choice was made on")
        gate = HeldOut(_load(paths, spec, "gate"), targets,
                       f"{len(paths)} labelled images from {cfg.data.name}/")
    record.update(search=search.source, gate=gate.source, disjoint="by file content (sha256)")
    return Selection(search, gate, record)


def _load(paths: Sequence[Path], spec: PreprocessSpec, what: str) -> np.ndarray:
    images = []
    for path in paths:
        try:
            images.append(load_image(path))
        except ImageError as exc:
            raise ImageError(f"{what} image {path} cannot be used: {exc}") from None
    return preprocess(images, spec)


def held_out_images(spec: PreprocessSpec, labels: Sequence[str], cfg: GateConfig) -> HeldOut:
    """The gate's images: ``cfg.data`` (labelled by sub-folder) or ``cfg.images`` generated ones (seed ``cfg.seed``)."""
    if cfg.data is None:
        return HeldOut(preprocess(generated_images(cfg.images, cfg.seed), spec), None, f"{cfg.images} generated images")
    paths, targets = _labelled(cfg.data, labels, "gate")
    return HeldOut(_load(paths, spec, "gate"), targets, f"{len(paths)} labelled images from {cfg.data.name}/")


def calibration_images(spec: PreprocessSpec, cfg: QuantConfig) -> tuple[np.ndarray, str]:
    """The images activation ranges are calibrated on: ``cfg.calib`` or generated ones."""
    if cfg.calib is None:
        return preprocess(generated_images(cfg.calib_images, CALIB_SEED), spec), f"{cfg.calib_images} generated images"
    paths = calibration_paths(cfg)
    # Round-robin over sub-folders (classes), so a limit does not drop whole classes.
    groups: dict[Path, list[Path]] = {}
    for path in paths:
        groups.setdefault(path.parent, []).append(path)
    interleaved = [p for row in itertools.zip_longest(*groups.values()) for p in row if p is not None]
    paths = interleaved[:cfg.calib_images]
    return _load(paths, spec, "calibration"), f"{len(paths)} images from {cfg.calib.name}/ ({len(groups)} folders)"


def calibration_paths(cfg: QuantConfig) -> list[Path]:
    """The image files of ``cfg.calib`` (recursively), refusing a missing or empty folder."""
    if not cfg.calib.is_dir():
        raise ConfigError(f"calibration folder {cfg.calib} not found; pass a folder of images with --calib")
    paths = sorted(p for p in cfg.calib.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ConfigError(f"calibration folder {cfg.calib} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                          "quantization needs a few representative images to calibrate on")
    return paths
