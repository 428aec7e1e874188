"""What keeps one client from exhausting ``clipfold serve``: pixels in flight, request bodies
(compressed or not), and HTTP connections. No torch.

* :class:`PixelBudget`: decoded pixels held at once across all requests. Each image holds its
  pixel count (read from its header) from decoding until its preprocessed rows exist; a caller
  past its deadline stops waiting (and stops its request's remaining images).
* :func:`decode_body`: ``Content-Encoding`` gzip or deflate, decompressed in bounded steps so a
  compressed bomb is refused once its output passes the body limit, never held whole.
* :func:`compress_response` / :func:`pick_encoding`: ``Accept-Encoding`` honoured for responses.
* :func:`limited_http_protocol`: uvicorn's httptools protocol with a cap on header bytes, a time
  limit for a request's headers, and a connection cap that evicts the oldest connection still
  waiting for headers (so a liveness probe gets in while slow clients hold connections).
"""

from __future__ import annotations

import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
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


# --- connections -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 64 * 1024  # request line + headers of one request
    header_timeout_s: float = 10.0  # from a request's first byte (or the connection) to its last header
    max_connections: int = 512  # open connections; at the cap the oldest one waiting for headers is closed


_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


def limited_http_protocol(limits: HttpLimits, on_refused=None):
    """A subclass of uvicorn's httptools protocol enforcing ``limits`` (pass it as ``http=``).
    ``on_refused(status)`` is called for each connection closed by a limit (metrics).

    uvicorn has no header-time limit, and its header-size limit exists for h11 only; this hooks
    the parser callbacks it already has (``on_message_begin``, ``on_headers_complete``,
    ``on_message_complete``). Bytes count toward the header limit while a request's headers are
    incomplete, checked after each read (at most one 256 KiB read past the limit is parsed)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class LimitedHttpProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._awaiting, self._header_bytes, self._since, self._timer = True, 0, time.monotonic(), None
            self._arm()
            if len(self.connections) > limits.max_connections:
                waiting = [c for c in self.connections if c is not self and getattr(c, "_awaiting", False)
                           and (c.cycle is None or c.cycle.response_complete) and not c.transport.is_closing()]
                if waiting:
                    min(waiting, key=lambda c: c._since)._refuse(503, "the server is at its connection limit and "
                                                                 "closed this connection, which sent no request")
                else:
                    self._refuse(503, f"the server holds its limit of {limits.max_connections} connections")

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._awaiting:
                self._header_bytes += len(data)
            super().data_received(data)
            if self._awaiting and self._header_bytes > limits.max_header_bytes and not self.transport.is_closing():
                self._refuse(431, f"the request line and headers exceed this server's limit of "
                                  f"{limits.max_header_bytes:,} bytes")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._awaiting = True
            self._arm()

        def on_headers_complete(self) -> None:
            self._awaiting, self._header_bytes = False, 0
            self._disarm()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._awaiting, self._header_bytes, self._since = True, 0, time.monotonic()

        def _arm(self) -> None:
            if self._timer is None:
                self._timer = self.loop.call_later(limits.header_timeout_s, self._header_timeout)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _header_timeout(self) -> None:
            self._timer = None
            if self._awaiting and (self.cycle is None or self.cycle.response_complete) \
                    and not self.transport.is_closing():
                self._refuse(408, f"the request's headers did not arrive within {limits.header_timeout_s:g} s")

        def _refuse(self, status: int, message: str) -> None:
            body = ('{"error": "%s"}' % message).encode()
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                                 b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body)) + body)
            self.transport.close()
            self._disarm()
            if on_refused is not None:
                on_refused(status)

    return LimitedHttpProtocol
