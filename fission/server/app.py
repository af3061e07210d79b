"""The daemon's HTTP API (FastAPI): a thin adapter over ``fission.core.service.Service``.

``POST /v1/run`` streams a run as newline-delimited JSON (see ``fission.wire``); the machine is
taken from the pool before the response starts, so ``Busy`` is a plain 429. ``GET /v1/pools``
shows the pools, ``GET /v1/health`` answers when the daemon is up.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from fission import __version__
from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.service import Service
from fission.core.spec import RunSpec
from fission.errors import FissionError, InvalidInput
from fission.wire import error_body, output_line, result_line


class RunRequest(BaseModel):
    """A one-shot run: the program, its language and its limits."""

    language: str = "python"
    code: str
    timeout: float = 30.0
    memory_mb: int = 256
    cpus: int = 1
    disk_mb: int = 512
    pids: int = 256
    output_limit_mb: float = 10.0
    env: dict[str, str] = Field(default_factory=dict)
    stdin_b64: str | None = None

    def to_spec(self) -> RunSpec:
        """Validate into a RunSpec (raises InvalidInput subclasses)."""
        limits = Limits(
            timeout=self.timeout,
            memory_mb=self.memory_mb,
            cpus=self.cpus,
            disk_mb=self.disk_mb,
            pids=self.pids,
            output_limit_mb=self.output_limit_mb,
        )
        try:
            stdin = base64.b64decode(self.stdin_b64, validate=True) if self.stdin_b64 else None
        except ValueError as exc:
            raise InvalidInput(f"stdin_b64 is not valid base64: {exc}") from exc
        return RunSpec(resolve_language(self.language), self.code, limits, self.env, stdin)


def create_app(service: Service, socket: Path | None = None) -> FastAPI:
    """The FastAPI application serving ``service``; its lifespan starts and stops it.

    ``socket`` is removed at shutdown (uvicorn re-raises SIGTERM once shut down, so code
    after ``Server.run`` may never run).
    """

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.close()
            if socket is not None:
                socket.unlink(missing_ok=True)

    app = FastAPI(title="fission", version=__version__, lifespan=lifespan)

    @app.exception_handler(FissionError)
    async def fission_error(_: Request, exc: FissionError) -> JSONResponse:
        return JSONResponse(status_code=exc.http_status, content={"error": error_body(exc)})

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "version": __version__}

    @app.get("/v1/pools")
    async def pools() -> dict[str, Any]:
        return service.status()

    @app.post("/v1/run")
    async def run(body: RunRequest) -> StreamingResponse:
        spec = body.to_spec()
        machine, release = await service.acquire(spec)
        return StreamingResponse(
            stream_run(service, machine, release, spec), media_type="application/x-ndjson"
        )

    return app


async def stream_run(
    service: Service, machine: Any, release: Any, spec: RunSpec
) -> AsyncIterator[bytes]:
    """Run on the acquired machine, yielding NDJSON lines as output arrives."""
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def execute() -> None:
        try:
            result = await service.run_on(
                machine, spec, lambda stream, data: queue.put_nowait(output_line(stream, data))
            )
            queue.put_nowait(result_line(result))
        except FissionError as exc:
            queue.put_nowait(error_body(exc))
        finally:
            service.dispose(release)
            queue.put_nowait(None)

    task = asyncio.create_task(execute())
    try:
        while (line := await queue.get()) is not None:
            yield (json.dumps(line) + "\n").encode()
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
