"""What the metrics and request ids add to one run, measured in-process without VMs.

A one-shot run through the REST API moves: the request middleware (request id in and out,
the log context, one API counter and histogram), and the core's events ACQUIRE, EXEC and RUN
(a pooled run; a fresh one adds VM_START). This times exactly that work, ``--runs`` times, with
the daemon's ``ServiceMetrics`` listening (what ``fission serve`` does) and with no listener
(embedded runs), and one ``/metrics`` scrape (no VMs, so no PSS to read). Prints a markdown
table of microseconds per run; compare with a warm run's tens of milliseconds.

    .venv/bin/python bench/bench_metrics.py --runs 100000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fission.core import telemetry
from fission.core.service import Service, ServiceConfig
from fission.server.metrics import ServiceMetrics
from fission.server.request_ids import RequestContext
from fission.vmm.fake import FakeDriver

SCOPE = {
    "type": "http",
    "method": "POST",
    "path": "/v1/run",
    "headers": [(b"x-request-id", b"bench-1"), (b"content-type", b"application/json")],
}


def run_events(hub: telemetry.Telemetry) -> None:
    """The events one pooled run emits."""
    hub.emit(telemetry.ACQUIRE, 0.003, language="python", source="pool")
    hub.emit(telemetry.EXEC, 0.05, language="python", kind="run")
    hub.emit(telemetry.RUN, 0.06, language="python", action="run", outcome="ok")


async def middleware_round(middleware: RequestContext) -> None:
    """One request through the middleware, the app answering at once."""

    async def send(message: Any) -> None:
        return None

    await middleware(dict(SCOPE), None, send)


async def answer(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def per_run_us(work: Any, runs: int, repeats: int = 5) -> float:
    """The median over ``repeats`` of microseconds per call of ``work`` (run ``runs`` times)."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(runs):
            work()
        samples.append((time.perf_counter() - started) / runs * 1e6)
    return statistics.median(samples)


async def main() -> None:
    """Time the instrumentation of one run, with and without metrics, and a scrape."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        config = ServiceConfig(Path(state), pools={}, driver=FakeDriver())
        bare, measured = Service(config), Service(config)
        metrics = ServiceMetrics(measured)
        with_metrics = RequestContext(answer, metrics)
        without = RequestContext(answer, None)
        rows = [
            (
                "core events of a run, no listener (embedded)",
                per_run_us(lambda: run_events(bare.telemetry), args.runs),
            ),
            (
                "core events of a run, ServiceMetrics listening (daemon)",
                per_run_us(lambda: run_events(measured.telemetry), args.runs),
            ),
        ]
        for name, middleware in (
            ("request id only", without),
            ("request id + API metrics", with_metrics),
        ):
            started = time.perf_counter()
            for _ in range(args.runs // 10):
                await middleware_round(middleware)
            rows.append(
                (
                    f"REST middleware: {name}",
                    (time.perf_counter() - started) / (args.runs // 10) * 1e6,
                )
            )
        scrapes = []
        for _ in range(20):
            started = time.perf_counter()
            await metrics.exposition()
            scrapes.append((time.perf_counter() - started) * 1e6)
        rows.append(("one /metrics scrape (no VMs)", statistics.median(scrapes)))
    print(f"| instrumentation ({args.runs} runs) | µs per run |")
    print("|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:.1f} |")


if __name__ == "__main__":
    asyncio.run(main())
