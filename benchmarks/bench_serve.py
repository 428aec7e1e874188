"""Load on ``clipfold serve``: dynamic batching against batch-1 serving, loopback only.

    python -m benchmarks.bench_serve [--bundle B] [--concurrency 1,4,16,64] [--requests 600]

For each mode the server runs as its own process (``clipfold serve``, as a user starts it):

* ``batched``: ``--max-batch 32 --max-delay-ms 5`` (the defaults);
* ``batched-0ms``: ``--max-batch 32 --max-delay-ms 0``: a batch is whatever queued while the
  previous one ran;
* ``batched-spin``: the defaults with ``--spin`` (ONNX Runtime threads busy-wait between calls);
* ``batch1``: ``--max-batch 1 --max-delay-ms 0``, every request its own engine call.

Before the servers start, the same engine is timed in this process with nothing else running:
images/s calling it with 1 image at a time and with 16, with ONNX Runtime's threads spinning and
not. The batch-16 rate over the batch-1 rate with the servers' setting (not spinning),
``engine_batching_ceiling``, bounds what batching can gain over batch-1 serving on this machine
and model: the HTTP work per request is the same in both modes, so dynamic batching can only
remove engine cost, and no more than this. ``engine_batching_ceiling_best`` compares each batch
size at its better setting (spinning helps batch 1). Each server's preferred batch (measured at
its start) is read from its ``/config`` and recorded.

At each concurrency C, C clients on keep-alive connections (one asyncio task each, raw HTTP/1.1,
so the client costs little of the 2 cores it shares with the server) send Open Inference Protocol
``infer`` requests of one preprocessed image each (binary tensor data), ``--requests`` in total
after a warm-up. Reported: throughput (requests/s over the wall time) and latency p50/p90/p99.
Target (issue 7): at C = 16 with the tiny model, batched throughput >= 2x batch-1, and batched
p99 <= 3x its p50.

gRPC against HTTP (issue 25): the ``batched`` server also listens for the Open Inference
Protocol over gRPC; right after each HTTP level, the same requests (one image, raw tensor
contents) go to it over gRPC from C concurrent calls on one HTTP/2 channel (grpc.aio, requests
serialized once beforehand, like the HTTP client's), against the same server process. The two
alternate five times at each level, each keeping its median pass (``passes_rps`` has all,
``grpc_over_http_pairs`` the ratio of each back-to-back pair):
``batched`` and ``batched-grpc`` in the results, ``c16_grpc_over_http_throughput`` in the summary. Writes ``benchmarks/results/serve-load.json`` with the machine and versions.
Without ``--bundle`` it compiles the embedded tiny model into a temporary folder first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
MODES = {"batched": ["--max-batch", "32", "--max-delay-ms", "5"],
         "batched-0ms": ["--max-batch", "32", "--max-delay-ms", "0"],
         "batched-spin": ["--max-batch", "32", "--max-delay-ms", "5", "--spin"],
         "batch1": ["--max-batch", "1", "--max-delay-ms", "0"]}


def _request(pixels: np.ndarray) -> bytes:
    header = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                                     "parameters": {"binary_data_size": pixels.nbytes}}],
                         "outputs": [{"name": "scores", "parameters": {"binary_data": True}},
                                     {"name": "indices", "parameters": {"binary_data": True}}]}).encode()
    body = header + pixels.tobytes()
    return (f"POST /v2/models/{{model}}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(v) for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
                  if k.strip().lower() == "content-length")
    await reader.readexactly(length)
    return status


async def _load(port: int, requests: list[bytes], concurrency: int, total: int) -> dict:
    latencies: list[float] = []
    errors: dict[int, int] = {}
    counter = iter(range(total))

    async def client(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for n in counter:
            start = time.perf_counter()
            writer.write(requests[(i + n) % len(requests)])
            status = await _read_response(reader)
            latencies.append(time.perf_counter() - start)
            if status != 200:
                errors[status] = errors.get(status, 0) + 1
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return _summary(concurrency, latencies, errors, time.perf_counter() - start)


GRPC_PASSES = 5


def _grpc_request(pixels: np.ndarray, model: str) -> bytes:
    from tritonclient.grpc import service_pb2 as pb

    tensor = pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=list(pixels.shape))
    wanted = [pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in ("scores", "indices")]
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], outputs=wanted,
                                raw_input_contents=[pixels.tobytes()]).SerializeToString()


async def _grpc_load(port: int, requests: list[bytes], concurrency: int, total: int) -> dict:
    import grpc

    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(total))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out

        async def client(i: int) -> None:
            for n in counter:
                start = time.perf_counter()
                try:
                    await infer(requests[(i + n) % len(requests)])
                except grpc.RpcError as err:
                    errors[err.code().name] = errors.get(err.code().name, 0) + 1
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        wall = time.perf_counter() - start
    return _summary(concurrency, latencies, errors, wall)


def _summary(concurrency: int, latencies: list[float], errors: dict, wall: float) -> dict:
    """One load level's figures: requests, errors, throughput and latency percentiles."""
    q = statistics.quantiles(latencies, n=100)
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors, "seconds": wall,
            "throughput_rps": len(latencies) / wall, "p50_ms": q[49] * 1e3, "p90_ms": q[89] * 1e3, "p99_ms": q[98] * 1e3}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(bundle: Path, flags: list[str], grpc_port: int = 0) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "clipfold", "serve", str(bundle), "--port", str(port),
                             "--grpc-port", str(grpc_port), "--no-ui", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"clipfold serve did not start (exit {proc.poll()})")
            time.sleep(0.1)


