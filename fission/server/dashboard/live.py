"""Live fragments (server-sent events) and the pages' JSON twins.

Every page renders a fragment template; the page's script opens ``/ui/live/<page>`` with the
same query and swaps the fragment in whenever the server renders something new (checked once a
second), so tables follow the service without reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import StreamingResponse

from fission.auth.keys import ApiKey, KeyStore
from fission.errors import FissionError
from fission.server.dashboard.data import (
    LIVE_INTERVAL,
    AuditQuery,
    SandboxQuery,
    audit_data,
    audit_query,
    overview_data,
    sandbox_data,
    sandbox_query,
    sandboxes_data,
)
from fission.server.dashboard.site import CurrentSession, Dashboard, dashboard_of

router = APIRouter()
LIVE_STREAM_SECONDS = 10.0  # then the browser reconnects (a stopping server ends it at once)
KEY_RECHECK_TICKS = 10  # a live stream re-checks its session's key every this many looks
SandboxId = Annotated[str, Path(max_length=100)]


# -- live fragments (server-sent events) -----------------------------------------------------
def live_response(
    request: Request, session_id: str, render: Callable[[], Awaitable[str]]
) -> StreamingResponse:
    """An SSE stream sending ``render()`` whenever it changes, while the session lives."""
    dash = dashboard_of(request)

    async def events() -> AsyncIterator[bytes]:
        last = None
        deadline = time.monotonic() + LIVE_STREAM_SECONDS
        tick = 0
        yield b"retry: 2000\n\n"
        while time.monotonic() < deadline and not dash.stopping.is_set():
            session = dash.sessions.peek(session_id)
            recheck = tick % KEY_RECHECK_TICKS == 0
            if session is None or (recheck and not await still_admin(dash, session.key_id)):
                yield sse("logout", "")
                return
            try:
                html = await render()
            except FissionError as exc:
                yield sse("gone", str(exc))
                return
            if html != last:
                yield sse("fragment", html)
                last = html
            tick += 1
            # uvicorn's graceful shutdown waits for open responses: a stop ends the wait at once
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(dash.stopping.wait(), LIVE_INTERVAL)

    return StreamingResponse(events(), media_type="text/event-stream")


async def still_admin(dash: Dashboard, key_id: str | None) -> bool:
    """Whether a session's key is still an active admin key (the local session always is)."""
    if key_id is None:
        return True
    try:
        key: ApiKey = await dash.with_keys(KeyStore.get, key_id)
    except FissionError:
        return False
    return key.active and key.is_admin


def sse(event: str, data: str) -> bytes:
    """One server-sent event (each line of ``data`` on its own ``data:`` line)."""
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"event: {event}\n{lines}\n".encode()


@router.get("/live/overview")
async def live_overview(request: Request, session: CurrentSession) -> StreamingResponse:
    """The overview's fragment, live."""
    dash = dashboard_of(request)

    async def render() -> str:
        return dash.render("_overview.html", request, **await overview_data(dash, shared=True))

    return live_response(request, session.id, render)


@router.get("/live/sandboxes")
async def live_sandboxes(
    request: Request,
    session: CurrentSession,
    query: Annotated[SandboxQuery, Depends(sandbox_query)],
) -> StreamingResponse:
    """The sandboxes table's rows, live."""
    dash = dashboard_of(request)
    query.state_filter(), query.metadata_filter()  # a bad filter is a 400, not a stream

    async def render() -> str:
        return dash.render("_sandbox_rows.html", request, **sandboxes_data(dash, query))

    return live_response(request, session.id, render)


@router.get("/live/sandboxes/{sandbox_id}")
async def live_sandbox(
    request: Request,
    session: CurrentSession,
    sandbox_id: SandboxId,
) -> StreamingResponse:
    """One sandbox's state, ttl and recent runs, live."""
    dash = dashboard_of(request)
    dash.service.sandboxes.get(sandbox_id)  # unknown: a 404, not a stream

    async def render() -> str:
        return dash.render("_sandbox_live.html", request, **await sandbox_data(dash, sandbox_id))

    return live_response(request, session.id, render)


@router.get("/live/audit")
async def live_audit(
    request: Request, session: CurrentSession, query: Annotated[AuditQuery, Depends(audit_query)]
) -> StreamingResponse:
    """The audit table's rows, live."""
    dash = dashboard_of(request)
    await audit_data(dash, query)  # a bad filter is a 400, not a stream

    async def render() -> str:
        return dash.render("_audit_rows.html", request, **await audit_data(dash, query))

    return live_response(request, session.id, render)


# -- JSON, for scripts and the fuzz tests ----------------------------------------------------
@router.get("/api/overview")
async def api_overview(request: Request, _: CurrentSession) -> dict[str, Any]:
    """The overview's numbers as JSON."""
    data = await overview_data(dashboard_of(request))
    return {"status": data["status"], "machines": data["machines"], "stats": data["stats"]}


@router.get("/api/sandboxes")
async def api_sandboxes(
    request: Request, _: CurrentSession, query: Annotated[SandboxQuery, Depends(sandbox_query)]
) -> dict[str, Any]:
    """The sandboxes table as JSON."""
    data = sandboxes_data(dashboard_of(request), query)
    return {k: data[k] for k in ("rows", "total", "page", "pages")}


@router.get("/api/audit")
async def api_audit(
    request: Request, _: CurrentSession, query: Annotated[AuditQuery, Depends(audit_query)]
) -> dict[str, Any]:
    """The audit table as JSON."""
    data = await audit_data(dashboard_of(request), query)
    return {"events": data["rows"]}
