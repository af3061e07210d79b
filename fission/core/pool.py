"""Warm pools: per language, VMs restored from the snapshot and warmed, each used for one run.

A pool keeps ``size`` machines ready and refills in the background as runs take them. Every
machine, ready or in use, holds a reservation in the shared ``MemoryBudget`` (its full guest
RAM: what it could use at worst), so the daemon never starts more VMs than the budget allows.
``acquire`` waits up to its deadline for a ready machine and then fails with ``Busy``, naming
the setting to raise.

Refills yield to runs: restoring a clone takes a whole CPU for a moment, and a run that shares
the host's cores with one is slower by as much. So while ready machines remain, a refill waits
until the runs in flight end, or ``REFILL_HOLD`` seconds at most, so sustained load still refills.

A machine waiting in the pool costs no CPU: once restored (and warmed) its vCPUs are stopped
(``idle.park``) and ``acquire`` wakes it, which also sets its wall clock (2-3 ms in all).

Warming a clone (``warm``: a warm-up run, so that the first real run finds QEMU's translation
cache full) pays off while the pool is idle: the run then takes about 70 ms instead of 250 under
TCG. Once runs queue up it does not: a restored clone is ready after about 0.1 CPU-s, a warmed
one after 0.4, and in all a clone with its run costs 0.5 CPU-s warmed against 0.37 unwarmed
(measured on 2 cores, bench/bench_vmcost.py). So while acquirers wait that no ready machine
serves, a restored clone goes to them without its warm-up (``stats.unwarmed``): with 8 clients
on 2 cores that made 3.6 fresh VMs/s instead of 2.9.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fission.core import idle
from fission.core.machines import Machine
from fission.core.telemetry import POOL_REFILL, Telemetry
from fission.errors import Busy

log = logging.getLogger("fission.pool")
REFILL_CONCURRENCY = 2
RETRY_DELAY = 2.0
REFILL_HOLD = 0.3


@dataclass
class MemoryBudget:
    """Megabytes of guest RAM the daemon may have reserved at once."""

    total_mb: int
    used_mb: int = 0

    def reserve(self, mb: int) -> bool:
        """Take ``mb`` if it fits; False otherwise."""
        if self.used_mb + mb > self.total_mb:
            return False
        self.used_mb += mb
        return True

    def release(self, mb: int) -> None:
        """Give back ``mb``."""
        self.used_mb = max(0, self.used_mb - mb)


@dataclass
class PoolStats:
    """Counters a pool reports in its status."""

    created: int = 0
    served: int = 0
    failed: int = 0
    busy: int = 0
    unwarmed: int = 0
    last_error: str = ""
    restore_ms: deque[float] = field(default_factory=lambda: deque(maxlen=50))


class WarmPool:
    """Ready machines of one language, their vCPUs stopped until a run takes one."""

    def __init__(
        self,
        language: str,
        size: int,
        budget: MemoryBudget,
        vm_mb: int,
        factory: Callable[[], Awaitable[Machine]],
        on_retire: Callable[[Machine], Awaitable[None]] | None = None,
        warm: Callable[[Machine], Awaitable[None]] | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.language = language
        self.size = size
        self.budget = budget
        self.vm_mb = vm_mb
        self._factory = factory
        self._on_retire = on_retire
        self._warm = warm
        self._telemetry = telemetry
        self._ready: deque[Machine] = deque()
        self._starting = 0
        self._in_use = 0
        self._waiting = 0
        self._changed = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._hold_until = 0.0
        self.stats = PoolStats()

    def start(self) -> None:
        """Begin filling the pool in the background."""
        self._filler = asyncio.create_task(self._fill_loop(), name=f"pool-{self.language}")

    async def _fill_loop(self) -> None:
        while not self._closed:
            hold = self._hold_until - time.monotonic()
            if hold > 0 and self._ready and self._in_use:
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(hold):
                        await self._changed.wait()
                continue
            while (
                len(self._ready) + self._starting < self.size
                and self._starting < REFILL_CONCURRENCY
                and self.budget.reserve(self.vm_mb)
            ):
                self._starting += 1
                task = asyncio.create_task(self._add_one())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            self._changed.clear()
            await self._changed.wait()

    def _queued(self) -> bool:
        """Whether acquirers wait that the ready machines do not serve."""
        return self._waiting > len(self._ready)

    async def _add_one(self) -> None:
        started = time.monotonic()
        try:
            try:
                machine = await self._factory()
            except Exception as exc:
                self._failed(exc)
                self.budget.release(self.vm_mb)
                await asyncio.sleep(RETRY_DELAY)
                return
            try:
                await self._make_ready(machine)
            except BaseException as exc:
                await self._retire(machine)
                if not isinstance(exc, Exception):
                    raise
                self._failed(exc)
                await asyncio.sleep(RETRY_DELAY)
                return
            self.stats.created += 1
            elapsed = time.monotonic() - started
            self.stats.restore_ms.append(elapsed * 1000)
            if self._telemetry is not None:
                self._telemetry.emit(POOL_REFILL, elapsed, language=self.language)
            if self._closed:
                await self._retire(machine)
            else:
                self._ready.append(machine)
        finally:
            self._starting -= 1
            self._changed.set()

    async def _make_ready(self, machine: Machine) -> None:
        """Warm a restored clone unless runs are queued for it, then stop its vCPUs."""
        if self._warm is not None:
            if self._queued():
                self.stats.unwarmed += 1
            else:
                await self._warm(machine)
        await idle.park(machine)

    def _failed(self, exc: Exception) -> None:
        self.stats.failed += 1
        self.stats.last_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("could not add a %s VM to the pool: %s", self.language, exc)

    async def acquire(self, timeout: float) -> Machine:
        """A ready machine, running, waiting up to ``timeout`` seconds; Busy after that."""
        deadline = time.monotonic() + timeout
        while True:
            machine = await self._next_ready(deadline, timeout)
            self._in_use += 1
            try:
                await idle.wake(machine)
            except Exception as exc:  # it died while it waited: drop it and take the next
                log.warning("a pooled %s VM did not wake: %s", self.language, exc)
                self._failed(exc)
                await self.release(machine)
                continue
            except BaseException:
                await self.release(machine)
                raise
            break
        self.stats.served += 1
        now = time.monotonic()
        if self._hold_until < now:  # a hold never extends itself: load cannot starve refills
            self._hold_until = now + REFILL_HOLD
        self._changed.set()  # the filler replaces it once the hold ends
        return machine

    async def _next_ready(self, deadline: float, timeout: float) -> Machine:
        """Take the oldest ready machine, waiting for one until ``deadline``; Busy after it."""
        self._waiting += 1
        try:
            while not self._ready:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    self.stats.busy += 1
                    raise Busy(
                        f"no warm {self.language} VM became free within {timeout:g} s: raise "
                        f"the pool size (--pool {self.language}=N) or the memory budget "
                        f"(--memory-budget), or wait longer (--acquire-timeout)"
                    )
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._changed.wait()
            return self._ready.popleft()
        finally:
            self._waiting -= 1

    async def release(self, machine: Machine) -> None:
        """Destroy a machine that served its run and give its memory back."""
        self._in_use -= 1
        if not self._in_use:
            self._hold_until = 0.0
        self._changed.set()
        await self._retire(machine)
        self._changed.set()

    async def _retire(self, machine: Machine) -> None:
        try:
            await machine.destroy()
            if self._on_retire is not None:
                await self._on_retire(machine)
        finally:
            self.budget.release(self.vm_mb)

    def waiting_machines(self) -> list[Machine]:
        """The machines ready in the pool, their vCPUs stopped (for diagnostics and tests)."""
        return list(self._ready)

    def status(self) -> dict[str, Any]:
        """A JSON-ready picture of the pool."""
        restore = sorted(self.stats.restore_ms)
        return {
            "language": self.language,
            "size": self.size,
            "ready": len(self._ready),
            "starting": self._starting,
            "in_use": self._in_use,
            "created": self.stats.created,
            "served": self.stats.served,
            "failed": self.stats.failed,
            "busy": self.stats.busy,
            "unwarmed": self.stats.unwarmed,
            "last_error": self.stats.last_error,
            "median_ready_ms": round(restore[len(restore) // 2], 1) if restore else None,
        }

    async def close(self) -> None:
        """Stop filling and destroy every ready machine (machines in use are the caller's)."""
        self._closed = True
        self._changed.set()
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filler
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._ready:
            await self._retire(self._ready.popleft())
