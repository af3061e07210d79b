"""A restarted daemon takes back the sandboxes its catalog names.

For each catalogued sandbox: a running one is re-attached (``Driver.attach``: its control
socket and agent re-opened, its clock set; the guest keeps everything it had), or, if its VM
ended while no daemon managed it (or its agent no longer answers), it becomes ``lost`` with the
reason; a paused one is loaded again if its saved state and disk are still there, else
``lost``; a lost one stays listed. The memory budget and the owners' quota slots are taken
again for what was restored (a restored sandbox is never refused: the budget may run over
until some go). A sandbox past its ttl is then expired by the manager as usual. A lost
sandbox holds nothing (``lose``): only its record stays, ``paused_retention`` seconds.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fission.core.catalog import CatalogEntry, config_of, record_of
from fission.core.managed_sandbox import ManagedSandbox
from fission.core.sandbox_spec import SandboxState
from fission.core.sandboxes import SandboxManager
from fission.errors import FissionError
from fission.vmm.base import DISK_NAME, STATE_NAME, VMEnded

log = logging.getLogger("fission.sandboxes")
# A quota slot taken back for a restored sandbox counts whatever the key's limit is now.
UNLIMITED = 1 << 30


def catalogued_ids(entries: list[CatalogEntry]) -> tuple[set[str], set[str]]:
    """The VM ids and sandbox ids reconcile must leave alone (``Journal.reconcile``)."""
    vms = {e.vm_id for e in entries if e.state == SandboxState.RUNNING.value and e.vm_id}
    return vms, {e.id for e in entries}


async def restore(manager: SandboxManager, entries: list[CatalogEntry]) -> dict[str, int]:
    """Take back every catalogued sandbox; returns how many are running, paused and lost."""
    counts = {"running": 0, "paused": 0, "lost": 0}
    for entry in entries:
        try:
            record = record_of(entry)
        except (FissionError, KeyError, TypeError, ValueError) as exc:
            # Kept in the catalog as it is, for an operator to look at; never dropped silently.
            log.error("sandbox %s: its catalog row cannot be read: %s", entry.id, exc)
            continue
        box = ManagedSandbox(record, Path(entry.directory), entry.reserved_mb)
        box.config = config_of(entry)
        if record.owner is not None and record.state != SandboxState.LOST:
            box.slot = manager.quotas.acquire(record.owner, UNLIMITED)
        reason = None
        if record.state == SandboxState.RUNNING:
            reason = await _reattach(manager, box, entry)
        elif record.state == SandboxState.PAUSED:
            missing = [n for n in (STATE_NAME, DISK_NAME) if not (box.directory / n).exists()]
            if box.config is None or missing:
                reason = f"its saved state is gone ({', '.join(missing) or 'no VM config'})"
        manager._register(box)
        if reason is not None:
            await lose(manager, box, reason)
        counts[box.record.state.value] = counts.get(box.record.state.value, 0) + 1
    return counts


async def _reattach(
    manager: SandboxManager, box: ManagedSandbox, entry: CatalogEntry
) -> str | None:
    """Re-attach a running sandbox's VM and take its memory back; the reason it is lost, or
    None when it runs."""
    if box.config is None or entry.attachment is None:
        return "the catalog does not say how to reach its VM"
    pid = entry.vmm_pid if entry.vmm_pid is not None else "?"
    try:
        machine = await manager.driver.attach(box.config, entry.attachment)
    except VMEnded:
        return f"its VM (pid {pid}) ended while no daemon managed it"
    except (FissionError, OSError) as exc:
        return f"its VM (pid {pid}) could not be re-attached (it was ended): {exc}"
    box.machine = machine
    if not manager.budget.reserve(box.reserved_mb):
        # Already running: refusing it would not give the memory back. Count it anyway.
        manager.budget.used_mb += box.reserved_mb
        log.warning(
            "sandbox %s: the memory budget is over-committed after a restart", box.record.id
        )
    try:
        box.egress = await manager._attach(box, machine)
    except FissionError as exc:
        return f"its network proxy could not be set up again: {exc}"
    return None


async def lose(manager: SandboxManager, box: ManagedSandbox, reason: str) -> None:
    """Mark a sandbox ``lost`` (its VM or saved state is gone): what is left of its VM and
    its directory go, its memory and quota slot are given back, its record stays."""
    was_running = box.record.state == SandboxState.RUNNING
    box.record.state, box.record.lost_reason = SandboxState.LOST, reason
    box.record.expires_at = manager._clock() + await manager.retention_of(box.record.owner)
    machine, box.machine, box.config = box.machine, None, None
    log.warning("sandbox %s is lost: %s", box.record.id, reason)
    try:
        await manager._free(box, machine, was_running)
    finally:
        manager._save(box)
    await manager._audit(
        box.record.owner,
        "sandbox.lost",
        box.record.spec,
        reason,
        None,
        {"sandbox": box.record.id},
    )
