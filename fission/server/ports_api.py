"""HTTP routes of exposed ports: expose, tokens, and the proxy to the guest's port.

``POST /v1/sandboxes/{id}/expose`` {port} makes ``/v1/sandboxes/{id}/ports/{port}/...`` reach
127.0.0.1:port in the guest (HTTP, any method, and WebSocket). A visitor shows the owner's API
key, or a port token: ``?fission_token=`` once (answered with a redirect that sets a cookie
scoped to the port's path, so a browser keeps it off the address bar), the cookie, or the
``X-Fission-Port-Token`` header. The key, the token and the cookie are not forwarded to the
guest program.
"""

from __future__ import annotations

import contextlib
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response, WebSocket
from fastapi.requests import HTTPConnection
from fastapi.responses import RedirectResponse, StreamingResponse
from pydantic import BaseModel, Field

from fission.core.sandbox_ports import ports_path
from fission.core.sandboxes import SandboxManager
from fission.errors import FissionError
from fission.server.auth import Gatekeeper, Who
from fission.server.port_proxy import (
    forward_headers,
    read_response,
    relay_websocket,
    send_request,
)

TOKEN_PARAM = "fission_token"
TOKEN_HEADER = "x-fission-port-token"
COOKIE = "fission_port_token"
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
WS_POLICY_VIOLATION = 1008


class ExposeBody(BaseModel):
    """Which port of the sandbox to expose."""

    port: int = Field(ge=1, le=65535, description="A TCP port the program listens on (1-65535).")


def with_url(request: Request, exposure: dict[str, Any]) -> dict[str, Any]:
    """The exposure with the full URL a visitor uses (on the address the caller used)."""
    base = str(request.base_url).rstrip("/")
    return exposure | {"url": base + exposure["path"]}


async def admit_visitor(
    conn: HTTPConnection, manager: SandboxManager, sandbox_id: str, port: int
) -> tuple[bool, str | None]:
    """Check the visitor's key or token; (whether a key admitted it, the token it showed)."""
    token = (
        conn.query_params.get(TOKEN_PARAM)
        or conn.headers.get(TOKEN_HEADER)
        or conn.cookies.get(COOKIE)
    )
    gate: Gatekeeper = conn.app.state.gate
    authorization, api_key = conn.headers.get("authorization"), conn.headers.get("x-api-key")
    keyed, owner = False, None
    if gate.keys is None:  # the local socket: its file mode admits the caller
        keyed = True
    elif authorization or api_key:
        with contextlib.suppress(FissionError):  # a bad key may still come with a good token
            owner = (await gate.admit(authorization, api_key)).owner
            keyed = True
    manager.ports.admit(sandbox_id, port, owner, token, keyed=keyed)
    return keyed and gate.keys is not None, token


def guest_target(conn: HTTPConnection, path: str) -> str:
    """The path and query the guest program sees (the token parameter removed)."""
    query = [(k, v) for k, v in conn.query_params.multi_items() if k != TOKEN_PARAM]
    target = "/" + path
    return target + ("?" + urlencode(query) if query else "")


def dropped_headers(keyed: bool) -> frozenset[str]:
    """What the guest must not see: the owner's key (when it admitted the visitor), tokens."""
    names = {TOKEN_HEADER}
    if keyed:
        names |= {"authorization", "x-api-key"}
    return frozenset(names)


