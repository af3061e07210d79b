"""The fleet's control plane at scale, on the fake VMM driver (no QEMU): simulated host agents
behind one front end, sandboxes created, listed and deleted through the REST API.

A local Ray instance; the control actor starts ``--hosts`` host agents (each a Ray actor with its
own Service, state dir and fake driver, all on this one node). The front end is the real
FastAPI app over a ``ClusterService``, called in-process through httpx's ASGI transport, so
every request goes through the routes, the catalog actor and a host agent, with no socket.
Creates ``--sandboxes`` sandboxes (``--concurrency`` at a time), lists them all page by page
(200 a page), deletes them all. Reports create latency percentiles, the front end's CPU per
request (this process: the app and the client together, so an upper bound), each host agent's
resident memory, and the catalog's. ``--append`` adds the table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import ray
from benchlib import append_section, percentile

from fission.fleet.cluster_service import ClusterService
from fission.fleet.control import CONTROL_NAME, NAMESPACE
from fission.fleet.host_agent import HostSettings
from fission.server.app import create_app
from fission.vmm.fake import FakeDriver

BUDGET_MB = 10_000_000  # the fake driver reserves nothing real: no host is ever full here


async def timed_all(
    count: int, concurrency: int, request: Any
) -> tuple[list[float], list[Any], float]:
    """Run ``request(i)`` for each i, ``concurrency`` at a time: latencies (ms), results, CPU s."""
    latencies: list[float] = []
    results: list[Any] = [None] * count
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(count):
        queue.put_nowait(index)

    async def worker() -> None:
        while not queue.empty():
            index = queue.get_nowait()
            started = time.perf_counter()
            results[index] = await request(index)
            latencies.append((time.perf_counter() - started) * 1000)

    cpu = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, results, time.process_time() - cpu


async def bench(hosts: int, sandboxes: int, concurrency: int, root: Path) -> dict[str, Any]:
    """Create, list and delete ``sandboxes`` over ``hosts`` simulated hosts; the numbers."""
    settings = HostSettings(
        state_root=root, pools={}, memory_budget_mb=BUDGET_MB, driver=FakeDriver
    )
    service = ClusterService(None, settings, simulated_hosts=hosts)
    await service.start()
    fleet = service.routes()
    deadline = time.monotonic() + 300
    while len(await fleet.control.hosts.remote()) < hosts:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{hosts} host agents did not start within 300 s")
        await asyncio.sleep(0.5)
    app = create_app(service)  # type: ignore[arg-type]  # ClusterService stands in for Service
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://front", timeout=120) as api:

        async def create(index: int) -> str:
            body = {"language": "python", "ttl": 3600, "metadata": {"n": str(index % 10)}}
            answer = await api.post("/v1/sandboxes", json=body)
            answer.raise_for_status()
            return str(answer.json()["id"])

        create_ms, ids, create_cpu = await timed_all(sandboxes, concurrency, create)
        await asyncio.sleep(1.5)  # one report round: the hosts' resident memory with everything
        report = await service.cluster_status()
        statuses = await asyncio.gather(
            *(fleet.agent(h.name).status.remote() for h in await fleet.hosts())
        )
        rss = [s["rss_mb"] for s in statuses]
        per_host = [sum(h["sandboxes"].values()) for h in report["hosts"]]

        listed: list[str] = []
        cursor: str | None = None
        list_ms: list[float] = []
        cpu = time.process_time()
        while True:
            started = time.perf_counter()
            params: dict[str, Any] = {"limit": 200} | ({"cursor": cursor} if cursor else {})
            page = (await api.get("/v1/sandboxes", params=params)).json()
            list_ms.append((time.perf_counter() - started) * 1000)
            listed += [s["id"] for s in page["sandboxes"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        list_cpu = time.process_time() - cpu
        if sorted(listed) != sorted(ids):
            raise AssertionError(f"listed {len(listed)} sandboxes, created {len(ids)}")

        async def delete(index: int) -> None:
            (await api.delete(f"/v1/sandboxes/{ids[index]}")).raise_for_status()

        delete_ms, _, delete_cpu = await timed_all(sandboxes, concurrency, delete)
        left = (await api.get("/v1/sandboxes")).json()["sandboxes"]
    control = ray.get_actor(CONTROL_NAME, namespace=NAMESPACE)
    await control.shutdown.remote()
    return {
        "hosts": hosts,
        "sandboxes": sandboxes,
        "concurrency": concurrency,
        "create_p50": percentile(create_ms, 0.5),
        "create_p99": percentile(create_ms, 0.99),
        "create_per_s": sandboxes / (sum(create_ms) / 1000 / concurrency),
        "create_cpu_ms": create_cpu * 1000 / sandboxes,
        "list_pages": len(list_ms),
        "list_p50": statistics.median(list_ms),
        "list_cpu_ms": list_cpu * 1000 / len(list_ms),
        "delete_p50": percentile(delete_ms, 0.5),
        "delete_p99": percentile(delete_ms, 0.99),
        "delete_cpu_ms": delete_cpu * 1000 / sandboxes,
        "agent_rss_mb": statistics.median(rss),
        "agent_rss_max_mb": max(rss),
        "per_host": (min(per_host), max(per_host)),
        "left": len(left),
    }


def lines_of(numbers: dict[str, Any]) -> list[str]:
    """The markdown table of one bench."""
    n = numbers
    return [
        f"{n['hosts']} simulated host agents (fake driver, one machine: 2 cores), "
        f"{n['sandboxes']} sandboxes, {n['concurrency']} requests at a time, through the REST "
        "API of one front end (in-process ASGI).",
        "",
        "| step | p50 ms | p99 ms | front-end CPU ms / request |",
        "|---|---|---|---|",
        f"| create | {n['create_p50']:.1f} | {n['create_p99']:.1f} | {n['create_cpu_ms']:.2f} |",
        f"| list (page of 200, {n['list_pages']} pages) | {n['list_p50']:.1f} | | "
        f"{n['list_cpu_ms']:.2f} |",
        f"| delete | {n['delete_p50']:.1f} | {n['delete_p99']:.1f} | {n['delete_cpu_ms']:.2f} |",
        "",
        f"Creates per second: {n['create_per_s']:.0f}. Sandboxes per host: {n['per_host'][0]} "
        f"to {n['per_host'][1]}. Host agent resident memory with its sandboxes (median, max): "
        f"{n['agent_rss_mb']:.0f} / {n['agent_rss_max_mb']:.0f} MiB. Left after deleting: "
        f"{n['left']}.",
    ]


def main() -> None:
    """Parse flags, run the bench, print (and maybe append) the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--sandboxes", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--append", action="store_true", help="add to docs/benchmarks.md")
    args = parser.parse_args()
    os.environ.setdefault("FISSION_QEMU", "/nonexistent/no-qemu-in-this-bench")
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as root:
        ray.init(num_cpus=2, namespace=NAMESPACE, log_to_driver=False)
        try:
            numbers = asyncio.run(bench(args.hosts, args.sandboxes, args.concurrency, Path(root)))
        finally:
            ray.shutdown()
    lines = lines_of(numbers)
    print("\n".join(lines))
    if args.append:
        append_section("Fleet control plane (bench_fleet.py)", lines)


if __name__ == "__main__":
    main()
