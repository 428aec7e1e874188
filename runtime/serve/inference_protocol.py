"""The Open Inference Protocol v2 (KServe v2 / NVIDIA Triton) over HTTP: tensors in and out. No torch.

Only the wire format lives here, as pure functions, so that every malformed request is refused
with a :class:`~clipfold.errors.RequestError` naming what was wrong and what was expected before
anything reaches an engine. The server (:mod:`.server`) maps those errors to HTTP 400.

Request body: a JSON object ``{"id"?, "parameters"?, "inputs": [...], "outputs"?: [...]}``. With
the binary tensor data extension the JSON is followed by raw tensor bytes; the header
``Inference-Header-Content-Length`` gives the JSON's length and each binary input carries
``"parameters": {"binary_data_size": n}`` in body order. Numbers are little-endian, C order;
``BYTES`` elements are a 4-byte little-endian length followed by the bytes. The response mirrors
that: binary outputs when asked for (``binary_data_output`` for all, or per output).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from clipfold.errors import RequestError

HEADER_LENGTH = "Inference-Header-Content-Length"
# OIP datatype <-> numpy dtype. BYTES tensors are numpy object arrays of ``bytes``.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_FROM_NUMPY = {dtype: name for name, dtype in DATATYPES.items() if name != "BYTES"}


@dataclass(frozen=True)
class TensorMeta:
    """One model input or output as the protocol states it; -1 is a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def datatype_of(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype not in _FROM_NUMPY:
        raise RequestError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")
    return _FROM_NUMPY[dtype]


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: dict[str, bool]  # requested output -> as binary data


def parse_infer_request(body: bytes, header_length: str | None, inputs: Sequence[TensorMeta],
                        outputs: Sequence[TensorMeta]) -> InferRequest:
    """Decode and check an infer request against the model's inputs and outputs."""
    json_part, binary = _split(body, header_length)
    request = load_json(json_part)
    if not isinstance(request, dict):
        raise RequestError(f"the request must be a JSON object, got {type(request).__name__}")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(f"'id' must be a string, got {type(request_id).__name__}")
    parameters = _parameters(request, "the request")
    binary_default = _flag(parameters, "binary_data_output", "the request")

    wanted = {meta.name: meta for meta in inputs}
    given = request.get("inputs")
    if not isinstance(given, list) or not given:
        raise RequestError(f"'inputs' must be a non-empty list of tensors; this model takes {sorted(wanted)}")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for i, tensor in enumerate(given):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise RequestError(f"inputs[{i}] must be an object with a string 'name'")
        name = tensor["name"]
        if name not in wanted:
            raise RequestError(f"unknown input {name!r}; this model takes {sorted(wanted)}")
        if name in tensors:
            raise RequestError(f"input {name!r} is given twice")
        tensors[name], offset = _decode_input(tensor, wanted[name], binary, offset)
    if offset != len(binary):
        raise RequestError(f"the body carries {len(binary)} bytes after the JSON header but the inputs' "
                           f"binary_data_size add up to {offset}")
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise RequestError(f"missing input(s) {missing}; this model takes {sorted(wanted)}")
    rows = {len(v) for v in tensors.values()}
    if len(rows) > 1:
        raise RequestError(f"the inputs disagree on the batch size: {sorted(rows)}")

    known = {meta.name for meta in outputs}
    requested = request.get("outputs")
    if requested is None:
        chosen = dict.fromkeys(sorted(known, key=[m.name for m in outputs].index), binary_default)
    else:
        if not isinstance(requested, list):
            raise RequestError("'outputs' must be a list of {'name': ...} objects")
        chosen = {}
        for i, out in enumerate(requested):
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise RequestError(f"outputs[{i}] must be an object with a string 'name'")
            if out["name"] not in known:
                raise RequestError(f"unknown output {out['name']!r}; this model gives {sorted(known)}")
            out_params = _parameters(out, f"output {out['name']!r}")
            if "classification" in out_params:
                raise RequestError("the classification extension is not supported: request 'scores' and 'indices'")
            flag = _flag(out_params, "binary_data", f"output {out['name']!r}")
            chosen[out["name"]] = binary_default if "binary_data" not in out_params else flag
    return InferRequest(request_id, tensors, chosen)


def encode_infer_response(model: str, version: str, request_id: str | None,
                          outputs: Mapping[str, tuple[np.ndarray, bool]]) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers (``Inference-Header-Content-Length`` if binary)."""
    entries, blobs = [], []
    for name, (value, binary) in outputs.items():
        value = np.asarray(value)
        datatype = "BYTES" if value.dtype == object else datatype_of(value.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(value.shape)}
        if binary:
            raw = _bytes_tensor(value) if datatype == "BYTES" else np.ascontiguousarray(value).astype(
                value.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif datatype == "BYTES":
            entry["data"] = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in value.ravel()]
        else:
            entry["data"] = value.ravel().tolist()
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": entries}
    if request_id is not None:
        response["id"] = request_id
    header = json.dumps(response, separators=(",", ":")).encode()
    if not blobs:
        return header, {}
    return header + b"".join(blobs), {HEADER_LENGTH: str(len(header))}


# --- helpers ----------------------------------------------------------------------------------
def load_json(raw: bytes):
    """Parse a request's JSON; anything unparsable (including nesting too deep for Python's
    parser) is a :class:`RequestError`."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RequestError(f"the request's JSON is not valid: {type(exc).__name__}: {str(exc)[:200]}") from None


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not re.fullmatch(r"[0-9]{1,12}", header_length.strip()):
        raise RequestError(f"{HEADER_LENGTH} must be a non-negative integer, got {header_length[:40]!r}")
    n = int(header_length)
    if not 0 < n <= len(body):
        raise RequestError(f"{HEADER_LENGTH} is {n} but the body holds {len(body)} bytes")
    return body[:n], body[n:]


