"""Shared parts of the benchmarks: percentiles, tables (with targets), host facts, timing a
command, CPU and memory of process trees from /proc, a daemon of the bench's own, docs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
COLUMNS = ("measurement", "n", "median ms", "p90 ms", "p99 ms", "min ms", "max ms")

Row = tuple[str, list[float]]


def percentile(samples: list[float], fraction: float) -> float:
    """The ``fraction`` percentile of ``samples`` by nearest rank."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def p90(samples: list[float]) -> float:
    """The 90th percentile by nearest rank."""
    return percentile(samples, 0.9)


def cells(row: Row) -> list[str]:
    """A row's name and sample count, then median, p90, p99, min and max in milliseconds."""
    name, samples = row
    stats = (
        statistics.median(samples),
        percentile(samples, 0.9),
        percentile(samples, 0.99),
        min(samples),
        max(samples),
    )
    return [name, str(len(samples)), *(f"{value:.1f}" for value in stats)]


def print_table(title: str, rows: list[Row]) -> None:
    """Print ``rows`` as a rich table."""
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "measurement" else "right")
    for row in rows:
        table.add_row(*cells(row))
    Console().print(table)


def markdown_table(rows: list[Row]) -> list[str]:
    """``rows`` as the lines of a markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    return lines + ["| " + " | ".join(cells(row)) + " |" for row in rows]


def fission_cli() -> str:
    """The ``fission`` entry point next to this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "fission"
    found = str(beside) if beside.exists() else shutil.which("fission")
    if found is None:
        raise SystemExit("bench: no `fission` command next to this python or on PATH")
    return found


async def time_command(
    argv: list[str], runs: int, env: Mapping[str, str] | None = None, expect: bytes = b"42\n"
) -> list[float]:
    """Wall-clock ms from spawn to exit of ``argv``, ``runs`` times; each must print ``expect``."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None,
        )
        out, err = await proc.communicate()
        samples.append((time.perf_counter() - started) * 1000)
        if proc.returncode != 0 or out != expect:
            raise SystemExit(f"bench: {argv[0]} exited {proc.returncode}: {out!r} {err!r}")
    return samples


def host_facts() -> dict[str, str]:
    """nproc, CPU model, RAM and kernel of this host."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram_kb = 0
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemTotal:"):
                ram_kb = int(line.split()[1])
                break
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "ram": f"{ram_kb / 2**20:.1f} GiB",
        "kernel": platform.release(),
    }


def host_line(accel: str) -> str:
    """One markdown line naming this host and the accelerator."""
    facts = host_facts()
    return (
        f"Host: {facts['nproc']} CPUs ({facts['cpu']}), {facts['ram']} RAM, "
        f"kernel {facts['kernel']}; accelerator {accel}.\n"
    )


def append_section(heading: str, lines: list[str]) -> None:
    """Append ``## heading (date)`` and ``lines`` to docs/benchmarks.md."""
    day = time.strftime("%Y-%m-%d %H:%M")
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    with DOCS.open("a") as docs:
        if docs.tell() == 0:
            docs.write("# fission benchmarks\n")
        docs.write("\n".join([f"\n## {heading}, {day}\n", *lines]) + "\n")


# -- host baselines --------------------------------------------------------------------------
@dataclass(frozen=True)
class HostTiming:
    """Wall-clock ms of each run of a host command, its CPU-seconds per run, and how timed."""

    samples: list[float]
    cpu_s: float
    method: str


def time_host_command(argv: list[str], runs: int, env: Mapping[str, str]) -> HostTiming:
    """Time ``argv`` with hyperfine (no shell, 3 warm-ups) when installed, else in a loop."""
    hyperfine = shutil.which("hyperfine")
    if hyperfine is None:
        return _time_in_loop(argv, runs, env)
    with tempfile.TemporaryDirectory(prefix="fission-hyperfine-") as tmp:
        report = Path(tmp) / "report.json"
        command = [hyperfine, "-N", "--warmup", "3", "--runs", str(runs), "--style", "none"]
        command += ["--export-json", str(report), "--", shlex.join(argv)]
        subprocess.run(command, env=dict(env), check=True, capture_output=True, timeout=600)
        result = json.loads(report.read_text())["results"][0]
    samples = [seconds * 1000 for seconds in result["times"]]
    return HostTiming(samples, float(result["user"]) + float(result["system"]), "hyperfine")


