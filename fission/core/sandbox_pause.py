"""Pausing a sandbox (its VM saved to disk, its memory given back) and resuming it.

A pause waits until nothing is in flight, wakes an idle-stopped VM (the agent syncs the guest's
disks before the save), saves the guest's whole state next to its disk and seals both
(``integrity``); a failed pause deletes the sandbox. A resume checks the seal before any VM
starts (a changed file is refused and the sandbox stays paused), restores the state with a
fresh clock, and restarts the ttl; a paused sandbox is kept ``paused_retention`` seconds.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from fission.auth.audit_log import outcome_of_error
from fission.core import idle, integrity, sandbox_vm
from fission.core.managed_sandbox import ManagedSandbox, gone, not_running
from fission.core.sandbox_spec import SandboxRecord, SandboxState
from fission.vmm.base import DISK_NAME, STATE_NAME

if TYPE_CHECKING:
    from fission.core.sandboxes import SandboxManager


async def pause(manager: SandboxManager, box: ManagedSandbox) -> SandboxRecord:
    """Save the sandbox to disk and stop its VM; its memory goes back to the budget."""
    started = time.monotonic()
    async with box.gate.change():
        if box.record.state == SandboxState.PAUSED:
            return box.record
        if box.record.state == SandboxState.LOST:
            raise not_running(box.record)
        machine = box.machine
        if machine is None:
            raise gone(box)
        await manager._wake(box)  # the agent syncs the guest's disks before the save
        box.machine = None
        manager._forget_vm(machine)
        await manager._detach(box)
        try:
            await sandbox_vm.pause_vm(machine, box.directory)
            await asyncio.to_thread(integrity.seal, box.directory, (STATE_NAME, DISK_NAME))
        except BaseException as exc:
            await manager._audit(
                box.record.owner,
                "sandbox.pause",
                box.record.spec,
                outcome_of_error(exc),
                started,
                {"sandbox": box.record.id},
            )
            await manager._destroy(box, "pause failed")
            raise
        box.record.state = SandboxState.PAUSED
        retention = await manager.retention_of(box.record.owner)
        box.record.expires_at = manager._clock() + retention
        manager.budget.release(box.reserved_mb)
        manager._save(box)
    await manager._audit(
        box.record.owner,
        "sandbox.pause",
        box.record.spec,
        "ok",
        started,
        {"sandbox": box.record.id},
    )
    return box.record


async def resume(manager: SandboxManager, box: ManagedSandbox) -> SandboxRecord:
    """Start a paused sandbox again from its saved state, with its files as they were."""
    started = time.monotonic()
    async with box.gate.change():
        if box.record.state == SandboxState.RUNNING:
            return box.record
        if box.record.state == SandboxState.LOST:
            raise not_running(box.record)
        if box.config is None:
            raise gone(box)
        manager._reserve(box.reserved_mb)
        try:
            # a changed or truncated file is refused before a VM starts: still paused
            what = f"sandbox {box.record.id}'s saved state"
            await asyncio.to_thread(integrity.verify, box.directory, None, what)
            machine, config = await sandbox_vm.resume_vm(manager.driver, box.config, box.directory)
            try:
                box.egress = await manager._attach(box, machine)
            except BaseException:
                await machine.destroy()
                raise
        except BaseException as exc:
            manager.budget.release(box.reserved_mb)
            await manager._audit(
                box.record.owner,
                "sandbox.resume",
                box.record.spec,
                outcome_of_error(exc),
                started,
                {"sandbox": box.record.id},
            )
            raise
        manager._journal_vm(machine)
        box.machine, box.config = machine, config
        box.idle = idle.IdleState(manager.idle_stop_after)
        box.record.state = SandboxState.RUNNING
        box.record.expires_at = manager._clock() + box.record.spec.ttl
        manager._save(box)
    await manager._audit(
        box.record.owner,
        "sandbox.resume",
        box.record.spec,
        "ok",
        started,
        {"sandbox": box.record.id},
    )
    return box.record
