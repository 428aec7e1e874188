"""Benchmark plumbing: pair each clipfold measurement with its reference from the same run.

Each benchmark records ``extra_info = {"pair": NAME, "role": "reference" | "candidate"}`` (or
``{"pairs": {NAME: ROLE, ...}}`` when it serves several comparisons); at the
end of the session every complete pair is reported as a ratio of medians (reference / candidate,
so > 1 means clipfold is faster) and written to ``benchmarks/results/ratios-<host>.json``,
tagged with the machine (CPU model and flags), library versions and the load average before and
after the run (other processes' load slows everything measured; ratios are of the same run).
When several benchmarks take the same role in a pair (the peers of a "best peer" comparison),
the fastest of them takes it, and the ratio names which one (``reference`` / ``candidate``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from clipfold.compile.profiling.run import machine

RESULTS = Path(__file__).parent / "results"


LOAD_AT_START = os.getloadavg() if hasattr(os, "getloadavg") else None


def pytest_benchmark_update_json(config, benchmarks, output_json):
    pairs: dict[str, dict[str, float]] = {}
    names: dict[tuple[str, str], str] = {}  # (pair, role) -> the benchmark that took it
    for bench in benchmarks:
        extra = bench.get("extra_info", {}) if isinstance(bench, dict) else bench.extra_info
        stats = bench["stats"] if isinstance(bench, dict) else bench.stats
        median = stats["median"] if isinstance(stats, dict) else stats.median
        roles = dict(extra.get("pairs", {}))
        if "pair" in extra:
            roles[extra["pair"]] = extra["role"]
        for pair, role in roles.items():
            if median < pairs.setdefault(pair, {}).get(role, float("inf")):  # the fastest of several takes the role
                pairs[pair][role] = median
                names[pair, role] = (bench["fullname"] if isinstance(bench, dict) else bench.fullname).split("::")[-1]
    ratios = {
        name: {"reference_median_s": p["reference"], "candidate_median_s": p["candidate"],
               "speedup": p["reference"] / p["candidate"], "reference": names[name, "reference"],
               "candidate": names[name, "candidate"]}
        for name, p in sorted(pairs.items()) if {"reference", "candidate"} <= set(p)
    }
    gates, extras, modules = {}, {}, set()
    for bench in benchmarks:
        extra = bench.get("extra_info", {}) if isinstance(bench, dict) else bench.extra_info
        name = bench["fullname"] if isinstance(bench, dict) else bench.fullname
        modules.add(name.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py").removeprefix("test_bench_"))
        gates.update(extra.get("gates", {}))
        figures = {k: v for k, v in extra.items() if k not in ("pair", "role", "pairs", "gates", "variant")}
        if figures:
            extras[name.split("::")[-1]] = figures
    output_json["clipfold_ratios"] = ratios
    output_json["clipfold_machine"] = machine()
    if LOAD_AT_START is not None:  # `uptime`'s 1/5/15-minute load averages, before and after
        output_json["clipfold_machine"]["load_average"] = {"start": LOAD_AT_START, "end": os.getloadavg()}
    RESULTS.mkdir(exist_ok=True)
    payload = json.dumps({"machine": output_json["clipfold_machine"], "ratios": ratios, "gates": gates,
                          "figures": extras}, indent=2) + "\n"
    # One file per benchmark module run alone (ratios-image_topk.json, ratios-topk.json), else latest.
    target = f"ratios-{modules.pop()}.json" if len(modules) == 1 else "ratios-latest.json"
    (RESULTS / target).write_text(payload)
    for name, r in ratios.items():
        print(f"\n{name}: reference/candidate = {r['speedup']:.2f}x "
              f"({r['reference']} {r['reference_median_s'] * 1e3:.1f} ms vs {r['candidate']} "
              f"{r['candidate_median_s'] * 1e3:.1f} ms)")
