"""The host side of the agent protocol, against a guest played by hand over a socketpair."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from fission.agent.client import (
    MAX_TRACE_STEPS,
    STDIN_CHUNK,
    AgentClient,
    ExecOutcome,
    ExecRequest,
    parse_exit,
    parse_trace,
)
from fission.errors import AgentProtocolError, VMError
from fission.guest import protocol
from fission.guest.protocol import Frame, FrameType

GOOD_EXIT: dict[str, Any] = {
    "exit_code": 3,
    "signal": 0,
    "timed_out": False,
    "oom": False,
    "output_truncated": False,
    "duration_ms": 1.5,
}
HELLO = {"protocol": protocol.PROTOCOL_VERSION, "agent": "1", "kernel": "6.1.0"}


def request(output_limit: int = 1000) -> ExecRequest:
    return ExecRequest(
        argv=["python3"],
        env={"A": "1"},
        timeout=5.0,
        memory_bytes=1 << 28,
        pids_max=64,
        output_limit=output_limit,
        script="print(1)",
        script_name="main.py",
        mode="python",
    )


# parse_exit ------------------------------------------------------------------------------------


def test_parse_exit_accepts_a_good_exit() -> None:
    assert parse_exit(dict(GOOD_EXIT)) == ExecOutcome(3, 0, False, False, False, 1.5)


def test_parse_exit_reads_every_flag_and_takes_an_int_duration() -> None:
    message = GOOD_EXIT | {
        "timed_out": True,
        "oom": True,
        "output_truncated": True,
        "duration_ms": 7,
        "signal": 9,
    }
    outcome = parse_exit(message)
    assert outcome == ExecOutcome(3, 9, True, True, True, 7.0)
    assert type(outcome.duration_ms) is float


@pytest.mark.parametrize(
    "change",
    [
        {"exit_code": 0},
        {"exit_code": 255},
        {"signal": 128},
        {"duration_ms": 0},
        {"duration_ms": 0.0},
        {"extra": "ignored"},
    ],
)
def test_parse_exit_accepts_boundary_values(change: dict[str, Any]) -> None:
    parse_exit(GOOD_EXIT | change)


@pytest.mark.parametrize(
    "change",
    [
        {"exit_code": 256},
        {"exit_code": -1},
        {"exit_code": True},
        {"exit_code": False},
        {"exit_code": "0"},
        {"exit_code": 0.0},
        {"exit_code": None},
        {"exit_code": [0]},
        {"signal": 129},
        {"signal": -1},
        {"signal": True},
        {"signal": 9.0},
        {"signal": "9"},
        {"timed_out": 1},
        {"timed_out": 0},
        {"timed_out": None},
        {"oom": "no"},
        {"output_truncated": "false"},
        {"output_truncated": []},
        {"duration_ms": -1},
        {"duration_ms": -0.001},
        {"duration_ms": 10**400},
        {"duration_ms": "1"},
        {"duration_ms": True},
        {"duration_ms": None},
    ],
)
def test_parse_exit_refuses_malformed_fields(change: dict[str, Any]) -> None:
    with pytest.raises(AgentProtocolError, match="EXIT frame"):
        parse_exit(GOOD_EXIT | change)


@pytest.mark.parametrize("missing", list(GOOD_EXIT))
def test_parse_exit_refuses_missing_fields(missing: str) -> None:
    broken = {key: value for key, value in GOOD_EXIT.items() if key != missing}
    with pytest.raises(AgentProtocolError, match=missing):
        parse_exit(broken)


@pytest.mark.parametrize("payload", [b'"duration_ms":NaN', b'"duration_ms":Infinity'])
def test_parse_exit_refuses_non_finite_durations(payload: bytes) -> None:
    # json.loads accepts these non-JSON tokens, so a hostile guest can send them.
    raw = protocol.dump_json({k: v for k, v in GOOD_EXIT.items() if k != "duration_ms"})
    message = protocol.decode_json(raw[:-1] + b"," + payload + b"}")
    with pytest.raises(AgentProtocolError):
        parse_exit(message)


# parse_trace: the guest's per-step times are untrusted numbers ---------------------------------

GOOD_TRACE = [["parsed", 0.4], ["prep_forked", -812.5], ["handed_over", 3], ["exit_sent", 9.25]]


def test_a_well_formed_trace_reaches_the_outcome() -> None:
    outcome = parse_exit(GOOD_EXIT | {"trace": GOOD_TRACE})
    assert outcome.trace == (
        ("parsed", 0.4),
        ("prep_forked", -812.5),
        ("handed_over", 3.0),
        ("exit_sent", 9.25),
    )
    assert all(type(ms) is float for _, ms in outcome.trace)


def test_an_exit_without_a_trace_has_none() -> None:
    assert parse_exit(dict(GOOD_EXIT)).trace == ()


@pytest.mark.parametrize(
    "trace",
    [
        "parsed",
        {"parsed": 1.0},
        [["parsed"]],
        [["parsed", 1.0, 2.0]],
        [("parsed", 1.0)],
        [[1, 1.0]],
        [["Parsed", 1.0]],
        [["_parsed", 1.0]],
        [["pars-ed", 1.0]],
        [["p" * 33, 1.0]],
        [["", 1.0]],
        [["pärsed", 1.0]],
        [["parsed", "1.0"]],
        [["parsed", True]],
        [["parsed", None]],
        [["parsed", 86_400_001]],
        [["parsed", -86_400_001]],
        [["parsed", 10**400]],
        [["ok", 1.0]] * (MAX_TRACE_STEPS + 1),
        [["parsed", 1.0], "junk"],
    ],
)
def test_a_bad_trace_is_dropped_and_the_run_still_counts(trace: object) -> None:
    outcome = parse_exit(GOOD_EXIT | {"trace": trace})
    assert outcome.trace == ()
    assert outcome == ExecOutcome(3, 0, False, False, False, 1.5)


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_trace_times_are_dropped(token: bytes) -> None:
    # json.loads accepts these non-JSON tokens, so a hostile guest can send them.
    raw = protocol.dump_json(GOOD_EXIT)
    message = protocol.decode_json(raw[:-1] + b',"trace":[["parsed",' + token + b"]]}")
    assert parse_exit(message).trace == ()


def test_parse_trace_bounds() -> None:
    assert parse_trace([["a", 0]] * MAX_TRACE_STEPS) == (("a", 0.0),) * MAX_TRACE_STEPS
    assert parse_trace([["a" * 32, 86_400_000], ["b0_1", -86_400_000.0]]) == (
        ("a" * 32, 86_400_000.0),
        ("b0_1", -86_400_000.0),
    )
    assert parse_trace([]) == ()
    assert parse_trace(None) == ()


def test_trace_and_last_run_are_off_unless_asked_and_go_to_the_guest() -> None:
    from dataclasses import asdict, replace

    plain = request()
    assert plain.trace is False and plain.last_run is False
    sent = asdict(replace(plain, trace=True, last_run=True))
    assert sent["trace"] is True and sent["last_run"] is True


# AgentClient against a fake guest --------------------------------------------------------------


class FakeGuest:
    """The guest end of a socketpair: reads the host's frames, sends frames written by hand."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._decoder = protocol.FrameDecoder(protocol.MAX_HOST_PAYLOAD)
        self._frames: list[Frame] = []

    async def receive(self) -> Frame:
        """The next frame the host sent; EOFError if the host closed the channel."""
        loop = asyncio.get_running_loop()
        while not self._frames:
            data = await loop.sock_recv(self.sock, 65536)
            if not data:
                raise EOFError("the host closed the channel")
            self._frames += self._decoder.feed(data)
        return self._frames.pop(0)

    async def send(self, *wire: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, b"".join(wire))

    def close(self) -> None:
        self.sock.close()


