"""The egress proxy against servers on this machine's loopback (never outside addresses)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from typing import Any

import pytest

from fission.net.policy import IPAddress, NetworkPolicy
from fission.net.proxy import MAX_HEAD, EgressProxy, Refused, parse_request
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


# Hostile heads: what a guest may send to slip past the proxy's checks.


def refusal(head: bytes) -> Refused:
    with pytest.raises(Refused) as caught:
        parse_request(head)
    return caught.value


async def test_a_head_that_never_ends_is_refused_at_the_size_limit() -> None:
    endless = b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nX-Pad: " + b"a" * (MAX_HEAD + 100)
    reply, events = await run(NetworkPolicy.allowing(["a.test"]), endless)
    assert reply.startswith(b"HTTP/1.1 431")
    assert events == [
        {"action": "egress", "decision": "refused", "reason": "request head too large"}
    ]


def test_a_whole_head_over_the_size_limit_is_refused() -> None:
    head = b"GET http://a.test/ HTTP/1.1\r\nX-Pad: " + b"a" * MAX_HEAD + b"\r\n\r\n"
    assert refusal(head).status == 431
    assert parse_request(b"GET http://a.test/ HTTP/1.1\r\nX-Pad: " + b"a" * 1000 + b"\r\n\r\n")


@pytest.mark.parametrize(
    "head",
    [
        b"GET http://a.test/\r\n\r\n",  # no version
        b"GET  http://a.test/ HTTP/1.1\r\n\r\n",  # two spaces
        b"GET http://a.test/ HTTP/1.1 extra\r\n\r\n",
        b"GET http://a.test/\x7f HTTP/1.1\r\n\r\n",
        b"G\x00T http://a.test/ HTTP/1.1\r\n\r\n",
        b"GET http://a.test/ HTTP/2.0\r\n\r\n",
        b"GET http://a.test/ HTTP/0.9\r\n\r\n",
        b"GET http://a.test/ http/1.1\r\n\r\n",
        b"\r\n\r\n",
        b"GET http://a.test/ HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"GET http://a.test/ HTTP/1.1\r\nHost : a.test\r\n\r\n",  # space before the colon
        b"GET http://a.test/ HTTP/1.1\r\nX: a\rHost: evil.test\r\n\r\n",  # a bare CR
        b"GET http://a.test/ HTTP/1.1\r\nX: a\x00b\r\n\r\n",
    ],
)
def test_malformed_heads_are_refused(head: bytes) -> None:
    assert refusal(head).status == 400


@pytest.mark.parametrize("other", [b"evil.test", b"a.test"])
def test_two_host_headers_are_refused(other: bytes) -> None:
    error = refusal(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nHost: " + other + b"\r\n\r\n")
    assert error.status == 400 and "Host" in error.reason


def test_a_folded_line_cannot_smuggle_a_host() -> None:
    request = parse_request(
        b"GET http://a.test/ HTTP/1.1\r\nX-A: 1\r\n Host: evil.test\r\nAccept: */*\r\n\r\n"
    )
    lines = request.head.split(b"\r\n")
    assert [line for line in lines if line.lower().startswith(b"host")] == [b"Host: a.test"]
    assert not any(line[:1] in (b" ", b"\t") for line in lines)  # no fold reaches the server
    assert b"X-A: 1 Host: evil.test" in lines  # unfolded into the header it continued


def test_a_fold_before_any_header_is_refused() -> None:
    assert refusal(b"GET http://a.test/ HTTP/1.1\r\n Host: evil.test\r\n\r\n").status == 400


@pytest.mark.parametrize(
    ("framing", "status"),
    [
        (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", 400),
        (b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n", 400),
        (b"Content-Length: 5\r\nContent-Length: 6\r\n", 400),
        (b"Content-Length: +5\r\n", 400),
        (b"Content-Length: 0x5\r\n", 400),
        (b"Transfer-Encoding: gzip, chunked\r\n", 501),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 501),
        (b"Transfer-Encoding : chunked\r\n", 400),
    ],
)
def test_ambiguous_body_framing_is_refused(framing: bytes, status: int) -> None:
    head = b"POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\n" + framing + b"\r\n"
    assert refusal(head).status == status


def test_chunked_framing_in_http_1_0_is_refused() -> None:
    head = b"POST http://a.test/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert refusal(head).status == 400


async def test_a_smuggling_attempt_never_reaches_the_server() -> None:
    async with serving() as (port, seen):
        request = (
            f"POST http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n"
            "0\r\n\r\nGET http://evil.test/ HTTP/1.1\r\nHost: evil\r\n\r\n"
        ).encode()
        reply, events = await run(NetworkPolicy.allowing([f"127.0.0.1:{port}"]), request)
        assert reply.startswith(b"HTTP/1.1 400") and not seen
        assert events[0]["decision"] == "refused" and "ambiguous" in events[0]["reason"]


async def test_the_server_sees_the_checked_host_not_the_guests() -> None:
    async with serving() as (port, seen):
        request = f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: evil.test\r\n\r\n".encode()
        reply, _ = await run(NetworkPolicy.allowing([f"127.0.0.1:{port}"]), request)
        assert reply.endswith(b"from-upstream")
        assert b"evil.test" not in seen[0]
        assert f"\r\nHost: 127.0.0.1:{port}\r\n".encode() in seen[0]


async def test_connect_goes_where_its_target_says_whatever_its_host_header() -> None:
    request = b"CONNECT evil.test:443 HTTP/1.1\r\nHost: good.test:443\r\n\r\n"
    reply, events = await run(NetworkPolicy.allowing(["good.test"]), request)
    assert reply.startswith(b"HTTP/1.1 403")
    assert events[0]["host"] == "evil.test" and events[0]["decision"] == "refused"


def test_a_request_without_host_parses_and_the_stand_in_is_never_sent() -> None:
    request = parse_request(b"GET http://a.test/x HTTP/1.1\r\nAccept: */*\r\n\r\n")
    assert (
        request.head
        == b"GET /x HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    connect = parse_request(b"CONNECT a.test:8443 HTTP/1.1\r\n\r\n")
    assert (connect.host, connect.port, connect.head) == ("a.test", 8443, b"")


def test_bare_line_feeds_are_rebuilt_with_crlf() -> None:
    request = parse_request(b"GET http://a.test/ HTTP/1.0\nAccept: */*\n\n")
    assert (
        request.head
        == b"GET / HTTP/1.0\r\nHost: a.test\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )


async def test_bytes_after_a_connect_head_go_on_to_the_server() -> None:
    async with serving() as (port, seen):
        request = f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\nnot tls at all".encode()
        reply, _ = await run(NetworkPolicy.allowing([f"127.0.0.1:{port}"]), request)
        assert reply.startswith(b"HTTP/1.1 200 Connection established")
        assert seen[0].startswith(b"not tls")
