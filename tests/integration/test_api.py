"""The REST API against a real daemon on loopback TCP: keys, quotas, sandboxes, audit, expiry."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fission.agent.client import AgentClient
from tests.integration.conftest import FISSION
from tests.integration.servers import TcpDaemon
from tests.integration.test_warm import qemu_pids

pytestmark = pytest.mark.vm
AGENT_FILES = pytest.mark.skipif(
    not hasattr(AgentClient, "write_file"), reason="the guest agent has no file operations yet"
)
AGENT_CONTEXTS = pytest.mark.skipif(
    not hasattr(AgentClient, "drop_context"), reason="the guest agent has no code contexts yet"
)


@pytest.fixture(scope="module")
def daemon() -> Iterator[TcpDaemon]:
    d = TcpDaemon("--pool", "python=1")
    d.start()
    yield d
    d.stop()
    assert qemu_pids(d.state) == [], "the daemon left a VM behind"


@pytest.fixture(scope="module")
def key(daemon: TcpDaemon) -> str:
    return daemon.create_key("tester")


@pytest.fixture(scope="module")
def api(daemon: TcpDaemon, key: str) -> Iterator[httpx.Client]:
    with daemon.client(key) as client:
        yield client


def lines(response: httpx.Response) -> list[dict[str, Any]]:
    """The NDJSON lines of a streamed run."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines() if line]


def stdout_of(found: list[dict[str, Any]]) -> str:
    return "".join(line.get("data", "") for line in found if line.get("stream") == "stdout")


def error_code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


def test_health_needs_no_key_but_everything_else_does(daemon: TcpDaemon) -> None:
    with daemon.client(None) as anonymous:
        assert anonymous.get("/v1/health").json()["ok"] is True
        refused = anonymous.get("/v1/pools")
        assert refused.status_code == 401 and error_code(refused) == "unauthorized"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert anonymous.post("/v1/sandboxes", json={}).status_code == 401
        assert anonymous.post("/v1/run", json={"code": "print(1)"}).status_code == 401
    with daemon.client("fsk_000000000000_" + "x" * 43) as forged:
        assert forged.get("/v1/pools").status_code == 401
    with daemon.client("not-a-key") as malformed:
        assert malformed.get("/v1/pools").status_code == 401


def test_a_revoked_key_is_refused_at_once(daemon: TcpDaemon) -> None:
    doomed = daemon.create_key("doomed")
    with daemon.client(doomed) as client:
        assert client.get("/v1/pools").status_code == 200
        daemon.revoke_key("doomed")
        refused = client.get("/v1/pools")
        assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]


def test_one_shot_run_streams_ndjson_and_sse(api: httpx.Client) -> None:
    body = {"code": "print('a'); import sys; print('b', file=sys.stderr); exit(3)"}
    found = lines(api.post("/v1/run", json=body))
    assert stdout_of(found) == "a\n" and found[-1]["type"] == "result"
    assert found[-1]["exit_code"] == 3
    sse = api.post("/v1/run?format=sse", json={"code": "print(7)"})
    assert sse.headers["content-type"].startswith("text/event-stream")
    events = [block for block in sse.text.split("\n\n") if block]
    assert events[0].startswith("event: output\ndata: ") and events[-1].startswith("event: result")