def _time_in_loop(argv: list[str], runs: int, env: Mapping[str, str]) -> HostTiming:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(argv, env=dict(env), capture_output=True, timeout=60)
        samples.append((time.perf_counter() - started) * 1000)
        if done.returncode != 0 or done.stdout != b"42\n":
            raise SystemExit(f"bench: {argv[0]} exited {done.returncode}: {done.stderr!r}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return HostTiming(samples, cpu / runs, "loop")


# -- processes, CPU and memory from /proc ------------------------------------------------------
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    """One process's parent and CPU-seconds: its own (every thread) and its reaped children's."""

    ppid: int
    own_cpu: float
    children_cpu: float


def proc_stat(pid: int) -> ProcStat | None:
    """``/proc/PID/stat`` of one process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = [int(value) for value in fields[11:15]]  # utime stime cutime cstime
    return ProcStat(
        int(fields[1]), (ticks[0] + ticks[1]) / CLOCK_TICKS, sum(ticks[2:]) / CLOCK_TICKS
    )


def process_table() -> dict[int, ProcStat]:
    """Every process on the host, read once."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := proc_stat(int(entry))) is not None:
            table[int(entry)] = stat
    return table


def descendants(root: int, table: dict[int, ProcStat]) -> set[int]:
    """Every process below ``root`` (not ``root`` itself)."""
    children: dict[int, list[int]] = {}
    for pid, stat in table.items():
        children.setdefault(stat.ppid, []).append(pid)
    found: set[int] = set()
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return found


def is_qemu(pid: int) -> bool:
    """True when ``pid`` runs a QEMU binary (its name may be changed by ``-name process=``)."""
    try:
        return Path(os.readlink(f"/proc/{pid}/exe")).name.startswith("qemu")
    except OSError:
        return False


def vm_trees(daemon_pid: int, table: dict[int, ProcStat]) -> dict[int, set[int]]:
    """Each QEMU process below the daemon, with the wrappers that hold only it (its jail).

    Under the jail QEMU is the daemon's grandchild (bwrap, bwrap, QEMU); unjailed it is a
    child. Walking up stops below the daemon and before a process that holds another QEMU.
    """
    below = descendants(daemon_pid, table)
    qemus = {pid for pid in below if is_qemu(pid)}
    trees = {}
    for qemu in qemus:
        top = qemu
        while (parent := table[top].ppid) != daemon_pid and parent in below:
            if len(descendants(parent, table) & qemus) > 1:
                break
            top = parent
        trees[qemu] = {top} | descendants(top, table)
    return trees


def tree_cpu(pids: set[int], table: dict[int, ProcStat]) -> float:
    """CPU-seconds used by ``pids`` and the children they reaped."""
    return sum(table[p].own_cpu + table[p].children_cpu for p in pids if p in table)


def threads_cpu(pids: set[int]) -> float:
    """CPU-seconds of the live threads of ``pids``, to the ns (``/proc/PID/task/*/schedstat``).

    Finer than ``tree_cpu``'s clock ticks (10 ms), for the small deltas of idle VMs; it does
    not see exited threads or children.
    """
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
    return total / 1e9


class TreeSampler:
    """CPU-seconds used by a process and everything below it while the sampler runs.

    Reaped children are not enough: a VM's jail is killed all at once (``cgroup.kill``), so its
    bwrap dies before reaping QEMU and the VM's CPU never reaches the daemon's ``cutime``. So a
    thread samples the tree every ``interval`` seconds (walking ``/proc/PID/task/*/children``,
    cheaper than a scan of /proc) and sums what each process used itself since it was first seen
    (its whole life when born meanwhile). Missed: what a process uses in its last ``interval``,
    and processes that live less than one.
    """

    def __init__(self, root: int, interval: float = 0.05) -> None:
        self.root = root
        self.interval = interval
        self._first: dict[tuple[int, int], float] = {}  # (pid, start time) -> CPU at first sight
        self._last: dict[tuple[int, int], float] = {}
        self._stop = threading.Event()
        self._sample(born_before=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample(born_before=False)

    def _sample(self, born_before: bool) -> None:
        todo = [self.root]
        while todo:
            pid = todo.pop()
            found = _cpu_and_start(pid)
            if found is None:
                continue
            cpu, key = found[0], (pid, found[1])
            self._first.setdefault(key, cpu if born_before else 0.0)
            self._last[key] = cpu
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    with contextlib.suppress(OSError):
                        todo += [
                            int(c)
                            for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                        ]

    def stop(self) -> float:
        """Stop sampling (after one last sample); the CPU-seconds used since the start."""
        self._stop.set()
        self._thread.join(timeout=10)
        self._sample(born_before=False)
        return sum(self._last[key] - self._first[key] for key in self._last)


def _cpu_and_start(pid: int) -> tuple[float, int] | None:
    """A process's own CPU-seconds (all its threads) and its start time, or None when gone.

    Reaped children's time is left out: the children are sampled themselves.
    """
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, int(fields[19])


def pss_mib(pid: int) -> dict[str, float]:
    """PSS of one process in MiB from ``/proc/PID/smaps_rollup``: Pss, Pss_Anon, Pss_File."""
    sizes = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Pss", "Pss_Anon", "Pss_File"):
            sizes[name] = int(rest.split()[0]) / 1024
    return sizes


def memory_used_mib() -> float:
    """Host memory in use: MemTotal minus MemAvailable, in MiB."""
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        info[name] = int(rest.split()[0])
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


def memory_available_mib() -> float:
    """Host memory available (MemAvailable), in MiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- a daemon of the bench's own ---------------------------------------------------------------
READY_DEADLINE = 240.0  # seconds for a daemon to fill its pools under TCG on a busy host
STOP_DEADLINE = 60.0  # seconds a daemon gets after SIGTERM to destroy its VMs


class Daemon:
    """A ``fission serve`` this bench started, with its own socket, state, runtime and data dirs.

    Talks to it only through its HTTP API on the socket; ``stop`` ends it by its pid (SIGTERM,
    then SIGKILL with a message) and is safe twice.
    """

    def __init__(self, workdir: Path, flags: list[str]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.socket = workdir / "fission.sock"
        self.env = os.environ | {
            "FISSION_RUNTIME_DIR": str(workdir / "run"),
            "FISSION_DATA_DIR": str(workdir / "data"),  # its audit database, not the user's
        }
        argv = [fission_cli(), "serve", "--socket", str(self.socket)]
        argv += ["--state-dir", str(workdir / "state"), *flags]
        self._log = (workdir / "daemon.log").open("wb")
        self.process = subprocess.Popen(
            argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.pid = self.process.pid
        self.http = self.client(timeout=30.0)

    def client(self, timeout: float = 120.0) -> httpx.Client:
        """A new HTTP client on the daemon's socket."""
        transport = httpx.HTTPTransport(uds=str(self.socket))
        return httpx.Client(transport=transport, base_url="http://fission", timeout=timeout)

    def python_pool(self) -> dict[str, Any]:
        """The python pool's status from ``GET /v1/pools``."""
        response = self.http.get("/v1/pools")
        response.raise_for_status()
        return next(p for p in response.json()["pools"] if p["language"] == "python")

    def wait_pool_full(self, deadline: float = READY_DEADLINE) -> None:
        """Block until the python pool holds all its VMs (the daemon may still be starting)."""
        give_up = time.monotonic() + deadline
        while time.monotonic() < give_up:
            if self.process.poll() is not None:
                raise SystemExit(
                    f"bench: the daemon exited {self.process.returncode}: {self.tail()}"
                )
            try:
                pool = self.python_pool()
            except (httpx.HTTPError, OSError):  # not listening yet
                time.sleep(0.1)
                continue
            if pool["ready"] >= pool["size"]:
                return
            time.sleep(0.02)
        raise SystemExit(f"bench: the python pool was not full within {deadline:.0f} s")

    def tail(self) -> str:
        """The last lines of the daemon's log."""
        return "\n".join(
            (self.workdir / "daemon.log").read_text(errors="replace").splitlines()[-8:]
        )

    def stop(self) -> None:
        """SIGTERM the daemon, wait for it to destroy its VMs, SIGKILL it past the deadline."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                print(
                    f"bench: the daemon (pid {self.pid}) was still running {STOP_DEADLINE:.0f} s "
                    "after SIGTERM: sending SIGKILL",
                    file=sys.stderr,
                )
                self.process.kill()
                self.process.wait(timeout=10)
        self.http.close()
        self._log.close()
        for pid in processes_naming(str(self.workdir)):  # its jail should have taken them
            print(f"bench: QEMU pid {pid} outlived its daemon: sending SIGKILL", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def processes_naming(marker: str) -> list[int]:
    """QEMU processes whose command line contains ``marker``."""
    found = []
    for pid in process_table():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in argv and is_qemu(pid):
            found.append(pid)
    return found


# -- tables with targets ---------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """A target on one statistic of a row: ``p50``, ``p99`` or ``min``; ``at_most`` or not."""

    stat: str
    limit: float
    text: str  # where the limit comes from, e.g. "1.5x host python3 -c"
    at_most: bool = True

    def met(self, samples: list[float]) -> bool:
        """True when the statistic of ``samples`` is on the right side of the limit."""
        value = STATS[self.stat](samples)
        return value <= self.limit if self.at_most else value >= self.limit

    def describe(self) -> str:
        """The target in words, e.g. ``p50 <= 150 (the issue's)``."""
        sign = "<=" if self.at_most else ">="
        return f"{self.stat} {sign} {number(self.limit)} ({self.text})"


STATS: dict[str, Callable[[list[float]], float]] = {
    "p50": statistics.median,
    "p99": lambda samples: percentile(samples, 0.99),
    "min": min,
    "max": max,
}


@dataclass(frozen=True)
class TargetRow:
    """A measurement (samples in the unit its name gives) and the targets it must meet."""

    name: str
    samples: list[float]
    checks: tuple[Check, ...] = ()


def number(value: float) -> str:
    """A figure with as many decimals as it needs: 416.2, 11.7, 0.982."""
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.3f}"


def target_cells(row: TargetRow) -> list[str]:
    """name, n, p50, p99, min, max, target, met/missed of one row."""
    samples = row.samples
    if not samples:
        return [row.name, "0", *["-"] * 4, "; ".join(c.describe() for c in row.checks), "n/a"]
    stats = [number(STATS[stat](samples)) for stat in ("p50", "p99", "min", "max")]
    target = "; ".join(check.describe() for check in row.checks) or "-"
    missed = [check.stat for check in row.checks if not check.met(samples)]
    verdict = "-" if not row.checks else ("met" if not missed else f"missed ({', '.join(missed)})")
    return [row.name, str(len(samples)), *stats, target, verdict]


TARGET_COLUMNS = ("measurement", "n", "p50", "p99", "min", "max", "target", "met")


def target_table(rows: list[TargetRow]) -> list[str]:
    """``rows`` as the lines of a markdown table with target and met/missed columns."""
    lines = ["| " + " | ".join(TARGET_COLUMNS) + " |", "|---|" + "---:|" * 5 + "---|---|"]
    return lines + ["| " + " | ".join(target_cells(row)) + " |" for row in rows]
