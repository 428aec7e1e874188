"""Every file and folder name a bundle holds, and the names beside it while it is written or replaced.

compile writes these names and the runtime opens them; both take them from here. A bundle folder::

    manifest.json                   MANIFEST_NAME: the schema (runtime/bundle/schema.py), written last
    model.onnx                      ONNX_FILE: the fp32 variant (the head folded in, or the embedding alone)
    model.<precision>.onnx          variant_file(): a reduced-precision variant
    model.<...>.<tag>.<sha>.plan    engine_files(): a TensorRT plan of a variant and its timing cache
    native/                         NATIVE_DIR: the fp32-native variant (VIT_FILES; NATIVE_HEAD_FILE when the
                                    head is in the graphs)
    head/                           KERNEL_HEAD_DIR: a head scored by the top-k kernel (a kernels Gallery
                                    folder, GALLERY_FILE; rows of row_width(dim) floats)
    heads/<name>-<sha>.onnx         extra_head_file(): a head added by ``clipfold head add``
    text.onnx, tokenizer.json       TEXT_FILE, TOKENIZER_FILE: the text tower (text_variant_file(): reduced)
    profiles.json                   PROFILES_FILE: measured latencies per CPU (not in the manifest's files)

Beside a bundle ``NAME``: ``.NAME.partial-PID`` (partial_dir: a bundle being written) and
``.NAME.old-PID`` (old_dir: the previous bundle moved aside while it is replaced).
"""

from __future__ import annotations

from pathlib import Path

MANIFEST_NAME = "manifest.json"
ONNX_FILE = "model.onnx"  # the fp32 variant
PORTABLE_FILE = "model.portable.onnx"  # standard operators only, while compiling: fp8 starts from it, then it goes
NATIVE_DIR = "native"  # the fp32-native variant's folder (format clipfold-vit)
NATIVE_HEAD_FILE = "head.onnx"  # in NATIVE_DIR: the head alone (embedding -> scores, indices)
VIT_FILES = ("vit.json", "vit.bin")  # in NATIVE_DIR: the kernels.vit folder (kernels/vit/tower.py CONFIG_FILE,
# WEIGHTS_FILE; a test checks they agree: the contract cannot import the kernels)
KERNEL_HEAD_DIR = "head"  # a head scored by the top-k kernel (HeadInfo.kernel)
GALLERY_FILE = "gallery.json"  # a kernels Gallery folder's index (kernels/topk/gallery.py MANIFEST)
ROW_FLOATS = 16  # kernel head rows are padded to 64 bytes
HEADS_DIR = "heads"  # extra heads
TEXT_FILE = "text.onnx"
TOKENIZER_FILE = "tokenizer.json"
PROFILES_FILE = "profiles.json"


def variant_file(precision: str) -> str:
    """The graph of a reduced-precision variant."""
    return f"model.{precision}.onnx"


def text_variant_file(precision: str) -> str:
    """The text graph of a reduced-precision variant."""
    return f"text.{precision}.onnx"


def native_files(folder: str, with_head: bool) -> tuple[str, ...]:
    """The files of a clipfold-vit variant folder: the tower's, and the head graph unless the top-k
    kernel scores the head."""
    return (*(f"{folder}/{name}" for name in VIT_FILES), *((f"{folder}/{NATIVE_HEAD_FILE}",) if with_head else ()))


def extra_head_file(name: str, sha256: str) -> str:
    """An added head's graph, named by its content so a replaced head never overwrites a committed one."""
    return f"{HEADS_DIR}/{name}-{sha256[:12]}.onnx"


def engine_files(variant_file: str, tag: str, plan_sha256: str, cache_sha256: str) -> tuple[str, str]:
    """(plan, timing cache) of a TensorRT engine built from ``variant_file`` on the GPU/TensorRT ``tag``."""
    stem = Path(variant_file).stem
    return f"{stem}.{tag}.{plan_sha256[:12]}.plan", f"{stem}.{tag}.{cache_sha256[:12]}.timing-cache"


def row_width(dim: int) -> int:
    """Floats per kernel head row for ``dim``-dim embeddings: the weights, the bias, zeros to ROW_FLOATS."""
    return -(-(dim + 1) // ROW_FLOATS) * ROW_FLOATS


def partial_dir(target: Path, pid: int | str) -> Path:
    """Where process ``pid`` writes the bundle that will become ``target``."""
    return target.parent / f".{target.name}.partial-{pid}"


def old_dir(target: Path, pid: int | str) -> Path:
    """Where process ``pid`` moves the bundle at ``target`` aside while replacing it."""
    return target.parent / f".{target.name}.old-{pid}"


def pid_of(path: Path) -> int | None:
    """The process id a partial_dir or old_dir name ends with (None if it is not a number)."""
    pid = path.name.rsplit("-", 1)[-1]
    return int(pid) if pid.isdigit() else None
