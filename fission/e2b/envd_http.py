"""envd's plain HTTP routes: ``/files`` (download; multipart or octet-stream upload), ``/health``.

Uploads stream into the sandbox through fission's file writes (each file lands whole, or not
at all); a multipart part's file name is its path, as E2B's SDK sends it. Downloads stream the
file back. Errors are E2B's ``{code, message}`` with the status its SDK maps to exceptions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from fission.core.sandboxes import SandboxManager
from fission.e2b.access import Box, SandboxAccess, http_status
from fission.e2b.paths import e2b_path, guest_path
from fission.errors import FissionError, InvalidInput

UPLOAD_CHUNK = 1024 * 1024


async def upload_chunks(upload: Any) -> AsyncIterator[bytes]:
    """An uploaded part's bytes in pieces."""
    while chunk := await upload.read(UPLOAD_CHUNK):
        yield chunk


def error_response(exc: FissionError) -> JSONResponse:
    """E2B's error body for ``exc``."""
    status = http_status(exc)
    return JSONResponse({"code": status, "message": str(exc)}, status)


def create_envd_http(manager: SandboxManager, access: SandboxAccess) -> FastAPI:
    """The HTTP side of envd (mounted by ``create_e2b_app``)."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    app.state.access = access

    @app.exception_handler(FissionError)
    async def fission_error(_: Request, exc: FissionError) -> JSONResponse:
        return error_response(exc)

    @app.get("/health", status_code=204)
    async def health() -> Response:
        return Response(status_code=204)

    @app.get("/files")
    async def download(path: str, record: Box) -> StreamingResponse:
        chunks = manager.read_file(record.id, guest_path(path), record.owner)
        first = await anext(chunks, b"")  # not found, not allowed: before the stream starts

        async def body() -> AsyncIterator[bytes]:
            try:
                if first:
                    yield first
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()

        return StreamingResponse(body(), media_type="application/octet-stream")

    @app.post("/files")
    async def upload(request: Request, record: Box, path: str | None = None) -> list[Any]:
        written = []
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            async with request.form() as form:
                for _, part in form.multi_items():
                    if isinstance(part, str):
                        continue  # a plain form field, not a file
                    target = path if path and len(form) == 1 else part.filename
                    if not target:
                        raise InvalidInput("an uploaded file has no path (its file name)")
                    info = await manager.write_file(
                        record.id, guest_path(target), upload_chunks(part), record.owner
                    )
                    written.append(info)
        else:
            if not path:
                raise InvalidInput("the path query parameter is missing")
            info = await manager.write_file(
                record.id, guest_path(path), request.stream(), record.owner
            )
            written.append(info)
        return [
            {"name": info.name, "type": "file", "path": e2b_path(info.path)} for info in written
        ]

    return app
