"""The dashboard's application: its state, who may see it, how its errors look.

It is a FastAPI app of its own, mounted at ``/ui`` by ``fission.server.app``: its errors are
HTML pages (JSON under ``/ui/api``), its routes stay out of the REST API's OpenAPI document,
and its security headers apply to it alone. It reaches the core only through the ``Service``
the REST door uses and the key database the ``Gatekeeper`` checks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import weakref
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

import jinja2
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from fission import __version__
from fission.api.run_stream import error_body
from fission.auth.audit_log import AuditLog
from fission.auth.keys import ApiKey, KeyStore
from fission.core.service import Service
from fission.errors import (
    FissionError,
    InvalidInput,
    NotFound,
    NotReady,
    Unauthorized,
)
from fission.server.auth import Gatekeeper
from fission.server.dashboard.sessions import (
    ABSOLUTE_EXPIRY,
    COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    Session,
    SessionExpired,
    SessionStore,
    check_csrf,
    check_origin,
)

HERE = Path(__file__).parent
PREFIX = "/ui"
MAX_FORM_BYTES = 64 * 1024
SECURE_COOKIE_ENV = "FISSION_DASHBOARD_SECURE_COOKIE"  # 1: always Secure, 0: never, unset: https
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        b"frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


class LoginNeeded(Unauthorized):
    """No session cookie: pages send the browser to the login page."""

    code = "login_needed"


@dataclass
class Dashboard:
    """What every dashboard route works with."""

    service: Service
    gate: Gatekeeper
    secure_cookies: bool | None = None
    sessions: SessionStore = field(default_factory=SessionStore)
    templates: jinja2.Environment = field(default_factory=lambda: make_templates())
    # Set when the server starts to stop: live streams end then rather than hold it up.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    _audit_reader: AuditLog | None = field(default=None, repr=False)
    overview_cache: tuple[float, Any] | None = field(default=None, repr=False)

    def audit_reader(self) -> AuditLog | None:
        """The dashboard's own connection to the audit log (None when there is no log).

        A run's audit write waits for the lock of the connection it uses; the dashboard reads
        through another connection (SQLite WAL: readers never block the writer), so an open
        page adds nothing to a run.
        """
        path = self.service.config.audit_db
        if self.service.audit is None or path is None:
            return None
        if self._audit_reader is None:
            self._audit_reader = AuditLog(path)
            weakref.finalize(self, self._audit_reader.close)
        return self._audit_reader

    @property
    def local(self) -> bool:
        """True on the Unix socket, where every caller is the local admin (no keys)."""
        return self.gate.keys is None

    @property
    def keys_db(self) -> Path | None:
        """The key database: the listener's, else the audit log's file (the same one)."""
        if self.gate.keys is not None:
            return self.gate.keys.path
        return self.service.config.audit_db

    async def with_keys(self, work: Any, *args: Any) -> Any:
        """Run ``work(store, *args)`` on the key database in a worker thread."""
        path = self.keys_db
        if path is None:
            raise NotReady("this daemon has no key database (start it with --db)")

        def call() -> Any:
            with KeyStore(path) as store:
                return work(store, *args)

        return await asyncio.to_thread(call)

    def render(self, name: str, request: Request | None = None, **context: Any) -> str:
        """A template rendered with the page's common context."""
        session = getattr(request.state, "session", None) if request is not None else None
        return self.templates.get_template(name).render(
            prefix=PREFIX,
            version=__version__,
            local=self.local,
            session=session,
            csrf=session.csrf if session is not None else "",
            csrf_field=CSRF_FIELD,
            **context,
        )

    def page(
        self, name: str, request: Request, http_status: int = 200, **context: Any
    ) -> HTMLResponse:
        """A full HTML page."""
        return HTMLResponse(self.render(name, request, **context), status_code=http_status)

    def set_cookie(self, response: Response, request: Request, session: Session) -> None:
        """Give the browser its session id: HttpOnly, SameSite=Strict, Secure over https."""
        secure = self.secure_cookies
        if secure is None:
            secure = request.url.scheme == "https"
        response.set_cookie(
            COOKIE,
            session.id,
            max_age=int(ABSOLUTE_EXPIRY),
            path=PREFIX,
            httponly=True,
            samesite="strict",
            secure=secure,
        )


def make_templates() -> jinja2.Environment:
    """The templates shipped in this package (autoescaped), with the helpers they call."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fission.server.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.globals["query_with"] = query_with_page
    return env


def query_with_page(query: Any, page: int) -> str:
    """A dataclass of query fields as a query string, on page ``page``."""
    fields = {k: v for k, v in dataclasses.asdict(query).items() if v not in ("", None)}
    return urlencode(fields | {"page": page})


def dashboard_of(request: Request) -> Dashboard:
    """The Dashboard behind this request's app."""
    dashboard: Dashboard = request.app.state.dashboard
    return dashboard


