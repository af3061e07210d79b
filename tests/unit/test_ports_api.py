"""Exposed ports over REST on the fake driver: who may use a port URL, tokens, bad input.

The fake guest answers every CONNECT with CLOSE (nothing listens), so an admitted visitor gets
502 ``port_unreachable``; a refused one never reaches the guest (``opened`` stays empty).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from fission.auth.keys import KeyStore
from fission.core.service import Service
from fission.server.app import create_app
from fission.vmm.fake import FakeDriver
from tests.unit.conftest import ServiceStarter

Client = httpx.AsyncClient
Keyed = tuple[Service, Client, dict[str, str], dict[str, str]]


@pytest_asyncio.fixture(loop_scope="function")
async def keyed(start_service: ServiceStarter, tmp_path: Path) -> AsyncIterator[Keyed]:
    """A keyed listener's app and two keys' headers."""
    service = await start_service()
    db = tmp_path / "keys.sqlite3"
    with KeyStore(db) as store:
        _, one = store.create("one")
        _, two = store.create("two")
    app = create_app(service, keys_db=db)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fission") as client:
        yield service, client, {"Authorization": f"Bearer {one}"}, {"X-Api-Key": two}


def opened(fake_driver: FakeDriver) -> list[dict[str, object]]:
    return [item for vm in fake_driver.live if vm.guest for item in vm.guest.opened]


async def sandbox(client: Client, headers: dict[str, str]) -> str:
    made = await client.post("/v1/sandboxes", json={"language": "bash"}, headers=headers)
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


async def test_expose_list_unexpose_and_the_owner_reaches_the_guest(
    keyed: Keyed, fake_driver: FakeDriver
) -> None:
    _, client, one, _ = keyed
    box = await sandbox(client, one)
    exposed = await client.post(f"/v1/sandboxes/{box}/expose", json={"port": 8000}, headers=one)
    assert exposed.status_code == 201, exposed.text
    assert exposed.json()["url"] == f"http://fission/v1/sandboxes/{box}/ports/8000/"
    listed = (await client.get(f"/v1/sandboxes/{box}/exposed", headers=one)).json()
    assert [p["port"] for p in listed["ports"]] == [8000]
    reached = await client.get(f"/v1/sandboxes/{box}/ports/8000/index.html", headers=one)
    assert reached.status_code == 502 and reached.json()["error"]["code"] == "port_unreachable"
    assert opened(fake_driver) == [{"port": 8000}]
    gone = await client.delete(f"/v1/sandboxes/{box}/exposed/8000", headers=one)
    assert gone.status_code == 204
    after = await client.get(f"/v1/sandboxes/{box}/ports/8000/", headers=one)
    assert after.status_code == 404 and after.json()["error"]["code"] == "port_not_exposed"
    await client.delete(f"/v1/sandboxes/{box}", headers=one)


async def test_another_key_no_key_and_forged_tokens_are_refused(
    keyed: Keyed, fake_driver: FakeDriver
) -> None:
    _, client, one, two = keyed
    box = await sandbox(client, one)
    await client.post(f"/v1/sandboxes/{box}/expose", json={"port": 8000}, headers=one)
    url = f"/v1/sandboxes/{box}/ports/8000/"
    assert (await client.get(url, headers=two)).status_code == 404  # not two's sandbox
    assert (await client.get(url)).status_code == 401
    minted = (await client.post(f"/v1/sandboxes/{box}/exposed/8000/tokens", headers=one)).json()
    token = minted["token"]
    assert token.startswith("fpt_") and minted["preview_url"].endswith(f"?fission_token={token}")
    forged = [token[:-2] + "xx", "fpt_" + "0" * 12 + "_secret", "garbage", token + "x"]
    for bad in forged:
        refused = await client.get(url, headers={"X-Fission-Port-Token": bad})
        assert refused.status_code == 401, bad
    # a token of port 8000 is no key to port 8001, nor to the management routes
    await client.post(f"/v1/sandboxes/{box}/expose", json={"port": 8001}, headers=one)
    other = await client.get(f"/v1/sandboxes/{box}/ports/8001/", params={"fission_token": token})
    assert other.status_code == 401
    assert (await client.get(f"/v1/sandboxes/{box}/exposed", headers={"X-Fission-Port-Token": token})).status_code == 401  # fmt: skip
    assert opened(fake_driver) == []  # no refused visitor reached the guest
    await client.delete(f"/v1/sandboxes/{box}", headers=one)


async def test_a_token_sets_a_cookie_and_revoking_it_refuses_it(
    keyed: Keyed, fake_driver: FakeDriver
) -> None:
    _, client, one, _ = keyed
    box = await sandbox(client, one)
    await client.post(f"/v1/sandboxes/{box}/expose", json={"port": 8000}, headers=one)
    minted = (await client.post(f"/v1/sandboxes/{box}/exposed/8000/tokens", headers=one)).json()
    url = f"/v1/sandboxes/{box}/ports/8000/a/b"
    first = await client.get(url, params={"fission_token": minted["token"], "q": "1"})
    assert first.status_code == 303 and first.headers["location"] == f"{url}?q=1"
    cookie = first.headers["set-cookie"]
    assert f"Path=/v1/sandboxes/{box}/ports/8000/" in cookie and "HttpOnly" in cookie
    with_cookie = await client.get(url, headers={"Cookie": f"fission_port_token={minted['token']}"})
    assert with_cookie.status_code == 502  # admitted: nothing listens in the fake guest
    assert opened(fake_driver) == [{"port": 8000}]
    revoked = await client.delete(
        f"/v1/sandboxes/{box}/exposed/8000/tokens/{minted['token_id']}", headers=one
    )
    assert revoked.status_code == 204
    again = await client.get(url, headers={"X-Fission-Port-Token": minted["token"]})
    assert again.status_code == 401
    await client.delete(f"/v1/sandboxes/{box}", headers=one)


@pytest.mark.parametrize("port", [0, 65536, -1, 3128])
async def test_bad_ports_are_refused_with_400(keyed: Keyed, port: int) -> None:
    _, client, one, _ = keyed
    box = await sandbox(client, one)
    refused = await client.post(f"/v1/sandboxes/{box}/expose", json={"port": port}, headers=one)
    assert refused.status_code in (400, 422), refused.text
    if port == 3128:
        assert "egress proxy" in refused.json()["error"]["message"]
    await client.delete(f"/v1/sandboxes/{box}", headers=one)


async def test_unknown_paused_and_deleted_sandboxes(keyed: Keyed) -> None:
    _, client, one, _ = keyed
    unknown = await client.post("/v1/sandboxes/sbx_nope/expose", json={"port": 80}, headers=one)
    assert unknown.status_code == 404
    box = await sandbox(client, one)
    await client.post(f"/v1/sandboxes/{box}/expose", json={"port": 8000}, headers=one)
    assert (await client.post(f"/v1/sandboxes/{box}/pause", headers=one)).status_code == 200
    paused = await client.get(f"/v1/sandboxes/{box}/ports/8000/", headers=one)
    assert paused.status_code == 409 and "resume it first" in paused.json()["error"]["message"]
    again = await client.post(f"/v1/sandboxes/{box}/expose", json={"port": 9000}, headers=one)
    assert again.status_code == 409
    await client.delete(f"/v1/sandboxes/{box}", headers=one)
    deleted = await client.get(f"/v1/sandboxes/{box}/ports/8000/", headers=one)
    assert deleted.status_code == 404


async def test_the_stream_cap_refuses_with_429(service: Service) -> None:
    from fission.core.languages import resolve_language
    from fission.core.sandbox_spec import SandboxSpec

    record = await service.sandboxes.create(SandboxSpec(resolve_language("bash")))
    ports = service.sandboxes.ports
    ports.max_streams = 0
    ports.expose(record.id, 8000)
    with pytest.raises(Exception) as refused:
        async with ports.open_port(record.id, 8000):
            pass
    assert getattr(refused.value, "http_status", None) == 429
    await service.sandboxes.delete(record.id)
