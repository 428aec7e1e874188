"""The work of a request that runs in the thread pool, shared by the HTTP and gRPC faces: decode
images one at a time within the server-wide pixel budget and preprocess them, clean and embed texts,
search an index. Work past the request's deadline stops between images (or texts)."""

from __future__ import annotations

import contextlib
import time

import numpy as np

from clipfold.errors import ImageError, RequestError
from clipfold.runtime.images import load_image, open_image
from clipfold.runtime.preprocess import preprocess_one
from clipfold.runtime.serve.limits import PayloadTooLarge, RequestTimeout
from clipfold.runtime.serve.models import ServedModel


class RequestWork:
    """Mixed into :class:`~clipfold.runtime.serve.server.ClipfoldServer` (uses its ``config`` and
    ``pixel_budget``)."""

    def text_ready(self, m: ServedModel) -> None:
        """Open the text tower once (under the model's lock); embedding is thread-safe after that,
        so a long text request holds no lock while its texts are cleaned."""
        require_text(m)
        with m.lock:
            m.engine.text_encoder()

    def check_texts(self, texts) -> None:
        limit = self.config.max_text_bytes
        for i, text in enumerate(texts):
            size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
            if size > limit:
                raise PayloadTooLarge(f"text {i} is {size:,} bytes; this server takes at most {limit:,} per text "
                                      "(only the first context-length tokens of a text count)")

    def embed_texts(self, m: ServedModel, texts: list[str], deadline: float | None = None):
        """Texts cleaned one at a time outside any lock; past ``deadline`` the rest are not cleaned."""
        self.check_texts(texts)
        self.text_ready(m)
        encoder = m.engine.text_encoder()
        cleaned = []
        for text in texts:
            if deadline is not None and time.monotonic() > deadline:
                raise RequestTimeout("the request passed its time limit; its remaining texts were not cleaned")
            cleaned.append(encoder.clean(text))
        return encoder.embed(cleaned, cleaned=True)

    def search_text(self, m: ServedModel, text: str, k: int):
        self.check_texts([text])
        self.text_ready(m)
        return m.index.search(m.engine, text=text, k=k)

    @contextlib.contextmanager
    def decoded(self, data: bytes, deadline: float | None):
        """One decoded image, holding its pixels in the server-wide budget until the block ends."""
        if deadline is not None and time.monotonic() > deadline:
            raise RequestTimeout("the request passed its time limit; its remaining images were not decoded")
        image = open_image(data, self.config.max_image_pixels)  # the header only: size checked, no pixel yet
        try:
            with self.pixel_budget.hold(image.width * image.height, deadline):
                yield load_image(image, self.config.max_image_pixels)
        finally:
            image.close()  # frees the pixels now, not when the garbage collector gets to it

    def decode_pixels(self, m: ServedModel, images: list[bytes], deadline: float | None = None) -> np.ndarray:
        """Decode and preprocess one image at a time: a request holds one decoded image, not all of them."""
        spec = m.engine.manifest.preprocess
        out = np.empty((len(images), 3, *spec.image_size), np.uint8)
        for i, data in enumerate(images):
            try:
                with self.decoded(data, deadline) as image:
                    out[i] = preprocess_one(image, spec)
            except ImageError as exc:
                raise type(exc)(f"image {i}: {exc}") from None
        return out

    def search_image(self, m: ServedModel, data: bytes, k: int, deadline: float | None):
        try:
            with self.decoded(data, deadline) as image:
                return m.index.search(m.engine, image=image, k=k)
        except ImageError as exc:
            raise type(exc)(f"image 0: {exc}") from None


def require_text(m: ServedModel) -> None:
    if m.engine.manifest.text is None:
        raise RequestError(f"model {m.name!r} has no text tower; compile its bundle with --text for text queries")