@contextlib.asynccontextmanager
async def connected() -> AsyncIterator[tuple[AgentClient, FakeGuest]]:
    """An AgentClient wired to a FakeGuest; everything is closed and bounded by a deadline."""
    host_end, guest_end = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=host_end)
    client, guest = AgentClient(reader, writer), FakeGuest(guest_end)
    try:
        async with asyncio.timeout(10):
            yield client, guest
    finally:
        await client.close()
        guest.close()


GuestScript = Callable[[FakeGuest, Frame], Awaitable[None]]


async def run_exec(
    script: GuestScript, req: ExecRequest | None = None, stdin: bytes | None = None
) -> tuple[ExecOutcome, list[tuple[str, bytes]], list[Frame]]:
    """Run one exec; the guest waits for the EXEC frame, then plays ``script``.

    Returns the outcome, what the sink saw, and every frame the host sent.
    """
    seen: list[tuple[str, bytes]] = []
    received: list[Frame] = []
    async with connected() as (client, guest):

        async def play() -> None:
            exec_frame = await guest.receive()
            received.append(exec_frame)
            await script(guest, exec_frame)

        player = asyncio.create_task(play())
        try:
            outcome = await client.exec(req or request(), lambda s, d: seen.append((s, d)), stdin)
        finally:
            await player
        # Frames the host sent after EXEC (stdin) that the script did not consume.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):
                while True:
                    received.append(await guest.receive())
    return outcome, seen, received


