"""The server behind both faces of ``clipfold serve``: the served models and their batchers, and
the plumbing every HTTP handler goes through (time limit, error -> JSON status, response
compression, metrics and one structured log line; the body read within its limit).

:class:`ClipfoldServer` gathers the handlers of the Open Inference Protocol
(runtime/serve/inference_routes.py) and of the JSON API (runtime/serve/json_routes.py) and the
request work they share with the gRPC face (runtime/serve/request_work.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Mapping

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from clipfold.errors import (
    BatcherClosedError,
    BundleError,
    ConfigError,
    DecompressionBombError,
    ImageError,
    QueueFullError,
    RequestError,
)
from clipfold.runtime.engine import Engine
from clipfold.runtime.retrieval.index import Index
from clipfold.runtime.serve.config import ServeConfig
from clipfold.runtime.serve.inference_routes import InferenceProtocolRoutes
from clipfold.runtime.serve.json_query import INLINE_PARSE_BYTES
from clipfold.runtime.serve.json_routes import JsonRoutes
from clipfold.runtime.serve.limits import (
    PayloadTooLarge,
    PixelBudget,
    RequestTimeout,
    UnsupportedEncoding,
    compress_response,
    decode_body,
    pick_encoding,
)
from clipfold.runtime.serve.metrics import Metrics
from clipfold.runtime.serve.models import VERSION, ServedModel, UnknownModel, served_models
from clipfold.runtime.serve.request_work import RequestWork

log = logging.getLogger("clipfold.serve")


class ClipfoldServer(InferenceProtocolRoutes, JsonRoutes, RequestWork):
    """The served models, their batchers and the request handlers (see :func:`create_app`)."""

    def __init__(self, engines: Mapping[str, Engine], config: ServeConfig, indexes: Mapping[str, Index] | None = None):
        self.config = config
        self.metrics = Metrics()
        self.ready = False
        self.pixel_budget = PixelBudget(config.pixels_in_flight)
        self.metrics.pixels.set_function(lambda: self.pixel_budget.used)
        self.models: dict[str, ServedModel] = served_models(engines, config, self.metrics, dict(indexes or {}))

    def close(self) -> None:
        """Finish every queued batch, then stop the batchers (waiting at most the request time limit)."""
        self.ready = False
        for model in self.models.values():
            if model.batcher is not None:
                model.batcher.close(drain=True, timeout=self.config.timeout_s)

    def endpoint(self, name: str, handler):
        """Wrap a handler: time limit, error -> JSON status, metrics and one structured log line."""
        async def wrapped(request: Request) -> Response:
            start = time.perf_counter()
            # work in threads checks this between images, so a timed-out request stops there
            request.state.deadline = time.monotonic() + self.config.timeout_s
            try:
                response = await asyncio.wait_for(handler(request), self.config.timeout_s)
            except (asyncio.TimeoutError, RequestTimeout):
                response = error_response(504, f"the request took longer than the server's "
                                               f"{self.config.timeout_s:g} s limit")
            except ClientDisconnect:  # the client's fault, not the server's: no traceback, no 5xx
                response = error_response(499, "the client closed the connection before the request was read")
                self.metrics.aborts.labels(endpoint=name).inc()
            except Exception as exc:  # noqa: BLE001 - one request's failure must not reach the server
                response = self._failure_response(exc)
            model = request.path_params.get("model", "")
            model = model if model in self.models else ("" if not model else "<unknown>")
            if response.status_code < 300:
                response = await encoded(response, request.headers.get("accept-encoding"))
            seconds = time.perf_counter() - start
            self.metrics.requests.labels(endpoint=name, model=model, code=str(response.status_code)).inc()
            self.metrics.latency.labels(endpoint=name).observe(seconds)
            log.info("request", extra={"fields": {"endpoint": name, "model": model, "status": response.status_code,
                                                  "ms": round(seconds * 1000, 3)}})
            return response
        return wrapped

    def _failure_response(self, exc: Exception) -> Response:
        if isinstance(exc, UnknownModel):
            return error_response(404, str(exc))
        if isinstance(exc, (PayloadTooLarge, DecompressionBombError)):
            return error_response(413, str(exc))
        if isinstance(exc, UnsupportedEncoding):
            return error_response(415, str(exc))
        if isinstance(exc, QueueFullError):
            return error_response(503, str(exc), {"Retry-After": "1"})
        if isinstance(exc, BatcherClosedError):
            return error_response(503, str(exc), {"Retry-After": "5"})
        if isinstance(exc, HTTPException):  # e.g. Starlette's multipart parser
            return error_response(exc.status_code if 400 <= exc.status_code < 500 else 400, str(exc.detail))
        if isinstance(exc, (RequestError, ImageError, ConfigError)):
            return error_response(400, str(exc))
        if isinstance(exc, BundleError):  # a bundle file changed or broke on disk after the server opened it
            log.error("bundle refused: %s", exc, extra={"fields": {"error": type(exc).__name__}})
            return error_response(503, str(exc))
        log.exception("request failed", extra={"fields": {"error": type(exc).__name__}})
        return error_response(500, f"internal error ({type(exc).__name__}); the server logged it")

    def model(self, request: Request, kind: str | None = None) -> ServedModel:
        name = request.path_params["model"]
        model = self.models.get(name)
        if model is None:
            raise UnknownModel(f"unknown model {name!r}; served: {sorted(self.models)}")
        version = request.path_params.get("version")
        if version is not None and version != VERSION:
            raise UnknownModel(f"model {name!r} has no version {version!r}; it has version {VERSION!r}")
        if kind is not None and model.kind != kind:
            raise RequestError(f"model {name!r} is a {model.kind} model; use the bundle's image model "
                               f"{name.removesuffix('-text')!r} here")
        return model

    async def body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and re.fullmatch(r"[0-9]{1,15}", declared) and int(declared) > limit:
            raise PayloadTooLarge(f"the body is {int(declared):,} bytes; this server takes at most {limit:,}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the body exceeds this server's limit of {limit:,} bytes")
            chunks.append(chunk)
        raw, encoding = b"".join(chunks), request.headers.get("content-encoding")
        if encoding is None:
            return raw
        # gzip/deflate (tritonclient's request_compression_algorithm), refused once the output passes the limit
        return decode_body(raw, encoding, limit) if len(raw) <= INLINE_PARSE_BYTES else \
            await run_in_threadpool(decode_body, raw, encoding, limit)

    async def rows(self, model: ServedModel, pixels: np.ndarray) -> dict[str, np.ndarray]:
        return await asyncio.wrap_future(model.batcher.submit(pixels))


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


COMPRESS_MIN_BYTES = 1024  # smaller answers go uncompressed whatever Accept-Encoding allows


async def encoded(response: Response, accept: str | None) -> Response:
    """The response compressed as the client's ``Accept-Encoding`` allows (gzip or deflate), as Triton does."""
    encoding = pick_encoding(accept)
    body = getattr(response, "body", None)
    if encoding is None or not isinstance(body, bytes) or len(body) < COMPRESS_MIN_BYTES \
            or "content-encoding" in response.headers:
        return response
    data = compress_response(body, encoding) if len(body) <= INLINE_PARSE_BYTES else \
        await run_in_threadpool(compress_response, body, encoding)
    headers = {k: v for k, v in response.headers.items() if k != "content-length"}
    headers.update({"content-encoding": encoding, "vary": "Accept-Encoding"})
    return Response(data, status_code=response.status_code, headers=headers)
