"""compile --if-faster: fp32-native and bf16 built only where this CPU runs them, kept only where faster than fp32."""

from __future__ import annotations

import pytest

import clipfold.compile.precision.speed_check as speed_check
import clipfold.kernels.vit.tower as vit
import clipfold.runtime.backends.openvino as openvino_backend
from clipfold import errors
from clipfold.compile.config import CompileConfig
from clipfold.compile.pipeline import compile_bundle


def _compile(adapter, out, messages, **kwargs):
    return compile_bundle(CompileConfig(labels=None, adapter=adapter, out=out, **kwargs), progress=messages.append)


def test_slower_variants_are_dropped_and_faster_ones_kept(gda_task, tmp_path, monkeypatch):
    _, adapter, _ = gda_task
    # Forced figures: the native kernel slower than fp32 (as on the AMX Xeon), bf16 faster.
    seconds = {"native": 0.020, "openvino": 0.005}
    monkeypatch.setattr(speed_check, "time_pair", lambda ref, cand, pixels: (0.010, seconds[cand.name]))
    messages: list[str] = []
    result = _compile(adapter, tmp_path / "b", messages, if_faster=("fp32-native", "bf16"))
    names = [v.name for v in result.manifest.variants]
    assert "fp32-native" not in names and not (result.path / "native").exists()
    assert not any(f.startswith("native/") for f in result.manifest.files)
    assert any("fp32-native (--if-faster) dropped, not faster than fp32 on this CPU: 20.0 ms vs fp32 10.0 ms" in m
               for m in messages)
    if openvino_backend.bf16_refusal() is None:
        assert names == ["fp32", "bf16"]
        assert any("bf16 (--if-faster) kept: 5.0 ms vs fp32 10.0 ms" in m for m in messages)
    else:
        assert names == ["fp32"] and any(m.startswith("skipping bf16 (--if-faster)") for m in messages)


def test_what_this_cpu_cannot_run_is_skipped_with_the_reason(gda_task, tmp_path, monkeypatch):
    _, adapter, _ = gda_task
    monkeypatch.setattr(vit, "kernel_available", lambda: False)
    monkeypatch.setattr(openvino_backend, "cpu_capabilities", lambda: ("FP32", "INT8"))
    monkeypatch.setattr(speed_check, "time_pair", lambda *a: pytest.fail("nothing should be timed"))
    messages: list[str] = []
    result = _compile(adapter, tmp_path / "b", messages, if_faster="fp32-native,bf16")
    assert [v.name for v in result.manifest.variants] == ["fp32"]
    assert "skipping fp32-native (--if-faster): the ViT kernel needs an x86-64 CPU with AVX2 and FMA" in messages
    assert any(m.startswith("skipping bf16 (--if-faster): bf16 needs a CPU with native bfloat16") for m in messages)


def test_time_pair_alternates_and_is_bounded():
    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def run(self, feeds):
            calls.append(self.name)

    speed_check.time_pair(Fake("a"), Fake("b"), None, rounds=50, budget_s=0.0)
    assert calls == ["a", "b"] * 2 + ["a", "b"] * 3  # two warm-ups, then three pairs when the budget is spent
    calls.clear()
    speed_check.time_pair(Fake("a"), Fake("b"), None, rounds=7, budget_s=60.0)
    assert calls == ["a", "b"] * (2 + 7)


def test_if_faster_names_are_checked(tmp_path):
    with pytest.raises(errors.ConfigError, match=r"--if-faster takes fp32-native, bf16 .*'int8-dynamic'"):
        CompileConfig(labels=("a", "b"), out=tmp_path / "x", if_faster=("int8-dynamic",))


def test_the_cli_passes_if_faster(tmp_path, capsys):
    from clipfold import cli

    assert cli.main(["compile", "--labels", "a,b", "--out", str(tmp_path / "x"), "--if-faster", "fp32-native,int4"]) == 2
    assert "--if-faster takes fp32-native, bf16" in capsys.readouterr().err and not (tmp_path / "x").exists()
