"""``ClusterSandboxes``: ``SandboxManager``'s API over a fleet; ``.snapshots`` likewise.

A sandbox's home host is in the control actor's catalog; every call on a sandbox goes to that
host, and every change it makes is written back to the catalog, so any front end routes the next
call. Reads (``get``, listings, ``check_running``) are answered by the catalog alone. A
per-key sandbox limit counts the key's sandboxes over the whole fleet. A paused sandbox whose
home is draining or has no room resumes on another host: its files (saved state, disk,
integrity record) travel through Ray's object store (``HostAgent.export_paused`` returns them,
``import_paused`` takes them; a 2 GiB object-store limit per transfer is far above a sandbox's
disk), then the old host forgets it. A sandbox on a host that died is ``lost``: the catalog
says so, naming the host and the time, and only ``delete`` is left to do.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fission.core.managed_sandbox import not_running, vm_memory_mb
from fission.core.sandbox_spec import SandboxRecord, SandboxSpec, SandboxState
from fission.errors import (
    Busy,
    InvalidInput,
    QuotaExceeded,
    SandboxNotFound,
    SnapshotNotFound,
    Unsupported,
)
from fission.fleet import placement
from fission.fleet.catalog import record_of, row_of
from fission.fleet.routing import HostLost, call, call_sync, stream

if TYPE_CHECKING:
    from fission.fleet.cluster_service import ClusterService

MAX_UPLOAD_BYTES = 512 * 2**20  # one upload through a front end is held whole, then sent on


class NoPortsInAFleet:
    """Exposed ports through a fleet front end: not offered yet (their bytes would have to
    stream through Ray both ways); every use says so and where to go instead."""

    def __getattr__(self, name: str) -> Any:
        raise Unsupported(
            "exposed ports are not available through a fleet front end yet: expose and reach "
            "the port on the daemon of the sandbox's host (`fission cluster status` names it)"
        )


class ClusterSandboxes:
    """The sandboxes of a fleet, with ``SandboxManager``'s methods."""

    def __init__(self, service: ClusterService) -> None:
        self.service = service
        self.snapshots = ClusterSnapshots(self)
        self.ports = NoPortsInAFleet()
        # Per-key paused retention: the front end's key store knows it, but the hosts expire
        # their paused sandboxes themselves, by their daemon-wide --paused-retention (a fleet
        # does not apply the per-key value yet; docs/operations.md).
        self.retention_for: Callable[[str], float | None] | None = None

    def _control(self) -> Any:
        return self.service.routes().control

    def _row(self, sandbox_id: str, owner: str | None) -> dict[str, Any]:
        row = call_sync(self._control().get.remote(sandbox_id), "control", "finding a sandbox")
        if row is None or (owner is not None and row["owner"] != owner):
            raise SandboxNotFound(
                f"no sandbox {sandbox_id!r}: it was deleted, expired, or never existed"
            )
        return dict(row)

    def _home(self, sandbox_id: str, owner: str | None) -> tuple[str, Any]:
        """The host of a sandbox that is not lost, and its agent."""
        row = self._row(sandbox_id, owner)
        if row["state"] == SandboxState.LOST.value:
            raise not_running(record_of(row))
        return row["host"], self.service.routes().agent(row["host"])

    async def _saved(self, record: SandboxRecord, host: str) -> SandboxRecord:
        await self._control().put.remote(row_of(record, host))
        return record

    # -- create, read, list ----------------------------------------------------------------------
    async def create(
        self, spec: SandboxSpec, owner: str | None = None, max_sandboxes: int | None = None
    ) -> SandboxRecord:
        """Start a sandbox on the host with the most room."""
        await self._check_quota(owner, max_sandboxes)
        needed = vm_memory_mb(spec.limits)
        hosts = placement.for_sandbox(await self.service.routes().hosts(), needed)
        return await self._place(hosts, needed, "create", spec, owner, None)

    async def _check_quota(
        self, owner: str | None, max_sandboxes: int | None, adding: int = 1
    ) -> None:
        if owner and max_sandboxes:
            held = await self._control().owned.remote(owner)
            if held + adding > max_sandboxes:
                raise QuotaExceeded(
                    f"this key may hold {max_sandboxes} sandboxes at once and holds {held}: "
                    "delete one first"
                )

    async def _place(
        self, hosts: list[placement.HostView], needed: int, method: str, *args: Any, **kw: Any
    ) -> SandboxRecord:
        """Call ``method`` on each host in turn until one has room; the new sandbox's record."""
        refused: Exception = Busy(
            f"no fission host has {needed} MB free for a sandbox: delete or pause sandboxes, "
            "or add a host"
        )
        for host in hosts:
            agent = self.service.routes().agent(host.name)
            try:
                record = await call(
                    agent.call.remote("sandboxes", method, *args, **kw), host.name, method
                )
            except (Busy, HostLost) as exc:
                refused = exc
                continue
            placement.took(host, needed)
            return await self._saved(record, host.name)
        raise refused

    def get(self, sandbox_id: str, owner: str | None = None) -> SandboxRecord:
        """The record of a sandbox, from the catalog."""
        return record_of(self._row(sandbox_id, owner))

    def list_sandboxes(
        self,
        owner: str | None = None,
        state: SandboxState | None = None,
        metadata: dict[str, str] | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[SandboxRecord], str | None]:
        """One page of the fleet's sandboxes matching the filters, and the next cursor."""
        wanted = state.value if state is not None else None
        ref = self._control().page.remote(owner, wanted, metadata or {}, limit, cursor)
        rows, next_cursor = call_sync(ref, "control", "listing sandboxes")
        return [record_of(row) for row in rows], next_cursor

    def check_running(self, sandbox_id: str, owner: str | None = None) -> SandboxRecord:
        """The record of a running sandbox; SandboxNotRunning otherwise."""
        record = self.get(sandbox_id, owner)
        if record.state != SandboxState.RUNNING:
            raise not_running(record)
        return record

    def census(self) -> dict[str, int]:
        """Sandboxes by state over the fleet (idle ones count as running here)."""
        counts = {"running": 0, "idle": 0, "paused": 0, "lost": 0}
        if self.service.fleet is None:  # not joined yet (metrics are set up before start)
            return counts
        by_host = call_sync(self._control().census.remote(), "control", "counting sandboxes")
        for states in by_host.values():
            for state, count in states.items():
                counts[state] = counts.get(state, 0) + count
        return counts

    def count(self) -> int:
        """Running and paused sandboxes over the fleet."""
        census = self.census()
        return census["running"] + census["idle"] + census["paused"]

    def set_ttl(self, sandbox_id: str, ttl: float, owner: str | None = None) -> SandboxRecord:
        """Keep a sandbox alive ``ttl`` more seconds from now."""
        host, agent = self._home(sandbox_id, owner)
        ref = agent.call.remote("sandboxes", "set_ttl", sandbox_id, ttl, owner)
        record: SandboxRecord = call_sync(ref, host, "setting a ttl")
        call_sync(self._control().put.remote(row_of(record, host)), "control", "saving")
        return record

    # -- runs and files --------------------------------------------------------------------------
    async def run_code(self, sandbox_id: str, code: str, **options: Any) -> Any:
        """``SandboxManager.run_code`` on the sandbox's host, output streamed here."""
        return await self._streamed("run_code", sandbox_id, (code,), options)

    async def exec_command(self, sandbox_id: str, command: str, **options: Any) -> Any:
        """``SandboxManager.exec_command`` on the sandbox's host, output streamed here."""
        return await self._streamed("exec_command", sandbox_id, (command,), options)

    async def _streamed(
        self, method: str, sandbox_id: str, args: tuple[Any, ...], options: dict[str, Any]
    ) -> Any:
        sink = options.pop("on_output", None)
        host, agent = self._home(sandbox_id, options.get("owner"))
        generator = agent.sandbox_stream.options(num_returns="streaming").remote(
            method, sandbox_id, *args, **options
        )
        async for item in stream(generator, host, f"running in sandbox {sandbox_id}"):
            if item[0] == "output":
                if sink is not None:
                    sink(item[1], item[2])
            else:
                return item[1]
        raise RuntimeError(f"host {host} ended a {method} without a result")

    async def write_file(
        self,
        sandbox_id: str,
        path: str,
        data: bytes | AsyncIterable[bytes],
        owner: str | None = None,
        mode: int = 0o644,
    ) -> Any:
        """Write a file into the sandbox (a stream is held whole here, then sent to its host)."""
        host, agent = self._home(sandbox_id, owner)
        if not isinstance(data, bytes):
            parts, size = [], 0
            async for chunk in data:
                size += len(chunk)
                if size > MAX_UPLOAD_BYTES:
                    raise InvalidInput(
                        f"an upload through a fleet front end is at most {MAX_UPLOAD_BYTES} bytes"
                    )
                parts.append(chunk)
            data = b"".join(parts)
        ref = agent.call.remote("sandboxes", "write_file", sandbox_id, path, data, owner, mode)
        return await call(ref, host, "writing a file")

    async def read_file(
        self, sandbox_id: str, path: str, owner: str | None = None
    ) -> AsyncIterator[bytes]:
        """A sandbox file's bytes, streamed from its host."""
        host, agent = self._home(sandbox_id, owner)
        generator = agent.read_file.options(num_returns="streaming").remote(sandbox_id, path, owner)
        async for chunk in stream(generator, host, "reading a file"):
            yield chunk

    async def watch_files(
        self, sandbox_id: str, path: str, recursive: bool = False, owner: str | None = None
    ) -> AsyncIterator[list[Any]]:
        """Changes under a directory of a sandbox, streamed from its host."""
        host, agent = self._home(sandbox_id, owner)
        generator = agent.watch_files.options(num_returns="streaming").remote(
            sandbox_id, path, recursive, owner
        )
        async for batch in stream(generator, host, "watching files"):
            yield batch

    async def _on_home(self, sandbox_id: str, owner: str | None, method: str, *args: Any) -> Any:
        host, agent = self._home(sandbox_id, owner)
        ref = agent.call.remote("sandboxes", method, sandbox_id, *args, owner)
        return await call(ref, host, method)

    async def list_files(self, sandbox_id: str, path: str = ".", owner: str | None = None) -> Any:
        """List a directory in the sandbox."""
        return await self._on_home(sandbox_id, owner, "list_files", path)

    async def stat_file(self, sandbox_id: str, path: str, owner: str | None = None) -> Any:
        """Stat a path in the sandbox."""
        return await self._on_home(sandbox_id, owner, "stat_file", path)

    async def make_dir(self, sandbox_id: str, path: str, owner: str | None = None) -> Any:
        """Create a directory (and parents) in the sandbox."""
        return await self._on_home(sandbox_id, owner, "make_dir", path)

    async def remove_file(
        self, sandbox_id: str, path: str, recursive: bool = False, owner: str | None = None
    ) -> None:
        """Remove a file or directory in the sandbox."""
        await self._on_home(sandbox_id, owner, "remove_file", path, recursive)

    # -- pause, resume, delete -------------------------------------------------------------------
    async def pause(self, sandbox_id: str, owner: str | None = None) -> SandboxRecord:
        """Save the sandbox to its host's disk."""
        host, _ = self._home(sandbox_id, owner)
        record = await self._on_home(sandbox_id, owner, "pause")
        return await self._saved(record, host)

    async def resume(self, sandbox_id: str, owner: str | None = None) -> SandboxRecord:
        """Resume at home, or on another host when home is draining or has no room."""
        row = self._row(sandbox_id, owner)
        if row["state"] == SandboxState.LOST.value:
            raise not_running(record_of(row))
        home = row["host"]
        if row["state"] == SandboxState.PAUSED.value:
            needed = vm_memory_mb(record_of(row).spec.limits)
            hosts = placement.for_sandbox(await self.service.routes().hosts(), needed, home)
            target = next((h.name for h in hosts), home)
            if target != home:
                await self.move(sandbox_id, home, target)
                home = target
        agent = self.service.routes().agent(home)
        record = await call(
            agent.call.remote("sandboxes", "resume", sandbox_id, owner), home, "resume"
        )
        return await self._saved(record, home)

    async def move(self, sandbox_id: str, source: str, target: str) -> None:
        """Move a paused sandbox's files from ``source`` to ``target`` (Ray's object store)."""
        routes = self.service.routes()
        exported = routes.agent(source).export_paused.remote(sandbox_id)
        entry, blob = await call(exported, source, "exporting a paused sandbox")
        await call(
            routes.agent(target).import_paused.remote(entry, blob), target, "importing a sandbox"
        )
        row = self._row(sandbox_id, None) | {"host": target}
        await self._control().put.remote(row)
        await call(routes.agent(source).forget_moved.remote(sandbox_id), source, "forgetting")

    async def delete(self, sandbox_id: str, owner: str | None = None) -> None:
        """Destroy the sandbox on its host (a lost one is only forgotten)."""
        row = self._row(sandbox_id, owner)
        if row["state"] != SandboxState.LOST.value:
            agent = self.service.routes().agent(row["host"])
            ref = agent.call.remote("sandboxes", "delete", sandbox_id, owner)
            # gone there already (expired, or the host with it): forget it here too
            with contextlib.suppress(SandboxNotFound, HostLost):
                await call(ref, row["host"], "deleting a sandbox")
        await self._control().remove.remote(sandbox_id)


