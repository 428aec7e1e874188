"""``clipfold serve``: bundles over HTTP with dynamic batching. No torch.

Two faces on one ASGI app (Starlette, run by uvicorn):

* the Open Inference Protocol v2 (KServe v2 / NVIDIA Triton HTTP), so that existing clients,
  ``tritonclient.http`` among them, work unchanged: health, server and model metadata, model
  config, repository index and ``infer`` with JSON tensors or the binary tensor data extension.
  Each bundle is a model taking ``pixels`` (uint8 NCHW, the bundle's preprocessing already
  applied) and giving ``scores``, ``indices`` and ``embedding``; a bundle with a text tower adds a
  model ``<name>-text`` taking ``text`` (BYTES) and giving ``embedding`` and ``truncated``.
* plain JSON under ``/v1/models/<name>/``: ``classify`` and ``embed`` take encoded images
  (multipart upload, base64 in JSON, or a raw image body) and do the preprocessing; ``embed``
  also takes text; ``search`` answers from an index (``--index``).

Every image row, from either face, goes through the model's :class:`~.batcher.DynamicBatcher`,
so concurrent requests share engine calls. Decoding and preprocessing run in a thread pool, the
engine in the batcher's thread: the event loop only parses and routes. A full queue answers 503
with ``Retry-After``; bad input answers 4xx with ``{"error": ...}`` naming what was wrong; an
unexpected failure answers 500 for that request only. Shutdown (SIGINT/SIGTERM) stops accepting,
lets in-flight requests finish, then drains the batchers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from clipfold.runtime.batcher import DynamicBatcher
from clipfold.runtime.engine import Engine
from clipfold.runtime.images import load_image, open_image
from clipfold.runtime.preprocess import preprocess_one
from clipfold.runtime.retrieval.index import Index, bundle_identity
from clipfold.runtime.serve.config import ServeConfig
from clipfold.runtime.serve.inference_protocol import (
    HEADER_LENGTH,
    TensorMeta,
    datatype_of,
    encode_infer_response,
    parse_infer_request,
)
from clipfold.runtime.serve.limits import (
    HttpLimits,
    PayloadTooLarge,
    PixelBudget,
    RequestTimeout,
    UnsupportedEncoding,
    compress_response,
    decode_body,
    limited_http_protocol,
    pick_encoding,
)

from clipfold.errors import (
    BackendUnavailableError,
    BatcherClosedError,
    BundleError,
    ConfigError,
    DecompressionBombError,
    ImageError,
    QueueFullError,
    RequestError,
)

try:  # the serve extra: pip install clipfold[serve]
    # bodies above INLINE_PARSE_BYTES are parsed, decompressed or compressed in the thread pool
    from clipfold.runtime.serve.json_query import INLINE_PARSE_BYTES, int_param, read_query
    from clipfold.runtime.serve.metrics import JsonLogFormatter, Metrics
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
    _MISSING: ImportError | None = None
except ImportError as exc:  # reported by create_app, so `import clipfold.runtime.serve.app` always works
    _MISSING = exc

log = logging.getLogger("clipfold.serve")
VERSION = "1"  # every model has one version


class UnknownModel(RequestError):
    """No served model has that name (HTTP 404)."""


@dataclass
class ServedModel:
    """One protocol model: a bundle's image graph, or its text tower (``kind="text"``)."""

    name: str
    kind: str  # "image" | "text"
    engine: Engine
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    batcher: DynamicBatcher | None = None
    index: Index | None = None
    lock: threading.Lock | None = None  # the text encoder's cache is not thread-safe


def _platform(m: ServedModel) -> str:
    """The protocol's platform string: the image model of an fp32-native variant is clipfold's own kernel."""
    return "clipfold_native" if m.kind == "image" and m.engine.variant.format == "clipfold-vit" else "onnxruntime_onnx"


def _meta(spec) -> TensorMeta:
    return TensorMeta(spec.name, datatype_of(spec.dtype), tuple(d if isinstance(d, int) else -1 for d in spec.shape))


