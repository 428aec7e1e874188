"""Tensors of the Open Inference Protocol's gRPC messages <-> numpy, checked. No torch, no grpc.

A ``ModelInferRequest`` carries each input either in ``raw_input_contents`` (one bytes entry per
input, in order: little-endian C-order numbers, or BYTES elements as a 4-byte little-endian
length and the bytes, as over HTTP's binary extension) or in its typed ``contents`` field
(``uint_contents`` for UINT8/16/32, ``bytes_contents`` for BYTES, ...). Every malformed message
is refused here with a :class:`~clipfold.errors.RequestError` naming what was wrong and what was
expected, before anything reaches an engine; the service maps it to INVALID_ARGUMENT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from clipfold.errors import RequestError
from clipfold.runtime.serve.inference_protocol import (
    DATATYPES,
    TensorMeta,
    _bytes_tensor,
    _parse_bytes_tensor,
    datatype_of,
)

# The typed ``InferTensorContents`` field of each datatype (FP16 has none: raw only).
CONTENTS_FIELD = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                  "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
                  "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
                  "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
_ALL_FIELDS = sorted(set(CONTENTS_FIELD.values()))


@dataclass
class GrpcInferRequest:
    id: str
    inputs: dict[str, np.ndarray]
    outputs: list[str]  # requested outputs, in order


def parse_request(request, inputs: Sequence[TensorMeta], outputs: Sequence[TensorMeta],
                  alternatives: Sequence[TensorMeta] = (), max_rows: int | None = None) -> GrpcInferRequest:
    """Decode ``request`` (a ``ModelInferRequest``) against the model's inputs and outputs.

    ``alternatives`` are inputs the model takes instead of all of ``inputs`` (an image model takes
    either ``pixels`` or encoded ``image`` BYTES): the request must give exactly one of the groups.
    A batch over ``max_rows`` is refused from its shape, before its contents are read."""
    wanted = {meta.name: meta for meta in (*inputs, *alternatives)}
    names = sorted(wanted)
    if not request.inputs:
        raise RequestError(f"'inputs' is empty; this model takes {_takes(inputs, alternatives)}")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise RequestError(f"raw_input_contents holds {len(raw)} entries for {len(request.inputs)} inputs; "
                           "give one per input, in order, or none and use each input's typed contents")
    tensors: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name not in wanted:
            raise RequestError(f"unknown input {tensor.name[:100]!r}; this model takes {names}")
        if tensor.name in tensors:
            raise RequestError(f"input {tensor.name!r} is given twice")
        tensors[tensor.name] = _decode(tensor, wanted[tensor.name], raw[i] if raw else None, max_rows)
    given = set(tensors)
    groups = [{m.name for m in inputs}] + ([{m.name for m in alternatives}] if alternatives else [])
    if not any(given == group for group in groups):
        raise RequestError(f"inputs {sorted(given)} given; this model takes {_takes(inputs, alternatives)}")
    rows = {len(v) for v in tensors.values()}
    if len(rows) > 1:
        raise RequestError(f"the inputs disagree on the batch size: {sorted(rows)}")

    known = [meta.name for meta in outputs]
    chosen: list[str] = []
    for i, out in enumerate(request.outputs):
        if out.name not in known:
            raise RequestError(f"unknown output {out.name[:100]!r}; this model gives {sorted(known)}")
        if "classification" in out.parameters:
            raise RequestError("the classification extension is not supported: request 'scores' and 'indices'")
        if out.name in chosen:
            raise RequestError(f"output {out.name!r} is requested twice")
        chosen.append(out.name)
    return GrpcInferRequest(request.id, tensors, chosen or known)


def _takes(inputs: Sequence[TensorMeta], alternatives: Sequence[TensorMeta]) -> str:
    first = " + ".join(f"{m.name} ({m.datatype} {list(m.shape)})" for m in inputs)
    if not alternatives:
        return first
    return first + " or " + " + ".join(f"{m.name} ({m.datatype} {list(m.shape)})" for m in alternatives)


def _decode(tensor, meta: TensorMeta, raw: bytes | None, max_rows: int | None = None) -> np.ndarray:
    name = meta.name
    if tensor.datatype != meta.datatype:
        raise RequestError(f"input {name!r} must have datatype {meta.datatype}, got {tensor.datatype[:40]!r}")
    shape = list(tensor.shape)
    if (len(shape) != len(meta.shape) or any(d < 0 for d in shape)
            or any(want != -1 and got != want for got, want in zip(shape, meta.shape))):
        raise RequestError(f"input {name!r} must have shape {list(meta.shape)} (-1: any size), got {shape}")
    if shape[0] < 1:
        raise RequestError(f"input {name!r} has an empty batch; send at least one row")
    if max_rows is not None and shape[0] > max_rows:
        raise RequestError(f"{shape[0]} rows in one request; this model takes at most {max_rows} (its max_batch_size)")
    count = int(np.prod(shape, dtype=object))
    dtype = DATATYPES[meta.datatype]
    field = CONTENTS_FIELD[meta.datatype]
    typed = {f: len(getattr(tensor.contents, f)) for f in _ALL_FIELDS if len(getattr(tensor.contents, f))}
    if raw is not None:
        if typed:
            raise RequestError(f"input {name!r} gives both raw_input_contents and typed contents ({sorted(typed)})")
        if meta.datatype == "BYTES":
            return _parse_bytes_tensor(raw, count, name).reshape(shape)
        if len(raw) != count * dtype.itemsize:
            raise RequestError(f"input {name!r} of shape {shape} {meta.datatype} needs {count * dtype.itemsize} "
                               f"raw bytes, raw_input_contents holds {len(raw)}")
        return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)
    if set(typed) - {field}:
        raise RequestError(f"input {name!r} is {meta.datatype}: its values go in contents.{field}, "
                           f"got {sorted(set(typed) - {field})}")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise RequestError(f"input {name!r} of shape {shape} needs {count} values, contents.{field} holds {len(values)}")
    if meta.datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    wide = np.asarray(values)
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise RequestError(f"input {name!r} is {meta.datatype}: values must lie in [{info.min}, {info.max}], "
                               f"got {wide.min()}..{wide.max()}")
    return wide.astype(dtype).reshape(shape)


def response_tensors(outputs: Mapping[str, np.ndarray]) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Each output's (name, datatype, shape) and its raw little-endian bytes, in order."""
    metas, raws = [], []
    for name, value in outputs.items():
        value = np.asarray(value)
        datatype = "BYTES" if value.dtype == object else datatype_of(value.dtype)
        metas.append({"name": name, "datatype": datatype, "shape": list(value.shape)})
        raws.append(_bytes_tensor(value) if datatype == "BYTES" else
                    np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<"), copy=False).tobytes())
    return metas, raws
