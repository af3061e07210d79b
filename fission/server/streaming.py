"""Streaming a run to an HTTP client as NDJSON or server-sent events (``api.run_stream``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Header, Query
from fastapi.responses import StreamingResponse

from fission.agent.client import OutputSink
from fission.api.run_stream import closing_lines, error_body, output_line
from fission.core.provision import InstallResult
from fission.core.spec import RunResult
from fission.errors import FissionError

Work = Callable[[OutputSink], Awaitable[RunResult | InstallResult]]
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"


def wants_sse(accept: str | None, stream_format: str | None) -> bool:
    """True when the client asked for server-sent events (``Accept`` or ``?format=sse``)."""
    if stream_format is not None:
        return stream_format == "sse"
    return accept is not None and SSE in accept


def sse_requested(
    accept: Annotated[str | None, Header()] = None,
    stream_format: Annotated[str | None, Query(alias="format", pattern="^(ndjson|sse)$")] = None,
) -> bool:
    """A route's dependency: does the client want server-sent events (else NDJSON)."""
    return wants_sse(accept, stream_format)


WantsSse = Annotated[bool, Depends(sse_requested)]


def encode_line(line: dict[str, Any], sse: bool) -> bytes:
    """One streamed message: a JSON line, or an SSE event named after its type."""
    body = json.dumps(line)
    if sse:
        return f"event: {line['type']}\ndata: {body}\n\n".encode()
    return (body + "\n").encode()


async def stream_lines(
    work: Work, sse: bool, cleanup: Callable[[], None] | None = None
) -> AsyncIterator[bytes]:
    """Run ``work``, yielding its output lines as they arrive, then its result or error."""
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def execute() -> None:
        try:
            outcome = await work(lambda stream, data: queue.put_nowait(output_line(stream, data)))
            for line in closing_lines(outcome):
                queue.put_nowait(line)
        except FissionError as exc:
            queue.put_nowait(error_body(exc))
        finally:
            if cleanup is not None:
                cleanup()
            queue.put_nowait(None)

    task = asyncio.create_task(execute())
    try:
        while (line := await queue.get()) is not None:
            yield encode_line(line, sse)
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def streaming_response(
    work: Work, sse: bool, cleanup: Callable[[], None] | None = None
) -> StreamingResponse:
    """A response streaming ``work`` in the chosen format."""
    return StreamingResponse(stream_lines(work, sse, cleanup), media_type=SSE if sse else NDJSON)
