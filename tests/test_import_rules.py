"""The direction of imports, read from the source (every ``import`` at any depth, function-level ones
included, parsed with ``ast``; no module is imported to check it):

- runtime/ needs no torch: it never imports torch, torchvision, open_clip, timm, onnx, onnxscript or
  safetensors, not even inside a function; and of clipfold it imports only runtime/, kernels/,
  ``clipfold.errors`` and ``clipfold.__version__`` (never compile/, nor the lazy API names of
  ``clipfold`` that load compile/). ``tests/test_layout.py`` also imports every runtime module with
  torch blocked, which this cannot replace: it sees what the imports do, this sees the imports.
- kernels/ imports neither runtime/ nor compile/ (of clipfold: kernels/ and ``clipfold.errors``).
- nothing but ``clipfold/`` (the API and the CLI) and compile/ itself imports compile/ (tests and
  benchmarks may).
- the bundle contract (runtime/bundle/: what a bundle is, its files, and how they are read, written
  and replaced) imports only itself, ``clipfold.errors``, numpy and
  the standard library: compile/ and runtime/ read and write bundles through it, and it knows neither.
- serve and retrieval are leaves: no other runtime/, compile/ or kernels/ module imports runtime/serve/
  (the server, its HTTP/gRPC/web faces and their helpers) or runtime/retrieval/ (the index); they
  import each other, and the CLI imports them.
- the backends form no circle: runtime/backends/base.py (the protocol) imports no backend and no registry;
  no backend imports runtime/backends/registry.py; each registry entry names a module that defines its
  class as a ``Backend`` subclass; and runtime/ outside serve and retrieval, with the registry's
  lazy entries counted as imports, has no import cycle.

Each rule is a function returning its violations; ``test_every_rule_catches_a_forbidden_import``
adds one forbidden import per rule to the parsed tree and checks the rule reports it, so a rule that
cannot fail fails there.
"""

from __future__ import annotations

import ast
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"clipfold": "clipfold", "compile": "clipfold.compile", "runtime": "clipfold.runtime",
           "kernels": "clipfold.kernels"}  # source folder -> package (pyproject's package-dir)
HEAVY = ("torch", "torchvision", "open_clip", "timm", "onnx", "onnxscript", "safetensors")
CONTRACT_PACKAGE = "clipfold.runtime.bundle"
LEAF_PACKAGES = ("clipfold.runtime.serve", "clipfold.runtime.retrieval")
BACKEND_BASE = "clipfold.runtime.backends.base"
REGISTRY = "clipfold.runtime.backends.registry"


def module_name(path: Path) -> tuple[str, bool]:
    """(dotted name, is a package) of a source file under one of FOLDERS."""
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts[1:])
    package = parts[-1:] == ["__init__"]
    if package:
        parts = parts[:-1]
    return ".".join([FOLDERS[rel.parts[0]], *parts]), package


