"""HTTP and WebSocket through a stream into the guest: the bytes of an exposed port.

HTTP: one request per stream, written with h11 (``Connection: close``) and the guest's answer
parsed by h11 too (its head bounded by ``MAX_HEAD``: the guest is hostile), its body streamed
back as it arrives. WebSocket: the daemon ends the visitor's WebSocket and opens one of its own
to the guest program with the ``websockets`` library's sans-I/O client, then relays messages
both ways (each at most ``MAX_MESSAGE`` bytes). Hop-by-hop headers are not forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable

import h11
from fastapi import Request, WebSocket, WebSocketDisconnect
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response as WsResponse
from websockets.protocol import State
from websockets.uri import parse_uri

from fission.agent.tunnel_streams import TunnelStream
from fission.errors import PortUnreachable

MAX_HEAD = 64 * 1024  # bytes of a response head the guest may send
MAX_MESSAGE = 4 * 1024 * 1024  # bytes of one WebSocket message, either way
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
Headers = list[tuple[bytes, bytes]]


def forward_headers(headers: Iterable[tuple[bytes, bytes]], drop: frozenset[str]) -> Headers:
    """Headers to pass on: neither hop-by-hop nor in ``drop`` (lower-case names)."""
    return [
        (name, value)
        for name, value in headers
        if name.decode("latin-1").lower() not in HOP_BY_HOP | drop
    ]


async def send_request(
    stream: TunnelStream, request: Request, target: str, port: int, headers: Headers
) -> h11.Connection:
    """Write the visitor's request (its body streamed) to the guest; the h11 connection
    that then reads the answer."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    out = [(b"host", f"127.0.0.1:{port}".encode()), *headers, (b"connection", b"close")]
    length = request.headers.get("content-length")
    has_body = length is not None or "chunked" in request.headers.get("transfer-encoding", "")
    if length is not None:
        out.append((b"content-length", length.encode()))
    elif has_body:
        out.append((b"transfer-encoding", b"chunked"))
    await stream.write(conn.send(h11.Request(method=request.method, target=target, headers=out)))
    if has_body:
        async for chunk in request.stream():
            if chunk:
                await stream.write(conn.send(h11.Data(data=chunk)))
    await stream.write(conn.send(h11.EndOfMessage()))
    return conn


async def read_response(
    conn: h11.Connection, stream: TunnelStream
) -> tuple[int, Headers, AsyncIterator[bytes]]:
    """The guest's status, headers (hop-by-hop dropped) and body; PortUnreachable when what it
    sends is not an HTTP response."""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.read())
            elif isinstance(event, h11.Response):
                break
            elif isinstance(event, h11.InformationalResponse):
                continue
            else:
                raise PortUnreachable(f"the program on the port answered {type(event).__name__}")
    except h11.RemoteProtocolError as exc:
        raise PortUnreachable(f"the program on the port sent no HTTP response: {exc}") from exc

    async def body() -> AsyncIterator[bytes]:
        while True:
            try:
                item = conn.next_event()
            except h11.RemoteProtocolError:
                return  # cut short: the visitor sees a truncated body
            if item is h11.NEED_DATA:
                conn.receive_data(await stream.read())
            elif isinstance(item, h11.Data):
                yield bytes(item.data)
            else:
                return  # EndOfMessage or ConnectionClosed

    headers = forward_headers(event.headers, frozenset())
    return event.status_code, headers, body()


async def relay_websocket(
    visitor: WebSocket, stream: TunnelStream, port: int, path: str, headers: Headers
) -> None:
    """Open a WebSocket to the guest program over ``stream``, accept the visitor's, relay."""
    subprotocols = [p.strip() for p in visitor.headers.get("sec-websocket-protocol", "").split(",")]
    client = ClientProtocol(
        parse_uri(f"ws://127.0.0.1:{port}{path}"),
        subprotocols=[p for p in subprotocols if p] or None,  # type: ignore[misc]
        max_size=MAX_MESSAGE,
    )
    handshake = client.connect()
    for name, value in headers:
        key = name.decode("latin-1")
        if key.lower() not in ("origin", "cookie", "user-agent"):
            continue
        handshake.headers[key] = value.decode("latin-1")
    client.send_request(handshake)
    lock = asyncio.Lock()

    async def flush() -> None:
        async with lock:
            for data in client.data_to_send():
                if data:
                    await stream.write(data)

    await flush()
    pending: list[Frame] = []
    response: WsResponse | None = None
    while client.state is State.CONNECTING:
        data = await stream.read()
        if data:
            client.receive_data(data)
        else:
            client.receive_eof()
        for event in client.events_received():
            if isinstance(event, WsResponse):
                response = event  # the handshake's answer comes as the first event
            elif isinstance(event, Frame):
                pending.append(event)
        if not data and client.state is State.CONNECTING:
            break
    if client.state is not State.OPEN or response is None:
        raise PortUnreachable(
            f"the program on port {port} refused the WebSocket: {client.handshake_exc}"
        )
    await visitor.accept(subprotocol=response.headers.get("Sec-WebSocket-Protocol"))
    to_guest = asyncio.create_task(_visitor_to_guest(visitor, client, flush))
    try:
        await _guest_to_visitor(visitor, stream, client, flush, pending)
    finally:
        to_guest.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await to_guest
        with contextlib.suppress(Exception):
            await visitor.close()


async def _visitor_to_guest(
    visitor: WebSocket, client: ClientProtocol, flush: Callable[[], object]
) -> None:
    try:
        while True:
            message = await visitor.receive()
            if message["type"] == "websocket.disconnect":
                break
            if message.get("text") is not None:
                client.send_text(message["text"].encode())
            elif message.get("bytes") is not None:
                client.send_binary(message["bytes"])
            await flush()  # type: ignore[misc]
    except WebSocketDisconnect:
        pass
    with contextlib.suppress(Exception):
        client.send_close()
        await flush()  # type: ignore[misc]


async def _guest_to_visitor(
    visitor: WebSocket,
    stream: TunnelStream,
    client: ClientProtocol,
    flush: Callable[[], object],
    pending: list[Frame],
) -> None:
    parts: list[bytes] = []
    kind = Opcode.TEXT
    size = 0
    while True:
        for frame in pending:
            if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                kind, parts, size = frame.opcode, [], 0
            elif frame.opcode is not Opcode.CONT:
                continue  # ping, pong, close: the protocol object answers them
            parts.append(bytes(frame.data))
            size += len(frame.data)
            if size > MAX_MESSAGE:
                return
            if frame.fin:
                data = b"".join(parts)
                if kind is Opcode.TEXT:
                    await visitor.send_text(data.decode("utf-8", "replace"))
                else:
                    await visitor.send_bytes(data)
        await flush()  # type: ignore[misc]
        if client.state is State.CLOSED:
            return
        data = await stream.read()
        if not data:
            return
        client.receive_data(data)
        pending = [e for e in client.events_received() if isinstance(e, Frame)]
