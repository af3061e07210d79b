"""Prometheus metrics on the fake VMM driver: counters, histograms, gauges, and who may scrape.

Runs and sandbox calls go through the real Service, SandboxManager and agent protocol; the
exposition is parsed with ``prometheus_client.parser`` as Prometheus would read it.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from fission.auth.keys import KeyLimits, KeyStore
from fission.core import telemetry
from fission.core.languages import resolve_language
from fission.core.limits import MB
from fission.core.sandbox_spec import SandboxSpec
from fission.core.service import Service
from fission.core.spec import RunSpec
from fission.errors import Busy, QuotaExceeded
from fission.server.app import create_app
from fission.server.metrics import PSS_SAMPLE_LIMIT, ServiceMetrics, read_pss_bytes, sample_pss
from fission.server.metrics_port import MetricsPort, check_metrics_port, metrics_socket
from fission.vmm.fake import FakeDriver
from tests.unit.conftest import ServiceStarter, eventually
from tests.unit.metrics_helpers import Scrape, parse, sample_names, scrape

PYTHON = resolve_language("python")
BASH = resolve_language("bash")
REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "docs" / "grafana" / "fission.json"
METRICS_DOC = REPO / "docs" / "metrics.md"
# What an outcome label may be: never a raw exit code or signal number.
OUTCOME = re.compile(
    r"ok|timeout|oom|exit_nonzero|signal|error:[a-z_]+|deleted|expired|wedged|pause failed|shutdown"
)


@pytest.fixture
def metrics(service: Service) -> ServiceMetrics:
    return ServiceMetrics(service)


@pytest_asyncio.fixture(loop_scope="function")
async def keyed(
    service: Service, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    """A TCP listener's app (keys required) and the keys: user, admin, slow (1 request/min)."""
    db = tmp_path / "keys.sqlite3"
    with KeyStore(db) as store:
        _, user = store.create("user")
        _, admin = store.create("ops", role="admin")
        _, slow = store.create("slow", KeyLimits(rate_per_minute=1), role="admin")
    app = create_app(service, keys_db=db)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fission") as client:
        yield client, {"user": user, "admin": admin, "slow": slow}
    app.state.gate.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- runs ---------------------------------------------------------------------------------------


async def test_runs_move_the_run_counters_and_fill_the_histograms(
    service: Service, metrics: ServiceMetrics
) -> None:
    before = await scrape(metrics)
    await service.run(RunSpec(PYTHON, "print(1)"))
    await service.run(RunSpec(PYTHON, "import sys; sys.exit(3)"))
    await service.run(RunSpec(PYTHON, "import sys; sys.exit(4)"))
    after = await scrape(metrics)
    ok = {"language": "python", "action": "run", "outcome": "ok"}
    failed = ok | {"outcome": "exit_nonzero"}  # exit 3 and exit 4 are one label value
    assert after.value("fission_runs_total", **ok) - before.value("fission_runs_total", **ok) == 1
    assert after.value("fission_runs_total", **failed) == 2
    for name, labels in (
        ("fission_run_duration_seconds", {"language": "python", "action": "run"}),
        ("fission_acquire_duration_seconds", {"language": "python", "source": "fresh"}),
        ("fission_vm_start_duration_seconds", {"language": "python", "source": "fresh"}),
        ("fission_exec_duration_seconds", {"language": "python", "kind": "run"}),
    ):
        assert after.value(f"{name}_count", **labels) == 3, name
        assert after.value(f"{name}_sum", **labels) > 0, name
        assert after.value(f"{name}_bucket", **labels, le="+Inf") == 3, name
    # exec is part of the run, so it cannot take longer
    assert after.value("fission_exec_duration_seconds_sum", language="python", kind="run") <= (
        after.value("fission_run_duration_seconds_sum", language="python", action="run")
    )


async def test_a_refused_run_counts_as_busy_and_as_a_failed_run(
    start_service: ServiceStarter,
) -> None:
    service = await start_service(memory_budget_mb=256)  # too small for one clone
    metrics = ServiceMetrics(service)
    with pytest.raises(Busy):
        await service.run(RunSpec(PYTHON, "print(1)"))
    after = await scrape(metrics)
    assert after.value("fission_busy_refusals_total", language="python") == 1
    assert (
        after.value("fission_runs_total", language="python", action="run", outcome="error:busy")
        == 1
    )
    assert (
        after.value("fission_acquire_duration_seconds_count", language="python", source="fresh")
        == 0
    )


