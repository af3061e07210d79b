"""The daemon's HTTP API (FastAPI): a thin adapter over ``fission.core.service.Service``.

``POST /v1/run`` streams a one-shot run as newline-delimited JSON or server-sent events (see
``fission.api.run_stream``); the machine is taken from the pool before the response starts,
so ``Busy`` is a plain 429. ``/v1/sandboxes`` holds persistent sandboxes (``sandboxes_api``).
``GET /v1/pools`` shows the pools, ``GET /v1/health`` answers when the daemon is up (and needs
no key). The OpenAPI document is at ``/openapi.json``, its pages at ``/docs``. Errors are
``{"error": {"code": slug, "message": text}}`` with the status of the error class.
``GET /metrics`` is the Prometheus exposition (``server.metrics``; an admin key on TCP). Every
answer carries an ``X-Request-Id`` (``server.request_ids``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from fission import __version__
from fission.agent.client import OutputSink
from fission.api.run_stream import error_body
from fission.auth.audit_log import LOCAL
from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.provision import InstallResult
from fission.core.service import Service
from fission.core.spec import RunResult
from fission.core.transfers import check_transfers
from fission.e2b import create_e2b_app
from fission.errors import FissionError, InvalidInput, QuotaExceeded, Unauthorized
from fission.server.auth import Admin, Gatekeeper, Who
from fission.server.dashboard import create_dashboard
from fission.server.metrics import CONTENT_TYPE, ServiceMetrics
from fission.server.models import InstallRequest, RepoRequest, RunRequest, to_uploads
from fission.server.ports_api import ports_router
from fission.server.pty_api import pty_router
from fission.server.request_ids import RequestContext
from fission.server.sandboxes_api import sandbox_router
from fission.server.snapshots_api import snapshot_router
from fission.server.streaming import WantsSse, streaming_response
from fission.server.watch_api import watch_router


def create_app(
    service: Service, socket: Path | None = None, keys_db: Path | None = None
) -> FastAPI:
    """The FastAPI application serving ``service``; its lifespan starts and stops it.

    With ``keys_db`` every request but ``/v1/health`` needs an API key from that database
    (TCP listeners); without it callers are local (the Unix socket). ``socket`` is removed at
    shutdown (uvicorn re-raises SIGTERM once shut down, so code after ``Server.run`` may never
    run).
    """
    gate = Gatekeeper(keys_db, service.telemetry)
    if gate.keys is not None:  # a key may keep its paused sandboxes less long than the daemon
        service.sandboxes.retention_for = gate.paused_retention_of
    metrics = ServiceMetrics(service)
    # Set when the server starts to stop (the daemon's uvicorn Server sets it before waiting for
    # open responses; the lifespan's end at the latest): live streams end at once on it.
    stopping = asyncio.Event()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            stopping.set()
            await service.close()
            gate.close()
            if socket is not None:
                socket.unlink(missing_ok=True)

    app = FastAPI(title="fission", version=__version__, lifespan=lifespan)
    app.state.gate = gate
    app.state.metrics = metrics
    app.state.stopping = stopping
    app.add_middleware(RequestContext, metrics=metrics)

    @app.exception_handler(FissionError)
    async def fission_error(_: Request, exc: FissionError) -> JSONResponse:
        headers = {}
        if isinstance(exc, QuotaExceeded) and exc.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        if isinstance(exc, Unauthorized):
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(
            status_code=exc.http_status, content={"error": error_body(exc)}, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()[:5]
        )
        error = InvalidInput(f"the request is not valid: {problems}")
        return JSONResponse(status_code=422, content={"error": error_body(error)})

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "version": __version__}

    @app.get(
        "/metrics",
        summary="Prometheus metrics (an admin key on TCP)",
        response_class=PlainTextResponse,
    )
    async def prometheus_metrics(_: Admin) -> PlainTextResponse:
        return PlainTextResponse(await metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/pools")
    async def pools(_: Who) -> dict[str, Any]:
        return service.status()

    @app.get("/v1/cluster", summary="Hosts, capacity, pools and sandboxes per host (admin)")
    async def cluster(_: Admin) -> dict[str, Any]:
        return await service.cluster_status()

    @app.post("/v1/run", summary="Run code once in a fresh microVM (streamed)")
    async def run(
        body: RunRequest,
        who: Who,
        sse: WantsSse,
    ) -> StreamingResponse:
        spec = body.to_spec()
        uploads, downloads = to_uploads(body.uploads), tuple(body.downloads)
        check_transfers(uploads, downloads)
        lease = await service.acquire(spec)  # before the response starts: Busy is a plain 429

        def work(sink: OutputSink) -> Awaitable[RunResult]:
            return service.run(
                spec,
                sink,
                who=who.owner or LOCAL,
                uploads=uploads,
                downloads=downloads,
                lease=lease,
            )

        # The cleanup disposes the lease if the run never started (a no-op otherwise).
        return streaming_response(work, sse, lambda: service.dispose(lease))

    @app.post("/v1/install", summary="Install packages (cached per set), then run a command")
    async def install(
        body: InstallRequest,
        who: Who,
        sse: WantsSse,
    ) -> StreamingResponse:
        language = resolve_language(body.language)
        limits = Limits(timeout=body.timeout)

        def work(sink: OutputSink) -> Awaitable[InstallResult]:
            return service.install(
                language,
                body.packages,
                body.command,
                sink,
                index_url=body.index_url,
                allow_hosts=body.allow_hosts,
                limits=limits,
                who=who.owner or LOCAL,
            )

        return streaming_response(work, sse)

    @app.post("/v1/repo", summary="Clone a repository (or use uploaded files), then run a command")
    async def repo(
        body: RepoRequest,
        who: Who,
        sse: WantsSse,
    ) -> StreamingResponse:
        language = resolve_language(body.language)
        limits = Limits(timeout=body.timeout)
        files = to_uploads(body.files)
        check_transfers(files, ())

        def work(sink: OutputSink) -> Awaitable[RunResult]:
            return service.repo(
                language,
                body.url,
                body.command,
                sink,
                ref=body.ref,
                allow_hosts=body.allow_hosts,
                limits=limits,
                files=files,
                who=who.owner or LOCAL,
            )

        return streaming_response(work, sse)

    app.include_router(sandbox_router(service.sandboxes))
    app.include_router(snapshot_router(service.sandboxes))
    app.include_router(ports_router(service.sandboxes))
    app.include_router(pty_router(service.sandboxes))
    app.include_router(watch_router(service.sandboxes))
    # the operator's pages: docs/dashboard.md
    app.mount("/ui", create_dashboard(service, gate, stopping))
    app.mount("/e2b", create_e2b_app(service.sandboxes, gate.admit))  # E2B's API: docs/e2b.md
    return app
