"""The dashboard in a real headless Chromium against a real daemon on loopback TCP.

Debian's ``chromium`` (``make deps``) driven by Playwright (the dev extra) with
``executable_path``: no browser download. The daemon is ``fission serve`` with real VMs, so the
run whose output streams into the page runs in a real microVM. Each page's screenshot goes to
``test-output/dashboard/`` (gitignored); three of them are committed under ``docs/img/``.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fission.sdk import Sandbox
from tests.integration.servers import TcpDaemon

pytestmark = pytest.mark.vm
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[2] / "test-output" / "dashboard"
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (make deps)", allow_module_level=True)
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def daemon() -> Iterator[TcpDaemon]:
    d = TcpDaemon("--pool", "python=1", "--acquire-timeout", "30")
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def admin_key(daemon: TcpDaemon) -> str:
    return daemon.create_key("ops", "--role", "admin")


@pytest.fixture(scope="module")
def user_key(daemon: TcpDaemon) -> str:
    return daemon.create_key("alice", "--max-sandboxes", "3")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as playwright:
        # --no-sandbox: Chromium's own sandbox needs user namespaces it cannot have as root here.
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, daemon: TcpDaemon, admin_key: str) -> Iterator[Any]:
    """A fresh browser context logged in with the admin key."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(WAIT_MS)
    tab = context.new_page()
    log_in(tab, daemon, admin_key)
    yield tab
    context.close()


def log_in(tab: Any, daemon: TcpDaemon, key: str) -> None:
    tab.goto(f"{daemon.url}/ui/")
    assert tab.url.endswith("/ui/login")  # no session: the login page
    tab.fill("#key", key)
    tab.click("#login-form button[type=submit]")


def shot(tab: Any, name: str) -> None:
    tab.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def session_client(daemon: TcpDaemon, key: str) -> tuple[httpx.Client, str]:
    """A plain HTTP client logged in to the dashboard, and its CSRF token."""
    client = httpx.Client(base_url=daemon.url, timeout=60)
    login = client.post("/ui/login", data={"key": key}, headers={"Origin": daemon.url})
    assert login.status_code == 303, login.text
    token = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/ui/").text)
    assert token is not None
    return client, token.group(1)


def test_the_login_page_then_the_overview(browser: Any, daemon: TcpDaemon, admin_key: str) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    tab = context.new_page()
    tab.goto(f"{daemon.url}/ui/")
    tab.wait_for_selector("#login-form")
    shot(tab, "login")
    tab.fill("#key", admin_key)
    tab.click("#login-form button[type=submit]")
    tab.wait_for_selector("#runs-per-minute")
    assert tab.url == f"{daemon.url}/ui/"
    cookies = context.cookies()
    assert [c["name"] for c in cookies] == ["fission_session"]
    assert cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Strict"
    assert admin_key not in cookies[0]["value"]
    assert tab.evaluate("document.cookie") == ""  # HttpOnly: scripts cannot read it
    tab.wait_for_selector("#pools td:has-text('python')")
    shot(tab, "overview")
    tab.emulate_media(color_scheme="dark")
    shot(tab, "overview-dark")
    context.close()


