"""Persistent sandboxes: create, use (runs, commands, files), pause, resume, delete.

Every adapter (REST, gRPC, MCP, the SDK through them) calls this one manager; quotas, audit and
state changes live here, not in the adapters. Each sandbox (``managed_sandbox``) owns a VM (see
``sandbox_vm``), a directory with its disk, and a memory reservation in the daemon's budget
while it runs. Its neighbours: ``sandbox_files`` (file transfers), ``sandbox_lifetimes`` (ttl
expiry, paused and lost retention, idle vCPU stops, ``on_stop``), ``sandbox_snapshots``
(snapshot, fork, checkpoints, rewind) and ``sandbox_restore`` (re-attaching after a restart).

Runs, commands and file transfers on one sandbox may overlap (the agent channel routes each
reply to its request); pause and resume wait until none is in flight and hold new ones back.
``delete`` and expiry do not wait: they destroy the VM at once, so a
run in flight ends with ``SandboxNotFound``. A run that outlives its own deadline by
``execution.KILL_GRACE`` means a wedged guest: that sandbox is destroyed and the run reports a
timeout. A paused (or lost) sandbox is kept ``paused_retention`` seconds (its ``expires_at``
says when); resuming restarts the ttl.

Every change is written through to the catalog (``catalog``), in one place (``_save``; new
sandboxes enter through ``_register``). With ``durable`` (a daemon) sandbox VMs are
``detached``: they outlive the daemon, which on stop (``on_stop``) keeps them running, pauses
them or deletes them; a restarted daemon re-attaches (``sandbox_restore``), and a VM that
ended meanwhile leaves its sandbox ``lost``, listed with the reason until deleted (or
``paused_retention`` later). Without ``durable`` (embedded runs) sandboxes end with the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

from fission import log_context
from fission.agent.client import ExecRequest, OutputSink, Stdin, WatchEvent
from fission.auth.audit_log import LOCAL, AuditLog, outcome_of_error, outcome_of_result
from fission.auth.quotas import ConcurrencyTracker
from fission.core import idle, sandbox_files, sandbox_pause, sandbox_vm
from fission.core.audit_events import audit_event
from fission.core.catalog import Catalog, entry_for
from fission.core.execution import execute
from fission.core.journal import Journal
from fission.core.machines import Machine, exec_request
from fission.core.managed_sandbox import (
    ManagedSandbox,
    detach,
    gone,
    is_gone,
    vm_memory_mb,
)
from fission.core.pool import MemoryBudget
from fission.core.sandbox_lifetimes import ON_STOP, PAUSED_RETENTION, SandboxLifetimes
from fission.core.sandbox_ports import SandboxPorts
from fission.core.sandbox_runs import command_argv, command_request, run_spec
from fission.core.sandbox_snapshots import SandboxSnapshots
from fission.core.sandbox_spec import (
    SandboxRecord,
    SandboxSpec,
    SandboxState,
    matches,
    new_sandbox_id,
    page,
)
from fission.core.snapshot_store import SnapshotStore
from fission.core.spec import RunResult, RunSpec
from fission.core.telemetry import (
    EGRESS,
    EXEC,
    QUOTA_REFUSED,
    SANDBOX_OP,
    VM_START,
    Telemetry,
    outcome_kind,
)
from fission.errors import (
    Busy,
    FissionError,
    InvalidInput,
    QuotaExceeded,
    SandboxNotFound,
)
from fission.net.egress import Egress, attach
from fission.vmm.base import Driver, VMConfig, default_driver

log = logging.getLogger("fission.sandboxes")
StartVM = Callable[[Path], Awaitable[tuple[Machine, VMConfig]]]


class SandboxManager:
    """Every persistent sandbox of one daemon."""

    def __init__(
        self,
        budget: MemoryBudget,
        journal: Journal,
        audit: AuditLog | None = None,
        clock: Callable[[], float] = time.time,
        driver: Driver | None = None,
        idle_stop_after: float | None = idle.SANDBOX_IDLE_STOP,
        telemetry: Telemetry | None = None,
        snapshot_budget_mb: int | None = None,
        catalog: Catalog | None = None,
        durable: bool = False,
        on_stop: str = "delete",
        paused_retention: float = PAUSED_RETENTION,
    ) -> None:
        if on_stop not in ON_STOP:
            raise InvalidInput(f"--on-stop {on_stop!r} is not one of {', '.join(ON_STOP)}")
        self.driver = driver or default_driver()
        self.telemetry = telemetry or Telemetry()
        self.catalog = catalog
        self.durable = durable  # sandbox VMs outlive the daemon (catalogued, re-attached)
        self.on_stop = on_stop if durable else "delete"
        self.paused_retention = paused_retention
        # An owner's own retention (its API key's; None: the daemon's), set by the server.
        self.retention_for: Callable[[str], float | None] | None = None
        # Called whenever a running sandbox VM is catalogued (the daemon starts its keeper).
        self.on_running: Callable[[], None] | None = None
        self.idle_stop_after = idle_stop_after  # None: never stop an idle sandbox's vCPUs
        self.budget = budget
        self.journal = journal
        self.audit = audit
        self.quotas = ConcurrencyTracker()
        self._clock = clock
        self._sandboxes: dict[str, ManagedSandbox] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        store = SnapshotStore(journal.sandboxes_dir.parent / "snapshots", snapshot_budget_mb)
        self.snapshots = SandboxSnapshots(self, store)  # snapshot, fork, rewind
        self.ports = SandboxPorts(self)  # exposed ports and terminals
        self.lifetimes = SandboxLifetimes(self)  # expiry, retention, idle stops, on_stop

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in a task the manager keeps (and ``close`` waits for)."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- lifecycle of the manager --------------------------------------------------------------
    def start(self) -> None:
        """Begin expiring sandboxes whose ttl ran out (see ``sandbox_lifetimes``)."""
        self.lifetimes.start()

    async def close(self) -> None:
        """Daemon shutdown: what happens to each sandbox follows ``on_stop``."""
        await self.lifetimes.close()

    # -- create, read, list -------------------------------------------------------------------
    async def create(
        self, spec: SandboxSpec, owner: str | None = None, max_sandboxes: int | None = None
    ) -> SandboxRecord:
        """Start a sandbox for ``spec``; ``owner`` (an API key id) may hold ``max_sandboxes``."""

        def start(directory: Path) -> Awaitable[tuple[Machine, VMConfig]]:
            return sandbox_vm.start_sandbox_vm(
                self.driver, run_spec(spec), directory, detached=self.durable
            )

        return await self._create(spec, owner, max_sandboxes, start)

    async def _create(
        self,
        spec: SandboxSpec,
        owner: str | None,
        max_sandboxes: int | None,
        start_vm: StartVM,
        detail: dict[str, Any] | None = None,
    ) -> SandboxRecord:
        """Every new sandbox, however its VM starts (``start_vm`` given its directory)."""
        started = time.monotonic()
        try:
            slot = self.quotas.acquire(owner, max_sandboxes) if owner and max_sandboxes else None
        except QuotaExceeded:
            self.telemetry.emit(QUOTA_REFUSED, limit="sandboxes")
            raise
        reserved = vm_memory_mb(spec.limits)
        try:
            self._reserve(reserved)
        except BaseException:
            if slot is not None:
                slot.release()
            raise
        now = self._clock()
        record = SandboxRecord(new_sandbox_id(), spec, owner, now, now + spec.ttl)
        log_context.sandbox_id.set(record.id)
        directory = self.journal.sandboxes_dir / record.id
        box = ManagedSandbox(record, directory, reserved, slot)
        try:
            directory.mkdir(mode=0o700)
            booting = time.monotonic()
            machine, config = await start_vm(directory)
            self.telemetry.emit(
                VM_START,
                time.monotonic() - booting,
                language=spec.language.name,
                source="sandbox",
            )
            self.journal.record(machine.vm)  # until catalogued (see ``_save``)
            try:
                box.egress = await self._attach(box, machine)
            except BaseException:
                await machine.destroy()
                self.journal.forget(machine.vm)
                raise
        except BaseException as exc:
            self.budget.release(reserved)
            if slot is not None:
                slot.release()
            shutil.rmtree(directory, ignore_errors=True)
            outcome = outcome_of_error(exc)
            await self._audit(owner, "sandbox.create", spec, outcome, started, detail)
            raise
        box.machine, box.config = machine, config
        record.expires_at = self._clock() + spec.ttl
        self._register(box)
        detail = (detail or {}) | {"sandbox": record.id}
        await self._audit(owner, "sandbox.create", spec, "ok", started, detail)
        return record

    def get(self, sandbox_id: str, owner: str | None = None) -> SandboxRecord:
        """The record of a live sandbox; SandboxNotFound if it is gone or not ``owner``'s."""
        return self._box(sandbox_id, owner).record

    def list_sandboxes(
        self,
        owner: str | None = None,
        state: SandboxState | None = None,
        metadata: dict[str, str] | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[SandboxRecord], str | None]:
        """One page of sandboxes matching the filters, and the cursor of the next page."""
        records = [
            box.record
            for box in self._sandboxes.values()
            if matches(box.record, owner, state, metadata)
        ]
        return page(records, limit, cursor)

    def check_running(self, sandbox_id: str, owner: str | None = None) -> SandboxRecord:
        """The record of a running sandbox; SandboxNotFound or SandboxNotRunning otherwise."""
        box = self._box(sandbox_id, owner)
        box.agent  # noqa: B018 - raises SandboxNotRunning unless it runs
        return box.record

    def count(self) -> int:
        """How many sandboxes exist (running or paused; a lost one holds nothing)."""
        return sum(b.record.state != SandboxState.LOST for b in self._sandboxes.values())

    def census(self) -> dict[str, int]:
        """How many sandboxes are running, idle (vCPUs stopped), paused and lost (for metrics)."""
        counts = {"running": 0, "idle": 0, "paused": 0, "lost": 0}
        for box in list(self._sandboxes.values()):
            if box.record.state in (SandboxState.PAUSED, SandboxState.LOST):
                counts[box.record.state.value] += 1
            elif box.record.state == SandboxState.RUNNING:
                counts["idle" if box.idle.stopped else "running"] += 1
        return counts

    def set_ttl(self, sandbox_id: str, ttl: float, owner: str | None = None) -> SandboxRecord:
        """Keep a sandbox alive ``ttl`` more seconds from now."""
        box = self._box(sandbox_id, owner)
        spec = replace(box.record.spec, ttl=ttl)  # validates the ttl
        box.record.spec = spec
        box.record.expires_at = self._clock() + ttl
        self._save(box)
        return box.record

    # -- runs and commands --------------------------------------------------------------------
    async def run_code(
        self,
        sandbox_id: str,
        code: str,
        *,
        owner: str | None = None,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        context: str | None = None,
        fresh_context: bool = False,
        on_output: OutputSink | None = None,
        checkpoint: bool = False,
        max_snapshot_mb: int | None = None,
    ) -> RunResult:
        """Run ``code`` in the sandbox's language; with ``context``, in a persistent kernel."""
        box = self._box(sandbox_id, owner)
        spec = run_spec(box.record.spec, code, timeout, env)
        request = exec_request(spec)
        if context is not None or fresh_context:
            request = replace(request, context=context or "default", fresh_context=fresh_context)
        result = await self._exec(box, "sandbox.run", spec, request, on_output, None)
        return await self._checkpoint(box, result, checkpoint, max_snapshot_mb)

    async def exec_command(
        self,
        sandbox_id: str,
        command: str | list[str],
        *,
        owner: str | None = None,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: Stdin | None = None,
        on_output: OutputSink | None = None,
        checkpoint: bool = False,
        max_snapshot_mb: int | None = None,
    ) -> RunResult:
        """Run a shell command line (a string) or an argv (a list) in the sandbox; ``stdin``
        is its input: bytes, or an async iterable of chunks fed to it while it runs."""
        argv = command_argv(command)
        box = self._box(sandbox_id, owner)
        whole = stdin if isinstance(stdin, bytes) else None  # a stream's size is not known
        spec = run_spec(box.record.spec, " ".join(argv), timeout, env, whole)
        request = command_request(spec, argv, cwd)
        result = await self._exec(box, "sandbox.exec", spec, request, on_output, stdin)
        return await self._checkpoint(box, result, checkpoint, max_snapshot_mb)

    async def _checkpoint(
        self, box: ManagedSandbox, result: RunResult, wanted: bool, max_snapshot_mb: int | None
    ) -> RunResult:
        """With ``wanted``, the result with a checkpoint taken right after the step."""
        if not wanted:
            return result
        checkpoint_id = await self.snapshots.checkpoint(box, max_snapshot_mb)
        return replace(result, checkpoint_id=checkpoint_id)

    async def _exec(
        self,
        box: ManagedSandbox,
        action: str,
        spec: RunSpec,
        request: ExecRequest,
        on_output: OutputSink | None,
        stdin: Stdin | None,
    ) -> RunResult:
        started = time.monotonic()
        async with box.gate.operation():
            agent = box.agent
            try:
                executing = time.monotonic()
                execution = await execute(agent, request, on_output, stdin)
                self.telemetry.emit(
                    EXEC,
                    time.monotonic() - executing,
                    language=spec.language.name,
                    kind="sandbox",
                )
            except FissionError as exc:
                await self._audit(box.record.owner, action, spec, outcome_of_error(exc), started)
                if is_gone(box):
                    raise gone(box) from exc
                raise
            if execution.wedged:  # the guest never answered: this VM is not to be trusted again
                self._background(self._destroy(box, "wedged"))
        result = execution.result
        detail = {"sandbox": box.record.id}
        await self._audit(
            box.record.owner, action, spec, outcome_of_result(result), started, detail
        )
        return result

    # -- files ----------------------------------------------------------------------------------
    async def write_file(
        self,
        sandbox_id: str,
        path: str,
        data: bytes | AsyncIterator[bytes],
        owner: str | None = None,
        mode: int = 0o644,
    ) -> Any:
        """Write a file in the sandbox (streamed when ``data`` is an async iterator)."""
        return await sandbox_files.write_file(self._box(sandbox_id, owner), path, data, mode)

    async def read_file(
        self, sandbox_id: str, path: str, owner: str | None = None
    ) -> AsyncGenerator[bytes, None]:
        """The file's bytes in chunks; the sandbox stays locked until the last chunk is read."""
        box = self._box(sandbox_id, owner)
        async with contextlib.aclosing(sandbox_files.read_file(box, path)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def list_files(self, sandbox_id: str, path: str = ".", owner: str | None = None) -> Any:
        """The entries of a directory in the sandbox."""
        return await sandbox_files.list_files(self._box(sandbox_id, owner), path)

    async def stat_file(self, sandbox_id: str, path: str, owner: str | None = None) -> Any:
        """Facts about one path in the sandbox."""
        return await sandbox_files.stat_file(self._box(sandbox_id, owner), path)

    async def make_dir(self, sandbox_id: str, path: str, owner: str | None = None) -> Any:
        """Create a directory (and its parents) in the sandbox."""
        return await sandbox_files.make_dir(self._box(sandbox_id, owner), path)

    async def remove_file(
        self, sandbox_id: str, path: str, recursive: bool = False, owner: str | None = None
    ) -> None:
        """Remove a file (or a directory tree with ``recursive``) in the sandbox."""
        await sandbox_files.remove_file(self._box(sandbox_id, owner), path, recursive)

    def watch_files(
        self, sandbox_id: str, path: str, recursive: bool = False, owner: str | None = None
    ) -> AsyncGenerator[list[WatchEvent], None]:
        """Batches of changes under a directory; the first (empty) says the watch is in place
        (see ``sandbox_files.watch_files``)."""
        return sandbox_files.watch_files(self._box(sandbox_id, owner), path, recursive)

    # -- pause, resume, delete ------------------------------------------------------------------
    async def pause(self, sandbox_id: str, owner: str | None = None) -> SandboxRecord:
        """Save the sandbox to disk and stop its VM; its memory goes back to the budget."""
        return await sandbox_pause.pause(self, self._box(sandbox_id, owner))

    async def resume(self, sandbox_id: str, owner: str | None = None) -> SandboxRecord:
        """Start a paused sandbox again from its saved state, with its files as they were."""
        return await sandbox_pause.resume(self, self._box(sandbox_id, owner))

    async def delete(self, sandbox_id: str, owner: str | None = None) -> None:
        """Destroy the sandbox: its VM, its disk and its saved state."""
        box = self._box(sandbox_id, owner)
        await self._destroy(box, "deleted")

    async def _destroy(self, box: ManagedSandbox, why: str) -> None:
        """Forget the sandbox and free everything it holds (safe to call twice)."""
        if self._sandboxes.pop(box.record.id, None) is None:
            return
        was_running = box.record.state == SandboxState.RUNNING
        box.record.state = SandboxState.DELETED
        machine, box.machine = box.machine, None
        try:
            await self._free(box, machine, was_running)
        finally:
            self.snapshots.sandbox_gone(box.record.id)
            self.ports.sandbox_gone(box.record.id)
            if self.catalog is not None:
                self.catalog.remove(box.record.id)
        await self._audit(
            box.record.owner,
            "sandbox.delete",
            box.record.spec,
            why,
            None,
            {"sandbox": box.record.id},
        )

    async def retention_of(self, owner: str | None) -> float:
        """Seconds a paused or lost sandbox of ``owner`` is kept: the daemon's
        ``paused_retention``, or the owner's key's if that is shorter."""
        lookup = self.retention_for
        if owner is None or lookup is None:
            return self.paused_retention
        try:
            own = await asyncio.to_thread(lookup, owner)
        except FissionError as exc:  # a key gone from the database: the daemon's applies
            log.warning("the paused retention of %s is unknown: %s", owner, exc)
            return self.paused_retention
        return self.paused_retention if own is None else min(self.paused_retention, own)

    # -- the catalog -----------------------------------------------------------------------------
    def _register(self, box: ManagedSandbox) -> None:
        """Add a sandbox to those the manager serves, and to the catalog: the one way in, for
        new sandboxes and for those a restart re-attached."""
        box.idle = idle.IdleState(self.idle_stop_after)
        box.gate.on_use = lambda: self._wake(box)
        self._sandboxes[box.record.id] = box
        self._save(box)

    def _save(self, box: ManagedSandbox) -> None:
        """Write the sandbox's row (after every change of its state, lifetime or VM)."""
        if self.catalog is None:
            return
        machine = box.machine
        vm = machine.vm if machine is not None else None
        self.catalog.put(entry_for(box.record, box.directory, box.reserved_mb, box.config, vm))
        if vm is not None and self.durable:
            # Catalogued now: the catalog is its journal, and reconcile leaves it alone. Until
            # here (a daemon dying while it starts) the journal had it, so it is not left over.
            self.journal.forget(vm)
            if vm.pid is not None and self.on_running is not None:
                self.on_running()

    def _journal_vm(self, machine: Machine) -> None:
        """Journal a started sandbox VM (a durable one only until it is catalogued)."""
        self.journal.record(machine.vm)

    def _forget_vm(self, machine: Machine) -> None:
        self.journal.forget(machine.vm)

    # -- helpers -------------------------------------------------------------------------------
    async def _wake(self, box: ManagedSandbox) -> None:
        """Let a sandbox's VM run again if it was stopped for idleness (its clock set anew)."""
        machine = box.machine
        if machine is not None and box.idle.stopped:
            try:
                await box.idle.wake(machine)
            except FissionError as exc:
                if is_gone(box):  # deleted meanwhile, as a run in flight would learn
                    raise gone(box) from exc
                raise

    def _box(self, sandbox_id: str, owner: str | None) -> ManagedSandbox:
        log_context.sandbox_id.set(sandbox_id)  # the rest of this call's log lines name it
        box = self._sandboxes.get(sandbox_id)
        if box is None or (owner is not None and box.record.owner != owner):
            raise SandboxNotFound(
                f"no sandbox {sandbox_id!r}: it was deleted, expired, or never existed"
            )
        return box

    def _reserve(self, mb: int) -> None:
        if not self.budget.reserve(mb):
            raise Busy(
                f"the memory budget ({self.budget.total_mb} MB, {self.budget.used_mb} MB in "
                f"use) has no room for a {mb} MB sandbox: pause or delete sandboxes, or raise "
                "--memory-budget"
            )

    async def _attach(self, box: ManagedSandbox, machine: Machine) -> Egress | None:
        """The sandbox's egress proxy (None without network); its decisions are audited."""
        record = box.record

        def on_event(event: dict[str, Any]) -> None:
            detail = {"sandbox": record.id} | event
            outcome = str(event.get("decision", "?"))
            self.telemetry.emit(EGRESS, decision=outcome, source="sandbox")
            self._background(
                self._audit(record.owner, "sandbox.egress", record.spec, outcome, None, detail)
            )

        return await attach(machine.agent, record.spec.network, on_event)

    async def _free(self, box: ManagedSandbox, machine: Machine | None, was_running: bool) -> None:
        """Give back what a deleted or lost sandbox holds: its streams, its VM, its memory (if
        it ran), its quota slot and its directory."""
        try:
            await self._detach(box)
            if machine is not None:
                await machine.destroy()
                self._forget_vm(machine)
        finally:
            if was_running:
                self.budget.release(box.reserved_mb)
            if box.slot is not None:
                box.slot.release()
                box.slot = None
            await asyncio.to_thread(shutil.rmtree, box.directory, True)

    async def _detach(self, box: ManagedSandbox) -> None:
        """Close the sandbox's egress proxy, if any, and its port and terminal streams (before
        its VM goes)."""
        await self.ports.detach(box.record.id)
        await detach(box)

    async def _audit(
        self,
        owner: str | None,
        action: str,
        spec: SandboxSpec | RunSpec,
        outcome: str,
        started: float | None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        duration = None if started is None else (time.monotonic() - started) * 1000.0
        if action != "sandbox.egress":
            log.info("%s ended: %s in %s ms", action, outcome, duration and round(duration, 1))
            seconds = None if duration is None else duration / 1000.0
            self.telemetry.emit(SANDBOX_OP, seconds, action=action, outcome=outcome_kind(outcome))
        await audit_event(
            self.audit,
            owner or LOCAL,
            action,
            language=spec.language.name,
            limits=spec.limits,
            outcome=outcome,
            duration_ms=duration,
            detail=detail,
        )
