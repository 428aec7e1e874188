"""The page at ``/ui``: classify dropped images with every served model, search an index, and the
bundles' identity. No torch, no build step: three static files shipped in the package (``ui/``)
that call the same JSON endpoints as any client (``/v1/models/<name>/classify`` and ``search``),
plus two read-only routes of their own:

* ``GET /ui/models``: each image model's identity from its manifest (model, labels, variant,
  precision, parity and gate figures, index size);
* ``GET /ui/thumb/<model>?id=<path>``: a thumbnail of one indexed image. Only a path the
  model's index lists is served, and only if it resolves inside the index's own folder (no
  ``..``, absolute path or symlink leads out of it); anything else answers 404.

On by default only when the server listens on loopback (the thumbnails show the index's images);
``--ui`` / ``--no-ui`` decide explicitly.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

from clipfold.runtime.images import load_image
from clipfold.runtime.serve.models import UnknownModel

UI_DIR = Path(__file__).parent / "ui"
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
THUMBNAIL_PX = 256
# The page loads nothing from elsewhere and runs no inline script.
HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                      "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; "
                                      "form-action 'none'; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class NotIndexed(UnknownModel):
    """The thumbnail asked for is not an image of the model's index (HTTP 404)."""


def identity(m) -> dict:
    """What the page shows about one image model, from its bundle's manifest."""
    man, variant, engine = m.engine.manifest, m.engine.variant, m.engine

    def record(value):
        return None if value is None else dataclasses.asdict(value)
    return {"name": m.name, "model": man.model.name, "pretrained": man.model.pretrained,
            "family": man.model.family, "embed_dim": man.model.embed_dim, "labels": list(engine.labels),
            "max_k": engine.max_k, "method": (engine.head.head if engine.head is not None else man.head).method,
            "variant": {"name": variant.name, "precision": variant.precision, "format": variant.format,
                        "backends": list(variant.backends), "parity": record(variant.parity),
                        "gate": record(variant.gate)},
            "variants": [v.name for v in man.variants], "default_variant": man.default_variant,
            "text": man.text is not None, "index": None if m.index is None else {"images": len(m.index)}}


def thumbnail_path(index, rel: str) -> Path:
    """The file of indexed image ``rel``, or :class:`NotIndexed` (not listed, or outside the folder)."""
    if not isinstance(rel, str) or not rel or rel not in index.meta["files"]:
        raise NotIndexed(f"no image {str(rel)[:200]!r} in the index {index.path.name}")
    folder = Path(index.meta["folder"]).resolve()
    path = (folder / rel).resolve()
    if folder not in path.parents or not path.is_file():
        raise NotIndexed(f"image {rel[:200]!r} is not a file inside the indexed folder")
    return path


def _thumbnail(path: Path, max_pixels: int) -> bytes:
    image = load_image(path, max_pixels).convert("RGB")
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def ui_routes(server, route) -> list:
    """The page's routes; ``route(path, name, handler)`` wraps each like the server's own endpoints."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, Response

    s = server

    async def page(request):
        return Response((UI_DIR / "index.html").read_bytes(), media_type="text/html; charset=utf-8", headers=HEADERS)

    def static(name: str):
        async def serve_file(request):
            return Response((UI_DIR / name).read_bytes(), media_type=STATIC[name], headers=HEADERS)
        return serve_file

    async def models(request):
        return JSONResponse({"models": [identity(m) for m in s.models.values() if m.kind == "image"]})

    async def thumb(request):
        m = s.model(request, "image")
        if m.index is None:
            raise NotIndexed(f"model {m.name!r} has no index")
        path = thumbnail_path(m.index, request.query_params.get("id"))
        data = await run_in_threadpool(_thumbnail, path, s.config.max_image_pixels)
        return Response(data, media_type="image/jpeg", headers={**HEADERS, "Cache-Control": "private, max-age=300"})

    return [route("/ui", "ui", page), route("/ui/", "ui", page),
            *(route(f"/ui/{name}", "ui", static(name)) for name in STATIC),
            route("/ui/models", "ui_models", models), route("/ui/thumb/{model}", "ui_thumb", thumb)]
