"""Persistent sandboxes: create, use (runs, commands, files), pause, resume, delete, expire.

Every adapter (REST, gRPC, MCP, the SDK through them) calls this one manager; quotas, audit and
lifetimes live here, not in the adapters. Each sandbox owns a VM (see ``sandbox_vm``), a
directory with its disk, and a memory reservation in the daemon's budget while it runs.

Runs, commands and file transfers on one sandbox may overlap (the agent channel routes each
reply to its request); pause and resume wait until none is in flight and hold new ones back.
``delete`` and expiry do not wait: they destroy the VM at once, so a
run in flight ends with ``SandboxNotFound``. A run that outlives its own deadline by
``execution.KILL_GRACE`` means a wedged guest: that sandbox is destroyed and the run reports a
timeout.
A running sandbox whose ttl runs out is deleted, or paused with ``on_timeout="pause"``. A
paused one is kept ``paused_retention`` seconds (then deleted; its ``expires_at`` says when);
resuming restarts the ttl.

Every change is written through to the catalog (``catalog``), in one place (``_save``; new
sandboxes enter through ``_register``). With ``durable`` (a daemon) sandbox VMs are
``detached``: they outlive the daemon, which on stop (``on_stop``) keeps them running, pauses
them or deletes them; a restarted daemon re-attaches (``sandbox_restore``), and a VM that
ended meanwhile leaves its sandbox ``lost``, listed with the reason until deleted (or
``paused_retention`` later). Without ``durable`` (embedded runs) sandboxes end with the process.
A running sandbox with nothing in flight for ``idle_stop_after`` seconds has its vCPUs stopped
(``idle``: no CPU while idle); its next call wakes it first and sets its clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fission import log_context
from fission.agent.client import AgentClient, ExecRequest, OutputSink, WatchEvent
from fission.auth.audit_log import LOCAL, AuditLog, outcome_of_error, outcome_of_result
from fission.auth.quotas import ConcurrencyTracker, Slot
from fission.core import idle, integrity, sandbox_vm, snapshots
from fission.core.audit_events import audit_event
from fission.core.catalog import Catalog, entry_for
from fission.core.execution import execute
from fission.core.journal import Journal
from fission.core.limits import MB, Limits
from fission.core.machines import GUEST_OVERHEAD_MB, Machine, exec_request
from fission.core.pool import MemoryBudget
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
    SandboxNotRunning,
)
from fission.net.egress import Egress, attach, proxy_env
from fission.vmm.base import DISK_NAME, STATE_NAME, Driver, VMConfig, default_driver

log = logging.getLogger("fission.sandboxes")
StartVM = Callable[[Path], Awaitable[tuple[Machine, VMConfig]]]
ON_STOP = ("keep", "pause", "delete")  # what a stopping daemon does with running sandboxes
PAUSED_RETENTION = 7 * 24 * 3600.0  # seconds a paused (or lost) sandbox is kept
EXPIRY_INTERVAL = 0.5
FILE_OP_TIMEOUT = 120.0
SHELL = "/bin/sh"


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
        # Called whenever a running sandbox VM is catalogued (the daemon starts its keeper).
        self.on_running: Callable[[], None] | None = None
        self.idle_stop_after = idle_stop_after  # None: never stop an idle sandbox's vCPUs
        self.budget = budget
        self.journal = journal
        self.audit = audit
        self.quotas = ConcurrencyTracker()
        self._clock = clock
        self._sandboxes: dict[str, ManagedSandbox] = {}
        self._expiry: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        store = SnapshotStore(journal.sandboxes_dir.parent / "snapshots", snapshot_budget_mb)
        self.snapshots = SandboxSnapshots(self, store)  # snapshot, fork, rewind

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in a task the manager keeps (and ``close`` waits for)."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- lifecycle of the manager --------------------------------------------------------------
    def start(self) -> None:
        """Begin expiring sandboxes whose ttl ran out."""
        self._expiry = asyncio.create_task(self._expire_loop(), name="sandbox-expiry")

    async def close(self) -> None:
        """Daemon shutdown: per ``on_stop``, leave running sandboxes running (``keep``: their
        VMs live on, catalogued), save them to disk (``pause``), or destroy every sandbox."""
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        await asyncio.gather(*self._tasks, return_exceptions=True)
        boxes = list(self._sandboxes.values())
        if self.on_stop == "delete":
            await asyncio.gather(
                *(self._destroy(box, "shutdown") for box in boxes), return_exceptions=True
            )
        else:
            if self.on_stop == "pause":
                running = [b for b in boxes if b.record.state == SandboxState.RUNNING]
                await asyncio.gather(
                    *(self.pause(box.record.id) for box in running), return_exceptions=True
                )
            await asyncio.gather(*(self._let_go(box) for box in boxes), return_exceptions=True)
        if self.catalog is not None:
            self.catalog.close()

    async def _let_go(self, box: ManagedSandbox) -> None:
        """Stop managing a sandbox and leave its VM running (its catalog row says how to find
        it again); its files, cgroups and uid stay as they are."""
        self._sandboxes.pop(box.record.id, None)
        machine, box.machine = box.machine, None
        await self._detach(box)
        if machine is not None:
            await machine.agent.close()

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL)
            now = self._clock()
            for box in list(self._sandboxes.values()):
                record = box.record
                if record.expires_at <= now and record.state == SandboxState.RUNNING:
                    log.info(
                        "sandbox %s expired (on_timeout %s)", record.id, record.spec.on_timeout
                    )
                    if record.spec.on_timeout == "pause":
                        self._background(self._pause_quietly(box))
                    else:
                        log.info("sandbox %s expired", record.id)
                        await self._destroy(box, "expired")
                elif record.expires_at <= now:  # paused or lost: its retention has ended
                    log.info("sandbox %s (%s) expired", record.id, record.state.value)
                    await self._destroy(box, "retention ended")
                elif box.machine is not None and record.state == SandboxState.RUNNING:
                    streams = len(box.egress.tunnel.streams) if box.egress is not None else 0
                    quiet = 0.0 if streams else box.gate.quiet_for(time.monotonic())
                    if box.idle.due(box.machine.vm, quiet):
                        self._background(self._stop_idle(box))

    async def _pause_quietly(self, box: ManagedSandbox) -> None:
        """Pause a sandbox whose ttl ran out (``on_timeout="pause"``); a failure is logged (the
        sandbox is then deleted, as a failed pause always does)."""
        try:
            await self.pause(box.record.id)
        except FissionError as exc:
            log.warning("sandbox %s: pausing at its ttl failed: %s", box.record.id, exc)
        finally:
            box.timing_out = False

    async def _stop_idle(self, box: ManagedSandbox) -> None:
        """Stop an idle sandbox's vCPUs unless a call came in meanwhile."""
        async with box.gate.change():
            if box.machine is not None and box.record.state == SandboxState.RUNNING:
                await box.idle.stop(box.machine, time.monotonic() - box.gate.quiet_since)

    # -- create, read, list -------------------------------------------------------------------
    async def create(
        self, spec: SandboxSpec, owner: str | None = None, max_sandboxes: int | None = None
    ) -> SandboxRecord:
        """Start a sandbox for ``spec``; ``owner`` (an API key id) may hold ``max_sandboxes``."""

        def start(directory: Path) -> Awaitable[tuple[Machine, VMConfig]]:
            return sandbox_vm.start_sandbox_vm(
                self.driver, self._run_spec(spec), directory, detached=self.durable
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
        spec = self._run_spec(box.record.spec, code, timeout, env)
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
        stdin: bytes | None = None,
        on_output: OutputSink | None = None,
        checkpoint: bool = False,
        max_snapshot_mb: int | None = None,
    ) -> RunResult:
        """Run a shell command line (a string) or an argv (a list) in the sandbox."""
        if isinstance(command, str):
            if not command.strip():
                raise InvalidInput("the command is empty")
            argv = [SHELL, "-c", command]
        else:
            if not command or not all(isinstance(part, str) and part for part in command):
                raise InvalidInput("the command must be a non-empty list of non-empty strings")
            argv = list(command)
        box = self._box(sandbox_id, owner)
        spec = self._run_spec(box.record.spec, " ".join(argv), timeout, env, stdin)
        limits = spec.limits
        request = ExecRequest(
            argv=argv,
            env=box.record.spec.language.env | proxy_env(spec.network) | spec.env,
            timeout=limits.timeout,
            memory_bytes=limits.memory_mb * MB,
            pids_max=limits.pids,
            output_limit=limits.output_limit_bytes,
            cwd=cwd,
        )
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
        stdin: bytes | None,
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
                if self._is_gone(box):
                    raise self._gone(box) from exc
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
        box = self._box(sandbox_id, owner)
        async with box.gate.operation():
            return await self._file_op(
                box, box.agent.write_file(path, data, mode=mode, timeout=FILE_OP_TIMEOUT)
            )

    async def read_file(
        self, sandbox_id: str, path: str, owner: str | None = None
    ) -> AsyncGenerator[bytes, None]:
        """The file's bytes in chunks; the sandbox stays locked until the last chunk is read."""
        box = self._box(sandbox_id, owner)
        async with box.gate.operation():
            try:
                # aclosing: a reader that stops early still ends the agent's transfer cleanly
                async with contextlib.aclosing(
                    box.agent.read_file(path, timeout=FILE_OP_TIMEOUT)
                ) as chunks:
                    async for chunk in chunks:
                        yield chunk
            except FissionError as exc:
                if self._is_gone(box):
                    raise self._gone(box) from exc
                raise

    async def list_files(self, sandbox_id: str, path: str = ".", owner: str | None = None) -> Any:
        """The entries of a directory in the sandbox."""
        box = self._box(sandbox_id, owner)
        async with box.gate.operation():
            return await self._file_op(box, box.agent.list_files(path, timeout=FILE_OP_TIMEOUT))

    async def stat_file(self, sandbox_id: str, path: str, owner: str | None = None) -> Any:
        """Facts about one path in the sandbox."""
        box = self._box(sandbox_id, owner)
        async with box.gate.operation():
            return await self._file_op(box, box.agent.stat_file(path, timeout=FILE_OP_TIMEOUT))

    async def make_dir(self, sandbox_id: str, path: str, owner: str | None = None) -> Any:
        """Create a directory (and its parents) in the sandbox."""
        box = self._box(sandbox_id, owner)
        async with box.gate.operation():
            return await self._file_op(box, box.agent.make_dir(path, timeout=FILE_OP_TIMEOUT))

    async def remove_file(
        self, sandbox_id: str, path: str, recursive: bool = False, owner: str | None = None
    ) -> None:
        """Remove a file (or a directory tree with ``recursive``) in the sandbox."""
        box = self._box(sandbox_id, owner)
        async with box.gate.operation():
            await self._file_op(
                box, box.agent.remove_file(path, recursive=recursive, timeout=FILE_OP_TIMEOUT)
            )

    async def watch_files(
        self, sandbox_id: str, path: str, recursive: bool = False, owner: str | None = None
    ) -> AsyncGenerator[list[WatchEvent], None]:
        """Batches of changes under a directory; the first (empty) says the watch is in place.

        Only the start holds the sandbox (a watch must not keep it from pausing); the stream
        ends when the sandbox stops, pauses or is deleted.
        """
        box = self._box(sandbox_id, owner)
        async with box.gate.operation():
            stream = box.agent.watch_files(path, recursive=recursive, timeout=FILE_OP_TIMEOUT)
            await self._file_op(box, anext(stream))
        async with contextlib.aclosing(stream):
            yield []
            async for batch in stream:
                yield batch

    async def _file_op(self, box: ManagedSandbox, operation: Any) -> Any:
        try:
            return await operation
        except FissionError as exc:
            if self._is_gone(box):
                raise self._gone(box) from exc
            raise

    # -- pause, resume, delete ------------------------------------------------------------------
    async def pause(self, sandbox_id: str, owner: str | None = None) -> SandboxRecord:
        """Save the sandbox to disk and stop its VM; its memory goes back to the budget."""
        box = self._box(sandbox_id, owner)
        started = time.monotonic()
        async with box.gate.change():
            if box.record.state == SandboxState.PAUSED:
                return box.record
            if box.record.state == SandboxState.LOST:
                raise not_running(box.record)
            machine = box.machine
            if machine is None:
                raise self._gone(box)
            await self._wake(box)  # the agent syncs the guest's disks before the save
            box.machine = None
            self._forget_vm(machine)
            await self._detach(box)
            try:
                await sandbox_vm.pause_vm(machine, box.directory)
                await asyncio.to_thread(integrity.seal, box.directory, (STATE_NAME, DISK_NAME))
            except BaseException as exc:
                await self._audit(
                    box.record.owner,
                    "sandbox.pause",
                    box.record.spec,
                    outcome_of_error(exc),
                    started,
                    {"sandbox": box.record.id},
                )
                await self._destroy(box, "pause failed")
                raise
            box.record.state = SandboxState.PAUSED
            box.record.expires_at = self._clock() + self.paused_retention
            self.budget.release(box.reserved_mb)
            self._save(box)
        await self._audit(
            box.record.owner,
            "sandbox.pause",
            box.record.spec,
            "ok",
            started,
            {"sandbox": box.record.id},
        )
        return box.record

    async def resume(self, sandbox_id: str, owner: str | None = None) -> SandboxRecord:
        """Start a paused sandbox again from its saved state, with its files as they were."""
        box = self._box(sandbox_id, owner)
        started = time.monotonic()
        async with box.gate.change():
            if box.record.state == SandboxState.RUNNING:
                return box.record
            if box.record.state == SandboxState.LOST:
                raise not_running(box.record)
            if box.config is None:
                raise self._gone(box)
            self._reserve(box.reserved_mb)
            try:
                # a changed or truncated file is refused before a VM starts: still paused
                what = f"sandbox {box.record.id}'s saved state"
                await asyncio.to_thread(integrity.verify, box.directory, None, what)
                machine, config = await sandbox_vm.resume_vm(self.driver, box.config, box.directory)
                try:
                    box.egress = await self._attach(box, machine)
                except BaseException:
                    await machine.destroy()
                    raise
            except BaseException as exc:
                self.budget.release(box.reserved_mb)
                await self._audit(
                    box.record.owner,
                    "sandbox.resume",
                    box.record.spec,
                    outcome_of_error(exc),
                    started,
                    {"sandbox": box.record.id},
                )
                raise
            self._journal_vm(machine)
            box.machine, box.config = machine, config
            box.idle = idle.IdleState(self.idle_stop_after)
            box.record.state = SandboxState.RUNNING
            box.record.expires_at = self._clock() + box.record.spec.ttl
            self._save(box)
        await self._audit(
            box.record.owner,
            "sandbox.resume",
            box.record.spec,
            "ok",
            started,
            {"sandbox": box.record.id},
        )
        return box.record

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
            await self._detach(box)
            if machine is not None:
                await machine.destroy()
                self._forget_vm(machine)
        finally:
            if was_running:
                self.budget.release(box.reserved_mb)
            if box.slot is not None:
                box.slot.release()
            await asyncio.to_thread(shutil.rmtree, box.directory, True)
            self.snapshots.sandbox_gone(box.record.id)
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

    async def lose(self, box: ManagedSandbox, reason: str) -> None:
        """Mark a sandbox ``lost`` (its VM or saved state is gone): what is left of its VM and
        its directory go, its memory and quota slot are given back, its record stays."""
        was_running = box.record.state == SandboxState.RUNNING
        box.record.state, box.record.lost_reason = SandboxState.LOST, reason
        box.record.expires_at = self._clock() + self.paused_retention
        machine, box.machine, box.config = box.machine, None, None
        log.warning("sandbox %s is lost: %s", box.record.id, reason)
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
            self._save(box)
        await self._audit(
            box.record.owner,
            "sandbox.lost",
            box.record.spec,
            reason,
            None,
            {"sandbox": box.record.id},
        )

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
                if self._is_gone(box):  # deleted meanwhile, as a run in flight would learn
                    raise self._gone(box) from exc
                raise

    def _box(self, sandbox_id: str, owner: str | None) -> ManagedSandbox:
        log_context.sandbox_id.set(sandbox_id)  # the rest of this call's log lines name it
        box = self._sandboxes.get(sandbox_id)
        if box is None or (owner is not None and box.record.owner != owner):
            raise SandboxNotFound(
                f"no sandbox {sandbox_id!r}: it was deleted, expired, or never existed"
            )
        return box

    def _is_gone(self, box: ManagedSandbox) -> bool:
        return box.record.state == SandboxState.DELETED

    @staticmethod
    def _gone(box: ManagedSandbox) -> SandboxNotFound:
        return SandboxNotFound(f"sandbox {box.record.id} was deleted or expired")

    def _reserve(self, mb: int) -> None:
        if not self.budget.reserve(mb):
            raise Busy(
                f"the memory budget ({self.budget.total_mb} MB, {self.budget.used_mb} MB in "
                f"use) has no room for a {mb} MB sandbox: pause or delete sandboxes, or raise "
                "--memory-budget"
            )

    @staticmethod
    def _run_spec(
        spec: SandboxSpec,
        code: str = "",
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> RunSpec:
        limits = spec.limits if timeout is None else replace(spec.limits, timeout=timeout)
        return RunSpec(
            spec.language, code, limits, spec.env | (env or {}), stdin, network=spec.network
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

    @staticmethod
    async def _detach(box: ManagedSandbox) -> None:
        """Close the sandbox's egress proxy, if any (before its VM goes)."""
        egress, box.egress = box.egress, None
        if egress is not None:
            await egress.aclose()

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
