"""The shape of the code, read from the source (imports parsed with ``ast`` as in test_import_rules):

- compile/ has no import cycle, function-level imports counted (``profiling/run.py`` and
  ``profiling/rows.py`` once imported each other);
- every module of clipfold/, compile/, runtime/, kernels/ and benchmarks/ is at most 400 lines and
  every function at most 60 (issue 21: one idea per module, small named steps);
- the calibration / search / gate image sets are reached through their one home,
  compile/precision/image_sets.py, not through the gate module that once held them.
"""

from __future__ import annotations

import ast

from tests.test_import_rules import ROOT, _in, source_tree

SOURCE_FOLDERS = ("clipfold", "compile", "runtime", "kernels", "benchmarks")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def cycles(tree: dict[str, tuple[str, ...]], package: str) -> list[list[str]]:
    """Every strongly connected set of two or more modules of ``package`` (Tarjan's algorithm);
    importing a package that contains the importer does not count (it is the importer's own parent)."""
    nodes = sorted(n for n in tree if _in(n, package) and n != package)
    edges = {n: sorted({m for i in tree[n] for m in nodes if m != n and _in(i, m) and not _in(n, m)}) for n in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                found.append(sorted(component))

    for n in nodes:
        if n not in index:
            visit(n)
    return found


def test_compile_has_no_import_cycle():
    assert cycles(source_tree(), "clipfold.compile") == []


def test_the_cycle_check_finds_a_lazy_circle():
    tree = dict(source_tree())
    rows, run = "clipfold.compile.profiling.rows", "clipfold.compile.profiling.run"
    tree[rows] = tree[rows] + (f"{run}.eager_name",)  # the function-level import rows.py once had
    assert [rows, run] in cycles(tree, "clipfold.compile")


def _too_long(path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    long = [f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines"] if len(text.splitlines()) > MAX_MODULE_LINES else []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(ROOT)}: {node.name} is {lines} lines")
    return long


def test_every_module_is_small_and_every_function_short():
    paths = [p for folder in SOURCE_FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(paths) >= 100
    assert [problem for path in paths for problem in _too_long(path)] == []


def test_the_size_check_reports_a_long_function(tmp_path, monkeypatch):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    long = tmp_path / "long.py"
    long.write_text(f"def f():\n{body}")
    monkeypatch.setattr("tests.test_code_shape.ROOT", tmp_path)
    assert _too_long(long) == ["long.py: f is 61 lines"]


def _through_the_gate(path, image_set_names: set[str]) -> list[str]:
    """Image-set names a source imports from the gate module or reads as attributes of it."""
    gate = "clipfold.compile.precision.gate"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names if alias.name == gate}
    found = [f"{path.relative_to(ROOT)}: from gate import {alias.name}" for node in ast.walk(tree)
             if isinstance(node, ast.ImportFrom) and node.module == gate
             for alias in node.names if alias.name in image_set_names]
    found += [f"{path.relative_to(ROOT)}: {ast.unparse(node)}" for node in ast.walk(tree)
              if isinstance(node, ast.Attribute) and node.attr in image_set_names
              and ast.unparse(node.value) in aliases | {gate}]
    return found


def test_the_image_sets_are_reached_through_their_home():
    home = ast.parse((ROOT / "compile" / "precision" / "image_sets.py").read_text(encoding="utf-8"))
    names = {n.name for n in home.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")}
    assert {"held_out_images", "selection_images", "calibration_images", "HeldOut"} <= names
    paths = [p for folder in ("compile", "tests", "benchmarks") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert [hit for path in paths for hit in _through_the_gate(path, names)] == []
