"""Benchmark plumbing: pair each clipfold measurement with its reference from the same run.

Each benchmark records ``extra_info = {"pair": NAME, "role": "reference" | "candidate"}`` (or
``{"pairs": {NAME: ROLE, ...}}`` when it serves several comparisons); at the
end of the session every complete pair is reported as a ratio of medians (reference / candidate,
so > 1 means clipfold is faster) and written to ``benchmarks/results/ratios-<host>.json``,
tagged with the machine and library versions.
"""

from __future__ import annotations

import json
from pathlib import Path

from clipfold.compile.profile import machine

RESULTS = Path(__file__).parent / "results"


def pytest_benchmark_update_json(config, benchmarks, output_json):
    pairs: dict[str, dict[str, float]] = {}
    for bench in benchmarks:
        extra = bench.get("extra_info", {}) if isinstance(bench, dict) else bench.extra_info
        stats = bench["stats"] if isinstance(bench, dict) else bench.stats
        median = stats["median"] if isinstance(stats, dict) else stats.median
        roles = dict(extra.get("pairs", {}))
        if "pair" in extra:
            roles[extra["pair"]] = extra["role"]
        for pair, role in roles.items():
            pairs.setdefault(pair, {})[role] = median
    ratios = {
        name: {"reference_median_s": p["reference"], "candidate_median_s": p["candidate"],
               "speedup": p["reference"] / p["candidate"]}
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
    RESULTS.mkdir(exist_ok=True)
    payload = json.dumps({"machine": output_json["clipfold_machine"], "ratios": ratios, "gates": gates,
                          "figures": extras}, indent=2) + "\n"
    # One file per benchmark module run alone (ratios-image_topk.json, ratios-topk.json), else latest.
    target = f"ratios-{modules.pop()}.json" if len(modules) == 1 else "ratios-latest.json"
    (RESULTS / target).write_text(payload)
    for name, r in ratios.items():
        print(f"\n{name}: reference/candidate = {r['speedup']:.2f}x "
              f"({r['reference_median_s'] * 1e3:.1f} ms vs {r['candidate_median_s'] * 1e3:.1f} ms)")
