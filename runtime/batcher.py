"""Dynamic batching across callers: rows from many requests, one engine call. No torch.

Why: an engine call has a fixed cost (graph launch, thread wake-ups, small-matrix inefficiency)
that batch 1 pays per image. A server with concurrent clients can instead wait a few
milliseconds, stack the rows that arrived meanwhile and pay it once per batch.

:class:`DynamicBatcher` takes rows (arrays whose first axis is the batch) from any thread,
queues them in a bounded queue, and one worker thread runs ``fn`` on up to ``max_batch`` rows at
a time: it starts a batch when ``preferred_batch`` rows are waiting (default ``max_batch``) or
``max_delay_ms`` after the oldest waiting job arrived, whichever is first, and takes every waiting
row up to ``max_batch``. A job is never split across batches; a job larger
than ``max_batch`` runs alone (``fn`` chunks it). Each caller gets a
:class:`concurrent.futures.Future` of its own slice of every output; asyncio code awaits it with
``asyncio.wrap_future``. When ``fn`` fails on a batch of several jobs, each job is run again
alone, so only the job that fails gets the error. A cancelled job leaves the queue at once.

Why a preferred batch below the maximum: waiting only pays while a bigger batch is cheaper per
row. A CPU engine is often compute-bound from a few rows on (the tiny model on 2 cores: 0.74 ms
per image alone, 0.40 in batches of 8, 0.37 of 32), and a batcher that holds 16 waiting rows for
a 32nd while the engine idles loses throughput to batch-1 serving. :func:`measure_preferred_batch` times the
engine at start-up and picks the smallest batch whose per-row time is within 10 % of the best;
a GPU engine, whose per-row time keeps falling, gets its maximum.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from clipfold.errors import BatcherClosedError, ConfigError, QueueFullError, RequestError

Outputs = Mapping[str, np.ndarray]
log = logging.getLogger(__name__)


@dataclass(eq=False)  # jobs are compared by identity (removing a cancelled one from the queue)
class _Job:
    rows: np.ndarray
    future: Future
    enqueued: float


class DynamicBatcher:
    """Batches rows for ``fn(rows) -> {name: array with the same first axis}``.

    ``row_shape``/``dtype`` (optional) are checked at :meth:`submit`, so one caller's wrong input
    is refused there and never fails a batch shared with others. ``on_batch(rows, seconds)`` is
    called after every engine call (metrics).
    """

    def __init__(self, fn: Callable[[np.ndarray], Outputs], *, max_batch: int = 32, max_delay_ms: float = 5.0,
                 max_queue: int = 1024, row_shape: tuple[int, ...] | None = None, dtype=None,
                 on_batch: Callable[[int, float], None] | None = None, name: str = "batcher",
                 preferred_batch: int | None = None):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}")
        preferred_batch = max_batch if preferred_batch is None else preferred_batch
        if isinstance(preferred_batch, bool) or not isinstance(preferred_batch, int) \
                or not 1 <= preferred_batch <= max_batch:
            raise ConfigError(f"preferred_batch must be an integer in [1, max_batch={max_batch}], got {preferred_batch!r}")
        if not 0 <= max_delay_ms <= 10_000:
            raise ConfigError(f"max_delay_ms must be between 0 and 10000, got {max_delay_ms!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < max_batch:
            raise ConfigError(f"max_queue (rows) must be an integer >= max_batch ({max_batch}), got {max_queue!r}")
        self.fn, self.max_batch, self.max_delay = fn, max_batch, max_delay_ms / 1000.0
        self.preferred_batch = preferred_batch
        self.max_queue, self.row_shape = max_queue, None if row_shape is None else tuple(row_shape)
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.on_batch, self.name = on_batch, name
        self._jobs: deque[_Job] = deque()
        self._queued = 0  # rows waiting
        self._closed = False
        self._cond = threading.Condition()
        self._worker = threading.Thread(target=self._loop, name=f"clipfold-{name}", daemon=True)
        self._worker.start()

    # --- callers ----------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Rows waiting for a batch (not counting the batch that is running)."""
        return self._queued

    def submit(self, rows: np.ndarray) -> Future:
        """Queue ``rows`` (first axis = batch); the future gives ``{name: array}`` for these rows."""
        rows = self._check(rows)
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise BatcherClosedError(f"{self.name} is shut down and takes no more requests")
            if self._queued + len(rows) > self.max_queue:
                raise QueueFullError(f"{self.name}: the queue holds {self._queued} rows and takes at most "
                                     f"{self.max_queue}; retry shortly")
            job = _Job(rows, future, time.monotonic())
            self._jobs.append(job)
            self._queued += len(rows)
            self._cond.notify()
        future.add_done_callback(lambda f, job=job: self._forget(job) if f.cancelled() else None)
        return future

    def _forget(self, job: _Job) -> None:
        """A caller cancelled before its job ran: free its place in the queue now."""
        with self._cond:
            try:
                self._jobs.remove(job)
            except ValueError:
                return  # already taken by the worker (which drops cancelled jobs)
            self._queued -= len(job.rows)

    def __call__(self, rows: np.ndarray, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Submit and wait: the in-process form of a request."""
        return self.submit(rows).result(timeout)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking work. ``drain``: finish every queued job first; otherwise fail them."""
        with self._cond:
            self._closed = True
            if not drain:
                while self._jobs:
                    job = self._jobs.popleft()
                    if job.future.set_running_or_notify_cancel():
                        job.future.set_exception(BatcherClosedError(f"{self.name} shut down before this job ran"))
                self._queued = 0
            self._cond.notify_all()
        self._worker.join(timeout)

    def __enter__(self) -> "DynamicBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check(self, rows) -> np.ndarray:
        if not isinstance(rows, np.ndarray) or rows.ndim < 1 or len(rows) < 1:
            raise RequestError(f"{self.name}: expected a numpy array with at least one row, got "
                               f"{getattr(rows, 'shape', type(rows).__name__)}")
        if self.row_shape is not None and rows.shape[1:] != self.row_shape:
            raise RequestError(f"{self.name}: each row must have shape {self.row_shape}, got {rows.shape[1:]}")
        if self.dtype is not None and rows.dtype != self.dtype:
            raise RequestError(f"{self.name}: rows must be {self.dtype}, got {rows.dtype}")
        return rows

    # --- the worker -------------------------------------------------------------------------
    def _take(self) -> list[_Job] | None:
        """Block until a batch is due; pop its jobs. None when closed and empty."""
        with self._cond:
            while not self._jobs:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._jobs[0].enqueued + self.max_delay
            while self._queued < self.preferred_batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            jobs, rows = [], 0
            while self._jobs and (not jobs or rows + len(self._jobs[0].rows) <= self.max_batch):
                job = self._jobs.popleft()
                self._queued -= len(job.rows)
                if job.future.set_running_or_notify_cancel():  # False: the caller gave up; drop its rows
                    jobs.append(job)
                    rows += len(job.rows)
            return jobs

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            if jobs:
                self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        rows = jobs[0].rows if len(jobs) == 1 else np.concatenate([j.rows for j in jobs])
        start = time.perf_counter()
        try:
            parts = self._split(self.fn(rows), jobs)
        except BaseException as exc:  # noqa: BLE001 - delivered to the callers, never raised in the worker
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
            else:  # one job's rows may be the cause: run each alone, so the others still get answers
                for job in jobs:
                    self._run([job])
            return
        self._record(len(rows), time.perf_counter() - start)
        for job, part in zip(jobs, parts):
            job.future.set_result(part)

    def _split(self, out: Outputs, jobs: list[_Job]) -> list[dict[str, np.ndarray]]:
        offsets = np.cumsum([0] + [len(j.rows) for j in jobs])
        for name, value in out.items():
            if len(value) != offsets[-1]:
                raise RuntimeError(f"{self.name}: output {name!r} has {len(value)} rows for {offsets[-1]} inputs")
        return [{name: value[a:b] for name, value in out.items()} for a, b in zip(offsets[:-1], offsets[1:])]

    def _record(self, rows: int, seconds: float) -> None:
        if self.on_batch is None:
            return
        try:
            self.on_batch(rows, seconds)
        except Exception:  # noqa: BLE001 - a metrics callback must not stop the worker
            log.exception("%s: on_batch callback failed", self.name)


def measure_preferred_batch(fn: Callable[[np.ndarray], Outputs], row: np.ndarray, max_batch: int,
                            tolerance: float = 0.10, repeats: int = 3, budget_s: float = 0.05,
                            max_repeats: int = 25, total_budget_s: float = 3.0,
                            clock: Callable[[], float] = time.perf_counter) -> tuple[int, dict[int, float]]:
    """The smallest batch whose per-row time is within ``tolerance`` of the best, timed on ``fn``.

    ``row`` is one input row (its values do not matter to the time). Batches of 1, 2, 4, ... and
    ``max_batch`` are each run once to warm up, then timed ``repeats`` times, or more until
    ``budget_s`` has passed (at most ``max_repeats``); the median counts, so a fast engine is
    timed often enough to be steady. A slow one is timed once per size once a size's calls exceed
    ``budget_s``, and no larger size is started after ``total_budget_s``: a server's start-up
    stays bounded, and the choice is then among the sizes measured.
    Returns the batch and the per-row seconds measured for each size.
    """
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}")
    if not 0 <= tolerance < 1:
        raise ConfigError(f"tolerance must be in [0, 1), got {tolerance!r}")
    if not 1 <= repeats <= max_repeats:
        raise ConfigError(f"repeats must be in [1, max_repeats={max_repeats}], got {repeats!r}")
    sizes = sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch} | {max_batch})
    per_row: dict[int, float] = {}
    began = clock()
    for size in sizes:
        if per_row and clock() - began > total_budget_s:
            log.info("preferred batch: stopped timing at batch %d after %.1f s", size, clock() - began)
            break
        rows = np.repeat(row[None], size, axis=0)
        fn(rows)
        times: list[float] = []
        while not times or (len(times) < max_repeats and (
                sum(times) < budget_s or (len(times) < repeats and times[0] < budget_s))):
            start = clock()
            fn(rows)
            times.append(clock() - start)
        per_row[size] = statistics.median(times) / size
    best = min(per_row.values())
    return next(s for s in per_row if per_row[s] <= best * (1 + tolerance)), per_row