def test_sandbox_lifecycle(api: httpx.Client, daemon: TcpDaemon) -> None:
    created = api.post("/v1/sandboxes", json={"ttl": 120, "metadata": {"suite": "api"}})
    assert created.status_code == 201, created.text
    box = created.json()
    sid = box["id"]
    assert box["state"] == "running" and box["metadata"] == {"suite": "api"}
    try:
        assert api.get(f"/v1/sandboxes/{sid}").json()["id"] == sid
        listed = api.get("/v1/sandboxes", params={"metadata": "suite:api"}).json()
        assert [s["id"] for s in listed["sandboxes"]] == [sid]
        assert api.get("/v1/sandboxes", params={"metadata": "suite:other"}).json()["sandboxes"] == []

        out = lines(api.post(f"/v1/sandboxes/{sid}/exec",
                             json={"command": "for i in 1 2 3; do echo $i; done; echo kept > f.txt"}))
        assert stdout_of(out) == "1\n2\n3\n" and out[-1]["exit_code"] == 0
        argv = lines(api.post(f"/v1/sandboxes/{sid}/exec", json={"command": ["cat", "f.txt"]}))
        assert stdout_of(argv) == "kept\n"
        ran = lines(api.post(f"/v1/sandboxes/{sid}/run",
                             json={"code": "print(open('f.txt').read().strip() * 2)"}))
        assert stdout_of(ran) == "keptkept\n"

        paused = api.post(f"/v1/sandboxes/{sid}/pause")
        assert paused.status_code == 200 and paused.json()["state"] == "paused"
        refused = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "true"})
        assert refused.status_code == 409 and error_code(refused) == "sandbox_not_running"
        assert api.get("/v1/sandboxes", params={"state": "paused"}).json()["sandboxes"][0]["id"] == sid
        resumed = api.post(f"/v1/sandboxes/{sid}/resume")
        assert resumed.json()["state"] == "running"
        after = lines(api.post(f"/v1/sandboxes/{sid}/exec",
                               json={"command": "cat f.txt; date +%s"}))
        kept, stamp = stdout_of(after).split()
        assert kept == "kept" and abs(int(stamp) - time.time()) < 30  # the clock was set

        longer = api.post(f"/v1/sandboxes/{sid}/ttl", json={"ttl": 600}).json()
        assert longer["expires_at"] > time.time() + 500
    finally:
        assert api.delete(f"/v1/sandboxes/{sid}").status_code == 204
    gone = api.get(f"/v1/sandboxes/{sid}")
    assert gone.status_code == 404 and error_code(gone) == "sandbox_not_found"


