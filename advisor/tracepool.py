"""A bounded pool for simulation traces: at most `workers` trace processes at once, at most `queue`
requests waiting for one, each waiting at most `queue_wait_s`, and every trace under a deadline.

Why: a trace is seconds to minutes of CPU and gigabytes of memory in a child process; without a bound
eight anonymous requests made nine processes and 2.8 GB RSS. A request over the bound is refused at once
(PoolFull: 429 with Retry-After) instead of piling up; one that waited its limit gives up (PoolTimeout:
503 with Retry-After). The pool counts slots only: each trace still runs in its own killable child
(advisor.simulated.runner), so a deadline or a departed client kills exactly that trace.

The bounds of the current request travel in a context variable (`bounds`) that the API sets around
the service call, so the estimator code between the route and the runner needs no new parameters.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass


class SimulationBusy(Exception):
    """The pool cannot take the trace now; `status` 429 (queue full) or 503 (waited too long)."""

    status = 503

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = max(1, math.ceil(retry_after_s))


class PoolFull(SimulationBusy):
    status = 429


class PoolTimeout(SimulationBusy):
    status = 503


class SimulationCancelled(Exception):
    """The caller went away; the trace was killed."""


class TracePool:
    """Counting slots with a bounded wait queue (thread-safe; the API's threads share one per app)."""

    def __init__(self, workers: int, queue: int, queue_wait_s: float):
        if workers < 1 or queue < 0 or queue_wait_s < 0:
            raise ValueError("workers >= 1, queue >= 0 and queue_wait_s >= 0")
        self.workers, self.queue, self.queue_wait_s = workers, queue, queue_wait_s
        self._cond = threading.Condition()
        self.running = 0
        self.waiting = 0

    @contextlib.contextmanager
    def slot(self, cancelled: Callable[[], bool] = lambda: False, max_wait_s: float | None = None) -> Iterator[None]:
        """Hold one worker slot for the body; PoolFull at once when every slot and queue place is taken,
        PoolTimeout after queue_wait_s (or `max_wait_s`, the request's deadline, when sooner),
        SimulationCancelled when `cancelled()` turns true while waiting."""
        with self._cond:
            if self.running >= self.workers and self.waiting >= self.queue:
                raise PoolFull(
                    f"all {self.workers} simulation workers are busy and {self.waiting} requests wait: try later",
                    self.queue_wait_s or 5,
                )
            self.waiting += 1
            try:
                wait_s = self.queue_wait_s if max_wait_s is None else max(0.0, min(self.queue_wait_s, max_wait_s))
                give_up = time.monotonic() + wait_s
                while self.running >= self.workers:
                    left = give_up - time.monotonic()
                    if left <= 0:
                        raise PoolTimeout(
                            f"no simulation worker was free within {wait_s:g} s: try later",
                            self.queue_wait_s or 5,
                        )
                    if cancelled():
                        raise SimulationCancelled("the client went away while waiting for a simulation worker")
                    self._cond.wait(min(left, 0.25))
            finally:
                self.waiting -= 1
            self.running += 1
        try:
            yield
        finally:
            with self._cond:
                self.running -= 1
                self._cond.notify()


@dataclass(frozen=True)
class Bounds:
    """What one request may use: the pool, a deadline (time.monotonic()) and a cancellation flag."""

    pool: TracePool
    deadline: float
    cancel: threading.Event

    def left_s(self) -> float:
        return self.deadline - time.monotonic()


#: the bounds of the request this thread serves; None outside the API (CLI, benches: unbounded as before)
bounds: contextvars.ContextVar[Bounds | None] = contextvars.ContextVar("simulation_bounds", default=None)
