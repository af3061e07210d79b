"""Which host takes a run or a sandbox: pure functions over what the hosts last reported.

A host reports its free memory (budget minus reservations), its warm pools and how many
sandboxes it holds (``HostView``). One-shot runs go to a host with a warm VM of their language,
then to the one with the most free memory; sandboxes to the host with the most free memory that
fits them; a sandbox started from a snapshot to the host holding the snapshot unless it is full.
Draining and lost hosts take nothing new. Each function returns candidates best first, so a
caller refused by one host (``Busy``: the report was stale) tries the next.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class HostView:
    """One host as the front end last saw it."""

    name: str
    node_id: str
    free_mb: int
    total_mb: int
    warm: dict[str, int] = field(default_factory=dict)  # language -> ready VMs
    sandboxes: int = 0
    alive: bool = True
    draining: bool = False

    @property
    def open(self) -> bool:
        """True when the host takes new work."""
        return self.alive and not self.draining

    @classmethod
    def from_status(cls, status: dict[str, Any]) -> HostView:
        """The view of a host agent's ``status()``."""
        service = status["service"]
        warm = {pool["language"]: int(pool.get("ready", 0)) for pool in service.get("pools", [])}
        total = int(service["memory_budget_mb"])
        return cls(
            name=status["host"],
            node_id=status["node_id"],
            free_mb=total - int(service["memory_reserved_mb"]),
            total_mb=total,
            warm=warm,
            sandboxes=int(service.get("sandboxes", 0)),
            draining=bool(status.get("draining", False)),
        )


def for_run(hosts: Iterable[HostView], language: str) -> list[HostView]:
    """Hosts for a one-shot run of ``language``: a warm VM first, then the most free memory."""
    candidates = [h for h in hosts if h.open]
    return sorted(candidates, key=lambda h: (h.warm.get(language, 0) <= 0, -h.free_mb, h.name))


def for_sandbox(
    hosts: Iterable[HostView], needed_mb: int, prefer: str | None = None
) -> list[HostView]:
    """Hosts with room for a ``needed_mb`` sandbox, ``prefer`` first if it has room."""
    fitting = [h for h in hosts if h.open and h.free_mb >= needed_mb]
    return sorted(fitting, key=lambda h: (h.name != prefer, -h.free_mb, h.sandboxes, h.name))


def took(host: HostView, mb: int) -> None:
    """Count a sandbox of ``mb`` on ``host`` until its next report (placements see it)."""
    host.free_mb -= mb
    host.sandboxes += 1


def took_warm(host: HostView, language: str) -> None:
    """Count a warm VM of ``language`` as taken from ``host`` until its next report."""
    if host.warm.get(language, 0) > 0:
        host.warm[language] -= 1
