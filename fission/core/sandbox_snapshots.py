"""Snapshots of running sandboxes, sandboxes started from them, forks, checkpoints and rewind.

A snapshot saves a running sandbox without ending it: the agent syncs the guest's disks, QEMU
migrates the whole guest state into the snapshot's ``state`` file (the VM is paused when that
ends), the sandbox's qcow2 overlay is copied (``cp --sparse=always --reflink=auto``: only the
clusters the sandbox wrote), and the same VM continues (QMP ``cont``, with its clock set again).
Copying rather than freezing the overlay under a new one keeps each sandbox's disk one file
whose lifetime is its own: no chain grows under a long-lived sandbox, and deleting a snapshot
never touches a running VM's disk.

A sandbox started from a snapshot (``create_from``, ``fork``, ``rewind``) gets a qcow2 overlay
whose backing file is the snapshot's disk, so its writes are its own, and restores the
snapshot's state with a fresh clock and seed like every restore (the agent mixes the seed in
and reseeds the kernel CRNG; warm children reseed before user code). Every new sandbox goes
through ``SandboxManager._create``, so quotas, the memory budget and the audit log apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fission.auth.audit_log import LOCAL, outcome_of_error
from fission.core import idle, integrity, snapshot_gc
from fission.core.managed_sandbox import ManagedSandbox, gone
from fission.core.sandbox_spec import SandboxRecord, SandboxState, check_metadata
from fission.core.sandbox_vm import PAUSE_TIMEOUT
from fission.core.snapshot_store import SnapshotRecord, SnapshotStore, check_name
from fission.errors import (
    Busy,
    FissionError,
    InvalidInput,
    QuotaExceeded,
    SandboxNotRunning,
)
from fission.vmm.base import DISK_NAME, STATE_NAME, Machine, VMConfig

if TYPE_CHECKING:
    from fission.core.sandboxes import SandboxManager

log = logging.getLogger("fission.snapshots")
MAX_FORK = 16
MAX_CHECKPOINTS = 10  # per sandbox; the oldest goes when another is taken
MB = 1024 * 1024


def copy_disk(source: Path, target: Path) -> None:
    """Copy a disk file keeping its holes (and sharing blocks where the filesystem can)."""
    argv = ["cp", "--sparse=always", "--reflink=auto", str(source), str(target)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise FissionError(f"copying the sandbox's disk failed: {proc.stderr.strip()}")


class SandboxSnapshots:
    """Snapshot, fork, create-from-snapshot and rewind for one ``SandboxManager``."""

    def __init__(
        self, manager: SandboxManager, store: SnapshotStore, max_checkpoints: int = MAX_CHECKPOINTS
    ) -> None:
        self.manager = manager
        self.store = store
        self.max_checkpoints = max_checkpoints
        self.derived_root: Path | None = None  # derived snapshots under the same budget

    # -- reading and deleting -------------------------------------------------------------------
    def get(self, snapshot_id: str, owner: str | None = None) -> SnapshotRecord:
        """The snapshot; SnapshotNotFound if it is gone or not ``owner``'s."""
        return self.store.get(snapshot_id, owner)

    def list_snapshots(
        self, owner: str | None = None, sandbox_id: str | None = None, kind: str | None = None
    ) -> list[SnapshotRecord]:
        """``owner``'s snapshots (None: everyone's), oldest first."""
        return self.store.find(owner, sandbox_id, kind)

    def in_use(self) -> set[str]:
        """Ids of the snapshots something still needs (see ``snapshot_store``)."""
        boxes = list(self.manager._sandboxes.values())
        return self.store.in_use(
            [b.directory / DISK_NAME for b in boxes], [b.record.id for b in boxes]
        )

    async def delete(self, snapshot_id: str, owner: str | None = None) -> None:
        """Delete ``owner``'s snapshot; Conflict while a sandbox or restore needs it."""
        record = self.store.get(snapshot_id, owner)
        await asyncio.to_thread(self.store.delete, record.id, owner, self.in_use())
        await self._audit(record, "snapshot.delete", "ok", None)

    async def gc(
        self, dry_run: bool = False, budget_mb: int | None = None, protect: set[str] | None = None
    ) -> dict[str, Any]:
        """Reclaim snapshot space (see ``snapshot_gc``); a report of what went or would go."""
        in_use = self.in_use() | (protect or set())
        report = await asyncio.to_thread(
            snapshot_gc.reclaim,
            self.store,
            in_use,
            self.derived_root,
            dry_run=dry_run,
            budget_mb=budget_mb,
        )
        audit = self.manager.audit
        if report["removed"] and not dry_run and audit is not None:
            detail = {"removed": [e["id"] for e in report["removed"]]}
            await asyncio.to_thread(audit.record, LOCAL, "snapshot.gc", outcome="ok", detail=detail)
        return report

    def sandbox_gone(self, sandbox_id: str) -> None:
        """Drop what a deleted sandbox's snapshots no longer serve: its checkpoints and fork
        snapshots that no other sandbox is built on."""
        used = self.in_use()
        for record in self.store.find(sandbox_id=sandbox_id):
            if record.kind in ("checkpoint", "fork") and record.id not in used:
                self.store.remove(record.id)
        for record in self.store.find(kind="fork"):
            if record.id not in used:
                self.store.remove(record.id)

    # -- taking a snapshot ----------------------------------------------------------------------
    async def snapshot(
        self,
        sandbox_id: str,
        owner: str | None = None,
        name: str | None = None,
        *,
        kind: str = "snapshot",
        max_snapshot_mb: int | None = None,
    ) -> SnapshotRecord:
        """Save a running sandbox (memory and disk) as a snapshot; the sandbox keeps running."""
        check_name(name)
        box = self.manager._box(sandbox_id, owner)
        self._check_quota(box.record.owner, max_snapshot_mb, 0)
        async with box.gate.change():
            return await self._take(box, name, kind, max_snapshot_mb)

    async def _take(
        self, box: ManagedSandbox, name: str | None, kind: str, max_snapshot_mb: int | None
    ) -> SnapshotRecord:
        """Snapshot ``box`` (its gate held for a change)."""
        started = time.monotonic()
        machine = box.machine
        if machine is None or box.record.state != SandboxState.RUNNING or box.config is None:
            raise SandboxNotRunning(
                f"sandbox {box.record.id} is {box.record.state.value}: only a running sandbox "
                "can be snapshotted (resume it first)"
            )
        await self.manager._wake(box)
        snapshot_id, directory = self.store.staging()
        record = SnapshotRecord(
            snapshot_id,
            box.record.owner,
            kind,
            box.record.id,
            box.record.spec,
            box.config,
            time.time(),
            name,
        )
        try:
            # pinned until returned: a sandbox deleted meanwhile must not drop it as unused
            with self.store.pin(snapshot_id):
                await save_running(machine, box.directory, directory)
                await asyncio.to_thread(self.store.add, record)
                self._check_quota(record.owner, max_snapshot_mb, record.size_bytes, record.id)
                await self._fit_budget(record)
        except BaseException as exc:
            await asyncio.to_thread(self.store.remove, snapshot_id)
            await self._audit(record, f"sandbox.{kind}", outcome_of_error(exc), started)
            raise
        if kind == "checkpoint":
            self._bound_checkpoints(box.record.id)
        await self._audit(record, f"sandbox.{kind}", "ok", started)
        return record

    def _check_quota(
        self, owner: str | None, max_mb: int | None, new_bytes: int, new_id: str | None = None
    ) -> None:
        """QuotaExceeded when ``owner``'s snapshots (the new one included) pass ``max_mb``."""
        if owner is None or max_mb is None:
            return
        used = self.store.used_bytes(owner)
        if new_id is None:
            used += new_bytes
        if used > max_mb * MB or (new_id is None and used >= max_mb * MB):
            raise QuotaExceeded(
                f"this API key's snapshots use {used / MB:.1f} MB of its {max_mb} MB snapshot "
                "quota: delete snapshots (or checkpoints), or ask for a larger --max-snapshot-mb"
            )

    def _over_budget(self) -> bool:
        budget = self.store.budget_mb
        used = snapshot_gc.total_bytes(self.store, self.derived_root)
        return budget is not None and used > budget * MB

    async def _fit_budget(self, new: SnapshotRecord) -> None:
        """Evict unused snapshots (derived ones too), least recently used first, until all fit
        the budget; Busy (and the new one dropped by the caller) when even that is not enough."""
        if not await asyncio.to_thread(self._over_budget):
            return
        report = await self.gc(protect={new.id})
        for victim in report["removed"]:
            log.info("snapshot budget: evicted %s (%s)", victim["id"], victim["kind"])
        if await asyncio.to_thread(self._over_budget):
            raise Busy(
                f"the snapshot budget ({self.store.budget_mb} MB) has no room for a "
                f"{new.size_bytes / MB:.1f} MB snapshot and nothing unused is left to evict: "
                "delete snapshots or raise --snapshot-budget"
            )

    def _bound_checkpoints(self, sandbox_id: str) -> None:
        """Keep the newest ``max_checkpoints`` checkpoints of a sandbox (unused ones go)."""
        checkpoints = self.store.find(sandbox_id=sandbox_id, kind="checkpoint")
        excess = len(checkpoints) - self.max_checkpoints
        if excess <= 0:
            return
        used = self.in_use()
        for record in checkpoints[:-1]:
            if excess <= 0:
                break
            if record.id not in used:
                self.store.remove(record.id)
                excess -= 1

    async def checkpoint(self, box: ManagedSandbox, max_snapshot_mb: int | None) -> str:
        """Take a checkpoint of ``box`` after a step; its snapshot id."""
        async with box.gate.change():
            record = await self._take(box, None, "checkpoint", max_snapshot_mb)
        return record.id

    # -- starting from a snapshot ---------------------------------------------------------------
    async def create_from(
        self,
        snapshot_id: str,
        owner: str | None = None,
        max_sandboxes: int | None = None,
        *,
        ttl: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> SandboxRecord:
        """A new sandbox restored from ``owner``'s snapshot, with a disk of its own on top."""
        record = self.store.get(snapshot_id, owner)
        with self.store.pin(record.id):
            await self._verify(record, "sandbox.create", owner)
            return await self._start_from(record, owner, max_sandboxes, ttl, metadata)

    async def _start_from(
        self,
        record: SnapshotRecord,
        owner: str | None,
        max_sandboxes: int | None,
        ttl: float | None,
        metadata: dict[str, str] | None,
    ) -> SandboxRecord:
        spec = record.spec
        if ttl is not None or metadata:
            spec = replace(
                spec,
                ttl=spec.ttl if ttl is None else ttl,
                metadata=check_metadata(spec.metadata | (metadata or {})),
            )
        source = self.store.directory(record.id)

        async def start(directory: Path) -> tuple[Machine, VMConfig]:
            return await self.restore_into(record, source, directory)

        created = await self.manager._create(
            spec, owner, max_sandboxes, start, {"from_snapshot": record.id}
        )
        self.store.touch(record)
        return created

    async def restore_into(
        self, record: SnapshotRecord, source: Path, directory: Path
    ) -> tuple[Machine, VMConfig]:
        """Start a VM from the snapshot in ``source`` with its own disk in ``directory``."""
        driver = self.manager.driver
        disk = directory / DISK_NAME
        try:
            await asyncio.to_thread(driver.layer_disk, source / DISK_NAME, disk)
            config = replace(
                driver.restored(record.config, directory, keep_writes=True),
                incoming=source / STATE_NAME,
                detached=self.manager.durable,
            )
            return await driver.start(config), config
        except BaseException:
            disk.unlink(missing_ok=True)
            raise

    async def fork(
        self,
        sandbox_id: str,
        n: int,
        owner: str | None = None,
        max_sandboxes: int | None = None,
        max_snapshot_mb: int | None = None,
    ) -> tuple[SnapshotRecord, list[SandboxRecord]]:
        """Snapshot a running sandbox and start ``n`` sandboxes from it (1 to ``MAX_FORK``)."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_FORK:
            raise InvalidInput(f"fork n={n!r} is out of range: use 1 to {MAX_FORK}")
        box = self.manager._box(sandbox_id, owner)
        self._check_quota(box.record.owner, max_snapshot_mb, 0)
        name = f"fork of {box.record.id}"
        with contextlib.ExitStack() as pinned:
            async with box.gate.change():
                snapshot = await self._take(box, name, "fork", max_snapshot_mb)
                pinned.enter_context(self.store.pin(snapshot.id))  # no await since _take
            results = await asyncio.gather(
                *(
                    self._start_from(snapshot, box.record.owner, max_sandboxes, None, None)
                    for _ in range(n)
                ),
                return_exceptions=True,
            )
            clones = [r for r in results if isinstance(r, SandboxRecord)]
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is not None:  # all or nothing: the clones that started go again
                for clone in clones:
                    await self.manager.delete(clone.id)
                await asyncio.to_thread(self.store.remove, snapshot.id)
                raise failure
        return snapshot, clones

    # -- rewind ---------------------------------------------------------------------------------
    async def rewind(
        self, sandbox_id: str, checkpoint_id: str, owner: str | None = None
    ) -> SandboxRecord:
        """Replace the sandbox's VM with one restored from one of its checkpoints (or
        snapshots): same id, its files and memory as they were then."""
        box = self.manager._box(sandbox_id, owner)
        record = self.store.get(checkpoint_id, owner)
        if record.sandbox_id != box.record.id:
            raise InvalidInput(
                f"snapshot {record.id} was taken from sandbox {record.sandbox_id}, not "
                f"{box.record.id}: start a new sandbox from it instead (from_snapshot)"
            )
        with self.store.pin(record.id):
            await self._verify(record, "sandbox.rewind", owner)
            async with box.gate.change():
                await self._replace_vm(box, record)
        self.store.touch(record)
        await self._audit(record, "sandbox.rewind", "ok", None, {"sandbox": box.record.id})
        return box.record

    async def _replace_vm(self, box: ManagedSandbox, record: SnapshotRecord) -> None:
        """Destroy the sandbox's VM and start one from ``record`` on a fresh overlay."""
        manager = self.manager
        if box.record.state == SandboxState.DELETED:
            raise gone(box)
        if box.record.state == SandboxState.PAUSED:
            manager._reserve(box.reserved_mb)
        old, box.machine = box.machine, None
        await manager._detach(box)
        if old is not None:
            manager.journal.forget(old.vm)
            await old.destroy()
        for stale in (DISK_NAME, STATE_NAME, integrity.RECORD_NAME):
            (box.directory / stale).unlink(missing_ok=True)
        try:
            machine, config = await self.restore_into(
                record, self.store.directory(record.id), box.directory
            )
            try:
                box.egress = await manager._attach(box, machine)
            except BaseException:
                await machine.destroy()
                raise
        except BaseException:
            # The old VM is gone and no new one runs: the sandbox cannot go on.
            box.record.state = SandboxState.RUNNING  # so _destroy gives its memory back
            manager._background(manager._destroy(box, "rewind failed"))
            raise
        manager.journal.record(machine.vm)
        box.machine, box.config = machine, config
        box.idle = idle.IdleState(manager.idle_stop_after)
        box.record.state = SandboxState.RUNNING
        box.record.expires_at = manager._clock() + box.record.spec.ttl
        manager._save(box)

    # -- helpers --------------------------------------------------------------------------------
    async def _verify(self, record: SnapshotRecord, action: str, owner: str | None) -> None:
        """Check the snapshot's files; an IntegrityError is audited and raised."""
        try:
            await asyncio.to_thread(
                integrity.verify,
                self.store.directory(record.id),
                record.checksums,
                f"snapshot {record.id}",
            )
        except FissionError as exc:
            detail = {"snapshot": record.id, "error": str(exc)}
            await self._audit(record, action, outcome_of_error(exc), None, detail)
            raise

    async def _audit(
        self,
        record: SnapshotRecord,
        action: str,
        outcome: str,
        started: float | None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        base = {"snapshot": record.id, "sandbox": record.sandbox_id, "kind": record.kind}
        await self.manager._audit(
            record.owner, action, record.spec, outcome, started, base | (detail or {})
        )


async def save_running(machine: Machine, disk_dir: Path, target: Path) -> None:
    """Save a running VM's state and disk into ``target`` and let it continue."""
    await machine.agent.prepare_snapshot(PAUSE_TIMEOUT)  # flushes the guest's disks
    try:
        await machine.vm.save_state(target / STATE_NAME)  # the VM is paused when it returns
        await asyncio.to_thread(copy_disk, disk_dir / DISK_NAME, target / DISK_NAME)
    finally:
        await idle.wake(machine)  # QMP cont, and the guest's clock set again
