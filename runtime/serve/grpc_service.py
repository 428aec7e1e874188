"""The Open Inference Protocol's gRPC face (KServe v2 ``inference.GRPCInferenceService``). No torch.

It serves the same :class:`~.server.ClipfoldServer` as HTTP, on its own port and in the same event
loop: the same models, batchers (a gRPC row and an HTTP row can share an engine call), limits,
metrics (``clipfold_requests{endpoint="grpc_ModelInfer", code="OK"}``) and drain (stopped with a
grace period before the batchers close). The message classes and the servicer base are the
generated stubs that ``tritonclient[grpc]`` ships (``service_pb2``, ``model_config_pb2``), so a
stock ``tritonclient.grpc`` client (sync or aio) works unchanged.

Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig,
RepositoryIndex, ModelInfer (``raw_input_contents`` or typed contents) and ModelStreamInfer (each
streamed request goes through the batcher as it arrives; answers come as they finish, matched by
``id``; a bad one answers ``error_message`` and the stream goes on). An image model also takes
``image`` (BYTES: encoded image files, decoded and preprocessed by the server) instead of
``pixels``. The rest (statistics, shared memory, model control, trace and log settings) answer
UNIMPLEMENTED.

Bad input answers INVALID_ARGUMENT, an unknown model or version NOT_FOUND, a message over
``max_body_bytes``, an image over ``max_image_pixels`` or a full queue RESOURCE_EXHAUSTED, a
draining server UNAVAILABLE, the request time limit DEADLINE_EXCEEDED; only a bug answers
INTERNAL (and is logged). No failure reaches the server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from clipfold.errors import (
    BatcherClosedError,
    BundleError,
    ConfigError,
    DecompressionBombError,
    ImageError,
    QueueFullError,
    RequestError,
)
from clipfold.runtime.serve.grpc_tensors import parse_request, response_tensors
from clipfold.runtime.serve.inference_protocol import TensorMeta
from clipfold.runtime.serve.limits import PayloadTooLarge, RequestTimeout
from clipfold.runtime.serve.models import VERSION, UnknownModel, platform_of

try:  # the serve extra
    import grpc
    from tritonclient.grpc import model_config_pb2 as mc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc
    _MISSING: ImportError | None = None
    _Servicer: Any = pb_grpc.GRPCInferenceServiceServicer
except ImportError as exc:
    _MISSING, _Servicer = exc, object

log = logging.getLogger("clipfold.serve")
# What an image model takes instead of ``pixels``: encoded image files, one per row.
IMAGE_INPUT = TensorMeta("image", "BYTES", (-1,))


class _Failed(Exception):
    def __init__(self, code, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def status_of(exc: BaseException) -> tuple[Any, str]:
    """The gRPC status code and message for a request's failure."""
    if isinstance(exc, UnknownModel):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, (PayloadTooLarge, DecompressionBombError, QueueFullError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, BatcherClosedError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, (asyncio.TimeoutError, RequestTimeout)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the request took longer than the server's time limit"
    if isinstance(exc, (RequestError, ImageError, ConfigError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, BundleError):  # a bundle file changed or broke on disk after the server opened it
        log.error("bundle refused: %s", exc, extra={"fields": {"error": type(exc).__name__}})
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    log.exception("grpc request failed", exc_info=exc, extra={"fields": {"error": type(exc).__name__}})
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the server logged it"


def _datatype(t: TensorMeta) -> str:
    return f"TYPE_{'STRING' if t.datatype == 'BYTES' else t.datatype}"


class GrpcService(_Servicer):
    """``inference.GRPCInferenceService`` over a :class:`~.server.ClipfoldServer`."""

    def __init__(self, server):
        self.s = server
        self.config = server.config

    # --- plumbing ---------------------------------------------------------------------------
    async def _guarded(self, method: str, model: str, fn: Callable[[], Awaitable]):
        """Run ``fn`` under the request time limit, count it in the shared metrics and log it; a
        failure raises :class:`_Failed` with its status code."""
        start, code, failure = time.perf_counter(), "CANCELLED", None
        try:
            result = await asyncio.wait_for(fn(), self.config.timeout_s)
            code = "OK"
            return result
        except Exception as exc:  # noqa: BLE001 - one request's failure must not reach the server
            status, message = status_of(exc)
            code, failure = status.name, _Failed(status, message)
        finally:
            label = model if model in self.s.models else ("" if not model else "<unknown>")
            seconds = time.perf_counter() - start
            self.s.metrics.requests.labels(endpoint=f"grpc_{method}", model=label, code=code).inc()
            self.s.metrics.latency.labels(endpoint=f"grpc_{method}").observe(seconds)
            log.info("request", extra={"fields": {"endpoint": f"grpc_{method}", "model": label, "status": code,
                                                  "ms": round(seconds * 1000, 3)}})
        raise failure

    async def _unary(self, context, method: str, model: str, fn: Callable[[], Awaitable]):
        try:
            return await self._guarded(method, model, fn)
        except _Failed as failed:
            await context.abort(failed.code, failed.message)

    def refusing_malformed(self, method: str, impl):
        async def call(request, context):
            if isinstance(request, _Malformed):
                self.s.metrics.requests.labels(endpoint=f"grpc_{method}", model="", code="INVALID_ARGUMENT").inc()
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await impl(request, context)
        return call

    def _model(self, name: str, version: str = ""):
        model = self.s.models.get(name)
        if model is None:
            raise UnknownModel(f"unknown model {name[:100]!r}; served: {sorted(self.s.models)}")
        if version not in ("", VERSION):
            raise UnknownModel(f"model {name!r} has no version {version[:40]!r}; it has version {VERSION!r}")
        return model

    def _inputs(self, m) -> tuple[TensorMeta, ...]:
        return (*m.inputs, IMAGE_INPUT) if m.kind == "image" else m.inputs

    # --- health and metadata ----------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.s.ready)

    async def ModelReady(self, request, context):
        # As Triton: an unknown model or version is not ready (no error).
        m = self.s.models.get(request.name)
        return pb.ModelReadyResponse(ready=bool(m is not None and request.version in ("", VERSION) and self.s.ready))

    async def ServerMetadata(self, request, context):
        from clipfold import __version__

        return pb.ServerMetadataResponse(name="clipfold", version=__version__, extensions=["binary_tensor_data"])

    async def ModelMetadata(self, request, context):
        async def answer():
            m = self._model(request.name, request.version)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=m.name, versions=[VERSION], platform=platform_of(m),
                inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in self._inputs(m)],
                outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in m.outputs])
        return await self._unary(context, "ModelMetadata", request.name, answer)

    async def ModelConfig(self, request, context):
        async def answer():
            m = self._model(request.name, request.version)
            alternatives = m.kind == "image"  # pixels or image: each optional, one of them required
            config = mc.ModelConfig(
                name=m.name, platform=platform_of(m), max_batch_size=self.config.max_batch,
                input=[mc.ModelInput(name=t.name, data_type=mc.DataType.Value(_datatype(t)),
                                     dims=list(t.shape[1:]) or [1], optional=alternatives) for t in self._inputs(m)],
                output=[mc.ModelOutput(name=t.name, data_type=mc.DataType.Value(_datatype(t)),
                                       dims=list(t.shape[1:]) or [1]) for t in m.outputs])
            if m.kind == "image":
                config.dynamic_batching.max_queue_delay_microseconds = int(self.config.max_delay_ms * 1000)
                config.dynamic_batching.preferred_batch_size.append(m.batcher.preferred_batch)
            return pb.ModelConfigResponse(config=config)
        return await self._unary(context, "ModelConfig", request.name, answer)

    async def RepositoryIndex(self, request, context):
        state = "READY" if self.s.ready else "UNAVAILABLE"
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(
            name=n, version=VERSION, state=state) for n in self.s.models])

    # --- inference --------------------------------------------------------------------------
    async def ModelInfer(self, request, context):
        return await self._unary(context, "ModelInfer", request.model_name, lambda: self._infer(request))

    async def ModelStreamInfer(self, request_iterator, context):
        """Answers in the order they finish; at most ``max_queue`` requests of a stream in flight."""
        answers: asyncio.Queue = asyncio.Queue()
        room = asyncio.Semaphore(self.config.max_queue)
        pending: set[asyncio.Task] = set()

        async def one(request) -> None:
            try:
                response = await self._guarded("ModelStreamInfer", request.model_name, lambda: self._infer(request))
                answers.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
            except _Failed as failed:
                answers.put_nowait(pb.ModelStreamInferResponse(
                    error_message=f"{failed.code.name}: {failed.message}",
                    infer_response=pb.ModelInferResponse(model_name=request.model_name[:200], id=request.id[:200])))
            finally:
                room.release()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await room.acquire()
                    task = asyncio.ensure_future(one(request))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                if pending:
                    await asyncio.wait(list(pending))
            finally:
                answers.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader  # a failure reading the stream ends it with that failure's status
        finally:
            for task in (reader, *pending):
                task.cancel()

    async def _infer(self, request):
        if isinstance(request, _Malformed):
            raise RequestError(request.message)
        s, m = self.s, self._model(request.model_name, request.model_version)
        deadline = time.monotonic() + self.config.timeout_s  # decoding stops there, as over HTTP
        alternatives = (IMAGE_INPUT,) if m.kind == "image" else ()
        loop = asyncio.get_running_loop()
        if any(t.HasField("contents") for t in request.inputs):  # typed values: numpy conversion off the loop
            req = await loop.run_in_executor(None, parse_request, request, m.inputs, m.outputs, alternatives,
                                             self.config.max_batch)
        else:
            req = parse_request(request, m.inputs, m.outputs, alternatives, self.config.max_batch)
        rows = len(next(iter(req.inputs.values())))
        if rows > self.config.max_batch:  # the model config's max_batch_size, enforced as Triton does
            raise RequestError(f"{rows} rows in one request; model {m.name!r} takes at most {self.config.max_batch} "
                               "(its max_batch_size)")
        if m.kind == "image":
            if "image" in req.inputs:
                if rows > self.config.max_items:
                    raise RequestError(f"{rows} images in one request; this server decodes at most "
                                       f"{self.config.max_items} per request")
                pixels = await loop.run_in_executor(None, s.decode_pixels, m, list(req.inputs["image"]), deadline)
            else:
                pixels = req.inputs["pixels"]
            out = await s.rows(m, pixels)
        else:
            try:
                texts = [t.decode("utf-8") for t in req.inputs["text"]]
            except UnicodeDecodeError as exc:
                raise RequestError(f"input 'text' must be UTF-8: {exc}") from None
            embedded = await loop.run_in_executor(None, s.embed_texts, m, texts)
            out = {"embedding": embedded.embeddings, "truncated": embedded.truncated}
        metas, raws = response_tensors({name: out[name] for name in req.outputs})
        return pb.ModelInferResponse(model_name=m.name, model_version=VERSION, id=req.id,
                                     outputs=[pb.ModelInferResponse.InferOutputTensor(**meta) for meta in metas],
                                     raw_output_contents=raws)


