"""The accuracy gate: a reduced-precision variant against the fp32 variant on held-out images.

Figures: embedding cosine (min and mean), top-1 agreement, top-5 overlap and, with a labelled
folder, top-1 accuracy of both. Agreement is tie-aware: a different top-1 index still agrees
when fp32 scores it within ``tie_tolerance`` of its own top-1 (the two are tied in fp32).
No choice is made on the images that judge a variant (:func:`selection_images`): calibration,
search and gate images never overlap. The sensitivity search ranks nodes and bisects on the
*search* images; the figures recorded and held to the limits come from the *gate* images only.
Generated images take three disjoint seeds; a labelled ``--gate-data`` folder is split per class
(half of each class's images to the search, at least one image in all), or the search takes
its own ``--search-data`` folder; gate and search images that are byte-identical to a calibration
(or search) image are dropped from the gate. The split is recorded in each variant's gate figures.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from clipfold.compile.precision.config import GateConfig, QuantConfig
from clipfold.compile.tiny import data as tiny_data
from clipfold.runtime.backends.base import Backend
from clipfold.runtime.backends.kernel_head import KernelHead, KernelHeadBackend
from clipfold.runtime.backends.onnxruntime import OnnxRuntimeBackend
from clipfold.runtime.bundle.agreement import Gate
from clipfold.runtime.bundle.schema import PreprocessSpec, TensorSpec
from clipfold.runtime.image_folders import IMAGE_SUFFIXES, read_folder
from clipfold.runtime.images import load_image
from clipfold.runtime.preprocess import preprocess

from clipfold.errors import ConfigError, ImageError

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
        search = HeldOut(preprocess([s.image for s in tiny_data.generate(n, seed=seed)], spec), None,
                         f"{n} generated images (seed {seed})")
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
    if cfg.data is None:
        samples = tiny_data.generate(cfg.images, seed=cfg.seed)
        return HeldOut(preprocess([s.image for s in samples], spec), None, f"{cfg.images} generated images")
    classes, paths, targets = read_folder(cfg.data)
    unknown = [c for c in classes if c not in labels]
    if unknown:
        raise ConfigError(f"gate data {cfg.data} has classes {unknown[:5]} that are not labels of this model; "
                          f"expected sub-folders named like the labels {list(labels)[:6]}")
    index = {label: i for i, label in enumerate(labels)}
    mapped = np.array([index[classes[t]] for t in targets], dtype=np.int64)
    return HeldOut(_load(paths, spec, "gate"), mapped, f"{len(paths)} labelled images from {cfg.data.name}/")


def calibration_images(spec: PreprocessSpec, cfg: QuantConfig) -> tuple[np.ndarray, str]:
    """The images activation ranges are calibrated on: ``cfg.calib`` or generated ones."""
    if cfg.calib is None:
        samples = tiny_data.generate(cfg.calib_images, seed=CALIB_SEED)
        return preprocess([s.image for s in samples], spec), f"{cfg.calib_images} generated images"
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


def run_graph(path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], pixels: np.ndarray,
              batch_size: int = 16, head: KernelHead | None = None) -> dict[str, np.ndarray]:
    """A graph's outputs on ``pixels`` in batches (and a kernel-scored head's, when given)."""
    return run_backend(OnnxRuntimeBackend(path, inputs, outputs), pixels, batch_size, head)


def run_backend(backend: Backend, pixels: np.ndarray, batch_size: int = 16,
                head: KernelHead | None = None) -> dict[str, np.ndarray]:
    """An opened backend's outputs on ``pixels`` in batches (and a kernel-scored head's, when given)."""
    if head is not None:
        backend = KernelHeadBackend(backend, head)
    parts: dict[str, list[np.ndarray]] = {}
    for lo in range(0, len(pixels), batch_size):
        for name, value in backend.run({"pixels": pixels[lo:lo + batch_size]}).items():
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row pair (rows flattened), in float64. NaN stays NaN (and fails every
    ``>=`` limit); a zero row scores 0 rather than 0/0."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    return np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def measure(reference: dict[str, np.ndarray], got: dict[str, np.ndarray], held: HeldOut, cfg: GateConfig,
            tie_tolerance: float = 1e-5, reference_name: str = "fp32") -> Gate:
    cos = row_cosine(reference["embedding"], got["embedding"])
    ref_idx, ref_scores, idx = reference["indices"], reference["scores"], got["indices"]
    same = idx[:, 0] == ref_idx[:, 0]
    # A different pick agrees when fp32 scores it as high as its own top-1 (within the tolerance).
    in_ref = idx[:, :1] == ref_idx
    tied = np.any(in_ref & (ref_scores >= ref_scores[:, :1] - tie_tolerance), axis=1)
    k = min(5, idx.shape[1])
    overlap = np.mean([len(set(r[:k]) & set(g[:k])) / k for r, g in zip(ref_idx, idx)])
    accuracy = reference_accuracy = None
    if held.targets is not None:
        accuracy = float(np.mean(idx[:, 0] == held.targets))
        reference_accuracy = float(np.mean(ref_idx[:, 0] == held.targets))
    return Gate(reference=reference_name, images=len(cos), source=held.source,
                embedding_cosine_min=float(cos.min()), embedding_cosine_mean=float(cos.mean()),
                top1_agreement=float(np.mean(same | tied)), top5_overlap=float(overlap),
                accuracy=accuracy, reference_accuracy=reference_accuracy, thresholds=cfg.thresholds())


def embedding_failures(cosine_min: float, top1_agreement: float, cfg: GateConfig) -> list[str]:
    """The figures every gate has (image and text): min cosine and top-1 agreement against their limits."""
    out = []  # written as "not >=" so that a NaN figure fails
    if not cosine_min >= cfg.min_cosine:
        out.append(f"min embedding cosine {cosine_min:.5f} < {cfg.min_cosine}")
    if not top1_agreement >= cfg.min_top1_agreement:
        out.append(f"top-1 agreement {top1_agreement:.2%} < {cfg.min_top1_agreement:.2%}")
    return out


def failures(gate: Gate, cfg: GateConfig) -> list[str]:
    """Every figure that misses its limit, with both numbers."""
    out = embedding_failures(gate.embedding_cosine_min, gate.top1_agreement, cfg)
    if not gate.top5_overlap >= cfg.min_top5_overlap:
        out.append(f"top-5 overlap {gate.top5_overlap:.2%} < {cfg.min_top5_overlap:.2%}")
    if gate.accuracy is not None and not gate.reference_accuracy - gate.accuracy <= cfg.max_accuracy_drop:
        out.append(f"accuracy {gate.accuracy:.2%} is {gate.reference_accuracy - gate.accuracy:.2%} below fp32's "
                   f"{gate.reference_accuracy:.2%} (limit {cfg.max_accuracy_drop:.2%})")
    return out
