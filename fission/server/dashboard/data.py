"""What the dashboard's pages show, gathered from the Service: filters, tables, numbers.

Nothing here touches a VM: sandboxes, pools and the budget come from the ``Service``, run
statistics from its audit log (read through the dashboard's own connection).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Query

from fission.auth.audit_log import LOCAL, AuditEvent
from fission.core.sandbox_spec import MAX_PAGE_SIZE, SandboxRecord, SandboxState
from fission.errors import InvalidInput
from fission.server.dashboard import views
from fission.server.dashboard.site import Dashboard
from fission.server.sandboxes_api import parse_metadata_filter

LIVE_INTERVAL = 1.0  # seconds between two looks at what a live fragment shows
RECENT_RUNS = 20
Text = Annotated[str, Query(max_length=200)]


@dataclass(frozen=True)
class SandboxQuery:
    """The sandboxes table's filters, order and page, as the query string gives them."""

    state: str = ""
    owner: str = ""
    metadata: str = ""
    sort: str = "created"
    order: str = "desc"
    page: int = 1
    size: int = 25

    def state_filter(self) -> SandboxState | None:
        """The state to show (None: all); InvalidInput for a state that does not exist."""
        if not self.state:
            return None
        try:
            return SandboxState(self.state)
        except ValueError as exc:
            names = ", ".join(s.value for s in SandboxState)
            raise InvalidInput(f"state {self.state[:40]!r} is not one of {names}") from exc

    def metadata_filter(self) -> dict[str, str]:
        """``team:ml job:7`` (space or comma separated) as a dict."""
        return parse_metadata_filter(self.metadata.replace(",", " ").split())


def sandbox_query(
    state: Text = "",
    owner: Text = "",
    metadata: Annotated[str, Query(max_length=1000)] = "",
    sort: Text = "created",
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 25,
) -> SandboxQuery:
    """FastAPI dependency: the sandboxes table's query string, bounded."""
    return SandboxQuery(state, owner, metadata, sort, order, page, size)


@dataclass(frozen=True)
class AuditQuery:
    """The audit table's filters."""

    since: str = "1h"
    key: str = ""
    action: str = ""
    outcome: str = ""
    limit: int = 200


def audit_query(
    since: Text = "1h",
    key: Text = "",
    action: Text = "",
    outcome: Text = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> AuditQuery:
    """FastAPI dependency: the audit table's query string, bounded."""
    return AuditQuery(since, key, action, outcome, limit)


def all_sandboxes(dash: Dashboard, query: SandboxQuery | None = None) -> list[SandboxRecord]:
    """Every sandbox matching ``query``'s filters (every owner: the dashboard is an admin's)."""
    manager = dash.service.sandboxes
    state = query.state_filter() if query else None
    metadata = query.metadata_filter() if query else {}
    owner = (query.owner or None) if query else None
    local_only = owner == LOCAL  # the tables show a sandbox without an owner key as `local`
    found: list[SandboxRecord] = []
    cursor = None
    while True:
        chunk, cursor = manager.list_sandboxes(
            None if local_only else owner, state, metadata, MAX_PAGE_SIZE, cursor
        )
        found.extend(chunk)
        if cursor is None:
            return [r for r in found if r.owner is None] if local_only else found


async def audit_events(
    dash: Dashboard, since: datetime | None, key: str | None, action: str | None, limit: int
) -> list[AuditEvent]:
    """Newest audit events (none when the daemon keeps no audit log)."""
    audit = await asyncio.to_thread(dash.audit_reader)
    if audit is None:
        return []
    return await asyncio.to_thread(audit.query, since=since, key=key, action=action, limit=limit)


# -- what each page shows --------------------------------------------------------------------
async def overview_data(dash: Dashboard, shared: bool = False) -> dict[str, Any]:
    """Budget, VMs by state, pools, and run statistics of the last half hour.

    ``shared`` (the live streams): computed at most once per ``LIVE_INTERVAL`` however many
    pages watch it.
    """
    cached = dash.overview_cache
    if shared and cached is not None and time.monotonic() - cached[0] < LIVE_INTERVAL:
        return dict(cached[1])
    data = await compute_overview(dash)
    dash.overview_cache = (time.monotonic(), data)
    return data


async def compute_overview(dash: Dashboard) -> dict[str, Any]:
    """The overview's numbers, now."""
    now = datetime.now(UTC)
    status = dash.service.status()
    events = await audit_events(
        dash, now - timedelta(minutes=views.WINDOW_MINUTES), None, None, 10_000
    )
    stats = views.run_stats(events, now)
    return {
        "status": status,
        "machines": views.machines_by_state(status, all_sandboxes(dash)),
        "stats": stats,
        "audit_enabled": dash.service.audit is not None,
    }


def sandboxes_data(dash: Dashboard, query: SandboxQuery) -> dict[str, Any]:
    """One page of the sandboxes table and how many pages there are."""
    records = views.sort_sandboxes(all_sandboxes(dash, query), query.sort, query.order == "desc")
    pages = max(1, -(-len(records) // query.size))
    start = (query.page - 1) * query.size
    return {
        "rows": [sandbox_row(r) for r in records[start : start + query.size]],
        "total": len(records),
        "page": query.page,
        "pages": pages,
        "query": query,
    }


def sandbox_row(record: SandboxRecord) -> dict[str, Any]:
    """A sandbox as the tables show it."""
    return record.to_json() | {"owner": record.owner or LOCAL}


async def sandbox_data(dash: Dashboard, sandbox_id: str) -> dict[str, Any]:
    """One sandbox: its record and its recent runs (SandboxNotFound when it is gone)."""
    record = dash.service.sandboxes.get(sandbox_id)
    events = await audit_events(dash, None, None, "sandbox", 500)
    runs = [views.event_row(e) for e in events if (e.detail or {}).get("sandbox") == record.id]
    return {"sandbox": sandbox_row(record), "runs": runs[:RECENT_RUNS]}


async def audit_data(dash: Dashboard, query: AuditQuery) -> dict[str, Any]:
    """The audit events the filters select, newest first."""
    now = datetime.now(UTC)
    since = views.parse_since(query.since, now) if query.since else None
    fetch = query.limit if not query.outcome else 10_000  # the log filters outcomes here
    events = await audit_events(dash, since, query.key or None, query.action or None, fetch)
    rows = [views.event_row(e) for e in views.filter_outcome(events, query.outcome)]
    return {
        "rows": rows[: query.limit],
        "query": query,
        "audit_enabled": dash.service.audit is not None,
    }
