"""What keeps one client from exhausting ``clipfold serve``: pixels in flight, request bodies
(compressed or not), and HTTP connections. No torch.

* :class:`PixelBudget`: decoded pixels held at once across all requests. Each image holds its
  pixel count (read from its header) from decoding until its preprocessed rows exist; a caller
  past its deadline stops waiting (and stops its request's remaining images).
* :func:`decode_body`: ``Content-Encoding`` gzip or deflate, decompressed in bounded steps so a
  compressed bomb is refused once its output passes the body limit, never held whole.
* :func:`compress_response` / :func:`pick_encoding`: ``Accept-Encoding`` honoured for responses.

The limits on HTTP connections (header bytes and time, connection count) are in
runtime/serve/connection_limits.py.
"""

from __future__ import annotations

import threading
import time
import zlib
from contextlib import contextmanager
from typing import Iterator

from clipfold.errors import RequestError


class PayloadTooLarge(RequestError):
    """The body, or an image's pixel count, exceeds the server's limit (HTTP 413)."""


class RequestTimeout(RequestError):
    """The request passed its time limit; its remaining work was dropped (HTTP 504)."""


class UnsupportedEncoding(RequestError):
    """A ``Content-Encoding`` the server does not decode (HTTP 415)."""


class PixelBudget:
    """At most ``capacity`` decoded pixels held at once, across threads.

    An image larger than the whole budget still runs, alone, so a configuration whose per-image
    limit exceeds the budget cannot refuse every request (``ServeConfig`` keeps the budget >= it).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int, deadline: float | None = None) -> Iterator[None]:
        with self._cond:
            while self.used and self.used + pixels > self.capacity:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise RequestTimeout("the request passed its time limit while waiting to decode an image")
                self._cond.wait(remaining)
            self.used += pixels
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


# --- bodies --------------------------------------------------------------------------------------
_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}  # deflate: the zlib format (RFC 9110 8.4.1.2)


def decode_body(raw: bytes, encoding: str | None, limit: int) -> bytes:
    """``raw`` decoded per its ``Content-Encoding`` header; more than ``limit`` bytes of output
    raises :class:`PayloadTooLarge` without producing more than ``limit + 1`` bytes."""
    name = (encoding or "identity").strip().lower()
    if name in ("", "identity"):
        return raw
    if name not in _WBITS:
        raise UnsupportedEncoding(f"Content-Encoding {encoding[:40]!r} is not supported; send gzip, deflate or "
                                  "identity (one encoding)")
    wbits = _WBITS[name]
    if name == "deflate" and not (len(raw) >= 2 and raw[0] & 0x0F == 8 and (raw[0] << 8 | raw[1]) % 31 == 0):
        wbits = -15  # raw deflate without the zlib header, as some clients send it
    inflater = zlib.decompressobj(wbits)
    parts, size, data = [], 0, raw
    try:
        while data:
            part = inflater.decompress(data, limit + 1 - size)
            size += len(part)
            if size > limit:
                raise PayloadTooLarge(f"the {name} body decompresses to more than this server's limit of {limit:,} "
                                      "bytes")
            parts.append(part)
            data = inflater.unconsumed_tail
            if inflater.eof:
                break
    except zlib.error as exc:
        raise RequestError(f"the {name} body cannot be decompressed: {exc}") from None
    if not inflater.eof:
        raise RequestError(f"the {name} body is cut short (the compressed stream does not end)")
    if inflater.unused_data:
        raise RequestError(f"the {name} body has {len(inflater.unused_data)} bytes after its compressed stream")
    return b"".join(parts)


def pick_encoding(accept: str | None) -> str | None:
    """gzip or deflate if the ``Accept-Encoding`` header allows one (the higher q, gzip on a tie), else None."""
    if not accept:
        return None
    q: dict[str, float] = {}
    for item in accept.split(",")[:32]:
        name, _, params = item.partition(";")
        weight = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        q[name.strip().lower()] = weight
    star = q.get("*", 0.0)
    best = max(("gzip", "deflate"), key=lambda n: q.get(n, star))
    return best if q.get(best, star) > 0 else None


def compress_response(body: bytes, encoding: str) -> bytes:
    """The body compressed as ``encoding`` (gzip or deflate = zlib format)."""
    packer = zlib.compressobj(6, zlib.DEFLATED, 31 if encoding == "gzip" else 15)
    return packer.compress(body) + packer.flush()