def test_a_sandbox_made_through_the_sdk_appears_live_and_its_run_streams_in(
    page: Any, daemon: TcpDaemon, user_key: str
) -> None:
    page.goto(f"{daemon.url}/ui/sandboxes")
    page.wait_for_selector("#no-sandboxes")
    page.evaluate("window.notReloaded = true")
    with Sandbox.create(
        "python", url=daemon.url, api_key=user_key, metadata={"team": "dash"}, ttl=600
    ) as box:
        row = page.wait_for_selector(f"tr[data-sandbox='{box.id}']")  # pushed by the server
        assert page.evaluate("window.notReloaded") is True
        assert "team:dash" in row.inner_text() and "running" in row.inner_text()
        shot(page, "sandboxes")

        page.click(f"a[href='/ui/sandboxes/{box.id}']")
        page.wait_for_selector("#run-form")
        page.fill(
            "#run-code",
            "import time\nfor i in range(6):\n    print('tick', i, flush=True)\n    time.sleep(1)\n",
        )
        page.click("#run")
        page.wait_for_selector("#run-output:has-text('tick 1')")
        partial = page.inner_text("#run-output")
        assert "tick 5" not in partial  # seen while the program still runs
        page.wait_for_selector("#run-status:has-text('finished')")
        assert page.inner_text("#run-output").count("tick") == 6
        assert "exit 0" in page.inner_text("#run-status")
        page.wait_for_selector("#recent-runs td:has-text('sandbox.run')")
        shot(page, "sandbox")

        page.click("#pause")
        page.wait_for_selector("#sandbox-state:has-text('paused')")
        assert box.info().state == "paused"
        page.click("#resume")
        page.wait_for_selector("#sandbox-state:has-text('running')")
        assert box.run("print(6 * 7)").stdout.strip() == b"42"


def test_a_snapshot_and_a_fork_are_taken_from_the_sandbox_page(
    page: Any, daemon: TcpDaemon, user_key: str
) -> None:
    with Sandbox.create("python", url=daemon.url, api_key=user_key, ttl=600) as box:
        box.run("open('/home/sandbox/mark', 'w').write('forked')")
        page.goto(f"{daemon.url}/ui/sandboxes/{box.id}")
        page.fill("#sandbox-snapshots input[name=name]", "from the dashboard")
        page.click("#snapshot")
        row = page.wait_for_selector("#snapshots tbody tr")
        assert "from the dashboard" in row.inner_text() and "snapshot" in row.inner_text()
        page.click("#fork")  # one fork: its page opens
        page.wait_for_url(re.compile(r".*/ui/sandboxes/sbx_[0-9a-f]+$"))
        clone_id = page.url.rsplit("/", 1)[1]
        assert clone_id != box.id
        page.wait_for_selector("#sandbox-state:has-text('running')")
        clone = Sandbox.connect(clone_id, url=daemon.url, api_key=user_key)
        try:
            assert clone.run("print(open('/home/sandbox/mark').read())").stdout.strip() == b"forked"
            page.goto(f"{daemon.url}/ui/snapshots")
            page.wait_for_selector("section[data-owner] table.snapshots")
            kinds = page.locator("section[data-owner] tbody td:nth-child(3)").all_inner_texts()
            assert sorted(kinds) == ["fork", "snapshot"]
            assert "MB quota" in page.inner_text("section[data-owner] .usage")
            shot(page, "snapshots")
        finally:
            clone.delete()
            clone.close()


def test_a_key_is_shown_once_and_revoked(page: Any, daemon: TcpDaemon) -> None:
    page.goto(f"{daemon.url}/ui/keys")
    page.fill("#create-key input[name=name]", "bob")
    page.select_option("#create-key select[name=role]", "user")
    page.fill("#create-key input[name=max_sandboxes]", "2")
    page.click("#create-key button[type=submit]")
    plaintext = page.inner_text("#new-key").strip()
    assert plaintext.startswith("fsk_")
    shot(page, "keys")
    with httpx.Client(base_url=daemon.url, timeout=60) as client:
        auth = {"Authorization": f"Bearer {plaintext}"}
        assert client.get("/v1/pools", headers=auth).status_code == 200
        page.goto(f"{daemon.url}/ui/keys")
        assert plaintext not in page.content()  # shown once
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("tr[data-key='bob'] button.danger")
        page.wait_for_selector("tr[data-key='bob'].revoked")
        assert client.get("/v1/pools", headers=auth).status_code == 401