def open_models(bundles: Sequence[str | Path], *, variant: str | None = None, indexes: Sequence[str | Path] = (),
                threads: int | None = None, spin: bool = False,
                expect_digests: dict[str, str] | None = None) -> tuple[dict[str, Engine], dict[str, Index]]:
    """Open each bundle (its name: the folder name without ``.bundle``) and attach each index to
    the bundle whose image graph built it. ``expect_digests``: model name -> the only bundle
    digest that model may have (``serve --expect-digest NAME=DIGEST``)."""
    if not bundles:
        raise ConfigError("give at least one bundle to serve")
    expect_digests = dict(expect_digests or {})
    names = [Path(p).name.removesuffix(".bundle") for p in bundles]
    unknown = sorted(set(expect_digests) - set(names))
    if unknown:
        raise ConfigError(f"--expect-digest names {unknown}, which are not served models; the models are {names}")
    engines: dict[str, Engine] = {}
    for path in map(Path, bundles):
        name = path.name.removesuffix(".bundle")
        if name in engines:
            raise ConfigError(f"two bundles are both named {name!r} ({engines[name].path} and {path}); "
                              "rename one folder")
        engines[name] = Engine.open(path, variant=variant, threads=threads, spin=spin,
                                    expect_digest=expect_digests.get(name))
    attached: dict[str, Index] = {}
    for path in map(Path, indexes):
        index = Index.open(path)
        owner = [n for n, e in engines.items() if bundle_identity(e) == index.meta["bundle"]]
        if not owner:
            want = index.meta["bundle"]
            raise BundleError(f"index {path} was built with {want['model']} (image graph {want['sha256'][:12]}), "
                              f"which none of the served bundles ({', '.join(engines)}) is; serve that bundle too")
        if owner[0] in attached:
            raise ConfigError(f"bundle {owner[0]!r} has two indexes ({attached[owner[0]].path} and {path})")
        attached[owner[0]] = index
    return engines, attached


