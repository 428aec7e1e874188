"""Write the demo's inputs: a labels file for the tiny model's classes and a few generated images.

``python -m clipfold.compile.tiny.samples --out DIR`` writes ``DIR/labels.txt`` and
``DIR/images/NN_<colour>_<shape>.png`` (the file name tells the truth, for eyeballing the demo).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import data


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()
    labels, paths = write_samples(args.out, args.n, args.seed)
    print(f"wrote {labels} ({len(data.class_names())} labels) and {len(paths)} images in {args.out / 'images'}")


if __name__ == "__main__":
    main()
