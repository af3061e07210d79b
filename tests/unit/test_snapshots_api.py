"""The snapshot routes over REST on the fake driver: the happy path and every bad input."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from fission.auth.keys import KeyLimits, KeyStore
from fission.core.service import Service
from fission.server.app import create_app
from fission.vmm.base import STATE_NAME
from tests.unit.conftest import ServiceStarter

Client = httpx.AsyncClient


@pytest_asyncio.fixture(loop_scope="function")
async def keyed(
    start_service: ServiceStarter, tmp_path: Path
) -> AsyncIterator[tuple[Service, Client, dict[str, str], dict[str, str]]]:
    """A keyed listener's app and two keys' headers (the first with a 1 MB snapshot quota)."""
    service = await start_service()
    db = tmp_path / "keys.sqlite3"
    with KeyStore(db) as store:
        _, one = store.create("one", KeyLimits(max_snapshot_mb=1, max_concurrent_sandboxes=4))
        _, two = store.create("two")
    app = create_app(service, keys_db=db)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fission") as client:
        yield (
            service,
            client,
            {"Authorization": f"Bearer {one}"},
            {"Authorization": f"Bearer {two}"},
        )


async def exec_json(client: Client, sandbox_id: str, body: dict, headers: dict) -> dict:  # type: ignore[type-arg]
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json=body, headers=headers)
    assert response.status_code == 200, response.text
    lines = [json.loads(line) for line in response.text.splitlines()]
    stdout = "".join(x["data"] for x in lines if x["type"] == "output" and x["stream"] == "stdout")
    return lines[-1] | {"stdout": stdout}  # type: ignore[no-any-return]


async def test_snapshot_fork_rewind_list_and_delete(
    keyed: tuple[Service, Client, dict[str, str], dict[str, str]],
) -> None:
    _service, client, one, two = keyed
    box = (await client.post("/v1/sandboxes", json={"language": "bash"}, headers=one)).json()
    first = await exec_json(client, box["id"], {"command": "echo a > f", "checkpoint": True}, one)
    assert first["checkpoint_id"].startswith("snap_")
    await exec_json(client, box["id"], {"command": "echo b > f"}, one)
    taken = await client.post(
        f"/v1/sandboxes/{box['id']}/snapshots", json={"name": "b"}, headers=one
    )
    assert taken.status_code == 201 and taken.json()["name"] == "b"
    forked = await client.post(f"/v1/sandboxes/{box['id']}/fork", json={"n": 2}, headers=one)
    assert forked.status_code == 201 and len(forked.json()["sandboxes"]) == 2
    clone = forked.json()["sandboxes"][0]["id"]
    assert (await exec_json(client, clone, {"command": "cat f"}, one))["stdout"] == "b\n"
    made = await client.post(
        "/v1/sandboxes", json={"from_snapshot": taken.json()["id"], "ttl": 60}, headers=one
    )
    assert made.status_code == 201 and made.json()["ttl"] == 60
    rewound = await client.post(
        f"/v1/sandboxes/{box['id']}/rewind",
        json={"checkpoint_id": first["checkpoint_id"]},
        headers=one,
    )
    assert rewound.status_code == 200
    assert (await exec_json(client, box["id"], {"command": "cat f"}, one))["stdout"] == "a\n"
    listed = (await client.get("/v1/snapshots", headers=one)).json()
    assert {s["kind"] for s in listed["snapshots"]} == {"checkpoint", "snapshot", "fork"}
    assert listed["used_bytes"] > 0
    assert (await client.get("/v1/snapshots", headers=two)).json()["snapshots"] == []
    got = await client.get(f"/v1/snapshots/{taken.json()['id']}", headers=one)
    assert got.json()["sandbox_id"] == box["id"]
    in_use = await client.delete(f"/v1/snapshots/{taken.json()['id']}", headers=one)
    assert in_use.status_code == 409 and "in use" in in_use.json()["error"]["message"]
    await client.delete(f"/v1/sandboxes/{made.json()['id']}", headers=one)
    gone = await client.delete(f"/v1/snapshots/{taken.json()['id']}", headers=one)
    assert gone.status_code == 204
    again = await client.get(f"/v1/snapshots/{taken.json()['id']}", headers=one)
    assert again.status_code == 404 and again.json()["error"]["code"] == "snapshot_not_found"


async def test_bad_inputs_get_clear_4xx(
    keyed: tuple[Service, Client, dict[str, str], dict[str, str]],
) -> None:
    service, client, one, two = keyed
    box = (await client.post("/v1/sandboxes", json={"language": "bash"}, headers=one)).json()
    base = f"/v1/sandboxes/{box['id']}"
    for n in (0, 17):
        bad = await client.post(f"{base}/fork", json={"n": n}, headers=one)
        assert bad.status_code == 400 and "1 to 16" in bad.json()["error"]["message"]
    other = await client.post(f"{base}/fork", json={"n": 1}, headers=two)
    assert other.status_code == 404  # another key's sandbox, as for any other call
    assert (await client.post(f"{base}/snapshots", json={}, headers=two)).status_code == 404
    unknown = await client.post("/v1/sandboxes", json={"from_snapshot": "snap_nope"}, headers=one)
    assert unknown.status_code == 404 and "snap_nope" in unknown.json()["error"]["message"]
    rewind = await client.post(f"{base}/rewind", json={"checkpoint_id": "snap_nope"}, headers=one)
    assert rewind.status_code == 404
    # over the key's 1 MB snapshot quota
    await exec_json(client, box["id"], {"command": "head -c 400000 /dev/urandom > big"}, one)
    codes = [
        (await client.post(f"{base}/snapshots", json={}, headers=one)).status_code for _ in range(4)
    ]
    assert codes[0] == 201 and codes[-1] == 429
    over = await client.post(f"{base}/snapshots", json={}, headers=one)
    assert "snapshot quota" in over.json()["error"]["message"]
    # paused, then deleted
    await client.post(f"{base}/pause", headers=one)
    paused = await client.post(f"{base}/fork", json={"n": 1}, headers=one)
    assert paused.status_code == 409 and "resume it first" in paused.json()["error"]["message"]
    await client.delete(base, headers=one)
    deleted = await client.post(f"{base}/fork", json={"n": 1}, headers=one)
    assert deleted.status_code == 404
    assert (await client.post("/v1/gc", json={}, headers=one)).status_code == 403  # not admin
    assert service.sandboxes.count() == 0


async def test_a_corrupted_snapshot_answers_409_and_is_audited(
    start_service: ServiceStarter, tmp_path: Path
) -> None:
    from fission.auth.audit_log import AuditLog

    service = await start_service(audit_db=tmp_path / "audit.sqlite3")
    transport = httpx.ASGITransport(app=create_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://fission") as client:
        box = (await client.post("/v1/sandboxes", json={"language": "bash"})).json()
        snap = (await client.post(f"/v1/sandboxes/{box['id']}/snapshots", json={})).json()
        state = service.sandboxes.snapshots.store.directory(snap["id"]) / STATE_NAME
        state.chmod(0o644)
        state.write_bytes(state.read_bytes()[:-1])
        refused = await client.post("/v1/sandboxes", json={"from_snapshot": snap["id"]})
        assert refused.status_code == 409
        error = refused.json()["error"]
        assert error["code"] == "integrity_error" and "delete it" in error["message"]
        assert (await client.get(f"/v1/snapshots/{snap['id']}")).status_code == 200
        report = (await client.post("/v1/gc", json={"dry_run": True})).json()
        assert report["dry_run"] and report["used_bytes"] > 0
    with AuditLog(tmp_path / "audit.sqlite3") as log:
        events = [e for e in log.query() if e.outcome == "error:integrity_error"]
    assert events and events[0].detail["snapshot"] == snap["id"]


@pytest.mark.parametrize("n", ["x", None])
async def test_fork_n_must_be_a_number(
    keyed: tuple[Service, Client, dict[str, str], dict[str, str]], n: object
) -> None:
    _service, client, one, _two = keyed
    box = (await client.post("/v1/sandboxes", json={"language": "bash"}, headers=one)).json()
    bad = await client.post(f"/v1/sandboxes/{box['id']}/fork", json={"n": n}, headers=one)
    assert bad.status_code in (400, 422)
