"""Large towers compile within this machine's memory (issue 24, item 6); slow, run by ``make test-families``.

ViT-L-14 with ``--precision int8-dynamic,int8-static --text`` (random weights) must peak under 8 GiB
resident: on e4645d0 its int8 sensitivity ranking held every activation of 32 images in two graphs
and was killed above 20 GiB. The peak is the compiling process's own ``ru_maxrss``, read in a fresh
interpreter so that nothing this test session loaded counts. Figures measured on the Xeon are in
benchmarks/results/memory_large_models.json.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

LIMIT_GIB = 8.0
LABELS = "cat,dog,car,tree,sky,house,boat,bird,flower,chair"

_PEAK = """
import json, resource, sys
from clipfold.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def peak_of_compile(*args) -> tuple[int, float, str]:
    """(exit code, peak resident GiB, stderr) of ``clipfold compile ARGS`` in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", _PEAK, "compile", *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["code"], result["peak_gib"], done.stderr


@pytest.mark.slow
def test_vit_l_14_with_int8_variants_and_text_peaks_under_8_gib(tmp_path):
    out = tmp_path / "l14.bundle"
    # 32 gate images (and so 32 search images, the ranking's own count): the peak does not grow with them.
    # Random weights score ten labels nearly alike, so int8 flips 1-2 of 32 top-1 picks (93.75 % measured):
    # the top-1 limit is lowered to 0.9 (the cosine limit stays); this test is about memory.
    code, peak, log = peak_of_compile("--model", "ViT-L-14", "--labels", LABELS, "--out", out, "--text",
                                      "--precision", "int8-dynamic,int8-static", "--gate-images", 32,
                                      "--gate-min-top1", 0.9)
    assert code == 0, log[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {v["name"] for v in manifest["variants"]} >= {"fp32", "int8-dynamic", "int8-static"}
    assert peak < LIMIT_GIB, f"ViT-L-14 int8 + text compile peaked at {peak:.2f} GiB (limit {LIMIT_GIB})"
