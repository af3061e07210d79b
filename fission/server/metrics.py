"""The daemon's Prometheus metrics: the core's telemetry events, API requests, and gauges.

One ``ServiceMetrics`` per Service, in a ``CollectorRegistry`` of its own (not the process-wide
default), so several services in one process (tests) keep apart. Counters and histograms move
as the core emits events (``fission.core.telemetry``) and as the adapters answer requests;
gauges (pools, VMs and sandboxes by state, memory budget, PSS) are read from the Service when
``/metrics`` is scraped, so they cost nothing between scrapes. Every metric is listed with its
labels in docs/metrics.md; labels never carry ids, only bounded sets (languages, actions,
outcome kinds, route templates).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fission.core import telemetry
from fission.core.limits import MB
from fission.core.service import Service

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Reading /proc/PID/smaps_rollup walks the process's page tables (about 1 ms for a VM): a
# scrape reads at most this many processes, in a worker thread.
PSS_SAMPLE_LIMIT = 256
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def read_pss_bytes(pid: int, proc: Path = Path("/proc")) -> int | None:
    """The proportional set size of process ``pid`` in bytes, or None if it cannot be read."""
    try:
        with open(proc / str(pid) / "smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_tree(pid: int, limit: int, proc: Path = Path("/proc")) -> list[int]:
    """``pid`` and its descendants, at most ``limit`` (a jailed VMM is bwrap, then QEMU)."""
    found: list[int] = []
    waiting = [pid]
    while waiting and len(found) < limit:
        current = waiting.pop()
        found.append(current)
        try:
            tasks = list((proc / str(current) / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                waiting.extend(int(child) for child in (task / "children").read_text().split())
            except (OSError, ValueError):
                continue
    return found


def sample_pss(pids: list[int], proc: Path = Path("/proc")) -> tuple[int, int]:
    """The summed PSS of the process trees of ``pids`` and how many trees were read.

    At most ``PSS_SAMPLE_LIMIT`` processes are read in all.
    """
    total, read, budget = 0, 0, PSS_SAMPLE_LIMIT
    for pid in pids:
        if budget <= 0:
            break
        tree = process_tree(pid, budget, proc)
        budget -= len(tree)
        sizes = [pss for member in tree if (pss := read_pss_bytes(member, proc)) is not None]
        if sizes:
            total, read = total + sum(sizes), read + 1
    return total, read


class StateCollector(Collector):
    """Gauges read from the Service at scrape time: pools, VMs, sandboxes, memory, PSS."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.pss: tuple[int, int] = (0, 0)  # set by ServiceMetrics.exposition before a scrape

    def collect(self) -> Iterator[Metric]:
        """Yield the gauges' current values."""
        service = self.service
        pools = [pool.status() for pool in list(service.pools.values())]
        for name, key, doc in (
            ("fission_pool_ready", "ready", "Warm VMs ready in the pool (its depth)."),
            ("fission_pool_starting", "starting", "VMs the pool is restoring or warming."),
            ("fission_pool_in_use", "in_use", "Pooled VMs serving a run."),
            ("fission_pool_target", "size", "How many ready VMs the pool keeps."),
        ):
            family = GaugeMetricFamily(name, doc, labels=["language"])
            for pool in pools:
                family.add_metric([pool["language"]], pool[key])
            yield family
        sandboxes = service.sandboxes.census()
        family = GaugeMetricFamily("fission_sandboxes", "Sandboxes by state.", labels=["state"])
        for state, count in sandboxes.items():
            family.add_metric([state], count)
        yield family
        pooled = sum(pool["ready"] for pool in pools)
        alive = service.journal.live_count()
        active = max(0, alive - pooled - sandboxes["idle"])
        family = GaugeMetricFamily(
            "fission_vms",
            "Live VMs: pooled (ready, vCPUs stopped), idle (a sandbox's, vCPUs stopped), "
            "active (the rest: runs, running sandboxes, clones warming).",
            labels=["state"],
        )
        for state, count in (("pooled", pooled), ("idle", sandboxes["idle"]), ("active", active)):
            family.add_metric([state], count)
        yield family
        yield GaugeMetricFamily(
            "fission_memory_budget_bytes",
            "Guest RAM the daemon may reserve (--memory-budget).",
            value=service.budget.total_mb * MB,
        )
        yield GaugeMetricFamily(
            "fission_memory_reserved_bytes",
            "Guest RAM reserved now by pooled VMs, runs and sandboxes.",
            value=service.budget.used_mb * MB,
        )
        pss, sampled = self.pss
        yield GaugeMetricFamily(
            "fission_vm_pss_bytes",
            "Summed proportional set size of the VMs' processes (VMM and its jail) at this scrape.",
            value=pss,
        )
        yield GaugeMetricFamily(
            "fission_vm_pss_sampled", "How many VMs the PSS was read from.", value=sampled
        )


