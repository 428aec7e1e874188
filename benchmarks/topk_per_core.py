"""Top-k per core, measured in thread CPU time: the cross-check of ``make bench-kernels`` on a
shared machine.

Wall-clock ratios on a loaded machine mostly measure how each library's threads cope with other
processes (faiss's OpenMP threads spin while they wait, and its 256-query time grew 20x under a
load of 12 on 2 cores). Here every engine runs on one thread (OpenBLAS, torch and faiss limited to
one), each call is timed with ``time.thread_time`` (CPU time of the calling thread, which is where
all of them run with one thread), the engines take turns round after round, and the minimum per
engine is kept. That leaves memory-bandwidth contention from other processes, which slows every
engine alike, so compare within a run.

    python -m benchmarks.topk_per_core [--rows 400000] [--rounds 7]

Writes ``benchmarks/results/topk-per-core.json``: per query count, each engine's best time, its
GFLOP/s (2*Q*N*D) and gallery GB/s, the read floor (numpy's SIMD max over the gallery), the CPU
(model and flags) and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from clipfold.compile.profiling.run import machine
from clipfold.kernels import Gallery
from clipfold.kernels.topk.launcher import available_isas, topk_cpu

D, K = 512, 10
RESULTS = Path(__file__).parent / "results"


def engines(gallery: np.ndarray, queries: np.ndarray) -> dict:
    """name -> callable(q); only those installed. Each runs on this thread alone."""
    g = Gallery.from_array(gallery)
    run = {f"clipfold-{isa}": (lambda q, isa=isa: topk_cpu(q, g, K, threads=1, isa=isa)) for isa in available_isas()
           if isa != "portable"}
    run["numpy"] = lambda q: np.argpartition(-(q @ gallery.T), K - 1, axis=1)[:, :K]
    try:
        import torch

        torch.set_num_threads(1)
        tg = torch.from_numpy(gallery)
        run["torch"] = lambda q: torch.mm(torch.from_numpy(q), tg.T).topk(K, dim=1)
    except ImportError:
        pass
    try:
        import faiss

        faiss.omp_set_num_threads(1)
        index = faiss.IndexFlatIP(D)
        index.add(gallery)
        run["faiss"] = lambda q: index.search(q, K)
    except ImportError:
        pass
    return run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=400_000, help="gallery rows (800 MB at 400k: past a 300 MB L3)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--queries", default="1,16,256")
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((args.rows, D), dtype=np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    all_queries = rng.standard_normal((256, D), dtype=np.float32)
    run = engines(gallery, all_queries)
    run["read"] = lambda q: np.max(gallery.reshape(-1))
    load_start = os.getloadavg()
    out = {}
    for nq in (int(x) for x in args.queries.split(",")):
        q = all_queries[:nq]
        times = {name: [] for name in run}
        for name, fn in run.items():  # warm-up
            fn(q)
        for _ in range(args.rounds):
            for name, fn in run.items():
                start = time.thread_time()
                fn(q)
                times[name].append(time.thread_time() - start)
        best = {name: min(t) for name, t in times.items()}
        peers = {n: t for n, t in best.items() if n in ("numpy", "torch", "faiss")}
        top = min(peers, key=peers.get)
        mine = best[f"clipfold-{available_isas()[-1]}"]
        out[f"q{nq}"] = {
            "ms": {n: round(t * 1e3, 2) for n, t in best.items()},
            "gflops": {n: round(2 * nq * args.rows * D / t / 1e9, 1) for n, t in best.items() if n != "read"},
            "gallery_gb_per_s": {n: round(gallery.nbytes / t / 1e9, 2) for n, t in best.items()},
            "best_peer": top, "vs_best_peer": round(peers[top] / mine, 2),
            "vs_faiss": round(best["faiss"] / mine, 2) if "faiss" in best else None,
            "vs_read": round(best["read"] / mine, 2)}
        print(nq, json.dumps(out[f"q{nq}"]), flush=True)
    report = {"machine": machine(), "rows": args.rows, "dim": D, "k": K, "rounds": args.rounds,
              "timer": "time.thread_time, one thread per engine, min over interleaved rounds",
              "load_average": {"start": load_start, "end": os.getloadavg()}, "results": out}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "topk-per-core.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
