"""The wait helper: it returns the check's answer, gives up at its deadline and never oversleeps."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fission.waiting import WaitTimeout, refused, retry, wait_for, wait_until


class FakeTime:
    """A clock and a sleep that only move the clock, recording each sleep."""

    def __init__(self) -> None:
        self.now = 50.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_returns_the_first_truthy_answer() -> None:
    fake = FakeTime()
    answers = iter([None, 0, "", "ready", "later"])
    found = wait_until(
        lambda: next(answers),
        timeout=1.0,
        interval=0.1,
        what="x",
        setting="S",
        clock=fake.clock,
        sleep=fake.sleep,
    )
    assert found == "ready"
    assert fake.sleeps == [0.1, 0.1, 0.1]


def test_no_sleep_when_the_first_check_passes() -> None:
    fake = FakeTime()
    assert wait_until(lambda: True, timeout=0, interval=1, what="x", setting="S", sleep=fake.sleep)
    assert fake.sleeps == []


def test_gives_up_at_the_deadline_without_sleeping_past_it() -> None:
    fake = FakeTime()
    checks: list[float] = []

    def never() -> bool:
        checks.append(fake.now)
        return False

    with pytest.raises(WaitTimeout) as caught:
        wait_until(
            never,
            timeout=1.0,
            interval=0.3,
            what="the moon",
            setting="MOON_WAIT",
            clock=fake.clock,
            sleep=fake.sleep,
        )
    assert fake.sleeps == pytest.approx([0.3, 0.3, 0.3, 0.1])  # the last one cut to the deadline
    assert fake.now == pytest.approx(51.0)
    assert checks[-1] == pytest.approx(51.0)  # one last look at the deadline itself
    error = caught.value
    assert isinstance(error, TimeoutError)
    assert (error.what, error.timeout, error.setting) == ("the moon", 1.0, "MOON_WAIT")
    assert "the moon" in str(error) and "MOON_WAIT" in str(error) and "1 s" in str(error)


@given(
    timeout=st.floats(0, 100, allow_nan=False),
    interval=st.floats(0.001, 50, allow_nan=False),
)
def test_total_sleep_never_exceeds_the_timeout(timeout: float, interval: float) -> None:
    fake = FakeTime()
    with pytest.raises(WaitTimeout):
        wait_until(
            lambda: False,
            timeout=timeout,
            interval=interval,
            what="x",
            setting="S",
            clock=fake.clock,
            sleep=fake.sleep,
        )
    assert all(0 < s <= interval for s in fake.sleeps)
    assert sum(fake.sleeps) == pytest.approx(timeout)


def test_a_check_that_raises_ends_the_wait() -> None:
    fake = FakeTime()

    def died() -> bool:
        raise ProcessLookupError("gone")

    with pytest.raises(ProcessLookupError):
        wait_until(died, timeout=5, interval=1, what="x", setting="S", sleep=fake.sleep)
    assert fake.sleeps == []


@pytest.mark.parametrize(("timeout", "interval"), [(-1.0, 0.1), (1.0, 0.0), (1.0, -1.0)])
def test_nonsense_arguments_are_a_bug(timeout: float, interval: float) -> None:
    with pytest.raises(ValueError):
        wait_until(lambda: True, timeout=timeout, interval=interval, what="x", setting="S")


async def test_async_wait_returns_the_answer() -> None:
    calls = 0

    async def third_time() -> int:
        nonlocal calls
        calls += 1
        return calls if calls == 3 else 0

    assert await wait_for(third_time, timeout=5, interval=0.001, what="x", setting="S") == 3


async def test_async_wait_ends_at_its_deadline_not_at_the_next_interval() -> None:
    async def never() -> bool:
        return False

    started = time.monotonic()
    with pytest.raises(WaitTimeout, match="SOME_SETTING"):
        await wait_for(never, timeout=0.05, interval=30, what="x", setting="SOME_SETTING")
    assert 0.04 <= time.monotonic() - started < 2.0


async def test_async_deadline_bounds_a_check_that_hangs() -> None:
    async def hangs() -> bool:
        await asyncio.sleep(3600)
        return True

    started = time.monotonic()
    with pytest.raises(WaitTimeout):
        await wait_for(hangs, timeout=0.05, interval=0.01, what="x", setting="S")
    assert time.monotonic() - started < 2.0


async def test_a_checks_own_timeout_is_not_mistaken_for_the_deadline() -> None:
    async def times_out() -> bool:
        raise TimeoutError("the check's own")

    with pytest.raises(TimeoutError, match="the check's own") as caught:
        await wait_for(times_out, timeout=5, interval=0.01, what="x", setting="S")
    assert not isinstance(caught.value, WaitTimeout)


async def test_retry_until_the_socket_listens() -> None:
    attempts = 0

    async def connect() -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise ConnectionRefusedError("not yet")
        return "connected"

    found = await retry(connect, retry_on=refused, timeout=5, interval=0.001, what="x", setting="S")
    assert (found, attempts) == ("connected", 3)


async def test_retry_returns_a_falsy_result_too() -> None:
    async def empty() -> int:
        return 0

    assert (
        await retry(empty, retry_on=refused, timeout=1, interval=0.01, what="x", setting="S") == 0
    )


async def test_retry_passes_other_errors_at_once() -> None:
    attempts = 0

    async def missing() -> None:
        nonlocal attempts
        attempts += 1
        raise FileNotFoundError("no socket")

    with pytest.raises(FileNotFoundError):
        await retry(missing, retry_on=refused, timeout=5, interval=0.001, what="x", setting="S")
    assert attempts == 1


async def test_retry_gives_up_with_the_last_refusal_as_cause() -> None:
    async def always_refused() -> None:
        raise ConnectionRefusedError("still refused")

    with pytest.raises(WaitTimeout, match="the agent socket") as caught:
        await retry(
            always_refused,
            retry_on=refused,
            timeout=0.05,
            interval=0.01,
            what="the agent socket",
            setting="S",
        )
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)


def test_refused_sees_through_a_wrapping_error() -> None:
    wrapped = RuntimeError("connect failed")
    wrapped.__cause__ = ConnectionRefusedError()
    assert refused(wrapped) and refused(ConnectionRefusedError())
    assert not refused(RuntimeError()) and not refused(ConnectionResetError())
