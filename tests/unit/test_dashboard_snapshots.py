"""The dashboard's snapshots page and the snapshot, fork and rewind actions of a sandbox's
page, on the fake driver (the browser test drives the same forms in Chromium)."""

from __future__ import annotations

from pathlib import Path

import httpx

from fission.auth.keys import KeyLimits, KeyStore
from fission.core.languages import resolve_language
from fission.core.sandbox_spec import SandboxSpec
from fission.core.service import Service
from tests.unit.test_dashboard import ORIGIN, Keys, log_in, served

__all__ = ["served"]  # the fixture, shared with test_dashboard
BASH = SandboxSpec(resolve_language("bash"))


async def cat(service: Service, sandbox_id: str, path: str) -> bytes:
    return b"".join([c async for c in service.sandboxes.read_file(sandbox_id, path)])


def alice(tmp_path: Path) -> str:
    with KeyStore(tmp_path / "fission.sqlite3") as store:
        return store.get("alice").id


async def test_the_snapshots_page_without_snapshots_shows_the_budget_and_gc(
    served: tuple[Service, httpx.AsyncClient, Keys],
) -> None:
    _, client, keys = served
    await log_in(client, keys.admin)
    page = await client.get("/ui/snapshots")
    assert page.status_code == 200
    assert 'id="no-snapshots"' in page.text and 'id="gc-reclaim"' in page.text
    overview = await client.get("/ui/")
    assert "0 snapshots, forks and checkpoints" in overview.text
    assert 'href="/ui/snapshots"' in overview.text


async def test_snapshot_fork_rewind_and_delete_from_the_sandbox_page(
    served: tuple[Service, httpx.AsyncClient, Keys], tmp_path: Path
) -> None:
    service, client, keys = served
    csrf = await log_in(client, keys.admin)
    owner = alice(tmp_path)
    record = await service.sandboxes.create(BASH, owner=owner, max_sandboxes=5)
    await service.sandboxes.write_file(record.id, "/home/sandbox/f", b"before")
    base = f"/ui/sandboxes/{record.id}"

    refused = await client.post(f"{base}/snapshot", data={"name": "x"}, headers=ORIGIN)
    assert refused.status_code == 403  # no CSRF token: nothing taken
    taken = await client.post(
        f"{base}/snapshot", data={"csrf_token": csrf, "name": "first"}, headers=ORIGIN
    )
    assert taken.status_code == 303 and taken.headers["location"] == base
    (snapshot,) = service.sandboxes.snapshots.list_snapshots(owner)
    assert snapshot.name == "first" and snapshot.sandbox_id == record.id
    detail = await client.get(base)
    assert f'data-snapshot="{snapshot.id}"' in detail.text and 'id="fork"' in detail.text

    await service.sandboxes.write_file(record.id, "/home/sandbox/f", b"after")
    rewound = await client.post(
        f"{base}/rewind", data={"csrf_token": csrf, "snapshot_id": snapshot.id}, headers=ORIGIN
    )
    assert rewound.status_code == 303
    assert await cat(service, record.id, "/home/sandbox/f") == b"before"

    forked = await client.post(f"{base}/fork", data={"csrf_token": csrf, "n": "1"}, headers=ORIGIN)
    assert forked.status_code == 303
    clone_id = forked.headers["location"].rsplit("/", 1)[1]
    clone = service.sandboxes.get(clone_id)
    assert clone_id != record.id and clone.owner == owner  # made for the sandbox's owner
    assert await cat(service, clone_id, "/home/sandbox/f") == b"before"
    too_many = await client.post(
        f"{base}/fork", data={"csrf_token": csrf, "n": "99"}, headers=ORIGIN
    )
    assert too_many.status_code == 400 and "out of range" in too_many.text

    page = await client.get("/ui/snapshots")
    assert f'data-owner="{owner}"' in page.text and "alice" in page.text
    assert "of its 4096 MB quota" in page.text and f'data-snapshot="{snapshot.id}"' in page.text
    assert f'href="/ui/sandboxes/{record.id}"' in page.text

    in_use = await client.post(  # the rewound sandbox's disk is built on it
        f"/ui/snapshots/{snapshot.id}/delete", data={"csrf_token": csrf}, headers=ORIGIN
    )
    assert in_use.status_code == 409
    spare = await service.sandboxes.snapshots.snapshot(record.id, name="spare")
    deleted = await client.post(
        f"/ui/snapshots/{spare.id}/delete", data={"csrf_token": csrf}, headers=ORIGIN
    )
    assert deleted.status_code == 303 and deleted.headers["location"] == "/ui/snapshots"
    assert spare.id not in {s.id for s in service.sandboxes.snapshots.list_snapshots()}
    for sandbox_id in (clone_id, record.id):
        await service.sandboxes.delete(sandbox_id)


async def test_a_fork_from_the_dashboard_counts_against_the_owners_sandbox_limit(
    served: tuple[Service, httpx.AsyncClient, Keys], tmp_path: Path
) -> None:
    service, client, keys = served
    csrf = await log_in(client, keys.admin)
    with KeyStore(tmp_path / "fission.sqlite3") as store:
        store.set_limits("alice", KeyLimits(max_concurrent_sandboxes=1))
    owner = alice(tmp_path)
    record = await service.sandboxes.create(BASH, owner=owner, max_sandboxes=1)
    refused = await client.post(
        f"/ui/sandboxes/{record.id}/fork", data={"csrf_token": csrf, "n": "1"}, headers=ORIGIN
    )
    assert refused.status_code == 429 and "sandboxes" in refused.text
    assert [r.id for r in service.sandboxes.list_sandboxes()[0]] == [record.id]
    await service.sandboxes.delete(record.id)


async def test_a_snapshot_a_fork_uses_is_kept_and_bad_targets_are_clear_errors(
    served: tuple[Service, httpx.AsyncClient, Keys],
) -> None:
    service, client, keys = served
    csrf = await log_in(client, keys.admin)
    record = await service.sandboxes.create(BASH)
    snapshot, clones = await service.sandboxes.snapshots.fork(record.id, 1)
    busy = await client.post(
        f"/ui/snapshots/{snapshot.id}/delete", data={"csrf_token": csrf}, headers=ORIGIN
    )
    assert busy.status_code == 409  # a forked sandbox is built on it
    missing = await client.post(
        "/ui/snapshots/snap_nope/delete", data={"csrf_token": csrf}, headers=ORIGIN
    )
    assert missing.status_code == 404
    no_target = await client.post(
        f"/ui/sandboxes/{record.id}/rewind", data={"csrf_token": csrf}, headers=ORIGIN
    )
    assert no_target.status_code == 400 and "rewind to" in no_target.text
    for sandbox_id in (clones[0].id, record.id):
        await service.sandboxes.delete(sandbox_id)
