"""``fission serve --metrics-port N``: ``/metrics`` on 127.0.0.1:N, without an API key.

Prometheus then scrapes a loopback port that answers nothing but metrics, and no admin key
needs to live in its configuration. The port is a second listening socket of the daemon's one
uvicorn server (same event loop, same shutdown); ``MetricsPort`` sends what arrives on it to
the metrics and everything else to the API.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fission.errors import InvalidInput, NotReady
from fission.server.metrics import CONTENT_TYPE, ServiceMetrics

LOOPBACK = "127.0.0.1"
METRICS_PATH = "/metrics"
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


def check_metrics_port(port: Any, api_port: int | None) -> int:
    """``port`` if it is a TCP port other than the API's; InvalidInput otherwise."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidInput(f"--metrics-port {port!r} is out of range: use 1 to 65535")
    if port == api_port:
        raise InvalidInput(f"--metrics-port {port} is the API's --port: choose another")
    return port


def metrics_socket(port: int) -> socket.socket:
    """A socket bound to 127.0.0.1:``port`` (never another address); NotReady if taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((LOOPBACK, port))
    except OSError as exc:
        sock.close()
        raise NotReady(
            f"--metrics-port {port}: cannot listen on {LOOPBACK}:{port} ({exc.strerror}): "
            "choose another port"
        ) from exc
    sock.set_inheritable(True)
    return sock


class MetricsPort:
    """ASGI router: requests on the metrics port get ``/metrics`` alone, others go to ``app``."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, port: int) -> None:
        self.app = app
        self.metrics = metrics
        self.port = port

    def _on_metrics_port(self, scope: Scope) -> bool:
        server = scope.get("server")
        return server is not None and tuple(server) == (LOOPBACK, self.port)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self._on_metrics_port(scope):
            await self.app(scope, receive, send)
            return
        if scope["path"] != METRICS_PATH:
            status, body, kind = 404, b"only /metrics is served on this port\n", "text/plain"
        elif scope["method"] not in ("GET", "HEAD"):
            status, body, kind = 405, b"use GET\n", "text/plain"
        else:
            status, body, kind = 200, await self.metrics.exposition(), CONTENT_TYPE
        headers = [(b"content-type", kind.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send(
            {"type": "http.response.body", "body": body if scope["method"] != "HEAD" else b""}
        )
