"""One managed sandbox: its record, the live parts behind it (VM, egress, quota slot), and the
gate that lets many operations use it at once or one lifecycle change (pause, resume) alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from fission.agent.client import AgentClient
from fission.auth.quotas import Slot
from fission.core import idle, snapshots
from fission.core.limits import Limits
from fission.core.machines import GUEST_OVERHEAD_MB, Machine
from fission.core.sandbox_spec import SandboxRecord, SandboxState
from fission.errors import SandboxNotFound, SandboxNotRunning
from fission.net.egress import Egress
from fission.vmm.base import VMConfig


class Gate:
    """Many operations on a sandbox at once, or one lifecycle change (pause, resume) alone."""

    def __init__(self) -> None:
        self._condition = asyncio.Condition()
        self._operations = 0
        self._changing = False
        self.quiet_since = time.monotonic()  # when the last operation ended
        # Runs when an operation has entered, before it uses the VM (wakes a stopped one).
        self.on_use: Callable[[], Awaitable[None]] | None = None

    @contextlib.asynccontextmanager
    async def operation(self) -> AsyncIterator[None]:
        """Hold the sandbox in its state (running) while a run or file transfer uses it."""
        async with self._condition:
            await self._condition.wait_for(lambda: not self._changing)
            self._operations += 1
        try:
            if self.on_use is not None:
                await self.on_use()
            yield
        finally:
            async with self._condition:
                self._operations -= 1
                self.quiet_since = time.monotonic()
                self._condition.notify_all()

    def quiet_for(self, now: float) -> float:
        """Seconds since the last operation ended; 0 while one runs or the state changes."""
        if self._operations or self._changing:
            return 0.0
        return now - self.quiet_since

    @contextlib.asynccontextmanager
    async def change(self) -> AsyncIterator[None]:
        """Wait until no operation runs, then change the sandbox's state alone."""
        async with self._condition:
            await self._condition.wait_for(lambda: not self._changing and not self._operations)
            self._changing = True
        try:
            yield
        finally:
            async with self._condition:
                self._changing = False
                self._condition.notify_all()


@dataclass
class ManagedSandbox:
    """A sandbox's record and the live parts behind it."""

    record: SandboxRecord
    directory: Path
    reserved_mb: int
    slot: Slot | None = None
    machine: Machine | None = None
    config: VMConfig | None = None
    egress: Egress | None = None
    gate: Gate = field(default_factory=lambda: Gate())
    idle: idle.IdleState = field(default_factory=lambda: idle.IdleState(None))
    timing_out: bool = False  # being paused because its ttl ran out (on_timeout "pause")

    @property
    def agent(self) -> AgentClient:
        """The agent of the running VM; SandboxNotRunning when paused or gone."""
        if self.machine is None or self.record.state != SandboxState.RUNNING:
            raise not_running(self.record)
        return self.machine.agent


def not_running(record: SandboxRecord) -> SandboxNotRunning:
    """The error for using a sandbox that does not run, saying what to do."""
    if record.state == SandboxState.PAUSED:
        return SandboxNotRunning(f"sandbox {record.id} is paused: resume it first")
    if record.state == SandboxState.LOST:
        return SandboxNotRunning(
            f"sandbox {record.id} is lost ({record.lost_reason}): delete it and create another"
        )
    return SandboxNotRunning(f"sandbox {record.id} is {record.state.value}")


def vm_memory_mb(limits: Limits) -> int:
    """Guest RAM a sandbox with ``limits`` reserves while it runs."""
    if snapshots.fits(limits):
        return snapshots.TEMPLATE_CAPACITY_MB + GUEST_OVERHEAD_MB
    return limits.memory_mb + GUEST_OVERHEAD_MB


def is_gone(box: ManagedSandbox) -> bool:
    """Whether the sandbox was deleted (or expired) while a call was using it."""
    return box.record.state == SandboxState.DELETED


def gone(box: ManagedSandbox) -> SandboxNotFound:
    """The error for a sandbox deleted while a call was using it."""
    return SandboxNotFound(f"sandbox {box.record.id} was deleted or expired")


async def detach(box: ManagedSandbox) -> None:
    """Close the sandbox's egress proxy, if any (before its VM goes)."""
    egress, box.egress = box.egress, None
    if egress is not None:
        await egress.aclose()
