"""How a front end reaches the fleet: the control actor, host agents, errors, host views.

Ray wraps an error raised in an actor (``RayTaskError``); ``call`` gives the caller the
``FissionError`` itself (a 404 stays a 404), and turns a host that is gone into ``HostLost``.
``Fleet`` keeps the hosts' last reports for ``VIEW_TTL`` seconds (a placement does not cost a
round trip to every host) and counts what it placed meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import ray

from fission.errors import FissionError, NotReady
from fission.fleet.control import agent_handle
from fission.fleet.placement import HostView

VIEW_TTL = 1.0  # seconds a host's capacity report is trusted for placement
STATUS_TIMEOUT = 5.0
GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
NO_HOSTS = (
    "no fission host is alive in the cluster: start one on each machine with "
    "`ray start --address=HEAD:6379 --resources='{\"fission_host\": 1}'`"
)


class HostLost(NotReady):
    """The host that had the sandbox or the run is gone (its node died or left)."""

    code = "host_lost"


def unwrap(exc: BaseException, host: str, doing: str) -> BaseException:
    """The error to raise for an actor call to ``host`` that failed with ``exc``."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause
        if isinstance(cause, FissionError):
            return cause
    if isinstance(exc, GONE):
        return HostLost(
            f"host {host} is gone ({type(exc).__name__}) while {doing}: retry; new work goes "
            "to the other hosts"
        )
    return exc


async def call(ref: Awaitable[Any], host: str, doing: str) -> Any:
    """Await an actor call, raising what the host raised (``unwrap``)."""
    try:
        return await ref
    except Exception as exc:
        raise unwrap(exc, host, doing) from None


def call_sync(ref: Any, host: str, doing: str) -> Any:
    """``call`` for the Service API's synchronous methods (a short blocking round trip)."""
    try:
        return ray.get(ref)
    except Exception as exc:
        raise unwrap(exc, host, doing) from None


async def stream(generator: Any, host: str, doing: str) -> AsyncIterator[Any]:
    """The items of a Ray streaming generator, as they come."""
    try:
        async for ref in generator:
            yield await ref
    except Exception as exc:
        raise unwrap(exc, host, doing) from None


class Fleet:
    """A front end's view of the fleet: the control actor, the agents, their last reports."""

    def __init__(self, control: Any) -> None:
        self.control = control
        self.views: dict[str, HostView] = {}
        self.reports: dict[str, dict[str, Any]] = {}
        self._agents: dict[str, Any] = {}
        self._seen = 0.0
        self._refreshing: asyncio.Task[None] | None = None

    def agent(self, host: str) -> Any:
        """The actor handle of ``host`` (HostLost if it is gone)."""
        handle = self._agents.get(host)
        if handle is None:
            try:
                handle = self._agents[host] = agent_handle(host)
            except ValueError:
                raise HostLost(f"host {host} is gone: its agent no longer exists") from None
        return handle

    async def hosts(self) -> list[HostView]:
        """Alive hosts' views, refreshed when older than ``VIEW_TTL``."""
        if time.monotonic() - self._seen > VIEW_TTL:
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.create_task(self._refresh())
            await asyncio.shield(self._refreshing)
        hosts = [view for view in self.views.values() if view.alive]
        if not hosts:
            raise NotReady(NO_HOSTS)
        return hosts

    async def _refresh(self) -> None:
        known = await self.control.hosts.remote()
        alive = [h for h in known if h["alive"]]
        reports = await asyncio.gather(
            *(self._status(h["name"]) for h in alive), return_exceptions=True
        )
        views, by_name = {}, {}
        for host, report in zip(alive, reports, strict=True):
            if isinstance(report, BaseException):
                self._agents.pop(host["name"], None)
                continue
            view = HostView.from_status(report)
            view.draining = host["draining"]
            views[view.name] = view
            by_name[view.name] = report
        self.views, self.reports = views, by_name
        self._seen = time.monotonic()

    async def _status(self, host: str) -> dict[str, Any]:
        return dict(await asyncio.wait_for(self.agent(host).status.remote(), STATUS_TIMEOUT))
