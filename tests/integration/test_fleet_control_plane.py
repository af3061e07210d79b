"""The fleet's control plane on a local Ray instance with the fake VMM driver (no QEMU): four
simulated host agents, 200 sandboxes created, listed page by page and deleted through the REST
API of a front end (the real app over a ``ClusterService``, in-process); a key's sandbox limit
holds over the whole fleet; a host agent that dies has its sandboxes lost within seconds.
(``bench/bench_fleet.py`` is the same at 20 hosts and 10,000 sandboxes.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

ray = pytest.importorskip("ray")

from fission.fleet.cluster_service import ClusterService  # noqa: E402
from fission.fleet.control import CONTROL_NAME, NAMESPACE  # noqa: E402
from fission.fleet.host_agent import HostSettings  # noqa: E402
from fission.server.app import create_app  # noqa: E402
from fission.vmm.fake import FakeDriver  # noqa: E402

HOSTS = 4
SANDBOXES = 200


@pytest.fixture(autouse=True)
def no_leftovers() -> None:
    """No QEMU here: the fake driver's VMs are objects in the host agents."""


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def front(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    ray.init(num_cpus=2, namespace=NAMESPACE, log_to_driver=False)
    try:
        settings = HostSettings(
            state_root=tmp_path_factory.mktemp("fleet"),
            pools={},
            memory_budget_mb=1_000_000,
            driver=FakeDriver,
        )
        service = ClusterService(None, settings, simulated_hosts=HOSTS)
        await service.start()
        deadline = time.monotonic() + 120
        while len(await service.routes().control.hosts.remote()) < HOSTS:
            assert time.monotonic() < deadline, "the simulated host agents did not start"
            await asyncio.sleep(0.25)
        app = create_app(service)  # type: ignore[arg-type]
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://front") as api:
            api.service = service  # type: ignore[attr-defined]
            yield api
        await ray.get_actor(CONTROL_NAME, namespace=NAMESPACE).shutdown.remote()
    finally:
        ray.shutdown()


async def make(api: httpx.AsyncClient, n: int) -> str:
    body = {"language": "python", "ttl": 600, "metadata": {"parity": str(n % 2)}}
    answer = await api.post("/v1/sandboxes", json=body)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


@pytest.mark.asyncio(loop_scope="module")
async def test_sandboxes_are_created_listed_and_deleted_over_the_fleet(front: Any) -> None:
    semaphore = asyncio.Semaphore(16)

    async def one(n: int) -> str:
        async with semaphore:
            return await make(front, n)

    ids = await asyncio.gather(*(one(n) for n in range(SANDBOXES)))
    assert len(set(ids)) == SANDBOXES
    status = (await front.get("/v1/cluster")).json()
    per_host = [h["sandboxes"].get("running", 0) for h in status["hosts"]]
    assert sum(per_host) == SANDBOXES and len(per_host) == HOSTS
    assert min(per_host) >= SANDBOXES // HOSTS // 2, f"placement is lopsided: {per_host}"

    listed: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": 37, "metadata": "parity:1"} | ({"cursor": cursor} if cursor else {})
        page = (await front.get("/v1/sandboxes", params=params)).json()
        listed += page["sandboxes"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(s["id"] for s in listed) == sorted(ids[1::2])
    stamps = [(s["created_at"], s["id"]) for s in listed]
    assert stamps == sorted(stamps)

    sandbox = ids[7]
    ran = await front.post(f"/v1/sandboxes/{sandbox}/run", json={"code": "print(6 * 7)"})
    assert '"data": "42\\n"' in ran.text or '"data": "42"' in ran.text, ran.text

    async def gone(sandbox_id: str) -> None:
        async with semaphore:
            answer = await front.delete(f"/v1/sandboxes/{sandbox_id}")
            assert answer.status_code == 204, answer.text

    await asyncio.gather(*(gone(i) for i in ids))
    assert (await front.get("/v1/sandboxes")).json()["sandboxes"] == []
    assert (await front.get(f"/v1/sandboxes/{ids[0]}")).status_code == 404


@pytest.mark.asyncio(loop_scope="module")
async def test_a_one_shot_run_streams_through_the_front_end(front: Any) -> None:
    answer = await front.post("/v1/run", json={"language": "python", "code": "print('routed')"})
    assert answer.status_code == 200
    lines = answer.text.splitlines()
    assert '"data": "routed' in lines[0] and '"exit_code": 0' in lines[-1]


@pytest.mark.asyncio(loop_scope="module")
async def test_a_host_agent_that_dies_loses_its_sandboxes_within_seconds(front: Any) -> None:
    ids = [await make(front, n) for n in range(HOSTS * 2)]
    control = ray.get_actor(CONTROL_NAME, namespace=NAMESPACE)
    victim = (await control.get.remote(ids[0]))["host"]
    on_victim = [i for i in ids if (await control.get.remote(i))["host"] == victim]
    ray.kill(ray.get_actor(f"fission-host-{victim}", namespace=NAMESPACE))
    killed = time.monotonic()
    while (await front.get(f"/v1/sandboxes/{on_victim[0]}")).json()["state"] != "lost":
        assert time.monotonic() - killed < 10, "the dead host's sandboxes were not lost"
        await asyncio.sleep(0.2)
    for sandbox_id in on_victim:
        record = (await front.get(f"/v1/sandboxes/{sandbox_id}")).json()
        assert record["state"] == "lost" and f"host {victim}" in record["lost_reason"]
        run = await front.post(f"/v1/sandboxes/{sandbox_id}/run", json={"code": "1"})
        assert run.status_code == 409 and "lost" in run.text
    others = [i for i in ids if i not in on_victim]
    for sandbox_id in others:
        assert (await front.get(f"/v1/sandboxes/{sandbox_id}")).json()["state"] == "running"
    for _ in range(3):  # new sandboxes go to the hosts that are left
        fresh = await make(front, 0)
        assert (await control.get.remote(fresh))["host"] != victim
        others.append(fresh)
    for sandbox_id in on_victim + others:
        assert (await front.delete(f"/v1/sandboxes/{sandbox_id}")).status_code == 204
