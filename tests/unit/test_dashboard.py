"""The dashboard (``/ui``) on the fake driver: login, sessions, CSRF, pages, actions, errors.

The browser tests (tests/integration/test_dashboard.py) drive the same pages in Chromium
against a real daemon; here every rule is checked in milliseconds through the ASGI app.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from fission.auth.keys import KeyLimits, KeyStore
from fission.core.languages import resolve_language
from fission.core.sandbox_spec import SandboxSpec, SandboxState
from fission.core.service import Service
from fission.server.app import create_app
from fission.server.dashboard.sessions import (
    ABSOLUTE_EXPIRY,
    COOKIE,
    IDLE_EXPIRY,
    SessionExpired,
    SessionStore,
)
from tests.unit.conftest import ServiceStarter

BASE = "http://fission"
ORIGIN = {"Origin": BASE}
CSRF = re.compile(r'name="csrf-token" content="([^"]+)"')


@dataclass
class Keys:
    admin: str
    admin_id: str
    user: str


@pytest_asyncio.fixture(loop_scope="function")
async def served(
    start_service: ServiceStarter, tmp_path: Path
) -> AsyncIterator[tuple[Service, httpx.AsyncClient, Keys]]:
    """A keyed listener's app (as on TCP) over a fake-driver service, and a client for it."""
    db = tmp_path / "fission.sqlite3"
    service = await start_service(audit_db=db)
    with KeyStore(db) as store:
        admin, admin_plain = store.create("ops", role="admin")
        _, user_plain = store.create("alice")
    app = create_app(service, keys_db=db)  # the lifespan is not run: the service is started
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        yield service, client, Keys(admin_plain, admin.id, user_plain)
    app.state.gate.close()


async def log_in(client: httpx.AsyncClient, key: str) -> str:
    """Log in with ``key``; the CSRF token of the session."""
    response = await client.post("/ui/login", data={"key": key}, headers=ORIGIN)
    assert response.status_code == 303, response.text
    page = await client.get("/ui/")
    assert page.status_code == 200
    match = CSRF.search(page.text)
    assert match is not None
    return match.group(1)


async def test_without_a_session_pages_go_to_login_and_json_is_401(served) -> None:
    _, client, _ = served
    page = await client.get("/ui/sandboxes")
    assert page.status_code == 303 and page.headers["location"] == "/ui/login"
    api = await client.get("/ui/api/overview")
    assert api.status_code == 401 and api.json()["error"]["code"] == "login_needed"
    login = await client.get("/ui/login")
    assert login.status_code == 200 and 'type="password"' in login.text


async def test_login_needs_an_admin_key_and_keeps_only_a_session_id(served) -> None:
    _, client, keys = served
    user = await client.post("/ui/login", data={"key": keys.user}, headers=ORIGIN)
    assert user.status_code == 403 and "admin key" in user.text
    bad = await client.post("/ui/login", data={"key": "fsk_nope"}, headers=ORIGIN)
    assert bad.status_code == 401 and "malformed API key" in bad.text
    foreign = await client.post(
        "/ui/login", data={"key": keys.admin}, headers={"Origin": "http://evil.example"}
    )
    assert foreign.status_code == 403
    ok = await client.post("/ui/login", data={"key": keys.admin}, headers=ORIGIN)
    assert ok.status_code == 303
    cookie = ok.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie
    assert "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert keys.admin not in cookie and keys.admin.split("_", 2)[2] not in cookie
    for path in ("/ui/", "/ui/sandboxes", "/ui/keys", "/ui/audit"):
        page = await client.get(path)
        assert page.status_code == 200, path
        assert keys.admin.split("_", 2)[2] not in page.text
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


async def test_a_forged_cookie_is_a_401_page_that_clears_it(served) -> None:
    _, client, _ = served
    page = await client.get("/ui/", headers={"Cookie": f"{COOKIE}=forged"})
    assert page.status_code == 401
    assert "expired or is not valid" in page.text and "/ui/login" in page.text
    assert f'{COOKIE}=""' in page.headers["set-cookie"]


