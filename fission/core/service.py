"""The Service: the one API every adapter calls, in-process or inside the daemon.

One-shot runs (with network policy, uploads and downloads), ``install``, ``repo`` and, through
``Service.sandboxes``, persistent sandboxes. The CLI and the SDK reach it embedded (a Service in
their own process: ``embedded_service``) or through the daemon's REST API (the daemon runs one
Service and its adapters, REST, gRPC and MCP, call it); which of the two is decided once, in
``fission.sdk._backend``. Nothing here knows about HTTP.

A run whose limits fit the snapshot takes a machine from the language's warm pool when the
service has one; other runs (more CPUs, another disk size, no pool) get a VM of their own inside
the same memory budget. Every machine is destroyed after one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio

from fission import log_context
from fission.agent.client import OutputSink
from fission.auth.audit_log import (
    LOCAL,
    AuditLog,
    describe_code,
    outcome_of_error,
    outcome_of_result,
)
from fission.config import runtime_dir, use_runtime_dir
from fission.core import (
    derived,
    idle,
    keeper,
    orchestrator,
    sandbox_restore,
    snapshots,
    telemetry,
    template_build,
    templates,
)
from fission.core.audit_events import audit_egress, audit_event, audit_local_egress
from fission.core.catalog import Catalog
from fission.core.execution import execute
from fission.core.journal import Journal
from fission.core.languages import Language, resolve_language
from fission.core.limits import Limits
from fission.core.machines import GUEST_OVERHEAD_MB, Machine, exec_request
from fission.core.pool import MemoryBudget, WarmPool
from fission.core.provision import InstallResult, plan_install, plan_repo
from fission.core.sandbox_lifetimes import PAUSED_RETENTION
from fission.core.sandboxes import SandboxManager
from fission.core.service_options import default_budget_mb
from fission.core.spec import RunResult, RunSpec
from fission.core.state_dirs import lock_state_dir, sweep_stale
from fission.core.telemetry import Telemetry, outcome_kind
from fission.core.template_build import BuiltTemplate
from fission.core.transfers import Upload, check_transfers, pull, push
from fission.errors import Busy, InvalidInput
from fission.net.egress import attach
from fission.vmm.base import Driver, default_driver

log = logging.getLogger("fission.service")
CLONE_MB = snapshots.TEMPLATE_CAPACITY_MB + GUEST_OVERHEAD_MB
EMBEDDED_PREFIX = "embedded-"
Release = Callable[[], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class ServiceConfig:
    """How a Service runs: pool sizes, memory budget, deadlines and where its state lives."""

    state_dir: Path
    pools: dict[str, int] = field(default_factory=lambda: {"python": 2})
    memory_budget_mb: int = 8192
    acquire_timeout: float = 10.0
    audit_db: Path | None = None  # SQLite file of the audit log; None: no audit log
    # Without an audit log, still record egress decisions in the default one (embedded runs,
    # so `fission audit` shows what a local run's network policy allowed and refused).
    audit_egress_locally: bool = False
    # Seconds a sandbox with nothing in flight runs before its vCPUs stop (None: never).
    sandbox_idle_stop: float | None = idle.SANDBOX_IDLE_STOP
    # Disk the sandbox snapshots and checkpoints may take (None: no bound); LRU eviction.
    snapshot_budget_mb: int | None = None
    # Put this process's VM directories under the state dir (``vms/``), where a restart's
    # reconcile finds them all. A daemon or an MCP server owns its process and does; embedded
    # runs share the caller's process (maybe several at once) and leave the runtime dir alone.
    vms_in_state_dir: bool = True
    # Sandboxes outlive the process (a daemon): their VMs are detached and catalogued, a
    # restart re-attaches them, and ``on_stop`` says what a stop does with running ones.
    durable_sandboxes: bool = False
    on_stop: str = "keep"
    paused_retention: float = PAUSED_RETENTION
    keeper_grace: float = keeper.DEFAULT_GRACE  # seconds past a ttl before the keeper kills
    # The VMM driver every VM of this service comes from (tests pass the fake one).
    driver: Driver = field(default_factory=default_driver, compare=False)


@dataclass
class Lease:
    """A machine taken for one run, and how to give it back (destroy it, free its memory)."""

    machine: Machine
    release: Release
    disposed: bool = False
    requested: float = 0.0  # time.monotonic() when the machine was asked for


class Service:
    """Pools, budget, journal and sandboxes of one daemon (or one embedded process)."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.driver = config.driver
        self.budget = MemoryBudget(config.memory_budget_mb)
        self.journal = Journal(config.state_dir)
        self.pools: dict[str, WarmPool] = {}
        self.reconciled: dict[str, int] = {}
        self._disposals: set[asyncio.Task[None]] = set()
        self.audit = AuditLog(config.audit_db) if config.audit_db is not None else None
        self.telemetry = Telemetry()  # the daemon's metrics listen here (server.metrics)
        self.sandboxes = SandboxManager(
            self.budget,
            self.journal,
            self.audit,
            driver=self.driver,
            idle_stop_after=config.sandbox_idle_stop,
            telemetry=self.telemetry,
            snapshot_budget_mb=config.snapshot_budget_mb,
            catalog=Catalog(config.state_dir),
            durable=config.durable_sandboxes,
            on_stop=config.on_stop,
            paused_retention=config.paused_retention,
        )
        # `fission install`'s derived snapshots live under the same snapshot budget
        self.sandboxes.snapshots.derived_root = derived.derived_dir()
        if config.durable_sandboxes:
            self.sandboxes.on_running = functools.partial(
                keeper.ensure, config.state_dir, config.keeper_grace
            )
        self.restored: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Clean up after a dead predecessor, take back its catalogued sandboxes, then start
        filling the pools."""
        catalog = self.sandboxes.catalog
        assert catalog is not None
        entries = catalog.entries()
        if not self.config.durable_sandboxes:  # their VMs died with the process
            for entry in entries:
                catalog.remove(entry.id)
            entries = []
        keep_vms, keep_sandboxes = sandbox_restore.catalogued_ids(entries)
        self.reconciled = self.journal.reconcile(self.driver, keep_vms, keep_sandboxes)
        if any(self.reconciled.values()):
            log.warning("removed what a previous daemon left: %s", self.reconciled)
        if entries:
            self.restored = await sandbox_restore.restore(self.sandboxes, entries)
            log.warning("took back the sandboxes of a previous daemon: %s", self.restored)
        if self.config.vms_in_state_dir:
            use_runtime_dir(self.journal.vms_dir)
        for name, size in self.config.pools.items():
            language = resolve_language(name)
            if size <= 0 or language.name in self.pools:
                continue
            pool = WarmPool(
                language.name,
                size,
                self.budget,
                CLONE_MB,
                factory=self._clone_factory(language),
                on_retire=self._forget,
                warm=functools.partial(orchestrator.warm_up, language=language),
                telemetry=self.telemetry,
            )
            self.pools[language.name] = pool
            pool.start()
        self.sandboxes.start()

    async def close(self) -> None:
        """Destroy every VM the pools and sandboxes hold and wait for pending releases."""
        await self.sandboxes.close()
        await asyncio.gather(*(pool.close() for pool in self.pools.values()))
        await asyncio.gather(*self._disposals, return_exceptions=True)

    def status(self) -> dict[str, Any]:
        """Pools and budget, JSON-ready."""
        return {
            "pools": [pool.status() for pool in self.pools.values()],
            "memory_budget_mb": self.budget.total_mb,
            "memory_reserved_mb": self.budget.used_mb,
            "reconciled": self.reconciled,
            "sandboxes": self.sandboxes.count(),
        }

    async def cluster_status(self) -> dict[str, Any]:
        """This host as a fleet of one (``GET /v1/cluster``; a fleet's front end lists all)."""
        status = self.status()
        census = {state: n for state, n in self.sandboxes.census().items() if n}
        host = {
            "name": "local",
            "node_id": "",
            "alive": True,
            "draining": False,
            "memory_budget_mb": status["memory_budget_mb"],
            "memory_reserved_mb": status["memory_reserved_mb"],
            "pools": status["pools"],
            "sandboxes": census,
        }
        return {
            "hosts": [host],
            "alive": 1,
            "memory_budget_mb": status["memory_budget_mb"],
            "memory_reserved_mb": status["memory_reserved_mb"],
        }

    # -- machines ----------------------------------------------------------------------------------
    def _clone_factory(self, language: Language) -> Callable[[], Awaitable[Machine]]:
        async def factory() -> Machine:
            started = time.monotonic()
            machine = await orchestrator.clone(language, self.driver)
            self.journal.record(machine.vm)
            self.telemetry.emit(
                telemetry.VM_START,
                time.monotonic() - started,
                language=language.name,
                source="pool",
            )
            return machine

        return factory

    async def _forget(self, machine: Machine) -> None:
        self.journal.forget(machine.vm)

    async def acquire(self, spec: RunSpec) -> Lease:
        """A machine for ``spec``: from its pool when one fits, else started now (Busy if full)."""
        requested = time.monotonic()
        if spec.template is not None:
            spec = template_build.run_spec(spec.template, spec)
        language = spec.language.name
        pool = self.pools.get(language)
        pooled = pool is not None and snapshots.fits(spec.limits) and spec.template is None
        try:
            if spec.template is not None:
                lease = await self._template_lease(spec, spec.template)
                lease.requested = requested
            elif pool is not None and pooled:
                machine = await pool.acquire(self.config.acquire_timeout)
                lease = Lease(machine, lambda: pool.release(machine), requested=requested)
            else:
                boot = functools.partial(orchestrator.boot, spec, driver=self.driver)
                lease = await self._own_machine(spec, boot)
                lease.requested = requested
        except Busy:
            self.telemetry.emit(telemetry.BUSY, language=language)
            raise
        source = "pool" if pooled else "fresh"
        self.telemetry.emit(
            telemetry.ACQUIRE, time.monotonic() - requested, language=language, source=source
        )
        return lease

    async def _own_machine(self, spec: RunSpec, start: Callable[[], Awaitable[Machine]]) -> Lease:
        """A machine started by ``start`` inside the memory budget, journaled while it lives."""
        fits = snapshots.fits(spec.limits)
        needed = CLONE_MB if fits else spec.limits.memory_mb + GUEST_OVERHEAD_MB
        if not self.budget.reserve(needed):
            raise Busy(
                f"the memory budget ({self.budget.total_mb} MB, {self.budget.used_mb} MB in use) "
                f"has no room for a {needed} MB VM: raise --memory-budget or retry later"
            )
        started = time.monotonic()
        try:
            machine = await start()
        except BaseException:
            self.budget.release(needed)
            raise
        self.journal.record(machine.vm)
        self.telemetry.emit(
            telemetry.VM_START,
            time.monotonic() - started,
            language=spec.language.name,
            source="fresh",
        )

        async def release() -> None:
            try:
                await machine.destroy()
                self.journal.forget(machine.vm)
            finally:
                self.budget.release(needed)

        return Lease(machine, release)

    def dispose(self, lease: Lease) -> None:
        """Release a lease in a task of its own, so a cancelled request cannot stop it halfway.

        Safe to call twice (an adapter disposes in its own ``finally`` in case the run never
        started); ``close`` waits for every such task.
        """
        if lease.disposed:
            return
        lease.disposed = True
        task = asyncio.create_task(lease.release())
        self._disposals.add(task)
        task.add_done_callback(self._disposals.discard)

    # -- one-shot runs -----------------------------------------------------------------------------
    async def run(
        self,
        spec: RunSpec,
        on_output: OutputSink | None = None,
        *,
        who: str = LOCAL,
        uploads: Sequence[Upload] = (),
        downloads: Sequence[str] = (),
        lease: Lease | None = None,
        action: str = "run",
    ) -> RunResult:
        """Run ``spec`` on a fresh machine (``lease``'s, when the caller took one already).

        ``uploads`` are written into the VM before the program starts; the files named by
        ``downloads`` are read out after it ended, into ``RunResult.files``. The machine is
        destroyed afterwards, on every path. Every run and egress decision is audited.
        """
        started = time.monotonic()
        try:
            if spec.template is not None:  # its language, env and default limits
                spec = template_build.run_spec(spec.template, spec)
            check_transfers(uploads, downloads)
            if lease is None:
                lease = await self.acquire(spec)
        except BaseException as exc:
            if lease is not None:
                self.dispose(lease)
            await self._audit(who, action, spec, outcome_of_error(exc), started)
            self._ran(action, spec, outcome_of_error(exc), started)
            raise
        try:
            return await self._run_on(
                lease.machine,
                spec,
                on_output,
                who,
                uploads,
                downloads,
                action,
                requested=lease.requested or started,
            )
        finally:
            self.dispose(lease)

    async def _run_on(
        self,
        machine: Machine,
        spec: RunSpec,
        on_output: OutputSink | None,
        who: str,
        uploads: Sequence[Upload] = (),
        downloads: Sequence[str] = (),
        action: str = "run",
        *,
        requested: float | None = None,
    ) -> RunResult:
        """Run ``spec`` on ``machine`` with its egress proxy and transfers; audit how it ended.

        ``requested`` is when the machine was asked for (the run's total time counts from it).
        """
        started = time.monotonic()
        requested = requested or started
        log_context.sandbox_id.set(machine.vm.config.vm_id)  # this task's log lines name the VM
        events: list[dict[str, Any]] = []
        egress = None
        try:
            egress = await attach(machine.agent, spec.network, events.append)
            await push(machine.agent, uploads)
            executing = time.monotonic()
            execution = await execute(
                machine.agent,
                replace(exec_request(spec), last_run=True),  # one run per machine
                on_output,
                spec.stdin,
                diagnostics=machine.vm.diagnostics,
            )
            self.telemetry.emit(
                telemetry.EXEC,
                time.monotonic() - executing,
                language=spec.language.name,
                kind="run",
            )
            result = execution.result
            if downloads and not execution.wedged:
                result = replace(result, files=await pull(machine.agent, downloads))
        except BaseException as exc:
            await self._audit(who, action, spec, outcome_of_error(exc), started)
            self._ran(action, spec, outcome_of_error(exc), requested)
            raise
        finally:
            if egress is not None:
                await egress.aclose()
            for event in events:
                decision = str(event.get("decision", "?"))
                self.telemetry.emit(telemetry.EGRESS, decision=decision, source="run")
            await self._audit_egress(who, spec, events, f"{action}.egress")
        await self._audit(who, action, spec, outcome_of_result(result), started)
        self._ran(action, spec, outcome_of_result(result), requested)
        return result

    def _ran(self, action: str, spec: RunSpec, outcome: str, since: float) -> None:
        """Log and measure the end of a run, ``since`` being when it asked for a machine."""
        elapsed = time.monotonic() - since
        log.info("%s %s ended: %s in %.1f ms", spec.language.name, action, outcome, elapsed * 1000)
        self.telemetry.emit(
            telemetry.RUN,
            elapsed,
            language=spec.language.name,
            action=action,
            outcome=outcome_kind(outcome),
        )

    # -- install and repo --------------------------------------------------------------------------
    async def install(
        self,
        language: Language,
        packages: Sequence[str],
        command: str,
        on_output: OutputSink | None = None,
        *,
        index_url: str | None = None,
        allow_hosts: Sequence[str] = (),
        limits: Limits | None = None,
        who: str = LOCAL,
    ) -> InstallResult:
        """Install ``packages`` (or restore them from the cache), then run ``command``."""
        plan = plan_install(
            language,
            packages,
            command,
            index_url=index_url,
            allow_hosts=allow_hosts,
            limits=limits,
        )
        image = language.image
        key = await derived.derived_key(image, *plan.key_parts, driver=self.driver)
        started = time.monotonic()
        directory = derived.find(plan.name, key)
        cached = directory is not None
        if directory is None:

            async def set_up(machine: Machine) -> tuple[bool, RunResult]:
                result = await self._run_on(machine, plan.setup, on_output, who, action="install")
                return result.exit_code == 0, result

            directory, setup_result = await derived.build(
                plan.name, key, image, set_up, driver=self.driver
            )
            if directory is None:  # the package manager failed: its result is the answer
                elapsed = (time.monotonic() - started) * 1000
                return InstallResult(setup_result, False, elapsed, installed=False)
        setup_ms = (time.monotonic() - started) * 1000
        built = directory
        lease = await self._own_machine(
            plan.command, lambda: derived.restore(built, image, driver=self.driver)
        )
        result = await self.run(plan.command, on_output, who=who, lease=lease, action="install")
        return InstallResult(result, cached, setup_ms)

    async def repo(
        self,
        language: Language,
        url: str | None,
        command: str,
        on_output: OutputSink | None = None,
        *,
        ref: str | None = None,
        allow_hosts: Sequence[str] = (),
        limits: Limits | None = None,
        files: Sequence[Upload] = (),
        who: str = LOCAL,
    ) -> RunResult:
        """Clone ``url`` (or, with None, use ``files`` uploaded into the workdir), then run."""
        spec = plan_repo(language, url, command, ref=ref, allow_hosts=allow_hosts, limits=limits)
        return await self.run(spec, on_output, who=who, uploads=files, action="repo")

    # -- templates ---------------------------------------------------------------------------------
    async def build_template(
        self, path: Path, on_output: OutputSink | None = None, *, who: str = LOCAL
    ) -> tuple[BuiltTemplate, bool]:
        """Build the template file at ``path`` (or find it cached); (template, cached)."""
        plan = template_build.plan_build(templates.load(path, template_build.source_of))
        await asyncio.to_thread(template_build.prepare_image, plan)
        image = plan.language.image
        key = await derived.derived_key(image, *plan.key_parts, driver=self.driver)
        directory = derived.find(plan.snapshot_name, key)
        cached = directory is not None
        if directory is None:

            async def set_up(machine: Machine) -> tuple[bool, RunResult | None]:
                if plan.setup is None:  # files only
                    await push(machine.agent, plan.uploads)
                    return True, None
                result = await self._run_on(
                    machine, plan.setup, on_output, who, plan.uploads, action="template.build"
                )
                return result.exit_code == 0, result

            directory, result = await derived.build(
                plan.snapshot_name, key, image, set_up, driver=self.driver
            )
            if directory is None:
                assert result is not None
                raise template_build.setup_failed(plan, result)
        return template_build.save(plan, key, directory, path.resolve()), cached

    async def _template_lease(self, spec: RunSpec, name: str) -> Lease:
        """A machine restored from the template's snapshot."""
        built = template_build.get(name)
        if not snapshots.fits(spec.limits):
            raise InvalidInput(
                f"template {name} runs with the default --cpus and --disk "
                f"and at most {snapshots.TEMPLATE_CAPACITY_MB} MB of memory"
            )
        image = built.language.image
        return await self._own_machine(
            spec, lambda: derived.restore(built.snapshot, image, driver=self.driver)
        )

    # -- audit -------------------------------------------------------------------------------------
    async def _audit(
        self, who: str, action: str, spec: RunSpec, outcome: str, started: float
    ) -> None:
        await audit_event(
            self.audit,
            who,
            action,
            language=spec.language.name,
            limits=spec.limits,
            outcome=outcome,
            duration_ms=(time.monotonic() - started) * 1000.0,
            detail=describe_code(spec.code),
        )

    async def _audit_egress(
        self, who: str, spec: RunSpec, events: list[dict[str, Any]], action: str
    ) -> None:
        if self.audit is None and self.config.audit_egress_locally:
            await audit_local_egress(spec, events, action)
        else:
            await audit_egress(self.audit, who, spec, events, action)


@contextlib.asynccontextmanager
async def private_service(
    prefix: str,
    config: Callable[[Path], ServiceConfig],
    close_deadline: float = 30.0,
    *,
    make: Callable[[ServiceConfig], Service] | None = None,
    several: bool = False,
) -> AsyncIterator[Service]:
    """A started Service whose state dir belongs to this process alone (``<prefix><pid>``).

    With ``several`` the process may run more than one at once (embedded runs gathered in one
    event loop, or in threads): each dir is ``<prefix><pid>-<random>``.

    The dir is locked while the service lives and removed when it stops; what a process killed
    before it could clean up left behind (its VMs, their files and cgroups) is swept by the next
    process with the same prefix to start. Every VM is destroyed on the way out, even when the
    caller is cancelled (within ``close_deadline`` seconds).
    """
    root = runtime_dir()
    sweep_stale(root, prefix)
    suffix = f"-{secrets.token_hex(4)}" if several else ""
    state_dir = root / f"{prefix}{os.getpid()}{suffix}"
    lock = lock_state_dir(state_dir)
    try:
        service = (make or Service)(config(state_dir))
        try:
            await service.start()
            yield service
        finally:
            # Shielded: a cancelled caller (SIGTERM, a closed connection) must still clean up.
            with anyio.move_on_after(close_deadline, shield=True) as scope:
                await service.close()
            if scope.cancelled_caught:
                log.error("VMs were still being destroyed after %.0f s", close_deadline)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
        lock.close()


def embedded_config(state_dir: Path) -> ServiceConfig:
    """An embedded Service: no pools (each run starts its own clone), egress audited locally."""
    return ServiceConfig(
        state_dir=state_dir,
        pools={},
        memory_budget_mb=default_budget_mb(),
        audit_db=None,
        audit_egress_locally=True,
        vms_in_state_dir=False,
    )


def embedded_service() -> contextlib.AbstractAsyncContextManager[Service]:
    """A Service in this process for the runs of one CLI command or SDK call."""
    return private_service(EMBEDDED_PREFIX, embedded_config, several=True)
