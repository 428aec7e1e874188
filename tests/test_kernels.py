"""CPU similarity + top-k against the oracle: every storage, ties, shards, edge cases, bad input."""

from __future__ import annotations

import json
import os
import select
import signal
from pathlib import Path

import numpy as np
import pytest

from clipfold import errors
from clipfold.kernels import Gallery, topk_reference, topk_similarity
from clipfold.kernels.topk.gallery import Shard, quantize_rows
from clipfold.kernels.topk.launcher import ISAS, available_isas, kernel_isa, resolve_isa, topk_cpu
from clipfold.kernels.topk.reference import same_topk


def _data(n=5000, d=64, q=7, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((q, d)).astype(np.float32), rng.standard_normal((n, d)).astype(np.float32)


def _stored(gallery: np.ndarray, storage: str) -> np.ndarray:
    """What a gallery of ``storage`` represents exactly (the oracle's input for that storage)."""
    rows, scales = quantize_rows(gallery, storage)
    return rows.astype(np.float64) * (scales[:, None] if scales is not None else 1.0)


@pytest.mark.parametrize("storage", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("k", [1, 10, 257])
def test_matches_the_oracle_for_every_storage(storage, k):
    queries, gallery = _data()
    g = Gallery.from_array(gallery, storage=storage)
    scores, indices = topk_similarity(queries, g, k, block_rows=700)  # many blocks, a ragged last one
    exact = _stored(gallery, storage)  # every storage is scored in fp32 against the rows it stores
    ref_scores, _ = topk_reference(queries, exact, k)
    assert scores.shape == indices.shape == (len(queries), k) and indices.dtype == np.int64
    assert np.all(np.diff(scores, axis=1) <= 0)
    assert same_topk(scores, indices, ref_scores, queries, exact, atol=1e-3)


def test_ties_allow_any_index_but_the_same_scores():
    rng = np.random.default_rng(1)
    base = rng.integers(-3, 4, size=(40, 16)).astype(np.float32)
    gallery = np.concatenate([base] * 25)  # every row 25 times: massive exact ties
    queries = rng.integers(-2, 3, size=(5, 16)).astype(np.float32)
    scores, indices = topk_similarity(queries, gallery, 30, block_rows=128)
    ref_scores, _ = topk_reference(queries, gallery, 30)
    assert same_topk(scores, indices, ref_scores, queries, gallery, atol=0)


def test_edge_cases():
    queries, gallery = _data(n=6, d=8, q=3)
    for k in (6, 10):  # k = N and k > N: every row, sorted
        scores, indices = topk_similarity(queries, gallery, k)
        assert scores.shape == (3, 6) and sorted(indices[0].tolist()) == list(range(6))
    scores, indices = topk_similarity(queries[0], gallery, 1)  # one query as a vector
    assert indices.shape == (1, 1) and indices[0, 0] == int(np.argmax(gallery @ queries[0]))
    scores, indices = topk_similarity(queries, np.zeros((0, 8), np.float32), 5)  # empty gallery
    assert scores.shape == (3, 0) and indices.shape == (3, 0)
    for n in (0, 70):  # no queries; 70 queries take the packed panels, with 6 rows of 8
        scores, indices = topk_similarity(np.ones((n, 8), np.float32), gallery, 4)
        assert scores.shape == indices.shape == (n, 4)
        assert all(sorted(row) == sorted(np.argsort(-gallery.sum(1))[:4]) for row in indices.tolist())
    with pytest.raises(errors.ConfigError, match="width 0"):
        Gallery.from_array(np.zeros((5, 0), np.float32))


def test_bad_input_is_named():
    queries, gallery = _data(n=10, d=8, q=2)
    with pytest.raises(errors.ConfigError, match="width 9 but the gallery rows have width 8"):
        topk_similarity(np.ones((2, 9), np.float32), gallery, 3)
    bad = queries.copy()
    bad[1, 2] = np.nan
    with pytest.raises(errors.ConfigError, match=r"queries \[1\] hold NaN"):
        topk_similarity(bad, gallery, 3)
    with pytest.raises(errors.ConfigError, match="k must be a positive integer"):
        topk_similarity(queries, gallery, 0)
    with pytest.raises(errors.ConfigError, match=r"gallery rows \[4\] hold NaN"):
        g = gallery.copy()
        g[4, 0] = np.inf
        Gallery.from_array(g)
    with pytest.raises(errors.ConfigError, match="unknown gallery storage 'int4'"):
        Gallery.from_array(gallery, storage="int4")
    with pytest.raises(errors.ConfigError, match="needs the fp32 rows"):
        topk_similarity(queries, Gallery.from_array(gallery, storage="int8"), 3, oversample=4)


def test_sharded_folder_round_trip_with_ids(tmp_path):
    queries, gallery = _data(n=3001, d=32, q=4, seed=3)
    ids = np.array([f"img-{i}" for i in range(len(gallery))])
    Gallery.from_array(gallery, storage="int8", ids=ids, keep_exact=True).save(tmp_path / "g", shard_rows=1000)
    opened = Gallery.open(tmp_path / "g")
    assert len(opened) == 3001 and len(opened.shards) == 4 and isinstance(opened.shards[0].rows, np.memmap)
    scores, indices = topk_similarity(queries, opened, 10, oversample=4, block_rows=256)
    _, ref_indices = topk_reference(queries, gallery, 10)
    # Rescored from the kept fp32 rows: exact scores; recall@10 of the int8 candidates is high.
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(indices, ref_indices)])
    assert recall >= 0.97, recall
    assert np.allclose(scores, np.einsum("qd,qkd->qk", queries, gallery[indices]), atol=1e-5)
    assert opened.ids_of(indices)[0, 0] == f"img-{indices[0, 0]}"
    with pytest.raises(errors.ConfigError, match="not a clipfold gallery folder"):
        Gallery.open(tmp_path)


