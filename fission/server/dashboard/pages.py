"""The dashboard's HTML pages; each renders a fragment that ``live`` keeps up to date."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from fission.auth.keys import ApiKey, KeyStore
from fission.core.sandbox_snapshots import MAX_FORK
from fission.core.sandbox_spec import SandboxState
from fission.errors import FissionError
from fission.server.dashboard import views
from fission.server.dashboard.data import (
    AuditQuery,
    SandboxQuery,
    audit_data,
    audit_query,
    overview_data,
    sandbox_data,
    sandbox_query,
    sandbox_row,
    sandboxes_data,
)
from fission.server.dashboard.sessions import COOKIE
from fission.server.dashboard.site import PREFIX, CurrentSession, dashboard_of
from fission.server.dashboard.snapshots import sandbox_snapshots, snapshot_summary

router = APIRouter()
MAX_FILE_VIEW = 256 * 1024
SandboxId = Annotated[str, Path(max_length=100)]


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
    data = await overview_data(dash)
    summary = snapshot_summary(dash)
    return dash.page("overview.html", request, nav="overview", snapshots=summary, **data)


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
        snapshots=sandbox_snapshots(dash, sandbox_id),
        max_fork=MAX_FORK,
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
