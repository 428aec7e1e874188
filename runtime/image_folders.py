"""Labelled image folders: one sub-folder per class, the folder name being the label. No torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clipfold.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_folder(root: Path, shots: int | None = None, labels: tuple[str, ...] | None = None) -> tuple[tuple[str, ...], list[Path], list[int]]:
    """(labels, image paths, label indices) of a class-per-sub-folder image folder."""
    if not root.is_dir():
        raise ConfigError(f"image folder {root} not found (expected a folder with one sub-folder per class)")
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if labels is not None and classes != labels:
        raise ConfigError(f"{root} has classes {list(classes)[:6]} but {list(labels)[:6]} were expected; "
                          "it needs the same class sub-folders")
    if len(classes) < 2:
        raise ConfigError(f"{root} has {len(classes)} class sub-folder(s) {list(classes)}; a classifier needs at least 2")
    paths, targets = [], []
    for index, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"class folder {root / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        if shots is not None:
            if len(files) < shots:
                raise ConfigError(f"class {name!r} has {len(files)} images but {shots} shots were requested")
            files = files[:shots]
        paths += files
        targets += [index] * len(files)
    return classes, paths, targets


@dataclass(frozen=True)
class Evaluation:
    images: int
    top1: float
    per_class: dict[str, float]


def evaluate_folder(engine, root: Path) -> Evaluation:
    """Top-1 accuracy of ``engine`` on a labelled folder whose class names are labels of the bundle."""
    classes, paths, targets = read_folder(Path(root))
    unknown = [c for c in classes if c not in engine.labels]
    if unknown:
        raise ConfigError(f"{root} has classes {unknown[:5]} that the bundle does not know; its labels are "
                          f"{list(engine.labels)[:8]}{' ...' if len(engine.labels) > 8 else ''}")
    predicted = [row[0].label for row in engine.classify(paths, k=1)]
    hits = [p == classes[t] for p, t in zip(predicted, targets)]
    per_class = {c: sum(h for h, t in zip(hits, targets) if t == i) / targets.count(i) for i, c in enumerate(classes)}
    return Evaluation(images=len(paths), top1=sum(hits) / len(hits), per_class=per_class)
