"""E2B's control plane (its public OpenAPI: ``/sandboxes``, ``/v2/sandboxes``) over fission.

Create maps E2B's template to a fission language (``TEMPLATES``), ``timeout`` to the
sandbox's ttl, ``autoPause`` to ``on_timeout="pause"``, ``envVars`` and ``metadata`` as they
are. Connect resumes a paused sandbox and sets its timeout; list filters by metadata and state
and pages with ``X-Next-Token``. Errors are E2B's ``{code, message}`` with the status its SDK
maps to its exceptions; a 429 says ``Should-Retry: false`` (a quota does not clear by retrying
at once, so the SDK raises its RateLimitException straight away).
"""

from __future__ import annotations

import datetime
import math
import urllib.parse
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from fission.core.languages import resolve_language
from fission.core.sandbox_spec import SandboxRecord, SandboxSpec, SandboxState
from fission.core.sandboxes import SandboxManager
from fission.e2b.access import ENVD_VERSION, Admit, Caller, SandboxAccess, http_status
from fission.errors import FissionError, InvalidInput, QuotaExceeded, UnknownLanguage

# E2B's public templates, as fission languages; any fission language name works as well.
TEMPLATES = {
    "base": "python",
    "code-interpreter-v1": "python",
    "code-interpreter": "python",
    "code-interpreter-stateful": "python",
}
DEFAULT_TIMEOUT = 300  # seconds: E2B's default sandbox lifetime
CLIENT_ID = "fission"


class NewSandbox(BaseModel):
    """E2B's ``NewSandbox``/``NewSandboxV2`` body: the fields fission uses (others ignored)."""

    model_config = ConfigDict(extra="ignore")

    templateID: str
    timeout: int = Field(DEFAULT_TIMEOUT, ge=1)
    autoPause: bool = False
    metadata: dict[str, str] | None = None
    envVars: dict[str, str] | None = None


class TimeoutBody(BaseModel):
    """E2B's ``SandboxTimeoutRequest`` and ``ConnectSandbox`` body."""

    model_config = ConfigDict(extra="ignore")

    timeout: int = Field(DEFAULT_TIMEOUT, ge=0)


def language_of(template: str) -> str:
    """The fission language an E2B template id stands for; UnknownLanguage names the choices."""
    name = TEMPLATES.get(template.split(":")[0], template)
    try:
        return resolve_language(name).name
    except UnknownLanguage as exc:
        known = ", ".join(sorted(TEMPLATES))
        raise UnknownLanguage(
            f"template {template!r} is not one fission serves: use {known}, or a fission "
            f"language (python, node, bash)"
        ) from exc


def rfc3339(seconds: float) -> str:
    """A Unix time as E2B writes its times."""
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat().replace("+00:00", "Z")


def parse_metadata_query(value: str | None) -> dict[str, str]:
    """E2B's ``metadata`` filter: one query value holding ``k=v&k2=v2`` (each part quoted)."""
    if not value:
        return {}
    pairs = urllib.parse.parse_qsl(value, keep_blank_values=True, strict_parsing=False)
    return {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}


