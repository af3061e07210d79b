"""``GET /v1/sandboxes/{id}/files/watch``: a directory's changes, streamed (NDJSON or SSE).

The first line is ``{"type": "ready", "path": P}`` once the watch is in place; then one line
per change, ``{"type": "change", "event": "create"|"modify"|"delete"|"move"|"chmod"|"overflow",
"path": ..., "to": ...}`` (paths relative to the watched directory; ``overflow``: changes were
lost). The stream ends when the client leaves or the sandbox stops, pauses or is deleted, with
a last ``{"type": "end"}`` line in the latter case. Errors (not found, not allowed) come before
the stream, as plain HTTP errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from fission.core.sandboxes import SandboxManager
from fission.server.auth import Who
from fission.server.streaming import NDJSON, SSE, WantsSse, encode_line

WatchPath = Annotated[
    str, Query(min_length=1, max_length=4096, description="Directory in the sandbox.")
]


def watch_router(manager: SandboxManager) -> APIRouter:
    """The watch route over ``manager``."""
    router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"])

    @router.get(
        "/{sandbox_id}/files/watch",
        summary="Watch a directory's changes (streamed)",
        response_class=StreamingResponse,
    )
    async def watch(
        sandbox_id: str,
        who: Who,
        sse: WantsSse,
        path: WatchPath = ".",
        recursive: bool = False,
    ) -> StreamingResponse:
        stream = manager.watch_files(sandbox_id, path, recursive, who.owner)
        await anext(stream)  # errors before the response starts; then the watch is in place

        async def body() -> AsyncIterator[bytes]:
            try:
                yield encode_line({"type": "ready", "path": path}, sse)
                async for batch in stream:
                    for event in batch:
                        line = {"type": "change", "event": event.type, "path": event.path}
                        if event.to is not None:
                            line["to"] = event.to
                        yield encode_line(line, sse)
                yield encode_line({"type": "end"}, sse)
            finally:
                await stream.aclose()

        return StreamingResponse(body(), media_type=SSE if sse else NDJSON)

    return router