async def test_state_changes_need_the_csrf_token_and_this_origin(served) -> None:
    service, client, keys = served
    csrf = await log_in(client, keys.admin)
    record = await service.sandboxes.create(SandboxSpec(resolve_language("bash")))
    pause = f"/ui/sandboxes/{record.id}/pause"
    assert (await client.post(pause, headers=ORIGIN)).status_code == 403
    wrong = await client.post(pause, data={"csrf_token": "x" * 43}, headers=ORIGIN)
    assert wrong.status_code == 403 and "CSRF" in wrong.text
    no_origin = await client.post(pause, data={"csrf_token": csrf})
    assert no_origin.status_code == 403 and "Origin" in no_origin.text
    assert service.sandboxes.get(record.id).state == SandboxState.RUNNING
    done = await client.post(pause, data={"csrf_token": csrf}, headers=ORIGIN)
    assert done.status_code == 303 and done.headers["location"] == f"/ui/sandboxes/{record.id}"
    assert service.sandboxes.get(record.id).state == SandboxState.PAUSED
    resume = await client.post(
        f"/ui/sandboxes/{record.id}/resume", headers=ORIGIN | {"X-CSRF-Token": csrf}
    )
    assert resume.status_code == 303
    assert service.sandboxes.get(record.id).state == SandboxState.RUNNING
    await service.sandboxes.delete(record.id)


async def test_sandboxes_are_listed_filtered_shown_extended_and_deleted(served) -> None:
    service, client, keys = served
    csrf = await log_in(client, keys.admin)
    empty = await client.get("/ui/sandboxes")
    assert 'id="no-sandboxes"' in empty.text
    ml = await service.sandboxes.create(
        SandboxSpec(resolve_language("bash"), metadata={"team": "ml"}), owner="k1"
    )
    web = await service.sandboxes.create(
        SandboxSpec(resolve_language("bash"), metadata={"team": "web"})
    )
    listed = (await client.get("/ui/api/sandboxes", params={"metadata": "team:ml"})).json()
    assert [row["id"] for row in listed["rows"]] == [ml.id]
    by_owner = (await client.get("/ui/api/sandboxes", params={"owner": "k1"})).json()
    assert by_owner["total"] == 1 and by_owner["rows"][0]["owner"] == "k1"
    local = (await client.get("/ui/api/sandboxes", params={"owner": "local"})).json()
    assert [row["id"] for row in local["rows"]] == [web.id]
    ordered = await client.get("/ui/api/sandboxes", params={"sort": "id", "order": "asc"})
    assert [r["id"] for r in ordered.json()["rows"]] == sorted([ml.id, web.id])
    paged = (await client.get("/ui/api/sandboxes", params={"size": 1, "page": 2})).json()
    assert paged["pages"] == 2 and len(paged["rows"]) == 1
    detail = await client.get(f"/ui/sandboxes/{ml.id}")
    assert detail.status_code == 200 and "team:ml" in detail.text and 'id="run-form"' in detail.text
    extend = await client.post(
        f"/ui/sandboxes/{ml.id}/ttl", data={"csrf_token": csrf, "ttl": "3600"}, headers=ORIGIN
    )
    assert extend.status_code == 303 and service.sandboxes.get(ml.id).spec.ttl == 3600
    too_long = await client.post(
        f"/ui/sandboxes/{ml.id}/ttl", data={"csrf_token": csrf, "ttl": "1e9"}, headers=ORIGIN
    )
    assert too_long.status_code == 400 and "out of range" in too_long.text
    gone = await client.post(
        f"/ui/sandboxes/{web.id}/delete", data={"csrf_token": csrf}, headers=ORIGIN
    )
    assert gone.status_code == 303
    assert (await client.get("/ui/api/sandboxes")).json()["total"] == 1
    await service.sandboxes.delete(ml.id)


