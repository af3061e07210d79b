"""A loopback HTTP listener for exposed ports alone, for a process without the daemon's API.

``fission mcp`` runs its own Service and no REST API, so the URLs its ``sandbox_expose`` tool
hands out are served here: only the port routes (``ports_api``), on 127.0.0.1 and a free port,
and only with a port token (the key database is empty, so no API key admits anyone: another
user of the host cannot reach a sandbox's port without the token the tool returned).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Generator
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from fission.api.run_stream import error_body
from fission.core.sandboxes import SandboxManager
from fission.errors import FissionError
from fission.server.auth import Gatekeeper
from fission.server.ports_api import ports_router
from fission.waiting import wait_for

START_TIMEOUT = 10.0  # seconds the listener has to bind


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signals to the process that embeds it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def ports_app(manager: SandboxManager, keys_db: Path) -> FastAPI:
    """An app serving only the port routes; callers are checked against ``keys_db``."""
    app = FastAPI(title="fission ports", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.gate = Gatekeeper(keys_db)

    @app.exception_handler(FissionError)
    async def fission_error(_: Request, exc: FissionError) -> JSONResponse:
        return JSONResponse(status_code=exc.http_status, content={"error": error_body(exc)})

    app.include_router(ports_router(manager))
    return app


@contextlib.asynccontextmanager
async def ports_listener(manager: SandboxManager, state_dir: Path) -> AsyncIterator[str]:
    """Serve ``manager``'s exposed ports on 127.0.0.1 (tokens only); yields the base URL."""
    app = ports_app(manager, state_dir / "no-keys.sqlite3")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _QuietServer(uvicorn.Config(app, lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:

        async def up() -> bool:
            return server.started or task.done()

        await wait_for(
            up,
            timeout=START_TIMEOUT,
            interval=0.02,
            what="the exposed-port listener to start",
            setting="ports_listener.START_TIMEOUT",
        )
        if task.done():
            task.result()
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, START_TIMEOUT)
        app.state.gate.close()
        sock.close()
