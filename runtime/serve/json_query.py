"""The plain JSON endpoints' queries: images and texts from a multipart form, a JSON object (base64
images) or a raw image body, and their integer parameters. Every malformed query is a
:class:`~clipfold.errors.RequestError` naming what was wrong."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Mapping

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request

from clipfold.errors import RequestError
from clipfold.runtime.serve.inference_protocol import load_json

# Above this many bytes a body is parsed (decompressed, compressed) in the thread pool, not on the event loop.
INLINE_PARSE_BYTES = 64 * 1024


async def read_query(request: Request, body: bytes, max_items: int, allow_many: bool, allow_text: bool = True):
    """(texts or None, images or None, params) from a multipart form, a JSON object or a raw image body."""
    params: dict[str, Any] = dict(request.query_params)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    texts, images = None, []
    if ctype == "multipart/form-data":
        form = await _form(request, body, max_items)
        try:
            for key, value in form.multi_items():
                if hasattr(value, "read"):
                    images.append(await value.read())
                elif key in ("text", "texts"):
                    texts = (texts or []) + [value]
                else:
                    params[key] = value
        finally:
            await form.close()  # spooled upload files
    elif ctype == "application/json":  # a large body is parsed off the event loop
        obj = load_json(body) if len(body) <= INLINE_PARSE_BYTES else await run_in_threadpool(load_json, body)
        if not isinstance(obj, dict):
            raise RequestError(f"the request must be a JSON object, got {type(obj).__name__}")
        for key in ("image", "images"):
            if key in obj:
                values = obj[key] if isinstance(obj[key], list) else [obj[key]]
                images += [_b64(v, f"{key}[{i}]") for i, v in enumerate(values)]
        for key in ("text", "texts"):
            if key in obj:
                values = obj[key] if isinstance(obj[key], list) else [obj[key]]
                if not all(isinstance(t, str) for t in values):
                    raise RequestError(f"'{key}' must be a string or a list of strings")
                texts = (texts or []) + values
        params.update({k: v for k, v in obj.items() if k not in ("image", "images", "text", "texts")})
    elif body:
        images = [body]  # a raw image body: image/png, image/jpeg, application/octet-stream...
    if texts is not None and not allow_text:
        raise RequestError("this endpoint takes images, not text")
    if texts == []:
        raise RequestError("'text' is an empty list; send at least one text query")
    if (texts is None) == (not images):
        raise RequestError("send exactly one kind of query: images (multipart files, JSON 'image'/'images' in "
                           "base64, or a raw image body)" + (" or text (JSON 'text')" if allow_text else ""))
    count = len(texts if texts is not None else images)
    limit = max_items if allow_many else 1
    if count > limit:
        raise RequestError(f"{count} queries in one request; this endpoint takes at most {limit}")
    return texts, (images or None), params


def _b64(value, what: str) -> bytes:
    if not isinstance(value, str):
        raise RequestError(f"{what} must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:  # a data URL
        value = value.split(",", 1)[1]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"{what} is not valid base64: {exc}") from None
    if not data:
        raise RequestError(f"{what} is empty")
    return data


def int_param(params: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = params.get(key, default)
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,9}", value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(f"'{key}' must be an integer in [{lo}, {hi}], got {value!r}")
    return value


async def _form(request: Request, body: bytes, max_files: int):
    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}
    try:
        return await Request(request.scope, replay).form(max_files=max_files, max_fields=max_files + 16)
    except HTTPException:
        raise
    except Exception as exc:  # noqa: BLE001 - python-multipart's parse errors
        raise RequestError(f"the multipart form cannot be parsed: {exc}") from None
