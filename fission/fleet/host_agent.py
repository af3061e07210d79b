"""The host agent: one Ray actor per fission host, wrapping that host's ``Service``.

The control actor starts one on every node that offers the ``fission_host`` resource, pinned to
that node (``NodeAffinitySchedulingStrategy``, hard), with a state dir of its own under the
fleet's state root (``<root>/<host name>``), so several hosts on one machine (tests, the bench)
do not share pools, journals or catalogs. The agent is an async actor: every call runs in its
event loop, beside the Service's pools and sandboxes. It pushes what changed in its sandboxes to
the control actor every ``SYNC_INTERVAL`` seconds (a ttl ran out, an idle one was paused), and
answers ``status`` for placement. Runs stream back as a Ray streaming generator of output lines
and then the result, so the front end streams them on to the client as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fission.agent.client import OutputSink
from fission.core import idle, sandbox_moves
from fission.core.catalog import CatalogEntry
from fission.core.sandbox_spec import MAX_PAGE_SIZE, SandboxRecord
from fission.core.service import Lease, Service, ServiceConfig
from fission.core.spec import RunSpec
from fission.fleet.catalog import row_of
from fission.vmm.base import Driver

log = logging.getLogger("fission.fleet.host")
SYNC_INTERVAL = 1.0  # seconds between a host's reports of what changed on it
END = object()


@dataclass(frozen=True)
class HostSettings:
    """How every host of the fleet runs its Service (the front end that starts the fleet says)."""

    state_root: Path
    pools: dict[str, int] = field(default_factory=lambda: {"python": 1})
    memory_budget_mb: int = 4096
    # Makes each host's VMM driver; None: the host's default (QEMU). Tests and the
    # control-plane bench pass the fake driver's class.
    driver: Callable[[], Driver] | None = None
    acquire_timeout: float = 10.0
    sandbox_idle_stop: float | None = idle.SANDBOX_IDLE_STOP

    def service_config(self, name: str) -> ServiceConfig:
        """The Service config of the host called ``name``."""
        extra: dict[str, Any] = {}
        if self.driver is not None:
            extra["driver"] = self.driver()
        return ServiceConfig(
            state_dir=self.state_root / name,
            pools=dict(self.pools),
            memory_budget_mb=self.memory_budget_mb,
            acquire_timeout=self.acquire_timeout,
            sandbox_idle_stop=self.sandbox_idle_stop,
            on_stop="delete",
            **extra,
        )


def rss_mb() -> float:
    """This process's resident memory in MiB (the agent's own cost, VMs aside)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class HostAgent:
    """One host's Service, behind Ray actor methods (``ray.remote`` is applied by ``control``)."""

    def __init__(self, name: str, node_id: str, settings: HostSettings, control: Any) -> None:
        self.name = name
        self.node_id = node_id
        self.settings = settings
        self.control = control
        self.service: Service | None = None
        self.leases: dict[str, Lease] = {}
        self._reported: dict[str, tuple[str, float, str | None]] = {}
        self._sync: asyncio.Task[None] | None = None

    async def start(self) -> str:
        """Start the host's Service (idempotent); returns the host's name."""
        if self.service is None:
            config = self.settings.service_config(self.name)
            config.state_dir.mkdir(parents=True, exist_ok=True)
            service = Service(config)
            await service.start()
            self.service = service
            self._sync = asyncio.create_task(self._sync_loop(), name="fleet-sync")
        return self.name

    async def stop(self) -> None:
        """Destroy every VM of this host (the fleet is being taken down)."""
        if self._sync is not None:
            self._sync.cancel()
        if self.service is not None:
            await self.service.close()

    def ping(self) -> str:
        """The host's name: it answers."""
        return self.name

    def status(self) -> dict[str, Any]:
        """Capacity, pools and sandboxes of this host, for placement and ``cluster status``."""
        service = self._service()
        return {
            "host": self.name,
            "node_id": self.node_id,
            "service": service.status(),
            "census": service.sandboxes.census(),
            "rss_mb": rss_mb(),
            "at": time.time(),
        }

    # -- one-shot runs ---------------------------------------------------------------------------
    async def acquire(self, spec: RunSpec) -> str:
        """Take a machine for ``spec`` (Busy if this host has none); the lease's id."""
        lease = await self._service().acquire(spec)
        lease_id = secrets.token_hex(8)
        self.leases[lease_id] = lease
        return lease_id

    def dispose(self, lease_id: str) -> None:
        """Give back a lease whose run never started (a no-op once the run took it)."""
        lease = self.leases.pop(lease_id, None)
        if lease is not None:
            self._service().dispose(lease)

    async def stream(self, action: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run ``action`` (run, install, repo), yielding ``("output", stream, data)`` tuples as
        they come and then ``("result", result)``; an error ends the stream by raising."""
        service = self._service()
        if "lease" in kwargs:
            kwargs["lease"] = self.leases.pop(kwargs["lease"], None)
        method = getattr(service, action)
        async for item in output_then_result(lambda sink: method(*args, sink, **kwargs)):
            yield item

    # -- sandboxes -------------------------------------------------------------------------------
    async def call(self, target: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """``Service.sandboxes.<method>`` (target "sandboxes"), ``.snapshots.<method>`` or
        ``.snapshots.store.<method>`` (target "store")."""
        manager = self._service().sandboxes
        owner: Any = {"snapshots": manager.snapshots, "store": manager.snapshots.store}.get(
            target, manager
        )
        result = getattr(owner, method)(*args, **kwargs)
        if asyncio.iscoroutine(result):
            result = await result
        return result

    async def sandbox_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """A sandbox run or command (``run_code``, ``exec_command``), streamed like ``stream``."""
        call = getattr(self._service().sandboxes, method)
        async for item in output_then_result(lambda sink: call(*args, on_output=sink, **kwargs)):
            yield item

    async def read_file(self, sandbox_id: str, path: str, owner: str | None) -> Any:
        """A sandbox file's bytes, streamed in the agent's chunks."""
        chunks = self._service().sandboxes.read_file(sandbox_id, path, owner)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    async def watch_files(
        self, sandbox_id: str, path: str, recursive: bool, owner: str | None
    ) -> Any:
        """Batches of changes under a directory in a sandbox, streamed as they come."""
        batches = self._service().sandboxes.watch_files(sandbox_id, path, recursive, owner)
        try:
            async for batch in batches:
                yield batch
        finally:
            await batches.aclose()

    async def export_paused(self, sandbox_id: str) -> tuple[CatalogEntry, bytes]:
        """A paused sandbox's catalog row and packed files, to move it to another host."""
        return await sandbox_moves.export_paused(self._service().sandboxes, sandbox_id)

    async def import_paused(self, entry: CatalogEntry, blob: bytes) -> None:
        """Take in a paused sandbox exported by another host."""
        await sandbox_moves.import_paused(self._service().sandboxes, entry, blob)
        self._reported.pop(entry.id, None)

    async def forget_moved(self, sandbox_id: str) -> None:
        """Drop this host's copy of a sandbox that moved away."""
        await sandbox_moves.forget_moved(self._service().sandboxes, sandbox_id)
        self._reported.pop(sandbox_id, None)

    # -- reports ---------------------------------------------------------------------------------
    async def _sync_loop(self) -> None:
        """Report what changed in this host's sandboxes to the control actor, forever."""
        while True:
            await asyncio.sleep(SYNC_INTERVAL)
            try:
                await self._report()
            except Exception as exc:  # the control actor restarting: report again next time
                log.warning("host %s: report failed: %s", self.name, exc)

    async def _report(self) -> None:
        manager = self._service().sandboxes
        records: dict[str, SandboxRecord] = {}
        cursor: str | None = None
        while True:
            chunk, cursor = manager.list_sandboxes(limit=MAX_PAGE_SIZE, cursor=cursor)
            records.update((r.id, r) for r in chunk)
            if cursor is None:
                break
        changed = []
        for sandbox_id, record in records.items():
            facts = (record.state.value, record.expires_at, record.lost_reason)
            if self._reported.get(sandbox_id) != facts:
                changed.append((sandbox_id, facts, row_of(record, self.name)))
        removed = [sandbox_id for sandbox_id in self._reported if sandbox_id not in records]
        if not changed and not removed:
            return
        await self.control.sync_host.remote(self.name, [row for _, _, row in changed], removed)
        for sandbox_id, facts, _ in changed:
            self._reported[sandbox_id] = facts
        for sandbox_id in removed:
            del self._reported[sandbox_id]

    def _service(self) -> Service:
        if self.service is None:
            raise RuntimeError(f"host {self.name} is not started")
        return self.service


async def output_then_result(
    start: Callable[[OutputSink], Awaitable[Any]],
) -> AsyncIterator[tuple[Any, ...]]:
    """Run ``start(sink)``, yielding ``("output", stream, data)`` for what it writes to the sink
    as it comes, then ``("result", result)``; its error ends the stream by raising, and a
    consumer that stops early cancels it."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def work() -> Any:
        try:
            return await start(lambda stream, data: queue.put_nowait(("output", stream, data)))
        finally:
            queue.put_nowait(END)

    task = asyncio.create_task(work())
    try:
        while (item := await queue.get()) is not END:
            yield item
        yield ("result", await task)
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            await task
