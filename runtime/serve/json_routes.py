"""The plain JSON API under ``/v1/models/<name>/``: ``classify`` and ``embed`` take encoded images
(multipart upload, base64 in JSON, or a raw image body; runtime/serve/json_query.py reads them) and
do the preprocessing; ``embed`` also takes text; ``search`` answers from an index; ``/v1/models``
lists the models and ``/metrics`` is Prometheus's."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from clipfold.errors import RequestError
from clipfold.runtime.serve.json_query import int_param, read_query


class JsonRoutes:
    """The JSON API's handlers, mixed into :class:`~clipfold.runtime.serve.server.ClipfoldServer`."""

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"models": [
            {"name": m.name, "labels": len(m.engine.labels), "max_k": m.engine.max_k,
             "text": m.engine.manifest.text is not None, "index": None if m.index is None else len(m.index)}
            for m in self.models.values() if m.kind == "image"]})

    async def classify(self, request: Request) -> Response:
        m = self.model(request, "image")
        images, params = await self._images_and_params(request)
        k = int_param(params, "k", min(5, m.engine.max_k), 1, m.engine.max_k)
        pixels = await run_in_threadpool(self.decode_pixels, m, images, request.state.deadline)
        out = await self.rows(m, pixels)
        labels = m.engine.labels
        return JSONResponse({"model": m.name, "predictions": [
            [{"label": labels[int(i)], "score": float(s), "index": int(i)} for s, i in zip(scores[:k], indices[:k])]
            for scores, indices in zip(out["scores"], out["indices"])]})

    async def embed(self, request: Request) -> Response:
        m = self.model(request, "image")
        texts, images, _ = await self._query(request, allow_many=True)
        if texts is not None:
            embedded = await run_in_threadpool(self.embed_texts, m, texts, request.state.deadline)
            return JSONResponse({"model": m.name, "embeddings": embedded.embeddings.tolist(),
                                 "truncated": embedded.truncated.tolist()})
        pixels = await run_in_threadpool(self.decode_pixels, m, images, request.state.deadline)
        out = await self.rows(m, pixels)
        return JSONResponse({"model": m.name, "embeddings": out["embedding"].tolist()})

    async def search(self, request: Request) -> Response:
        m = self.model(request, "image")
        if m.index is None:
            raise RequestError(f"model {m.name!r} has no index; start the server with --index INDEX built from it")
        texts, images, params = await self._query(request, allow_many=False)
        k = int_param(params, "k", 10, 1, 10_000)
        if texts is not None:
            result = await run_in_threadpool(self.search_text, m, texts[0], k)
        else:
            result = await run_in_threadpool(self.search_image, m, images[0], k, request.state.deadline)
        return JSONResponse({"model": m.name, "hits": [{"id": h.path, "score": h.score} for h in result.hits],
                             "query_truncated": result.query_truncated})

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def _query(self, request: Request, allow_many: bool, allow_text: bool = True):
        return await read_query(request, await self.body(request), self.config.max_items, allow_many, allow_text)

    async def _images_and_params(self, request: Request) -> tuple[list[bytes], dict]:
        texts, images, params = await self._query(request, allow_many=True, allow_text=False)
        return images, params
