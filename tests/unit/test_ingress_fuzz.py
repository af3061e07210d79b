"""Fuzzing the streams the host opens into a guest (exposed ports, terminals), both ends.

The host's ``IngressTunnel`` faces a hostile guest: whatever frames it sends (OPEN, STREAM,
CLOSE, CREDIT for ids never opened, data before OPEN or beyond the window, bad JSON, frame types
only the host may send), the pump keeps running, no stream buffers more than the window, only
ids the host opened are tracked, and an exit code is only ever a shell's (0-255). The guest's
``GuestTunnel`` parses the host's CONNECT, PTY and RESIZE payloads without raising, answering a
bad request with CLOSE ``reset`` (never starting anything: the terminal's side effects are
stopped before the first one, ``ensure_devpts``).
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fission.agent.channel import INGRESS_KEY
from fission.agent.ingress import IngressTunnel
from fission.guest import protocol, terminal
from fission.guest.protocol import Frame, FrameType
from fission.guest.tunnel import GuestTunnel, Stream

WINDOW = protocol.STREAM_WINDOW
OPENED_ID = protocol.INGRESS_BIT | 1  # the first id the host gives out


class FakeChannel:
    """The host's channel: frames from the guest queued for ``next``; what the host sent."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[Frame] = asyncio.Queue()
        self.sent: list[Frame] = []

    def open(self, key: int) -> None:
        assert key == INGRESS_KEY

    def close(self, key: int) -> None:
        pass

    async def next(self, key: int) -> Frame:
        return await self.incoming.get()

    async def send(self, data: bytes) -> None:
        decoder = protocol.FrameDecoder(protocol.MAX_HOST_PAYLOAD)
        self.sent.extend(decoder.feed(data))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
