"""Idle VMs cost no CPU: their vCPUs are stopped (QMP ``stop``) until something uses them again.

Under TCG an idle guest still costs 0.5-2 % of a core (its timer ticks and housekeeping, each
emulated): 150 idle sandboxes kept most of a core busy doing nothing (bench/bench_vmcost.py).
Two kinds of VM wait:

* a pooled clone, stopped once it is warm (``park``) and woken when a run takes it (``wake``);
* a sandbox's VM, stopped after ``SANDBOX_IDLE_STOP`` seconds with no run, command or file call
  in flight and no egress stream open (``IdleState``, driven by the sandbox manager), and woken
  before its next call. A VM that keeps using CPU while no call is in flight (a context's kernel
  working in a background thread) is left running.

The guest's clocks stand still while its vCPUs are stopped (QEMU stops the guest's TSC with
them), so ``wake`` sends the wall clock again, with a fresh random seed, before anything runs:
the guest's wall clock is right, and its monotonic clock leaves out the stopped time, as after a
suspend.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from fission.errors import FissionError
from fission.vmm.base import Machine, VirtualMachine

log = logging.getLogger("fission.idle")
__all__ = [
    "BUSY_CPU_SHARE",
    "RESYNC_TIMEOUT",
    "SANDBOX_IDLE_STOP",
    "IdleState",
    "park",
    "wake",
]

# Seconds a sandbox waits with nothing in flight before its vCPUs are stopped: long enough for
# the next step of a script or an agent that runs calls back to back, short next to a person's
# or a model's thinking time. Stopping takes about 1 ms, waking (with the clock) 2-3 ms: a call
# on a stopped sandbox took about 6 ms longer than on a running one.
SANDBOX_IDLE_STOP = 2.0
# A VM using more than this share of a core with no call in flight is doing background work of
# its own (an idle guest uses 0.5-2 %): it is not stopped.
BUSY_CPU_SHARE = 0.15
RESYNC_TIMEOUT = 10.0


async def park(machine: Machine) -> None:
    """Stop a machine's vCPUs: until ``wake`` it uses no CPU."""
    await machine.vm.pause()


async def wake(machine: Machine) -> None:
    """Let a parked machine run again and set its wall clock (and a fresh seed) before use.

    The clock goes out with the ``cont``, not after it: the guest reads it first thing when it
    runs again, and one round trip is saved.
    """
    resync = asyncio.ensure_future(machine.agent.resync(RESYNC_TIMEOUT))
    try:
        await machine.vm.resume()
    except BaseException:
        resync.cancel()
        await asyncio.gather(resync, return_exceptions=True)
        raise
    await resync


@dataclass
class IdleState:
    """One sandbox VM's idleness: whether its vCPUs are stopped, and its last CPU reading.

    ``after``: seconds with nothing in flight before the vCPUs stop (None: never).
    """

    after: float | None
    stopped: bool = False
    stopping: bool = False  # a stop is under way
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # (monotonic time, the VMM's CPU seconds) when the VM was last looked at while idle.
    cpu_mark: tuple[float, float] | None = None

    def due(self, vm: VirtualMachine, quiet: float, now: float | None = None) -> bool:
        """Whether to stop ``vm`` now, nothing having been in flight for ``quiet`` seconds.

        Looked at periodically: a VM whose own CPU use stays above ``BUSY_CPU_SHARE`` between
        two looks is working alone and keeps running. True also marks a stop as under way.
        """
        if self.after is None or self.stopped or self.stopping:
            return False
        if quiet < self.after:
            self.cpu_mark = None  # measure the VM's own CPU use from the quiet period on
            return False
        if self.working_alone(vm, now) is not False:
            return False
        self.stopping = True
        return True

    async def stop(self, machine: Machine, quiet: float) -> None:
        """Stop ``machine``'s vCPUs if still quiet for ``after`` seconds (nothing may start
        meanwhile: the caller holds the sandbox's gate); a VM gone meanwhile is left alone."""
        try:
            async with self.lock:
                if not self.stopped and self.after is not None and quiet >= self.after:
                    await park(machine)
                    self.stopped = True
        except FissionError as exc:  # the VM went away: its next call says so
            log.info("could not stop idle VM %s: %s", machine.vm.config.vm_id, exc)
        finally:
            self.stopping = False

    async def wake(self, machine: Machine) -> None:
        """Wake ``machine`` if it was stopped for idleness (once, whoever asks at the same time)."""
        if not self.stopped:
            return
        async with self.lock:
            if self.stopped:
                await wake(machine)
                self.stopped = False
                self.cpu_mark = None

    def working_alone(self, vm: VirtualMachine, now: float | None = None) -> bool | None:
        """Whether ``vm`` used more than ``BUSY_CPU_SHARE`` of a core since the last look.

        None on the first look: there is nothing to compare yet, so the caller waits for the
        next one. False when the driver cannot tell.
        """
        now = time.monotonic() if now is None else now
        used = vm.cpu_seconds()
        if used is None:
            return False
        mark, self.cpu_mark = self.cpu_mark, (now, used)
        if mark is None or now <= mark[0]:
            return None
        return (used - mark[1]) / (now - mark[0]) > BUSY_CPU_SHARE
