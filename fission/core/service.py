"""The daemon's core: warm pools per language, a memory budget, and the journal of its VMs.

Adapters (the HTTP server now, gRPC and MCP later) call ``Service.run``; nothing here knows
about HTTP. Runs whose limits fit the snapshot come from the pool; others (more CPUs, another
disk size) get a VM of their own, inside the same memory budget.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fission.agent.client import OutputSink
from fission.auth.audit_log import (
    LOCAL,
    AuditLog,
    describe_code,
    outcome_of_error,
    outcome_of_result,
)
from fission.config import use_runtime_dir
from fission.core import orchestrator, snapshots
from fission.core.audit_events import audit_egress, audit_event
from fission.core.journal import Journal
from fission.core.languages import resolve_language
from fission.core.machines import GUEST_OVERHEAD_MB, Machine
from fission.core.pool import MemoryBudget, WarmPool
from fission.core.sandboxes import SandboxManager
from fission.core.spec import RunResult, RunSpec
from fission.errors import Busy
from fission.net.egress import attach
from fission.vmm.base import Driver, default_driver

log = logging.getLogger("fission.service")
CLONE_MB = snapshots.TEMPLATE_CAPACITY_MB + GUEST_OVERHEAD_MB
Release = Callable[[], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class ServiceConfig:
    """How the daemon runs: pool sizes, memory budget, deadlines and where its state lives."""

    state_dir: Path
    pools: dict[str, int] = field(default_factory=lambda: {"python": 2})
    memory_budget_mb: int = 8192
    acquire_timeout: float = 10.0
    audit_db: Path | None = None  # SQLite file of the audit log; None: no audit log
    # The VMM driver every VM of this service comes from (tests pass the fake one).
    driver: Driver = field(default_factory=default_driver, compare=False)


class Service:
    """Pools, budget and journal of one daemon."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.driver = config.driver
        self.budget = MemoryBudget(config.memory_budget_mb)
        self.journal = Journal(config.state_dir)
        self.pools: dict[str, WarmPool] = {}
        self.reconciled: dict[str, int] = {}
        self._disposals: set[asyncio.Task[None]] = set()
        self.audit = AuditLog(config.audit_db) if config.audit_db is not None else None
        self.sandboxes = SandboxManager(self.budget, self.journal, self.audit, driver=self.driver)

    async def start(self) -> None:
        """Clean up after a dead predecessor, then start filling the pools."""
        self.reconciled = self.journal.reconcile(self.driver)
        if any(self.reconciled.values()):
            log.warning("removed what a previous daemon left: %s", self.reconciled)
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
                factory=self._clone_factory(language.name),
                on_retire=self._forget,
            )
            self.pools[language.name] = pool
            pool.start()
        self.sandboxes.start()

    def _clone_factory(self, name: str) -> Callable[[], Awaitable[Machine]]:
        async def factory() -> Machine:
            machine = await orchestrator.warm_clone(resolve_language(name), self.driver)
            self.journal.record(machine.vm)
            return machine

        return factory

    async def _forget(self, machine: Machine) -> None:
        self.journal.forget(machine.vm)

    async def acquire(self, spec: RunSpec) -> tuple[Machine, Release]:
        """A machine for ``spec`` and the coroutine function that releases it."""
        pool = self.pools.get(spec.language.name)
        if pool is not None and snapshots.fits(spec.limits):
            machine = await pool.acquire(self.config.acquire_timeout)
            return machine, lambda: pool.release(machine)
        needed = spec.limits.memory_mb + GUEST_OVERHEAD_MB
        if snapshots.fits(spec.limits):
            needed = CLONE_MB
        if not self.budget.reserve(needed):
            raise Busy(
                f"the memory budget ({self.budget.total_mb} MB, {self.budget.used_mb} MB in use) "
                f"has no room for a {needed} MB VM: raise --memory-budget or retry later"
            )
        try:
            machine = await orchestrator.boot(spec, driver=self.driver)
        except BaseException:
            self.budget.release(needed)
            raise
        self.journal.record(machine.vm)

        async def release() -> None:
            try:
                await machine.destroy()
                self.journal.forget(machine.vm)
            finally:
                self.budget.release(needed)

        return machine, release

    def dispose(self, release: Release) -> None:
        """Release a machine in a task of its own, so a cancelled request cannot stop it halfway.

        ``close`` waits for every such task.
        """
        task = asyncio.create_task(release())
        self._disposals.add(task)
        task.add_done_callback(self._disposals.discard)

    async def run(
        self, spec: RunSpec, on_output: OutputSink | None = None, who: str = LOCAL
    ) -> RunResult:
        """Run ``spec`` on a fresh machine; the machine is destroyed afterwards."""
        started = asyncio.get_running_loop().time()
        try:
            machine, release = await self.acquire(spec)
        except BaseException as exc:
            await self._audit(who, spec, outcome_of_error(exc), started)
            raise
        try:
            return await self.run_on(machine, spec, on_output, who)
        finally:
            self.dispose(release)

    async def run_on(
        self,
        machine: Machine,
        spec: RunSpec,
        on_output: OutputSink | None = None,
        who: str = LOCAL,
    ) -> RunResult:
        """Run ``spec`` on an acquired machine, and audit who ran it and how it ended."""
        started = asyncio.get_running_loop().time()
        events: list[dict[str, Any]] = []
        egress = None
        try:
            egress = await attach(machine.agent, spec.network, events.append)
            result = await orchestrator.run_in_vm(machine.vm, machine.agent, spec, on_output)
        except BaseException as exc:
            await self._audit(who, spec, outcome_of_error(exc), started)
            raise
        finally:
            if egress is not None:
                await egress.aclose()
            await audit_egress(self.audit, who, spec, events, "run.egress")
        await self._audit(who, spec, outcome_of_result(result), started)
        return result

    async def _audit(self, who: str, spec: RunSpec, outcome: str, started: float) -> None:
        elapsed = (asyncio.get_running_loop().time() - started) * 1000.0
        await audit_event(
            self.audit,
            who,
            "run",
            language=spec.language.name,
            limits=spec.limits,
            outcome=outcome,
            duration_ms=elapsed,
            detail=describe_code(spec.code),
        )

    def status(self) -> dict[str, Any]:
        """Pools and budget, JSON-ready."""
        return {
            "pools": [pool.status() for pool in self.pools.values()],
            "memory_budget_mb": self.budget.total_mb,
            "memory_reserved_mb": self.budget.used_mb,
            "reconciled": self.reconciled,
            "sandboxes": self.sandboxes.count(),
        }

    async def close(self) -> None:
        """Destroy every VM the pools and sandboxes hold and wait for pending releases."""
        await self.sandboxes.close()
        await asyncio.gather(*(pool.close() for pool in self.pools.values()))
        await asyncio.gather(*self._disposals, return_exceptions=True)