async def fails_with(error: type[Exception], script: GuestScript) -> Exception:
    with pytest.raises(error) as caught:
        await run_exec(script)
    return caught.value


async def test_handshake_sends_init_and_accepts_hello() -> None:
    async with connected() as (client, guest):
        await guest.send(protocol.encode_json(FrameType.HELLO, 0, HELLO))
        before = time.time_ns()
        hello = await client.handshake(5)
        init = await guest.receive()
    assert hello == HELLO and client.hello == HELLO
    assert (init.type, init.request_id) == (FrameType.INIT, 0)
    message = protocol.decode_json(init.payload)
    assert abs(message["time_ns"] - before) < 5 * 10**9
    assert len(message["seed"]) == 128 and int(message["seed"], 16) >= 0


async def test_each_handshake_sends_a_fresh_seed() -> None:
    seeds = set()
    for _ in range(2):
        async with connected() as (client, guest):
            await guest.send(protocol.encode_json(FrameType.HELLO, 0, HELLO))
            await client.handshake(5)
            seeds.add(protocol.decode_json((await guest.receive()).payload)["seed"])
    assert len(seeds) == 2


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (protocol.encode_json(FrameType.HELLO, 0, HELLO | {"protocol": 2}), "protocol 2"),
        (protocol.encode_json(FrameType.HELLO, 0, HELLO | {"protocol": 0}), "rebuild images"),
        (protocol.encode_json(FrameType.HELLO, 0, HELLO | {"protocol": "1"}), "protocol '1'"),
        (protocol.encode_json(FrameType.HELLO, 0, {"agent": "1"}), "protocol None"),
        (protocol.encode(FrameType.HELLO, 0, b"[1]"), "bad HELLO frame"),
        (protocol.encode(FrameType.HELLO, 0, b"\xff"), "bad HELLO frame"),
        (protocol.encode_json(FrameType.READY, 0, {}), "expected HELLO"),
        (protocol.HEADER.pack(b"FS", 2, 2, 0, 0), "malformed frame"),
    ],
)
async def test_handshake_refuses_a_bad_hello(reply: bytes, message: str) -> None:
    async with connected() as (client, guest):
        await guest.send(reply)
        with pytest.raises(AgentProtocolError, match=message):
            await client.handshake(5)
        assert client.hello == {}


async def test_handshake_refuses_a_boolean_protocol() -> None:
    async with connected() as (client, guest):
        await guest.send(protocol.encode_json(FrameType.HELLO, 0, HELLO | {"protocol": True}))
        with pytest.raises(AgentProtocolError):
            await client.handshake(5)


