"""The Open Inference Protocol v2 over HTTP (KServe v2 / NVIDIA Triton): health, server and model
metadata, model config, repository index and ``infer`` with JSON tensors or the binary tensor data
extension (runtime/serve/inference_protocol.py parses and encodes them)."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from clipfold.errors import RequestError
from clipfold.runtime.serve.inference_protocol import (
    HEADER_LENGTH,
    TensorMeta,
    encode_infer_response,
    parse_infer_request,
)
from clipfold.runtime.serve.json_query import INLINE_PARSE_BYTES
from clipfold.runtime.serve.models import VERSION, platform_of


class InferenceProtocolRoutes:
    """The protocol's handlers, mixed into :class:`~clipfold.runtime.serve.server.ClipfoldServer`."""

    async def server_metadata(self, request: Request) -> Response:
        from clipfold import __version__

        return JSONResponse({"name": "clipfold", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def server_ready(self, request: Request) -> Response:
        return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 503)

    async def model_metadata(self, request: Request) -> Response:
        m = self.model(request)
        return JSONResponse({"name": m.name, "versions": [VERSION], "platform": platform_of(m),
                             "inputs": [t.to_json() for t in m.inputs], "outputs": [t.to_json() for t in m.outputs]})

    async def model_ready(self, request: Request) -> Response:
        m = self.model(request)
        return JSONResponse({"name": m.name, "ready": self.ready}, status_code=200 if self.ready else 503)

    async def model_config(self, request: Request) -> Response:
        m = self.model(request)

        def dims(t: TensorMeta) -> dict:
            return {"name": t.name, "data_type": f"TYPE_{'STRING' if t.datatype == 'BYTES' else t.datatype}",
                    "dims": list(t.shape[1:]) or [1]}
        config: dict[str, Any] = {"name": m.name, "platform": platform_of(m), "max_batch_size": self.config.max_batch,
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
            self.check_texts(req.inputs["text"])
            try:
                texts = [t.decode("utf-8") for t in req.inputs["text"]]
            except UnicodeDecodeError as exc:
                raise RequestError(f"input 'text' must be UTF-8: {exc}") from None
            embedded = await run_in_threadpool(self.embed_texts, m, texts, request.state.deadline)
            out = {"embedding": embedded.embeddings, "truncated": embedded.truncated}
        content, headers = encode_infer_response(m.name, VERSION, req.id, {n: (out[n], b) for n, b in req.outputs.items()})
        return Response(content, headers=headers,
                        media_type="application/octet-stream" if headers else "application/json")
