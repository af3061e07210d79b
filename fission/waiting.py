"""Waiting with a deadline: the one helper for "poll until ready" and "retry while refused".

``wait_until`` (blocking, for threads) and ``await wait_for`` (the event loop) call a check every
``interval`` seconds until it returns something truthy, which they return. Once ``timeout``
seconds have passed they raise ``WaitTimeout``, naming what was awaited and the setting that
bounds it. Neither sleeps past its deadline: ``wait_until`` cuts its last sleep to the time left
and checks once more at the deadline; ``wait_for``'s deadline bounds the whole wait, the check's
own awaits included. ``retry`` calls an operation again after the errors its caller names as
passing (a Unix socket that exists but does not listen yet refuses connections).

A check may raise to end the wait at once (the process it waits for died, say); that error
reaches the caller unchanged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    """A wait reached its deadline; ``what`` was awaited, ``setting`` bounds it.

    A ``TimeoutError``, so code that bounded the same wait with ``asyncio.timeout`` before
    catches it unchanged.
    """

    def __init__(self, what: str, timeout: float, setting: str) -> None:
        super().__init__(f"gave up waiting for {what} after {timeout:g} s (set by {setting})")
        self.what = what
        self.timeout = timeout
        self.setting = setting


def _check_arguments(timeout: float, interval: float) -> None:
    if timeout < 0 or interval <= 0:
        raise ValueError(f"need timeout >= 0 and interval > 0, got {timeout} and {interval}")


def wait_until(
    check: Callable[[], T],
    *,
    timeout: float,
    interval: float,
    what: str,
    setting: str,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] = time.sleep,
) -> T:
    """Call ``check`` until it returns a truthy value and return it; WaitTimeout at the deadline.

    Blocking: for threads and synchronous code. ``clock`` and ``sleep`` are injectable for
    tests. A check that blocks is not interrupted; the deadline is checked between calls.
    """
    _check_arguments(timeout, interval)
    deadline = clock() + timeout
    while True:
        result = check()
        if result:
            return result
        left = deadline - clock()
        if left <= 0:
            raise WaitTimeout(what, timeout, setting)
        sleep(min(interval, left))


async def wait_for(
    check: Callable[[], Awaitable[T]],
    *,
    timeout: float,
    interval: float,
    what: str,
    setting: str,
) -> T:
    """Await ``check`` until it returns something truthy and return it; WaitTimeout at the deadline.

    The whole wait, the check's own awaits included, is bounded by ``timeout``.
    """
    _check_arguments(timeout, interval)
    bound = asyncio.timeout(timeout)
    try:
        async with bound:
            while True:
                result = await check()
                if result:
                    return result
                await asyncio.sleep(interval)  # cut short by the deadline
    except TimeoutError:
        if bound.expired():
            raise WaitTimeout(what, timeout, setting) from None
        raise  # the check's own timeout, not ours


async def retry(
    attempt: Callable[[], Awaitable[T]],
    *,
    retry_on: Callable[[Exception], bool],
    timeout: float,
    interval: float,
    what: str,
    setting: str,
) -> T:
    """Await ``attempt`` until it returns, again after each error ``retry_on`` accepts.

    Other errors reach the caller at once; at the deadline, WaitTimeout caused by the last
    accepted error.
    """
    last: Exception | None = None

    async def once() -> tuple[T] | None:
        nonlocal last
        try:
            return (await attempt(),)  # a tuple: a falsy result is still a result
        except Exception as exc:
            if not retry_on(exc):
                raise
            last = exc
            return None

    result: tuple[T] | None
    try:
        result = await wait_for(
            once, timeout=timeout, interval=interval, what=what, setting=setting
        )
    except WaitTimeout as exc:
        exc.__cause__ = last
        raise
    assert result is not None  # wait_for returns only a truthy result
    return result[0]


def refused(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was caused by, a refused connection (libraries wrap the OSError)."""
    return isinstance(exc, ConnectionRefusedError) or isinstance(
        exc.__cause__, ConnectionRefusedError
    )