async def current_session(request: Request) -> Session:
    """The caller's session, whose key is still an active admin key; refused otherwise."""
    dash = dashboard_of(request)
    cookie = request.cookies.get(COOKIE)
    if not cookie:
        raise LoginNeeded("the dashboard needs you to log in at /ui/login")
    session = dash.sessions.get(cookie)
    if session.key_id is not None:
        key: ApiKey = await dash.with_keys(KeyStore.get, session.key_id)
        if not key.active or not key.is_admin:
            dash.sessions.end_key(key.id)
            raise SessionExpired(
                f"API key {key.id} ({key.name}) was revoked or is no longer an admin key: "
                "log in again with an admin key"
            )
    request.state.session = session
    return session


CurrentSession = Annotated[Session, Depends(current_session)]


async def read_form(request: Request) -> dict[str, str]:
    """A url-encoded form body (first value of each field); {} for other content types."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {}
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise InvalidInput(f"the form is over {MAX_FORM_BYTES // 1024} KiB")
    try:
        fields = parse_qs(body.decode(), keep_blank_values=True, max_num_fields=100)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"the form could not be read: {exc}") from exc
    return {name: values[0] for name, values in fields.items()}


async def changing_session(request: Request, session: CurrentSession) -> Session:
    """A state-changing request's session, after its Origin and CSRF token are checked."""
    headers = request.headers
    check_origin(headers.get("origin"), headers.get("referer"), headers.get("host"))
    form = await read_form(request)
    request.state.form = form
    check_csrf(session, headers.get(CSRF_HEADER) or form.get(CSRF_FIELD))
    return session


ChangingSession = Annotated[Session, Depends(changing_session)]


def wants_json(request: Request) -> bool:
    """True for the JSON API, the live streams and the run box, whose clients are scripts."""
    path = request.url.path
    accept = request.headers.get("accept", "")
    return (
        "/api/" in path
        or "/live/" in path
        or "application/json" in accept
        or "text/event-stream" in accept  # the run box shows the error's message
    )


def error_response(request: Request, status: int, error: FissionError) -> Response:
    """An error as JSON for scripts, else as a page saying what happened and what to do."""
    if wants_json(request):
        return JSONResponse({"error": error_body(error)}, status_code=status)
    dash = dashboard_of(request)
    response = dash.page("error.html", request, status, code=status, error=error)
    if isinstance(error, SessionExpired):
        response.delete_cookie(COOKIE, path=PREFIX)
    return response


def install_error_pages(app: FastAPI) -> None:
    """Every error the dashboard can meet becomes a clear 4xx page (a 500 only for bugs)."""

    @app.exception_handler(LoginNeeded)
    async def login_needed(request: Request, exc: LoginNeeded) -> Response:
        if wants_json(request):
            return error_response(request, 401, exc)
        return RedirectResponse(f"{PREFIX}/login", status_code=303)

    @app.exception_handler(FissionError)
    async def fission_error(request: Request, exc: FissionError) -> Response:
        return error_response(request, exc.http_status, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()[:5]
        )
        return error_response(request, 400, InvalidInput(f"the request is not valid: {problems}"))

    # Routing's own errors (an unknown path, a wrong method) are keyed by status code.
    @app.exception_handler(404)
    async def no_page(request: Request, _: Exception) -> Response:
        error = NotFound(f"there is no dashboard page at {request.url.path[:200]}")
        return error_response(request, 404, error)

    @app.exception_handler(405)
    async def wrong_method(request: Request, _: Exception) -> Response:
        error = InvalidInput(f"{request.method} is not allowed on {request.url.path[:200]}")
        return error_response(request, 405, error)


class SecurityHeaders:
    """ASGI middleware: the dashboard's pages may not be framed, sniffed or cached."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def secure_cookies_from_env() -> bool | None:
    """``FISSION_DASHBOARD_SECURE_COOKIE``: 1 always Secure, 0 never, unset: when on https."""
    value = os.environ.get(SECURE_COOKIE_ENV, "").strip()
    return None if not value else value not in ("0", "false", "no")


def create_dashboard(
    service: Service, gate: Gatekeeper, stopping: asyncio.Event | None = None
) -> FastAPI:
    """The dashboard app over ``service``; mount it at ``/ui``. ``stopping``: set when the
    server starts to stop (live streams then end at once)."""
    from fission.server.dashboard import actions, live, pages, snapshots

    app = FastAPI(title="fission dashboard", version=__version__, docs_url=None, redoc_url=None)
    dashboard = Dashboard(service, gate, secure_cookies_from_env())
    if stopping is not None:
        dashboard.stopping = stopping
    app.state.dashboard = dashboard
    install_error_pages(app)
    app.include_router(pages.router)
    app.include_router(live.router)
    app.include_router(actions.router)
    app.include_router(snapshots.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_middleware(SecurityHeaders)
    return app