def test_a_saved_folder_is_on_disk_before_its_json_names_it(tmp_path, monkeypatch):
    """Durability, not only atomicity: every shard file is fsynced before the JSON naming it is
    renamed into place, and the folder after (on e4645d0 nothing was fsynced, so a power loss could
    leave gallery.json naming shards that never reached the disk)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    _, gallery = _data(n=2500, d=16, q=1, seed=4)
    Gallery.from_array(gallery, storage="int8", keep_exact=True).save(tmp_path / "g", shard_rows=1000)
    shards = sorted(p.name for p in (tmp_path / "g").glob("*.npy"))
    assert len(shards) == 9  # 3 shards x rows, scales, exact
    replaced = [i for i, (kind, _) in enumerate(events) if kind == "replace"]
    assert len(replaced) == 1
    synced_before = {Path(path).name for kind, path in events[:replaced[0]] if kind == "fsync"}
    assert set(shards) <= synced_before, set(shards) - synced_before
    assert any(name.startswith(".") for name in synced_before)  # the staged JSON itself
    assert ("fsync", str(tmp_path / "g")) in events[replaced[0]:]  # then the folder holding the rename


def _need(isa: str) -> None:
    if isa not in available_isas():
        pytest.skip(f"this CPU lacks the {isa} path (it runs {list(available_isas())})")


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("storage", ["fp32", "fp16", "int8"])
def test_simd_tiles_match_the_portable_loops(storage, isa):
    """Every tile shape of each SIMD path, forced on this CPU, against the plain-C loops and the
    oracle. AVX2: query counts 1-9 leave each remainder of 4 in the dot-product tiles, widths that
    are not multiples of 8 exercise their scalar tail, 64 or 67 queries take the packed 16 x 6
    panels. AVX-512: 1-4 queries take the dot tiles (4 rows + 1-row tails, masked width tails),
    more the 16-query panels (1 panel: 24-row tiles; 2+: 2 x 12 and a 1 x 12 for an odd one out;
    ragged query panels; 301 rows end in a ragged row tile)."""
    _need(isa)
    rng = np.random.default_rng(7)
    for nq, d in ((1, 64), (1, 37), (2, 37), (3, 8), (4, 17), (5, 100), (9, 13), (16, 33), (37, 100),
                  (48, 16), (64, 8), (67, 20)):
        queries = rng.standard_normal((nq, d)).astype(np.float32)
        gallery = rng.standard_normal((301, d)).astype(np.float32)
        g = Gallery.from_array(gallery, storage=storage)
        simd = topk_cpu(queries, g, 17, threads=1, isa=isa)
        plain = topk_cpu(queries, g, 17, threads=1, isa="portable")
        assert np.allclose(simd[0], plain[0], atol=1e-4), (nq, d)
        exact = _stored(gallery, storage)
        ref_scores, _ = topk_reference(queries, exact, 17)
        assert same_topk(*simd, ref_scores, queries, exact, atol=1e-4), (nq, d)
        assert same_topk(*plain, ref_scores, queries, exact, atol=1e-4), (nq, d)


def test_threads_and_ranges_do_not_change_the_answer():
    queries, gallery = _data(n=4099, d=48, q=6, seed=5)
    g = Gallery.from_array(gallery)
    one = topk_similarity(queries, g, 25, threads=1)
    many = topk_similarity(queries, g, 25, threads=2, block_rows=333)
    ref_scores, _ = topk_reference(queries, gallery, 25)
    assert same_topk(*one, ref_scores, queries, gallery, atol=1e-4)
    assert same_topk(*many, ref_scores, queries, gallery, atol=1e-4)


@pytest.mark.parametrize("storage", ["fp32", "fp16", "int8"])
def test_logsumexp_is_the_softmax_normalizer_over_every_row(storage):
    # 13 queries: 8 per vector, then 5 one by one; 70 queries: the packed panels' padded stride.
    queries, gallery = _data(n=3001, d=40, q=70, seed=9)
    queries *= np.geomspace(0.5, 6.0, 70, dtype=np.float32)[:, None]  # flat to very peaked softmaxes
    g = Gallery.from_array(gallery, storage=storage)
    full = queries.astype(np.float64) @ _stored(gallery, storage).T
    expected = np.log(np.exp(full - full.max(1, keepdims=True)).sum(1)) + full.max(1)
    ref = np.sort(np.exp(full - expected[:, None]), axis=1)[:, ::-1][:, :7]
    for isa in available_isas():
        for rows in (slice(0, 1), slice(0, 3), slice(0, 13), slice(None)):
            scores, indices, lse = topk_cpu(queries[rows], g, 7, block_rows=500, isa=isa, logsumexp=True)
            assert np.allclose(lse, expected[rows], atol=1e-4, rtol=0), (isa, rows)
            probs = np.exp(scores - lse[:, None])  # the top-7 softmax probabilities
            assert np.allclose(probs, ref[rows], atol=1e-5, rtol=1e-4), (isa, rows)
    assert np.allclose(topk_similarity(queries, g, 7, logsumexp=True)[2], expected, atol=1e-4, rtol=0)
    with pytest.raises(errors.ConfigError, match="cannot be combined with oversample"):
        topk_similarity(queries, Gallery.from_array(gallery, "int8", keep_exact=True), 3, oversample=2, logsumexp=True)


def test_malformed_galleries_are_refused_before_the_kernel_reads_them(tmp_path):
    queries, gallery = _data(n=300, d=16, q=2, seed=11)
    with pytest.raises(errors.ConfigError, match=r"rows \[1\] exceed fp16's range"):
        Gallery.from_array(np.array([[1.0, 0.0], [1e5, 0.0]], np.float32), storage="fp16")
    with pytest.raises(errors.ConfigError, match="float32 gallery of width 16|fp32 gallery of width 16"):
        Gallery([Shard(gallery.astype(np.float16), None, None, None)], 16, "fp32")
    Gallery.from_array(gallery, storage="int8").save(tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "gallery.json").read_text())
    np.save(tmp_path / "g" / "0000.scales.npy", np.ones(10, np.float32))  # 10 scales for 300 rows
    with pytest.raises(errors.ConfigError, match=r"0000.scales.npy has shape \(10,\), expected \(300,\)"):
        Gallery.open(tmp_path / "g")
    del meta["shards"][0]["scales"]
    (tmp_path / "g" / "gallery.json").write_text(json.dumps(meta))
    with pytest.raises(errors.ConfigError, match="has no scales file"):
        Gallery.open(tmp_path / "g")
    with pytest.raises(errors.ConfigError, match="C-contiguous float32"):
        topk_cpu(queries.astype(np.float64), Gallery.from_array(gallery), 3)


@pytest.mark.parametrize("queries", [1, 2, 9, 40])
@pytest.mark.parametrize("isa", ISAS)
def test_non_finite_scores_never_enter_the_top_k_or_the_normalizer(isa, queries):
    """A memory-mapped gallery is not scanned for NaN at open: such rows count for nothing."""
    _need(isa)
    queries, gallery = _data(n=200, d=16, q=queries, seed=12)
    bad = gallery.copy()
    bad[95] = np.nan  # the last row of the first block of 96
    g = Gallery([Shard(bad, None, None, None)], 16, "fp32")
    scores, indices, lse = topk_cpu(queries, g, 5, isa=isa, logsumexp=True)
    kept = np.delete(np.arange(200), 95)
    full = queries.astype(np.float64) @ gallery[kept].T.astype(np.float64)
    expected = np.log(np.exp(full - full.max(1, keepdims=True)).sum(1)) + full.max(1)
    assert not (indices == 95).any() and np.allclose(lse, expected, atol=1e-4)
    assert same_topk(scores, indices, topk_reference(queries, gallery[kept], 5)[0], queries, gallery, atol=1e-4)


def test_a_forked_child_runs_the_threaded_kernel():
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    queries, gallery = _data(n=100000, d=64, q=4, seed=13)  # enough work for two threads (MIN_TASK_MACS)
    g = Gallery.from_array(gallery)
    expected = topk_similarity(queries, g, 3, threads=2)[1]  # the parent's pool now exists
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the same call must finish (the inherited pool has no threads)
        ok = np.array_equal(topk_similarity(queries, g, 3, threads=2)[1], expected)
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], 30)
    answer = os.read(read, 1) if ready else b""
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert answer == b"1", "the forked child hung or answered wrongly"


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel's dispatcher must see them (Linux: /proc/cpuinfo)."""
    try:
        text = open("/proc/cpuinfo", encoding="ascii", errors="replace").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo to check the dispatcher against")
    line = next((row for row in text.splitlines() if row.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def test_the_best_path_this_cpu_has_is_the_default_and_others_can_be_forced(monkeypatch):
    flags = _cpu_flags()
    expected = ("avx512" if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "f16c"} <= flags
                else "avx2" if {"avx2", "fma", "f16c"} <= flags else "portable")
    assert kernel_isa() == expected and available_isas()[-1] == expected
    assert available_isas() == ISAS[: ISAS.index(expected) + 1]
    monkeypatch.delenv("CLIPFOLD_TOPK_ISA", raising=False)
    assert resolve_isa() == expected
    monkeypatch.setenv("CLIPFOLD_TOPK_ISA", "portable")  # what the benchmarks use to force a path
    assert resolve_isa() == "portable" and resolve_isa(expected) == expected  # an argument beats the variable
    queries, gallery = _data(n=500, d=24, q=3, seed=14)
    ref_scores, _ = topk_reference(queries, gallery, 4)
    assert same_topk(*topk_similarity(queries, gallery, 4), ref_scores, queries, gallery, atol=1e-4)
    monkeypatch.setenv("CLIPFOLD_TOPK_ISA", "avx9")
    with pytest.raises(errors.ConfigError, match=r"unknown top-k kernel path 'avx9'; expected one of"):
        topk_similarity(queries, gallery, 4)
    missing = [isa for isa in ISAS if isa not in available_isas()]
    if missing:  # e.g. avx512 on an AVX2-only CPU: refused by name, never emulated
        with pytest.raises(errors.ConfigError, match=f"this CPU cannot run the {missing[0]} top-k path"):
            topk_cpu(queries, Gallery.from_array(gallery), 4, isa=missing[0])


@pytest.mark.parametrize("isa", ISAS)
def test_each_path_on_a_large_unaligned_gallery_with_many_blocks(isa):
    """Every path over thousands of rows (many 96-row blocks, prefetches running past a range's
    end), a gallery that starts 16 bytes into a cache line (as numpy's large arrays do), 1, 4, 16
    and 40 queries, two threads, int8 scales: the answer is the oracle's."""
    _need(isa)
    rng = np.random.default_rng(15)
    buffer = np.empty(4099 * 64 + 4, np.float32)
    gallery = buffer[4:].reshape(4099, 64)  # 16 bytes past the buffer's start
    gallery[:] = rng.standard_normal(gallery.shape)
    for storage in ("fp32", "int8"):
        g = Gallery.from_array(gallery, storage=storage)
        exact = _stored(gallery, storage)
        for nq in (1, 4, 16, 40):
            queries = rng.standard_normal((nq, 64)).astype(np.float32)
            scores, indices = topk_cpu(queries, g, 12, threads=2, block_rows=1500, isa=isa)
            assert same_topk(scores, indices, topk_reference(queries, exact, 12)[0], queries, exact, atol=1e-3), \
                (storage, nq)


def test_the_portable_only_build_a_non_x86_cpu_gets(tmp_path, monkeypatch):
    """Built with -DCLIPFOLD_NO_SIMD (no x86 path compiled in, as on ARM), the kernel still builds,
    says it runs the portable loops only, and answers like the oracle (packed sizes included)."""
    import ctypes
    import shutil
    import subprocess
    from pathlib import Path

    import clipfold.kernels.topk.launcher as cpu

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler on PATH")
    source = Path(cpu.__file__).with_name("_topk.c")
    built = subprocess.run([compiler, "-O1", "-shared", "-fPIC", "-DCLIPFOLD_NO_SIMD", "-o", str(tmp_path / "t.so"),
                            str(source), "-lm"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    lib = ctypes.CDLL(str(tmp_path / "t.so"))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.clipfold_topk.argtypes = [pointer, size, size, pointer, ctypes.c_int, pointer, size, size, size,
                                  pointer, pointer, pointer, ctypes.c_int]
    lib.clipfold_topk_isa.restype = ctypes.c_int
    monkeypatch.setattr(cpu, "_library", lambda: lib)
    monkeypatch.delenv("CLIPFOLD_TOPK_ISA", raising=False)
    assert cpu.kernel_isa() == "portable" and cpu.available_isas() == ("portable",)
    queries, gallery = _data(n=999, d=40, q=70, seed=16)
    for nq in (1, 3, 70):
        scores, indices = topk_cpu(queries[:nq], Gallery.from_array(gallery), 5)
        assert same_topk(scores, indices, topk_reference(queries[:nq], gallery, 5)[0], queries[:nq], gallery, atol=1e-4)
    with pytest.raises(errors.ConfigError, match="this CPU cannot run the avx2 top-k path"):
        topk_cpu(queries, Gallery.from_array(gallery), 5, isa="avx2")
