"""HTTP routes of persistent sandboxes: a thin adapter over ``SandboxManager``.

Runs and commands stream as NDJSON (default) or server-sent events (``Accept:
text/event-stream`` or ``?format=sse``). Files move as raw bytes: ``PUT .../files?path=P``
streams the request body into the sandbox, ``GET .../files?path=P`` streams the file back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from fission.agent.client import OutputSink
from fission.core.sandbox_spec import SandboxState
from fission.core.sandbox_templates import create_from_template
from fission.core.sandboxes import SandboxManager
from fission.core.spec import RunResult
from fission.errors import InvalidInput
from fission.server.auth import Who
from fission.server.models import (
    ExecBody,
    PathBody,
    RunCodeRequest,
    SandboxCreate,
    TtlBody,
    decode_stdin,
)
from fission.server.streaming import WantsSse, streaming_response

FilePath = Annotated[str, Query(min_length=1, max_length=4096, description="Path in the sandbox.")]
UPLOAD_DOC = {
    "requestBody": {
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "required": True,
    }
}


def parse_metadata_filter(pairs: list[str]) -> dict[str, str]:
    """``["team:ml", "job:7"]`` -> ``{"team": "ml", "job": "7"}``."""
    found: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition(":")
        if not sep or not key:
            raise InvalidInput(f"metadata filter {pair!r} is not KEY:VALUE")
        found[key] = value
    return found


def file_info_json(info: Any) -> dict[str, Any]:
    """A FileInfo (a dataclass from the agent client) as JSON."""
    return dataclasses.asdict(info)


def sandbox_router(manager: SandboxManager) -> APIRouter:
    """The ``/v1/sandboxes`` routes over ``manager`` (callers admitted by ``auth.Who``)."""
    router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"])

    @router.post("", status_code=201, summary="Create a sandbox")
    async def create(body: SandboxCreate, who: Who) -> dict[str, Any]:
        if body.from_snapshot is not None:
            ttl = body.ttl if "ttl" in body.model_fields_set else None
            record = await manager.snapshots.create_from(
                body.from_snapshot, who.owner, who.max_sandboxes, ttl=ttl, metadata=body.metadata
            )
        elif body.template is not None:
            record = await create_from_template(
                manager, body.to_spec(), body.template, who.owner, who.max_sandboxes
            )
        else:
            record = await manager.create(body.to_spec(), who.owner, who.max_sandboxes)
        return record.to_json()

    @router.get("", summary="List sandboxes")
    async def list_sandboxes(
        who: Who,
        state: SandboxState | None = None,
        metadata: Annotated[list[str], Query(description="KEY:VALUE, repeatable")] = [],  # noqa: B006
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        records, next_cursor = manager.list_sandboxes(
            who.owner, state, parse_metadata_filter(metadata), limit, cursor
        )
        return {"sandboxes": [r.to_json() for r in records], "next_cursor": next_cursor}

    @router.get("/{sandbox_id}", summary="Get a sandbox")
    async def get(sandbox_id: str, who: Who) -> dict[str, Any]:
        return manager.get(sandbox_id, who.owner).to_json()

    @router.delete("/{sandbox_id}", status_code=204, summary="Delete a sandbox")
    async def delete(sandbox_id: str, who: Who) -> Response:
        await manager.delete(sandbox_id, who.owner)
        return Response(status_code=204)

    @router.post("/{sandbox_id}/ttl", summary="Extend or shorten a sandbox's life from now")
    async def set_ttl(sandbox_id: str, body: TtlBody, who: Who) -> dict[str, Any]:
        return manager.set_ttl(sandbox_id, body.ttl, who.owner).to_json()

    @router.post("/{sandbox_id}/pause", summary="Pause a sandbox to disk")
    async def pause(sandbox_id: str, who: Who) -> dict[str, Any]:
        return (await manager.pause(sandbox_id, who.owner)).to_json()

    @router.post("/{sandbox_id}/resume", summary="Resume a paused sandbox")
    async def resume(sandbox_id: str, who: Who) -> dict[str, Any]:
        return (await manager.resume(sandbox_id, who.owner)).to_json()

    @router.post("/{sandbox_id}/run", summary="Run code (streamed)")
    async def run(
        sandbox_id: str,
        body: RunCodeRequest,
        who: Who,
        sse: WantsSse,
    ) -> StreamingResponse:
        manager.check_running(sandbox_id, who.owner)  # a 404 or 409, not a stream

        def work(sink: OutputSink) -> Awaitable[RunResult]:
            return manager.run_code(
                sandbox_id,
                body.code,
                owner=who.owner,
                timeout=body.timeout,
                env=body.env,
                context=body.context,
                fresh_context=body.fresh_context,
                on_output=sink,
                checkpoint=body.checkpoint,
                max_snapshot_mb=who.max_snapshot_mb,
            )

        return streaming_response(work, sse)

    @router.post("/{sandbox_id}/exec", summary="Run a command (streamed)")
    async def exec_command(
        sandbox_id: str,
        body: ExecBody,
        who: Who,
        sse: WantsSse,
    ) -> StreamingResponse:
        manager.check_running(sandbox_id, who.owner)
        stdin = decode_stdin(body.stdin_b64)

        def work(sink: OutputSink) -> Awaitable[RunResult]:
            return manager.exec_command(
                sandbox_id,
                body.command,
                owner=who.owner,
                timeout=body.timeout,
                env=body.env,
                cwd=body.cwd,
                stdin=stdin,
                on_output=sink,
                checkpoint=body.checkpoint,
                max_snapshot_mb=who.max_snapshot_mb,
            )

        return streaming_response(work, sse)

    @router.put("/{sandbox_id}/files", summary="Upload a file", openapi_extra=UPLOAD_DOC)
    async def upload(sandbox_id: str, path: FilePath, request: Request, who: Who) -> dict[str, Any]:
        info = await manager.write_file(sandbox_id, path, request.stream(), who.owner)
        return file_info_json(info)

    @router.get(
        "/{sandbox_id}/files",
        summary="Download a file",
        response_class=StreamingResponse,
        responses={200: {"content": {"application/octet-stream": {}}}},
    )
    async def download(sandbox_id: str, path: FilePath, who: Who) -> StreamingResponse:
        chunks = manager.read_file(sandbox_id, path, who.owner)
        first = await anext(chunks, b"")  # errors (not found, not allowed) before the stream

        async def body() -> AsyncIterator[bytes]:
            try:
                if first:
                    yield first
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()

        return StreamingResponse(body(), media_type="application/octet-stream")

    @router.delete("/{sandbox_id}/files", status_code=204, summary="Remove a file or directory")
    async def remove(
        sandbox_id: str, path: FilePath, who: Who, recursive: bool = False
    ) -> Response:
        await manager.remove_file(sandbox_id, path, recursive, who.owner)
        return Response(status_code=204)

    @router.get("/{sandbox_id}/files/list", summary="List a directory")
    async def list_files(sandbox_id: str, who: Who, path: FilePath = ".") -> dict[str, Any]:
        entries = await manager.list_files(sandbox_id, path, who.owner)
        return {"entries": [file_info_json(entry) for entry in entries]}

    @router.get("/{sandbox_id}/files/stat", summary="Stat a path")
    async def stat(sandbox_id: str, path: FilePath, who: Who) -> dict[str, Any]:
        return file_info_json(await manager.stat_file(sandbox_id, path, who.owner))

    @router.post("/{sandbox_id}/files/mkdir", summary="Create a directory (and parents)")
    async def mkdir(sandbox_id: str, body: PathBody, who: Who) -> dict[str, Any]:
        return file_info_json(await manager.make_dir(sandbox_id, body.path, who.owner))

    return router
