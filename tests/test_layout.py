"""Packaging: the sub-packages resolve from their top-level folders; the runtime needs no torch."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import clipfold

ROOT = Path(__file__).resolve().parents[1]

# A meta-path entry that makes any import of torch (or friends) fail, as on a runtime-only install.
BLOCK_TORCH = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in ('torch', 'torchvision', 'open_clip', 'timm', 'onnx', 'onnxscript'):
                raise ImportError(f'{name} is blocked in this test')
    sys.meta_path.insert(0, _Block())
""")


def test_subpackages_resolve_to_top_level_folders():
    for sub, folder in (("compile", "compile"), ("runtime", "runtime"), ("kernels", "kernels")):
        module = importlib.import_module(f"clipfold.{sub}")
        assert Path(module.__file__).resolve().parent == ROOT / folder
    assert Path(clipfold.__file__).resolve().parent == ROOT / "clipfold"


def test_every_runtime_module_imports_without_torch():
    import clipfold.runtime as runtime

    names = [m.name for m in pkgutil.walk_packages(runtime.__path__, "clipfold.runtime.")]
    assert {"clipfold.runtime.engine", "clipfold.runtime.bundle.schema", "clipfold.runtime.serve.app"} <= set(names)
    code = BLOCK_TORCH + textwrap.dedent(f"""
        import importlib, clipfold, clipfold.errors, clipfold.kernels
        for name in {names!r}:
            importlib.import_module(name)
        assert 'torch' not in sys.modules
        print('ok')
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_runtime_classifies_with_torch_blocked(tiny_bundle):
    from clipfold.compile.tiny import data

    sample = data.generate(4, seed=77)
    expected = [s.color + " " + s.shape for s in sample]
    code = BLOCK_TORCH + textwrap.dedent(f"""
        import json
        from clipfold.compile.tiny import data
        from clipfold.runtime import Engine
        engine = Engine.open({str(tiny_bundle.path)!r})
        preds = engine.classify([s.image for s in data.generate(4, seed=77)], k=5)
        emb = engine.embed([s.image for s in data.generate(4, seed=77)])
        assert 'torch' not in sys.modules
        print(json.dumps({{"labels": [[p.label for p in row] for row in preds], "dim": emb.shape[1]}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    import json

    result = json.loads(proc.stdout)
    assert result["dim"] == tiny_bundle.manifest.model.embed_dim
    assert all(len(row) == 5 and set(row) <= set(tiny_bundle.manifest.labels) for row in result["labels"])
    # The trained tiny model's top-5 holds the truth for nearly every image (98% held out).
    hits = sum(truth in row for truth, row in zip(expected, result["labels"]))
    assert hits >= 3, (expected, result["labels"])