class ClipfoldServer:
    """The served models, their batchers and the request handlers (see :func:`create_app`)."""

    def __init__(self, engines: Mapping[str, Engine], config: ServeConfig, indexes: Mapping[str, Index] | None = None):
        self.config = config
        self.metrics = Metrics()
        self.models: dict[str, ServedModel] = {}
        self.ready = False
        self.pixel_budget = PixelBudget(config.pixels_in_flight)
        self.metrics.pixels.set_function(lambda: self.pixel_budget.used)
        indexes = dict(indexes or {})
        for name, engine in engines.items():
            spec = engine.variant
            preferred = 1 if config.max_batch == 1 else config.preferred_batch
            if preferred is None:
                preferred, per_image = engine.preferred_batch(config.max_batch)
                log.info("preferred batch", extra={"fields": {"model": name, "preferred_batch": preferred,
                                                              "engine_ms_per_image": {size: round(seconds * 1e3, 3)
                                                                                      for size, seconds in per_image.items()}}})
            batcher = engine.batcher(max_batch=config.max_batch, max_delay_ms=config.max_delay_ms,
                                     max_queue=config.max_queue, on_batch=self.metrics.on_batch(name),
                                     preferred_batch=preferred)
            self.metrics.queue.labels(model=name).set_function(lambda b=batcher: b.queue_depth)
            self.models[name] = ServedModel(name, "image", engine, tuple(map(_meta, spec.inputs)),
                                            tuple(map(_meta, spec.outputs)), batcher, indexes.get(name),
                                            threading.Lock())
            if engine.manifest.text is not None:
                dim = engine.manifest.model.embed_dim
                text = ServedModel(f"{name}-text", "text", engine, (TensorMeta("text", "BYTES", (-1,)),),
                                   (TensorMeta("embedding", "FP32", (-1, dim)), TensorMeta("truncated", "BOOL", (-1,))),
                                   lock=self.models[name].lock)
                if text.name in engines:
                    raise ConfigError(f"bundle {text.name!r} clashes with the text model of bundle {name!r}")
                self.models[text.name] = text

    def close(self) -> None:
        """Finish every queued batch, then stop the batchers (waiting at most the request time limit)."""
        self.ready = False
        for model in self.models.values():
            if model.batcher is not None:
                model.batcher.close(drain=True, timeout=self.config.timeout_s)

    # --- plumbing ---------------------------------------------------------------------------
    def endpoint(self, name: str, handler):
        """Wrap a handler: time limit, error -> JSON status, metrics and one structured log line."""
        async def wrapped(request: Request) -> Response:
            start = time.perf_counter()
            # work in threads checks this between images, so a timed-out request stops there
            request.state.deadline = time.monotonic() + self.config.timeout_s
            try:
                response = await asyncio.wait_for(handler(request), self.config.timeout_s)
            except (asyncio.TimeoutError, RequestTimeout):
                response = _error(504, f"the request took longer than the server's {self.config.timeout_s:g} s limit")
            except ClientDisconnect:  # the client's fault, not the server's: no traceback, no 5xx
                response = _error(499, "the client closed the connection before the request was read")
                self.metrics.aborts.labels(endpoint=name).inc()
            except Exception as exc:  # noqa: BLE001 - one request's failure must not reach the server
                response = self._error_response(exc)
            model = request.path_params.get("model", "")
            model = model if model in self.models else ("" if not model else "<unknown>")
            if response.status_code < 300:
                response = await _encoded(response, request.headers.get("accept-encoding"))
            seconds = time.perf_counter() - start
            self.metrics.requests.labels(endpoint=name, model=model, code=str(response.status_code)).inc()
            self.metrics.latency.labels(endpoint=name).observe(seconds)
            log.info("request", extra={"fields": {"endpoint": name, "model": model, "status": response.status_code,
                                                  "ms": round(seconds * 1000, 3)}})
            return response
        return wrapped

    def _error_response(self, exc: Exception) -> Response:
        if isinstance(exc, UnknownModel):
            return _error(404, str(exc))
        if isinstance(exc, (PayloadTooLarge, DecompressionBombError)):
            return _error(413, str(exc))
        if isinstance(exc, UnsupportedEncoding):
            return _error(415, str(exc))
        if isinstance(exc, QueueFullError):
            return _error(503, str(exc), {"Retry-After": "1"})
        if isinstance(exc, BatcherClosedError):
            return _error(503, str(exc), {"Retry-After": "5"})
        if isinstance(exc, HTTPException):  # e.g. Starlette's multipart parser
            return _error(exc.status_code if 400 <= exc.status_code < 500 else 400, str(exc.detail))
        if isinstance(exc, (RequestError, ImageError, ConfigError)):
            return _error(400, str(exc))
        if isinstance(exc, BundleError):  # a bundle file changed or broke on disk after the server opened it
            log.error("bundle refused: %s", exc, extra={"fields": {"error": type(exc).__name__}})
            return _error(503, str(exc))
        log.exception("request failed", extra={"fields": {"error": type(exc).__name__}})
        return _error(500, f"internal error ({type(exc).__name__}); the server logged it")

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

    # --- Open Inference Protocol v2 ---------------------------------------------------------
    async def server_metadata(self, request: Request) -> Response:
        from clipfold import __version__

        return JSONResponse({"name": "clipfold", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def server_ready(self, request: Request) -> Response:
        return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 503)

    async def model_metadata(self, request: Request) -> Response:
        m = self.model(request)
        return JSONResponse({"name": m.name, "versions": [VERSION], "platform": _platform(m),
                             "inputs": [t.to_json() for t in m.inputs], "outputs": [t.to_json() for t in m.outputs]})

    async def model_ready(self, request: Request) -> Response:
        m = self.model(request)
        return JSONResponse({"name": m.name, "ready": self.ready}, status_code=200 if self.ready else 503)

    async def model_config(self, request: Request) -> Response:
        m = self.model(request)

        def dims(t: TensorMeta) -> dict:
            return {"name": t.name, "data_type": f"TYPE_{'STRING' if t.datatype == 'BYTES' else t.datatype}",
                    "dims": list(t.shape[1:]) or [1]}
        config: dict[str, Any] = {"name": m.name, "platform": _platform(m), "max_batch_size": self.config.max_batch,
                                  "input": [dims(t) for t in m.inputs], "output": [dims(t) for t in m.outputs]}
        if m.kind == "image":
            config["dynamic_batching"] = {"max_queue_delay_microseconds": int(self.config.max_delay_ms * 1000),
                                          "preferred_batch_size": [m.batcher.preferred_batch]}
        return JSONResponse(config)

    async def repository_index(self, request: Request) -> Response:
        return JSONResponse([{"name": n, "version": VERSION, "state": "READY" if self.ready else "UNAVAILABLE"}
                             for n in self.models])

    async def infer(self, request: Request) -> Response:
        m = self.model(request)
        body = await self.body(request)
        args = (body, request.headers.get(HEADER_LENGTH), m.inputs, m.outputs)
        # A large JSON tensor takes a while to parse: keep the event loop free for other requests.
        req = parse_infer_request(*args) if len(body) <= INLINE_PARSE_BYTES else \
            await run_in_threadpool(parse_infer_request, *args)
        rows = len(next(iter(req.inputs.values())))
        if rows > self.config.max_batch:  # what the model config advertises, as Triton enforces it
            raise RequestError(f"{rows} rows in one request; model {m.name!r} takes at most {self.config.max_batch} "
                               "(its max_batch_size)")
        if m.kind == "image":
            out = await self.rows(m, req.inputs["pixels"])
        else:
            self._check_texts(req.inputs["text"])
            try:
                texts = [t.decode("utf-8") for t in req.inputs["text"]]
            except UnicodeDecodeError as exc:
                raise RequestError(f"input 'text' must be UTF-8: {exc}") from None
            embedded = await run_in_threadpool(self._embed_text, m, texts, request.state.deadline)
            out = {"embedding": embedded.embeddings, "truncated": embedded.truncated}
        content, headers = encode_infer_response(m.name, VERSION, req.id, {n: (out[n], b) for n, b in req.outputs.items()})
        return Response(content, headers=headers,
                        media_type="application/octet-stream" if headers else "application/json")

    # --- plain JSON -------------------------------------------------------------------------
    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"models": [
            {"name": m.name, "labels": len(m.engine.labels), "max_k": m.engine.max_k,
             "text": m.engine.manifest.text is not None, "index": None if m.index is None else len(m.index)}
            for m in self.models.values() if m.kind == "image"]})

    async def classify(self, request: Request) -> Response:
        m = self.model(request, "image")
        images, params = await self._images_and_params(request)
        k = int_param(params, "k", min(5, m.engine.max_k), 1, m.engine.max_k)
        pixels = await run_in_threadpool(self._pixels, m, images, request.state.deadline)
        out = await self.rows(m, pixels)
        labels = m.engine.labels
        return JSONResponse({"model": m.name, "predictions": [
            [{"label": labels[int(i)], "score": float(s), "index": int(i)} for s, i in zip(scores[:k], indices[:k])]
            for scores, indices in zip(out["scores"], out["indices"])]})

    async def embed(self, request: Request) -> Response:
        m = self.model(request, "image")
        texts, images, _ = await self._query(request, allow_many=True)
        if texts is not None:
            embedded = await run_in_threadpool(self._embed_text, m, texts, request.state.deadline)
            return JSONResponse({"model": m.name, "embeddings": embedded.embeddings.tolist(),
                                 "truncated": embedded.truncated.tolist()})
        pixels = await run_in_threadpool(self._pixels, m, images, request.state.deadline)
        out = await self.rows(m, pixels)
        return JSONResponse({"model": m.name, "embeddings": out["embedding"].tolist()})

    async def search(self, request: Request) -> Response:
        m = self.model(request, "image")
        if m.index is None:
            raise RequestError(f"model {m.name!r} has no index; start the server with --index INDEX built from it")
        texts, images, params = await self._query(request, allow_many=False)
        k = int_param(params, "k", 10, 1, 10_000)
        if texts is not None:
            result = await run_in_threadpool(self._search_text, m, texts[0], k)
        else:
            result = await run_in_threadpool(self._search_image, m, images[0], k, request.state.deadline)
        return JSONResponse({"model": m.name, "hits": [{"id": h.path, "score": h.score} for h in result.hits],
                             "query_truncated": result.query_truncated})

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- helpers ----------------------------------------------------------------------------
    def _text_ready(self, m: ServedModel) -> None:
        """Open the text tower once (under the model's lock); embedding is thread-safe after that,
        so a long text request holds no lock while its texts are cleaned."""
        _require_text(m)
        with m.lock:
            m.engine.text_encoder()

    def _check_texts(self, texts) -> None:
        limit = self.config.max_text_bytes
        for i, text in enumerate(texts):
            size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
            if size > limit:
                raise PayloadTooLarge(f"text {i} is {size:,} bytes; this server takes at most {limit:,} per text "
                                      "(only the first context-length tokens of a text count)")

    def _embed_text(self, m: ServedModel, texts: list[str], deadline: float | None = None):
        """Texts cleaned one at a time outside any lock; past ``deadline`` the rest are not cleaned."""
        self._check_texts(texts)
        self._text_ready(m)
        encoder = m.engine.text_encoder()
        cleaned = []
        for text in texts:
            if deadline is not None and time.monotonic() > deadline:
                raise RequestTimeout("the request passed its time limit; its remaining texts were not cleaned")
            cleaned.append(encoder.clean(text))
        return encoder.embed(cleaned, cleaned=True)

    def _search_text(self, m: ServedModel, text: str, k: int):
        self._check_texts([text])
        self._text_ready(m)
        return m.index.search(m.engine, text=text, k=k)

    @contextlib.contextmanager
    def _decoded(self, data: bytes, deadline: float | None):
        """One decoded image, holding its pixels in the server-wide budget until the block ends."""
        if deadline is not None and time.monotonic() > deadline:
            raise RequestTimeout("the request passed its time limit; its remaining images were not decoded")
        image = open_image(data, self.config.max_image_pixels)  # the header only: size checked, no pixel yet
        try:
            with self.pixel_budget.hold(image.width * image.height, deadline):
                yield load_image(image, self.config.max_image_pixels)
        finally:
            image.close()  # frees the pixels now, not when the garbage collector gets to it

    def _pixels(self, m: ServedModel, images: list[bytes], deadline: float | None = None) -> np.ndarray:
        """Decode and preprocess one image at a time: a request holds one decoded image, not all of them."""
        spec = m.engine.manifest.preprocess
        out = np.empty((len(images), 3, *spec.image_size), np.uint8)
        for i, data in enumerate(images):
            try:
                with self._decoded(data, deadline) as image:
                    out[i] = preprocess_one(image, spec)
            except ImageError as exc:
                raise type(exc)(f"image {i}: {exc}") from None
        return out

    def _search_image(self, m: ServedModel, data: bytes, k: int, deadline: float | None):
        try:
            with self._decoded(data, deadline) as image:
                return m.index.search(m.engine, image=image, k=k)
        except ImageError as exc:
            raise type(exc)(f"image 0: {exc}") from None

    async def _query(self, request: Request, allow_many: bool, allow_text: bool = True):
        return await read_query(request, await self.body(request), self.config.max_items, allow_many, allow_text)

    async def _images_and_params(self, request: Request) -> tuple[list[bytes], dict]:
        texts, images, params = await self._query(request, allow_many=True, allow_text=False)
        return images, params

