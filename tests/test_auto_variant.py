"""variant="auto": the fastest variant on this CPU, from the bundle's profile record for this CPU, else
measured within a bounded time; ``clipfold profile`` writes the record."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from clipfold import errors
from clipfold.compile.config import CompileConfig
from clipfold.compile.pipeline import compile_bundle
from clipfold.compile.precision.config import GateConfig
from clipfold.compile.profiling.run import ProfileConfig, profile
from clipfold.runtime import Engine, variant_choice
from clipfold.runtime.bundle.layout import PROFILES_FILE
from clipfold.runtime.bundle.schema import Manifest
from clipfold.runtime.variant_choice import choose, cpu_signature, read_records, write_record

RELAXED = GateConfig(min_cosine=0.0, min_top1_agreement=0.0, max_accuracy_drop=1.0, images=8)


@pytest.fixture(scope="module")
def two_variants(tmp_path_factory, tiny_labels):
    out = tmp_path_factory.mktemp("auto") / "tiny.bundle"
    return compile_bundle(CompileConfig(labels=tiny_labels, out=out, top_k=5, precisions=("fp32", "int8-dynamic"),
                                        gate=RELAXED)).path


@pytest.fixture
def bundle(two_variants):
    (two_variants / PROFILES_FILE).unlink(missing_ok=True)
    yield two_variants
    (two_variants / PROFILES_FILE).unlink(missing_ok=True)


def _no_measuring(*args, **kwargs):
    raise AssertionError("the profile record covers every variant: nothing should be measured")


@pytest.mark.parametrize("fast", ["fp32", "int8-dynamic"])
def test_auto_takes_the_fastest_variant_of_this_cpus_record(bundle, monkeypatch, caplog, fast):
    slow = "int8-dynamic" if fast == "fp32" else "fp32"
    # Another CPU's record says the opposite: it must be ignored.
    other = {"signature": "Some Other CPU [x86_64, flags 000000000000]", "cpu": {}, "threads": 2, "created": "x",
             "variants": {fast: {"backend": "onnxruntime", "ms_per_image": {"1": 90.0}},
                          slow: {"backend": "onnxruntime", "ms_per_image": {"1": 1.0}}}}
    (bundle / PROFILES_FILE).write_text(json.dumps({"format": "clipfold-profiles", "version": 1, "records": [other]}))
    write_record(bundle, {fast: {"backend": "onnxruntime", "ms_per_image": {1: 2.0, 8: 1.5}},
                          slow: {"backend": "onnxruntime", "ms_per_image": {1: 3.0, 8: 2.5}}}, threads=None)
    assert len(read_records(bundle)) == 2  # this CPU's record added beside the other's
    monkeypatch.setattr(variant_choice, "_measure", _no_measuring)
    with caplog.at_level(logging.INFO, logger="clipfold.runtime"):
        engine = Engine.open(bundle, variant="auto", batch_size=8)
    assert engine.variant.name == fast
    assert "profile record" in engine.variant_reason and f"{fast} 1.50" in engine.variant_reason
    assert any(f"variant auto: {fast}" in r.getMessage() for r in caplog.records)
    # The chosen engine classifies like the variant opened by name.
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    by_name = Engine.open(bundle, variant=fast).run_pixels(pixels)
    np.testing.assert_array_equal(engine.run_pixels(pixels)["indices"], by_name["indices"])


def test_auto_measures_within_its_budget_without_a_record(bundle):
    manifest = Manifest.read(bundle)
    calls = []

    class Timed:  # run_pixels advances a fake clock by a known cost per image, per variant
        def __init__(self, name):
            self.name = name

        def run_pixels(self, pixels):
            calls.append(self.name)
            now[0] += {"fp32": 0.004, "int8-dynamic": 0.002}[self.name] * len(pixels)

    now = [0.0]
    name, reason = choose(bundle, manifest, 4, Timed, budget_s=0.05, clock=lambda: now[0])
    assert name == "int8-dynamic" and "no profile record for this CPU" in reason
    assert "measured here at batch 4" in reason and "int8-dynamic 2.00" in reason and "fp32 4.00" in reason
    # Bounded: one warm-up each, then timed rounds only while each variant's half of 50 ms lasts
    # (fp32: 16 ms a call, so 2; int8-dynamic: 8 ms, so 4), never more than MAX_ROUNDS.
    assert calls.count("fp32") == 1 + 2 and calls.count("int8-dynamic") == 1 + 4
    calls.clear()
    choose(bundle, manifest, 4, Timed, budget_s=10.0, clock=lambda: now[0])
    assert calls.count("fp32") == calls.count("int8-dynamic") == 1 + variant_choice.MAX_ROUNDS
    calls.clear()
    choose(bundle, manifest, 4, Timed, budget_s=0.0, clock=lambda: now[0])
    assert calls == ["fp32", "fp32", "int8-dynamic", "int8-dynamic"]  # zero budget: one timed call each


def test_auto_skips_variants_this_machine_cannot_run(bundle, monkeypatch):
    monkeypatch.setattr(variant_choice, "runnable",
                        lambda v: "its backend tensorrt needs an NVIDIA GPU" if v.name == "fp32" else None)
    engine = Engine.open(bundle, variant="auto")
    assert engine.variant.name == "int8-dynamic"
    assert "not runnable here: fp32 (its backend tensorrt needs an NVIDIA GPU)" in engine.variant_reason


def test_a_damaged_profile_file_is_refused_by_name(bundle):
    (bundle / PROFILES_FILE).write_text('{"format": "clipfold-profiles", "version": 1, "records": [{"signature": 3}]}')
    with pytest.raises(errors.BundleError, match=r"profiles.json is not a clipfold-profiles v1 file"):
        Engine.open(bundle, variant="auto")
    (bundle / PROFILES_FILE).write_text("{not json")
    with pytest.raises(errors.BundleError, match=r"profiles.json cannot be read as JSON"):
        Engine.open(bundle, variant="auto")


def test_profile_writes_this_cpus_record(bundle, tmp_path):
    rows = profile(ProfileConfig(bundles=(bundle,), batches=(1, 2), rounds=3, warmup=1, images=4, eager=False,
                                 out=tmp_path / "p"))
    records = read_records(bundle)
    assert [r["signature"] for r in records] == [cpu_signature()["key"]]
    recorded = records[0]["variants"]
    assert sorted(recorded) == ["fp32", "int8-dynamic"]
    for row in rows:  # ms per image = the row's p50 at that batch / batch
        for batch in ("1", "2"):
            assert recorded[row.variant]["ms_per_image"][batch] == pytest.approx(row.latency_ms[batch]["p50"] / int(batch))
    engine = Engine.open(bundle, variant="auto", batch_size=2)
    per_image = {n: v["ms_per_image"]["2"] for n, v in recorded.items()}
    assert engine.variant.name == min(per_image, key=per_image.get)
