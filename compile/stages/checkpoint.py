"""The one checkpoint reader: every file clipfold is handed as weights goes through :func:`read_checkpoint`.

No byte of a checkpoint is ever executed. A checkpoint is one of the formats torch can save or
that open_clip reads, told apart by their first bytes, not by the file name:

* **safetensors** (an 8-byte header length, then a JSON header): read by ``safetensors``, which
  holds only tensors;
* **zip** (``torch.save`` since 1.6), **legacy tar** (torch < 0.4) and **raw pickle** (legacy
  ``torch.save`` and ``pickle.dump``): ``torch.load(weights_only=True)``, torch's allow-list
  unpickler. Full training checkpoints that it refuses (Dassl pickles its optimizer and the
  warm-up scheduler's successor *object*) are read once more with :class:`TensorsOnlyUnpickler`,
  which torch is handed as both its ``Unpickler`` and its ``load`` (the legacy format reads its
  magic number, protocol and storage keys through ``load``: the real ``pickle.load`` there would
  run a payload before anything else is checked). Legacy tar is not read that second way:
  ``torch.load`` extracts its members to disk.

The result must be a tensor or a dict (of tensors, nested dicts and plain values); anything
else is refused naming the type found.
"""

from __future__ import annotations

import collections
import pickle
import struct
import types
from pathlib import Path
from typing import Any

import torch

from clipfold.errors import CheckpointError

ZIP_MAGIC = b"PK\x03\x04"
TAR_MAGIC_OFFSET, TAR_MAGIC = 257, b"ustar"
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit on the JSON header


class _Opaque:
    """Stands in for every object of a checkpoint that is not a tensor or a container: it accepts
    whatever pickle's REDUCE, NEWOBJ, BUILD, APPENDS or SETITEMS hand it and runs nothing."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class TensorsOnlyUnpickler(pickle.Unpickler):
    """Python's "restricting globals" recipe: tensors, parameters, sizes, dtypes and OrderedDicts
    are rebuilt; any other global becomes the inert :class:`_Opaque`. Nothing else is imported."""

    _ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch", "Size"): torch.Size,
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _Opaque


def _restricted_load(file, **kwargs):
    return TensorsOnlyUnpickler(file, **kwargs).load()


# What torch.load is handed as ``pickle_module``: both ways it unpickles are the restricted one.
_TENSORS_ONLY = types.SimpleNamespace(Unpickler=TensorsOnlyUnpickler, load=_restricted_load,
                                      __name__="clipfold_tensors_only_pickle")


def checkpoint_format(path: Path) -> str:
    """``safetensors``, ``zip``, ``tar`` or ``pickle`` (anything else), from the file's first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(TAR_MAGIC_OFFSET + len(TAR_MAGIC))
    if head[:4] == ZIP_MAGIC:
        return "zip"
    if head[TAR_MAGIC_OFFSET:] == TAR_MAGIC:
        return "tar"
    if len(head) >= 9:
        (size,) = struct.unpack("<Q", head[:8])
        if 2 <= size <= MAX_SAFETENSORS_HEADER and head[8:9] == b"{":
            return "safetensors"
    return "pickle"


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _read(path: Path, kind: str) -> Any:
    if kind == "safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Weights only load failed" not in str(exc):
            raise
    return torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_TENSORS_ONLY)


def read_checkpoint(path: str | Path) -> Any:
    """A checkpoint's tensors and containers (see the module docstring); a :class:`CheckpointError`
    naming the file for a missing, empty, unreadable or non-tensor file. Never runs its code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    kind = checkpoint_format(path)
    if kind == "tar":
        raise CheckpointError(f"checkpoint {path} is in torch's legacy tar format (torch < 0.4), which clipfold does "
                              "not read (torch would extract it to disk); re-save it with a current torch.save")
    try:
        obj = _read(path, kind)
    except (Exception, RecursionError) as exc:  # pickle, zip, tar and safetensors errors have many types
        raise CheckpointError(f"cannot read checkpoint {path} ({kind}): {type(exc).__name__}: {_first_line(exc)}; "
                              "expected a safetensors file or tensors torch.load reads with weights_only=True") from None
    if not isinstance(obj, (dict, torch.Tensor)):
        raise CheckpointError(f"checkpoint {path} ({kind}) holds a {type(obj).__name__}; expected a tensor or a "
                              "dict of tensors")
    return obj