def _require_text(m: ServedModel) -> None:
    if m.engine.manifest.text is None:
        raise RequestError(f"model {m.name!r} has no text tower; compile its bundle with --text for text queries")


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


COMPRESS_MIN_BYTES = 1024  # smaller answers go uncompressed whatever Accept-Encoding allows


async def _encoded(response: Response, accept: str | None) -> Response:
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


def uvicorn_options(server: "ClipfoldServer") -> dict[str, Any]:
    """uvicorn settings for ``server``: its HTTP limits (header bytes and time, connections) and logging."""
    c = server.config
    protocol = limited_http_protocol(HttpLimits(c.max_header_bytes, c.header_timeout_s, c.max_connections),
                                     lambda code: server.metrics.refused.labels(code=str(code)).inc())
    return {"http": protocol, "timeout_keep_alive": 5, "log_config": None, "access_log": False, "lifespan": "on"}


def ui_enabled(config: ServeConfig) -> bool:
    """The page is on unless turned off; by default only when listening on loopback (it shows the index's images)."""
    return config.ui if config.ui is not None else config.host in ("127.0.0.1", "localhost", "::1")


def require_serve_extra() -> None:
    if _MISSING is not None:
        raise BackendUnavailableError(f"serving needs the serve extra ({_MISSING.name} is missing): "
                                      "pip install 'clipfold[serve]'")


