"""``clipfold fit`` and ``clipfold head add``."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipfold.cli import options as o

FIT = "clipfold.compile.adapters.fit:FitConfig"
VIEWS = "clipfold.compile.adapters.features:ViewConfig"
HEAD_ADD = "clipfold.compile.heads.add:HeadAddConfig"


def cmd_fit(args: argparse.Namespace) -> int:
    from clipfold import FitConfig, fit_adapter
    from clipfold.compile.adapters.features import ViewConfig, default_cache_dir

    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    crop = o.floats(args.crop_scale, "--crop-scale", 2) if isinstance(args.crop_scale, str) else args.crop_scale
    views = ViewConfig(views=args.views, flip=not args.no_flip, crop_scale=crop)
    config = FitConfig(method=args.method, support=args.support, out=args.out, model=args.model,
                       pretrained=args.pretrained, templates=args.templates, shots=args.shots, val=args.val,
                       views=views, cache_dir=cache_dir, seed=args.seed, options=o.key_values(args.set))
    adapter = fit_adapter(config, progress=o.progress())
    hp = {k: v for k, v in adapter.hyperparameters.items()
          if k in ("alpha", "beta", "gamma", "val_accuracy", "selected_on", "cached_features")}
    print(f"wrote {config.out}: {adapter.head.method} over {len(adapter.labels)} classes; {hp}")
    return 0


def cmd_head_add(args: argparse.Namespace) -> int:
    from clipfold import HeadAddConfig, add_head
    from clipfold.compile.config import read_labels

    config = HeadAddConfig(bundle=args.bundle, name=args.name, adapter=args.adapter,
                           labels=read_labels(args.labels) if args.labels is not None else None,
                           templates=args.templates, method=args.method, method_options=o.key_values(args.set),
                           top_k=args.top_k, replace=args.overwrite)
    manifest = add_head(config, progress=o.progress())
    head = manifest.extra_head(args.name)
    print(f"added head {head.name!r} to {args.bundle}: {head.head.method}, {len(head.labels)} labels, "
          f"top-{head.top_k}; parity on {head.parity.images} embeddings: top-k agreement "
          f"{head.parity.topk_agreement:.0%}, max |score diff| {head.parity.max_abs_score_diff:.2e}")
    return 0


def _register_fit(sub) -> None:
    from clipfold.compile.adapters.registry import FITTERS  # names only; no torch import

    p = o.command(sub, "fit", "fit a few-shot adapter on a support folder (one sub-folder per class)", [
        "clipfold fit tip-adapter --support shots/ --out tip.safetensors",
        "clipfold fit gda --support shots/ --val val/ --out gda.safetensors --views 1",
        "clipfold fit ape --support shots/ --out ape.safetensors --set feat_num=700",
    ], cmd_fit)
    p.add_argument("method", choices=sorted(FITTERS), help="the few-shot method to fit")
    p.add_argument("--support", required=True, type=Path, help="folder with one sub-folder of images per class")
    p.add_argument("--out", required=True, type=Path, help="adapter file to write (safetensors)")
    p.add_argument("--val", type=Path, default=None, help="validation folder for the hyperparameters "
                   "(default: a held-out quarter of the support shots)")
    p.add_argument("--shots", type=int, default=None, metavar="N", help="use the first N images of each class")
    o.add_model(p, FIT)
    p.add_argument("--templates", default=None, help="prompt templates of the zero-shot branch (as for compile)")
    p.add_argument("--views", type=int, default=o.default(VIEWS, "views"), metavar="N",
                   help="feature views per shot: 1 plain + N-1 augmented (random resized crop and flip; the "
                        "official caches' 10 augmented passes)")
    p.add_argument("--crop-scale", default=o.default(VIEWS, "crop_scale"), metavar="MIN,MAX",
                   help="RandomResizedCrop scale of the augmented views, as the official code")
    p.add_argument("--no-flip", action="store_true", help="augmented views without the random horizontal flip")
    o.add_set(p, "a fitting option, e.g. an official per-dataset search range: search_scale=7,3 (tip-adapter), "
                 "feat_num=700 (ape), beta_grid=0.5,3,20 (proker), alpha_grid=0.5,1 (taskres)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where image features are cached (default: ~/.cache/clipfold/features)")
    p.add_argument("--no-cache", action="store_true", help="encode every image, cache nothing")
    p.add_argument("--seed", type=int, default=o.default(FIT, "seed"), help="seed of trained methods")


def _register_head_add(sub) -> None:
    from clipfold.compile.adapters.registry import IMPORTERS

    heads = o.group(sub, "head", "manage the extra heads of a bundle",
                    ["clipfold head add pets.bundle --name breeds --labels breeds.txt"])
    p = o.command(heads, "add", "add a head (label set, fitted adapter or head-only checkpoint) without "
                  "re-exporting the image tower", [
                      "clipfold head add pets.bundle --name breeds --labels breeds.txt",
                      "clipfold head add pets.bundle --name gda --adapter gda.safetensors --overwrite",
                      "clipfold classify pets.bundle photo.jpg --head gda",
                  ], cmd_head_add)
    p.add_argument("bundle", type=Path, help="the bundle to add the head to")
    p.add_argument("--name", required=True, help="the head's name; select it with --head NAME")
    p.add_argument("--adapter", type=Path, default=None, help="a fitted adapter file, or with --method a checkpoint")
    p.add_argument("--method", default=None, choices=sorted(IMPORTERS), help="import --adapter as this method's checkpoint")
    o.add_set(p, "an option of the imported method")
    p.add_argument("--labels", default=None, help="a zero-shot label set (file or comma list), or an import's class names")
    p.add_argument("--templates", default=None, help="templates for a zero-shot head (as for compile)")
    o.add_top_k(p, o.default(HEAD_ADD, "top_k"), "largest k the head's graph returns")
    o.add_overwrite(p, "replace an existing head of that name", old="--replace")


def register(sub) -> None:
    _register_fit(sub)
    _register_head_add(sub)
