"""What a VM costs: CPU per fresh clone, CPU and memory of an idle one, clones per second, density.

Every VM runs in this process's own Service or pool (no daemon in between), jailed as usual when
run as root. CPU is the VM's process tree (bubblewrap, its init and QEMU with all its threads):
for phases, from ``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds, so short phases are exact);
for idle windows of seconds, utime + stime from ``/proc/<pid>/stat`` (which also counts threads
that ended). The daemon's share is this process's own CPU time (``time.process_time``).
Modes, each printing a markdown table:

* ``cost``: CPU-s per fresh clone, one at a time (``--vms``, default 8): restore to the agent's
  HELLO, warm-up, ready to pool, the daemon's share, and the first and a later ``print(42)``;
  the same for a clone pooled without its warm-up (what queued runs get);
* ``idle``: CPU % of a core per pooled VM over ``--idle-seconds`` (10), stopped (as pooled now)
  and running (as before: the same VMs woken and left alone);
* ``pss``: PSS per idle pooled VM with ``--vms`` of them pooled at once, warm and unwarmed;
* ``throughput``: fresh VMs per second with ``--clients`` (8) clients running ``print(42)`` back
  to back for ``--seconds`` (30) against a pool of ``--pool`` (2), with latency percentiles; with
  ``--clients 1``, the unpaced back-to-back latency of one client;
* ``sandboxes``: create sandboxes (each runs ``print(42)`` once) until ``--max`` (150), the memory
  budget, or less than ``--keep-free-gib`` (4) of the host's memory is left; once they are all
  stopped for idleness, their CPU, memory and a ``print(42)`` in ``--probes`` (10) of them; then
  the same with all of them woken and kept running (as before); then delete them all.

    .venv/bin/python bench/bench_vmcost.py cost idle pss throughput
    .venv/bin/python bench/bench_vmcost.py throughput --clients 1 --seconds 30
    .venv/bin/python bench/bench_vmcost.py sandboxes --max 150
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import host_line, percentile

from fission.config import use_runtime_dir
from fission.core import idle, orchestrator
from fission.core.execution import execute
from fission.core.languages import resolve_language
from fission.core.machines import exec_request
from fission.core.pool import WarmPool
from fission.core.sandbox_spec import SandboxSpec
from fission.core.sandboxes import SandboxManager
from fission.core.service import CLONE_MB, Service, ServiceConfig, private_service
from fission.core.spec import RunSpec
from fission.vmm.base import Machine, default_driver

PYTHON = resolve_language("python")
PRINT = RunSpec(PYTHON, "print(42)")
MIB = 1024 * 1024
TICKS = os.sysconf("SC_CLK_TCK")


# -- reading a VM's process tree ---------------------------------------------------------------


def tree(pid: int | None) -> list[int]:
    """``pid`` and its descendants (bubblewrap, its init, QEMU), via /proc/.../children."""
    found, todo = [], [pid] if pid else []
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            with open(f"/proc/{current}/task/{current}/children") as children:
                todo += [int(child) for child in children.read().split()]
        except OSError:
            continue
    return found


def cpu_seconds(machine: Machine) -> float:
    """CPU time of every thread of the VM's process tree so far (schedstat, nanoseconds)."""
    total = 0
    for pid in tree(machine.vm.pid):
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in threads:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
                    total += int(stat.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total / 1e9


def pss_mib(machine: Machine) -> tuple[float, float]:
    """PSS of the VM's QEMU process alone and of its whole tree, in MiB."""
    qemu = whole = 0
    for pid in tree(machine.vm.pid):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                pss = next(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            continue
        whole += pss
        qemu = max(qemu, pss)  # QEMU is by far the largest of the three
    return qemu / 1024, whole / 1024


def mem_available_gib() -> float:
    """The host's MemAvailable."""
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


# -- tables ---------------------------------------------------------------------------------------


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """Print a markdown table under a heading."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.stdout.flush()


def share_cells(samples: list[float]) -> list[str]:
    """Median and max of percentages."""
    return [f"{statistics.median(samples):.3f}", f"{max(samples):.3f}"]


def med(samples: list[float], digits: int = 3) -> str:
    """Median (and range) of ``samples``."""
    if not samples:
        return "-"
    low, mid, high = min(samples), statistics.median(samples), max(samples)
    return f"{mid:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


# -- cost -----------------------------------------------------------------------------------------


@dataclass
class Phases:
    """CPU seconds of one clone's phases: the VM's tree and this process."""

    vm: dict[str, float] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)


async def one_clone(warm: bool) -> Phases:
    """Make one clone as the pool does (warmed or not, then stopped), run print(42) twice."""
    phases = Phases()
    host0 = time.process_time()
    machine = await orchestrator.clone(PYTHON)
    try:
        phases.vm["restore"] = cpu_seconds(machine)
        phases.host["restore"] = time.process_time() - host0
        if warm:
            host1 = time.process_time()
            await orchestrator.warm_up(machine, PYTHON)
            phases.host["warm-up"] = time.process_time() - host1
        await idle.park(machine)
        phases.vm["pooled"] = cpu_seconds(machine)
        phases.vm["warm-up"] = phases.vm["pooled"] - phases.vm["restore"]
        phases.host["pooled"] = time.process_time() - host0
        for run in ("first run", "later run"):
            before, host3 = cpu_seconds(machine), time.process_time()
            await idle.wake(machine) if run == "first run" else None
            outcome = await execute(machine.agent, exec_request(PRINT))
            if outcome.result.stdout != b"42\n":
                raise SystemExit(f"bench: print(42) gave {outcome.result!r}")
            phases.vm[run] = cpu_seconds(machine) - before
            phases.host[run] = time.process_time() - host3
        phases.host["with a first run"] = phases.host["pooled"] + phases.host["first run"]
        phases.vm["with a first run"] = phases.vm["pooled"] + phases.vm["first run"]
    finally:
        await machine.destroy()
    return phases


async def bench_cost(vms: int) -> None:
    """CPU-s per fresh clone, warmed (idle pool) and unwarmed (queued runs), one at a time."""
    rows = []
    for warm in (True, False):
        samples = [await one_clone(warm) for _ in range(vms)]
        label = "warmed (idle pool)" if warm else "unwarmed (runs queued)"
        keys = ["restore", "warm-up", "pooled", "first run", "later run", "with a first run"]
        for key in keys:
            if key == "warm-up" and not warm:
                continue
            vm = [s.vm[key] for s in samples]
            host = [s.host.get(key, 0.0) for s in samples]
            total = [a + b for a, b in zip(vm, host, strict=True)]
            rows.append([f"{label}: {key}", str(vms), med(vm), med(host), med(total)])
    table(
        "CPU seconds per fresh clone (median, range)",
        ["phase", "n", "VM (QEMU tree)", "daemon (this process)", "total"],
        rows,
    )


# -- idle and pss ---------------------------------------------------------------------------------


@asynccontextmanager
async def pooled(vms: int, warm: bool) -> AsyncIterator[list[Machine]]:
    """``vms`` clones made as a pool makes them (warmed or not), stopped; destroyed on exit."""
    machines: list[Machine] = []
    try:
        for _ in range(vms):
            machine = await orchestrator.clone(PYTHON)
            machines.append(machine)
            if warm:
                await orchestrator.warm_up(machine, PYTHON)
            await idle.park(machine)
        yield machines
    finally:
        await asyncio.gather(*(m.destroy() for m in machines), return_exceptions=True)


def stat_cpu_seconds(machine: Machine) -> float:
    """utime + stime of the VM's process tree from /proc/PID/stat: ticks, but threads that
    ended are counted too (for windows of seconds, where schedstat would lose them)."""
    total = 0
    for pid in tree(machine.vm.pid):
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / TICKS


async def idle_share(machines: list[Machine], seconds: float) -> list[float]:
    """Each VM's CPU over ``seconds``, as % of one core."""
    before = [stat_cpu_seconds(m) for m in machines]
    await asyncio.sleep(seconds)
    after = [stat_cpu_seconds(m) for m in machines]
    return [100 * (b - a) / seconds for a, b in zip(before, after, strict=True)]


async def bench_idle(vms: int, seconds: float) -> None:
    """CPU % of a core per pooled VM: stopped (now), then running idle (before)."""
    async with pooled(vms, warm=True) as machines:
        await asyncio.sleep(1.0)
        stopped = await idle_share(machines, seconds)
        for machine in machines:
            await idle.wake(machine)
        await asyncio.sleep(1.0)
        running = await idle_share(machines, seconds)
    table(
        f"CPU per idle pooled VM ({vms} VMs, {seconds:g} s)",
        ["state", "median % of a core", "max %"],
        [
            ["vCPUs stopped (pooled now)", *share_cells(stopped)],
            ["running idle (before)", *share_cells(running)],
        ],
    )


async def bench_pss(vms: int) -> None:
    """PSS per idle pooled VM with ``vms`` pooled at once, warmed and unwarmed."""
    rows = []
    for warm in (True, False):
        async with pooled(vms, warm) as machines:
            await asyncio.sleep(1.0)
            sizes = [pss_mib(m) for m in machines]
        label = "warmed" if warm else "unwarmed"
        rows.append(
            [
                label,
                str(vms),
                f"{statistics.median(q for q, _ in sizes):.1f}",
                f"{statistics.median(w for _, w in sizes):.1f}",
            ]
        )
    table(
        "PSS per idle pooled VM (MiB, median)",
        ["pooled clones", "VMs at once", "QEMU", "QEMU + jail processes"],
        rows,
    )


# -- throughput -----------------------------------------------------------------------------------


@asynccontextmanager
async def service(config: Callable[[Path], ServiceConfig]) -> AsyncIterator[Service]:
    """A private Service, with this process's runtime dir put back afterwards."""
    runtime = os.environ.get("FISSION_RUNTIME_DIR")
    try:
        async with private_service("bench-vmcost-", config) as started:
            yield started
    finally:
        if runtime is not None:
            os.environ["FISSION_RUNTIME_DIR"] = runtime


async def wait_for(condition: Callable[[], bool], what: str, timeout: float = 300.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} did not happen within {timeout:g} s")
        await asyncio.sleep(0.1)


async def bench_throughput(clients: int, seconds: float, pool_size: int) -> None:
    """Fresh VMs per second with ``clients`` clients running print(42) back to back."""

    def config(state_dir: Path) -> ServiceConfig:
        return ServiceConfig(
            state_dir=state_dir,
            pools={"python": pool_size},
            memory_budget_mb=(pool_size + clients + 2) * CLONE_MB,
            acquire_timeout=60.0,
        )

    async with service(config) as started:
        pool = started.pools["python"]
        await wait_for(lambda: pool.status()["ready"] == pool_size, "the pool to fill")
        latencies: list[float] = []
        errors: list[str] = []
        stop_at = time.monotonic() + seconds
        host0, wall0 = time.process_time(), time.monotonic()

        async def client() -> None:
            while time.monotonic() < stop_at:
                started_at = time.perf_counter()
                try:
                    result = await started.run(PRINT)
                except Exception as exc:  # counted, the bench goes on
                    errors.append(type(exc).__name__)
                    continue
                if result.stdout != b"42\n":
                    errors.append(f"wrong output {result.stdout!r}")
                    continue
                latencies.append((time.perf_counter() - started_at) * 1000)

        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.monotonic() - wall0
        host = time.process_time() - host0
        status = pool.status()
    rows = [
        [
            str(clients),
            f"{wall:.1f}",
            str(len(latencies)),
            f"{len(latencies) / wall:.2f}",
            f"{statistics.median(latencies):.0f}" if latencies else "-",
            f"{percentile(latencies, 0.9):.0f}" if latencies else "-",
            f"{percentile(latencies, 0.99):.0f}" if latencies else "-",
            f"{status['unwarmed']}/{status['created']}",
            f"{host / max(1, len(latencies)):.3f}",
            str(len(errors)),
        ]
    ]
    table(
        f"Fresh VMs per second (pool of {pool_size}, print(42) back to back)",
        [
            "clients",
            "seconds",
            "runs",
            "runs/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "unwarmed/created",
            "daemon CPU-s/run",
            "errors",
        ],
        rows,
    )


# -- sandboxes ------------------------------------------------------------------------------------


async def probe(sandboxes: SandboxManager, ids: list[str], count: int) -> list[float]:
    """ms of a print(42) in ``count`` of the sandboxes picked at random."""
    answers = []
    for sandbox_id in random.sample(ids, min(count, len(ids))):
        began = time.perf_counter()
        result = await sandboxes.run_code(sandbox_id, "print(42)")
        answers.append((time.perf_counter() - began) * 1000)
        if result.stdout != b"42\n":
            raise SystemExit(f"bench: sandbox {sandbox_id} printed {result.stdout!r}")
    return answers


async def bench_sandboxes(maximum: int, keep_free_gib: float, probes: int) -> None:
    """Idle sandboxes until ``maximum``, the budget or the host's memory; runs still answer?

    Measured twice: with their vCPUs stopped for idleness (now), then all woken and kept
    running (as before), to compare the CPU they burn doing nothing and the latency of a run.
    """

    def config(state_dir: Path) -> ServiceConfig:
        budget = (maximum + 2) * CLONE_MB
        return ServiceConfig(state_dir=state_dir, pools={}, memory_budget_mb=budget)

    available_before = mem_available_gib()
    async with service(config) as started:
        sandboxes = started.sandboxes
        ids: list[str] = []
        create_ms: list[float] = []
        stop_reason = f"reached --max {maximum}"
        created_at = time.monotonic()
        try:
            while len(ids) < maximum:
                if mem_available_gib() < keep_free_gib:
                    stop_reason = f"less than {keep_free_gib:g} GiB of memory left"
                    break
                began = time.perf_counter()
                record = await sandboxes.create(SandboxSpec(PYTHON))
                ids.append(record.id)
                result = await sandboxes.run_code(record.id, "print(42)")
                create_ms.append((time.perf_counter() - began) * 1000)
                if result.stdout != b"42\n":
                    raise SystemExit(f"bench: sandbox {record.id} printed {result.stdout!r}")
            fill_seconds = time.monotonic() - created_at
            boxes = [sandboxes._box(i, None) for i in ids]
            await wait_for(
                lambda: all(box.idle.stopped for box in boxes),
                "every sandbox to be stopped for idleness",
                timeout=60.0,
            )
            live = [box.machine for box in boxes if box.machine is not None]
            stopped_cpu = await idle_share(live, 10.0)
            sizes = [pss_mib(m) for m in live]
            available_full = mem_available_gib()
            stopped_answers = await probe(sandboxes, ids, probes)
            for box in boxes:  # as before: every sandbox keeps running while idle
                box.idle.after = None
                if box.machine is not None:
                    await box.idle.wake(box.machine)
            await asyncio.sleep(2.0)
            running_cpu = await idle_share(live, 10.0)
            running_answers = await probe(sandboxes, ids, probes)
        finally:
            await asyncio.gather(*(sandboxes.delete(i) for i in ids), return_exceptions=True)
    pss = [whole for _, whole in sizes]
    table(
        f"Idle sandboxes on this host ({stop_reason})",
        ["measurement", "value"],
        [
            ["sandboxes alive at once", str(len(ids))],
            ["create + first print(42), median ms", f"{statistics.median(create_ms):.0f}"],
            ["time to create them all, s", f"{fill_seconds:.1f}"],
            ["PSS per idle sandbox (QEMU + jail), median MiB", f"{statistics.median(pss):.1f}"],
            ["PSS of all of them, GiB", f"{sum(pss) / 1024:.2f}"],
            [
                "host memory they took (MemAvailable drop), GiB",
                f"{available_before - available_full:.2f}",
            ],
            ["stopped (now): CPU of all of them, % of a core", f"{sum(stopped_cpu):.2f}"],
            [
                "stopped (now): print(42) in a random one, median / max ms",
                cells_ms(stopped_answers),
            ],
            ["running (before): CPU of all of them, % of a core", f"{sum(running_cpu):.2f}"],
            [
                "running (before): print(42) in a random one, median / max ms",
                cells_ms(running_answers),
            ],
        ],
    )


def cells_ms(samples: list[float]) -> str:
    """``median / max`` of milliseconds."""
    return f"{statistics.median(samples):.0f} / {max(samples):.0f}"


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    """Parse the modes and options, then run each mode in turn."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "modes", nargs="+", choices=["cost", "idle", "pss", "throughput", "sandboxes"]
    )
    parser.add_argument("--vms", type=int, default=8, help="clones for cost, idle and pss")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--pool", type=int, default=2, help="pool size for throughput")
    parser.add_argument("--max", type=int, default=150, help="sandboxes to create at most")
    parser.add_argument("--keep-free-gib", type=float, default=4.0)
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument(
        "--always-warm",
        action="store_true",
        help="throughput: warm every clone, even for queued runs (the policy before)",
    )
    args = parser.parse_args()
    if args.always_warm:
        WarmPool._queued = lambda self: False  # type: ignore[method-assign]
    runtime = Path(tempfile.mkdtemp(prefix="bench-vmcost-", dir="/tmp"))
    use_runtime_dir(runtime)

    async def run_all() -> None:
        host = await default_driver().host()
        print(host_line(host.accel))
        modes: dict[str, Callable[[], Awaitable[None]]] = {
            "cost": lambda: bench_cost(args.vms),
            "idle": lambda: bench_idle(args.vms, args.idle_seconds),
            "pss": lambda: bench_pss(args.vms),
            "throughput": lambda: bench_throughput(args.clients, args.seconds, args.pool),
            "sandboxes": lambda: bench_sandboxes(args.max, args.keep_free_gib, args.probes),
        }
        for mode in args.modes:
            await modes[mode]()

    try:
        asyncio.run(run_all())
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


if __name__ == "__main__":
    main()
