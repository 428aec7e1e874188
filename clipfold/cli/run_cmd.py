"""``clipfold classify``, ``evaluate``, ``inspect`` and ``models``: running and reading bundles."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from clipfold.cli import options as o

BACKEND_HELP = ("the runtime that runs the variant: onnxruntime, onnxruntime-cuda, tensorrt, native or openvino "
                "(default: the variant's own, onnxruntime for ONNX variants)")
HEAD_HELP = "an extra head by name (default: the fused head)"


def cmd_classify(args: argparse.Namespace) -> int:
    from clipfold import Engine

    engine = Engine.open(args.bundle, variant=args.variant, threads=args.threads, head=args.head, backend=args.backend)
    if engine.variant_reason:  # --variant auto: which variant, and the figures that chose it
        print(f"variant auto: {engine.variant.name}: {engine.variant_reason}", file=sys.stderr)
    with warnings.catch_warnings(record=True) as clamped:  # a k above the graph's top-k: one note, not a warning
        warnings.simplefilter("always")
        k = engine.clamp_k(args.top_k)
    for note in clamped:
        print(f"note: {note.message}", file=sys.stderr)
    results = engine.classify(args.images, k=k)
    if args.json:
        payload = [
            {"image": str(image), "predictions": [{"label": p.label, "score": p.score, "index": p.index} for p in preds]}
            for image, preds in zip(args.images, results)
        ]
        print(json.dumps(payload, indent=2))
        return 0
    for image, preds in zip(args.images, results):
        print(image)
        for p in preds:
            print(f"  {p.score:8.4f}  {p.label}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from clipfold import Engine, evaluate_folder

    engine = Engine.open(args.bundle, variant=args.variant, threads=args.threads, head=args.head, backend=args.backend)
    result = evaluate_folder(engine, args.folder)
    if args.json:
        print(json.dumps({"images": result.images, "top1": result.top1, "per_class": result.per_class}, indent=2))
        return 0
    print(f"{args.bundle}: top-1 {result.top1:.1%} on {result.images} images of {len(result.per_class)} classes")
    for label, accuracy in result.per_class.items():
        print(f"  {accuracy:7.1%}  {label}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from clipfold import Engine

    engine = Engine.open(args.bundle, verify_checksums=True)
    m = engine.manifest
    if args.json:
        print(m.to_json(), end="")
        return 0
    pre = m.preprocess
    print(f"bundle      {engine.path}  (schema {m.schema_version}, created {m.created})")
    print(f"model       {m.model.name} [{m.model.family}]  weights: {m.model.pretrained or 'random'}")
    print(f"labels      {len(m.labels)}: {', '.join(m.labels[:8])}{' ...' if len(m.labels) > 8 else ''}")
    print(f"head        {m.head.method}, {m.head.activation}, logit scale {m.head.logit_scale:.3f}, "
          f"{len(m.head.templates)} templates"
          + (f"; scored by the top-k kernel from {m.head.kernel}/ (not in the graph)" if m.head.kernel else ""))
    if m.text is not None:
        t = m.text
        print(f"text        {t.file} + {t.tokenizer}, context {t.context_length}; parity on {t.parity.prompts} prompts: "
              f"cosine min {t.parity.embedding_cosine_min:.7f}")
        for tv in t.variants:
            g = tv.gate
            print(f"text +      {tv.name}: {tv.file}; gate vs fp32 text on {g.prompts} prompts: cosine min "
                  f"{g.embedding_cosine_min:.5f}, top-1 agreement {g.top1_agreement:.1%}")
    print(f"preprocess  {pre.image_size[0]}x{pre.image_size[1]} {pre.resize_mode} {pre.interpolation}, "
          f"normalization {'folded into the graph' if pre.folded else 'in the runtime'}")
    for v in m.variants:
        p = v.parity
        star = "*" if v.name == m.default_variant else " "
        line = (f"variant{star}   {v.name}: {v.file} ({v.precision}, {'/'.join(v.backends)}), top-{v.top_k}; "
                f"parity on {p.images} images: cosine min {p.embedding_cosine_min:.7f}, top-k agreement {p.topk_agreement:.0%}")
        if v.gate is not None:
            g = v.gate
            line += (f"; gate vs fp32 on {g.images}: cosine min {g.embedding_cosine_min:.5f}, top-1 agreement "
                     f"{g.top1_agreement:.1%}" + (f", {len(g.kept_float)} node(s) in float" if g.kept_float else ""))
        print(line)
    for h in m.heads:
        print(f"head +      {h.name}: {h.head.method}, {len(h.labels)} labels, top-{h.top_k} ({h.file}); parity on "
              f"{h.parity.images} embeddings: top-k agreement {h.parity.topk_agreement:.0%}")
    print(f"checksums   {len(m.files)} files verified")
    print(f"digest      {engine.digest}  (pin it: clipfold serve --expect-digest NAME=DIGEST)")
    print(f"producer    {', '.join(f'{k} {v}' for k, v in m.producer.items())}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from clipfold import list_models

    for name in list_models():
        print(name)
    return 0


def _add_run_options(p) -> None:
    """How classify and evaluate run a bundle: which head, variant and backend, how many threads, JSON out."""
    p.add_argument("--head", default=None, help=HEAD_HELP)
    o.add_variant(p, o.AUTO_VARIANT + " (default: the bundle's default)")
    o.add_backend(p, BACKEND_HELP)
    o.add_threads(p)
    o.add_json(p)


def register(sub) -> None:
    p = o.command(sub, "classify", "classify images with a bundle", [
        "clipfold classify pets.bundle photo1.jpg photo2.png --top-k 3",
        "clipfold classify pets.bundle photo.jpg --variant auto --json",
        "clipfold classify pets.bundle photo.jpg --head breeds --backend native",
    ], cmd_classify)
    p.add_argument("bundle", type=Path, help="the bundle to run")
    p.add_argument("images", nargs="+", help="image files")
    o.add_top_k(p, o.default("clipfold.runtime.engine:Engine.classify", "k"), "predictions per image", old="--k")
    _add_run_options(p)

    p = o.command(sub, "evaluate", "top-1 accuracy of a bundle on a folder with one sub-folder per class", [
        "clipfold evaluate pets.bundle test/",
        "clipfold evaluate pets.bundle test/ --variant int8-static --json",
    ], cmd_evaluate)
    p.add_argument("bundle", type=Path, help="the bundle to run")
    p.add_argument("folder", type=Path, help="labelled folder: one sub-folder of images per class, named like the label")
    _add_run_options(p)

    p = o.command(sub, "inspect", "show a bundle's manifest after checking its files", [
        "clipfold inspect pets.bundle",
        "clipfold inspect pets.bundle --json",
    ], cmd_inspect)
    p.add_argument("bundle", type=Path, help="the bundle to read")
    o.add_json(p, "print the manifest as JSON")

    o.command(sub, "models", "list the model names open_clip knows (plus clipfold-tiny)", ["clipfold models"], cmd_models)