def imports_of(source: str, module: str, package: bool) -> set[str]:
    """Every module a source imports, absolute, anywhere in it (functions and branches too).
    ``from a import b`` yields ``a`` and ``a.b`` (b may be a module or a name in a); a call
    ``importlib.import_module("x")`` with a literal name counts as an import of x."""
    here = module if package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[:len(here.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            found.add(origin)
            found.update(f"{origin}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in
              ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and not node.args[0].value.startswith(".")):
            found.add(node.args[0].value)
    return found


@lru_cache(maxsize=1)
def source_tree() -> dict[str, tuple[str, ...]]:
    """module -> the modules it imports, for every source file of clipfold/, compile/, runtime/, kernels/."""
    tree = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            name, package = module_name(path)
            tree[name] = tuple(sorted(imports_of(path.read_text(encoding="utf-8"), name, package)))
    return tree


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _folder(name: str) -> str:
    for folder, package in sorted(FOLDERS.items(), key=lambda kv: -len(kv[1])):
        if _in(name, package):
            return folder
    raise AssertionError(name)


def _is_leaf(name: str) -> bool:
    return any(_in(name, p) for p in LEAF_PACKAGES)


def contract_modules(tree) -> list[str]:
    return sorted(n for n in tree if _in(n, CONTRACT_PACKAGE))


def _clipfold_allowed(imported: str, own: tuple[str, ...]) -> bool:
    return imported in ("clipfold", "clipfold.__version__") or _in(imported, "clipfold.errors") or any(
        _in(imported, p) for p in own)


def runtime_violations(tree) -> list[str]:
    bad = []
    for name, imported in tree.items():
        if _folder(name) != "runtime":
            continue
        for i in imported:
            if i.split(".")[0] in HEAVY:
                bad.append(f"{name} imports {i} (runtime needs no torch)")
            elif _in(i, "clipfold") and not _clipfold_allowed(i, ("clipfold.runtime", "clipfold.kernels")):
                bad.append(f"{name} imports {i} (runtime imports only runtime, kernels and clipfold.errors)")
    return bad


def kernels_violations(tree) -> list[str]:
    return [f"{name} imports {i} (kernels import neither runtime nor compile)"
            for name, imported in tree.items() if _folder(name) == "kernels"
            for i in imported if _in(i, "clipfold") and not _clipfold_allowed(i, ("clipfold.kernels",))]


def compile_importer_violations(tree) -> list[str]:
    return [f"{name} imports {i} (only clipfold/ and compile/ import compile)"
            for name, imported in tree.items() if _folder(name) not in ("clipfold", "compile")
            for i in imported if _in(i, "clipfold.compile")]


def contract_violations(tree) -> list[str]:
    bad = []
    for name in contract_modules(tree):
        for i in tree[name]:
            top = i.split(".")[0]
            if _in(i, "clipfold"):
                if not (_in(i, CONTRACT_PACKAGE) or _in(i, "clipfold.errors")):
                    bad.append(f"{name} imports {i} (the bundle contract imports only itself and clipfold.errors)")
            elif top not in sys.stdlib_module_names and top != "numpy":
                bad.append(f"{name} imports {i} (the bundle contract needs numpy and the standard library only)")
    return bad


def leaf_violations(tree) -> list[str]:
    return [f"{name} imports {i} (serve and retrieval are leaves: only they and the CLI import them)"
            for name, imported in tree.items() if _folder(name) in ("runtime", "compile", "kernels")
            and not _is_leaf(name) for i in imported if _is_leaf(i)]


def registry_entries() -> dict[str, tuple[str, str]]:
    from clipfold.runtime.backends.registry import BACKENDS

    return {name: (f"clipfold.runtime.backends.{module}", cls) for name, (module, cls) in BACKENDS.items()}


def backend_violations(tree, entries: dict[str, tuple[str, str]]) -> list[str]:
    bad = []
    modules = {module for module, _ in entries.values()}
    for i in tree[BACKEND_BASE]:
        if _in(i, "clipfold.runtime") and not _in(i, "clipfold.runtime.bundle.schema"):
            bad.append(f"{BACKEND_BASE} imports {i} (the protocol imports no backend and no registry)")
    for name in sorted(modules | {BACKEND_BASE}):
        if any(_in(i, REGISTRY) for i in tree[name]):
            bad.append(f"{name} imports the registry {REGISTRY} (a circle)")
    for backend, (module, cls) in entries.items():
        path = ROOT / "runtime" / Path(*module.split(".")[2:]).with_suffix(".py")
        classes = {n.name: [ast.unparse(b) for b in n.bases] for n in ast.walk(ast.parse(path.read_text()))
                   if isinstance(n, ast.ClassDef)} if path.is_file() else {}
        if "Backend" not in classes.get(cls, ()):
            bad.append(f"registry entry {backend!r}: {module} defines no class {cls}(Backend)")
    # runtime outside serve and retrieval, the registry's lazy entries counted as imports: no cycle
    core = {n for n in tree if _folder(n) == "runtime" and not _is_leaf(n) and n != "clipfold.runtime"}
    edges = {n: {m for i in tree[n] for m in core if m != n and _in(i, m)} for n in core}
    edges[REGISTRY] |= modules & core
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                bad.append("import cycle: " + " -> ".join(path[path.index(m):] + [n, m]) if m in path
                           else f"import cycle through {n} -> {m}")
            elif m not in state:
                visit(m, path + [n])
        state[n] = 2

    for n in sorted(core):
        if n not in state:
            visit(n, [])
    return bad


def test_the_source_tree_is_what_the_rules_name():
    tree = source_tree()
    assert {"clipfold.runtime.bundle.schema", "clipfold.runtime.bundle.files", "clipfold.runtime.bundle.write"} <= \
        set(contract_modules(tree))
    for name in (BACKEND_BASE, REGISTRY, "clipfold.runtime.engine", "clipfold.runtime.serve.app",
                 "clipfold.runtime.retrieval.index", "clipfold.kernels.topk.launcher", "clipfold.compile.pipeline", "clipfold.cli"):
        assert name in tree, f"{name} is gone: update tests/test_import_rules.py to the new layout"
    assert "clipfold.runtime.backends.base" in tree["clipfold.runtime.engine"]  # function-level imports are seen too:
    assert "clipfold.runtime.backends.openvino" in tree["clipfold.runtime.variant_choice"]  # (this one is)


def test_runtime_needs_no_torch_and_imports_only_runtime_and_kernels():
    assert runtime_violations(source_tree()) == []


def test_kernels_import_neither_runtime_nor_compile():
    assert kernels_violations(source_tree()) == []


def test_only_the_api_and_cli_import_compile():
    assert compile_importer_violations(source_tree()) == []


def test_the_bundle_contract_imports_only_itself():
    assert contract_violations(source_tree()) == []


def test_serve_and_retrieval_are_leaves():
    assert leaf_violations(source_tree()) == []


def test_the_backends_form_no_circle():
    entries = registry_entries()
    assert {"onnxruntime", "native", "openvino", "tensorrt", "onnxruntime-cuda"} <= set(entries)
    assert backend_violations(source_tree(), entries) == []


FORBIDDEN = {  # rule -> (module, a source line it must not hold)
    "runtime torch": ("clipfold.runtime.engine", "def f():\n    import torch.nn\n"),
    "runtime compile": ("clipfold.runtime.preprocess", "from clipfold.compile.stages.load import load_model\n"),
    "runtime lazy api": ("clipfold.runtime.text_encoder", "def f():\n    from clipfold import compile_bundle\n"),
    "kernels runtime": ("clipfold.kernels.vit.tower", "from clipfold.runtime.bundle.schema import Manifest\n"),
    "kernels compile": ("clipfold.kernels.topk.launcher", "import clipfold.compile.heads.zero_shot\n"),
    "contract runtime": ("clipfold.runtime.bundle.schema", "from clipfold.runtime.engine import Engine\n"),
    "contract compile": ("clipfold.runtime.bundle.files", "from clipfold.compile import fold\n"),
    "contract heavy": ("clipfold.runtime.bundle.swap", "import onnxruntime\n"),
    "leaf": ("clipfold.runtime.engine", "def f():\n    from .serve.app import serve\n"),
    "leaf from compile": ("clipfold.compile.pipeline", "from clipfold.runtime.retrieval.index import Index\n"),
    "protocol imports a backend": (BACKEND_BASE, "def f():\n    from .native import NativeBackend\n"),
    "backend imports the registry": ("clipfold.runtime.backends.native", "from .registry import open_backend\n"),
    "core cycle": ("clipfold.runtime.bundle.schema", "def f():\n    import importlib\n    importlib.import_module("
                   "'clipfold.runtime.engine')\n"),
}
RULES = {
    "runtime": runtime_violations, "kernels": kernels_violations, "compile": compile_importer_violations,
    "contract": contract_violations, "leaf": leaf_violations,
    "backends": lambda tree: backend_violations(tree, registry_entries()),
}
CAUGHT_BY = {"runtime torch": "runtime", "runtime compile": "runtime", "runtime lazy api": "runtime",
             "kernels runtime": "kernels", "kernels compile": "compile", "contract runtime": "contract",
             "contract compile": "contract", "contract heavy": "contract", "leaf": "leaf",
             "leaf from compile": "leaf", "protocol imports a backend": "backends",
             "backend imports the registry": "backends", "core cycle": "backends"}


@pytest.mark.parametrize("case", sorted(FORBIDDEN))
def test_every_rule_catches_a_forbidden_import(case):
    module, line = FORBIDDEN[case]
    tree = dict(source_tree())
    package = module in ("clipfold.runtime", "clipfold.kernels", "clipfold.compile")
    tree[module] = tuple(sorted(set(tree[module]) | imports_of(line, module, package)))
    rule = RULES[CAUGHT_BY[case]]
    assert rule(source_tree()) == []
    assert rule(tree), f"{CAUGHT_BY[case]} rule misses: {module} with {line!r}"


def test_a_registry_entry_without_its_class_is_reported():
    entries = {**registry_entries(), "ghost": ("clipfold.runtime.backends.native", "GhostBackend")}
    assert any("ghost" in v for v in backend_violations(source_tree(), entries))
