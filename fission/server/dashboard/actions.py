"""The dashboard's state-changing requests: login, logout, sandbox actions, a run, key changes.

Each is a POST whose session, Origin and CSRF token ``changing_session`` checked (login has no
session yet: its Origin is checked, and it needs an admin key). Forms answer with a redirect
back to their page (post/redirect/get), except key creation, whose page shows the new key once.
A run streams its output as server-sent events to the page's script.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from fission.agent.client import OutputSink
from fission.auth.keys import ApiKey, KeyLimits, KeyStore, check_role
from fission.core.spec import RunResult
from fission.errors import Forbidden, InvalidInput, Unauthorized
from fission.server.dashboard.sessions import COOKIE, check_origin
from fission.server.dashboard.site import (
    PREFIX,
    ChangingSession,
    Dashboard,
    dashboard_of,
    read_form,
)
from fission.server.streaming import streaming_response

router = APIRouter()
SandboxId = Annotated[str, Path(max_length=100)]
KeyId = Annotated[str, Path(max_length=100)]
MAX_CODE_BYTES = 1024 * 1024


def back_to(path: str) -> RedirectResponse:
    """Post/redirect/get: the browser loads ``path`` of the dashboard again."""
    return RedirectResponse(f"{PREFIX}{path}", status_code=303)


def form_of(request: Request) -> dict[str, str]:
    """The form ``changing_session`` read."""
    form: dict[str, str] = request.state.form
    return form


def whole_number(form: dict[str, str], field: str, what: str) -> int:
    """A form field as a whole number; InvalidInput naming the field otherwise."""
    text = form.get(field, "").strip()
    if not text.isdigit() or len(text) > 9:
        raise InvalidInput(f"{what} must be a whole number, got {text[:20]!r}")
    return int(text)


def seconds(form: dict[str, str], field: str) -> float:
    """A form field as a finite number of seconds."""
    text = form.get(field, "").strip()
    try:
        value = float(text)
    except ValueError as exc:
        raise InvalidInput(f"{field} must be a number of seconds, got {text[:20]!r}") from exc
    return value


async def audit_change(dash: Dashboard, who: str, action: str, detail: dict[str, Any]) -> None:
    """Record an operator's change in the audit log (if the daemon keeps one)."""
    audit = dash.service.audit
    if audit is not None:
        await asyncio.to_thread(audit.record, who, action, outcome="ok", detail=detail)


# -- login, logout ---------------------------------------------------------------------------
@router.post("/login", response_model=None)
async def login(request: Request) -> Response:
    """Check an admin API key once and open a session for it (the key is not kept)."""
    dash = dashboard_of(request)
    headers = request.headers
    check_origin(headers.get("origin"), headers.get("referer"), headers.get("host"))
    if dash.local:
        return back_to("/login")
    form = await read_form(request)
    try:
        key: ApiKey = await dash.with_keys(KeyStore.authenticate, form.get("key", "") or None)
        if not key.is_admin:
            raise Forbidden(
                f"API key {key.id} ({key.name}) has the role {key.role}: the dashboard needs "
                f"an admin key (`fission keys role {key.name} admin`)"
            )
    except (Unauthorized, Forbidden) as exc:
        return dash.page("login.html", request, exc.http_status, error=str(exc))
    response = back_to("/")
    dash.set_cookie(response, request, dash.sessions.create(key.id))
    return response


@router.post("/logout")
async def logout(request: Request, session: ChangingSession) -> RedirectResponse:
    """End this session."""
    dashboard_of(request).sessions.end(session.id)
    response = back_to("/login")
    response.delete_cookie(COOKIE, path=PREFIX)
    return response


# -- sandboxes -------------------------------------------------------------------------------
@router.post("/sandboxes/{sandbox_id}/pause")
async def pause(request: Request, _: ChangingSession, sandbox_id: SandboxId) -> RedirectResponse:
    """Pause a sandbox to disk."""
    await dashboard_of(request).service.sandboxes.pause(sandbox_id)
    return back_to(f"/sandboxes/{sandbox_id}")


@router.post("/sandboxes/{sandbox_id}/resume")
async def resume(request: Request, _: ChangingSession, sandbox_id: SandboxId) -> RedirectResponse:
    """Resume a paused sandbox."""
    await dashboard_of(request).service.sandboxes.resume(sandbox_id)
    return back_to(f"/sandboxes/{sandbox_id}")


