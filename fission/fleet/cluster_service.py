"""``ClusterService``: the Service API the adapters call, routed over a fleet of hosts.

``fission serve --cluster ADDR`` gives the same REST, gRPC, MCP and dashboard adapters this in
place of a ``Service``: the same methods (``run``, ``acquire``/``dispose``, ``install``,
``repo``, ``status``, ``sandboxes`` and ``sandboxes.snapshots``) and the few attributes the
adapters read (``telemetry``, ``audit``, ``config.audit_db``, ``pools``, ``budget``,
``journal``). It holds no state of its own: which host has which sandbox is in the control
actor's catalog, so any number of front ends serve the same fleet. A one-shot run takes a
machine on the host ``placement.for_run`` chose (the next one when that host is ``Busy``), then
streams from it; a host dying mid-run ends the stream with ``HostLost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fission.agent.client import OutputSink
from fission.auth.audit_log import LOCAL
from fission.core.languages import Language
from fission.core.limits import Limits
from fission.core.provision import InstallResult
from fission.core.spec import RunResult, RunSpec
from fission.core.telemetry import Telemetry
from fission.core.transfers import Upload
from fission.errors import Busy, NotReady, Unsupported
from fission.fleet import placement
from fission.fleet.cluster_sandboxes import ClusterSandboxes
from fission.fleet.control import CONTROL_NAME, NAMESPACE, FleetControl
from fission.fleet.host_agent import HostSettings
from fission.fleet.routing import Fleet, call, stream

log = logging.getLogger("fission.fleet")
HEAD_RESOURCE = "node:__internal_head__"  # the resource Ray gives its head node only


@dataclass
class ClusterLease:
    """A machine taken on one host for one run (the machine stays on that host)."""

    host: str
    lease_id: str
    disposed: bool = False


@dataclass(frozen=True)
class FrontEndConfig:
    """What the adapters read of a Service's config."""

    audit_db: Path | None = None


@dataclass
class FleetBudget:
    """The fleet's memory budget, summed over the hosts' last reports."""

    total_mb: int = 0
    used_mb: int = 0


class NoLocalVMs:
    """The journal a front end shows: it runs no VM itself (the hosts do)."""

    def live_count(self) -> int:
        """No VM runs in a front end."""
        return 0

    def live_pids(self) -> list[int]:
        """No VMM process is a front end's."""
        return []


