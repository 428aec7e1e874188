"""Write the demo's inputs: a labels file for the tiny model's classes and a few generated images.

``python -m clipfold.compile.tiny.samples --out DIR`` writes ``DIR/labels.txt`` and
``DIR/images/NN_<colour>_<shape>.png`` (the file name tells the truth, for eyeballing the demo),
a few-shot task whose names the tiny model rarely saw in training (12 % of captions), background type:
``DIR/fewshot/{support,test}/<type> background/*.png``, ``labels.txt`` and ``templates.txt``, and
``DIR/photos/`` to index and search by text.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clipfold.compile.tiny import data


def write_samples(out: Path, n_images: int = 6, seed: int = 2024) -> tuple[Path, list[Path]]:
    out = Path(out)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for old in images_dir.glob("*.png"):
        old.unlink()
    labels = out / "labels.txt"
    labels.write_text("\n".join(data.class_names()) + "\n", encoding="utf-8")
    paths = []
    for i, sample in enumerate(data.generate(n_images, seed=seed)):
        path = images_dir / f"{i:02d}_{sample.color}_{sample.shape}.png"
        sample.image.save(path)
        paths.append(path)
    return labels, paths


def write_photos(out: Path, n: int = 120, seed: int = 5) -> Path:
    """``DIR/photos/NNN_<colour>_<shape>.png``: a folder to index and search by text."""
    folder = Path(out) / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    for i, sample in enumerate(data.generate(n, seed=seed)):
        sample.image.save(folder / f"{i:03d}_{sample.color}_{sample.shape}.png")
    return folder


def write_background_folder(root: Path, samples) -> Path:
    """A labelled folder: one sub-folder per background type ("dark background", ...)."""
    for i, sample in enumerate(samples):
        folder = Path(root) / f"{sample.background} background"
        folder.mkdir(parents=True, exist_ok=True)
        sample.image.save(folder / f"{i:04d}.png")
    return Path(root)


def write_fewshot(out: Path, shots: int = 12, test: int = 200, seed: int = 11) -> Path:
    root = Path(out) / "fewshot"
    write_background_folder(root / "support", data.per_background(shots, seed))
    write_background_folder(root / "test", data.generate(test, seed=seed + 1))
    labels = sorted(f"{b} background" for b in data.BACKGROUNDS)
    (root / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    (root / "templates.txt").write_text("a photo on a {}.\na {}.\n", encoding="utf-8")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()
    labels, paths = write_samples(args.out, args.n, args.seed)
    print(f"wrote {labels} ({len(data.class_names())} labels) and {len(paths)} images in {args.out / 'images'}")
    fewshot = write_fewshot(args.out)
    print(f"wrote a background-type few-shot task in {fewshot} (support and test folders)")
    print(f"wrote {write_photos(args.out)} (generated photos to index and search)")


if __name__ == "__main__":
    main()
