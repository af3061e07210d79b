"""What every gRPC method shares: admitting the caller and turning errors into statuses.

A ``FissionError`` ends the call with the gRPC status of its HTTP status, its message as details
and its code slug in the trailing metadata ``fission-error-code``; any other exception is logged
and ends the call as an internal error.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import grpc

from fission.errors import FissionError
from fission.server.auth import Caller, Gatekeeper
from fission.server.grpc_messages import error_metadata, status_of

log = logging.getLogger("fission.grpc")


async def abort(context: grpc.aio.ServicerContext, error: FissionError) -> None:
    """End the call with the status, details and trailing metadata of ``error``."""
    await context.abort(status_of(error), error.message, trailing_metadata=error_metadata(error))


def unary(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A method answering one message: admit the caller, call, map errors to statuses."""

    @functools.wraps(method)
    async def handler(self: Adapter, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context, await self.admit(context))
        except FissionError as exc:
            await abort(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            log.exception("gRPC %s failed", method.__name__)
            await abort(context, FissionError(f"internal error ({type(exc).__name__})"))

    return handler


def streaming(
    method: Callable[..., AsyncGenerator[Any, None]],
) -> Callable[..., AsyncGenerator[Any, None]]:
    """A method answering a stream: admit the caller, stream, map errors to statuses."""

    @functools.wraps(method)
    async def handler(
        self: Adapter, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[Any, None]:
        try:
            messages = method(self, request, context, await self.admit(context))
            try:
                async for message in messages:
                    yield message
            finally:  # the client went away: end the work now, not when collected
                await messages.aclose()
        except FissionError as exc:
            await abort(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            log.exception("gRPC %s failed", method.__name__)
            await abort(context, FissionError(f"internal error ({type(exc).__name__})"))

    return handler


class Adapter:
    """What every servicer has: the gatekeeper that admits callers."""

    def __init__(self, gate: Gatekeeper) -> None:
        self.gate = gate

    async def admit(self, context: grpc.aio.ServicerContext) -> Caller:
        """The caller named by the call's metadata; Unauthorized or QuotaExceeded if refused."""
        metadata = {key: value for key, value in context.invocation_metadata() or ()}
        return await self.gate.admit(metadata.get("authorization"), metadata.get("x-api-key"))
