"""runtime/bundle/layout.py is the one home of every name a bundle holds (issue 21): compile and the
runtime take the names from it, and no other source file spells one."""

from __future__ import annotations

import ast
from pathlib import Path

from clipfold.kernels.topk import gallery
from clipfold.kernels.vit import tower
from clipfold.runtime.bundle import layout
from clipfold.runtime.bundle.schema import Manifest

ROOT = Path(__file__).resolve().parents[1]
# Literals that name a file or folder inside (or beside) a bundle. "tokenizer.json" is also the name
# of a Hugging Face snapshot's file (compile/stages/tokenizer.py reads it from there), and a Triton
# model repository (compile/triton_server/) has its own layout ("model.onnx", "model.plan").
BUNDLE_NAMES = {layout.MANIFEST_NAME, layout.ONNX_FILE, layout.PORTABLE_FILE, layout.NATIVE_HEAD_FILE,
                layout.TEXT_FILE, layout.PROFILES_FILE, "heads/", ".timing-cache", ".partial-", ".old-"}
ALLOWED = ("runtime/bundle/layout.py", "compile/triton_server/")


def _spelled(path: Path) -> set[str]:
    """The bundle names among a source file's string literals (docstrings excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            found |= {name for name in BUNDLE_NAMES if name in node.value}
    return found


def test_no_source_file_but_layout_spells_a_bundle_file_name():
    spelled = {}
    for folder in ("compile", "runtime", "clipfold"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if not rel.startswith(ALLOWED) and (names := _spelled(path)):
                spelled[rel] = sorted(names)
    assert spelled == {}, f"bundle names spelled outside runtime/bundle/layout.py: {spelled}"


def test_the_check_sees_a_spelled_name(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('"""model.onnx in a docstring is fine."""\nFILE = "model.onnx"\n')
    assert _spelled(source) == {"model.onnx"}


def test_layout_names_the_kernels_folder_formats():
    # The contract cannot import the kernels; these are the names the kernels read and write.
    assert layout.VIT_FILES == (tower.CONFIG_FILE, tower.WEIGHTS_FILE)
    assert layout.GALLERY_FILE == gallery.MANIFEST


def test_kernel_head_rows_hold_weights_bias_and_padding_to_64_bytes():
    for dim, width in ((1, 16), (15, 16), (16, 32), (512, 528), (768, 784)):
        assert layout.row_width(dim) == width  # dim weights + 1 bias, rounded up to 16 floats
        assert layout.row_width(dim) * 4 % 64 == 0


def test_generated_names():
    assert layout.variant_file("int8-dynamic") == "model.int8-dynamic.onnx"
    assert layout.text_variant_file("fp16") == "text.fp16.onnx"
    assert layout.native_files("native", with_head=True) == ("native/vit.json", "native/vit.bin", "native/head.onnx")
    assert layout.native_files("native", with_head=False) == ("native/vit.json", "native/vit.bin")
    digest = "ab" * 32
    assert layout.extra_head_file("pets", digest) == "heads/pets-abababababab.onnx"
    assert layout.engine_files("model.fp16.onnx", "sm90-trt10", digest, "cd" * 32) == (
        "model.fp16.sm90-trt10.abababababab.plan", "model.fp16.sm90-trt10.cdcdcdcdcdcd.timing-cache")
    target = Path("/x/b.bundle")
    assert layout.partial_dir(target, 7) == Path("/x/.b.bundle.partial-7")
    assert layout.old_dir(target, 7) == Path("/x/.b.bundle.old-7")
    assert layout.pid_of(layout.old_dir(target, 7)) == 7 and layout.pid_of(Path("/x/.b.bundle.old-x")) is None


def test_a_compiled_bundle_holds_the_layout_names(tiny_bundle):
    path = tiny_bundle.path
    manifest = Manifest.read(path)
    assert (path / layout.MANIFEST_NAME).is_file()
    assert manifest.variant("fp32").file == layout.ONNX_FILE
    for v in manifest.variants:
        if v.format == "onnx" and v.name != "fp32":
            assert v.file == layout.variant_file(v.precision)