def strip_cookie(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Remove the port-token cookie from Cookie headers (others pass)."""
    result = []
    for name, value in headers:
        if name.lower() == b"cookie":
            kept = [
                c for c in value.decode("latin-1").split(";") if c.strip().split("=")[0] != COOKIE
            ]
            if not kept:
                continue
            value = ";".join(kept).strip().encode("latin-1")
        result.append((name, value))
    return result


def ports_router(manager: SandboxManager) -> APIRouter:
    """The exposed-port routes over ``manager``'s ports."""
    router = APIRouter(prefix="/v1/sandboxes", tags=["ports"])
    ports = manager.ports

    @router.post("/{sandbox_id}/expose", status_code=201, summary="Expose a port")
    async def expose(
        sandbox_id: str, body: ExposeBody, who: Who, request: Request
    ) -> dict[str, Any]:
        return with_url(request, ports.expose(sandbox_id, body.port, who.owner))

    @router.get("/{sandbox_id}/exposed", summary="List exposed ports")
    async def list_exposed(sandbox_id: str, who: Who, request: Request) -> dict[str, Any]:
        found = ports.list_ports(sandbox_id, who.owner)
        return {"ports": [with_url(request, item) for item in found]}

    @router.delete("/{sandbox_id}/exposed/{port}", status_code=204, summary="Unexpose a port")
    async def unexpose(sandbox_id: str, port: int, who: Who) -> Response:
        await ports.unexpose(sandbox_id, port, who.owner)
        return Response(status_code=204)

    @router.post(
        "/{sandbox_id}/exposed/{port}/tokens", status_code=201, summary="Mint a port token"
    )
    async def mint_token(sandbox_id: str, port: int, who: Who, request: Request) -> dict[str, Any]:
        minted = ports.mint_token(sandbox_id, port, who.owner)
        query = urlencode({TOKEN_PARAM: minted["token"]})
        return with_url(request, minted) | {
            "preview_url": with_url(request, minted)["url"] + "?" + query
        }

    @router.delete(
        "/{sandbox_id}/exposed/{port}/tokens/{token_id}",
        status_code=204,
        summary="Revoke a port token",
    )
    async def revoke_token(sandbox_id: str, port: int, token_id: str, who: Who) -> Response:
        await ports.revoke_token(sandbox_id, port, token_id, who.owner)
        return Response(status_code=204)

    @router.api_route(
        "/{sandbox_id}/ports/{port}/{path:path}",
        methods=METHODS,
        summary="Reach an exposed port (HTTP)",
        include_in_schema=False,
    )
    async def proxy(sandbox_id: str, port: int, path: str, request: Request) -> Response:
        keyed, token = await admit_visitor(request, manager, sandbox_id, port)
        if request.query_params.get(TOKEN_PARAM) and token and not keyed:
            # Swap the token in the address for a cookie of this port's path only.
            target = str(request.url.path) + guest_target(request, "")[1:]
            redirect = RedirectResponse(target, status_code=303)
            redirect.set_cookie(
                COOKIE, token, path=ports_path(sandbox_id, port), httponly=True, samesite="lax"
            )
            return redirect
        headers = strip_cookie(forward_headers(request.headers.raw, dropped_headers(keyed)))
        opened = ports.open_port(sandbox_id, port)
        stream = await opened.__aenter__()
        try:
            conn = await send_request(stream, request, guest_target(request, path), port, headers)
            status, answer_headers, body = await read_response(conn, stream)
        except BaseException:
            await opened.__aexit__(None, None, None)
            raise

        async def relay() -> Any:
            try:
                async for chunk in body:
                    yield chunk
            finally:
                await opened.__aexit__(None, None, None)

        reply = StreamingResponse(relay(), status_code=status)
        reply.raw_headers = [*answer_headers]
        return reply

    @router.websocket("/{sandbox_id}/ports/{port}/{path:path}")
    async def proxy_websocket(sandbox_id: str, port: int, path: str, websocket: WebSocket) -> None:
        try:
            keyed, _ = await admit_visitor(websocket, manager, sandbox_id, port)
        except FissionError as exc:
            await websocket.close(WS_POLICY_VIOLATION, reason=exc.message[:120])
            return
        headers = strip_cookie(forward_headers(websocket.headers.raw, dropped_headers(keyed)))
        try:
            async with ports.open_port(sandbox_id, port) as stream:
                await relay_websocket(
                    websocket, stream, port, guest_target(websocket, path), headers
                )
        except FissionError as exc:
            with contextlib.suppress(Exception):
                await websocket.close(WS_POLICY_VIOLATION, reason=exc.message[:120])

    return router
