"""What keeps slow or many clients from exhausting ``clipfold serve``'s connections: uvicorn's
httptools protocol with a cap on header bytes, a time limit for a request's headers, and a
connection cap that evicts the oldest connection still waiting for headers (so a liveness probe
gets in while slow clients hold connections). Imported only when serving (it needs uvicorn).

uvicorn has no header-time limit, and its header-size limit exists for h11 only; this hooks the
parser callbacks it already has (``on_message_begin``, ``on_headers_complete``,
``on_message_complete``). Bytes count toward the header limit while a request's headers are
incomplete, checked after each read (at most one 256 KiB read past the limit is parsed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 64 * 1024  # request line + headers of one request
    header_timeout_s: float = 10.0  # from a request's first byte (or the connection) to its last header
    max_connections: int = 512  # open connections; at the cap the oldest one waiting for headers is closed


_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


def limited_http_protocol(limits: HttpLimits, on_refused: Callable[[int], None] | None = None) -> type:
    """The protocol class enforcing ``limits`` (pass it to uvicorn as ``http=``).
    ``on_refused(status)`` is called for each connection closed by a limit (metrics)."""
    return type("LimitedHttpProtocol", (LimitedHttpProtocol,),
                {"limits": limits, "on_refused": staticmethod(on_refused or (lambda status: None))})


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol under :attr:`limits`; build it with :func:`limited_http_protocol`."""

    limits: HttpLimits = HttpLimits()

    @staticmethod
    def on_refused(status: int) -> None:
        """Called for each connection closed by a limit."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._awaiting, self._header_bytes, self._since, self._timer = True, 0, time.monotonic(), None
        self._arm()
        if len(self.connections) > self.limits.max_connections:
            waiting = [c for c in self.connections if c is not self and getattr(c, "_awaiting", False)
                       and (c.cycle is None or c.cycle.response_complete) and not c.transport.is_closing()]
            if waiting:
                min(waiting, key=lambda c: c._since)._refuse(503, "the server is at its connection limit and "
                                                             "closed this connection, which sent no request")
            else:
                self._refuse(503, f"the server holds its limit of {self.limits.max_connections} connections")

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting:
            self._header_bytes += len(data)
        super().data_received(data)
        if self._awaiting and self._header_bytes > self.limits.max_header_bytes and not self.transport.is_closing():
            self._refuse(431, f"the request line and headers exceed this server's limit of "
                              f"{self.limits.max_header_bytes:,} bytes")

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
            self._timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_timeout(self) -> None:
        self._timer = None
        if self._awaiting and (self.cycle is None or self.cycle.response_complete) \
                and not self.transport.is_closing():
            self._refuse(408, f"the request's headers did not arrive within {self.limits.header_timeout_s:g} s")

    def _refuse(self, status: int, message: str) -> None:
        body = ('{"error": "%s"}' % message).encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body)) + body)
        self.transport.close()
        self._disarm()
        self.on_refused(status)