class SnapshotSpace:
    """``store.used_bytes`` over the fleet, as the snapshot routes read it."""

    def __init__(self, snapshots: ClusterSnapshots) -> None:
        self.snapshots = snapshots

    def used_bytes(self, owner: str | None = None) -> int:
        """Bytes ``owner``'s snapshots take on every host."""
        return sum(self.snapshots._everywhere("used_bytes", owner).values())


class ClusterSnapshots:
    """``SandboxSnapshots``' methods over a fleet: a snapshot stays on the host that took it."""

    def __init__(self, sandboxes: ClusterSandboxes) -> None:
        self.sandboxes = sandboxes
        self.store = SnapshotSpace(self)

    def _everywhere(self, method: str, *args: Any) -> dict[str, Any]:
        """``method`` on every alive host (``used_bytes`` on its store), by host."""
        routes = self.sandboxes.service.routes()
        names = list(routes.reports)
        refs = []
        for name in names:
            target = "store" if method == "used_bytes" else "snapshots"
            refs.append(routes.agent(name).call.remote(target, method, *args))
        return {name: call_sync(ref, name, method) for name, ref in zip(names, refs, strict=True)}

    def _host_of(self, snapshot_id: str, owner: str | None) -> str:
        control = self.sandboxes._control()
        host = call_sync(control.snapshot_host.remote(snapshot_id), "control", "finding")
        if host is None:  # a checkpoint, taken inside a run: ask the hosts
            for name, found in self._everywhere("list_snapshots", owner).items():
                if any(record.id == snapshot_id for record in found):
                    return name
            raise SnapshotNotFound(f"no snapshot {snapshot_id!r}")
        return str(host)

    async def _on(self, host: str, method: str, *args: Any, **kw: Any) -> Any:
        agent = self.sandboxes.service.routes().agent(host)
        return await call(agent.call.remote("snapshots", method, *args, **kw), host, method)

    async def snapshot(
        self,
        sandbox_id: str,
        owner: str | None = None,
        name: str | None = None,
        *,
        kind: str = "snapshot",
        max_snapshot_mb: int | None = None,
    ) -> Any:
        """Snapshot a sandbox on its host; the catalog remembers where."""
        host, _ = self.sandboxes._home(sandbox_id, owner)
        record = await self._on(
            host, "snapshot", sandbox_id, owner, name, kind=kind, max_snapshot_mb=max_snapshot_mb
        )
        await self.sandboxes._control().put_snapshot.remote(record.id, host, owner)
        return record

    async def fork(
        self,
        sandbox_id: str,
        n: int,
        owner: str | None = None,
        max_sandboxes: int | None = None,
        max_snapshot_mb: int | None = None,
    ) -> tuple[Any, list[SandboxRecord]]:
        """Fork on the sandbox's host (its snapshot is there)."""
        host, _ = self.sandboxes._home(sandbox_id, owner)
        await self.sandboxes._check_quota(owner, max_sandboxes, n)
        snapshot, clones = await self._on(host, "fork", sandbox_id, n, owner, None, max_snapshot_mb)
        control = self.sandboxes._control()
        await control.put_snapshot.remote(snapshot.id, host, owner)
        await control.put_many.remote([row_of(clone, host) for clone in clones])
        return snapshot, clones

    async def rewind(self, sandbox_id: str, checkpoint_id: str, owner: str | None) -> Any:
        """Rewind a sandbox on its host."""
        host, _ = self.sandboxes._home(sandbox_id, owner)
        record = await self._on(host, "rewind", sandbox_id, checkpoint_id, owner)
        return await self.sandboxes._saved(record, host)

    async def create_from(
        self,
        snapshot_id: str,
        owner: str | None = None,
        max_sandboxes: int | None = None,
        ttl: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> SandboxRecord:
        """A sandbox from a snapshot, on the host holding it (Busy when that host is full)."""
        host = await asyncio.to_thread(self._host_of, snapshot_id, owner)
        await self.sandboxes._check_quota(owner, max_sandboxes)
        views = [h for h in await self.sandboxes.service.routes().hosts() if h.name == host]
        if not views:
            raise HostLost(f"host {host}, which holds snapshot {snapshot_id}, is gone")
        return await self.sandboxes._place(
            views, 0, "create_from", snapshot_id, owner, None, ttl=ttl, metadata=metadata
        )

    def list_snapshots(
        self, owner: str | None = None, sandbox_id: str | None = None, kind: str | None = None
    ) -> list[Any]:
        """Snapshots on every host, oldest first."""
        found = self._everywhere("list_snapshots", owner, sandbox_id, kind)
        return sorted(
            (r for records in found.values() for r in records), key=lambda r: r.created_at
        )

    def get(self, snapshot_id: str, owner: str | None = None) -> Any:
        """A snapshot's record from its host."""
        host = self._host_of(snapshot_id, owner)
        agent = self.sandboxes.service.routes().agent(host)
        return call_sync(agent.call.remote("snapshots", "get", snapshot_id, owner), host, "get")

    async def delete(self, snapshot_id: str, owner: str | None = None) -> None:
        """Delete a snapshot on its host."""
        host = await asyncio.to_thread(self._host_of, snapshot_id, owner)
        await self._on(host, "delete", snapshot_id, owner)
        await self.sandboxes._control().remove_snapshot.remote(snapshot_id)

    async def gc(
        self, dry_run: bool = False, budget_mb: int | None = None, protect: set[str] | None = None
    ) -> dict[str, Any]:
        """Reclaim snapshot space on every host (``budget_mb`` each); reports by host."""
        routes = self.sandboxes.service.routes()
        names = list(routes.reports)
        reports = await asyncio.gather(
            *(self._on(name, "gc", dry_run, budget_mb, protect) for name in names)
        )
        removed = [entry for report in reports for entry in report.get("removed", [])]
        return {"removed": removed, "hosts": dict(zip(names, reports, strict=True))}
