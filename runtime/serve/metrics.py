"""``clipfold serve``'s Prometheus metrics and its one-JSON-object-per-line log format."""

from __future__ import annotations

import json
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Prometheus metrics in a registry of their own (one per app, so tests can run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("clipfold_requests", "HTTP requests by endpoint, model and status code",
                                ["endpoint", "model", "code"], registry=r)
        self.latency = Histogram("clipfold_request_duration_seconds", "request latency by endpoint", ["endpoint"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.batch = Histogram("clipfold_batch_size", "rows per engine call", ["model"],
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.engine = Histogram("clipfold_batch_duration_seconds", "engine time per batch", ["model"],
                                buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=r)
        self.queue = Gauge("clipfold_queue_depth", "rows waiting for a batch", ["model"], registry=r)
        self.aborts = Counter("clipfold_client_aborts", "requests whose client disconnected before the answer",
                              ["endpoint"], registry=r)
        self.refused = Counter("clipfold_connections_refused", "connections closed by a limit, by HTTP status "
                               "(408 header time, 431 header size, 503 connection cap)", ["code"], registry=r)
        self.pixels = Gauge("clipfold_pixels_in_flight", "decoded image pixels held by requests", registry=r)

    def on_batch(self, model: str):
        batch, engine = self.batch.labels(model=model), self.engine.labels(model=model)

        def record(rows: int, seconds: float) -> None:
            batch.observe(rows)
            engine.observe(seconds)
        return record


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                 "msg": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
