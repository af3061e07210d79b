"""Request ids and API metrics for the gRPC API: a server interceptor.

Each call gets an id: the caller's ``x-request-id`` metadata when it is valid, else a new one;
it is sent back in the initial metadata (``x-request-id``) and set in the call's log context,
so log lines and audit events of the call carry it, as on the REST API. The call is counted by
method and final status code.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from fission import log_context
from fission.server.metrics import ServiceMetrics

METADATA_KEY = log_context.REQUEST_ID_HEADER.lower()


def status_name(context: grpc.aio.ServicerContext, failed: bool) -> str:
    """The status a call ended with: the one it set or aborted with, else OK/CANCELLED/UNKNOWN."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if failed:
        return "UNKNOWN"
    return "CANCELLED" if context.cancelled() else "OK"


class RequestContextInterceptor(grpc.aio.ServerInterceptor):
    """Sets each call's request id (metadata in and out) and counts it in ``metrics``."""

    def __init__(self, metrics: ServiceMetrics | None = None) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """The call's handler, its behaviour wrapped (request id, metrics)."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        metadata = dict(handler_call_details.invocation_metadata or ())
        incoming = metadata.get(METADATA_KEY)
        request_id = log_context.accept_request_id(incoming if isinstance(incoming, str) else None)
        if handler.response_streaming:
            kind = "stream_stream" if handler.request_streaming else "unary_stream"
            wrapped: Any = self._streaming(getattr(handler, kind), method, request_id)
        else:
            kind = "stream_unary" if handler.request_streaming else "unary_unary"
            wrapped = self._unary(getattr(handler, kind), method, request_id)
        return handler._replace(**{kind: wrapped})

    async def _begin(self, context: grpc.aio.ServicerContext, request_id: str) -> float:
        # Each call runs in a task of its own: what is set here stays with this call.
        log_context.request_id.set(request_id)
        log_context.sandbox_id.set(None)
        log_context.key_id.set(None)
        await context.send_initial_metadata(((METADATA_KEY, request_id),))
        return time.perf_counter()

    def _end(
        self, context: grpc.aio.ServicerContext, method: str, started: float, failed: bool
    ) -> None:
        if self.metrics is not None:
            status = status_name(context, failed)
            elapsed = time.perf_counter() - started
            self.metrics.observe_request("grpc", "POST", method, status, elapsed)

    def _unary(
        self, behavior: Callable[..., Awaitable[Any]], method: str, request_id: str
    ) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = await self._begin(context, request_id)
            failed = True
            try:
                answer = await behavior(request, context)
                failed = False
                return answer
            finally:
                self._end(context, method, started, failed)

        return call

    def _streaming(
        self, behavior: Callable[..., AsyncIterator[Any]], method: str, request_id: str
    ) -> Callable[..., AsyncIterator[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = await self._begin(context, request_id)
            failed = True
            try:
                async for message in behavior(request, context):
                    yield message
                failed = False
            finally:
                self._end(context, method, started, failed)

        return call