async def test_the_rest_api_counts_requests_by_route_template_and_status(
    service: Service,
) -> None:
    app = create_app(service)
    app_metrics: ServiceMetrics = app.state.metrics
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fission") as client:
        run = await client.post("/v1/run", json={"code": "print(2)"})
        created = await client.post("/v1/sandboxes", json={"language": "bash"})
        sandbox_id = created.json()["id"]
        got = await client.get(f"/v1/sandboxes/{sandbox_id}")
        missing = await client.get("/v1/sandboxes/sb-nothing")
        stray = await client.get(f"/no/such/{sandbox_id}")
        await client.delete(f"/v1/sandboxes/{sandbox_id}")
    assert (run.status_code, got.status_code, missing.status_code, stray.status_code) == (
        200,
        200,
        404,
        404,
    )
    after = await scrape(app_metrics)
    count = "fission_api_requests_total"
    rest = {"api": "rest", "method": "GET"}
    assert after.value(count, api="rest", method="POST", route="/v1/run", status="200") == 1
    template = "/v1/sandboxes/{sandbox_id}"
    assert after.value(count, **rest, route=template, status="200") == 1
    assert after.value(count, **rest, route=template, status="404") == 1
    assert after.value(count, **rest, route="unmatched", status="404") == 1
    assert (
        after.value("fission_api_request_duration_seconds_count", api="rest", route="/v1/run") == 1
    )
    assert sandbox_id not in after.label_values()  # ids never become labels
    # the run made through HTTP counts like any other
    assert after.value("fission_runs_total", language="python", action="run", outcome="ok") == 1


# -- sandboxes ----------------------------------------------------------------------------------


async def test_sandbox_calls_move_their_counters_and_gauges_without_ids_as_labels(
    service: Service, metrics: ServiceMetrics, fake_driver: FakeDriver
) -> None:
    manager = service.sandboxes
    record = await manager.create(SandboxSpec(BASH))
    await manager.run_code(record.id, "echo hi")
    await manager.exec_command(record.id, "exit 7")
    during = await scrape(metrics)
    assert during.value("fission_sandboxes", state="running") == 1
    assert during.value("fission_sandboxes", state="paused") == 0
    assert during.value("fission_vms", state="active") == 1
    assert during.value("fission_memory_reserved_bytes") == service.budget.used_mb * MB > 0
    assert during.value("fission_memory_budget_bytes") == 8192 * MB
    await manager.delete(record.id)
    after = await scrape(metrics)
    ops = "fission_sandbox_operations_total"
    assert after.value(ops, action="sandbox.create", outcome="ok") == 1
    assert after.value(ops, action="sandbox.run", outcome="ok") == 1
    assert after.value(ops, action="sandbox.exec", outcome="exit_nonzero") == 1
    assert after.value(ops, action="sandbox.delete", outcome="deleted") == 1
    assert after.value("fission_exec_duration_seconds_count", language="bash", kind="sandbox") == 2
    assert (
        after.value("fission_vm_start_duration_seconds_count", language="bash", source="sandbox")
        == 1
    )
    assert (
        after.value("fission_sandbox_operation_duration_seconds_count", action="sandbox.run") == 1
    )
    assert after.value("fission_sandboxes", state="running") == 0
    assert after.value("fission_vms", state="active") == 0
    vm_ids = {vm.config.vm_id for vm in fake_driver.vms}
    assert not (after.label_values() & (vm_ids | {record.id}))
    outcomes = {v for (n, labels) in after.samples for k, v in labels if k == "outcome"}
    assert outcomes and all(OUTCOME.fullmatch(outcome) for outcome in outcomes), outcomes


