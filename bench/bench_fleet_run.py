"""What routing a one-shot run through a fleet adds: the same warm run on one host's Service and
through a ``ClusterService`` (a Ray cluster on this machine: a head and one host node), side by
side.

Both sides have a warm pool of one python VM with the same budget; each round waits until both
pools are ready, then times one run on each (the order alternates), so both take the warm path
and see the same load. The fleet side adds: placement, the host agent's ``acquire`` call, and the
run as a Ray streaming generator back to the front end (here over loopback, one machine).
``--append`` adds the table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from benchlib import append_section, percentile
from ray.cluster_utils import Cluster

from fission.core.languages import resolve_language
from fission.core.service import Service, ServiceConfig
from fission.core.spec import RunSpec
from fission.fleet.cluster_service import ClusterService
from fission.fleet.control import CONTROL_NAME, NAMESPACE
from fission.fleet.host_agent import HostSettings

CODE = "print(sum(range(1000)))"
BUDGET_MB = 4096
READY_WITHIN = 120.0


async def until(condition: Any, what: str) -> None:
    """Poll ``condition`` (a coroutine function) until true, at most ``READY_WITHIN`` s."""
    deadline = time.monotonic() + READY_WITHIN
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready within {READY_WITHIN:g} s")
        await asyncio.sleep(0.1)


async def timed(run: Any) -> float:
    """Ms one run takes, checking its output."""
    started = time.perf_counter()
    result = await run()
    elapsed = (time.perf_counter() - started) * 1000
    if result.exit_code != 0 or result.stdout != b"499500\n":
        raise SystemExit(f"bench: the run gave {result}")
    return elapsed


async def bench(rounds: int, root: Path, address: str) -> dict[str, list[float]]:
    """``rounds`` warm runs on each side; ms samples by side."""
    spec = RunSpec(resolve_language("python"), CODE)
    single = Service(ServiceConfig(root / "single", {"python": 1}, BUDGET_MB))
    settings = HostSettings(root / "fleet", {"python": 1}, BUDGET_MB)
    fleet = ClusterService(address, settings)
    await single.start()
    await fleet.start()
    try:
        routes = fleet.routes()

        async def single_ready() -> bool:
            return single.pools["python"].status()["ready"] >= 1

        async def fleet_ready() -> bool:
            hosts = await routes.control.hosts.remote()
            if not hosts:
                return False
            status = await routes.agent(hosts[0]["name"]).status.remote()
            return bool(status["service"]["pools"] and status["service"]["pools"][0]["ready"])

        samples: dict[str, list[float]] = {"single host": [], "through the fleet": []}
        for index in range(rounds):
            await until(single_ready, "the single host's pool")
            await until(fleet_ready, "the fleet host's pool")
            routes._seen = 0.0  # placement sees the refilled pool, as it would after 1 s
            sides = [
                ("single host", lambda: single.run(spec)),
                ("through the fleet", lambda: fleet.run(spec, lambda s, d: None)),
            ]
            for name, run in sides if index % 2 == 0 else reversed(sides):
                samples[name].append(await timed(run))
        return samples
    finally:
        await single.close()
        await ray.get_actor(CONTROL_NAME, namespace=NAMESPACE).shutdown.remote()


def lines_of(samples: dict[str, list[float]]) -> list[str]:
    """The markdown table."""
    lines = [
        "The same warm one-shot python run (`print(sum(range(1000)))`), end to end in the "
        "caller, on one host's `Service` and through a `ClusterService` (a Ray cluster on this "
        "machine: a head and one host node), alternating, each from a ready warm pool of one.",
        "",
        "| path | n | median ms | p90 ms | min ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, values in samples.items():
        lines.append(
            f"| {name} | {len(values)} | {statistics.median(values):.1f} | "
            f"{percentile(values, 0.9):.1f} | {min(values):.1f} |"
        )
    routed, direct = samples["through the fleet"], samples["single host"]
    paired = [r - d for r, d in zip(routed, direct, strict=True)]
    lines += [
        "",
        f"Routing adds {statistics.median(paired):.1f} ms (median of the per-round "
        f"differences; {min(routed) - min(direct):.1f} ms between the fastest runs).",
    ]
    return lines


def main() -> None:
    """Parse flags, build the cluster, run, print (and maybe append)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--append", action="store_true", help="add to docs/benchmarks.md")
    args = parser.parse_args()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1, resources={"fission_host": 1})
        with tempfile.TemporaryDirectory(prefix="bench-fleet-run-", dir="/tmp") as root:
            samples = asyncio.run(bench(args.rounds, Path(root), cluster.address))
    finally:
        ray.shutdown()
        cluster.shutdown()
    lines = lines_of(samples)
    print("\n".join(lines))
    if args.append:
        append_section("A one-shot run through the fleet (bench_fleet_run.py)", lines)


if __name__ == "__main__":
    main()
