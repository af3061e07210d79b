"""e2b-code-interpreter's API (``/execute``, ``/contexts``) over fission's Python code contexts.

Each E2B context is a fission context of the sandbox (a long-lived interpreter whose globals
persist); a call without one runs in the sandbox's default context, as E2B's does. The code is
wrapped in a small cell runner (``CELL_RUNNER``) that runs it as fission's kernel would and
then reports, on one marked line at the very end of stdout, the last expression's ``repr``
(E2B's text result) or the uncaught exception's name, value and traceback. Output streams as
E2B's NDJSON lines (``stdout``, ``stderr``, ``result``, ``error``, ``number_of_executions``).
Rich results: ``text`` only; an image's PNG would need matplotlib, which fission's Python
image does not ship (docs/e2b.md). Only Python contexts exist (``language`` python or unset).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from fission.core.sandbox_spec import SandboxRecord
from fission.core.sandboxes import SandboxManager
from fission.e2b.access import Box, SandboxAccess, http_status
from fission.e2b.paths import E2B_HOME
from fission.errors import FissionError, InvalidInput, NotFound, SandboxNotFound

DEFAULT_CONTEXT = "e2b-default"
MARK = "\x1e"  # starts the runner's report line; user output before it streams as it is
MAX_CODE_SECONDS = 3600.0
CELL_RUNNER = """
def _fission_e2b_cell(source, cell):
    import ast, json, linecache, sys, traceback
    name = "<cell %d>" % cell
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    report = None
    try:
        tree = ast.parse(source, name, "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, name, "exec"), globals())
        if last is not None:
            value = eval(compile(last, name, "eval"), globals())
            if value is not None:
                report = {"type": "result", "text": repr(value), "is_main_result": True}
    except BaseException as exc:
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        report = {
            "type": "error",
            "name": type(exc).__name__,
            "value": str(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, tb)),
        }
    sys.stdout.flush()
    sys.stderr.flush()
    if report is not None:
        sys.stdout.write("\\x1e" + json.dumps(report) + "\\n")
        sys.stdout.flush()
"""


class ExecuteBody(BaseModel):
    """The code interpreter's ``/execute`` body."""

    model_config = ConfigDict(extra="ignore")

    code: str
    context_id: str | None = None
    language: str | None = None
    env_vars: dict[str, str] | None = None


class ContextBody(BaseModel):
    """The code interpreter's ``/contexts`` body."""

    model_config = ConfigDict(extra="ignore")

    language: str | None = None
    cwd: str | None = None


def wrap(code: str, cell: int) -> str:
    """The script that runs ``code`` as one cell and reports its result or error."""
    return f"{CELL_RUNNER}\n_fission_e2b_cell({code!r}, {cell})\n"


def line(kind: str, **fields: Any) -> bytes:
    """One NDJSON line of the code interpreter's stream."""
    return (json.dumps({"type": kind, **fields}) + "\n").encode()


class OutputSplitter:
    """Separates the user's stdout from the runner's report at the end of it."""

    def __init__(self) -> None:
        self.report = ""
        self.reporting = False

    def stdout(self, text: str) -> str:
        """The part of a stdout chunk that is the user's (the rest is kept as the report)."""
        if self.reporting:
            self.report += text
            return ""
        before, mark, after = text.partition(MARK)
        if mark:
            self.reporting = True
            self.report = after
        return before


def python_only(language: str | None) -> None:
    """Refuse a context language other than Python."""
    if language not in (None, "", "python", "python3"):
        raise InvalidInput(f"fission's code contexts run Python only, not {language!r}")


