"""The dashboard's snapshots: the snapshots page (every owner's snapshots, each key's disk use
against its quota, the daemon's snapshot budget and what ``gc`` would reclaim), deleting a
snapshot, and the snapshot, fork and rewind actions of a sandbox's page.

An operator acts for the sandbox's owner: a snapshot or fork taken from here counts against
the owner's key (its snapshot quota and its sandbox limit), as if the owner had asked.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from fission.auth.audit_log import LOCAL
from fission.auth.keys import ApiKey, KeyLimits, KeyStore
from fission.core.sandbox_snapshots import MAX_FORK
from fission.core.snapshot_store import SnapshotRecord
from fission.errors import InvalidInput
from fission.server.dashboard.actions import back_to, form_of, whole_number
from fission.server.dashboard.site import ChangingSession, CurrentSession, Dashboard, dashboard_of

router = APIRouter()
SandboxId = Annotated[str, Path(max_length=100)]
SnapshotId = Annotated[str, Path(max_length=100)]
MB = 1024 * 1024


async def keys_by_id(dash: Dashboard) -> dict[str, ApiKey]:
    """Every key of the daemon's key database (none without one)."""
    if dash.keys_db is None or not dash.keys_db.exists():
        return {}
    found: list[ApiKey] = await dash.with_keys(KeyStore.list)
    return {key.id: key for key in found}


async def owner_limits(dash: Dashboard, owner: str | None) -> KeyLimits | None:
    """The limits of the key that owns a sandbox (None: local, or a key no longer known)."""
    if owner is None:
        return None
    key = (await keys_by_id(dash)).get(owner)
    return key.limits if key is not None else None


def snapshot_row(record: SnapshotRecord) -> dict[str, Any]:
    """A snapshot as the tables show it."""
    return record.to_json() | {"owner": record.owner or LOCAL}


async def snapshots_data(dash: Dashboard) -> dict[str, Any]:
    """Every snapshot grouped by owner, each owner's use and quota, the budget and gc's view."""
    snapshots = dash.service.sandboxes.snapshots
    keys = await keys_by_id(dash)
    records = snapshots.list_snapshots()
    owners: dict[str | None, list[SnapshotRecord]] = {}
    for record in records:
        owners.setdefault(record.owner, []).append(record)
    groups = []
    for owner, owned in sorted(owners.items(), key=lambda item: item[0] or ""):
        key = keys.get(owner) if owner is not None else None
        quota_mb = key.limits.max_snapshot_mb if key is not None else None
        used = snapshots.store.used_bytes(owner)
        groups.append(
            {
                "owner": owner or LOCAL,
                "name": key.name if key is not None else ("local socket" if owner is None else ""),
                "used_bytes": used,
                "quota_mb": quota_mb,
                "snapshots": [snapshot_row(r) for r in sorted(owned, key=lambda r: -r.created_at)],
            }
        )
    report = await snapshots.gc(dry_run=True)
    return {
        "groups": groups,
        "count": len(records),
        "gc": report,
        "budget_mb": report["budget_mb"],
        "MB": MB,
    }


def snapshot_summary(dash: Dashboard) -> dict[str, Any]:
    """How many snapshots there are and the disk they take, for the overview."""
    store = dash.service.sandboxes.snapshots.store
    count, used = len(store.find()), store.used_bytes()
    return {"count": count, "used_bytes": used, "budget_mb": store.budget_mb}


def sandbox_snapshots(dash: Dashboard, sandbox_id: str) -> list[dict[str, Any]]:
    """The snapshots and checkpoints taken of one sandbox, newest first (rewind targets)."""
    found = dash.service.sandboxes.snapshots.list_snapshots(None, sandbox_id)
    return [snapshot_row(r) for r in sorted(found, key=lambda r: -r.created_at)]


# -- pages and actions ---------------------------------------------------------------------
@router.get("/snapshots", response_class=HTMLResponse)
async def snapshots_page(request: Request, _: CurrentSession) -> HTMLResponse:
    """Every owner's snapshots, disk use against quotas, the budget and a gc dry run."""
    dash = dashboard_of(request)
    return dash.page("snapshots.html", request, nav="snapshots", **await snapshots_data(dash))


@router.post("/snapshots/{snapshot_id}/delete")
async def delete_snapshot(
    request: Request, _: ChangingSession, snapshot_id: SnapshotId
) -> RedirectResponse:
    """Delete a snapshot (refused while a sandbox is built on it)."""
    await dashboard_of(request).service.sandboxes.snapshots.delete(snapshot_id)
    return back_to("/snapshots")


@router.post("/sandboxes/{sandbox_id}/snapshot")
async def take_snapshot(
    request: Request, _: ChangingSession, sandbox_id: SandboxId
) -> RedirectResponse:
    """Snapshot a running sandbox (it keeps running), within its owner's snapshot quota."""
    dash = dashboard_of(request)
    manager = dash.service.sandboxes
    limits = await owner_limits(dash, manager.get(sandbox_id).owner)
    name = form_of(request).get("name", "").strip() or None
    await manager.snapshots.snapshot(
        sandbox_id, None, name, max_snapshot_mb=limits.max_snapshot_mb if limits else None
    )
    return back_to(f"/sandboxes/{sandbox_id}")


@router.post("/sandboxes/{sandbox_id}/fork")
async def fork(request: Request, _: ChangingSession, sandbox_id: SandboxId) -> RedirectResponse:
    """Fork a running sandbox ``n`` times; the page of the first new sandbox opens."""
    dash = dashboard_of(request)
    manager = dash.service.sandboxes
    n = whole_number(form_of(request), "n", "the number of forks")
    if not 1 <= n <= MAX_FORK:
        raise InvalidInput(f"the number of forks {n} is out of range: use 1 to {MAX_FORK}")
    limits = await owner_limits(dash, manager.get(sandbox_id).owner)
    _snapshot, clones = await manager.snapshots.fork(
        sandbox_id,
        n,
        None,
        limits.max_concurrent_sandboxes if limits else None,
        limits.max_snapshot_mb if limits else None,
    )
    return back_to(f"/sandboxes/{clones[0].id}")


@router.post("/sandboxes/{sandbox_id}/rewind")
async def rewind(request: Request, _: ChangingSession, sandbox_id: SandboxId) -> RedirectResponse:
    """Rewind a sandbox to one of its snapshots or checkpoints."""
    snapshot_id = form_of(request).get("snapshot_id", "").strip()
    if not snapshot_id:
        raise InvalidInput("choose the snapshot or checkpoint to rewind to")
    await dashboard_of(request).service.sandboxes.snapshots.rewind(sandbox_id, snapshot_id)
    return back_to(f"/sandboxes/{sandbox_id}")
