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

Here: opening the bundles and indexes, the Starlette app's routes, and :func:`serve`. The models
are in runtime/serve/models.py, the server and its request plumbing in runtime/serve/server.py,
the handlers in runtime/serve/inference_routes.py and runtime/serve/json_routes.py.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Sequence

from clipfold.errors import BackendUnavailableError, BundleError, ConfigError
from clipfold.runtime.engine import Engine
from clipfold.runtime.retrieval.index import Index, bundle_identity
from clipfold.runtime.serve.config import ServeConfig

try:  # the serve extra: pip install clipfold[serve]
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from clipfold.runtime.serve.metrics import JsonLogFormatter
    from clipfold.runtime.serve.server import ClipfoldServer, error_response
    _MISSING: ImportError | None = None
except ImportError as exc:  # reported by create_app, so `import clipfold.runtime.serve.app` always works
    _MISSING = exc

log = logging.getLogger("clipfold.serve")


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


def uvicorn_options(server: "ClipfoldServer") -> dict[str, Any]:
    """uvicorn settings for ``server``: its HTTP limits (header bytes and time, connections) and logging."""
    from clipfold.runtime.serve.connection_limits import HttpLimits, limited_http_protocol

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
        return error_response(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

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
