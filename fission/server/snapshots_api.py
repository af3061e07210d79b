"""HTTP routes of sandbox snapshots: take, fork, rewind, list, get, delete, gc.

A thin adapter over ``SandboxManager.snapshots`` (``core/sandbox_snapshots``). Another key's
sandbox or snapshot answers 404 like one that does not exist; ``/v1/gc`` is an admin route.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from fission.core.sandboxes import SandboxManager
from fission.server.auth import Admin, Who
from fission.server.models import ForkBody, GcBody, RewindBody, SnapshotBody


def snapshot_router(manager: SandboxManager) -> APIRouter:
    """The snapshot routes over ``manager`` (callers admitted by ``auth.Who``)."""
    router = APIRouter(tags=["snapshots"])
    snapshots = manager.snapshots

    @router.post("/v1/sandboxes/{sandbox_id}/snapshots", status_code=201, summary="Snapshot")
    async def take(sandbox_id: str, body: SnapshotBody, who: Who) -> dict[str, Any]:
        record = await snapshots.snapshot(
            sandbox_id, who.owner, body.name, max_snapshot_mb=who.max_snapshot_mb
        )
        return record.to_json()

    @router.post("/v1/sandboxes/{sandbox_id}/fork", status_code=201, summary="Fork a sandbox")
    async def fork(sandbox_id: str, body: ForkBody, who: Who) -> dict[str, Any]:
        snapshot, clones = await snapshots.fork(
            sandbox_id, body.n, who.owner, who.max_sandboxes, who.max_snapshot_mb
        )
        return {"snapshot": snapshot.to_json(), "sandboxes": [c.to_json() for c in clones]}

    @router.post("/v1/sandboxes/{sandbox_id}/rewind", summary="Rewind to a checkpoint")
    async def rewind(sandbox_id: str, body: RewindBody, who: Who) -> dict[str, Any]:
        record = await snapshots.rewind(sandbox_id, body.checkpoint_id, who.owner)
        return record.to_json()

    @router.get("/v1/snapshots", summary="List snapshots")
    async def list_snapshots(
        who: Who, sandbox_id: str | None = None, kind: str | None = None
    ) -> dict[str, Any]:
        records = snapshots.list_snapshots(who.owner, sandbox_id, kind)
        used = snapshots.store.used_bytes(who.owner)
        return {"snapshots": [r.to_json() for r in records], "used_bytes": used}

    @router.get("/v1/snapshots/{snapshot_id}", summary="Get a snapshot")
    async def get(snapshot_id: str, who: Who) -> dict[str, Any]:
        return snapshots.get(snapshot_id, who.owner).to_json()

    @router.delete("/v1/snapshots/{snapshot_id}", status_code=204, summary="Delete a snapshot")
    async def delete(snapshot_id: str, who: Who) -> Response:
        await snapshots.delete(snapshot_id, who.owner)
        return Response(status_code=204)

    @router.post("/v1/gc", summary="Reclaim snapshot space (admin keys and the local socket)")
    async def gc(body: GcBody, who: Admin) -> dict[str, Any]:
        # the whole daemon's storage, everyone's snapshots: the operator's call, not a user's
        return await snapshots.gc(body.dry_run, body.budget_mb)

    return router
