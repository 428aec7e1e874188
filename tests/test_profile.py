"""``clipfold profile``: rows for eager and every variant, JSON with the machine, the Pareto plot."""

from __future__ import annotations

import json
import shutil

import pytest

from clipfold import cli, errors
from clipfold.compile.config import CompileConfig
from clipfold.compile.pipeline import compile_bundle
from clipfold.compile.precision.config import GateConfig
from clipfold.compile.profiling.run import ProfileConfig, Row, pareto, profile


@pytest.fixture(scope="module")
def bundle(gda_task):
    tmp, adapter, test = gda_task
    return compile_bundle(CompileConfig(labels=None, adapter=adapter, out=tmp / "profiled.bundle",
                                        precisions="int8-dynamic,tensorrt-fp16", gate=GateConfig(data=test))).path


def test_profile_measures_every_variant_and_eager(bundle, gda_task, tmp_path, capsys):
    data = gda_task[2]
    out = tmp_path / "profile"
    code = cli.main(["profile", str(bundle), "--data", str(data), "--batch", "1,4", "--rounds", "3", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("open_clip eager", "fp32", "int8-dynamic", "tensorrt-fp16"):
        assert name in printed
    # A TensorRT-bound variant is reported, not silently run on ONNX Runtime.
    assert "not run" in printed and "tensorrt" in printed
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["machine"]["cores"] >= 1 and "onnxruntime" in payload["machine"]
    rows = {r["variant"]: r for r in payload["rows"]}
    for name in ("open_clip eager", "fp32", "int8-dynamic"):
        row = rows[name]
        assert set(row["latency_ms"]) == {"1", "4"}
        lat = row["latency_ms"]["4"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert row["throughput_ips"] > 0 and row["peak_rss_mb"] > 0 and row["load_s"] > 0
    for name in ("fp32", "int8-dynamic"):
        assert rows[name]["accuracy"] >= 0.9 and rows[name]["agreement"] >= 0.95, rows[name]  # GDA on its own task
    assert rows["fp32"]["agreement"] == 1.0
    # The eager row cannot rebuild a fitted head (the manifest has its hash, not its weights): timed only.
    assert rows["open_clip eager"]["accuracy"] is None and rows["open_clip eager"]["agreement"] is None
    # The eager row has torch loaded, the engine rows do not: their peak memory says so.
    assert rows["open_clip eager"]["peak_rss_mb"] > rows["fp32"]["peak_rss_mb"]
    assert rows["tensorrt-fp16"]["status"].startswith("not run") and rows["tensorrt-fp16"]["latency_ms"] == {}
    front = {p.split(":", 1)[1] for p in payload["pareto"]}
    assert front and front <= {"fp32", "int8-dynamic"}  # equal accuracy: the faster of the two, or both
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_eager_row_of_a_zero_shot_bundle_is_scored(tiny_bundle, tmp_path):
    bundle = shutil.copytree(tiny_bundle.path, tmp_path / "tiny.bundle")  # profile records into the bundle
    rows = {r.variant: r for r in profile(ProfileConfig(bundles=(bundle,), batches=(2,), rounds=3, images=24))}
    assert set(rows) == {"open_clip eager", "fp32"}
    # Same model, same zero-shot head, same images: eager and the engine agree (ties aside).
    assert rows["open_clip eager"].agreement >= 0.95 and rows["fp32"].agreement == 1.0
    assert rows["open_clip eager"].accuracy is None  # no labelled data given


def test_pareto_front():
    def row(name, ms, acc):
        return Row(bundle="b", variant=name, precision=name, backend="x", latency_ms={"1": {"p50": ms, "p90": ms, "p99": ms}},
                   accuracy=acc)

    rows = [row("slow-good", 10, 0.9), row("fast-bad", 2, 0.5), row("dominated", 11, 0.8), row("mid", 5, 0.9),
            row("twin", 5, 0.9), row("unscored", 1, None)]
    # Ties on both axes dominate neither; a row without a quality figure is not on the front.
    assert [r.variant for r in pareto(rows, 1)] == ["fast-bad", "mid", "twin"]


def test_profile_bad_input(bundle, tmp_path, capsys):
    with pytest.raises(errors.BackendUnavailableError, match="unknown backend 'cuda'"):
        profile(ProfileConfig(bundles=(bundle,), backend="cuda"))
    with pytest.raises(errors.ConfigError, match="is not a folder"):
        ProfileConfig(bundles=(bundle,), data=tmp_path / "missing")
    other = tmp_path / "other"
    shutil.copytree(bundle.parent / "test", other)
    (other / "light background").rename(other / "zebra")
    with pytest.raises(errors.ConfigError, match=r"classes \['zebra'\]"):
        profile(ProfileConfig(bundles=(bundle,), data=other))
    rows = profile(ProfileConfig(bundles=(bundle,), backend="tensorrt", eager=False, rounds=3))
    assert rows and all(r.status.startswith("not run") and "clipfold[gpu]" in r.status for r in rows)
    assert cli.main(["profile", str(bundle), "--batch", "1,x"]) == 2
    assert "comma list of integers" in capsys.readouterr().err
