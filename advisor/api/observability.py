"""Request id, body size limit, Prometheus metrics and one JSON log line per request.

One pure ASGI middleware (no BaseHTTPMiddleware: it would buffer responses and cost latency) that
sits outside the routes, so every response, errors and 413s included, gets an ``X-Request-ID``
header, a log line and a metric sample. Metrics are labelled by route *template*
(``/v1/gpus/{gpu_id}``), never by raw path, to keep label cardinality bounded.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from advisor.api.errors import Problem, is_openai_path

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
ACCESS_LOGGER = "advisor.access"
#: method label values: anything else (WebDAV verbs, made-up names) is one value, "other", so a caller
#: without a key cannot make one time series per request (5,000 random methods made 5,006 series)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER = "other"
UNMATCHED = "<unmatched>"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The service's Prometheus metrics, in a registry of their own (one per app: tests build many)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "advisor_http_requests",
            "HTTP requests by method, route template and status",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "advisor_http_request_duration_seconds",
            "HTTP request latency by method, route template and status",
            ("method", "route", "status"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "advisor_http_requests_in_flight",
            "HTTP requests being served",
            registry=self.registry,
            multiprocess_mode="livesum",
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """One sample; labels come from closed sets (method_label, a route template, a 3-digit status)."""
        labels = (method_label(method), route, str(status) if 100 <= status <= 599 else OTHER)
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The text format; with several workers (PROMETHEUS_MULTIPROC_DIR set) the sum over all."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ---- logging ---------------------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and the record's `fields` dict merged in."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(level: str = "info") -> None:
    """JSON lines on stderr for the `advisor` loggers; idempotent. Called by `advisor serve`, not by
    create_app, so that building apps (in tests) changes no global logging state."""
    logger = logging.getLogger("advisor")
    logger.setLevel(level.upper())
    if not any(getattr(h, "_advisor_json", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler._advisor_json = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


# ---- middleware ------------------------------------------------------------------------------------
class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` when a streamed body passes the limit; FastAPI re-raises HTTPExceptions."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body over the {limit} byte limit")


class BodyTimeout(StarletteHTTPException):
    """Raised from `receive` when the next piece of a body does not come in time (a slow or stalled
    client holding a worker); FastAPI re-raises HTTPExceptions, the error handlers answer 408."""

    def __init__(self, seconds: float) -> None:
        super().__init__(status_code=408, detail=f"the request body stalled: nothing arrived for {seconds:g} s")


DISK_FULL_DETAIL = (
    "the server's disk is full: nothing was written. To fix: delete files you no longer need "
    "(DELETE /v1/files/{id}) or ask the operator to free space"
)


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a full disk or quota: OSError ENOSPC/EDQUOT/EFBIG, or
    SQLite's "database or disk is full" (SQLITE_FULL, wrapped by SQLAlchemy)."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        if "database or disk is full" in str(cur)[:500]:
            return True
        cur, seen = cur.__cause__ or cur.__context__, seen + 1
    return False


def method_label(method: str) -> str:
    """The method's metric label: itself when it is a standard method, else "other"."""
    return method if method in KNOWN_METHODS else OTHER


def _route_template(scope: Scope) -> str:
    """The matched route's template (/v1/files/{file_id}); every path no route matched is one value."""
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return str(path) if path else UNMATCHED


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    """Request id in and out, body limit (413), metrics and the access log, around every request."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        max_body_bytes: int,
        body_limits: Mapping[str, int] | None = None,
        access_log: bool = True,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_limits = body_limits if body_limits is not None else {}  # path prefix -> bytes, read live
        self.access_log = access_log
        self.log = logging.getLogger(ACCESS_LOGGER)

    def limit_for(self, path: str) -> int:
        """The body limit of `path`: the longest registered prefix's, else the default."""
        best, limit = -1, self.max_body_bytes
        for prefix, nbytes in self.body_limits.items():
            if path.startswith(prefix) and len(prefix) > best:
                best, limit = len(prefix), nbytes
        return limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _VALID_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        received = 0
        limit = self.limit_for(scope.get("path", ""))
        settings = getattr(getattr(scope.get("app"), "state", None), "settings", None)
        body_timeout = getattr(settings, "request_body_timeout_s", None)
        body_done = False

        async def receive_limited() -> Message:
            nonlocal received, body_done
            if body_done or body_timeout is None:  # after the body: disconnect waits may last the response
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), body_timeout)
                except asyncio.TimeoutError:
                    raise BodyTimeout(body_timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        self.metrics.in_flight.inc()
        try:
            declared = _header(scope, b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                problem = Problem(413, "body_too_large", f"request body over the {limit} byte limit")
                response = problem.response(request_id, openai=is_openai_path(scope.get("path", "")))
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, receive_limited, send_with_id)
        except Exception as exc:
            if disk_full(exc) and not started:  # not a bug: the operator must free space; the caller can delete
                self.log.error("disk full", extra={"fields": {"request_id": request_id, "error": str(exc)[:200]}})
                problem = Problem(507, "insufficient_storage", DISK_FULL_DETAIL)
                response = problem.response(request_id, openai=is_openai_path(scope.get("path", "")))
                await response(scope, receive, send_with_id)
                return
            # the last line of defence: a bug, never an input, should get here; say so without details
            self.log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
            if not started:
                problem = Problem(500, "internal_error", "internal error; see the server log")
                response = problem.response(request_id, openai=is_openai_path(scope.get("path", "")))
                await response(scope, receive, send_with_id)
            else:  # the response is half sent: nothing sane left to do but drop the connection
                raise
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - start
            route = _route_template(scope)
            method = scope.get("method", "")
            self.metrics.observe(method, route, status, elapsed)
            if self.access_log:
                self.log.info(
                    "request",
                    extra={
                        "fields": {
                            "request_id": request_id,
                            "method": method,
                            "route": route,
                            "path": scope.get("path", ""),
                            "status": status,
                            "latency_ms": round(elapsed * 1000, 3),
                            "client": _client(scope.get("client")),
                        }
                    },
                )


def _client(client: Iterable[Any] | None) -> str | None:
    if not client:
        return None
    host, port = tuple(client)[:2]
    return f"{host}:{port}"
