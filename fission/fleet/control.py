"""The control actor: the fleet catalog's one owner, and the watcher of membership.

One named, detached Ray actor (``fission-fleet`` in the ``fission`` namespace), created by the
first front end and found by the others. It owns the SQLite catalog (``catalog``), and every
``WATCH_INTERVAL`` seconds it (1) starts a host agent on each alive node that offers the
``fission_host`` resource and has none, so a node joins by ``ray start`` alone, and (2) pings
every host agent: one that is gone (its node died, its process ended), or that does not answer
within ``PING_TIMEOUT`` seconds ``MISSES`` times in a row, is marked dead and its sandboxes
``lost``, naming the host, its node and the time. Ray's own node table (``ray.nodes()``) makes a
dead node's hosts lost at once, without waiting for pings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fission.fleet.catalog import FleetCatalog
from fission.fleet.host_agent import HostAgent, HostSettings

log = logging.getLogger("fission.fleet.control")
NAMESPACE = "fission"
CONTROL_NAME = "fission-fleet"
HOST_PREFIX = "fission-host-"
HOST_RESOURCE = "fission_host"  # a node offers it (`ray start --resources`) to run a host agent
WATCH_INTERVAL = 0.5
PING_TIMEOUT = 3.0
MISSES = 2
CATALOG_FILE = "fleet.db"


def host_name(node_id: str) -> str:
    """The host name (and actor name suffix) of the host agent on ``node_id``."""
    return f"node-{node_id[:12]}"


def agent_handle(name: str) -> Any:
    """The actor handle of host ``name`` (ValueError if it is gone)."""
    return ray.get_actor(HOST_PREFIX + name, namespace=NAMESPACE)


class FleetControl:
    """Catalog and membership of the fleet (``ray.remote`` is applied by ``connect``)."""

    def __init__(self, settings: HostSettings, simulated_hosts: int = 0) -> None:
        self.settings = settings
        self.catalog = FleetCatalog(settings.state_root / CATALOG_FILE)
        self.agents: dict[str, Any] = {}
        self.starting: dict[str, asyncio.Task[None]] = {}
        self.misses: dict[str, int] = {}
        self.simulated_hosts = simulated_hosts
        self._self: Any = None
        self._watch: asyncio.Task[None] | None = None

    async def ready(self) -> dict[str, Any]:
        """Start watching (once); the settings every host runs with."""
        if self._watch is None:
            self._self = ray.get_runtime_context().current_actor
            for host in self.catalog.hosts():
                if host["alive"]:  # a restarted control actor finds the agents by name
                    with contextlib.suppress(ValueError):
                        self.agents[host["name"]] = agent_handle(host["name"])
            self._watch = asyncio.create_task(self._watch_loop(), name="fleet-watch")
        driver = self.settings.driver
        return {"state_root": str(self.settings.state_root), "driver": getattr(driver, "name", "")}

    # -- membership --------------------------------------------------------------------------------
    async def _watch_loop(self) -> None:
        while True:
            try:
                await self._watch_once()
            except Exception:
                log.exception("fleet watch failed; trying again")
            await asyncio.sleep(WATCH_INTERVAL)

    async def _watch_once(self) -> None:
        nodes = ray.nodes()
        alive = {n["NodeID"] for n in nodes if n["Alive"]}
        wanted: dict[str, str] = {}
        for node in nodes:
            if node["Alive"] and node.get("Resources", {}).get(HOST_RESOURCE, 0) >= 1:
                wanted[host_name(node["NodeID"])] = node["NodeID"]
        if self.simulated_hosts:
            head = ray.get_runtime_context().get_node_id()
            for index in range(self.simulated_hosts):
                wanted[f"sim-{index:02d}"] = head
        for name, node_id in wanted.items():
            if name not in self.agents and name not in self.starting:
                self.starting[name] = asyncio.create_task(self._start_host(name, node_id))
        hosts = {h["name"]: h for h in self.catalog.hosts() if h["alive"]}
        for name, host in hosts.items():
            if host["node_id"] not in alive:
                self._lose(name, host["node_id"], "its node left the Ray cluster")
        await asyncio.gather(*(self._ping(name) for name in list(self.agents)))

    async def _start_host(self, name: str, node_id: str) -> None:
        try:
            agent: Any = (
                ray.remote(HostAgent)
                .options(
                    name=HOST_PREFIX + name,
                    namespace=NAMESPACE,
                    lifetime="detached",
                    get_if_exists=True,
                    num_cpus=0,
                    max_concurrency=10_000,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                )
                .remote(name, node_id, self.settings, self._self)
            )
            await agent.start.remote()
            self.catalog.join(name, node_id)
            self.agents[name] = agent
            self.misses[name] = 0
            log.warning("host %s joined on node %s", name, node_id)
        except Exception as exc:
            log.error("host %s on node %s could not start: %s", name, node_id, exc)
        finally:
            self.starting.pop(name, None)

    async def _ping(self, name: str) -> None:
        agent = self.agents.get(name)
        if agent is None:
            return
        try:
            await asyncio.wait_for(agent.ping.remote(), PING_TIMEOUT)
            self.misses[name] = 0
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            self._lose(name, self._node_of(name), f"its agent is gone ({type(exc).__name__})")
        except TimeoutError:
            self.misses[name] = self.misses.get(name, 0) + 1
            if self.misses[name] >= MISSES:
                self._lose(name, self._node_of(name), f"it did not answer {MISSES} pings")

    def _node_of(self, name: str) -> str:
        return next((h["node_id"] for h in self.catalog.hosts() if h["name"] == name), "?")

    def _lose(self, name: str, node_id: str, why: str) -> None:
        self.agents.pop(name, None)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        reason = f"host {name} (node {node_id}) died at {stamp}: {why}"
        lost = self.catalog.host_lost(name, reason)
        log.warning("host %s is gone (%s): %d sandboxes lost", name, why, lost)

    # -- queries and changes (front ends and hosts call these) ------------------------------------
    def hosts(self) -> list[dict[str, Any]]:
        """Every host the fleet has seen, with whether it is alive and draining."""
        return self.catalog.hosts()

    def drain(self, name: str, draining: bool) -> bool:
        """Stop (or resume) placing new work on host ``name``."""
        return self.catalog.drain(name, draining)

    def sync_host(self, host: str, rows: list[dict[str, Any]], removed: list[str]) -> None:
        """A host's report of what changed on it."""
        self.catalog.sync_host(host, rows, removed)

    def put(self, row: dict[str, Any]) -> None:
        """Insert or replace a sandbox's row."""
        self.catalog.put(row)

    def put_many(self, rows: list[dict[str, Any]]) -> None:
        """Insert or replace several rows (a fork's clones)."""
        for row in rows:
            self.catalog.put(row)

    def remove(self, sandbox_id: str) -> None:
        """Forget a deleted sandbox."""
        self.catalog.remove(sandbox_id)

    def get(self, sandbox_id: str) -> dict[str, Any] | None:
        """A sandbox's row, or None."""
        return self.catalog.get(sandbox_id)

    def page(self, *args: Any) -> tuple[list[dict[str, Any]], str | None]:
        """One page of sandboxes (``FleetCatalog.page``)."""
        return self.catalog.page(*args)

    def census(self) -> dict[str, dict[str, int]]:
        """Sandboxes by host and state."""
        return self.catalog.census()

    def owned(self, owner: str) -> int:
        """How many live sandboxes ``owner`` holds across the fleet."""
        return self.catalog.owned(owner)

    def put_snapshot(self, snapshot_id: str, host: str, owner: str | None) -> None:
        """Remember which host holds a snapshot."""
        self.catalog.put_snapshot(snapshot_id, host, owner)

    def snapshot_host(self, snapshot_id: str) -> str | None:
        """The host holding a snapshot, or None."""
        return self.catalog.snapshot_host(snapshot_id)

    def remove_snapshot(self, snapshot_id: str) -> None:
        """Forget a deleted snapshot."""
        self.catalog.remove_snapshot(snapshot_id)

    async def shutdown(self) -> None:
        """Stop watching and every host's VMs (tests and benches take the fleet down so)."""
        if self._watch is not None:
            self._watch.cancel()
        agents = list(self.agents.values())
        await asyncio.gather(*(a.stop.remote() for a in agents), return_exceptions=True)
        for agent in agents:
            with contextlib.suppress(Exception):
                ray.kill(agent)
        self.agents.clear()
        self.catalog.close()
