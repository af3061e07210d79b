"""The dashboard's pages, their live fragments (server-sent events) and their JSON twins.

Every page renders a fragment template; the page's script opens ``/ui/live/<page>`` with the
same query and swaps the fragment in whenever the server renders something new (checked once a
second), so tables follow the service without reloads. Nothing here touches a VM: sandboxes,
pools and the budget come from the ``Service``, run statistics from its audit log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from fission.auth.audit_log import LOCAL, AuditEvent
from fission.auth.keys import ApiKey, KeyStore
from fission.core.sandbox_spec import MAX_PAGE_SIZE, SandboxRecord, SandboxState
from fission.errors import FissionError, InvalidInput
from fission.server.dashboard import views
from fission.server.dashboard.sessions import COOKIE
from fission.server.dashboard.site import PREFIX, CurrentSession, Dashboard, dashboard_of
from fission.server.sandboxes_api import parse_metadata_filter

router = APIRouter()
LIVE_INTERVAL = 1.0  # seconds between two looks at what a live fragment shows
LIVE_STREAM_SECONDS = 300.0  # then the browser reconnects (EventSource does it by itself)
KEY_RECHECK_TICKS = 10  # a live stream re-checks its session's key every this many looks
RECENT_RUNS = 20
MAX_FILE_VIEW = 256 * 1024
Text = Annotated[str, Query(max_length=200)]
SandboxId = Annotated[str, Path(max_length=100)]


@dataclass(frozen=True)
class SandboxQuery:
    """The sandboxes table's filters, order and page, as the query string gives them."""

    state: str = ""
    owner: str = ""
    metadata: str = ""
    sort: str = "created"
    order: str = "desc"
    page: int = 1
    size: int = 25

    def state_filter(self) -> SandboxState | None:
        """The state to show (None: all); InvalidInput for a state that does not exist."""
        if not self.state:
            return None
        try:
            return SandboxState(self.state)
        except ValueError as exc:
            names = ", ".join(s.value for s in SandboxState)
            raise InvalidInput(f"state {self.state[:40]!r} is not one of {names}") from exc

    def metadata_filter(self) -> dict[str, str]:
        """``team:ml job:7`` (space or comma separated) as a dict."""
        return parse_metadata_filter(self.metadata.replace(",", " ").split())


def sandbox_query(
    state: Text = "",
    owner: Text = "",
    metadata: Annotated[str, Query(max_length=1000)] = "",
    sort: Text = "created",
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 25,
) -> SandboxQuery:
    """FastAPI dependency: the sandboxes table's query string, bounded."""
    return SandboxQuery(state, owner, metadata, sort, order, page, size)


@dataclass(frozen=True)
class AuditQuery:
    """The audit table's filters."""

    since: str = "1h"
    key: str = ""
    action: str = ""
    outcome: str = ""
    limit: int = 200


