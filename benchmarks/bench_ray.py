"""Ray Data embedding against the single-process runtime, on this machine's CPUs.

    python -m benchmarks.bench_ray [--images 2000] [--models tiny,ViT-B-32] [--rounds 2]

For each model, the same folder of generated photos is indexed from scratch, alternating:

* ``single``: ``build_index`` with one runtime ``Engine`` (ONNX Runtime on ``cpus`` threads);
* ``ray``: ``build_index_ray`` on a local Ray instance of ``cpus`` CPUs, ``cpus`` Engine actors of one
  thread each (``clipfold index --ray``). Ray itself is started once, before the timed runs (a
  cluster is running already when a user submits work to it); the timed run includes starting the
  actor pool, opening the bundle in every actor, and committing the shards.

Reported per mode (median of the rounds): images/s over the whole run, actor start-up included,
and the ratio ray/single. Target (issue 9): Ray on 2 local CPUs >= 80% of the single process.
(A "steady state" rate between the first and last committed shard was tried and dropped: Ray Data
runs ahead of the driver's commits, so it overstated Ray.) ``tiny`` is the embedded model (64 px images: about a
millisecond of compute per image, so fixed costs weigh most); ``ViT-B-32`` has random weights at
224 px (the compute of a real deployment). Writes ``benchmarks/results/ray-index.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _photos(folder: Path, n: int, size: int) -> Path:
    from clipfold.compile.tiny import data

    folder.mkdir(parents=True, exist_ok=True)
    for i, sample in enumerate(data.iterate(seed=77, size=size)):
        if i == n:
            break
        sample.image.save(folder / f"{i:05d}.png")
    return folder


def _bundle(model: str, out: Path) -> Path:
    from clipfold.compile.config import CompileConfig
    from clipfold.compile.pipeline import compile_bundle

    if model == "tiny":
        from clipfold.compile.tiny import data

        return compile_bundle(CompileConfig(labels=tuple(data.class_names()), out=out)).path
    return compile_bundle(CompileConfig(labels=("cat", "dog", "car"), out=out, model=model, templates="label")).path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--vit-images", type=int, default=768, help="images for ViT-B-32 (about 25 ms each)")
    parser.add_argument("--models", default="tiny,ViT-B-32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "ray-index.json")
    args = parser.parse_args()

    import ray

    from clipfold.compile.profiling.run import machine
    from clipfold.runtime import Engine
    from clipfold.runtime.retrieval.index import build_index
    from clipfold.runtime.retrieval.ray_index import build_index_ray

    record = {"machine": machine(), "cpus": args.cpus, "ray": ray.__version__, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        record["ray_start_s"] = round(time.perf_counter() - start, 2)
        try:
            for model in args.models.split(","):
                bundle = _bundle(model, tmp / f"{model}.bundle")
                size = Engine.open(bundle).manifest.preprocess.image_size[0]
                n = args.images if model == "tiny" else args.vit_images
                folder = _photos(tmp / f"photos-{model}", n, max(size, 64))
                times: dict[str, list[float]] = {"single": [], "ray": []}
                for round_ in range(args.rounds):
                    for mode in ("single", "ray"):
                        out = tmp / f"idx-{model}-{mode}-{round_}"
                        start = time.perf_counter()
                        if mode == "single":
                            build_index(Engine.open(bundle, threads=args.cpus), folder, out)
                        else:
                            build_index_ray(bundle, folder, out, actors=args.cpus, threads_per_actor=1)
                        times[mode].append(time.perf_counter() - start)
                        shutil.rmtree(out)
                        print(f"{model:9s} {mode:6s} round {round_}: {n / times[mode][-1]:7.1f} images/s", flush=True)
                rate = {mode: n / statistics.median(t) for mode, t in times.items()}
                record["models"][model] = {
                    "images": n, "image_size": size, "seconds": {m: [round(t, 3) for t in ts] for m, ts in times.items()},
                    "images_per_s": {m: round(r, 1) for m, r in rate.items()},
                    "ray_over_single": round(rate["ray"] / rate["single"], 3)}
                print(f"{model}: ray / single = {rate['ray'] / rate['single']:.2f} (target >= 0.80)", flush=True)
        finally:
            ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()
