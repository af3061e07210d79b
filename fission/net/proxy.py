"""The per-VM egress proxy: HTTP and CONNECT to allowlisted hosts only, decided on the host.

Each guest connection (a tunnel stream) carries one proxy request: ``CONNECT host:port`` (any
TCP, in practice TLS) or a plain-HTTP request with an absolute URI. The proxy checks the host
against the policy, resolves names itself (the guest has no DNS), refuses addresses that are
not public unless allowed literally, dials the address it checked (so a second lookup cannot
rebind it), and for CONNECT reads the TLS ClientHello to check that its SNI names the same host.
It never decrypts anything. Caps per VM: connections at once and bytes in total. Every decision
goes to ``on_event``.

Request heads are parsed by h11, up to ``MAX_HEAD`` bytes. A plain-HTTP head is rebuilt from what
h11 parsed, with the Host the policy checked (the guest's is dropped, folded lines are unfolded),
and a head whose body framing two parsers could read two ways is refused. What follows the head
goes on as it came: the policy's boundary is the host and port dialed (a CONNECT tunnel carries
any bytes to them anyway), and ``Connection: close`` ends the server's side after one answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import h11

from fission.net import sni
from fission.net.policy import IPAddress, NetworkPolicy, address_class, parse_address, unmap

log = logging.getLogger("fission.net")

MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
PIPE_CHUNK = 32 * 1024
# Dropped from a plain-HTTP request; Host is set again from the URL the policy checked.
HOP_HEADERS = {b"proxy-connection", b"proxy-authorization", b"connection", b"keep-alive", b"host"}
# How h11 refuses an HTTP/1.1 request without Host (pinned by the unit tests), and the header
# put in to parse such a request; it is never sent on.
H11_MISSING_HOST = "Missing mandatory Host: header"
HOST_STAND_IN = b"Host: fission-proxy.invalid\r\n"

EventSink = Callable[[dict[str, Any]], None]
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


class Stream(Protocol):
    """A guest connection: what ``tunnel.TunnelStream`` offers."""

    async def read(self, limit: int = ...) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    async def close(self) -> None: ...


class Refused(Exception):
    """A request the proxy will not carry: the HTTP status and the reason the guest sees."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Request:
    """A proxy request: where to, and (plain HTTP) the head to send on."""

    method: str
    host: str
    port: int
    head: bytes  # for plain HTTP: the rewritten request head; for CONNECT: empty


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to on the host, in the resolver's order."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for info in infos:
        address = parse_address(str(info[4][0]))
        if address is not None and address not in addresses:
            addresses.append(address)
    return addresses


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` as (host, port); Refused when malformed."""
    host, port_text = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if port_text and (not port_text.isdigit() or not 1 <= int(port_text) <= 65535):
        raise Refused(400, f"bad port in {text[:100]!r}")
    if not host:
        raise Refused(400, "no host in the request")
    return host.lower().rstrip("."), int(port_text) if port_text else default_port


def parse_request(head: bytes) -> Request:
    """Parse a whole proxy request head (bytes after it are ignored); Refused when not carried."""
    parsed = HeadReader().feed(head)
    if parsed is None:
        raise Refused(400, "the request head is incomplete")
    return proxy_request(parsed[0])


def proxy_request(event: h11.Request) -> Request:
    """Where a parsed request goes and, for plain HTTP, the head to send on; Refused when the
    proxy does not carry it."""
    if event.http_version not in (b"1.0", b"1.1"):
        raise Refused(400, f"unsupported protocol HTTP/{event.http_version.decode()}")
    names = {name for name, _ in event.headers}
    # h11 lets Transfer-Encoding win over Content-Length; a server behind may not, and two
    # views of where a body ends is how requests are smuggled (RFC 9112 6.1, 6.3).
    if b"transfer-encoding" in names and b"content-length" in names:
        raise Refused(400, "both Transfer-Encoding and Content-Length: ambiguous framing")
    if b"transfer-encoding" in names and event.http_version == b"1.0":
        raise Refused(400, "Transfer-Encoding in an HTTP/1.0 request: faulty framing")
    method = event.method.decode("ascii")  # h11 admits only ASCII tokens and visible ASCII
    target = event.target.decode("ascii")
    if method == "CONNECT":
        host, port = split_host_port(target, 443)
        return Request(method, host, port, b"")
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() != "http":
        raise Refused(
            400, "only http:// URLs and CONNECT go through this proxy (https uses CONNECT)"
        )
    authority, slash, path = rest.partition("/")
    authority = authority.rpartition("@")[2]
    host, port = split_host_port(authority, 80)
    # The guest's Host goes (RFC 9112 3.2.2: a proxy replaces it with the URL's authority).
    kept = [
        name + b": " + value
        for name, value in event.headers.raw_items()
        if name.lower() not in HOP_HEADERS
    ]
    version = event.http_version.decode("ascii")
    start = f"{method} {slash}{path} HTTP/{version}".encode("ascii")
    host_line = b"Host: " + authority.encode("ascii")
    rebuilt = b"\r\n".join([start, host_line, *kept, b"Connection: close", b"", b""])
    return Request(method, host, port, rebuilt)


class HeadReader:
    """One request head, parsed by h11 as its bytes arrive."""

    def __init__(self) -> None:
        self._http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._received = bytearray()

    def feed(self, data: bytes) -> tuple[h11.Request, bytes] | None:
        """The head and the bytes after it once it is whole, None while more is needed;
        Refused when malformed or over ``MAX_HEAD``."""
        self._received += data
        self._http.receive_data(data)
        try:
            return _next_head(self._http, len(self._received))
        except h11.RemoteProtocolError as exc:
            if str(exc) != H11_MISSING_HOST:
                raise _refusal(exc) from exc
        # A proxy request names its host in the request line, so a Host header adds nothing
        # (and is replaced anyway); h11 insists on one for HTTP/1.1: parse with a stand-in.
        received = bytes(self._received)
        line_end = received.index(b"\n") + 1
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD + len(HOST_STAND_IN))
        http.receive_data(received[:line_end] + HOST_STAND_IN + received[line_end:])
        try:
            parsed = _next_head(http, len(received))
        except h11.RemoteProtocolError as exc:
            raise _refusal(exc) from exc
        if parsed is None:  # the head was whole without the stand-in: cannot happen
            raise Refused(400, "malformed request")
        return parsed


def _next_head(http: h11.Connection, received: int) -> tuple[h11.Request, bytes] | None:
    """The head h11 parsed from the ``received`` bytes so far and the bytes after it, or None
    while more are needed; h11's RemoteProtocolError when malformed."""
    event = http.next_event()
    if event is h11.NEED_DATA:
        return None
    if not isinstance(event, h11.Request):  # a server's first event is its request
        raise Refused(400, "malformed request")
    rest = http.trailing_data[0]
    if received - len(rest) > MAX_HEAD:
        raise Refused(431, "request head too large")
    return event, rest


def _refusal(exc: h11.RemoteProtocolError) -> Refused:
    """The answer to a head h11 will not parse (its text quotes the guest's bytes: cut short)."""
    if exc.error_status_hint == 431:
        return Refused(431, "request head too large")
    return Refused(exc.error_status_hint, f"malformed request: {str(exc)[:200]}")


class Buffered:
    """A guest stream with read-ahead: bytes taken for parsing are not lost to the pipe."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.pending = bytearray()

    async def fill(self, size: int) -> bool:
        """Read until ``size`` bytes are held; False if the guest closed first."""
        while len(self.pending) < size:
            data = await self.stream.read()
            if not data:
                return False
            self.pending += data
        return True

    async def request(self) -> Request:
        """Read and parse the request head, holding what follows it; Refused when it is too
        long, malformed, cut off or not one the proxy carries."""
        reader = HeadReader()
        while True:
            data = await self.stream.read()
            if not data:
                raise Refused(400, "the connection closed before a whole request")
            parsed = reader.feed(data)
            if parsed is not None:
                break
        event, rest = parsed
        self.pending += rest
        return proxy_request(event)

    def take(self) -> bytes:
        """Everything held so far."""
        data = bytes(self.pending)
        self.pending.clear()
        return data


class EgressProxy:
    """One VM's proxy: its policy, its caps, its counters."""

    def __init__(
        self,
        policy: NetworkPolicy,
        on_event: EventSink | None = None,
        resolver: Resolver = resolve,
    ) -> None:
        self.policy = policy
        self.on_event = on_event
        self.resolver = resolver
        self.active = 0
        self.bytes = 0
        self.events: list[dict[str, Any]] = []

    def record(self, event: dict[str, Any]) -> None:
        """Keep, log and pass on one decision."""
        self.events.append(event)
        if len(self.events) > 1000:
            del self.events[0]
        log.info("egress %s", event)
        if self.on_event is not None:
            with contextlib.suppress(Exception):
                self.on_event(event)

    async def decide(self, host: str, port: int) -> IPAddress:
        """The address to dial for ``host:port``; Refused with the reason when not allowed."""
        if not self.policy.allows_name(host, port):
            raise Refused(403, f"{host}:{port} is not an allowed host (--allow-host)")
        literal = parse_address(host)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    addresses = await self.resolver(host, port)
            except (OSError, TimeoutError) as exc:
                raise Refused(502, f"cannot resolve {host}: {exc}") from exc
        for address in addresses:
            if self.policy.allows_address(address, port):
                return unmap(address)
        shown = ", ".join(f"{a} ({address_class(a)})" for a in addresses) or "nothing"
        raise Refused(
            403, f"{host} resolves to {shown}: not public, and not allowed as a literal address"
        )

    async def handle(self, stream: Stream) -> None:
        """Serve one guest connection to its end."""
        guest = Buffered(stream)
        event: dict[str, Any] = {"action": "egress"}
        try:
            if self.active >= self.policy.max_connections:
                raise Refused(429, f"more than {self.policy.max_connections} connections at once")
            self.active += 1
            try:
                await self._serve(guest, event)
            finally:
                self.active -= 1
        except Refused as exc:
            established = event.pop("established", False)
            event |= {"decision": "refused", "reason": exc.reason}
            self.record(event)
            if established:
                return  # the guest already speaks TLS on this connection: just close it
            body = f"fission egress proxy: {exc.reason}\n".encode()
            with contextlib.suppress(ConnectionError):
                await stream.write(
                    f"HTTP/1.1 {exc.status} Refused\r\nContent-Type: text/plain\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )

    async def _serve(self, guest: Buffered, event: dict[str, Any]) -> None:
        async with asyncio.timeout(HEAD_TIMEOUT):
            request = await guest.request()
        event |= {"method": request.method, "host": request.host, "port": request.port}
        address = await self.decide(request.host, request.port)
        event["address"] = str(address)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(str(address), request.port)
        except (OSError, TimeoutError) as exc:
            raise Refused(502, f"cannot connect to {address}:{request.port}: {exc}") from exc
        try:
            first = request.head
            if request.method == "CONNECT":
                await guest.stream.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                event["established"] = True
                first = await self._client_hello(guest, request.host, request.port)
            event["decision"] = "allowed"
            self.record(event)
            writer.write(first + guest.take())
            await self._pipe(guest.stream, reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _client_hello(self, guest: Buffered, host: str, port: int) -> bytes:
        """The tunnel's first bytes; for TLS, the ClientHello after its SNI is checked."""
        async with asyncio.timeout(HEAD_TIMEOUT):
            if not await guest.fill(sni.RECORD_HEADER):
                return guest.take()
            total = sni.record_length(bytes(guest.pending[: sni.RECORD_HEADER]))
            if total is None:
                return guest.take()  # not TLS: the allowlist check on the host stands alone
            if not await guest.fill(total):
                return guest.take()
        try:
            name = sni.server_name(bytes(guest.pending[:total]))
        except sni.NotTLS as exc:
            raise Refused(403, f"malformed TLS ClientHello: {exc}") from exc
        if name is not None and name != host and parse_address(host) is None:
            raise Refused(403, f"TLS server name {name[:100]!r} differs from CONNECT {host}")
        if name is not None and not self.policy.allows_name(name, port):
            raise Refused(403, f"TLS server name {name[:100]!r} is not an allowed host")
        return guest.take()

    async def _pipe(
        self, stream: Stream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Move bytes both ways until the server ends, the guest goes or the byte cap is reached."""

        async def up() -> None:
            while data := await stream.read():
                self._count(len(data))
                writer.write(data)
                await writer.drain()

        async def down() -> None:
            while data := await reader.read(PIPE_CHUNK):
                self._count(len(data))
                await stream.write(data)

        sending, receiving = asyncio.create_task(up()), asyncio.create_task(down())
        tasks = [sending, receiving]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if sending in done and sending.exception() is None and writer.can_write_eof():
                # The program shut down its sending side: pass that on, keep the answer coming.
                writer.write_eof()
                with contextlib.suppress(OSError):  # a reset, or the byte cap
                    await receiving
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _count(self, size: int) -> None:
        self.bytes += size
        if self.bytes > self.policy.max_bytes:
            self.record({"action": "egress", "decision": "cut", "reason": "byte cap reached"})
            raise ConnectionAbortedError("the sandbox's network byte cap is reached")