def audit_query(
    since: Text = "1h",
    key: Text = "",
    action: Text = "",
    outcome: Text = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> AuditQuery:
    """FastAPI dependency: the audit table's query string, bounded."""
    return AuditQuery(since, key, action, outcome, limit)


def all_sandboxes(dash: Dashboard, query: SandboxQuery | None = None) -> list[SandboxRecord]:
    """Every sandbox matching ``query``'s filters (every owner: the dashboard is an admin's)."""
    manager = dash.service.sandboxes
    state = query.state_filter() if query else None
    metadata = query.metadata_filter() if query else {}
    owner = (query.owner or None) if query else None
    local_only = owner == LOCAL  # the tables show a sandbox without an owner key as `local`
    found: list[SandboxRecord] = []
    cursor = None
    while True:
        chunk, cursor = manager.list_sandboxes(
            None if local_only else owner, state, metadata, MAX_PAGE_SIZE, cursor
        )
        found.extend(chunk)
        if cursor is None:
            return [r for r in found if r.owner is None] if local_only else found


async def audit_events(
    dash: Dashboard, since: datetime | None, key: str | None, action: str | None, limit: int
) -> list[AuditEvent]:
    """Newest audit events (none when the daemon keeps no audit log)."""
    audit = await asyncio.to_thread(dash.audit_reader)
    if audit is None:
        return []
    return await asyncio.to_thread(audit.query, since=since, key=key, action=action, limit=limit)


# -- what each page shows --------------------------------------------------------------------
async def overview_data(dash: Dashboard, shared: bool = False) -> dict[str, Any]:
    """Budget, VMs by state, pools, and run statistics of the last half hour.

    ``shared`` (the live streams): computed at most once per ``LIVE_INTERVAL`` however many
    pages watch it.
    """
    cached = dash.overview_cache
    if shared and cached is not None and time.monotonic() - cached[0] < LIVE_INTERVAL:
        return dict(cached[1])
    data = await compute_overview(dash)
    dash.overview_cache = (time.monotonic(), data)
    return data


async def compute_overview(dash: Dashboard) -> dict[str, Any]:
    """The overview's numbers, now."""
    now = datetime.now(UTC)
    status = dash.service.status()
    events = await audit_events(
        dash, now - timedelta(minutes=views.WINDOW_MINUTES), None, None, 10_000
    )
    stats = views.run_stats(events, now)
    return {
        "status": status,
        "machines": views.machines_by_state(status, all_sandboxes(dash)),
        "stats": stats,
        "audit_enabled": dash.service.audit is not None,
    }


def sandboxes_data(dash: Dashboard, query: SandboxQuery) -> dict[str, Any]:
    """One page of the sandboxes table and how many pages there are."""
    records = views.sort_sandboxes(all_sandboxes(dash, query), query.sort, query.order == "desc")
    pages = max(1, -(-len(records) // query.size))
    start = (query.page - 1) * query.size
    return {
        "rows": [sandbox_row(r) for r in records[start : start + query.size]],
        "total": len(records),
        "page": query.page,
        "pages": pages,
        "query": query,
    }


def sandbox_row(record: SandboxRecord) -> dict[str, Any]:
    """A sandbox as the tables show it."""
    return record.to_json() | {"owner": record.owner or LOCAL}


async def sandbox_data(dash: Dashboard, sandbox_id: str) -> dict[str, Any]:
    """One sandbox: its record and its recent runs (SandboxNotFound when it is gone)."""
    record = dash.service.sandboxes.get(sandbox_id)
    events = await audit_events(dash, None, None, "sandbox", 500)
    runs = [views.event_row(e) for e in events if (e.detail or {}).get("sandbox") == record.id]
    return {"sandbox": sandbox_row(record), "runs": runs[:RECENT_RUNS]}


async def audit_data(dash: Dashboard, query: AuditQuery) -> dict[str, Any]:
    """The audit events the filters select, newest first."""
    now = datetime.now(UTC)
    since = views.parse_since(query.since, now) if query.since else None
    fetch = query.limit if not query.outcome else 10_000  # the log filters outcomes here
    events = await audit_events(dash, since, query.key or None, query.action or None, fetch)
    rows = [views.event_row(e) for e in views.filter_outcome(events, query.outcome)]
    return {
        "rows": rows[: query.limit],
        "query": query,
        "audit_enabled": dash.service.audit is not None,
    }


# -- pages -----------------------------------------------------------------------------------
@router.get("/login", response_model=None)
async def login_page(request: Request) -> Response:
    """The login form; on the local socket a session is opened at once (no key exists)."""
    dash = dashboard_of(request)
    if dash.sessions.peek(request.cookies.get(COOKIE)) is not None:
        return RedirectResponse(f"{PREFIX}/", status_code=303)
    if dash.local:
        response = RedirectResponse(f"{PREFIX}/", status_code=303)
        dash.set_cookie(response, request, dash.sessions.create(None))
        return response
    return dash.page("login.html", request, error=None)


@router.get("/", response_class=HTMLResponse)
async def overview(request: Request, _: CurrentSession) -> HTMLResponse:
    """Memory budget, VMs by state, pools, runs per minute, errors and latency."""
    dash = dashboard_of(request)
    return dash.page("overview.html", request, nav="overview", **await overview_data(dash))


@router.get("/sandboxes", response_class=HTMLResponse)
async def sandboxes(
    request: Request, _: CurrentSession, query: Annotated[SandboxQuery, Depends(sandbox_query)]
) -> HTMLResponse:
    """Every sandbox, filtered, sorted and paged."""
    dash = dashboard_of(request)
    data = sandboxes_data(dash, query)
    return dash.page(
        "sandboxes.html",
        request,
        nav="sandboxes",
        live_query=str(request.url.query),
        sorts=views.SANDBOX_SORTS,
        states=[s.value for s in SandboxState if s != SandboxState.DELETED],
        **data,
    )


@router.get("/sandboxes/{sandbox_id}", response_class=HTMLResponse)
async def sandbox(
    request: Request,
    _: CurrentSession,
    sandbox_id: SandboxId,
    path: Annotated[str, Query(max_length=4096)] = ".",
) -> HTMLResponse:
    """One sandbox: limits, ttl, recent runs, a read-only file browser, and a run box."""
    dash = dashboard_of(request)
    data = await sandbox_data(dash, sandbox_id)
    files: list[dict[str, Any]] = []
    files_error = None
    if data["sandbox"]["state"] == SandboxState.RUNNING.value:
        try:
            entries = await dash.service.sandboxes.list_files(sandbox_id, path or ".")
            files = sorted(
                (dataclasses.asdict(e) for e in entries),
                key=lambda e: (e["kind"] != "dir", e["name"]),
            )
        except FissionError as exc:  # a bad path is the browser's message, not the page's
            files_error = str(exc)
    return dash.page(
        "sandbox.html",
        request,
        nav="sandboxes",
        path=path or ".",
        parent=parent_of(path or "."),
        files=files,
        files_error=files_error,
        **data,
    )


@router.get("/sandboxes/{sandbox_id}/file", response_class=HTMLResponse)
async def sandbox_file(
    request: Request,
    _: CurrentSession,
    sandbox_id: SandboxId,
    path: Annotated[str, Query(min_length=1, max_length=4096)],
) -> HTMLResponse:
    """The first 256 KiB of one file of a sandbox, as text (read-only)."""
    dash = dashboard_of(request)
    record = dash.service.sandboxes.get(sandbox_id)
    data = b""
    chunks = dash.service.sandboxes.read_file(sandbox_id, path)
    try:
        async for chunk in chunks:
            data += chunk
            if len(data) >= MAX_FILE_VIEW:
                break
    finally:
        await chunks.aclose()
    return dash.page(
        "file.html",
        request,
        nav="sandboxes",
        sandbox=sandbox_row(record),
        path=path,
        text=data[:MAX_FILE_VIEW].decode("utf-8", errors="replace"),
        truncated=len(data) >= MAX_FILE_VIEW,
    )


@router.get("/keys", response_class=HTMLResponse)
async def keys(request: Request, _: CurrentSession) -> HTMLResponse:
    """API keys: create, revoke, change limits and role."""
    dash = dashboard_of(request)
    found: list[ApiKey] = await dash.with_keys(KeyStore.list) if dash.keys_db else []
    return dash.page(
        "keys.html",
        request,
        nav="keys",
        keys=[k.to_json() for k in found],
        created=None,
        has_db=dash.keys_db is not None,
    )


@router.get("/audit", response_class=HTMLResponse)
async def audit(
    request: Request, _: CurrentSession, query: Annotated[AuditQuery, Depends(audit_query)]
) -> HTMLResponse:
    """The audit log, filtered by time, key, action and outcome."""
    dash = dashboard_of(request)
    data = await audit_data(dash, query)
    return dash.page("audit.html", request, nav="audit", live_query=str(request.url.query), **data)


def parent_of(path: str) -> str:
    """The directory above ``path`` in the file browser."""
    stripped = path.rstrip("/")
    if stripped in ("", "."):
        return "."
    parent = stripped.rsplit("/", 1)[0] if "/" in stripped else "."
    return parent or "/"


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
        while time.monotonic() < deadline:
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
            await asyncio.sleep(LIVE_INTERVAL)

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