def _parameters(obj: dict, what: str) -> dict:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise RequestError(f"'parameters' of {what} must be an object, got {type(params).__name__}")
    return params


def _flag(params: dict, key: str, what: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise RequestError(f"parameter {key!r} of {what} must be true or false, got {value!r}")
    return value


def _decode_input(tensor: dict, meta: TensorMeta, binary: bytes, offset: int) -> tuple[np.ndarray, int]:
    name = meta.name
    if tensor.get("datatype") != meta.datatype:
        raise RequestError(f"input {name!r} must have datatype {meta.datatype}, got {tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or len(shape) != len(meta.shape)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or any(want != -1 and got != want for got, want in zip(shape, meta.shape))):
        raise RequestError(f"input {name!r} must have shape {list(meta.shape)} (-1: any size), got {shape!r}")
    if shape[0] < 1:
        raise RequestError(f"input {name!r} has an empty batch; send at least one row")
    count = int(np.prod(shape, dtype=object))
    dtype = DATATYPES[meta.datatype]
    params = _parameters(tensor, f"input {name!r}")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in tensor:
            raise RequestError(f"input {name!r} gives both 'data' and binary_data_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise RequestError(f"input {name!r}: binary_data_size {size!r} does not fit the {len(binary) - offset} "
                               "binary bytes left in the body")
        raw = binary[offset:offset + size]
        if meta.datatype == "BYTES":
            array = _parse_bytes_tensor(raw, count, name)
        else:
            if size != count * dtype.itemsize:
                raise RequestError(f"input {name!r} of shape {shape} {meta.datatype} needs "
                                   f"{count * dtype.itemsize} bytes, binary_data_size is {size}")
            array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
        return array.reshape(shape), offset + size
    if "data" not in tensor:
        raise RequestError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    flat = _flatten(tensor["data"], shape, name)
    if len(flat) != count:
        raise RequestError(f"input {name!r} of shape {shape} needs {count} values, 'data' holds {len(flat)}")
    return _json_values(flat, meta.datatype, dtype, name).reshape(shape), offset


def _flatten(data, shape: list[int], name: str) -> list:
    """``data`` flat (row-major), or nested exactly as ``shape``; the values, flat."""
    if not isinstance(data, list):
        raise RequestError(f"'data' of input {name!r} must be a list, got {type(data).__name__}")
    if not any(isinstance(v, list) for v in data):
        return data
    if len(shape) <= 1 or len(data) != shape[0] or not all(isinstance(v, list) for v in data):
        raise RequestError(f"'data' of input {name!r} is nested unlike its shape {shape}; send it flat (row-major) "
                           "or nested exactly as the shape")
    out = []
    for v in data:
        inner = _flatten(v, shape[1:], name)
        if len(inner) != int(np.prod(shape[1:], dtype=object)):
            raise RequestError(f"'data' of input {name!r} is nested unlike its shape {shape}")
        out.extend(inner)
    return out


def _json_values(flat: list, datatype: str, dtype: np.dtype, name: str) -> np.ndarray:
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise RequestError(f"input {name!r} is BYTES: 'data' must hold strings")
        out = np.empty(len(flat), dtype=object)
        try:
            out[:] = [v.encode("utf-8") for v in flat]
        except UnicodeEncodeError as exc:  # a lone surrogate from a JSON \ud800 escape
            raise RequestError(f"input {name!r} holds a string that is not valid unicode: {exc.reason}") from None
        return out
    if datatype == "BOOL":
        if not all(isinstance(v, bool) for v in flat):
            raise RequestError(f"input {name!r} is BOOL: 'data' must hold true/false")
        return np.array(flat, dtype=dtype)
    if dtype.kind in "iu":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
            raise RequestError(f"input {name!r} is {datatype}: 'data' must hold integers")
        info = np.iinfo(dtype)
        if flat and (min(flat) < info.min or max(flat) > info.max):
            raise RequestError(f"input {name!r} is {datatype}: values must lie in [{info.min}, {info.max}], "
                               f"got {min(flat)}..{max(flat)}")
        return np.array(flat, dtype=dtype)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
        raise RequestError(f"input {name!r} is {datatype}: 'data' must hold numbers")
    try:
        return np.array(flat, dtype=dtype)
    except OverflowError:
        raise RequestError(f"input {name!r} is {datatype}: a value is too large for it") from None


def _parse_bytes_tensor(raw: bytes, count: int, name: str) -> np.ndarray:
    out, pos = [], 0
    while pos < len(raw):
        if len(out) == count:
            raise RequestError(f"input {name!r} needs {count} BYTES elements, the binary data holds more")
        if pos + 4 > len(raw):
            raise RequestError(f"input {name!r}: BYTES element {len(out)} has a cut 4-byte length prefix")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise RequestError(f"input {name!r}: BYTES element {len(out)} claims {n} bytes, "
                               f"{len(raw) - pos - 4} are left")
        out.append(raw[pos + 4:pos + 4 + n])
        pos += 4 + n
    if len(out) != count:
        raise RequestError(f"input {name!r} needs {count} BYTES elements, the binary data holds {len(out)}")
    array = np.empty(count, dtype=object)
    array[:] = out
    return array


def _bytes_tensor(value: np.ndarray) -> bytes:
    parts = []
    for v in value.ravel():
        b = v if isinstance(v, bytes) else str(v).encode("utf-8")
        parts.append(struct.pack("<I", len(b)) + b)
    return b"".join(parts)
