"""The host's throttle on what a guest sends: frames and bytes per second."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fission.agent.throttle import Throttle


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_then_frames_wait_their_turn() -> None:
    clock = Clock()
    throttle = Throttle(frames_per_second=100, frame_burst=10, clock=clock)
    assert [throttle.delay(0) for _ in range(10)] == [0.0] * 10
    assert throttle.delay(0) == pytest.approx(0.01)
    assert throttle.delay(0) == pytest.approx(0.02)
    clock.now += 1.0  # a quiet second refills the bucket (up to the burst)
    assert throttle.delay(0) == 0.0


def test_bytes_are_limited_too() -> None:
    clock = Clock()
    throttle = Throttle(bytes_per_second=1000, byte_burst=1000, clock=clock)
    assert throttle.delay(1000) == 0.0
    assert throttle.delay(500) == pytest.approx(0.5)


def test_a_flood_is_held_to_the_rate_over_time() -> None:
    clock = Clock()
    throttle = Throttle(frames_per_second=1000, frame_burst=100, clock=clock)
    for _ in range(10_000):
        clock.now += throttle.delay(10)  # the reader sleeps as told
    assert clock.now - 100.0 == pytest.approx((10_000 - 100) / 1000, rel=0.01)


@given(st.lists(st.tuples(st.floats(0, 2), st.integers(0, 1 << 20)), max_size=200))
def test_delays_are_finite_and_never_negative(steps: list[tuple[float, int]]) -> None:
    clock = Clock()
    throttle = Throttle(clock=clock)
    for gap, size in steps:
        clock.now += gap
        delay = throttle.delay(size)
        assert 0.0 <= delay < 60


async def test_the_channel_reads_a_flood_no_faster_than_its_throttle() -> None:
    import asyncio
    import socket
    import time

    from fission.agent.channel import Channel
    from fission.guest import protocol

    host, guest = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=host)
    channel = Channel(reader, writer, Throttle(frames_per_second=200, frame_burst=10))
    channel.open(1)
    guest.sendall(b"".join(protocol.encode(protocol.FrameType.STDOUT, 1, b"x") for _ in range(60)))
    started = time.monotonic()
    frames = [await channel.next(1) for _ in range(60)]
    elapsed = time.monotonic() - started
    assert [f.payload for f in frames] == [b"x"] * 60
    assert elapsed >= (60 - 10 - 1) / 200 * 0.9  # the burst passes, the rest at 200 frames/s
    await channel.aclose()
    guest.close()
