"""Metrics and structured logs of a real daemon: /metrics scraped while real runs go through.

One daemon on loopback TCP (keys required) with a warm python pool, ``--metrics-port`` and
JSON logs; a few runs from several threads; the counters and histograms must have moved on both
the admin-keyed ``/metrics`` and the key-less metrics port, and the daemon's log lines must be
JSON carrying the runs' request ids.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.servers import TcpDaemon, free_port
from tests.integration.test_warm import qemu_pids
from tests.unit.metrics_helpers import Scrape, parse

pytestmark = pytest.mark.vm
RUNS = 4
OK = {"language": "python", "action": "run", "outcome": "ok"}


@pytest.fixture(scope="module")
def metrics_url() -> str:
    """Where the daemon's key-less metrics port answers."""
    return f"http://127.0.0.1:{free_port()}/metrics"


@pytest.fixture(scope="module")
def daemon(metrics_url: str) -> Iterator[TcpDaemon]:
    metrics_port = metrics_url.split(":")[2].split("/")[0]
    d = TcpDaemon(
        "--pool",
        "python=1",
        "--metrics-port",
        metrics_port,
        "--log-format",
        "json",
        "--log-level",
        "info",
    )
    d.start()
    yield d
    d.stop()
    assert qemu_pids(d.state) == [], "the daemon left a VM behind"


def scrape_port(url: str) -> Scrape:
    """The metrics port's exposition, parsed."""
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    return parse(response.text)


def test_metrics_move_under_a_small_load_and_logs_are_json(
    daemon: TcpDaemon, metrics_url: str
) -> None:
    admin, user = daemon.create_key("ops", "--role", "admin"), daemon.create_key("ci")
    with daemon.client(user) as api:
        assert api.get("/metrics").status_code == 403  # a user key may run, not scrape
        deadline = time.monotonic() + 120
        while scrape_port(metrics_url).value("fission_pool_ready", language="python") < 1:
            assert time.monotonic() < deadline, "the pool did not fill"
            time.sleep(0.2)
        before = scrape_port(metrics_url)

        def run(n: int) -> str:
            answer = api.post(
                "/v1/run",
                json={"code": f"print({n} * 2)"},
                headers={"X-Request-Id": f"load-{n}"},
            )
            assert answer.status_code == 200, answer.text
            lines = [json.loads(line) for line in answer.text.splitlines()]
            stdout = "".join(line.get("data", "") for line in lines if line["type"] == "output")
            assert stdout == f"{n * 2}\n" and lines[-1]["exit_code"] == 0, answer.text
            return answer.headers["x-request-id"]

        with ThreadPoolExecutor(2) as threads:
            request_ids = list(threads.map(run, range(RUNS)))
        assert request_ids == [f"load-{n}" for n in range(RUNS)]
    with daemon.client(admin) as ops:
        keyed = ops.get("/metrics")
    assert keyed.status_code == 200
    for after in (parse(keyed.text), scrape_port(metrics_url)):
        moved = after.value("fission_runs_total", **OK) - before.value("fission_runs_total", **OK)
        assert moved == RUNS
        for histogram in (
            "fission_run_duration_seconds",
            "fission_acquire_duration_seconds",
            "fission_exec_duration_seconds",
        ):
            count = after.total(f"{histogram}_count", language="python")
            assert count - before.total(f"{histogram}_count", language="python") == RUNS
            assert after.total(f"{histogram}_sum", language="python") > 0
        assert after.total("fission_vm_start_duration_seconds_count", language="python") >= RUNS
        assert after.total("fission_pool_refill_duration_seconds_count") >= 1
        assert (
            after.value(
                "fission_api_requests_total",
                api="rest",
                method="POST",
                route="/v1/run",
                status="200",
            )
            - before.value(
                "fission_api_requests_total",
                api="rest",
                method="POST",
                route="/v1/run",
                status="200",
            )
            == RUNS
        )
        assert after.value("fission_memory_budget_bytes") > 0
    deadline = time.monotonic() + 120
    while (refilled := scrape_port(metrics_url)).value("fission_pool_ready", language="python") < 1:
        assert time.monotonic() < deadline, "the pool did not refill"
        time.sleep(0.2)
    assert refilled.value("fission_vm_pss_sampled") >= 1  # the pool's VM at least
    assert refilled.value("fission_vm_pss_bytes") > 16 * 1024 * 1024  # a guest's RAM, not bwrap's
    other = httpx.get(metrics_url.replace("/metrics", "/v1/pools"), timeout=30)
    assert other.status_code == 404  # the metrics port serves nothing else
    log_lines = [line for line in daemon.log().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in log_lines]
    ended = [r for r in records if r["message"].startswith("python run ended")]
    assert {r["request_id"] for r in ended} == set(request_ids)
    assert all(r["key_id"] and r["sandbox_id"] for r in ended)
