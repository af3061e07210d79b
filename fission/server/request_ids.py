"""Request ids and API metrics for the REST API: an ASGI middleware around the app.

Each request gets an id: the caller's ``X-Request-Id`` when it is valid (``log_context``), else
a new one; it is sent back in the ``X-Request-Id`` response header and set in the request's
log context, so every log line and audit event of the request carries it. The middleware also
counts the request by route template and status (a path that matched no route counts as
``unmatched``: a scanner cannot grow the label set).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fission import log_context
from fission.server.metrics import ServiceMetrics

log = logging.getLogger("fission.requests")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]
HEADER = log_context.REQUEST_ID_HEADER.lower().encode()
UNMATCHED = "unmatched"


def incoming_request_id(scope: Scope) -> str | None:
    """The ``X-Request-Id`` header of an ASGI request, if it has one (decoded as latin-1)."""
    for name, value in scope.get("headers", ()):
        if name == HEADER:
            return bytes(value).decode("latin-1")
    return None


def route_template(scope: Scope) -> str:
    """The path template of the route that served the request (``unmatched`` when none)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class RequestContext:
    """ASGI middleware: a request id in and out, the log context, and API request metrics."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = log_context.accept_request_id(incoming_request_id(scope))
        tokens = (
            log_context.request_id.set(request_id),
            log_context.sandbox_id.set(None),
            log_context.key_id.set(None),
        )
        status = 500  # unless the app answers: an error the app did not handle
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), (HEADER, request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = route_template(scope)
            if self.metrics is not None:
                self.metrics.observe_request("rest", scope["method"], route, str(status), elapsed)
            log.info("%s %s -> %d in %.1f ms", scope["method"], route, status, elapsed * 1000)
            for var, token in zip(
                (log_context.request_id, log_context.sandbox_id, log_context.key_id),
                tokens,
                strict=True,
            ):
                var.reset(token)
