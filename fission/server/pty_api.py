"""The terminal route: a shell in a sandbox over a WebSocket.

``GET /v1/sandboxes/{id}/pty?cols=80&rows=24`` (a WebSocket upgrade, with the owner's API key in
``Authorization: Bearer`` or ``X-API-Key`` on the upgrade request, like every other route; none on
the local socket). Then:

* once the shell started, the daemon sends text ``{"type": "ready", "cols": C, "rows": R}``;
* binary messages are the terminal's bytes, both ways (keystrokes in, screen output out);
* the client sends text ``{"type": "resize", "cols": C, "rows": R}`` when its window changes;
* the daemon ends with text ``{"type": "exit", "exit_code": N}`` (``null`` when the sandbox
  stopped under the shell) and a normal close (1000);
* a refusal (no or bad key, unknown or deleted sandbox, too many terminals) is text
  ``{"type": "error", "error": {"code", "message"}}`` and a close with code 4000 + the HTTP
  status the same refusal has on other routes (4401, 4404, 4429, ...).

Output is flow-controlled end to end: the guest sends at most the stream window ahead of what
this relay has passed on to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from fastapi import APIRouter, WebSocket

from fission.agent.ingress import IngressTunnel
from fission.agent.tunnel_streams import TunnelStream
from fission.api.run_stream import error_body
from fission.core.sandbox_ports import DEFAULT_SHELL_SIZE, check_size
from fission.core.sandboxes import SandboxManager
from fission.errors import FissionError, InvalidInput
from fission.server.auth import Gatekeeper

REFUSAL_BASE = 4000  # close code = this + the refusal's HTTP status
NORMAL_CLOSE = 1000
MAX_CONTROL = 1024  # characters of one control message


def size_from_query(websocket: WebSocket) -> tuple[int, int]:
    """The terminal size the client asked for (80x24 when it named none)."""
    values = []
    for name, default in zip(("cols", "rows"), DEFAULT_SHELL_SIZE, strict=True):
        raw = websocket.query_params.get(name)
        try:
            values.append(default if raw is None else int(raw))
        except ValueError:
            raise InvalidInput(
                f"{name} must be a whole number from 1 to 1000, not {raw!r}"
            ) from None
    return check_size(values[0], values[1])


def parse_control(text: str) -> tuple[int, int]:
    """The size a client's resize message asks for; InvalidInput for anything else."""
    try:
        message = json.loads(text[:MAX_CONTROL])
    except ValueError:
        message = None
    if not isinstance(message, dict) or message.get("type") != "resize":
        raise InvalidInput(
            'a text message must be {"type": "resize", "cols": C, "rows": R}; '
            "send the terminal's bytes as binary messages"
        )
    return check_size(message.get("cols"), message.get("rows"))


async def refuse(websocket: WebSocket, exc: FissionError) -> None:
    """Tell the client why (an error message and a 4000 + status close code)."""
    with contextlib.suppress(Exception):
        if websocket.client_state.name == "CONNECTING":
            await websocket.accept()
        await websocket.send_text(json.dumps({"type": "error", "error": error_body(exc)}))
        await websocket.close(REFUSAL_BASE + exc.http_status, reason=exc.message[:120])


async def relay_terminal(
    websocket: WebSocket, stream: TunnelStream, ingress: IngressTunnel
) -> None:
    """Move bytes between the client and the shell until either ends; the exit goes last."""

    async def to_shell() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes"):
                await stream.write(message["bytes"])
            elif message.get("text") is not None:
                try:
                    cols, rows = parse_control(message["text"])
                except InvalidInput as exc:
                    error = {"type": "error", "error": error_body(exc)}
                    await websocket.send_text(json.dumps(error))
                    continue
                await ingress.resize(stream, cols, rows)

    async def to_client() -> None:
        while data := await stream.read():
            await websocket.send_bytes(data)
        exit_message = {"type": "exit", "exit_code": stream.exit_code}
        await websocket.send_text(json.dumps(exit_message))
        await websocket.close(NORMAL_CLOSE)

    tasks = [asyncio.create_task(to_shell()), asyncio.create_task(to_client())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            # The client left, or the shell did mid-write: the stream is released by the caller.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def pty_router(manager: SandboxManager) -> APIRouter:
    """The terminal route over ``manager``'s sandboxes."""
    router = APIRouter(prefix="/v1/sandboxes", tags=["terminals"])

    @router.websocket("/{sandbox_id}/pty")
    async def pty(sandbox_id: str, websocket: WebSocket) -> None:
        gate: Gatekeeper = websocket.app.state.gate
        try:
            caller = await gate.admit(
                websocket.headers.get("authorization"), websocket.headers.get("x-api-key")
            )
            cols, rows = size_from_query(websocket)
            async with manager.ports.open_pty(sandbox_id, caller.owner, cols, rows) as opened:
                await websocket.accept()
                ready = {"type": "ready", "cols": cols, "rows": rows}
                await websocket.send_text(json.dumps(ready))
                await relay_terminal(websocket, *opened)
        except FissionError as exc:
            await refuse(websocket, exc)

    return router