def create_interpreter_app(manager: SandboxManager, access: SandboxAccess) -> FastAPI:
    """The code interpreter's routes (mounted by ``create_e2b_app``)."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    contexts: dict[str, dict[str, dict[str, str]]] = {}  # sandbox -> id -> context
    cells: dict[str, int] = {}
    fresh: set[tuple[str, str]] = set()  # contexts restarted: their next run starts afresh

    app.state.access = access

    @app.exception_handler(FissionError)
    async def fission_error(_: Request, exc: FissionError) -> JSONResponse:
        status = http_status(exc)
        return JSONResponse({"code": status, "message": str(exc)}, status)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    def forget_gone() -> None:
        """Drop what this app keeps for sandboxes that no longer exist."""
        for sandbox_id in list(contexts) + list(cells):
            try:
                manager.get(sandbox_id)
            except SandboxNotFound:
                contexts.pop(sandbox_id, None)
                cells.pop(sandbox_id, None)
                fresh.difference_update({key for key in fresh if key[0] == sandbox_id})

    def known(record: SandboxRecord, context_id: str) -> dict[str, str]:
        found = contexts.get(record.id, {}).get(context_id)
        if found is None:
            raise NotFound(f"no context {context_id!r} in sandbox {record.id}")
        return found

    @app.post("/contexts")
    async def create_context(body: ContextBody, record: Box) -> dict[str, str]:
        python_only(body.language)
        forget_gone()
        context = {
            "id": f"ctx-{secrets.token_hex(8)}",
            "language": "python",
            "cwd": body.cwd or E2B_HOME,
        }
        contexts.setdefault(record.id, {})[context["id"]] = context
        return context

    @app.get("/contexts")
    async def list_contexts(record: Box) -> list[dict[str, str]]:
        return list(contexts.get(record.id, {}).values())

    @app.delete("/contexts/{context_id}", status_code=204)
    async def remove_context(context_id: str, record: Box) -> Response:
        known(record, context_id)
        del contexts[record.id][context_id]
        fresh.add((record.id, context_id))  # its interpreter is not reused
        return Response(status_code=204)

    @app.post("/contexts/{context_id}/restart", status_code=204)
    async def restart_context(context_id: str, record: Box) -> Response:
        known(record, context_id)
        fresh.add((record.id, context_id))
        return Response(status_code=204)

    @app.post("/execute")
    async def execute(body: ExecuteBody, record: Box) -> StreamingResponse:
        python_only(body.language)
        context_id = body.context_id or DEFAULT_CONTEXT
        if body.context_id:
            known(record, body.context_id)
        manager.check_running(record.id, record.owner)
        if record.id not in cells:
            forget_gone()  # once per sandbox: what earlier sandboxes left goes
        cells[record.id] = cell = cells.get(record.id, 0) + 1
        restart = (record.id, context_id) in fresh
        fresh.discard((record.id, context_id))
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        splitter = OutputSplitter()
        partial = {"stdout": "", "stderr": ""}  # a line's start, until its end comes

        def emit(stream: str, text: str) -> None:
            queue.put_nowait(line(stream, text=text, timestamp=time.time_ns() // 1000))

        def on_output(stream: str, data: bytes) -> None:
            text = data.decode("utf-8", errors="replace")
            if stream == "stdout":
                text = splitter.stdout(text)
            # Whole lines, as Jupyter hands them over (print's text and newline are two writes).
            text = partial[stream] + text
            head, newline, partial[stream] = text.rpartition("\n")
            if newline:
                emit(stream, head + newline)

        def flush_partial() -> None:
            for stream, rest in partial.items():
                if rest:
                    emit(stream, rest)

        async def run() -> None:
            try:
                await manager.run_code(
                    record.id,
                    wrap(body.code, cell),
                    owner=record.owner,
                    timeout=MAX_CODE_SECONDS,
                    env=body.env_vars,
                    context=context_id,
                    fresh_context=restart,
                    on_output=on_output,
                )
                flush_partial()
                if splitter.report.strip():
                    report = json.loads(splitter.report.strip().splitlines()[0])
                    kind = report.pop("type")
                    queue.put_nowait(line(kind, **report))
                queue.put_nowait(line("number_of_executions", execution_count=cell))
            except FissionError as exc:
                queue.put_nowait(
                    line("error", name=type(exc).__name__, value=str(exc), traceback="")
                )
            finally:
                queue.put_nowait(None)

        task = asyncio.create_task(run())

        async def stream() -> AsyncIterator[bytes]:
            try:
                while (item := await queue.get()) is not None:
                    yield item
            finally:
                if not task.done():
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    return app