def engine_ceiling(bundle: Path, pixels: np.ndarray, seconds: float = 3.0) -> dict:
    """Images/s of the engine alone: serial calls of 1 and of 16 images, spinning and not."""
    from clipfold.runtime import Engine

    rates = {}
    for spin in (True, False):
        engine = Engine.open(bundle, spin=spin)
        for batch in (1, 16):
            rows = np.concatenate([pixels] * (1 + batch // len(pixels)))[:batch]
            for _ in range(20):
                engine.run_pixels(rows)
            calls, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds:
                engine.run_pixels(rows)
                calls += 1
            rates[f"b{batch}_{'spin' if spin else 'nospin'}_images_per_s"] = calls * batch / elapsed
        del engine
        time.sleep(0.5)  # let the spinning threads of the closed session stop
    best = {b: max(v for k, v in rates.items() if k.startswith(f"b{b}_")) for b in (1, 16)}
    rates["engine_batching_ceiling"] = rates["b16_nospin_images_per_s"] / rates["b1_nospin_images_per_s"]
    rates["engine_batching_ceiling_best"] = best[16] / best[1]
    print(f"engine alone, not spinning (as served): {rates['b1_nospin_images_per_s']:.0f} images/s at batch 1, "
          f"{rates['b16_nospin_images_per_s']:.0f} at batch 16: batching can gain at most "
          f"{rates['engine_batching_ceiling']:.2f}x here ({rates['engine_batching_ceiling_best']:.2f}x with each "
          f"batch size at its better setting)", flush=True)
    return rates


def _preferred_batch(port: int, model: str) -> int:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{model}/config", timeout=10) as answer:
        return json.load(answer)["dynamic_batching"]["preferred_batch_size"][0]


def run(bundle: Path, concurrency: list[int], total: int) -> tuple[dict, dict, dict]:
    from clipfold.compile.tiny import data
    from clipfold.runtime import Engine
    from clipfold.runtime.preprocess import preprocess

    engine = Engine.open(bundle)
    model = bundle.name.removesuffix(".bundle")
    pixels = preprocess([s.image for s in data.generate(64, seed=42)], engine.manifest.preprocess)
    requests = [_request(pixels[i:i + 1]).replace(b"{model}", model.encode()) for i in range(len(pixels))]
    grpc_requests = [_grpc_request(pixels[i:i + 1], model) for i in range(len(pixels))]
    ceiling = engine_ceiling(bundle, pixels)
    del engine
    results: dict[str, list[dict]] = {}
    pairs: list[dict] = []
    preferred: dict[str, int] = {}
    for mode, flags in MODES.items():
        grpc_port = _free_port() if mode == "batched" else 0
        proc, port = _start(bundle, flags, grpc_port)
        try:
            asyncio.run(_load(port, requests, 4, 100))  # warm-up: sessions, thread pools, allocator
            if grpc_port:
                asyncio.run(_grpc_load(grpc_port, grpc_requests, 4, 100))
                results["batched-grpc"] = []
            preferred[mode] = _preferred_batch(port, model)
            print(f"{mode}: preferred batch {preferred[mode]}", flush=True)
            results[mode] = []
            for c in concurrency:
                n = max(total, 4 * c)
                if not grpc_port:
                    row = _measured(proc.pid, lambda: asyncio.run(_load(port, requests, c, n)))
                    results[mode].append(row)
                    _print(mode, row)
                    continue
                # HTTP and gRPC alternate, GRPC_PASSES times each, on the same server; each keeps its
                # median pass (the machine is shared: a pass can lose to a neighbour's burst)
                passes = {mode: [], "batched-grpc": []}
                for _ in range(GRPC_PASSES):
                    passes[mode].append(_measured(proc.pid, lambda: asyncio.run(_load(port, requests, c, n))))
                    passes["batched-grpc"].append(
                        _measured(proc.pid, lambda: asyncio.run(_grpc_load(grpc_port, grpc_requests, c, n))))
                for name, rows in passes.items():
                    median = sorted(rows, key=lambda r: r["throughput_rps"])[len(rows) // 2]
                    median["passes_rps"] = [r["throughput_rps"] for r in rows]
                    results[name].append(median)
                    _print(name, median)
                pairs.append({"concurrency": c, "grpc_over_http": [g["throughput_rps"] / h["throughput_rps"] for h, g
                                                                   in zip(passes[mode], passes["batched-grpc"])]})
        finally:
            proc.terminate()
            proc.wait(30)
    results["grpc_over_http_pairs"] = pairs
    return results, ceiling, preferred


def _measured(pid: int, load) -> dict:
    """Run one load level; add the server's CPU time per request."""
    cpu = _cpu_seconds(pid)
    row = load()
    row["server_cpu_ms_per_request"] = (_cpu_seconds(pid) - cpu) * 1e3 / row["requests"]
    return row


def _print(mode: str, row: dict) -> None:
    print(f"{mode:12s} C={row['concurrency']:3d}  {row['throughput_rps']:8.1f} req/s  p50 {row['p50_ms']:7.2f} ms  "
          f"p90 {row['p90_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  server CPU {row['server_cpu_ms_per_request']:.2f} "
          f"ms/request  errors {row['errors'] or 0}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="default: compile the embedded tiny model")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per concurrency level")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve-load.json")
    args = parser.parse_args()
    concurrency = [int(c) for c in args.concurrency.split(",")]

    from clipfold.compile.profiling.run import machine

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            from clipfold.compile.config import CompileConfig
            from clipfold.compile.pipeline import compile_bundle
            from clipfold.compile.tiny import data

            bundle = compile_bundle(CompileConfig(labels=tuple(data.class_names()), out=Path(tmp) / "tiny.bundle")).path
        results, ceiling, preferred = run(bundle, concurrency, args.requests)
        model = Path(bundle).name

    summary = {}
    if 16 in concurrency:
        b = next(r for r in results["batched"] if r["concurrency"] == 16)
        one = next(r for r in results["batch1"] if r["concurrency"] == 16)
        summary = {"c16_throughput_ratio": b["throughput_rps"] / one["throughput_rps"],
                   "c16_batched_p99_over_p50": b["p99_ms"] / b["p50_ms"],
                   "c16_throughput_ratio_0ms": next(r for r in results["batched-0ms"] if r["concurrency"] == 16)[
                       "throughput_rps"] / one["throughput_rps"],
                   "c16_grpc_over_http_throughput": next(r for r in results["batched-grpc"] if r["concurrency"] == 16)[
                       "throughput_rps"] / b["throughput_rps"],
                   "c16_grpc_over_http_pairs_median": statistics.median(next(
                       p for p in results["grpc_over_http_pairs"] if p["concurrency"] == 16)["grpc_over_http"]),
                   "c16_grpc_p50_ms": next(r for r in results["batched-grpc"] if r["concurrency"] == 16)["p50_ms"],
                   "c16_http_p50_ms": b["p50_ms"],
                   "engine_batching_ceiling": ceiling["engine_batching_ceiling"],
                   "engine_batching_ceiling_best": ceiling["engine_batching_ceiling_best"],
                   "targets": {"c16_throughput_ratio": ">= 2.0", "c16_batched_p99_over_p50": "<= 3.0"}}
        print(f"C=16: batched / batch-1 throughput {summary['c16_throughput_ratio']:.2f}x (target >= 2; the engine "
              f"alone gains {ceiling['engine_batching_ceiling']:.2f}x from batching here), "
              f"batched p99/p50 {summary['c16_batched_p99_over_p50']:.2f} (target <= 3); gRPC / HTTP throughput on "
              f"the batched server {summary['c16_grpc_over_http_throughput']:.2f}x (median of {GRPC_PASSES} back-to-back "
              f"pairs {summary['c16_grpc_over_http_pairs_median']:.2f}x; p50 {summary['c16_grpc_p50_ms']:.2f} ms vs "
              f"{summary['c16_http_p50_ms']:.2f} ms)")
    record = {"machine": machine(), "bundle": model, "modes": {m: " ".join(f) for m, f in MODES.items()},
              "engine_alone": ceiling, "preferred_batch": preferred, "results": results, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