class ControlPlane:
    """The routes' work: records in E2B's shapes."""

    def __init__(self, manager: SandboxManager, access: SandboxAccess) -> None:
        self.manager = manager
        self.access = access

    def sandbox(self, record: SandboxRecord) -> dict[str, Any]:
        """E2B's ``Sandbox``: what the SDK needs to reach the sandbox."""
        return {
            "templateID": record.spec.language.name,
            "sandboxID": record.id,
            "clientID": CLIENT_ID,
            "envdVersion": ENVD_VERSION,
            "envdAccessToken": self.access.token(record.id),
            # The code interpreter's context calls carry only this one (the same token).
            "trafficAccessToken": self.access.token(record.id),
            "domain": None,
        }

    def listed(self, record: SandboxRecord) -> dict[str, Any]:
        """E2B's ``ListedSandbox``."""
        limits = record.spec.limits
        state = "paused" if record.state == SandboxState.PAUSED else "running"
        return {
            "templateID": record.spec.language.name,
            "sandboxID": record.id,
            "clientID": CLIENT_ID,
            "startedAt": rfc3339(record.created_at),
            "endAt": rfc3339(record.expires_at),
            "cpuCount": limits.cpus,
            "memoryMB": limits.memory_mb,
            "diskSizeMB": limits.disk_mb,
            "state": state,
            "envdVersion": ENVD_VERSION,
            "metadata": dict(record.spec.metadata),
        }

    def detail(self, record: SandboxRecord) -> dict[str, Any]:
        """E2B's ``SandboxDetail``."""
        return self.listed(record) | {"envdAccessToken": self.access.token(record.id)}

    async def create(self, body: NewSandbox, caller: Caller) -> dict[str, Any]:
        """Start a sandbox for E2B's create request."""
        spec = SandboxSpec(
            resolve_language(language_of(body.templateID)),
            ttl=float(body.timeout),
            env=dict(body.envVars or {}),
            metadata=dict(body.metadata or {}),
            on_timeout="pause" if body.autoPause else "delete",
        )
        record = await self.manager.create(spec, caller.owner, caller.max_sandboxes)
        return self.sandbox(record)

    async def connect(self, sandbox_id: str, timeout: int, caller: Caller) -> tuple[int, Any]:
        """Resume the sandbox if paused (201) or just find it (200); then set its timeout."""
        record = self.manager.get(sandbox_id, caller.owner)
        status = 200
        if record.state == SandboxState.PAUSED:
            record = await self.manager.resume(sandbox_id, caller.owner)
            status = 201
        if timeout > 0:
            record = self.manager.set_ttl(sandbox_id, float(timeout), caller.owner)
        return status, self.sandbox(record)

    def list(
        self,
        caller: Caller,
        metadata: str | None,
        state: str | None,
        limit: int,
        next_token: str | None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of the caller's sandboxes and the token of the next."""
        states = {part for part in (state or "").split(",") if part}
        unknown = states - {"running", "paused"}
        if unknown:
            raise InvalidInput(f"state {sorted(unknown)} is not running or paused")
        wanted = SandboxState(states.pop()) if len(states) == 1 else None
        records, cursor = self.manager.list_sandboxes(
            caller.owner, wanted, parse_metadata_query(metadata), limit, next_token
        )
        shown = [r for r in records if r.state in (SandboxState.RUNNING, SandboxState.PAUSED)]
        return [self.listed(r) for r in shown], cursor


async def current_caller(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> Caller:
    """FastAPI dependency: the caller, admitted by its fission API key (``X-API-Key``)."""
    admit: Admit = request.app.state.admit
    return await admit(authorization, x_api_key)


Who = Annotated[Caller, Depends(current_caller)]


def create_control_app(manager: SandboxManager, access: SandboxAccess, admit: Admit) -> FastAPI:
    """The control plane's routes (mounted by ``create_e2b_app``)."""
    plane = ControlPlane(manager, access)
    app = FastAPI(title="fission: E2B API", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.admit = admit

    @app.exception_handler(FissionError)
    async def fission_error(_: Request, exc: FissionError) -> JSONResponse:
        status = http_status(exc)
        headers = {"Should-Retry": "false"} if status == 429 else {}
        if isinstance(exc, QuotaExceeded) and exc.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return JSONResponse({"code": status, "message": str(exc)}, status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
            for error in exc.errors()[:5]
        )
        return JSONResponse({"code": 400, "message": f"bad request: {problems}"}, 400)

    @app.post("/sandboxes", status_code=201)
    @app.post("/v2/sandboxes", status_code=201)
    async def create(body: NewSandbox, who: Who) -> dict[str, Any]:
        return await plane.create(body, who)

    @app.get("/sandboxes")
    @app.get("/v2/sandboxes")
    async def list_sandboxes(
        who: Who,
        response: Response,
        metadata: str | None = None,
        state: str | None = None,
        limit: int = 100,
        nextToken: str | None = None,
    ) -> list[dict[str, Any]]:
        found, cursor = plane.list(who, metadata, state, min(max(limit, 1), 200), nextToken)
        if cursor:
            response.headers["X-Next-Token"] = cursor
        return found

    @app.get("/sandboxes/{sandbox_id}")
    async def get(sandbox_id: str, who: Who) -> dict[str, Any]:
        return plane.detail(manager.get(sandbox_id, who.owner))

    @app.delete("/sandboxes/{sandbox_id}", status_code=204)
    async def kill(sandbox_id: str, who: Who) -> Response:
        await manager.delete(sandbox_id, who.owner)
        return Response(status_code=204)

    @app.post("/sandboxes/{sandbox_id}/timeout", status_code=204)
    async def set_timeout(sandbox_id: str, body: TimeoutBody, who: Who) -> Response:
        if body.timeout < 1:
            raise InvalidInput("timeout must be at least 1 second")
        manager.set_ttl(sandbox_id, float(body.timeout), who.owner)
        return Response(status_code=204)

    @app.post("/sandboxes/{sandbox_id}/pause", status_code=204)
    async def pause(sandbox_id: str, who: Who) -> Response:
        record = manager.get(sandbox_id, who.owner)
        if record.state == SandboxState.PAUSED:
            return JSONResponse({"code": 409, "message": f"{sandbox_id} is paused"}, 409)
        await manager.pause(sandbox_id, who.owner)
        return Response(status_code=204)

    @app.post("/sandboxes/{sandbox_id}/resume", status_code=201)
    @app.post("/sandboxes/{sandbox_id}/connect")
    @app.post("/v2/sandboxes/{sandbox_id}/connect")
    async def connect(sandbox_id: str, who: Who, body: TimeoutBody | None = None) -> JSONResponse:
        status, answer = await plane.connect(
            sandbox_id, body.timeout if body is not None else DEFAULT_TIMEOUT, who
        )
        return JSONResponse(answer, status)

    @app.get("/sandboxes/{sandbox_id}/metrics")
    async def metrics(sandbox_id: str, who: Who) -> list[dict[str, Any]]:
        manager.get(sandbox_id, who.owner)  # 404 for another's or a gone sandbox
        return []  # fission keeps no per-sandbox time series (docs/e2b.md)

    @app.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def unsupported(rest: str, request: Request, _: Who) -> JSONResponse:
        what = f"{request.method} /{rest}"
        message = f"fission's E2B API does not support {what} (see docs/e2b.md)"
        return JSONResponse({"code": 404, "message": message}, 404)

    return app
