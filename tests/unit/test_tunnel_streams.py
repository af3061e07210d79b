"""The egress tunnel's framing: the guest's listener and streams, the host's streams and caps."""

from __future__ import annotations

import asyncio
import selectors
import socket

import pytest

from fission.agent.channel import Channel
from fission.agent.tunnel_streams import HostTunnel, TunnelStream
from fission.guest import protocol
from fission.guest.protocol import Frame, FrameType
from fission.guest.tunnel import GuestTunnel


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GuestSide:
    """A GuestTunnel with its selector, and the frames it sent."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.sent: list[Frame] = []
        self.tunnel = GuestTunnel(
            self.selector, lambda t, rid, p: self.sent.append(Frame(t, rid, p))
        )
        self.port = free_port()
        self.tunnel.listen(self.port)

    def pump(self, rounds: int = 5) -> None:
        for _ in range(rounds):
            for key, mask in self.selector.select(0.05):
                self.tunnel.on_event(key.data[1], mask)

    def of(self, kind: FrameType) -> list[Frame]:
        return [f for f in self.sent if f.type == kind]


def test_guest_streams_connections_both_ways() -> None:
    guest = GuestSide()
    client = socket.create_connection(("127.0.0.1", guest.port), timeout=5)
    guest.pump()
    (opened,) = guest.of(FrameType.OPEN)
    client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    guest.pump()
    assert b"".join(f.payload for f in guest.of(FrameType.STREAM)) == b"GET / HTTP/1.1\r\n\r\n"
    guest.tunnel.handle(Frame(FrameType.STREAM, opened.request_id, b"HTTP/1.1 200 OK\r\n\r\n"))
    assert client.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"
    (credit,) = guest.of(FrameType.CREDIT)
    assert protocol.decode_json(credit.payload) == {"bytes": 19}
    guest.tunnel.handle(Frame(FrameType.STREAM, opened.request_id, b"bye"))
    guest.tunnel.handle(Frame(FrameType.CLOSE, opened.request_id, b"{}"))
    assert client.recv(100) == b"bye"
    assert client.recv(100) == b""
    assert guest.tunnel.streams == {}
    client.close()


def test_guest_stops_reading_without_credit_and_resumes() -> None:
    guest = GuestSide()
    client = socket.create_connection(("127.0.0.1", guest.port), timeout=5)
    guest.pump()
    stream = next(iter(guest.tunnel.streams.values()))
    client.sendall(b"x" * (protocol.STREAM_WINDOW + 1000))
    guest.pump(40)
    sent = sum(len(f.payload) for f in guest.of(FrameType.STREAM))
    assert sent == protocol.STREAM_WINDOW  # the rest waits for the host's CREDIT
    assert stream.credit == 0
    guest.tunnel.handle(Frame(FrameType.CREDIT, stream.id, protocol.dump_json({"bytes": 4096})))
    guest.pump(5)
    assert sum(len(f.payload) for f in guest.of(FrameType.STREAM)) == sent + 1000
    client.close()


def test_guest_drops_a_stream_the_host_overruns() -> None:
    guest = GuestSide()
    client = socket.create_connection(("127.0.0.1", guest.port), timeout=5)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    guest.pump()
    stream = next(iter(guest.tunnel.streams.values()))
    stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    chunk = b"y" * protocol.STREAM_CHUNK
    for _ in range(protocol.STREAM_WINDOW // protocol.STREAM_CHUNK + 40):
        guest.tunnel.handle(Frame(FrameType.STREAM, stream.id, chunk))
        if not guest.tunnel.streams:
            break
    assert guest.tunnel.streams == {}
    assert guest.of(FrameType.CLOSE)
    client.close()


def test_guest_closes_when_the_program_does() -> None:
    guest = GuestSide()
    client = socket.create_connection(("127.0.0.1", guest.port), timeout=5)
    guest.pump()
    client.close()
    guest.pump()
    assert [f.type for f in guest.sent] == [FrameType.OPEN, FrameType.CLOSE]


class HostSide:
    """A HostTunnel on a real Channel; the test plays the guest on the other end."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = protocol.FrameDecoder(protocol.MAX_HOST_PAYLOAD)
        self.frames: list[Frame] = []

    def send(self, kind: FrameType, rid: int, payload: bytes = b"{}") -> None:
        self.writer.write(protocol.encode(kind, rid, payload))

    async def expect(self, kind: FrameType, rid: int) -> Frame:
        async with asyncio.timeout(5):
            while True:
                for frame in self.frames:
                    if frame.type == kind and frame.request_id == rid:
                        self.frames.remove(frame)
                        return frame
                self.frames += self.decoder.feed(await self.reader.read(65536))


async def host_tunnel(max_streams: int = 2):  # type: ignore[no-untyped-def]
    host_sock, guest_sock = socket.socketpair()
    channel = Channel(*await asyncio.open_connection(sock=host_sock))

    async def echo(stream: TunnelStream) -> None:
        while data := await stream.read():
            await stream.write(data.upper())

    tunnel = HostTunnel(channel, echo, max_streams)
    tunnel.start()
    guest = HostSide(*await asyncio.open_connection(sock=guest_sock))
    return tunnel, channel, guest


async def test_host_streams_echo_with_credit() -> None:
    tunnel, channel, guest = await host_tunnel()
    guest.send(FrameType.OPEN, 7)
    guest.send(FrameType.STREAM, 7, b"hello")
    reply = await guest.expect(FrameType.STREAM, 7)
    assert reply.payload == b"HELLO"
    credit = await guest.expect(FrameType.CREDIT, 7)
    assert protocol.decode_json(credit.payload) == {"bytes": 5}
    guest.send(FrameType.CLOSE, 7)
    await asyncio.sleep(0.05)
    assert tunnel.streams == {}
    await tunnel.aclose()
    await channel.aclose()


async def test_host_refuses_streams_beyond_the_cap_and_overruns() -> None:
    tunnel, channel, guest = await host_tunnel(max_streams=1)
    guest.send(FrameType.OPEN, 1)
    guest.send(FrameType.OPEN, 2)
    await guest.expect(FrameType.CLOSE, 2)
    assert tunnel.refused == 1
    big = b"z" * protocol.STREAM_CHUNK
    # The echo handler takes one window, blocks writing it back (no CREDIT comes), then the
    # next window fills its buffer; anything beyond that is an overrun.
    for _ in range(2 * protocol.STREAM_WINDOW // protocol.STREAM_CHUNK + 4):
        guest.send(FrameType.STREAM, 1, big)
    await guest.expect(FrameType.CLOSE, 1)
    await tunnel.aclose()
    await channel.aclose()


async def test_host_write_waits_for_credit() -> None:
    host_sock, guest_sock = socket.socketpair()
    channel = Channel(*await asyncio.open_connection(sock=host_sock))
    stream = TunnelStream(channel, 3)
    writing = asyncio.create_task(stream.write(b"a" * (protocol.STREAM_WINDOW + 10)))
    await asyncio.sleep(0.1)
    assert not writing.done()
    stream.add_credit(10)
    async with asyncio.timeout(5):
        await writing
    stream.feed_eof()
    with pytest.raises(ConnectionResetError):
        await stream.write(b"more")
    await channel.aclose()
    guest_sock.close()
