"""How long sandboxes live: ttl expiry, paused and lost retention, idle vCPU stops, and what a
stopping daemon does with its sandboxes (``on_stop``).

A running sandbox whose ttl runs out is deleted, or paused with ``on_timeout="pause"``. A
paused (or lost) one is kept ``paused_retention`` seconds, then deleted. A running sandbox with
nothing in flight for ``idle_stop_after`` seconds has its vCPUs stopped. On daemon stop,
running sandboxes are kept running (``keep``: their VMs live on, catalogued), paused
(``pause``) or deleted (``delete``, and always without ``durable``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from fission.core.managed_sandbox import ManagedSandbox
from fission.core.sandbox_spec import SandboxState
from fission.errors import FissionError

if TYPE_CHECKING:
    from fission.core.sandboxes import SandboxManager

log = logging.getLogger("fission.sandboxes")
ON_STOP = ("keep", "pause", "delete")  # what a stopping daemon does with running sandboxes
PAUSED_RETENTION = 7 * 24 * 3600.0  # seconds a paused (or lost) sandbox is kept
EXPIRY_INTERVAL = 0.5


class SandboxLifetimes:
    """The expiry loop of one ``SandboxManager`` and its shutdown per ``on_stop``."""

    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager
        self._expiry: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin expiring sandboxes whose ttl ran out."""
        self._expiry = asyncio.create_task(self._expire_loop(), name="sandbox-expiry")

    async def close(self) -> None:
        """Daemon shutdown: per ``on_stop``, leave running sandboxes running (``keep``: their
        VMs live on, catalogued), save them to disk (``pause``), or destroy every sandbox."""
        manager = self.manager
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        await asyncio.gather(*manager._tasks, return_exceptions=True)
        boxes = list(manager._sandboxes.values())
        if manager.on_stop == "delete":
            await asyncio.gather(
                *(manager._destroy(box, "shutdown") for box in boxes), return_exceptions=True
            )
        else:
            if manager.on_stop == "pause":
                running = [b for b in boxes if b.record.state == SandboxState.RUNNING]
                await asyncio.gather(
                    *(manager.pause(box.record.id) for box in running), return_exceptions=True
                )
            await asyncio.gather(*(self._let_go(box) for box in boxes), return_exceptions=True)
        if manager.catalog is not None:
            manager.catalog.close()

    async def _let_go(self, box: ManagedSandbox) -> None:
        """Stop managing a sandbox and leave its VM running (its catalog row says how to find
        it again); its files, cgroups and uid stay as they are."""
        self.manager._sandboxes.pop(box.record.id, None)
        machine, box.machine = box.machine, None
        await self.manager._detach(box)
        if machine is not None:
            await machine.agent.close()

    async def _expire_loop(self) -> None:
        manager = self.manager
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL)
            now = manager._clock()
            for box in list(manager._sandboxes.values()):
                record = box.record
                if record.expires_at <= now and record.state == SandboxState.RUNNING:
                    log.info(
                        "sandbox %s expired (on_timeout %s)", record.id, record.spec.on_timeout
                    )
                    if record.spec.on_timeout == "pause":
                        manager._background(self._pause_quietly(box))
                    else:
                        log.info("sandbox %s expired", record.id)
                        await manager._destroy(box, "expired")
                elif record.expires_at <= now:  # paused or lost: its retention has ended
                    log.info("sandbox %s (%s) expired", record.id, record.state.value)
                    await manager._destroy(box, "retention ended")
                elif box.machine is not None and record.state == SandboxState.RUNNING:
                    streams = len(box.egress.tunnel.streams) if box.egress is not None else 0
                    streams += manager.ports.stream_count(record.id)
                    quiet = 0.0 if streams else box.gate.quiet_for(time.monotonic())
                    if box.idle.due(box.machine.vm, quiet):
                        manager._background(self._stop_idle(box))

    async def _pause_quietly(self, box: ManagedSandbox) -> None:
        """Pause a sandbox whose ttl ran out (``on_timeout="pause"``); a failure is logged (the
        sandbox is then deleted, as a failed pause always does)."""
        try:
            await self.manager.pause(box.record.id)
        except FissionError as exc:
            log.warning("sandbox %s: pausing at its ttl failed: %s", box.record.id, exc)
        finally:
            box.timing_out = False

    async def _stop_idle(self, box: ManagedSandbox) -> None:
        """Stop an idle sandbox's vCPUs unless a call came in meanwhile."""
        async with box.gate.change():
            if box.machine is not None and box.record.state == SandboxState.RUNNING:
                await box.idle.stop(box.machine, time.monotonic() - box.gate.quiet_since)