def connect(
    address: str | None, settings: HostSettings, *, simulated_hosts: int = 0, create: bool = True
) -> tuple[Any, dict[str, Any]]:
    """Join the Ray cluster at ``address`` and find the control actor (or create it)."""
    if not ray.is_initialized():
        ray.init(
            address=address,
            namespace=NAMESPACE,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    if not create:
        try:
            control: Any = ray.get_actor(CONTROL_NAME, namespace=NAMESPACE)
        except ValueError:
            raise NotReady(
                "no fission fleet runs in this Ray cluster: start a front end with "
                "`fission serve --cluster auto`"
            ) from None
        return control, dict(ray.get(control.ready.remote()))
    control = (
        ray.remote(FleetControl)
        .options(
            name=CONTROL_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=10_000,
            # The catalog's file lives on the head node, the cluster's one fixed point: a front
            # end's process may be attached to any raylet of its machine, which may be a worker.
            scheduling_strategy=NodeAffinitySchedulingStrategy(head_node_id(), soft=True),
        )
        .remote(settings, simulated_hosts)
    )
    return control, dict(ray.get(control.ready.remote()))


def head_node_id() -> str:
    """The Ray head node's id (this process's own node if none is marked head)."""
    for node in ray.nodes():
        if node.get("Alive") and HEAD_RESOURCE in node.get("Resources", {}):
            return str(node["NodeID"])
    return str(ray.get_runtime_context().get_node_id())


class ClusterService:
    """The Service API over a fleet (see the module docstring)."""

    def __init__(
        self,
        address: str | None,
        settings: HostSettings,
        *,
        simulated_hosts: int = 0,
        create: bool = True,
    ) -> None:
        self.address = address
        self.create = create  # start the fleet's control actor if none runs yet
        self.settings = settings
        self.simulated_hosts = simulated_hosts
        self.config = FrontEndConfig()
        self.audit = None  # each host keeps its own audit log
        self.telemetry = Telemetry()
        self.pools: dict[str, Any] = {}  # pools live on the hosts: see status()
        self.budget = FleetBudget()
        self.journal = NoLocalVMs()
        self.fleet: Fleet | None = None
        self.sandboxes = ClusterSandboxes(self)
        self._disposals: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Join the cluster (the fleet itself runs on; a front end starts and stops nothing)."""
        control, shown = await asyncio.to_thread(
            connect,
            self.address,
            self.settings,
            simulated_hosts=self.simulated_hosts,
            create=self.create,
        )
        if self.create and shown["state_root"] != str(self.settings.state_root):
            log.warning("the fleet runs with the settings it started with: %s", shown)
        self.fleet = Fleet(control)

    async def close(self) -> None:
        """Wait for pending lease disposals; the fleet keeps running."""
        await asyncio.gather(*self._disposals, return_exceptions=True)

    def routes(self) -> Fleet:
        """The fleet (RuntimeError before ``start``)."""
        if self.fleet is None:
            raise RuntimeError("the cluster service is not started")
        return self.fleet

    def status(self) -> dict[str, Any]:
        """Pools (each named with its host) and the budget, summed over the hosts."""
        reports = self.fleet.reports if self.fleet is not None else {}
        pools, total, used = [], 0, 0
        for host, report in sorted(reports.items()):
            service = report["service"]
            pools += [pool | {"host": host} for pool in service["pools"]]
            total += service["memory_budget_mb"]
            used += service["memory_reserved_mb"]
        self.budget.total_mb, self.budget.used_mb = total, used
        return {
            "pools": pools,
            "memory_budget_mb": total,
            "memory_reserved_mb": used,
            "reconciled": {},
            "sandboxes": self.sandboxes.count(),
            "hosts": len(reports),
        }

    async def cluster_status(self) -> dict[str, Any]:
        """Every host: its node, whether it is alive, capacity, pools, sandboxes by state."""
        fleet = self.routes()
        with contextlib.suppress(Exception):
            await fleet.hosts()
        known, census = await asyncio.gather(
            fleet.control.hosts.remote(), fleet.control.census.remote()
        )
        hosts = []
        for host in known:
            report = fleet.reports.get(host["name"]) if host["alive"] else None
            service = report["service"] if report else None
            hosts.append(
                host
                | {
                    "memory_budget_mb": service["memory_budget_mb"] if service else None,
                    "memory_reserved_mb": service["memory_reserved_mb"] if service else None,
                    "pools": service["pools"] if service else [],
                    "sandboxes": census.get(host["name"], {}),
                }
            )
        self.status()
        return {
            "hosts": hosts,
            "alive": sum(h["alive"] for h in known),
            "memory_budget_mb": self.budget.total_mb,
            "memory_reserved_mb": self.budget.used_mb,
        }

    async def drain(self, host: str, draining: bool = True) -> bool:
        """Place no new work on ``host`` (paused sandboxes there resume elsewhere)."""
        fleet = self.routes()
        changed = bool(await fleet.control.drain.remote(host, draining))
        fleet._seen = 0.0  # placements see it at once
        return changed

    # -- one-shot runs ---------------------------------------------------------------------------
    async def acquire(self, spec: RunSpec) -> ClusterLease:
        """A machine for ``spec`` on the best host (Busy when none has one)."""
        fleet = self.routes()
        refused: Busy | None = None
        for host in placement.for_run(await fleet.hosts(), spec.language.name):
            # counted before the call, so that runs placed meanwhile see it taken
            placement.took_warm(host, spec.language.name)
            try:
                lease_id = await call(fleet.agent(host.name).acquire.remote(spec), host.name, "run")
            except Busy as exc:
                refused = exc
                continue
            return ClusterLease(host.name, lease_id)
        raise refused or Busy("every fission host is draining or full: retry later")

    def dispose(self, lease: ClusterLease) -> None:
        """Give back a lease whose run never started (safe twice)."""
        if lease.disposed:
            return
        lease.disposed = True
        agent = self.routes().agent(lease.host)

        async def release() -> None:
            with contextlib.suppress(Exception):
                await agent.dispose.remote(lease.lease_id)

        task = asyncio.create_task(release())
        self._disposals.add(task)
        task.add_done_callback(self._disposals.discard)

    async def run(
        self,
        spec: RunSpec,
        on_output: OutputSink | None = None,
        *,
        who: str = LOCAL,
        uploads: Sequence[Upload] = (),
        downloads: Sequence[str] = (),
        lease: ClusterLease | None = None,
        action: str = "run",
    ) -> RunResult:
        """Run ``spec`` on ``lease``'s host (or the best one), streaming its output here."""
        if lease is None:
            lease = await self.acquire(spec)
        lease.disposed = True  # the host's run takes the lease and releases it
        options = {"who": who, "uploads": tuple(uploads), "downloads": tuple(downloads)}
        options |= {"lease": lease.lease_id, "action": action}
        return await self._stream(lease.host, "run", (spec,), options, on_output)

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
        """``Service.install`` on the best host for ``language`` (its derived cache is there)."""
        host = await self._best_for(language.name)
        options = {"index_url": index_url, "allow_hosts": tuple(allow_hosts), "limits": limits}
        args = (language, tuple(packages), command)
        return await self._stream(host.name, "install", args, options | {"who": who}, on_output)

    async def build_template(
        self, path: Path, on_output: OutputSink | None = None, *, who: str = LOCAL
    ) -> Any:
        """Templates are each host's own cache, built from a file on that host: a front end
        cannot build one for the fleet (yet); it says how to build them instead."""
        raise Unsupported(
            f"templates are built per host: run `fission template build {path.name}` on each "
            "host of the fleet (same file, same cached result), then runs and sandboxes may "
            "name the template"
        )

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
        """``Service.repo`` on the best host for ``language``."""
        host = await self._best_for(language.name)
        options: dict[str, Any] = {"ref": ref, "allow_hosts": tuple(allow_hosts)}
        options |= {"limits": limits, "files": tuple(files), "who": who}
        return await self._stream(host.name, "repo", (language, url, command), options, on_output)

    async def _best_for(self, language: str) -> placement.HostView:
        candidates = placement.for_run(await self.routes().hosts(), language)
        if not candidates:
            raise Busy("every fission host is draining: retry later, or add a host")
        return candidates[0]

    async def _stream(
        self,
        host: str,
        action: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        on_output: OutputSink | None,
    ) -> Any:
        agent = self.routes().agent(host)
        generator = agent.stream.options(num_returns="streaming").remote(action, args, kwargs)
        async for item in stream(generator, host, f"running a {action}"):
            if item[0] == "output":
                if on_output is not None:
                    on_output(item[1], item[2])
            else:
                return item[1]
        raise RuntimeError(f"host {host} ended a {action} without a result")


def default_settings(state_root: Path | None = None) -> HostSettings:
    """Host settings from the environment (``FISSION_FLEET_ROOT``) or the given root."""
    root = state_root or Path(os.environ.get("FISSION_FLEET_ROOT", "/var/lib/fission/fleet"))
    return HostSettings(state_root=root)