async def test_handshake_when_the_guest_closes_is_a_vm_error() -> None:
    async with connected() as (client, guest):
        await guest.send(protocol.encode(FrameType.HELLO, 0, b"{}")[:5])
        guest.close()
        with pytest.raises(VMError, match="closed") as caught:
            await client.handshake(5)
    assert not isinstance(caught.value, AgentProtocolError)


async def test_resync_sends_the_clock_and_a_fresh_seed_again() -> None:
    async with connected() as (client, guest):
        await guest.send(protocol.encode_json(FrameType.HELLO, 0, HELLO))
        await client.handshake(5)
        first = protocol.decode_json((await guest.receive()).payload)
        await guest.send(protocol.encode_json(FrameType.HELLO, 0, HELLO))
        before = time.time_ns()
        await client.resync(5)
        again = await guest.receive()
    assert (again.type, again.request_id) == (FrameType.INIT, 0)
    message = protocol.decode_json(again.payload)
    assert before <= message["time_ns"] < before + 5 * 10**9
    assert message["seed"] != first["seed"]


async def test_resync_refuses_anything_but_hello() -> None:
    async with connected() as (client, guest):
        await guest.send(protocol.encode_json(FrameType.HELLO, 0, HELLO))
        await client.handshake(5)
        await guest.send(protocol.encode_json(FrameType.READY, 0, {}))
        with pytest.raises(AgentProtocolError, match="expected HELLO"):
            await client.resync(5)


async def test_handshake_gives_up_after_its_timeout() -> None:
    async with connected() as (client, _guest):
        with pytest.raises(TimeoutError):
            await client.handshake(0.05)


async def test_exec_sends_the_request_and_streams_output_in_order() -> None:
    async def script(guest: FakeGuest, exec_frame: Frame) -> None:
        rid = exec_frame.request_id
        await guest.send(protocol.encode(FrameType.STDOUT, rid, b"one "))
        await guest.send(protocol.encode(FrameType.STDERR, rid, b"warn\n"))
        await guest.send(
            protocol.encode(FrameType.STDOUT, rid, b"two"),
            protocol.encode(FrameType.STDERR, rid, b"again"),
            protocol.encode_json(FrameType.EXIT, rid, GOOD_EXIT | {"exit_code": 7}),
        )

    outcome, seen, received = await run_exec(script)
    assert seen == [
        ("stdout", b"one "),
        ("stderr", b"warn\n"),
        ("stdout", b"two"),
        ("stderr", b"again"),
    ]
    assert outcome == ExecOutcome(7, 0, False, False, False, 1.5)
    [exec_frame] = received
    assert (exec_frame.type, exec_frame.request_id) == (FrameType.EXEC, 1)
    sent = json.loads(exec_frame.payload)
    assert sent["argv"] == ["python3"] and sent["script"] == "print(1)"
    assert sent["env"] == {"A": "1"} and sent["output_limit"] == 1000
    assert sent["stdin"] is False


async def test_exec_uses_a_new_request_id_each_time() -> None:
    async with connected() as (client, guest):
        for expected in (1, 2, 3):
            await guest.send(protocol.encode_json(FrameType.EXIT, expected, GOOD_EXIT))
            await client.exec(request(), lambda s, d: None)
            assert (await guest.receive()).request_id == expected


