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


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=None, help="gallery rows (10,000,000; --small: 2,048)")
    parser.add_argument("--dim", type=int, default=None, help="row width (512; --small: 32)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp8"], default="fp16")
    parser.add_argument("--queries", type=int, nargs="+", default=None, help="bandwidth-bound batch sizes (1 16 64)")
    parser.add_argument("--large", type=int, default=None, help="the compute-bound batch (1,024; --small: 128)")
    parser.add_argument("--small", action="store_true", help="toy sizes; under the interpreter without a GPU")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/triton-topk-<device>.json)")
    return parser.parse_args(argv)


def _sizes(args) -> dict:
    """The run's sizes: the flags, or their defaults (toy ones with ``--small``)."""
    return {"rows": args.rows or (2048 if args.small else 10_000_000), "dim": args.dim or (32 if args.small else 512),
            "batches": args.queries or [1, 16, 64], "large": args.large or (128 if args.small else 1024),
            "reps": 3 if args.small else 20}


def _bandwidth_bound(torch, topk, plan, run, gallery, batches, k, reps, bandwidth, gen) -> list[dict]:
    """2. One query tile reads the gallery once: time, GB/s and fraction of the measured bandwidth per Q."""
    rows, dim = gallery.shape
    gallery_bytes = gallery.numel() * gallery.element_size()
    out = []
    for n in batches:
        q = torch.randn((n, dim), generator=gen, device=gallery.device)
        stats = _summary(run(lambda: topk(q, gallery, k), reps))
        gbps = gallery_bytes / (stats["median_ms"] / 1e3) / 1e9
        scores, _ = topk(q, gallery, k)
        out.append({
            "queries": n, **stats, "GBps": gbps, "fraction_of_bandwidth": gbps / bandwidth["GBps"],
            "launch": plan(n, rows, dim, k, device=gallery.device),
            "max_score_error": _reference_check(torch, q, gallery, k, scores),
        })
    return out


def _tile_shapes(topk, run, q, gallery, k, reps, small) -> list[dict]:
    """The kernel at a few tile shapes; one that does not compile or fit is reported, not fatal."""
    configs = [{}, {"block_q": 64, "block_n": 64}, {"block_q": 128, "block_n": 64}, {"block_q": 128, "block_n": 128}]
    tried = []
    for config in configs[:2] if small else configs:
        try:
            stats = _summary(run(lambda: topk(q, gallery, k, **config), max(3, reps // 4)))
        except Exception as exc:  # a tile shape that does not compile or fit: reported, not fatal
            tried.append({"config": config, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        tried.append({"config": config, **stats})
    return tried


def _compute_bound(torch, topk, run, gallery, large, k, reps, small, gen) -> dict:
    """3. A large query batch: the best tile shape against torch.mm + torch.topk."""
    rows, dim = gallery.shape
    q = torch.randn((large, dim), generator=gen, device=gallery.device)
    tried = _tile_shapes(topk, run, q, gallery, k, reps, small)
    best = min((t for t in tried if "median_ms" in t), key=lambda t: t["median_ms"])
    scores, _ = topk(q, gallery, k, **best["config"])
    fp8 = gallery.dtype == torch.float8_e4m3fn
    mm_dtype = torch.float16 if fp8 else gallery.dtype
    q_mm, g_mm = q.to(mm_dtype), gallery.to(torch.float16) if fp8 else gallery
    chunk = _baseline_chunk(torch, large, rows, mm_dtype, gallery.device)
    torch_stats = _summary(run(lambda: _torch_topk(torch, q_mm, g_mm, k, chunk), max(3, reps // 4)))
    torch_scores, _ = _torch_topk(torch, q_mm, g_mm, k, chunk)
    return {
        "queries": large, "triton_configs": tried, "triton_best": best, "torch_mm_topk": torch_stats,
        "torch_chunk_rows": chunk, "speedup": torch_stats["median_ms"] / best["median_ms"],
        "tflops": 2 * large * rows * dim / (best["median_ms"] / 1e3) / 1e12,
        "max_score_error": _reference_check(torch, q, gallery, k, scores),
        # torch's scores are rounded to the gallery's dtype, so this one is looser
        "max_score_difference_vs_torch": float((torch_scores - scores).abs().max()),
    }


def _targets(result: dict, batches, large) -> dict:
    return {
        f"Q<={max(batches)} at >= {BANDWIDTH_TARGET:.0%} of measured bandwidth":
            all(r["fraction_of_bandwidth"] >= BANDWIDTH_TARGET for r in result["bandwidth_bound"]),
        f"Q={large} >= {SPEEDUP_TARGET:g}x torch.mm + torch.topk":
            result["compute_bound"]["speedup"] >= SPEEDUP_TARGET,
    }


def _report(result: dict, gallery_bytes: int) -> None:
    cfg, bandwidth, large = result["config"], result["bandwidth"], result["compute_bound"]["queries"]
    print(f"{result['device']}: {cfg['rows']:,} x {cfg['dim']} {cfg['dtype']}, k = {cfg['k']}; gallery "
          f"{gallery_bytes / 1e9:.3g} GB; measured bandwidth {bandwidth['GBps']:.4g} GB/s "
          f"({', '.join(f'{k} {v:.4g}' for k, v in bandwidth.items() if k != 'GBps')})")
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


def main(argv=None) -> int:
    args = _parse(argv)

    import torch

    if not torch.cuda.is_available():
        if not args.small:
            print("no CUDA device: run with --small for a crash check under the interpreter", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel is first defined
    from clipfold.compile.profiling.run import machine
    from clipfold.kernels.topk.triton_launcher import plan, topk_similarity_triton

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = _sizes(args)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[args.dtype]
    run = _timer(torch, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-interpreter"

    gallery = _gallery(torch, n["rows"], n["dim"], dtype, device)
    bandwidth = _bandwidth(torch, gallery, run, n["reps"])  # 1.
    gen = torch.Generator(device=device).manual_seed(1)
    result = {
        "device": name,
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "torch": torch.__version__, "triton": metadata.version("triton"), "machine": machine(),
        "config": {"rows": n["rows"], "dim": n["dim"], "k": args.k, "dtype": args.dtype, "small": args.small},
        "bandwidth": bandwidth,
        "bandwidth_bound": _bandwidth_bound(torch, topk_similarity_triton, plan, run, gallery, n["batches"], args.k,
                                            n["reps"], bandwidth, gen),
        "targets": {},  # filled in below: the key keeps its place in the JSON
        "compute_bound": _compute_bound(torch, topk_similarity_triton, run, gallery, n["large"], args.k, n["reps"],
                                        args.small, gen),
    }
    result["targets"] = _targets(result, n["batches"], n["large"])
    _report(result, gallery.numel() * gallery.element_size())

    out = args.out or (None if args.small else RESULTS / f"triton-topk-{_slug(name)}.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
