"""The Triton similarity + top-k kernel against the roofline and against torch, in one run.

On a CUDA machine (10M x 512 fp16 gallery, k = 10; ~35 GB of GPU memory at Q = 1,024):

    python -m benchmarks.bench_triton_topk [--rows 10000000] [--dim 512] [--k 10] [--dtype fp16]

1. the device's bandwidth, measured here: the best of a read-only ``sum`` and a copy of the gallery;
2. the kernel at Q = 1, 16, 64: median time, GB/s of gallery read and % of (1). Target: >= 60 %;
3. Q = 1,024: the kernel (best of a few tile shapes, all reported) against ``torch.mm`` (fp16
   scores, 20 GB, in gallery chunks if memory is short) + ``torch.topk``. Target: >= 3x faster;
4. a check that the kernel's top-k scores match torch's (fp32 scores of the same fp16 values);

and writes ``benchmarks/results/triton-topk-<device>.json`` (device, capability, torch, triton).
``--small`` runs everything at toy sizes, on the CPU under TRITON_INTERPRET=1 when there is no
GPU: a crash check, not a measurement (nothing is written unless ``--out`` is given). It is a
script, not a pytest-benchmark module, so ``pytest`` never collects it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BANDWIDTH_TARGET = 0.60  # fraction of the measured bandwidth at Q <= 64
SPEEDUP_TARGET = 3.0  # over torch.mm + torch.topk at Q = 1,024


def _timer(torch, device):
    """fn -> seconds per call, one sample per call (CUDA events on the GPU, perf_counter elsewhere)."""
    def run(fn, reps, warmup=1):
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
        return samples
    return run


def _summary(samples):
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {"median_ms": statistics.median(samples) * 1e3, "iqr_ms": (q[2] - q[0]) * 1e3,
            "min_ms": min(samples) * 1e3, "rounds": len(samples)}


def _gallery(torch, rows, dim, dtype, device, chunk=1 << 20):
    """Unit-norm random rows (CLIP-like), built in chunks to keep the fp32 temporaries small."""
    g = torch.empty((rows, dim), dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    for lo in range(0, rows, chunk):
        x = torch.randn((min(chunk, rows - lo), dim), generator=gen, device=device)
        g[lo:lo + len(x)] = (x / x.norm(dim=1, keepdim=True)).to(dtype)
    return g


def _bandwidth(torch, gallery, run, reps):
    """GB/s of a read-only reduction and of a copy (read + write) of the gallery, measured now."""
    nbytes = gallery.numel() * gallery.element_size()
    flat = gallery.view(torch.uint8) if gallery.dtype.itemsize == 1 else gallery
    sum_s = _summary(run(lambda: flat.sum(dtype=torch.float32), reps))
    out = {"sum_GBps": nbytes / (sum_s["median_ms"] / 1e3) / 1e9}
    try:
        copy = torch.empty_like(gallery)
        copy_s = _summary(run(lambda: copy.copy_(gallery), reps))
        out["copy_GBps"] = 2 * nbytes / (copy_s["median_ms"] / 1e3) / 1e9  # the copy is freed on return
    except RuntimeError:  # no room for a second gallery: the sum alone
        pass
    out["GBps"] = max(v for k, v in out.items() if k.endswith("GBps"))
    return out


def _torch_topk(torch, queries, gallery, k, chunk_rows):
    """torch.mm (scores in the gallery's dtype) + torch.topk, over gallery chunks if asked."""
    if chunk_rows >= len(gallery):
        scores, rows = torch.topk(torch.mm(queries, gallery.t()), k, dim=1)
        return scores.float(), rows
    parts_s, parts_i = [], []
    for lo in range(0, len(gallery), chunk_rows):
        s, i = torch.topk(torch.mm(queries, gallery[lo:lo + chunk_rows].t()), k, dim=1)
        parts_s.append(s.float())
        parts_i.append(i + lo)
    scores, where = torch.topk(torch.cat(parts_s, dim=1), k, dim=1)
    return scores, torch.gather(torch.cat(parts_i, dim=1), 1, where)


def _baseline_chunk(torch, n_queries, rows, dtype, device):
    """Rows per torch.mm call so that the score matrix (and topk's copy of it) fits in free memory."""
    if device.type != "cuda":
        return rows
    free, _ = torch.cuda.mem_get_info(device)
    per_row = n_queries * dtype.itemsize * 2.5  # scores + topk's workspace, with room to spare
    return max(1 << 16, min(rows, int(free * 0.8 / per_row)))


def _reference_check(torch, queries, gallery, k, found_scores, chunk_rows=1 << 21):
    """Largest |score difference| against fp32 torch scores of the same stored values, per rank."""
    multiply = torch.float16 if gallery.dtype == torch.float8_e4m3fn else gallery.dtype
    q = queries.to(multiply).float()
    best = None
    for lo in range(0, len(gallery), chunk_rows):
        s = torch.topk(q @ gallery[lo:lo + chunk_rows].float().t(), min(k, len(gallery) - lo), dim=1).values
        best = s if best is None else torch.topk(torch.cat([best, s], dim=1), k, dim=1).values
    return float((best - found_scores).abs().max())


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=None, help="gallery rows (10,000,000; --small: 2,048)")
    parser.add_argument("--dim", type=int, default=None, help="row width (512; --small: 32)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp8"], default="fp16")
    parser.add_argument("--queries", type=int, nargs="+", default=None, help="bandwidth-bound batch sizes (1 16 64)")
    parser.add_argument("--large", type=int, default=None, help="the compute-bound batch (1,024; --small: 128)")
    parser.add_argument("--small", action="store_true", help="toy sizes; under the interpreter without a GPU")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/triton-topk-<device>.json)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        if not args.small:
            print("no CUDA device: run with --small for a crash check under the interpreter", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel is first defined
    from clipfold.compile.profiling.run import machine
    from clipfold.kernels.topk.triton_launcher import plan, topk_similarity_triton

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = args.rows or (2048 if args.small else 10_000_000)
    dim = args.dim or (32 if args.small else 512)
    batches = args.queries or [1, 16, 64]
    large = args.large or (128 if args.small else 1024)
    reps = 3 if args.small else 20
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[args.dtype]
    run = _timer(torch, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-interpreter"

    gallery = _gallery(torch, rows, dim, dtype, device)
    gallery_bytes = gallery.numel() * gallery.element_size()
    bandwidth = _bandwidth(torch, gallery, run, reps)
    gen = torch.Generator(device=device).manual_seed(1)
    result = {
        "device": name,
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "torch": torch.__version__, "triton": metadata.version("triton"), "machine": machine(),
        "config": {"rows": rows, "dim": dim, "k": args.k, "dtype": args.dtype, "small": args.small},
        "bandwidth": bandwidth, "bandwidth_bound": [], "targets": {},
    }

    # 2. Bandwidth-bound: one query tile reads the gallery once.
    for n in batches:
        q = torch.randn((n, dim), generator=gen, device=device)
        samples = run(lambda: topk_similarity_triton(q, gallery, args.k), reps)
        stats = _summary(samples)
        gbps = gallery_bytes / (stats["median_ms"] / 1e3) / 1e9
        scores, _ = topk_similarity_triton(q, gallery, args.k)
        result["bandwidth_bound"].append({
            "queries": n, **stats, "GBps": gbps, "fraction_of_bandwidth": gbps / bandwidth["GBps"],
            "launch": plan(n, rows, dim, args.k, device=device),
            "max_score_error": _reference_check(torch, q, gallery, args.k, scores),
        })

    # 3. Compute-bound: a few tile shapes for the kernel, against torch.mm + torch.topk.
    q = torch.randn((large, dim), generator=gen, device=device)
    configs = [{}, {"block_q": 64, "block_n": 64}, {"block_q": 128, "block_n": 64}, {"block_q": 128, "block_n": 128}]
    if args.small:
        configs = configs[:2]
    tried = []
    for config in configs:
        try:
            stats = _summary(run(lambda: topk_similarity_triton(q, gallery, args.k, **config), max(3, reps // 4)))
        except Exception as exc:  # a tile shape that does not compile or fit: reported, not fatal
            tried.append({"config": config, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        tried.append({"config": config, **stats})
    timed = [t for t in tried if "median_ms" in t]
    best = min(timed, key=lambda t: t["median_ms"])
    scores, _ = topk_similarity_triton(q, gallery, args.k, **best["config"])
    mm_dtype = torch.float16 if dtype == torch.float8_e4m3fn else dtype
    q_mm, g_mm = q.to(mm_dtype), gallery if dtype != torch.float8_e4m3fn else gallery.to(torch.float16)
    chunk = _baseline_chunk(torch, large, rows, mm_dtype, device)
    torch_stats = _summary(run(lambda: _torch_topk(torch, q_mm, g_mm, args.k, chunk), max(3, reps // 4)))
    torch_scores, _ = _torch_topk(torch, q_mm, g_mm, args.k, chunk)
    result["compute_bound"] = {
        "queries": large, "triton_configs": tried, "triton_best": best, "torch_mm_topk": torch_stats,
        "torch_chunk_rows": chunk, "speedup": torch_stats["median_ms"] / best["median_ms"],
        "tflops": 2 * large * rows * dim / (best["median_ms"] / 1e3) / 1e12,
        "max_score_error": _reference_check(torch, q, gallery, args.k, scores),
        # torch's scores are rounded to the gallery's dtype, so this one is looser
        "max_score_difference_vs_torch": float((torch_scores - scores).abs().max()),
    }
    result["targets"] = {
        f"Q<={max(batches)} at >= {BANDWIDTH_TARGET:.0%} of measured bandwidth":
            all(r["fraction_of_bandwidth"] >= BANDWIDTH_TARGET for r in result["bandwidth_bound"]),
        f"Q={large} >= {SPEEDUP_TARGET:g}x torch.mm + torch.topk":
            result["compute_bound"]["speedup"] >= SPEEDUP_TARGET,
    }

    print(f"{name}: {rows:,} x {dim} {args.dtype}, k = {args.k}; gallery {gallery_bytes / 1e9:.3g} GB; measured "
          f"bandwidth {bandwidth['GBps']:.4g} GB/s ({', '.join(f'{k} {v:.4g}' for k, v in bandwidth.items() if k != 'GBps')})")
    print(f"{'Q':>6} {'median ms':>10} {'IQR ms':>8} {'GB/s':>8} {'% bw':>6} {'max |err|':>10}")
    for r in result["bandwidth_bound"]:
        print(f"{r['queries']:>6} {r['median_ms']:>10.3f} {r['iqr_ms']:>8.3f} {r['GBps']:>8.4g} "
              f"{100 * r['fraction_of_bandwidth']:>5.1f}% {r['max_score_error']:>10.2e}")
    c = result["compute_bound"]
    for t in c["triton_configs"]:
        shown = t["config"] or "default"
        print(f"{large:>6} triton {shown}: " + (f"{t['median_ms']:.3f} ms (IQR {t['iqr_ms']:.3f})" if "median_ms" in t
                                                 else t["error"]))
    print(f"{large:>6} torch.mm + torch.topk: {c['torch_mm_topk']['median_ms']:.3f} ms (IQR "
          f"{c['torch_mm_topk']['iqr_ms']:.3f}, chunks of {c['torch_chunk_rows']:,} rows) -> speedup "
          f"{c['speedup']:.2f}x, {c['tflops']:.1f} TFLOP/s, max |err| {c['max_score_error']:.2e}")
    for target, ok in result["targets"].items():
        print(f"target {target}: {'met' if ok else 'MISSED'}")

    out = args.out or (None if args.small else RESULTS / f"triton-topk-{_slug(name)}.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
