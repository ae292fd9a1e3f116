"""uvicorn's multi-worker mode with TCP_NODELAY on every connection.

uvicorn's ``Config.bind_socket()`` leaves the listening socket's ``proto`` at 0; accepted sockets
inherit it, and asyncio only sets TCP_NODELAY when ``proto == IPPROTO_TCP``. Nagle's algorithm then
holds each response until the client's delayed ACK: ~40 ms on every keep-alive request (uvicorn issue
#3149; measured here: +45 ms per request with ``--workers 2``). The single-worker path is unaffected.
The config class lives at module level because the worker processes unpickle it.
"""

from __future__ import annotations

import inspect
import socket
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess


class TcpConfig(uvicorn.Config):
    def bind_socket(self) -> socket.socket:
        sock = super().bind_socket()
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto != socket.IPPROTO_TCP:
            sock = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
            sock.set_inheritable(True)
        return sock


def run_workers(app_import: str, workers: int, **kwargs: Any) -> None:
    """What ``uvicorn.run(app_import, factory=True, workers=n)`` does, with TcpConfig's socket."""
    config = TcpConfig(app_import, factory=True, workers=workers, **kwargs)
    sock = config.bind_socket()
    if "target" in inspect.signature(Multiprocess).parameters:  # older uvicorn
        Multiprocess(config, target=uvicorn.Server(config).run, sockets=[sock]).run()
    else:
        Multiprocess(config, sockets=[sock]).run()