def create_app(server: ClipfoldServer):
    """The Starlette app serving ``server``'s models."""
    require_serve_extra()
    s = server

    def route(path: str, name: str, handler, methods=("GET",)) -> Route:
        return Route(path, s.endpoint(name, handler), methods=list(methods))

    routes = [route("/v2", "server_metadata", s.server_metadata),
              route("/v2/health/live", "live", s.live), route("/v2/health/ready", "ready", s.server_ready),
              route("/v2/repository/index", "repository_index", s.repository_index, ("POST",)),
              route("/v1/models", "list_models", s.list_models),
              route("/v1/models/{model}/classify", "classify", s.classify, ("POST",)),
              route("/v1/models/{model}/embed", "embed", s.embed, ("POST",)),
              route("/v1/models/{model}/search", "search", s.search, ("POST",)),
              route("/metrics", "metrics", s.metrics_endpoint)]
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes += [route(prefix, "model_metadata", s.model_metadata),
                   route(prefix + "/ready", "model_ready", s.model_ready),
                   route(prefix + "/config", "model_config", s.model_config),
                   route(prefix + "/infer", "infer", s.infer, ("POST",))]
    if ui_enabled(s.config):
        from clipfold.runtime.serve.webui import ui_routes

        routes += ui_routes(s, route)

    async def http_error(request: Request, exc: HTTPException) -> Response:  # unknown path, wrong method
        return _error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        grpc_server = None
        if s.config.grpc_port:  # same event loop, models, batchers, limits and metrics as HTTP
            from clipfold.runtime.serve.grpc_service import start_grpc

            grpc_server = await start_grpc(s, s.config.grpc_port)
        s.ready = True
        log.info("ready", extra={"fields": {"models": sorted(s.models), "grpc_port": s.config.grpc_port or None}})
        yield
        if grpc_server is not None:  # refuse new calls, finish those in flight, then drain the batchers
            from clipfold.runtime.serve.grpc_service import stop_grpc

            s.ready = False
            await stop_grpc(grpc_server, s.config.timeout_s)
        log.info("draining", extra={"fields": {"queued": {n: m.batcher.queue_depth for n, m in s.models.items()
                                                          if m.batcher is not None}}})
        await run_in_threadpool(s.close)

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)