class ServiceMetrics:
    """Every metric of one Service, in its own registry; listens to its telemetry."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry

        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def histogram(name: str, doc: str, labels: list[str]) -> Histogram:
            return Histogram(name, doc, labels, registry=registry, buckets=LATENCY_BUCKETS)

        self.runs = counter(
            "fission_runs",
            "Runs, installs and repo commands ended.",
            ["language", "action", "outcome"],
        )
        self.run_seconds = histogram(
            "fission_run_duration_seconds",
            "A run's total time, from asking for a machine to its end.",
            ["language", "action"],
        )
        self.acquire_seconds = histogram(
            "fission_acquire_duration_seconds",
            "Time to get a machine for a run (from the pool, or started for it).",
            ["language", "source"],
        )
        self.vm_start_seconds = histogram(
            "fission_vm_start_duration_seconds",
            "Time to boot or restore a VM.",
            ["language", "source"],
        )
        self.exec_seconds = histogram(
            "fission_exec_duration_seconds",
            "Time a program ran in its VM.",
            ["language", "kind"],
        )
        self.refill_seconds = histogram(
            "fission_pool_refill_duration_seconds",
            "Time for a pool to make one VM ready (restore, warm-up, park).",
            ["language"],
        )
        self.sandbox_ops = counter(
            "fission_sandbox_operations", "Sandbox operations ended.", ["action", "outcome"]
        )
        self.sandbox_seconds = histogram(
            "fission_sandbox_operation_duration_seconds",
            "Time a sandbox operation took.",
            ["action"],
        )
        self.egress = counter(
            "fission_egress_connections",
            "Connections the egress proxy allowed, refused or cut.",
            ["decision", "source"],
        )
        self.quota_refusals = counter(
            "fission_quota_refusals", "Requests refused: an API key over its limit.", ["limit"]
        )
        self.busy_refusals = counter(
            "fission_busy_refusals",
            "Runs refused: no machine within deadline or budget.",
            ["language"],
        )
        self.api_requests = counter(
            "fission_api_requests",
            "API requests answered, by route template (gRPC: method) and status.",
            ["api", "method", "route", "status"],
        )
        self.api_seconds = histogram(
            "fission_api_request_duration_seconds",
            "Time to answer an API request (a streamed run: to its last line).",
            ["api", "route"],
        )
        self.state = StateCollector(service)
        registry.register(self.state)
        observe, count = self._observe, self._count
        self._handlers: Mapping[str, Callable[[float | None, Mapping[str, str]], None]] = {
            telemetry.RUN: self._run,
            telemetry.ACQUIRE: functools.partial(observe, self.acquire_seconds),
            telemetry.VM_START: functools.partial(observe, self.vm_start_seconds),
            telemetry.EXEC: functools.partial(observe, self.exec_seconds),
            telemetry.POOL_REFILL: functools.partial(observe, self.refill_seconds),
            telemetry.SANDBOX_OP: self._sandbox_op,
            telemetry.EGRESS: functools.partial(count, self.egress),
            telemetry.QUOTA_REFUSED: functools.partial(count, self.quota_refusals),
            telemetry.BUSY: functools.partial(count, self.busy_refusals),
        }
        service.telemetry.listen(self.on_event)

    def on_event(self, event: str, value: float | None, labels: Mapping[str, str]) -> None:
        """Move the metrics of one telemetry event."""
        handler = self._handlers.get(event)
        if handler is not None:
            handler(value, labels)

    @staticmethod
    def _observe(metric: Histogram, value: float | None, labels: Mapping[str, str]) -> None:
        if value is not None:
            metric.labels(**labels).observe(value)

    @staticmethod
    def _count(metric: Counter, _: float | None, labels: Mapping[str, str]) -> None:
        metric.labels(**labels).inc()

    def _run(self, value: float | None, labels: Mapping[str, str]) -> None:
        self.runs.labels(**labels).inc()
        if value is not None:
            self.run_seconds.labels(labels["language"], labels["action"]).observe(value)

    def _sandbox_op(self, value: float | None, labels: Mapping[str, str]) -> None:
        self.sandbox_ops.labels(**labels).inc()
        if value is not None:
            self.sandbox_seconds.labels(labels["action"]).observe(value)

    def observe_request(
        self, api: str, method: str, route: str, status: str, seconds: float
    ) -> None:
        """Count one answered API request (``route``: a template or a gRPC method name)."""
        method = method if api == "grpc" or method in HTTP_METHODS else "other"
        self.api_requests.labels(api, method, route, status).inc()
        self.api_seconds.labels(api, route).observe(seconds)

    async def exposition(self) -> bytes:
        """The metrics in Prometheus' text format (PSS read in a worker thread first)."""
        pids = self.service.journal.live_pids()
        self.state.pss = await asyncio.to_thread(sample_pss, pids)
        return generate_latest(self.registry)