async def test_exec_forwards_stdin_in_chunks_then_eof() -> None:
    data = bytes(range(256)) * (STDIN_CHUNK // 256) + b"tail"

    async def script(guest: FakeGuest, exec_frame: Frame) -> None:
        got = b""
        while True:
            frame = await guest.receive()
            assert (frame.type, frame.request_id) == (FrameType.STDIN, exec_frame.request_id)
            if not frame.payload:
                break
            assert len(frame.payload) <= STDIN_CHUNK
            got += frame.payload
        assert got == data
        await guest.send(protocol.encode_json(FrameType.EXIT, exec_frame.request_id, GOOD_EXIT))

    _, _, received = await run_exec(script, stdin=data)
    assert json.loads(received[0].payload)["stdin"] is True


@pytest.mark.parametrize("limit", [0, 1, 9, 10, 11, 25])
async def test_the_host_caps_output_whatever_the_guest_claims(limit: int) -> None:
    sent = [
        (FrameType.STDOUT, b"hello "),
        (FrameType.STDERR, b"warn\n"),
        (FrameType.STDOUT, b"world and more"),
    ]
    total = sum(len(data) for _, data in sent)

    async def script(guest: FakeGuest, exec_frame: Frame) -> None:
        rid = exec_frame.request_id
        for kind, data in sent:
            await guest.send(protocol.encode(kind, rid, data))
        await guest.send(protocol.encode_json(FrameType.EXIT, rid, GOOD_EXIT))

    outcome, seen, _ = await run_exec(script, request(output_limit=limit))
    assert sum(len(data) for _, data in seen) == min(limit, total)
    expected = b"".join(data for _, data in sent)[:limit]
    assert b"".join(data for _, data in seen) == expected
    assert outcome.output_truncated is (limit < total)
    assert outcome.exit_code == GOOD_EXIT["exit_code"]


async def test_a_payload_of_exactly_the_guest_limit_is_accepted() -> None:
    big = b"z" * protocol.MAX_GUEST_PAYLOAD

    async def script(guest: FakeGuest, exec_frame: Frame) -> None:
        await guest.send(
            protocol.encode(FrameType.STDOUT, exec_frame.request_id, big),
            protocol.encode_json(FrameType.EXIT, exec_frame.request_id, GOOD_EXIT),
        )

    _, seen, _ = await run_exec(script, request(output_limit=len(big)))
    assert b"".join(data for _, data in seen) == big


async def test_a_frame_larger_than_the_guest_limit_is_a_protocol_error() -> None:
    async def script(guest: FakeGuest, exec_frame: Frame) -> None:
        rid = exec_frame.request_id
        await guest.send(
            protocol.HEADER.pack(b"FS", 1, FrameType.STDOUT, rid, protocol.MAX_GUEST_PAYLOAD + 1)
        )

    error = await fails_with(AgentProtocolError, script)
    assert "exceeds the limit" in str(error)


@pytest.mark.parametrize("offset", [1, -1, 1000])
async def test_a_frame_for_another_request_is_a_protocol_error(offset: int) -> None:
    async def script(guest: FakeGuest, exec_frame: Frame) -> None:
        await guest.send(protocol.encode(FrameType.STDOUT, exec_frame.request_id + offset, b"x"))

    error = await fails_with(AgentProtocolError, script)
    assert "while 1 runs" in str(error)


async def test_an_exit_for_another_request_is_a_protocol_error() -> None:
    async def script(guest: FakeGuest, exec_frame: Frame) -> None:
        await guest.send(protocol.encode_json(FrameType.EXIT, exec_frame.request_id + 1, GOOD_EXIT))

    await fails_with(AgentProtocolError, script)


@pytest.mark.parametrize(
    "frame",
    [
        protocol.encode_json(FrameType.PONG, 1, {}),
        protocol.encode_json(FrameType.HELLO, 1, HELLO),
        protocol.encode_json(FrameType.READY, 1, {"zygote": True}),
        protocol.encode(FrameType.EXEC, 1, b"{}"),
        protocol.encode_json(FrameType.EXIT, 1, GOOD_EXIT | {"exit_code": 300}),
        protocol.encode(FrameType.EXIT, 1, b"not json"),
        protocol.encode(FrameType.EXIT, 1, b"[]"),
        b"garbage!!!!!!!!!!!!!",
    ],
)
async def test_unexpected_or_malformed_frames_are_protocol_errors(frame: bytes) -> None:
    async def script(guest: FakeGuest, exec_frame: Frame) -> None:
        assert exec_frame.request_id == 1
        await guest.send(frame)

    await fails_with(AgentProtocolError, script)


async def test_a_deeply_nested_exit_is_a_protocol_error() -> None:
    async def script(guest: FakeGuest, exec_frame: Frame) -> None:
        await guest.send(protocol.encode(FrameType.EXIT, exec_frame.request_id, b"[" * 10_000))

    await fails_with(AgentProtocolError, script)


async def test_an_error_frame_is_a_vm_error_with_the_guest_message() -> None:
    async def script(guest: FakeGuest, exec_frame: Frame) -> None:
        await guest.send(
            protocol.encode_json(
                FrameType.ERROR, exec_frame.request_id, {"message": "no such interpreter"}
            )
        )

    error = await fails_with(VMError, script)
    assert not isinstance(error, AgentProtocolError)
    assert "no such interpreter" in str(error)


async def test_a_long_error_message_is_cut() -> None:
    async def script(guest: FakeGuest, exec_frame: Frame) -> None:
        await guest.send(
            protocol.encode_json(FrameType.ERROR, exec_frame.request_id, {"message": "x" * 100_000})
        )

    error = await fails_with(VMError, script)
    assert len(str(error)) < 2500


@pytest.mark.parametrize(
    "partial",
    [
        b"",
        protocol.encode(FrameType.STDOUT, 1, b"abc")[:7],
        protocol.encode(FrameType.STDOUT, 1, b"abcdef")[:-2],
    ],
)
async def test_the_guest_closing_the_channel_is_a_vm_error(partial: bytes) -> None:
    async def script(guest: FakeGuest, exec_frame: Frame) -> None:
        await guest.send(partial)
        guest.close()

    error = await fails_with(VMError, script)
    assert not isinstance(error, AgentProtocolError)
    assert "closed" in str(error)


async def test_output_before_the_guest_closes_still_reaches_the_sink() -> None:
    seen: list[tuple[str, bytes]] = []

    async def play(guest: FakeGuest) -> None:
        rid = (await guest.receive()).request_id
        await guest.send(protocol.encode(FrameType.STDOUT, rid, b"partial"))
        guest.close()

    async with connected() as (client, guest):
        player = asyncio.create_task(play(guest))
        with pytest.raises(VMError):
            await client.exec(request(), lambda s, d: seen.append((s, d)))
        await player
    assert seen == [("stdout", b"partial")]


async def test_prepare_snapshot_and_kill() -> None:
    async with connected() as (client, guest):
        await guest.send(protocol.encode_json(FrameType.READY, 0, {"zygote": True}))
        assert await client.prepare_snapshot(5) is True
        assert (await guest.receive()).type == FrameType.PREPARE
        await client.kill(4)
        kill = await guest.receive()
        assert (kill.type, kill.request_id, kill.payload) == (FrameType.KILL, 4, b"{}")
        await guest.send(protocol.encode_json(FrameType.PONG, 0, {}))
        with pytest.raises(AgentProtocolError, match="expected READY"):
            await client.prepare_snapshot(5)


async def test_exec_marks_when_the_request_went_out_and_the_exit_came_back() -> None:
    async with connected() as (client, guest):
        await guest.send(protocol.encode_json(FrameType.EXIT, 1, GOOD_EXIT | {"trace": GOOD_TRACE}))
        marks: dict[str, float] = {}
        before = time.monotonic()
        outcome = await client.exec(request(), lambda s, d: None, marks=marks)
        assert before <= marks["exec_sent"] <= marks["exit_read"] <= time.monotonic()
        assert outcome.trace[0] == ("parsed", 0.4)


async def test_only_a_fresh_start_makes_the_guest_reseed_its_prepared_processes() -> None:
    async with connected() as (client, guest):
        await guest.send(protocol.encode_json(FrameType.HELLO, 0, HELLO))
        await client.handshake(5)
        started = protocol.decode_json((await guest.receive()).payload)
        await guest.send(protocol.encode_json(FrameType.HELLO, 0, HELLO))
        await client.resync(5)
        resumed = protocol.decode_json((await guest.receive()).payload)
    assert started["restored"] is True  # maybe a clone of a state other clones share
    assert resumed["restored"] is False  # the same VM, only stopped
    assert started["seed"] != resumed["seed"]