def test_keys_see_only_their_own_sandboxes(api: httpx.Client, daemon: TcpDaemon) -> None:
    sid = api.post("/v1/sandboxes", json={}).json()["id"]
    try:
        with daemon.client(daemon.create_key("other")) as other:
            assert other.get(f"/v1/sandboxes/{sid}").status_code == 404
            assert other.delete(f"/v1/sandboxes/{sid}").status_code == 404
            assert other.get("/v1/sandboxes").json()["sandboxes"] == []
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_quota_overruns_get_429(daemon: TcpDaemon) -> None:
    with daemon.client(daemon.create_key("one-box", "--max-sandboxes", "1")) as client:
        first = client.post("/v1/sandboxes", json={})
        assert first.status_code == 201
        try:
            second = client.post("/v1/sandboxes", json={})
            assert second.status_code == 429 and error_code(second) == "quota_exceeded"
            assert "--max-sandboxes" in second.json()["error"]["message"]
        finally:
            client.delete(f"/v1/sandboxes/{first.json()['id']}")
        assert client.post("/v1/sandboxes", json={"ttl": 5}).status_code == 201  # slot freed
    with daemon.client(daemon.create_key("slow", "--rate-per-minute", "3")) as client:
        codes = [client.get("/v1/pools").status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
        limited = client.get("/v1/pools")
        assert int(limited.headers["retry-after"]) >= 1


def test_a_sandbox_dies_at_its_ttl(api: httpx.Client, daemon: TcpDaemon) -> None:
    sid = api.post("/v1/sandboxes", json={"ttl": 2}).json()["id"]
    vms_before = len(qemu_pids(daemon.state))
    deadline = time.monotonic() + 30
    while api.get(f"/v1/sandboxes/{sid}").status_code == 200:
        assert time.monotonic() < deadline, "the sandbox outlived its ttl"
        time.sleep(0.3)
    time.sleep(0.5)
    assert len(qemu_pids(daemon.state)) < vms_before
    assert not (daemon.state / "sandboxes" / sid).exists()


def test_bad_requests_name_what_was_wrong(api: httpx.Client) -> None:
    unknown = api.post("/v1/sandboxes", json={"language": "cobol"})
    assert unknown.status_code == 400 and "python" in unknown.json()["error"]["message"]
    assert api.post("/v1/sandboxes", json={"ttl": 0}).status_code == 400
    assert api.post("/v1/sandboxes", json={"memory_mb": 1}).status_code == 400
    assert api.post("/v1/sandboxes", json={"network": "open"}).status_code == 400
    shape = api.post("/v1/sandboxes", json={"ttl": "soon"})
    assert shape.status_code == 422 and error_code(shape) == "invalid_input"
    assert api.get("/v1/sandboxes", params={"cursor": "junk"}).status_code == 400


def test_openapi_document_lists_every_route(daemon: TcpDaemon) -> None:
    document = httpx.get(f"{daemon.url}/openapi.json", timeout=10).json()
    paths = set(document["paths"])
    assert {"/v1/run", "/v1/sandboxes", "/v1/sandboxes/{sandbox_id}/exec",
            "/v1/sandboxes/{sandbox_id}/files", "/v1/sandboxes/{sandbox_id}/pause"} <= paths


def test_the_audit_log_says_who_ran_what(daemon: TcpDaemon, api: httpx.Client, key: str) -> None:
    api.post("/v1/run", json={"code": "print(1)"}).read()
    out = subprocess.run([FISSION, "audit", "--db", str(daemon.db), "--json", "--limit", "500"],
                         capture_output=True, text=True, timeout=60, check=True)
    events = json.loads(out.stdout)
    key_id = key.split("_")[1]
    runs = [e for e in events if e["action"] == "run" and e["who"] == key_id]
    assert runs and runs[0]["outcome"] == "ok" and runs[0]["language"] == "python"
    assert runs[0]["limits"]["memory_mb"] == 256
    assert any(e["action"] == "sandbox.create" and e["who"] == key_id for e in events)


@AGENT_FILES
def test_files_move_both_ways_with_their_checksum(api: httpx.Client) -> None:
    sid = api.post("/v1/sandboxes", json={}).json()["id"]
    try:
        data = os.urandom(20 * 1024 * 1024)
        put = api.put(f"/v1/sandboxes/{sid}/files", params={"path": "big.bin"}, content=data)
        assert put.status_code == 200, put.text
        assert put.json()["size"] == len(data)
        check = lines(api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "sha256sum big.bin"}))
        assert stdout_of(check).split()[0] == hashlib.sha256(data).hexdigest()
        got = api.get(f"/v1/sandboxes/{sid}/files", params={"path": "big.bin"})
        assert got.status_code == 200 and hashlib.sha256(got.content).digest() == hashlib.sha256(data).digest()
        names = [e["name"] for e in api.get(f"/v1/sandboxes/{sid}/files/list").json()["entries"]]
        assert "big.bin" in names
        assert api.delete(f"/v1/sandboxes/{sid}/files", params={"path": "big.bin"}).status_code == 204
        missing = api.get(f"/v1/sandboxes/{sid}/files/stat", params={"path": "big.bin"})
        assert missing.status_code == 404 and error_code(missing) == "file_not_found"
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


@AGENT_FILES
@pytest.mark.parametrize(
    "path", ["../../etc/passwd", "/etc/passwd", "/proc/self/environ", "link/passwd", "rootlink/etc/hostname"]
)
def test_paths_cannot_leave_the_sandbox(api: httpx.Client, path: str) -> None:
    sid = api.post("/v1/sandboxes", json={}).json()["id"]
    try:
        lines(api.post(f"/v1/sandboxes/{sid}/exec",
                       json={"command": "ln -s /etc link; ln -s /proc/self/root rootlink"}))
        for response in (
            api.get(f"/v1/sandboxes/{sid}/files", params={"path": path}),
            api.put(f"/v1/sandboxes/{sid}/files", params={"path": path}, content=b"x"),
        ):
            assert response.status_code == 400, response.text
            assert error_code(response) == "path_not_allowed"
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


@AGENT_CONTEXTS
def test_a_context_keeps_variables_across_runs(api: httpx.Client) -> None:
    sid = api.post("/v1/sandboxes", json={}).json()["id"]
    try:
        run = f"/v1/sandboxes/{sid}/run"
        lines(api.post(run, json={"code": "x = 41", "context": "nb"}))
        assert stdout_of(lines(api.post(run, json={"code": "print(x + 1)", "context": "nb"}))) == "42\n"
        fresh = lines(api.post(run, json={"code": "print(x)", "context": "nb", "fresh_context": True}))
        assert fresh[-1]["exit_code"] == 1
    finally:
        api.delete(f"/v1/sandboxes/{sid}")
