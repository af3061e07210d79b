"""The agent protocol: framing, limits, and a fuzz run over arbitrary bytes."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fission.agent import protocol
from fission.agent.client import AgentClient, ExecRequest, parse_exit
from fission.agent.protocol import FrameType
from fission.errors import AgentProtocolError, VMError

frames = st.lists(
    st.tuples(st.sampled_from(list(FrameType)), st.integers(0, 2**32 - 1), st.binary(max_size=300)),
    max_size=8,
)


@given(frames, st.data())
def test_frames_survive_any_split(items: list[tuple[FrameType, int, bytes]], data: st.DataObject) -> None:
    wire = b"".join(protocol.encode(t, r, p) for t, r, p in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    decoder = protocol.FrameDecoder(1024)
    decoded = []
    start = 0
    for cut in [*cuts, len(wire)]:
        decoded += decoder.feed(wire[start:cut])
        start = cut
    assert [(f.type, f.request_id, f.payload) for f in decoded] == items
    assert decoder.buffered == 0


@settings(max_examples=300)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash_the_decoder(data: bytes) -> None:
    decoder = protocol.FrameDecoder(64)
    try:
        for frame in decoder.feed(data):
            assert len(frame.payload) <= 64
    except protocol.ProtocolError:
        return
    assert decoder.buffered <= 64 + protocol.HEADER_SIZE


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"XX" + bytes([1, 5]) + bytes(8), "magic"),
        (b"FS" + bytes([9, 5]) + bytes(8), "version"),
        (b"FS" + bytes([1, 200]) + bytes(8), "unknown frame type"),
        (b"FS" + bytes([1, 5]) + bytes(4) + (10**6).to_bytes(4, "big"), "exceeds the limit"),
    ],
)
def test_bad_headers_are_refused(header: bytes, message: str) -> None:
    with pytest.raises(protocol.ProtocolError, match=message):
        protocol.FrameDecoder(1000).feed(header)


@pytest.mark.parametrize("payload", [b"[1, 2]", b"\xff", b"{not json", b'"text"'])
def test_control_frames_must_be_json_objects(payload: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_json(payload)


def test_request_id_must_fit() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.encode(FrameType.PING, 2**32)


GOOD_EXIT = {"exit_code": 3, "signal": 0, "timed_out": False, "oom": False,
             "output_truncated": False, "duration_ms": 1.5}


def test_parse_exit_accepts_a_good_exit() -> None:
    outcome = parse_exit(dict(GOOD_EXIT))
    assert (outcome.exit_code, outcome.duration_ms) == (3, 1.5)


@pytest.mark.parametrize(
    "change",
    [
        {"exit_code": 256}, {"exit_code": -1}, {"exit_code": True}, {"exit_code": "0"},
        {"signal": 999}, {"timed_out": 1}, {"oom": "no"}, {"duration_ms": -1},
        {"duration_ms": "1"},
    ],
)
def test_parse_exit_refuses_bad_fields(change: dict[str, object]) -> None:
    with pytest.raises(AgentProtocolError):
        parse_exit(GOOD_EXIT | change)


def test_parse_exit_refuses_missing_fields() -> None:
    broken = dict(GOOD_EXIT)
    del broken["oom"]
    with pytest.raises(AgentProtocolError, match="oom"):
        parse_exit(broken)


REQUEST = ExecRequest(argv=["python3"], env={}, timeout=5, memory_bytes=0, pids_max=0,
                      output_limit=10, script="print(1)")


async def with_fake_guest(guest_bytes: list[bytes]) -> tuple[AgentClient, socket.socket]:
    host_end, guest_end = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=host_end)
    for data in guest_bytes:
        guest_end.sendall(data)
    return AgentClient(reader, writer), guest_end


def test_exec_streams_in_order_and_caps_output_on_the_host() -> None:
    async def scenario() -> None:
        client, guest = await with_fake_guest([
            protocol.encode(FrameType.STDOUT, 1, b"hello "),
            protocol.encode(FrameType.STDERR, 1, b"warn\n"),
            protocol.encode(FrameType.STDOUT, 1, b"world and more"),
            protocol.encode_json(FrameType.EXIT, 1, GOOD_EXIT),
        ])
        seen: list[tuple[str, bytes]] = []
        outcome = await client.exec(REQUEST, lambda s, d: seen.append((s, d)))
        assert seen == [("stdout", b"hello "), ("stderr", b"warn"), ]
        assert outcome.output_truncated  # the guest claimed otherwise; the host cut at 10 bytes
        sent = guest.recv(65536)
        frame = protocol.FrameDecoder(1 << 20).feed(sent)[0]
        assert frame.type == FrameType.EXEC and json.loads(frame.payload)["script"] == "print(1)"
        await client.close()
        guest.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("guest_bytes", "error"),
    [
        ([protocol.HEADER.pack(b"FS", 1, 5, 1, protocol.MAX_GUEST_PAYLOAD + 1)], AgentProtocolError),
        ([protocol.encode(FrameType.STDOUT, 99, b"x")], AgentProtocolError),
        ([protocol.encode(FrameType.PONG, 1, b"{}")], AgentProtocolError),
        ([b"garbage!!!!!!!!!!!"], AgentProtocolError),
        ([], VMError),
    ],
)
def test_hostile_guest_frames_end_the_run(guest_bytes: list[bytes], error: type[Exception]) -> None:
    async def scenario() -> None:
        client, guest = await with_fake_guest(guest_bytes)
        if not guest_bytes:
            guest.close()
        with pytest.raises(error):
            await client.exec(REQUEST, lambda s, d: None)
        await client.close()
        guest.close()

    asyncio.run(scenario())


def test_handshake_checks_the_protocol_version() -> None:
    async def scenario(version: int) -> None:
        client, guest = await with_fake_guest(
            [protocol.encode_json(FrameType.HELLO, 0, {"protocol": version})])
        try:
            await client.handshake(5)
            init = protocol.FrameDecoder(1 << 20).feed(guest.recv(65536))[0]
            message = json.loads(init.payload)
            assert init.type == FrameType.INIT and len(message["seed"]) == 128
        finally:
            await client.close()
            guest.close()

    asyncio.run(scenario(protocol.PROTOCOL_VERSION))
    with pytest.raises(AgentProtocolError, match="protocol"):
        asyncio.run(scenario(99))