control_payloads = st.one_of(
    st.binary(max_size=64),
    st.dictionaries(
        st.sampled_from(["bytes", "how", "error", "exit_code", "port", "cols", "rows"]),
        json_values,
    ).map(lambda d: json.dumps(d).encode()),
    st.builds(
        lambda how, code: json.dumps({"how": how, "exit_code": code}).encode(),
        st.sampled_from(["eof", "reset", "exit", "other"]),
        st.integers(-(2**40), 2**40) | st.none() | st.text(max_size=3),
    ),
    st.integers(-(2**70), 2**70).map(lambda n: json.dumps({"bytes": n}).encode()),
)
stream_ids = st.one_of(
    st.just(OPENED_ID),
    st.integers(0, 2**32 - 1),
    st.integers(1, 40).map(lambda n: protocol.INGRESS_BIT | n),
)
guest_frames = st.builds(
    Frame,
    st.sampled_from(list(FrameType)),
    stream_ids,
    st.one_of(
        control_payloads,
        st.integers(1, 3).map(lambda n: b"x" * (WINDOW // 2 * n)),  # up to beyond the window
    ),
)


async def drive_host(frames: list[Frame], open_first: bool) -> None:
    channel = FakeChannel()
    ingress = IngressTunnel(channel, max_streams=4)  # type: ignore[arg-type]
    ingress.start()
    stream = None
    if open_first:
        opening = asyncio.create_task(ingress.connect(8000, timeout=5))
        await asyncio.sleep(0)
        await channel.incoming.put(Frame(FrameType.OPEN, OPENED_ID, b"{}"))
        stream = await opening
    for frame in frames:
        await channel.incoming.put(frame)
    for _ in range(len(frames) + 3):
        await asyncio.sleep(0)
    assert ingress._pump is not None and not ingress._pump.done()  # the pump survived
    for stream_id, tracked in ingress.streams.items():
        assert stream_id == OPENED_ID  # only what the host opened
        assert len(tracked._incoming) <= WINDOW
        assert tracked._credit <= WINDOW
        assert tracked.exit_code is None or 0 <= tracked.exit_code <= 255
    if stream is not None:
        assert stream.exit_code is None or 0 <= stream.exit_code <= 255
        data = await asyncio.wait_for(stream.read(), 5) if stream._incoming else b""
        assert len(data) <= protocol.STREAM_CHUNK
    await ingress.aclose()
    assert not ingress.streams


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(guest_frames, max_size=12), open_first=st.booleans())
def test_hostile_guest_frames_never_break_the_host(frames: list[Frame], open_first: bool) -> None:
    asyncio.run(drive_host(frames, open_first))


def test_data_before_open_loses_the_stream() -> None:
    async def scenario() -> None:
        channel = FakeChannel()
        ingress = IngressTunnel(channel, max_streams=4)  # type: ignore[arg-type]
        ingress.start()
        opening = asyncio.create_task(ingress.connect(8000, timeout=5))
        await asyncio.sleep(0)
        await channel.incoming.put(Frame(FrameType.STREAM, OPENED_ID, b"early"))
        with pytest.raises(Exception):  # noqa: B017 - refused or timed out, never opened
            await asyncio.wait_for(opening, 2)
        assert not ingress.streams
        await ingress.aclose()

    asyncio.run(scenario())


# -- the guest's parsing ---------------------------------------------------------------------------


class GuestSide:
    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.sent: list[Frame] = []
        self.tunnel = GuestTunnel(
            self.selector, lambda t, rid, p: self.sent.append(Frame(t, rid, p))
        )

    def close(self) -> None:
        for stream in list(self.tunnel.streams.values()):
            self.tunnel.drop(stream)
        self.selector.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


NO_LISTENER = closed_port()
open_requests = st.one_of(
    st.binary(max_size=64),
    st.dictionaries(
        st.sampled_from(
            ["port", "cols", "rows", "env", "cwd", "memory_bytes", "pids_max", "extra"]
        ),
        json_values | st.just(NO_LISTENER) | st.integers(0, 1001),
    ).map(lambda d: json.dumps(d).encode()),
)


class StopBeforeSideEffects(OSError):
    pass


def no_devpts() -> None:
    raise StopBeforeSideEffects("the fuzz stops a terminal before it mounts or forks anything")


@settings(
    max_examples=200,
    deadline=None,
    # the patch is the same for every example: a terminal never gets past its checks
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    kind=st.sampled_from([FrameType.CONNECT, FrameType.PTY]),
    stream_id=stream_ids,
    payload=open_requests,
)
def test_guest_parses_any_connect_or_pty(
    monkeypatch: pytest.MonkeyPatch, kind: FrameType, stream_id: int, payload: bytes
) -> None:
    monkeypatch.setattr(terminal, "ensure_devpts", no_devpts)
    guest = GuestSide()
    try:
        guest.tunnel.handle(Frame(kind, stream_id, payload))
        if not stream_id & protocol.INGRESS_BIT:
            assert guest.sent == [] and not guest.tunnel.streams  # not an id the host may open
        else:
            assert len(guest.sent) <= 1
            for answer in guest.sent:
                assert answer.request_id == stream_id
                if answer.type == FrameType.CLOSE:
                    assert protocol.decode_json(answer.payload)["how"] == "reset"
                    assert stream_id not in guest.tunnel.streams
            if kind == FrameType.PTY:
                assert not guest.tunnel.streams  # no terminal ever started here
    finally:
        guest.close()


@settings(max_examples=200, deadline=None)
@given(payload=open_requests)
def test_guest_parses_any_resize(payload: bytes) -> None:
    guest = GuestSide()
    master, slave = os.openpty()
    try:
        term = terminal.Terminal(master, 0, "/nonexistent-cgroup", lambda _: None)
        guest.tunnel.streams[OPENED_ID] = Stream(OPENED_ID, term)
        guest.tunnel.handle(Frame(FrameType.RESIZE, OPENED_ID, payload))
        guest.tunnel.handle(Frame(FrameType.RESIZE, OPENED_ID + 1, payload))  # unknown: ignored
        assert OPENED_ID in guest.tunnel.streams and guest.sent == []
    finally:
        guest.tunnel.streams.clear()
        os.close(master)
        os.close(slave)
        guest.close()


def test_a_good_resize_sets_the_size() -> None:
    guest = GuestSide()
    master, slave = os.openpty()
    try:
        term = terminal.Terminal(master, 0, "/nonexistent-cgroup", lambda _: None)
        guest.tunnel.streams[OPENED_ID] = Stream(OPENED_ID, term)
        message: dict[str, Any] = {"cols": 132, "rows": 43}
        guest.tunnel.handle(Frame(FrameType.RESIZE, OPENED_ID, json.dumps(message).encode()))
        assert os.get_terminal_size(slave) == os.terminal_size((132, 43))
    finally:
        guest.tunnel.streams.clear()
        os.close(master)
        os.close(slave)
        guest.close()
