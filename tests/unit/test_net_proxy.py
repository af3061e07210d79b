"""The egress proxy against servers on this machine's loopback (never outside addresses)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from typing import Any

import pytest

from fission.net.policy import IPAddress, NetworkPolicy
from fission.net.proxy import EgressProxy, Refused, parse_request
from tests.unit.test_net_sni import client_hello


class FakeStream:
    """A guest connection: the test writes what the guest sends, reads what it gets."""

    def __init__(self, data: bytes) -> None:
        self.incoming = [data[i : i + 7] for i in range(0, len(data), 7)]  # split on purpose
        self.received = bytearray()
        self.closed = False

    async def read(self, limit: int = 65536) -> bytes:
        return self.incoming.pop(0) if self.incoming else b""

    async def write(self, data: bytes) -> None:
        self.received += data

    async def close(self) -> None:
        self.closed = True


@contextlib.asynccontextmanager
async def serving():  # type: ignore[no-untyped-def]
    """A loopback server answering every connection with what it read, then closing."""
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(65536)
        seen.append(data)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nfrom-upstream")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield port, seen
    server.close()
    await server.wait_closed()


def fixed_resolver(address: str):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address(address)]

    return resolve


async def run(policy: NetworkPolicy, request: bytes, resolver: Any = None) -> tuple[bytes, list]:
    events: list[dict[str, Any]] = []
    proxy = EgressProxy(policy, events.append, **({"resolver": resolver} if resolver else {}))
    stream = FakeStream(request)
    async with asyncio.timeout(10):
        await proxy.handle(stream)
    return bytes(stream.received), events


async def test_allowed_literal_address_is_reached() -> None:
    async with serving() as (port, seen):
        request = f"GET http://127.0.0.1:{port}/x?y=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nProxy-Connection: keep-alive\r\n\r\n"
        reply, events = await run(NetworkPolicy.allowing([f"127.0.0.1:{port}"]), request.encode())
        assert reply.endswith(b"from-upstream")
        assert seen[0].startswith(b"GET /x?y=1 HTTP/1.1\r\n")
        assert b"Proxy-Connection" not in seen[0] and b"Connection: close" in seen[0]
        assert events[0]["decision"] == "allowed" and events[0]["address"] == "127.0.0.1"


async def test_other_port_is_refused() -> None:
    async with serving() as (port, seen):
        request = f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\n\r\n".encode()
        reply, events = await run(NetworkPolicy.allowing([f"127.0.0.1:{port + 1}"]), request)
        assert reply.startswith(b"HTTP/1.1 403") and not seen
        assert events[0]["decision"] == "refused"


async def test_name_resolving_to_loopback_is_refused() -> None:
    async with serving() as (port, seen):
        request = f"GET http://localhost:{port}/ HTTP/1.1\r\n\r\n".encode()
        reply, events = await run(NetworkPolicy.allowing([f"localhost:{port}"]), request)
        assert reply.startswith(b"HTTP/1.1 403") and b"not public" in reply and not seen
        assert "loopback" in events[0]["reason"]


async def test_rebinding_to_metadata_address_is_refused() -> None:
    request = b"GET http://api.example.com/ HTTP/1.1\r\n\r\n"
    policy = NetworkPolicy.allowing(["api.example.com"])
    reply, events = await run(policy, request, fixed_resolver("169.254.169.254"))
    assert reply.startswith(b"HTTP/1.1 403") and "link-local" in events[0]["reason"]


async def test_connect_checks_the_sni() -> None:
    async with serving() as (port, seen):
        policy = NetworkPolicy.allowing([f"127.0.0.1:{port}", f"good.test:{port}"])
        resolver = fixed_resolver("127.0.0.1")
        good = f"CONNECT good.test:{port} HTTP/1.1\r\n\r\n".encode() + client_hello("good.test")
        reply, events = await run(policy, good, resolver)
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"from-upstream")
        assert seen[0] == client_hello("good.test")
        bad = f"CONNECT good.test:{port} HTTP/1.1\r\n\r\n".encode() + client_hello("evil.test")
        reply, events = await run(policy, bad, resolver)
        assert reply == b"HTTP/1.1 200 Connection established\r\n\r\n"  # then closed
        assert events[0]["decision"] == "refused" and "differs" in events[0]["reason"]
        assert len(seen) == 1


async def test_connection_cap() -> None:
    proxy = EgressProxy(NetworkPolicy.allowing(["a.test"], max_connections=1))
    proxy.active = 1
    stream = FakeStream(b"GET http://a.test/ HTTP/1.1\r\n\r\n")
    await proxy.handle(stream)
    assert stream.received.startswith(b"HTTP/1.1 429")


@pytest.mark.parametrize(
    "head",
    [
        b"GET https://a.test/ HTTP/1.1\r\n\r\n",
        b"GET /relative HTTP/1.1\r\n\r\n",
        b"garbage\r\n\r\n",
        b"CONNECT a.test:99999 HTTP/1.1\r\n\r\n",
        b"GET http://a.test/ SPDY/3\r\n\r\n",
    ],
)
def test_requests_the_proxy_does_not_carry(head: bytes) -> None:
    with pytest.raises(Refused):
        parse_request(head)


def test_plain_http_gets_the_checked_host() -> None:
    request = parse_request(
        b"GET http://a.test:8080/p?q HTTP/1.1\r\nHost: other.test\r\nAccept: */*\r\n\r\n"
    )
    assert (request.host, request.port) == ("a.test", 8080)
    assert request.head == (
        b"GET /p?q HTTP/1.1\r\nHost: a.test:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )


async def test_byte_cap_cuts_the_connection() -> None:
    big = b"x" * 200_000

    async def serve_big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + big)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve_big, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        policy = NetworkPolicy.allowing([f"127.0.0.1:{port}"], max_bytes=50_000)
        request = f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\n\r\n".encode()
        reply, events = await run(policy, request)
    finally:
        server.close()
        await server.wait_closed()
    assert len(reply) <= 50_000 + 65_536
    assert [e["decision"] for e in events] == ["allowed", "cut"]
