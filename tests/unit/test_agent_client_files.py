"""AgentClient file operations, contexts and request routing, against a guest played by hand."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fission.agent.channel import QUEUE_FRAMES, Channel
from fission.agent.client import AgentClient, ExecOutcome, parse_exit
from fission.agent.file_ops import FileInfo, parse_file_info
from fission.errors import (
    AgentProtocolError,
    FileNotFound,
    InvalidInput,
    PathNotAllowed,
    VMError,
)
from fission.guest import protocol
from fission.guest.protocol import Frame, FrameType
from tests.unit.test_agent_client import GOOD_EXIT, FakeGuest, connected, request

INFO = {"name": "f.txt", "kind": "file", "size": 5, "mode": 0o644, "mtime": 1700000000.5}


def result(rid: int, message: dict[str, Any]) -> bytes:
    return protocol.encode_json(FrameType.RESULT, rid, message)


def error(rid: int, code: str, message: str = "nope") -> bytes:
    return protocol.encode_json(FrameType.ERROR, rid, {"code": code, "message": message})


async def collect(client: AgentClient, path: str, timeout: float = 5) -> bytes:
    return b"".join([chunk async for chunk in client.read_file(path, timeout=timeout)])


async def upload_frames(guest: FakeGuest) -> tuple[Frame, list[bytes]]:
    """The FILE frame of a write and its DATA payloads up to the empty one."""
    start = await guest.receive()
    chunks = []
    while True:
        frame = await guest.receive()
        assert (frame.type, frame.request_id) == (FrameType.DATA, start.request_id)
        if not frame.payload:
            return start, chunks
        chunks.append(frame.payload)


# FileInfo ---------------------------------------------------------------------------------------


def test_parse_file_info_accepts_a_good_info() -> None:
    assert parse_file_info(INFO, "a/f.txt") == FileInfo(
        "a/f.txt", "f.txt", "file", 5, 0o644, 1.7e9 + 0.5
    )
    assert parse_file_info(INFO | {"mtime": 3}, "x").mtime == 3.0


@pytest.mark.parametrize(
    "change",
    [
        {"name": ""},
        {"name": "."},
        {"name": ".."},
        {"name": "a/b"},
        {"name": "a\0"},
        {"name": 3},
        {"name": "x" * 2000},
        {"kind": "device"},
        {"kind": None},
        {"size": -1},
        {"size": 1.5},
        {"size": True},
        {"size": "5"},
        {"mode": 0o10000},
        {"mode": -1},
        {"mode": False},
        {"mtime": "now"},
        {"mtime": True},
        {"mtime": float("nan")},
        {"mtime": float("inf")},
        {"mtime": None},
    ],
)
def test_parse_file_info_refuses_malformed_fields(change: dict[str, Any]) -> None:
    with pytest.raises(AgentProtocolError):
        parse_file_info(INFO | change, "x")


def test_parse_file_info_refuses_a_non_object() -> None:
    with pytest.raises(AgentProtocolError):
        parse_file_info([INFO], "x")


def test_parse_exit_reads_the_optional_flags() -> None:
    assert parse_exit(GOOD_EXIT) == ExecOutcome(3, 0, False, False, False, 1.5, False, False)
    outcome = parse_exit(GOOD_EXIT | {"context_reset": True, "warm": True})
    assert outcome.context_reset and outcome.warm
    for bad in ({"warm": 1}, {"context_reset": "yes"}, {"warm": None}):
        with pytest.raises(AgentProtocolError):
            parse_exit(GOOD_EXIT | bad)


# writes -----------------------------------------------------------------------------------------


async def test_write_file_streams_chunks_and_returns_the_info() -> None:
    data = bytes(range(256)) * (protocol.FILE_CHUNK // 256) * 2 + b"tail"
    async with connected() as (client, guest):

        async def play() -> tuple[Frame, list[bytes]]:
            start, chunks = await upload_frames(guest)
            await guest.send(result(start.request_id, {"info": INFO | {"size": len(data)}}))
            return start, chunks

        player = asyncio.create_task(play())
        info = await client.write_file("dir/f.txt", data, mode=0o600, timeout=5)
        start, chunks = await player
    assert info == FileInfo("dir/f.txt", "f.txt", "file", len(data), 0o644, 1.7e9 + 0.5)
    assert json.loads(start.payload) == {"op": "write", "path": "dir/f.txt", "mode": 0o600}
    assert all(len(c) <= protocol.FILE_CHUNK for c in chunks) and b"".join(chunks) == data


async def test_write_file_takes_an_async_iterable() -> None:
    async def pieces() -> AsyncIterator[bytes]:
        yield b"a" * (protocol.FILE_CHUNK + 1)
        yield bytearray(b"b")
        yield b""

    async with connected() as (client, guest):

        async def play() -> list[bytes]:
            start, chunks = await upload_frames(guest)
            await guest.send(result(start.request_id, {"info": INFO}))
            return chunks

        player = asyncio.create_task(play())
        await client.write_file("/tmp/x", pieces(), timeout=5)
        chunks = await player
    assert b"".join(chunks) == b"a" * (protocol.FILE_CHUNK + 1) + b"b"
    assert max(map(len, chunks)) == protocol.FILE_CHUNK


async def test_an_early_error_stops_the_upload() -> None:
    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * protocol.FILE_CHUNK
            await asyncio.sleep(0)

    async with connected() as (client, guest):

        async def play() -> list[Frame]:
            start = await guest.receive()
            await guest.send(error(start.request_id, "invalid_input", "f: the disk is full"))
            frames = []  # like the agent, keep reading (and dropping) until the host stops
            with contextlib.suppress(TimeoutError):
                while True:
                    async with asyncio.timeout(0.3):
                        frames.append(await guest.receive())
            return frames

        player = asyncio.create_task(play())
        with pytest.raises(InvalidInput, match="disk is full"):
            await client.write_file("f", endless(), timeout=5)
        frames = await player
    # The host stopped sending and never marked the upload complete.
    assert all(f.type == FrameType.DATA and f.payload for f in frames)
    assert len(frames) < 100


async def test_a_failing_data_source_kills_the_upload() -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"x"
        raise RuntimeError("source broke")

    async with connected() as (client, guest):
        with pytest.raises(RuntimeError, match="source broke"):
            await client.write_file("f", broken(), timeout=5)
        kinds = [(await guest.receive()).type for _ in range(3)]
    assert kinds == [FrameType.FILE, FrameType.DATA, FrameType.KILL]


async def test_a_result_before_the_end_of_the_data_is_a_protocol_error() -> None:
    async def slow() -> AsyncIterator[bytes]:
        for _ in range(50):
            yield b"x"
            await asyncio.sleep(0.01)

    async with connected() as (client, guest):

        async def play() -> None:
            start = await guest.receive()
            await guest.send(result(start.request_id, {"info": INFO}))

        player = asyncio.create_task(play())
        with pytest.raises(AgentProtocolError, match="before all data"):
            await client.write_file("f", slow(), timeout=5)
        await player


@pytest.mark.parametrize("mode", [0o1000, -1, 0o4755, 1.0, "644"])
async def test_write_file_refuses_a_bad_mode_without_sending(mode: Any) -> None:
    async with connected() as (client, _guest):
        with pytest.raises(InvalidInput, match="mode"):
            await client.write_file("f", b"x", mode=mode, timeout=5)


# reads ------------------------------------------------------------------------------------------


async def test_read_file_yields_the_chunks() -> None:
    async with connected() as (client, guest):

        async def play() -> Frame:
            start = await guest.receive()
            rid = start.request_id
            await guest.send(
                protocol.encode(FrameType.DATA, rid, b"one"),
                protocol.encode(FrameType.DATA, rid, b""),
                protocol.encode(FrameType.DATA, rid, b"two"),
                result(rid, {"size": 6}),
            )
            return start

        player = asyncio.create_task(play())
        chunks = [c async for c in client.read_file("/data/f", timeout=5)]
        start = await player
    assert chunks == [b"one", b"two"]
    assert json.loads(start.payload) == {"op": "read", "path": "/data/f"}


@pytest.mark.parametrize(
    "reply",
    [
        [result(1, {"size": 7})],  # says more than it sent
        [result(1, {"size": 5})],  # says less
        [result(1, {"size": "6"})],
        [result(1, {})],
        [protocol.encode_json(FrameType.EXIT, 1, GOOD_EXIT)],
        [protocol.encode(FrameType.STDOUT, 1, b"x")],
        [protocol.encode(FrameType.RESULT, 1, b"not json")],
        [protocol.encode(FrameType.DATA, 2, b"x")],  # another request's data
        [protocol.HEADER.pack(b"FS", 1, FrameType.DATA, 1, protocol.MAX_GUEST_PAYLOAD + 1)],
        [b"garbage that is not a frame header"],
    ],
)
async def test_hostile_read_answers_are_protocol_errors(reply: list[bytes]) -> None:
    async with connected() as (client, guest):

        async def play() -> None:
            assert (await guest.receive()).request_id == 1
            await guest.send(protocol.encode(FrameType.DATA, 1, b"abcdef"), *reply)

        player = asyncio.create_task(play())
        with pytest.raises(AgentProtocolError):
            await collect(client, "f")
        await player
        # The channel is broken for good: later calls fail at once.
        with pytest.raises(AgentProtocolError):
            await client.stat_file("f", timeout=5)


async def test_a_full_size_data_frame_is_accepted() -> None:
    big = b"z" * protocol.MAX_GUEST_PAYLOAD
    async with connected() as (client, guest):

        async def play() -> None:
            rid = (await guest.receive()).request_id
            await guest.send(
                protocol.encode(FrameType.DATA, rid, big), result(rid, {"size": len(big)})
            )

        player = asyncio.create_task(play())
        assert await collect(client, "f") == big
        await player


async def test_closing_a_read_early_kills_it_and_drops_the_rest() -> None:
    async with connected() as (client, guest):

        async def play() -> list[Frame]:
            rid = (await guest.receive()).request_id
            await guest.send(*(protocol.encode(FrameType.DATA, rid, b"x" * 10) for _ in range(5)))
            kill = await guest.receive()
            # Late frames of the abandoned read are dropped, not taken as hostile.
            await guest.send(
                protocol.encode(FrameType.DATA, rid, b"late"), result(rid, {"size": 60})
            )
            rid2 = (await guest.receive()).request_id
            await guest.send(result(rid2, {"info": INFO}))
            return [kill]

        player = asyncio.create_task(play())
        reader = client.read_file("f", timeout=5)
        assert await anext(reader) == b"x" * 10
        await reader.aclose()
        assert (await client.stat_file("f.txt", timeout=5)).name == "f.txt"
        [kill] = await player
    assert (kill.type, kill.request_id) == (FrameType.KILL, 1)


# the other operations ---------------------------------------------------------------------------


async def test_list_stat_mkdir_remove() -> None:
    entries = [INFO | {"name": f"e{i}"} for i in range(3)]
    async with connected() as (client, guest):

        async def play() -> list[dict[str, Any]]:
            sent = []
            frame = await guest.receive()
            sent.append(json.loads(frame.payload))
            await guest.send(
                result(frame.request_id, {"entries": entries[:2], "more": True}),
                result(frame.request_id, {"entries": entries[2:], "more": False}),
            )
            for answer in ({"info": INFO}, {"info": INFO | {"kind": "dir"}}, {}):
                frame = await guest.receive()
                sent.append(json.loads(frame.payload))
                await guest.send(result(frame.request_id, answer))
            return sent

        player = asyncio.create_task(play())
        listing = await client.list_files("/tmp/d", timeout=5)
        stat = await client.stat_file("/home/sandbox/f.txt", timeout=5)
        made = await client.make_dir("a/b", timeout=5)
        assert await client.remove_file("a", recursive=True, timeout=5) is None
        sent = await player
    assert [i.path for i in listing] == ["/tmp/d/e0", "/tmp/d/e1", "/tmp/d/e2"]
    assert (stat.path, made.path, made.kind) == ("f.txt", "a/b", "dir")
    assert sent == [
        {"op": "list", "path": "/tmp/d"},
        {"op": "stat", "path": "/home/sandbox/f.txt"},
        {"op": "mkdir", "path": "a/b"},
        {"op": "remove", "path": "a", "recursive": True},
    ]


@pytest.mark.parametrize(
    "answer",
    [
        {"entries": "x", "more": False},
        {"entries": [], "more": 1},
        {"entries": [INFO | {"name": "a/b"}], "more": False},
        {"entries": [7], "more": False},
    ],
)
async def test_malformed_listings_are_protocol_errors(answer: dict[str, Any]) -> None:
    async with connected() as (client, guest):

        async def play() -> None:
            await guest.send(result((await guest.receive()).request_id, answer))

        player = asyncio.create_task(play())
        with pytest.raises(AgentProtocolError):
            await client.list_files(timeout=5)
        await player


@pytest.mark.parametrize(
    ("code", "error_type"),
    [
        ("path_not_allowed", PathNotAllowed),
        ("file_not_found", FileNotFound),
        ("invalid_input", InvalidInput),
        ("internal", VMError),
        ("unauthorized", VMError),  # a code the guest has no business sending
        (None, VMError),
    ],
)
async def test_error_codes_map_to_errors(code: str | None, error_type: type[Exception]) -> None:
    async with connected() as (client, guest):

        async def play() -> None:
            rid = (await guest.receive()).request_id
            await guest.send(
                protocol.encode_json(FrameType.ERROR, rid, {"code": code, "message": "why"})
            )

        player = asyncio.create_task(play())
        with pytest.raises(error_type, match="why") as caught:
            await client.stat_file("f", timeout=5)
        await player
    assert type(caught.value) is error_type


@pytest.mark.parametrize(
    ("path", "error_type"),
    [
        ("/etc/passwd", PathNotAllowed),
        ("../x", PathNotAllowed),
        ("/proc/self/environ", PathNotAllowed),
        ("", InvalidInput),
        ("a\0b", InvalidInput),
        ("\udcff", InvalidInput),
    ],
)
async def test_paths_are_checked_before_anything_is_sent(
    path: str, error_type: type[Exception]
) -> None:
    async with connected() as (client, guest):
        with pytest.raises(error_type):
            await client.stat_file(path, timeout=5)
        with pytest.raises(error_type):
            await collect(client, path)
        with pytest.raises(error_type):
            await client.write_file(path, b"x", timeout=5)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await guest.receive()


async def test_a_silent_guest_times_out_with_a_vm_error_and_a_kill() -> None:
    async with connected() as (client, guest):
        with pytest.raises(VMError, match=r"within 0\.1 s") as caught:
            await client.stat_file("f", timeout=0.1)
        assert not isinstance(caught.value, AgentProtocolError)
        first, kill = await guest.receive(), await guest.receive()
        assert (first.type, kill.type, kill.request_id) == (FrameType.FILE, FrameType.KILL, 1)
        # The late answer is dropped; the next request works.
        await guest.send(result(1, {"info": INFO}), result(2, {"info": INFO}))
        assert (await client.stat_file("f.txt", timeout=5)).size == 5


# routing and contexts ----------------------------------------------------------------------------


async def test_a_file_operation_while_a_run_is_in_flight() -> None:
    async with connected() as (client, guest):
        seen: list[tuple[str, bytes]] = []
        running = asyncio.create_task(client.exec(request(), lambda s, d: seen.append((s, d))))
        exec_frame = await guest.receive()
        reading = asyncio.create_task(collect(client, "f"))
        read_frame = await guest.receive()
        e, r = exec_frame.request_id, read_frame.request_id
        assert e != r
        await guest.send(
            protocol.encode(FrameType.STDOUT, e, b"out1"),
            protocol.encode(FrameType.DATA, r, b"file1"),
            protocol.encode(FrameType.STDOUT, e, b"out2"),
            protocol.encode(FrameType.DATA, r, b"file2"),
            result(r, {"size": 10}),
        )
        assert await reading == b"file1file2"
        assert not running.done()
        await guest.send(protocol.encode_json(FrameType.EXIT, e, GOOD_EXIT))
        assert (await running).exit_code == 3
    assert seen == [("stdout", b"out1"), ("stdout", b"out2")]


async def test_exec_sends_the_context_and_maps_its_refusal() -> None:
    async with connected() as (client, guest):
        req = request()
        ctx_req = type(req)(**{**req.__dict__, "context": "nb", "fresh_context": True})

        async def play() -> dict[str, Any]:
            frame = await guest.receive()
            await guest.send(error(frame.request_id, "invalid_input", "contexts are for python"))
            return json.loads(frame.payload)

        player = asyncio.create_task(play())
        with pytest.raises(InvalidInput, match="contexts are for python"):
            await client.exec(ctx_req, lambda s, d: None)
        sent = await player
        assert (sent["context"], sent["fresh_context"]) == ("nb", True)
        bad = type(req)(**{**req.__dict__, "context": "has space"})
        with pytest.raises(InvalidInput, match="context id"):
            await client.exec(bad, lambda s, d: None)


async def test_drop_context() -> None:
    async with connected() as (client, guest):

        async def play() -> list[Frame]:
            frames = []
            for answer in ({"dropped": True}, {"dropped": False}, {"dropped": "yes"}):
                frame = await guest.receive()
                frames.append(frame)
                await guest.send(result(frame.request_id, answer))
            return frames

        player = asyncio.create_task(play())
        assert await client.drop_context("nb", timeout=5) is True
        assert await client.drop_context("nb", timeout=5) is False
        with pytest.raises(AgentProtocolError):
            await client.drop_context("nb", timeout=5)
        frames = await player
        with pytest.raises(InvalidInput):
            await client.drop_context("../x", timeout=5)
    assert [(f.type, json.loads(f.payload)) for f in frames] == [
        (FrameType.DROP, {"context": "nb"})
    ] * 3


async def test_a_stalled_reader_holds_at_most_a_bounded_queue() -> None:
    host_end, guest_end = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=host_end)
    channel, guest = Channel(reader, writer), FakeGuest(guest_end)
    try:
        channel.open(1)
        channel.open(2)
        total = QUEUE_FRAMES + 36
        await guest.send(*(protocol.encode(FrameType.DATA, 1, b"x") for _ in range(total)))
        await guest.send(protocol.encode(FrameType.DATA, 2, b"two"))
        # Request 2's frame is behind a full queue of request 1: it waits for room.
        waiting = asyncio.create_task(channel.next(2))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        for _ in range(total):
            assert (await channel.next(1)).payload == b"x"
        assert (await asyncio.wait_for(waiting, 5)).payload == b"two"
        # A request given up is dropped from routing: the channel reads past its frames.
        channel.close(1, abandoned=True)
        await guest.send(protocol.encode(FrameType.DATA, 1, b"late"))
        await guest.send(protocol.encode(FrameType.DATA, 2, b"next"))
        assert (await asyncio.wait_for(channel.next(2), 5)).payload == b"next"
    finally:
        await channel.aclose()
        guest.close()
