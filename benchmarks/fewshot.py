"""Few-shot table: top-1 of every fitting method at 1, 2, 4, 8, 16 shots next to zero-shot.

The task is one whose names the embedded tiny model rarely saw in training — the background type of the
generated images (4 classes) — and every number comes from the real path: ``clipfold fit`` on a
support folder (features cached, augmented views), ``clipfold compile --adapter``, and the
torch-free engine's ``evaluate_folder`` on a separate test folder. Hyperparameters are chosen on a
separate validation folder (25 images per class by default, as Tip-Adapter and APE search on a
validation set rather than on held-out shots), never on the test folder. Support sets are nested:
the k-shot set is the first k images of each class of the 16-shot set.

    python -m benchmarks.fewshot [--shots 1 2 4 8 16] [--methods gda tip-adapter ...] [--views 11]

writes ``benchmarks/results/fewshot-tiny.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from clipfold.compile.adapters.features import ViewConfig
from clipfold.compile.adapters.fit import FitConfig, fit_adapter
from clipfold.compile.adapters.registry import FITTERS
from clipfold.compile.config import CompileConfig
from clipfold.compile.pipeline import compile_bundle, producer_versions
from clipfold.compile.tiny import data
from clipfold.compile.tiny.samples import write_background_folder
from clipfold.runtime import Engine
from clipfold.runtime.image_folders import evaluate_folder

RESULTS = Path(__file__).parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
TEMPLATES = ("a photo on a {}.", "a {}.")


def run(shots: list[int], methods: list[str], views: int, test_images: int, seed: int, val_per_class: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="clipfold-fewshot-"))
    support = write_background_folder(work / "support", data.per_background(max(shots), 1000 + seed))
    val = write_background_folder(work / "val", data.per_background(val_per_class, 2000 + seed))
    test = write_background_folder(work / "test", data.generate(test_images, seed=3000 + seed))
    labels = tuple(sorted(f"{b} background" for b in data.BACKGROUNDS))
    zs = compile_bundle(CompileConfig(labels=labels, templates=TEMPLATES, out=work / "zero-shot.bundle", top_k=1))
    zero_shot = evaluate_folder(Engine.open(zs.path), test).top1
    print(f"zero-shot: {zero_shot:.1%}", file=sys.stderr)
    table: dict[str, dict[str, float]] = {}
    seconds: dict[str, dict[str, float]] = {}
    for method in methods:
        table[method], seconds[method] = {}, {}
        for k in shots:
            start = time.perf_counter()
            out = work / f"{method}-{k}.safetensors"
            fit_adapter(FitConfig(method=method, support=support, out=out, shots=k, val=val, templates=TEMPLATES,
                                  views=ViewConfig(views=views), cache_dir=work / "cache", seed=seed))
            fit_s = time.perf_counter() - start
            bundle = compile_bundle(CompileConfig(labels=None, adapter=out, out=work / f"{method}-{k}.bundle", top_k=1))
            table[method][str(k)] = evaluate_folder(Engine.open(bundle.path), test).top1
            seconds[method][str(k)] = round(fit_s, 2)
            print(f"{method:14s} {k:2d} shots: {table[method][str(k)]:.1%} (fit {fit_s:.1f}s)", file=sys.stderr)
    return {"task": "background type of generated images (4 classes), embedded tiny model",
            "zero_shot": zero_shot, "top1": table, "fit_seconds": seconds, "shots": shots, "views": views,
            "val_per_class": val_per_class, "test_images": test_images, "seed": seed,
            "machine": platform.machine(), "cpu": cpu_name(), "producer": producer_versions()}


def markdown(result: dict) -> str:
    shots = result["shots"]
    lines = [f"# Few-shot top-1 on the tiny model: {result['task']}", "",
             f"{result['test_images']} test images; hyperparameters on a separate validation folder "
             f"({result['val_per_class']} per class); {result['views']} feature views per shot (the plain one and "
             f"{result['views'] - 1} augmented: the official recipes use the augmented ones); every method fit on all "
             f"the shots (its values chosen on the validation folder); seed {result['seed']}; "
             f"CPU: {result.get('cpu', '?')}.",
             "Produced by `python -m benchmarks.fewshot` through fit -> compile -> the onnxruntime engine.", "",
             "| method | " + " | ".join(f"{k} shot{'s' if k > 1 else ''}" for k in shots) + " |",
             "|---|" + "---:|" * len(shots),
             "| zero-shot | " + " | ".join(f"{result['zero_shot']:.1%}" for _ in shots) + " |"]
    for method, row in result["top1"].items():
        lines.append(f"| {method} | " + " | ".join(f"{row[str(k)]:.1%}" for k in shots) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--methods", nargs="+", default=list(FITTERS), choices=list(FITTERS))
    parser.add_argument("--views", type=int, default=11, help="1 plain + 10 augmented, as the official caches")
    parser.add_argument("--test-images", type=int, default=400)
    parser.add_argument("--val-per-class", type=int, default=25,
                        help="validation images per class for the hyperparameter search (never the test set)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "fewshot-tiny")
    args = parser.parse_args(argv)
    result = run(sorted(args.shots), args.methods, args.views, args.test_images, args.seed, args.val_per_class)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
