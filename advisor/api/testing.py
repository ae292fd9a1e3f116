"""A real uvicorn server for an app, on loopback, in a background thread: for tests and benchmarks.

Requests then cross a real socket, HTTP parser and middleware stack, as they do in production.
Binds 127.0.0.1 only, on a free port chosen by the OS.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def serve_in_thread(app: Any, *, startup_timeout_s: float = 20.0) -> Iterator[str]:
    """Yield the base URL (``http://127.0.0.1:<port>``) of `app` served by uvicorn until the block ends."""
    import uvicorn

    # IPPROTO_TCP explicitly: with proto 0 asyncio skips TCP_NODELAY and keep-alive requests wait
    # ~40 ms on delayed ACKs (uvicorn issue #3149)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    from advisor.api.slowclients import HeadTimeoutH11Protocol

    # the same protocol as `advisor serve` (request head deadline)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", http=HeadTimeoutH11Protocol)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
