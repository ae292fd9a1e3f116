"""Close connections that never finish sending a request head (slowloris).

Why: uvicorn's timeout_keep_alive only runs between requests, after a response; h11 itself has no
clock. A client that opens a connection and sends half a request line (or nothing, or one header byte
a minute) holds a socket and a protocol object for ever: 500 such sockets stayed open 45 s and counting.
This protocol starts a timer when a connection opens and whenever a new request starts arriving, and
closes the connection when the request's head (request line and headers) is not complete in time. A
slow *body* is bounded separately, by the request middleware (advisor.api.observability).

The timeout is ADVISOR_REQUEST_HEAD_TIMEOUT_S, read from the served app's settings (found through the
middleware chain), so one class (picklable by reference for uvicorn's worker processes) serves both
`advisor serve` modes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEAD_TIMEOUT_S = 10.0


def head_timeout_of(app: Any) -> float:
    """The request_head_timeout_s setting of the app behind uvicorn's wrappers (default when absent)."""
    for _ in range(8):
        settings = getattr(getattr(app, "state", None), "settings", None)
        timeout = getattr(settings, "request_head_timeout_s", None)
        if timeout is not None:
            return float(timeout)
        app = getattr(app, "app", None)
        if app is None:
            break
    return DEFAULT_HEAD_TIMEOUT_S


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline on each request's head."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timeout_s = head_timeout_of(self.app)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # still waiting for (the rest of) a request head
            self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self._head_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # no response: the client never finished asking