def serve(bundles: Sequence[str | Path], config: ServeConfig, *, variant: str | None = None,
          indexes: Sequence[str | Path] = (), progress=print, expect_digests: dict[str, str] | None = None) -> None:
    """Open the bundles and serve them until SIGINT/SIGTERM (in-flight requests finish first)."""
    require_serve_extra()
    import uvicorn

    if config.grpc_port:
        from clipfold.runtime.serve.grpc_service import check_port

        check_port(config.host, config.grpc_port)
    engines, attached = open_models(bundles, variant=variant, indexes=indexes, threads=config.threads,
                                    spin=config.spin, expect_digests=expect_digests)
    server = ClipfoldServer(engines, config, attached)
    for name, engine in sorted(engines.items()):
        if getattr(engine, "variant_reason", None):  # --variant auto: which variant, and the figures that chose it
            progress(f"{name}: variant auto chose {engine.variant.name}: {engine.variant_reason}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    progress(f"serving {', '.join(sorted(server.models))} on http://{config.host}:{config.port} "
             f"(max batch {config.max_batch}, max delay {config.max_delay_ms:g} ms; a batch starts at "
             + ", ".join(f"{m.batcher.preferred_batch} rows for {n}" for n, m in sorted(server.models.items())
                         if m.batcher is not None) + ")"
             + (f"; gRPC on {config.host}:{config.grpc_port}" if config.grpc_port else "")
             + (f"; the page: http://{config.host}:{config.port}/ui" if ui_enabled(config) else ""))
    try:
        uvicorn.run(create_app(server), host=config.host, port=config.port, **uvicorn_options(server),
                    timeout_graceful_shutdown=int(config.timeout_s) + 5)
    finally:
        server.close()