def test_the_audit_log_filters(page: Any, daemon: TcpDaemon) -> None:
    page.goto(f"{daemon.url}/ui/audit")
    page.wait_for_selector("#audit")
    page.fill("#audit-filters input[name=action]", "keys")
    page.click("#audit-filters button[type=submit]")
    page.wait_for_selector("#audit tbody tr")
    actions = set(
        page.locator("#audit tbody tr").evaluate_all("rows => rows.map(r => r.dataset.action)")
    )
    assert actions and all(action.startswith("keys.") for action in actions)
    page.fill("#audit-filters input[name=action]", "sandbox")
    page.click("#audit-filters button[type=submit]")
    page.wait_for_selector("#audit tbody tr[data-action='sandbox.create']")
    shot(page, "audit")
    page.goto(f"{daemon.url}/ui/")
    page.wait_for_selector("#error-rate")
    assert re.match(r"[0-9.]+ / [0-9.]+ ms", page.inner_text("#latency"))  # the runs above
    page.emulate_media(color_scheme="dark")
    shot(page, "overview-busy-dark")


def test_a_user_key_and_no_key_are_refused(browser: Any, daemon: TcpDaemon, user_key: str) -> None:
    context = browser.new_context()
    tab = context.new_page()
    log_in(tab, daemon, user_key)
    tab.wait_for_selector("#login-error")
    assert "admin key" in tab.inner_text("#login-error") and not context.cookies()
    context.close()
    with httpx.Client(base_url=daemon.url, timeout=60) as client:
        assert client.get("/ui/api/overview").status_code == 401
        page_without_session = client.get("/ui/keys")
        assert page_without_session.status_code == 303
        assert page_without_session.headers["location"] == "/ui/login"
        keyed = client.get("/ui/api/overview", headers={"Authorization": f"Bearer {user_key}"})
        assert keyed.status_code == 401  # API keys do not open the dashboard: sessions do


def test_a_post_without_the_csrf_token_is_refused(daemon: TcpDaemon, admin_key: str) -> None:
    client, csrf = session_client(daemon, admin_key)
    try:
        created = client.post("/ui/keys", data={"name": "x"}, headers={"Origin": daemon.url})
        assert created.status_code == 403 and "CSRF" in created.text
        foreign = client.post(
            "/ui/keys",
            data={"csrf_token": csrf, "name": "x"},
            headers={"Origin": "http://attacker.example"},
        )
        assert foreign.status_code == 403
        assert client.post("/ui/logout", headers={"Origin": daemon.url}).status_code == 403
    finally:
        client.close()


def test_a_forged_cookie_and_an_unknown_sandbox_are_clear_4xx_pages(
    browser: Any, page: Any, daemon: TcpDaemon
) -> None:
    page.goto(f"{daemon.url}/ui/sandboxes/sbx_00000000deadbeef")
    assert page.inner_text("#error-status").startswith("404")
    assert "sbx_00000000deadbeef" in page.inner_text("#error-message")
    shot(page, "not-found")

    context = browser.new_context()
    context.add_cookies(
        [{"name": "fission_session", "value": "forged" * 7, "url": f"{daemon.url}/ui/"}]
    )
    tab = context.new_page()
    response = tab.goto(f"{daemon.url}/ui/")
    assert response.status == 401
    assert "expired or is not valid" in tab.inner_text("#error-message")
    shot(tab, "forged-cookie")
    context.close()


def test_a_daemon_with_a_live_stream_open_stops_within_seconds() -> None:
    """A dashboard page left open does not hold up SIGTERM (uvicorn waits for open responses:
    the live streams end as the shutdown begins)."""
    own = TcpDaemon()
    own.start()
    try:
        client, _ = session_client(own, own.create_key("ops", "--role", "admin"))
        try:
            with client.stream("GET", "/ui/live/overview") as stream:
                lines = stream.iter_lines()
                while "event: fragment" not in next(lines):
                    pass  # the page's first fragment: the stream is open
                assert own.proc is not None
                stopping_at = time.monotonic()
                own.proc.send_signal(signal.SIGTERM)
                own.proc.wait(timeout=30)
                took = time.monotonic() - stopping_at
        finally:
            client.close()
        assert took < 3.0, f"the daemon took {took:.1f} s to stop: {own.log()}"
    finally:
        own.stop()