async def test_a_run_streams_its_output_as_server_sent_events(served) -> None:
    service, client, keys = served
    csrf = await log_in(client, keys.admin)
    record = await service.sandboxes.create(SandboxSpec(resolve_language("bash")))
    url = f"/ui/sandboxes/{record.id}/run"
    response = await client.post(
        url, json={"code": "echo one; echo two >&2"}, headers=ORIGIN | {"X-CSRF-Token": csrf}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "event: output" in response.text and '"data": "one\\n"' in response.text
    assert "event: result" in response.text
    empty = await client.post(
        url,
        json={"code": " "},
        headers=ORIGIN | {"X-CSRF-Token": csrf, "Accept": "text/event-stream"},
    )
    assert (
        empty.status_code == 400 and empty.json()["error"]["message"] == "there is no code to run"
    )
    runs = await client.get(f"/ui/sandboxes/{record.id}")
    assert "sandbox.run" in runs.text
    await service.sandboxes.delete(record.id)


async def test_unknown_sandboxes_and_pages_are_clear_404_pages(served) -> None:
    _, client, keys = served
    csrf = await log_in(client, keys.admin)
    page = await client.get("/ui/sandboxes/sbx_0000000000000000")
    assert page.status_code == 404 and "sbx_0000000000000000" in page.text
    assert "text/html" in page.headers["content-type"]
    assert (await client.get("/ui/live/sandboxes/sbx_nope")).status_code == 404
    action = await client.post(
        "/ui/sandboxes/sbx_nope/pause", data={"csrf_token": csrf}, headers=ORIGIN
    )
    assert action.status_code == 404
    assert (await client.get("/ui/no-such-page")).status_code == 404
    huge = await client.get("/ui/sandboxes/" + "x" * 5000)
    assert huge.status_code == 400


async def test_bad_or_huge_filters_are_400_pages(served) -> None:
    _, client, keys = served
    await log_in(client, keys.admin)
    for path, params in [
        ("/ui/sandboxes", {"state": "melted"}),
        ("/ui/sandboxes", {"metadata": "nocolon"}),
        ("/ui/sandboxes", {"sort": "size"}),
        ("/ui/sandboxes", {"owner": "o" * 5000}),
        ("/ui/sandboxes", {"page": "-1"}),
        ("/ui/audit", {"since": "yesterday"}),
        ("/ui/audit", {"since": "999999d"}),
        ("/ui/audit", {"limit": "100000"}),
    ]:
        response = await client.get(path, params=params)
        assert response.status_code == 400, (path, params, response.text[:300])
        assert "text/html" in response.headers["content-type"]


async def test_keys_are_created_once_updated_and_revoked(served) -> None:
    service, client, keys = served
    csrf = await log_in(client, keys.admin)
    form = {"csrf_token": csrf, "name": "bob", "role": "user"}
    made = await client.post(
        "/ui/keys", data=form | {"max_sandboxes": "3", "rate_per_minute": "60"}, headers=ORIGIN
    )
    assert made.status_code == 201
    plaintext = re.search(r'id="new-key">(fsk_[^<]+)<', made.text)
    assert plaintext is not None
    listing = await client.get("/ui/keys")
    assert plaintext.group(1) not in listing.text and "bob" in listing.text
    bad = await client.post(
        "/ui/keys", data=form | {"max_sandboxes": "0", "rate_per_minute": "60"}, headers=ORIGIN
    )
    assert bad.status_code == 400 and "out of range" in bad.text
    with KeyStore(service.config.audit_db) as store:
        bob = store.get("bob")
    update = await client.post(
        f"/ui/keys/{bob.id}",
        data={"csrf_token": csrf, "role": "admin", "max_sandboxes": "5", "rate_per_minute": "99"},
        headers=ORIGIN,
    )
    assert update.status_code == 303
    with KeyStore(service.config.audit_db) as store:
        bob = store.get("bob")
    assert bob.role == "admin" and bob.limits == KeyLimits(5, 99)
    revoked = await client.post(
        f"/ui/keys/{bob.id}/revoke", data={"csrf_token": csrf}, headers=ORIGIN
    )
    assert revoked.status_code == 303
    with KeyStore(service.config.audit_db) as store:
        assert not store.get("bob").active
    audit = (await client.get("/ui/api/audit", params={"action": "keys"})).json()["events"]
    assert [e["action"] for e in audit] == ["keys.revoke", "keys.update", "keys.create"]


async def test_revoking_the_sessions_key_ends_the_session(served) -> None:
    service, client, keys = served
    await log_in(client, keys.admin)
    with KeyStore(service.config.audit_db) as store:
        store.set_role(keys.admin_id, "user")
    page = await client.get("/ui/")
    assert page.status_code == 401 and "no longer an admin key" in page.text


async def test_logout_ends_the_session(served) -> None:
    _, client, keys = served
    csrf = await log_in(client, keys.admin)
    out = await client.post("/ui/logout", data={"csrf_token": csrf}, headers=ORIGIN)
    assert out.status_code == 303 and out.headers["location"] == "/ui/login"
    client.cookies.clear()
    assert (await client.get("/ui/")).status_code == 303


async def test_the_audit_page_filters_and_shows_egress_and_request_ids(served) -> None:
    service, client, keys = served
    await log_in(client, keys.admin)
    assert service.audit is not None
    service.audit.record("k1", "run", outcome="ok", duration_ms=12.0, detail={"request_id": "r-1"})
    service.audit.record("k1", "run", outcome="error:busy", duration_ms=1.0)
    service.audit.record(
        "k2",
        "sandbox.egress",
        outcome="refused",
        detail={"host": "evil.example", "port": 443, "reason": "not in the allow list"},
    )
    page = await client.get("/ui/audit")
    assert "r-1" in page.text and "evil.example:443" in page.text
    assert "not in the allow list" in page.text
    errors = (await client.get("/ui/api/audit", params={"outcome": "error"})).json()["events"]
    assert [e["outcome"] for e in errors] == ["error:busy"]
    by_key = (await client.get("/ui/api/audit", params={"key": "k2"})).json()["events"]
    assert [e["action"] for e in by_key] == ["sandbox.egress"]
    overview = (await client.get("/ui/api/overview")).json()
    assert overview["stats"]["runs"] == 2 and overview["stats"]["error_rate"] == 0.5


async def test_on_the_local_socket_a_session_is_minted_without_a_key(
    start_service: ServiceStarter,
) -> None:
    service = await start_service()
    app = create_app(service)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        assert (await client.get("/ui/")).status_code == 303
        login = await client.get("/ui/login")
        assert login.status_code == 303 and COOKIE in login.headers["set-cookie"]
        page = await client.get("/ui/")
        assert page.status_code == 200 and "(local socket)" in page.text
        keys = await client.get("/ui/keys")
        assert "no key database" in keys.text
        csrf = CSRF.search(page.text)
        assert csrf is not None
        no_token = await client.post("/ui/logout", headers=ORIGIN)
        assert no_token.status_code == 403  # a forwarded socket still needs the CSRF token


def test_sessions_expire_when_idle_and_at_their_age_limit() -> None:
    now = [0.0]
    store = SessionStore(clock=lambda: now[0])
    session = store.create("k1")
    now[0] += IDLE_EXPIRY - 1
    assert store.get(session.id) is session
    now[0] += IDLE_EXPIRY + 1
    with pytest.raises(SessionExpired):
        store.get(session.id)
    kept = store.create("k1")
    for _ in range(int(ABSOLUTE_EXPIRY // (IDLE_EXPIRY / 2)) + 1):
        now[0] += IDLE_EXPIRY / 2
        if store.peek(kept.id) is None:
            break
        store.get(kept.id)
    assert store.peek(kept.id) is None
    with pytest.raises(SessionExpired):
        store.get(None)


def test_a_wheel_ships_every_template_and_static_file() -> None:
    import fnmatch
    import tomllib

    import fission.server.dashboard as package

    root = Path(package.__file__).parent
    pyproject = tomllib.loads((root.parents[2] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["fission.server.dashboard"]
    shipped = [
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc")
    ]
    assert {"templates/base.html", "static/dashboard.js", "static/dashboard.css"} <= set(shipped)
    missing = [f for f in shipped if not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert missing == [], "package-data in pyproject.toml leaves these out of the wheel"