class _Malformed:
    """A message that does not parse as its protobuf type: answered INVALID_ARGUMENT by the service
    (grpc's own deserializer would answer INTERNAL)."""

    model_name = name = id = model_version = version = ""

    def __init__(self, message: str):
        self.message = message


def _parser(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
            return _Malformed(f"the {cls.__name__} message cannot be parsed: {str(exc)[:200]}")
    return parse


# The service's methods that clipfold implements; the others answer UNIMPLEMENTED.
IMPLEMENTED = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
               "RepositoryIndex", "ModelInfer", "ModelStreamInfer")


def _handlers(service: GrpcService):
    """The generated stubs' method table, with a deserializer that refuses a malformed message by name."""
    desc = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in desc.methods:
        if method.name not in IMPLEMENTED:
            continue
        request_cls, response_cls = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        impl = getattr(service, method.name)
        if method.client_streaming:  # ModelStreamInfer: a malformed message gets an error_message answer
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                impl, request_deserializer=_parser(request_cls), response_serializer=response_cls.SerializeToString)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                service.refusing_malformed(method.name, impl), request_deserializer=_parser(request_cls),
                response_serializer=response_cls.SerializeToString)
    return grpc.method_handlers_generic_handler(desc.full_name, handlers)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_port(host: str, port: int) -> None:
    """Refuse, before any model is opened, a gRPC port that another process already listens on."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen for gRPC on {_address(host, port)} ({exc.strerror}); choose another "
                              "port with --grpc-port, or turn gRPC off with --grpc-port 0") from None


async def start_grpc(server, port: int):
    """Start serving ``server``'s models over gRPC on ``config.host:port`` in the running event loop;
    returns the ``grpc.aio.Server`` (stop it with :func:`stop_grpc`)."""
    if _MISSING is not None:
        from clipfold.errors import BackendUnavailableError

        raise BackendUnavailableError(f"the gRPC endpoint needs the serve extra ({_MISSING.name} is missing): "
                                      "pip install 'clipfold[serve]', or --grpc-port 0")
    config = server.config
    g = grpc.aio.server(options=[("grpc.max_receive_message_length", config.max_body_bytes),
                                 ("grpc.max_send_message_length", -1),
                                 ("grpc.so_reuseport", 0)])  # a port in use is an error, not shared
    g.add_generic_rpc_handlers((_handlers(GrpcService(server)),))
    try:
        bound = g.add_insecure_port(_address(config.host, port))
    except RuntimeError:
        bound = 0
    if bound != port:
        await g.stop(None)
        raise ConfigError(f"cannot listen for gRPC on {_address(config.host, port)} (is the port in use?); "
                          "choose another with --grpc-port, or turn gRPC off with --grpc-port 0")
    await g.start()
    return g


async def stop_grpc(g, grace_s: float) -> None:
    """Refuse new calls and let the ones in flight finish (at most ``grace_s``)."""
    await g.stop(grace_s)
