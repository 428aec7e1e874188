"""A clipfold server on loopback in a background thread, for the serving, gRPC and page tests."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                 timeout: float = 30):
    """One request on its own connection to 127.0.0.1:``port``: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


class LiveServer:
    """``create_app(server)`` under uvicorn on 127.0.0.1 with the options ``clipfold serve`` uses (its
    HTTP limits; its lifespan starts gRPC when the config has a port)."""

    def __init__(self, server):
        import uvicorn

        from clipfold.runtime.serve.app import create_app, uvicorn_options

        self.server, self.port = server, free_port()
        self.uvicorn = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=self.port,
                                                     **uvicorn_options(server)))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        return http_request(self.port, method, path, body, headers)

    def json(self, method: str, path: str, obj=None, **kw):
        body = None if obj is None else json.dumps(obj).encode()
        status, headers, raw = self.request(method, path, body, {"Content-Type": "application/json", **kw})
        return status, headers, json.loads(raw)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)


def hold_engine(server, model: str = "tiny") -> tuple[threading.Event, threading.Event]:
    """Make ``model``'s engine calls wait for the returned ``gate``; ``entered`` is set when one starts
    (to fill a queue deterministically)."""
    gate, entered = threading.Event(), threading.Event()
    batcher = server.models[model].batcher
    run = batcher.fn

    def held(rows):
        entered.set()
        gate.wait(10)
        return run(rows)

    batcher.fn = held
    return gate, entered