async def test_quota_refusals_are_counted_by_limit(
    service: Service, keyed: tuple[httpx.AsyncClient, dict[str, str]]
) -> None:
    client, keys = keyed
    metrics: ServiceMetrics = client._transport.app.state.metrics  # type: ignore[attr-defined]
    first = await service.sandboxes.create(SandboxSpec(BASH), "owner", max_sandboxes=1)
    with pytest.raises(QuotaExceeded):
        await service.sandboxes.create(SandboxSpec(BASH), "owner", max_sandboxes=1)
    assert (await client.get("/v1/pools", headers=bearer(keys["slow"]))).status_code == 200
    assert (await client.get("/v1/pools", headers=bearer(keys["slow"]))).status_code == 429
    after = await scrape(metrics)
    assert after.value("fission_quota_refusals_total", limit="sandboxes") == 1
    assert after.value("fission_quota_refusals_total", limit="rate") == 1
    await service.sandboxes.delete(first.id)


async def test_egress_decisions_of_runs_are_counted(
    service: Service, metrics: ServiceMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fake_attach(agent: Any, policy: Any, on_event: Any) -> None:
        on_event({"action": "egress", "decision": "allowed", "host": "pypi.org"})
        on_event({"action": "egress", "decision": "refused", "host": "example.com"})
        on_event({"action": "egress", "decision": "refused", "host": "example.net"})

    monkeypatch.setattr("fission.core.service.attach", fake_attach)
    await service.run(RunSpec(PYTHON, "print(1)"))
    after = await scrape(metrics)
    egress = "fission_egress_connections_total"
    assert after.value(egress, decision="allowed", source="run") == 1
    assert after.value(egress, decision="refused", source="run") == 2
    assert "example.com" not in after.label_values()


# -- pools and VMs --------------------------------------------------------------------------------


async def test_pool_depth_and_refill_time_per_language(start_service: ServiceStarter) -> None:
    service = await start_service(pools={"python": 2})
    metrics = ServiceMetrics(service)
    await eventually(lambda: service.pools["python"].status()["ready"] == 2, "the pool to fill")
    full = await scrape(metrics)
    assert full.value("fission_pool_ready", language="python") == 2
    assert full.value("fission_pool_target", language="python") == 2
    assert full.value("fission_vms", state="pooled") == 2
    await service.run(RunSpec(PYTHON, "print(1)"))
    await eventually(lambda: service.pools["python"].status()["created"] >= 3, "a refill")
    after = await scrape(metrics)
    assert after.value("fission_pool_refill_duration_seconds_count", language="python") >= 1
    assert (
        after.value("fission_acquire_duration_seconds_count", language="python", source="pool") == 1
    )
    assert (
        after.value("fission_vm_start_duration_seconds_count", language="python", source="pool")
        >= 1
    )


def fake_process(proc: Path, pid: int, pss_kb: int, children: tuple[int, ...] = ()) -> None:
    (proc / str(pid) / "task" / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "smaps_rollup").write_text(f"Rss: 900 kB\nPss:   {pss_kb} kB\n")
    (proc / str(pid) / "task" / str(pid) / "children").write_text(" ".join(map(str, children)))


def test_pss_is_read_from_smaps_rollup_of_each_vms_process_tree(tmp_path: Path) -> None:
    fake_process(tmp_path, 10, 100, (11,))  # the jail's bwrap...
    fake_process(tmp_path, 11, 200, (12,))
    fake_process(tmp_path, 12, 512)  # ...and QEMU
    fake_process(tmp_path, 20, 64)
    assert read_pss_bytes(12, tmp_path) == 512 * 1024
    assert read_pss_bytes(42, tmp_path) is None  # gone: skipped, not an error
    assert sample_pss([10, 20, 42], tmp_path) == ((100 + 200 + 512 + 64) * 1024, 2)


def test_a_scrape_reads_a_bounded_number_of_processes() -> None:
    import os

    total, read = sample_pss([os.getpid()] * (PSS_SAMPLE_LIMIT + 10))
    assert 0 < read <= PSS_SAMPLE_LIMIT and total > 0


async def test_a_failing_listener_does_not_break_a_run(service: Service) -> None:
    def broken(event: str, value: float | None, labels: Any) -> None:
        raise RuntimeError("a bug in a listener")

    service.telemetry.listen(broken)
    result = await service.run(RunSpec(PYTHON, "print(5)"))
    assert result.stdout == b"5\n"


def test_every_event_of_the_core_moves_a_metric(service: Service) -> None:
    metrics = ServiceMetrics(service)
    assert set(metrics._handlers) == set(telemetry.EVENTS)


async def test_services_in_one_process_have_registries_of_their_own(
    start_service: ServiceStarter,
) -> None:
    one, two = await start_service(), await start_service()
    first, second = ServiceMetrics(one), ServiceMetrics(two)
    await one.run(RunSpec(PYTHON, "print(1)"))
    ok = {"language": "python", "action": "run", "outcome": "ok"}
    assert (await scrape(first)).value("fission_runs_total", **ok) == 1
    assert (await scrape(second)).value("fission_runs_total", **ok) == 0


# -- who may scrape -------------------------------------------------------------------------------


async def test_metrics_need_an_admin_key_on_tcp(
    keyed: tuple[httpx.AsyncClient, dict[str, str]],
) -> None:
    client, keys = keyed
    missing = await client.get("/metrics")
    user = await client.get("/metrics", headers=bearer(keys["user"]))
    admin = await client.get("/metrics", headers=bearer(keys["admin"]))
    assert (missing.status_code, user.status_code, admin.status_code) == (401, 403, 200)
    assert user.json()["error"]["code"] == "forbidden"
    assert admin.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "fission_runs" in parse(admin.text).families


async def test_metrics_on_the_unix_socket_need_no_key(service: Service) -> None:
    transport = httpx.ASGITransport(app=create_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://fission") as client:
        response = await client.get("/metrics")
    assert response.status_code == 200 and "fission_memory_budget_bytes" in response.text


async def test_the_metrics_port_serves_metrics_alone_without_a_key(
    keyed: tuple[httpx.AsyncClient, dict[str, str]],
) -> None:
    client, _ = keyed
    app = client._transport.app  # type: ignore[attr-defined]
    routed = MetricsPort(app, app.state.metrics, 9464)
    transport = httpx.ASGITransport(app=routed)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:9464") as port:
        metrics = await port.get("/metrics")
        other = await port.get("/v1/pools")
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as api:
        keyless = await api.get("/metrics")
    assert metrics.status_code == 200 and "fission_pool_ready" in metrics.text
    assert other.status_code == 404  # the API is not reachable through the metrics port
    assert keyless.status_code == 401  # the API's own /metrics still needs a key


def test_the_metrics_port_listens_on_loopback_only() -> None:
    sock = metrics_socket(0)
    try:
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()
    assert check_metrics_port(9464, 8080) == 9464
    for bad in (0, 70000, True, "9464"):
        with pytest.raises(Exception, match="--metrics-port"):
            check_metrics_port(bad, None)
    with pytest.raises(Exception, match="is the API's --port"):
        check_metrics_port(8080, 8080)


# -- the Grafana dashboard and the docs ---------------------------------------------------------


async def every_family(service: Service) -> Scrape:
    """An exposition with every family present (labelled ones appear once moved)."""
    metrics = ServiceMetrics(service)
    return await scrape(metrics)


async def test_every_metric_the_grafana_dashboard_queries_exists(service: Service) -> None:
    exposition = await every_family(service)
    dashboard = json.loads(GRAFANA.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", ())
        if "expr" in target
    ]
    assert len(exprs) >= 10
    used = {name for expr in exprs for name in re.findall(r"\bfission_[a-z_]+", expr)}
    assert used and used <= sample_names(exposition.families), used - sample_names(
        exposition.families
    )
    # every panel the brief asks for is there
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("runs", "error", "latency", "pool", "vms", "memory", "egress"):
        assert topic in titles, topic


async def test_docs_list_every_metric(service: Service) -> None:
    exposition = await every_family(service)
    listed = set(re.findall(r"`(fission_[a-z_]+)`", METRICS_DOC.read_text()))
    names = {
        name + ("_total" if kind == "counter" else "") for name, kind in exposition.families.items()
    }
    assert names <= listed, names - listed
    assert listed <= names | sample_names(exposition.families), listed - names
