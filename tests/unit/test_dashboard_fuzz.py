"""Hypothesis fuzzes the dashboard's JSON endpoints and forms: bad input is a 4xx, never a 500.

One daemon app (keyed, as on TCP) on the fake driver, one logged-in session, one sandbox; every
example is a real request through the app, with its lifespan run by Starlette's TestClient.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fission.auth.keys import KeyStore
from fission.core.languages import resolve_language
from fission.core.sandbox_spec import SandboxSpec
from fission.core.service import Service, ServiceConfig
from fission.server.app import create_app
from fission.vmm.fake import FakeDriver

BASE = "http://fission"
ORIGIN = {"Origin": BASE}
FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
texts = st.text(max_size=300) | st.sampled_from(["", "0", "-1", "1e999", "running", "team:ml"])


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, str, str]]:
    """A logged-in client, its CSRF token and a sandbox id."""
    tmp = tmp_path_factory.mktemp("fuzz")
    patch = pytest.MonkeyPatch()
    patch.setenv("FISSION_RUNTIME_DIR", str(tmp / "runtime"))
    patch.setenv("FISSION_QEMU", str(tmp / "no-qemu-here"))
    db = tmp / "fission.sqlite3"
    with KeyStore(db) as store:
        _, admin = store.create("ops", role="admin")
    driver = FakeDriver()
    config = ServiceConfig(tmp / "state", pools={}, audit_db=db, driver=driver)
    service = Service(config)
    try:
        with TestClient(create_app(service, keys_db=db), base_url=BASE) as client:
            client.post("/ui/login", data={"key": admin}, headers=ORIGIN)
            token = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/ui/").text)
            assert token is not None
            spec = SandboxSpec(resolve_language("bash"))
            record = client.portal.call(service.sandboxes.create, spec)  # type: ignore[union-attr]
            yield client, token.group(1), record.id
    finally:
        patch.undo()
    assert not driver.live, "a fake VM outlived the app"


def no_server_error(response: object) -> None:
    status = getattr(response, "status_code", 0)
    assert status < 500, getattr(response, "text", "")[:500]


@FUZZ
@given(
    params=st.dictionaries(
        st.sampled_from(["state", "owner", "metadata", "sort", "order", "page", "size", "x"]),
        texts,
    )
)
def test_the_sandboxes_json_never_fails_on_bad_filters(dashboard, params) -> None:
    client, _, _ = dashboard
    no_server_error(client.get("/ui/api/sandboxes", params=params))
    no_server_error(client.get("/ui/sandboxes", params=params))


@FUZZ
@given(
    params=st.dictionaries(st.sampled_from(["since", "key", "action", "outcome", "limit"]), texts)
)
def test_the_audit_json_never_fails_on_bad_filters(dashboard, params) -> None:
    client, _, _ = dashboard
    no_server_error(client.get("/ui/api/audit", params=params))
    no_server_error(client.get("/ui/api/overview", params=params))


@FUZZ
@given(
    sandbox=st.text(min_size=1, max_size=200).filter(lambda s: s.strip(".")),
    path=texts,
)
def test_sandbox_pages_never_fail_on_bad_ids_or_paths(dashboard, sandbox, path) -> None:
    client, _, real = dashboard
    for sandbox_id in (quote(sandbox, safe=""), real):
        no_server_error(client.get(f"/ui/sandboxes/{sandbox_id}", params={"path": path}))
        no_server_error(client.get(f"/ui/sandboxes/{sandbox_id}/file", params={"path": path}))


@FUZZ
@given(
    form=st.dictionaries(
        st.sampled_from(["ttl", "name", "role", "max_sandboxes", "rate_per_minute", "x"]), texts
    ),
    target=st.sampled_from(["ttl", "keys", "keys/ops", "keys/nope/revoke"]),
)
def test_forms_never_fail_on_bad_values(dashboard, form, target) -> None:
    client, csrf, real = dashboard
    url = f"/ui/sandboxes/{real}/ttl" if target == "ttl" else f"/ui/{target}"
    no_server_error(client.post(url, data=form | {"csrf_token": csrf}, headers=ORIGIN))


def test_the_fuzzed_sandbox_is_still_there(dashboard: tuple[TestClient, str, str]) -> None:
    client, _, real = dashboard
    assert client.get(f"/ui/sandboxes/{real}").status_code == 200