@router.post("/sandboxes/{sandbox_id}/delete")
async def delete(request: Request, _: ChangingSession, sandbox_id: SandboxId) -> RedirectResponse:
    """Delete a sandbox."""
    await dashboard_of(request).service.sandboxes.delete(sandbox_id)
    return back_to("/sandboxes")


@router.post("/sandboxes/{sandbox_id}/ttl")
async def extend(request: Request, _: ChangingSession, sandbox_id: SandboxId) -> RedirectResponse:
    """Keep a sandbox alive ``ttl`` more seconds from now."""
    ttl = seconds(form_of(request), "ttl")
    dashboard_of(request).service.sandboxes.set_ttl(sandbox_id, ttl)
    return back_to(f"/sandboxes/{sandbox_id}")


@router.post("/sandboxes/{sandbox_id}/run")
async def run(request: Request, _: ChangingSession, sandbox_id: SandboxId) -> StreamingResponse:
    """Run code in a sandbox, streaming its output as server-sent events."""
    manager = dashboard_of(request).service.sandboxes
    body = await request.body()
    if len(body) > MAX_CODE_BYTES:
        raise InvalidInput(f"the code is over {MAX_CODE_BYTES // 1024} KiB")
    try:
        code = json.loads(body or b"{}").get("code")
    except (ValueError, AttributeError) as exc:
        raise InvalidInput('send {"code": "..."} as JSON') from exc
    if not isinstance(code, str) or not code.strip():
        raise InvalidInput("there is no code to run")
    manager.check_running(sandbox_id)  # a 404 or 409 page, not a stream

    def work(sink: OutputSink) -> Awaitable[RunResult]:
        return manager.run_code(sandbox_id, code, on_output=sink)

    return streaming_response(work, sse=True)


# -- API keys --------------------------------------------------------------------------------
@router.post("/keys", response_class=HTMLResponse)
async def create_key(request: Request, session: ChangingSession) -> HTMLResponse:
    """Create a key with a role and limits; the page shows its plaintext once."""
    dash = dashboard_of(request)
    form = form_of(request)
    limits = KeyLimits(
        max_concurrent_sandboxes=whole_number(form, "max_sandboxes", "max sandboxes"),
        rate_per_minute=whole_number(form, "rate_per_minute", "requests per minute"),
    )
    role = check_role(form.get("role", ""))
    record, plaintext = await dash.with_keys(KeyStore.create, form.get("name", ""), limits, role)
    await audit_change(dash, session.who, "keys.create", {"key": record.id, "role": role})
    found: list[ApiKey] = await dash.with_keys(KeyStore.list)
    return dash.page(
        "keys.html",
        request,
        201,
        nav="keys",
        keys=[k.to_json() for k in found],
        created={"key": record.to_json(), "plaintext": plaintext},
        has_db=True,
    )


@router.post("/keys/{key_id}/revoke")
async def revoke_key(request: Request, session: ChangingSession, key_id: KeyId) -> Response:
    """Revoke a key: its requests and dashboard sessions stop at once."""
    dash = dashboard_of(request)
    key: ApiKey = await dash.with_keys(KeyStore.revoke, key_id)
    dash.sessions.end_key(key.id)
    await audit_change(dash, session.who, "keys.revoke", {"key": key.id})
    if key.id == session.key_id:
        return back_to("/login")
    return back_to("/keys")


@router.post("/keys/{key_id}")
async def update_key(request: Request, session: ChangingSession, key_id: KeyId) -> Response:
    """Change a key's limits and role (the limits the form does not show stay as they are)."""
    dash = dashboard_of(request)
    form = form_of(request)
    current: ApiKey = await dash.with_keys(KeyStore.get, key_id)
    limits = dataclasses.replace(
        current.limits,
        max_concurrent_sandboxes=whole_number(form, "max_sandboxes", "max sandboxes"),
        rate_per_minute=whole_number(form, "rate_per_minute", "requests per minute"),
    )
    role = check_role(form.get("role", ""))
    if key_id == session.key_id and role != "admin":
        raise InvalidInput("you cannot take the admin role from the key you are logged in with")
    await dash.with_keys(KeyStore.set_limits, key_id, limits)
    key: ApiKey = await dash.with_keys(KeyStore.set_role, key_id, role)
    if not key.is_admin:
        dash.sessions.end_key(key.id)
    detail = {"key": key.id, "role": role, **vars(limits)}
    await audit_change(dash, session.who, "keys.update", detail)
    return back_to("/keys")
