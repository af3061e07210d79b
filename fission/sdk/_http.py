"""The SDK's I/O half: send a ``Call`` over httpx, sync or async, and nothing else.

httpx's own errors become fission's in one place, ``converted``::

    httpx.ConnectError, ConnectTimeout  ->  Unreachable, a NotReady (no daemon answers at <where>)
    httpx.TimeoutException              ->  RequestTimeout naming request_timeout (and timeout)
    any other httpx.HTTPError           ->  FissionError (lost the connection)
"""

from __future__ import annotations

from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Generator,
    Iterable,
    Iterator,
)
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx

from fission.errors import FissionError, RequestTimeout
from fission.sdk._connection import Connection, Unreachable
from fission.sdk._requests import CHUNK_SIZE, Call, error_from_response, parse_json


@contextmanager
def converted(conn: Connection, call: Call) -> Iterator[None]:
    """Turn httpx errors raised inside the block into fission errors."""
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # raised before anything is sent
        raise Unreachable(conn.unreachable()) from exc
    except httpx.TimeoutException as exc:
        raise RequestTimeout(timeout_message(conn, call)) from exc
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise FissionError(
            f"lost the connection to the daemon at {conn.where} during {call}: {reason}"
        ) from exc


def timeout_message(conn: Connection, call: Call) -> str:
    """What timed out, naming the setting that controls it."""
    limit = call.request_timeout or conn.request_timeout
    if call.run_timeout is None:
        return (
            f"{call}: the daemon at {conn.where} did not answer within "
            f"request_timeout={limit:g} s: raise request_timeout"
        )
    return (
        f"{call}: the daemon at {conn.where} sent nothing for {call.run_timeout + limit:g} s "
        f"(the run's timeout={call.run_timeout:g} s + request_timeout={limit:g} s): "
        "raise timeout or request_timeout"
    )


def timeout_of(conn: Connection, call: Call) -> httpx.Timeout:
    """httpx's timeouts for ``call``: a streamed run may stay silent for its whole deadline."""
    limit = call.request_timeout or conn.request_timeout
    return httpx.Timeout(limit, read=limit + (call.run_timeout or 0))


def request_options(conn: Connection, call: Call) -> dict[str, Any]:
    """The httpx arguments of ``call`` besides method, path and body (both clients use them)."""
    return {
        "params": call.params,
        "json": call.json,
        "headers": call.headers,
        "timeout": timeout_of(conn, call),
    }


def closed_error() -> FissionError:
    """The error for a call on a closed client."""
    return FissionError("this client is closed (close() or the end of its with block)")


class SyncHTTP:
    """Blocking transport: one httpx.Client for one Connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        transport = httpx.HTTPTransport(uds=str(conn.socket)) if conn.socket is not None else None
        self._client = httpx.Client(
            base_url=conn.base_url,
            transport=transport,
            headers=conn.headers,
            trust_env=transport is None,  # no HTTP(S)_PROXY detour for a Unix socket
        )

    def close(self) -> None:
        """Close the connection pool (safe twice)."""
        self._client.close()

    def json(self, call: Call, content: bytes | Iterable[bytes] | None = None) -> Any:
        """Send ``call`` (with a raw body if given); its JSON answer, or its error raised."""
        if self._client.is_closed:
            raise closed_error()
        with converted(self.conn, call):
            response = self._client.request(
                call.method, call.path, content=content, **request_options(self.conn, call)
            )
        return parse_json(response.status_code, response.content, response.headers, self.conn.where)

    @contextmanager
    def _open(self, call: Call) -> Iterator[httpx.Response]:
        if self._client.is_closed:
            raise closed_error()
        request = self._client.build_request(
            call.method, call.path, **request_options(self.conn, call)
        )
        response = self._client.send(request, stream=True)
        try:
            if response.status_code >= 400:
                content = response.read()
                raise error_from_response(
                    response.status_code, content, response.headers, self.conn.where
                )
            yield response
        finally:
            response.close()

    def lines(self, call: Call) -> Generator[str, None, None]:
        """The lines of a streamed answer, as they arrive."""
        with converted(self.conn, call), self._open(call) as response:
            yield from response.iter_lines()

    def chunks(self, call: Call) -> Generator[bytes, None, None]:
        """The raw body of an answer in pieces, as they arrive."""
        with converted(self.conn, call), self._open(call) as response:
            yield from response.iter_bytes(CHUNK_SIZE)


class AsyncHTTP:
    """Asyncio transport: one httpx.AsyncClient for one Connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        transport = (
            httpx.AsyncHTTPTransport(uds=str(conn.socket)) if conn.socket is not None else None
        )
        self._client = httpx.AsyncClient(
            base_url=conn.base_url,
            transport=transport,
            headers=conn.headers,
            trust_env=transport is None,  # no HTTP(S)_PROXY detour for a Unix socket
        )

    async def close(self) -> None:
        """Close the connection pool (safe twice)."""
        await self._client.aclose()

    async def json(self, call: Call, content: bytes | AsyncIterable[bytes] | None = None) -> Any:
        """Send ``call`` (with a raw body if given); its JSON answer, or its error raised."""
        if self._client.is_closed:
            raise closed_error()
        with converted(self.conn, call):
            response = await self._client.request(
                call.method, call.path, content=content, **request_options(self.conn, call)
            )
        return parse_json(response.status_code, response.content, response.headers, self.conn.where)

    @asynccontextmanager
    async def _open(self, call: Call) -> AsyncIterator[httpx.Response]:
        if self._client.is_closed:
            raise closed_error()
        request = self._client.build_request(
            call.method, call.path, **request_options(self.conn, call)
        )
        response = await self._client.send(request, stream=True)
        try:
            if response.status_code >= 400:
                content = await response.aread()
                raise error_from_response(
                    response.status_code, content, response.headers, self.conn.where
                )
            yield response
        finally:
            await response.aclose()

    async def lines(self, call: Call) -> AsyncGenerator[str, None]:
        """The lines of a streamed answer, as they arrive."""
        with converted(self.conn, call):
            async with self._open(call) as response:
                async for line in response.aiter_lines():
                    yield line

    async def chunks(self, call: Call) -> AsyncGenerator[bytes, None]:
        """The raw body of an answer in pieces, as they arrive."""
        with converted(self.conn, call):
            async with self._open(call) as response:
                async for chunk in response.aiter_bytes(CHUNK_SIZE):
                    yield chunk
