"""Every HTTP route of a keyed listener refuses callers it should refuse, read off the app.

The routes are taken from the app itself, not listed by hand, so a route added later is checked
too: no key and a forged key get 401 on every route but the health check; another key's sandbox
is not found (404) on every sandbox route; a user key gets 403 on operator routes. WebSocket
routes (terminals) are checked on real VMs in tests/integration/test_pty.py; the port proxy,
left out of the OpenAPI document, has its own test below.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from fission.auth.keys import KeyStore
from fission.core.languages import resolve_language
from fission.core.sandbox_spec import SandboxSpec
from fission.core.service import Service
from fission.server.app import create_app

OPEN = {"/v1/health"}  # answers anyone: says only that the daemon is up
ADMIN_ONLY = {"/v1/gc", "/v1/cluster", "/metrics"}
# A valid request body where a route needs one, so a refusal is about the caller, not the body.
BODIES = {
    "/ttl": {"ttl": 60},
    "/run": {"code": "print(1)"},
    "/exec": {"command": "true"},
    "/files/mkdir": {"path": "d"},
    "/fork": {"n": 1},
    "/rewind": {"checkpoint_id": "snap_x"},
    "/expose": {"port": 8000},
}
FORGED = {"Authorization": "Bearer fsk_000000000000_" + "A" * 43}


def concrete(path: str, sandbox_id: str) -> str:
    """``path`` with its parameters filled in: the sandbox's id, a port, a name."""
    path = path.replace("{sandbox_id}", sandbox_id).replace("{port}", "8000")
    return re.sub(r"\{[^}]+\}", "x", path)


def routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route in the app's OpenAPI document (every REST route: the
    document is built from the app's own route table)."""
    return [
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
        if method in ("get", "post", "put", "patch", "delete")
    ]


async def test_every_route_refuses_no_key_a_forged_key_and_another_key(
    service: Service, tmp_path: Path
) -> None:
    db = tmp_path / "keys.sqlite3"
    with KeyStore(db) as store:
        owner, owner_key = store.create("owner")
        _, other_key = store.create("other")
    box = await service.sandboxes.create(SandboxSpec(resolve_language("bash")), owner=owner.id)
    app = create_app(service, keys_db=db)
    table = routes(app)
    paths = {path for _, path in table}
    assert {"/v1/run", "/v1/sandboxes/{sandbox_id}", "/v1/snapshots"} <= paths
    assert any("watch" in path for path in paths) and any("expose" in path for path in paths)
    transport = httpx.ASGITransport(app=app)
    checked = 0
    wrong: list[tuple[str, str, int]] = []
    async with httpx.AsyncClient(transport=transport, base_url="http://fission") as client:
        for method, path in table:
            if path in OPEN:
                continue
            url = concrete(path, box.id)
            body = next((b for end, b in BODIES.items() if path.endswith(end)), {})
            ask: dict[str, Any] = {"params": {"path": "x"}}
            if method == "PUT":
                ask["content"] = b"data"
            elif method != "GET":
                ask["json"] = body
            for headers in ({}, FORGED):
                answer = await client.request(method, url, headers=headers, **ask)
                assert answer.status_code == 401, (method, path, headers, answer.text)
            other = {"Authorization": f"Bearer {other_key}"}
            answer = await client.request(method, url, headers=other, **ask)
            if path in ADMIN_ONLY:
                assert answer.status_code == 403, (method, path, answer.text)
            elif "{sandbox_id}" in path and answer.status_code != 404:
                wrong.append((method, path, answer.status_code))
            checked += 1
        # the owner still has its sandbox: nothing above touched it
        mine = await client.get(
            f"/v1/sandboxes/{box.id}", headers={"Authorization": f"Bearer {owner_key}"}
        )
    assert wrong == [], wrong
    assert mine.status_code == 200 and mine.json()["state"] == "running"
    assert checked >= 30
    await service.sandboxes.delete(box.id)
