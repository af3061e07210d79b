"""Every figure issue 16 ("Speed") asks for, side by side in one run, through public doors only.

It measures what a user has: the ``fission`` CLI, the SDK (``fission.run``, ``fission.Sandbox``),
the HTTP API of a ``fission serve`` it starts itself (own socket, state, runtime and data dirs;
the default pool and budget), and /proc. So it runs unchanged before and after the work on
speed, and against an older checkout (``PYTHONPATH=/that/checkout``: the daemon and the CLI it
starts inherit it). Phases, in this order (``--only a,b`` runs some; the host baselines are
always measured, since targets are stated against them):

* ``host``: ``python3 -c "print(42)"``, Debian's ``/usr/bin/python3`` and this venv's, timed by
  hyperfine when installed (else a loop); the faster p50 is "host" in every table.
* ``idle``: CPU % of a core per idle pooled VM over ``--idle-seconds`` (CPU-time delta of its
  QEMU process tree: under the jail QEMU is the daemon's grandchild), PSS of each idle QEMU
  (``/proc/PID/smaps_rollup``), beside an idle host ``python3``'s PSS.
* ``cpu``: CPU-seconds per fresh VM: ``--runs`` paced runs each use up a pooled VM; when the
  pool is full again, the new QEMU tree's utime+stime is its cost from spawn to pooled-and-warm.
  Plus the daemon's own CPU over those refills divided by the VMs made (it includes serving the
  runs), and everything the daemon and its VMs used per run (spawn to destroy).
* ``warm``: ``fission.run("print(42)")`` back to back, unpaced, then paced (pool full before
  each run).
* ``sdk``: ``fission.run`` against a bare ``POST /v1/run`` on a reused httpx client, paced,
  interleaved.
* ``cli``: ``fission run "print(42)"`` against the daemon (``FISSION_SOCKET``), paced; a cold
  embedded ``fission run --no-daemon``.
* ``sandbox``: ``Sandbox.create`` and delete; in one sandbox ``run`` (first run included),
  ``exec("echo 42")`` and a run in a context.
* ``throughput``: fresh VMs per second with ``--clients`` clients (bare POST) for ``--seconds``,
  with the CPU the daemon and its VMs used meanwhile.
* ``idle-sandboxes`` (only when named): its own daemon (large ``--memory-budget``: the host's
  memory is what limits, and creation stops while MemAvailable is under a floor); creates up
  to ``--sandboxes`` (150) or until refused; reports how many, host memory used, whether the
  first and last still answer; deletes them all.

Prints one markdown table per phase (host baseline row, target and met/missed columns) and
appends them to docs/benchmarks.md (``--no-write`` to skip). Timings are reported, not asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from benchlib import (
    Check,
    Daemon,
    HostTiming,
    TargetRow,
    TreeSampler,
    append_section,
    descendants,
    fission_cli,
    host_line,
    memory_available_mib,
    memory_used_mib,
    process_table,
    pss_mib,
    target_table,
    threads_cpu,
    time_command,
    time_host_command,
    tree_cpu,
    vm_trees,
)

import fission
from fission.errors import FissionError

CODE = "print(42)"
DEBIAN_PYTHON = "/usr/bin/python3"
IDLE_SETTLE = 3.0  # seconds after the pool is full before idle VMs are measured
SANDBOX_BUDGET_MB = 2048  # --memory-budget per sandbox in idle-sandboxes: accounting, not use
MEMORY_FLOOR_MIB = 2048  # idle-sandboxes stops creating below this much MemAvailable


@dataclass
class Section:
    """One phase's table and the lines under it."""

    title: str
    rows: list[TargetRow]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> list[str]:
        """The section as markdown lines."""
        return [f"**{self.title}**", "", *target_table(self.rows), "", *self.notes]


@dataclass(frozen=True)
class Host:
    """The host baselines: each python's timing, and the fastest one's name and p50 (ms)."""

    timings: dict[str, HostTiming]
    name: str
    p50: float

    def row(self) -> TargetRow:
        """The fastest host ``python3 -c`` as a table row."""
        return TargetRow(f"host: {self.name} (ms)", self.timings[self.name].samples)

    def times(self, factor: float, stat: str = "p50") -> Check:
        """A target of ``factor`` times the host's p50."""
        return Check(stat, factor * self.p50, f"{factor:g}x host")


@dataclass
class Bench:
    """What the phases share: flags, a scratch dir, the host baselines, the daemon (lazily)."""

    args: argparse.Namespace
    workdir: Path
    host: Host
    accel: str = "unknown"
    _daemon: Daemon | None = None

    def daemon(self) -> Daemon:
        """The shared daemon (default pool and budget), started on first use."""
        if self._daemon is None:
            self._daemon = Daemon(self.workdir / "daemon", [])
            self._daemon.wait_pool_full()
            os.environ["FISSION_SOCKET"] = str(self._daemon.socket)  # what fission.run finds
            self.accel = accel_of(self._daemon.pid) or self.accel
        return self._daemon

    def client_env(self) -> dict[str, str]:
        """Environment of a ``fission`` subprocess that finds the shared daemon."""
        daemon = self.daemon()
        return daemon.env | {"FISSION_SOCKET": str(daemon.socket)}

    def stop_daemon(self) -> None:
        """Stop the shared daemon, if it runs."""
        if self._daemon is not None:
            self._daemon.stop()
            self._daemon = None
            os.environ.pop("FISSION_SOCKET", None)


class DaemonBusy(Exception):
    """The daemon answered 429: no VM free within its acquire timeout."""


def raw_run(client: httpx.Client) -> None:
    """``POST /v1/run`` of ``print(42)`` on a bare HTTP client; raises unless it printed 42."""
    body = {"language": "python", "code": CODE}
    stdout = b""
    headers = {"Accept": "application/x-ndjson"}
    with client.stream("POST", "/v1/run", json=body, headers=headers) as response:
        if response.status_code == 429:
            raise DaemonBusy(response.read().decode(errors="replace"))
        if response.status_code != 200:
            raise RuntimeError(f"POST /v1/run: {response.status_code} {response.read()[:200]!r}")
        for line in response.iter_lines():
            event = json.loads(line) if line.strip() else {}
            if event.get("type") == "output" and event.get("stream") == "stdout":
                stdout += str(event.get("data", "")).encode()
            elif event.get("type") == "error":
                raise RuntimeError(f"POST /v1/run: {event}")
            elif event.get("type") == "result":
                if event.get("exit_code") != 0 or stdout != b"42\n":
                    raise RuntimeError(f"POST /v1/run gave {stdout!r}, {event}")
                return
    raise RuntimeError("POST /v1/run: the stream ended without a result")


def timed(work: Callable[[], object], expect: bytes = b"42\n") -> float:
    """Milliseconds ``work`` took; its result's stdout (if it has one) must be ``expect``."""
    started = time.perf_counter()
    result = work()
    elapsed = (time.perf_counter() - started) * 1000
    stdout = getattr(result, "stdout", expect)
    if stdout != expect:
        raise RuntimeError(f"expected {expect!r}, got {result!r}")
    return elapsed


def accel_of(daemon_pid: int) -> str | None:
    """The accelerator on a pooled QEMU's command line (tcg, kvm), if one runs."""
    for qemu in vm_trees(daemon_pid, process_table()):
        argv = Path(f"/proc/{qemu}/cmdline").read_bytes().decode(errors="replace").split("\0")
        if "-accel" in argv:
            return argv[argv.index("-accel") + 1].split(",")[0]
    return None


# -- phases ---------------------------------------------------------------------------------------
def measure_host(runs: int) -> Host:
    """Time ``python3 -c`` for Debian's python and this venv's (without PYTHONPATH)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    timings = {
        f"Debian {DEBIAN_PYTHON} -c": time_host_command([DEBIAN_PYTHON, "-c", CODE], runs, env),
        "venv python -c": time_host_command([sys.executable, "-c", CODE], runs, env),
    }
    fastest = min(timings, key=lambda name: statistics.median(timings[name].samples))
    return Host(timings, fastest, statistics.median(timings[fastest].samples))


def phase_host(bench: Bench) -> Section:
    """The host baselines, with their CPU per run."""
    timings = bench.host.timings
    rows = [TargetRow(f"host: {name} (ms)", timing.samples) for name, timing in timings.items()]
    rows += [TargetRow(f"host: {name}, CPU-s per run", [t.cpu_s]) for name, t in timings.items()]
    method = next(iter(timings.values())).method
    notes = [
        f"- timed with {method}; the fastest p50 is the baseline of every table: {bench.host.name}"
    ]
    return Section('Host baselines: python3 -c "print(42)"', rows, notes)


def phase_idle(bench: Bench) -> Section:
    """CPU % per idle pooled VM over ``--idle-seconds`` and PSS per idle pooled VM."""
    daemon = bench.daemon()
    daemon.wait_pool_full()
    time.sleep(IDLE_SETTLE)
    trees = vm_trees(daemon.pid, process_table())
    everyone = {daemon.pid: {daemon.pid}, **trees}
    before = {pid: threads_cpu(tree) for pid, tree in everyone.items()}
    started = time.monotonic()
    time.sleep(bench.args.idle_seconds)
    after = {pid: threads_cpu(tree) for pid, tree in everyone.items()}
    elapsed = time.monotonic() - started
    alive = set(process_table())
    percent = {pid: (after[pid] - before[pid]) / elapsed * 100 for pid in everyone if pid in alive}
    daemon_percent = percent.pop(daemon.pid, 0.0)
    pss = [pss_mib(qemu) for qemu in percent]
    rows = [
        bench.host.row(),
        TargetRow("host: idle python3 waiting for input, PSS (MiB)", [idle_python_pss()]),
        TargetRow(
            f"CPU % of a core per idle pooled VM, {elapsed:.0f} s",
            list(percent.values()),
            (Check("max", 0.5, "issue 16"),),
        ),
        TargetRow("CPU % of a core, the daemon itself while idle", [daemon_percent]),
        TargetRow(
            "PSS per idle pooled VM, QEMU process (MiB)",
            [sizes["Pss"] for sizes in pss],
            (Check("p50", 48.0, "issue 16"),),
        ),
    ]
    notes = []
    if pss:
        anon = statistics.median(sizes.get("Pss_Anon", 0.0) for sizes in pss)
        file = statistics.median(sizes.get("Pss_File", 0.0) for sizes in pss)
        notes.append(f"- PSS p50 by kind: anonymous {anon:.1f} MiB, file-backed {file:.1f} MiB")
    return Section(f"Idle pooled VMs ({len(trees)} in the default pool)", rows, notes)


def idle_python_pss() -> float:
    """PSS in MiB of a host python3 that has started and waits for input."""
    waiting = "import sys; print(1, flush=True); sys.stdin.read()"
    proc = subprocess.Popen(
        [DEBIAN_PYTHON, "-c", waiting], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # it is up and waiting
        return pss_mib(proc.pid)["Pss"]
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


def phase_cpu(bench: Bench) -> Section:
    """CPU-seconds per fresh VM, spawn to pooled-and-warm, and the daemon's share."""
    daemon = bench.daemon()
    daemon.wait_pool_full()
    table = process_table()
    known = set(vm_trees(daemon.pid, table))
    daemon_before, sampler = table[daemon.pid].own_cpu, TreeSampler(daemon.pid)
    per_vm: list[float] = []
    with daemon.client() as client:
        for _ in range(bench.args.runs):
            raw_run(client)
            daemon.wait_pool_full()
            table = process_table()  # read as soon as the new VM is pooled and warm
            trees = vm_trees(daemon.pid, table)
            per_vm += [tree_cpu(trees[qemu], table) for qemu in trees.keys() - known]
            known = set(trees)
    table = process_table()
    share = (table[daemon.pid].own_cpu - daemon_before) / max(1, len(per_vm))
    per_run = sampler.stop() / bench.args.runs
    total = [statistics.median(per_vm) + share] if per_vm else []
    rows = [
        TargetRow(
            f"host: {bench.host.name}, CPU-s per run", [bench.host.timings[bench.host.name].cpu_s]
        ),
        TargetRow("CPU-s per fresh VM: QEMU tree, spawn to pooled-and-warm", per_vm),
        TargetRow("CPU-s per fresh VM: the daemon's own CPU / VMs made", [share]),
        TargetRow(
            "CPU-s per fresh VM: QEMU p50 + daemon share", total, (Check("p50", 0.25, "issue 16"),)
        ),
        TargetRow("CPU-s per run, daemon + VMs, spawn to destroy", [per_run]),
    ]
    notes = [
        f"- {bench.args.runs} paced runs (bare POST /v1/run), each followed by a wait for the "
        f"refill; {len(per_vm)} fresh VMs seen. The daemon's share includes serving the runs."
    ]
    return Section("CPU-seconds per fresh VM (default pool, paced refills)", rows, notes)


def phase_warm(bench: Bench) -> Section:
    """``fission.run`` back to back (unpaced), then with the pool full before each run."""
    daemon = bench.daemon()
    daemon.wait_pool_full()
    unpaced = [timed(lambda: fission.run(CODE)) for _ in range(bench.args.runs)]
    paced = []
    for _ in range(bench.args.runs):
        daemon.wait_pool_full()
        paced.append(timed(lambda: fission.run(CODE)))
    host = bench.host
    rows = [
        host.row(),
        TargetRow(
            "fission.run, unpaced, back to back (ms)", unpaced, (Check("p50", 150.0, "issue 16"),)
        ),
        TargetRow("fission.run, paced (ms)", paced, (host.times(1), host.times(2, "p99"))),
    ]
    return Section("Warm one-shot runs through the SDK against the daemon (default pool)", rows)


def phase_sdk(bench: Bench) -> Section:
    """``fission.run`` against a bare POST on a reused client, paced and interleaved."""
    daemon = bench.daemon()
    sdk: list[float] = []
    raw: list[float] = []
    with daemon.client() as client:
        for _ in range(bench.args.runs):
            daemon.wait_pool_full()
            sdk.append(timed(lambda: fission.run(CODE)))
            daemon.wait_pool_full()
            raw.append(timed(lambda: raw_run(client)))
    difference = [statistics.median(sdk) - statistics.median(raw)]
    rows = [
        bench.host.row(),
        TargetRow("fission.run, paced (ms)", sdk),
        TargetRow("bare POST /v1/run, reused httpx client, paced (ms)", raw),
        TargetRow(
            "fission.run minus bare POST, p50 (ms)", difference, (Check("p50", 10.0, "issue 16"),)
        ),
    ]
    return Section("The SDK's one-shot run against the raw daemon call", rows)


def phase_cli(bench: Bench) -> Section:
    """``fission run`` against the daemon (paced) and embedded (``--no-daemon``)."""
    daemon = bench.daemon()
    env = bench.client_env()
    warm: list[float] = []
    for _ in range(bench.args.runs):
        daemon.wait_pool_full()
        warm += asyncio.run(time_command([fission_cli(), "run", CODE], 1, env))
    cold_env = env | {"FISSION_RUNTIME_DIR": str(bench.workdir / "embedded")}
    cold_env.pop("FISSION_SOCKET")
    cold_argv = [fission_cli(), "run", "--no-daemon", CODE]
    cold = asyncio.run(time_command(cold_argv, bench.args.runs, cold_env))
    rows = [
        bench.host.row(),
        TargetRow('fission run "print(42)" -> daemon, paced (ms)', warm, (bench.host.times(2.5),)),
        TargetRow(
            "fission run --no-daemon, cold embedded (ms)", cold, (Check("p50", 400.0, "issue 16"),)
        ),
    ]
    return Section("The CLI, spawn to exit", rows)


def phase_sandbox(bench: Bench) -> Section:
    """Sandbox create and delete; run, exec and a context run in one sandbox."""
    daemon = bench.daemon()
    runs = bench.args.runs
    creates: list[float] = []
    deletes: list[float] = []
    for _ in range(runs):
        daemon.wait_pool_full()
        started = time.perf_counter()
        box = fission.Sandbox.create("python", ttl=600)
        creates.append((time.perf_counter() - started) * 1000)
        try:
            deletes.append(timed(box.delete))
        finally:
            box.close()
    daemon.wait_pool_full()
    box = fission.Sandbox.create("python", ttl=600)
    try:
        run = [timed(lambda: box.run(CODE)) for _ in range(runs)]
        execs = [timed(lambda: box.exec("echo 42")) for _ in range(runs)]
        context = [timed(lambda: box.run(CODE, context="bench")) for _ in range(runs)]
    finally:
        with contextlib.suppress(FissionError):
            box.delete()
        box.close()
    host = bench.host
    rows = [
        host.row(),
        TargetRow("Sandbox.create (ms)", creates, (Check("p50", 120.0, "issue 16"),)),
        TargetRow("Sandbox.delete (ms)", deletes),
        TargetRow(
            "run print(42), first run included (ms)", run, (host.times(1.5), host.times(3, "p99"))
        ),
        TargetRow("run print(42), the first run alone (ms)", run[:1]),
        TargetRow('exec("echo 42") (ms)', execs, (Check("p50", 30.0, "issue 16"),)),
        TargetRow('run print(42), context="bench", first included (ms)', context),
        TargetRow("run in a context, the first alone (ms)", context[:1]),
    ]
    return Section("A persistent sandbox through the SDK and the daemon", rows)


def phase_throughput(bench: Bench) -> Section:
    """Fresh VMs per second with ``--clients`` clients for ``--seconds``, and their CPU."""
    daemon = bench.daemon()
    clients, seconds = bench.args.clients, bench.args.seconds
    daemon.wait_pool_full()
    done: list[tuple[float, float]] = []  # (finished at, latency ms) of each good run
    failures: Counter[str] = Counter()
    lock = threading.Lock()
    started = time.monotonic()
    stop_at = started + seconds

    def client_loop() -> None:
        with daemon.client() as client:
            while time.monotonic() < stop_at:
                began = time.perf_counter()
                try:
                    raw_run(client)
                except DaemonBusy:
                    with lock:
                        failures["busy (429)"] += 1
                    continue
                except Exception as exc:  # counted by type: the point is to see them
                    with lock:
                        failures[type(exc).__name__] += 1
                    continue
                with lock:
                    done.append((time.monotonic(), (time.perf_counter() - began) * 1000))

    sampler = TreeSampler(daemon.pid)
    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, stop_at - time.monotonic()))
    cpu = sampler.stop()
    for thread in threads:
        thread.join(timeout=180)
        if thread.is_alive():
            raise RuntimeError("a client is still waiting 180 s after the load ended")
    finished = [(at, ms) for at, ms in done if at <= stop_at]
    per_second = Counter(int(at - started) for at, _ in finished)
    rows = [
        bench.host.row(),
        TargetRow(
            f"fresh VMs/s sustained, {clients} clients, {seconds:.0f} s",
            [len(finished) / seconds],
            (Check("p50", 6.0, "issue 16", at_most=False),),
        ),
        TargetRow(
            "good results in each second", [float(per_second[s]) for s in range(int(seconds))]
        ),
        TargetRow("run latency under load (ms)", [ms for _, ms in finished]),
        TargetRow("CPU cores busy, daemon + VMs", [cpu / seconds]),
        TargetRow("CPU-s per fresh VM under load, daemon + VMs", [cpu / max(1, len(finished))]),
    ]
    failed = ", ".join(f"{kind}: {count}" for kind, count in failures.items()) or "none"
    notes = [f"- {len(finished)} good runs in the window; failures: {failed}"]
    return Section(f"Fresh VMs per second, {clients} clients (bare POST /v1/run)", rows, notes)


def phase_idle_sandboxes(bench: Bench) -> Section:
    """Create sandboxes until ``--sandboxes`` or refused; count, memory, do they answer."""
    bench.stop_daemon()  # its pool would count in the host's memory
    wanted = bench.args.sandboxes
    budget = wanted * SANDBOX_BUDGET_MB + 4096
    daemon = Daemon(bench.workdir / "sandboxes", ["--memory-budget", str(budget)])
    url = f"unix:{daemon.socket}"
    boxes: list[fission.Sandbox] = []
    creates: list[float] = []
    try:
        daemon.wait_pool_full()
        bench.accel = accel_of(daemon.pid) or bench.accel
        time.sleep(IDLE_SETTLE)
        used_before = memory_used_mib()
        stopped = f"reached {wanted}"
        while len(boxes) < wanted:
            if memory_available_mib() < MEMORY_FLOOR_MIB:
                stopped = f"host MemAvailable under {MEMORY_FLOOR_MIB} MiB"
                break
            started = time.perf_counter()
            try:
                boxes.append(fission.Sandbox.create("python", ttl=3600, url=url))
            except FissionError as exc:
                stopped = f"refused: {type(exc).__name__}: {exc}"
                break
            creates.append((time.perf_counter() - started) * 1000)
        time.sleep(IDLE_SETTLE)
        tree = {daemon.pid} | descendants(daemon.pid, process_table())
        before, began = threads_cpu(tree), time.monotonic()
        time.sleep(bench.args.idle_seconds)
        idle_cpu = threads_cpu(tree) - before
        idle_percent = idle_cpu / (time.monotonic() - began) * 100 / max(1, len(boxes))
        used = memory_used_mib() - used_before
        answers = {
            name: answered(box) for name, box in (("first", boxes[:1]), ("last", boxes[-1:]))
        }
    finally:
        for box in boxes:
            with contextlib.suppress(Exception):  # the daemon's stop destroys what is left
                box.delete()
            box.close()
        daemon.stop()
    rows = [
        bench.host.row(),
        TargetRow(
            "idle sandboxes alive at once",
            [float(len(boxes))],
            (Check("p50", 150.0, "issue 16", at_most=False),),
        ),
        TargetRow("host memory used per idle sandbox (MiB)", [used / max(1, len(boxes))]),
        TargetRow("CPU % of a core per idle sandbox (daemon + VMs)", [idle_percent]),
        TargetRow("Sandbox.create while filling the host (ms)", creates),
    ]
    notes = [
        f"- stopped: {stopped}; host memory in use grew by {used:.0f} MiB",
        f"- a run still answers in the first sandbox: {answers['first']}; "
        f"in the last: {answers['last']}",
    ]
    return Section("Idle sandboxes on this host", rows, notes)


def answered(boxes: list[fission.Sandbox]) -> str:
    """Whether ``print(42)`` in the (only) sandbox of ``boxes`` prints 42, in words."""
    if not boxes:
        return "no sandbox"
    try:
        return f"yes ({timed(lambda: boxes[0].run(CODE)):.0f} ms)"
    except Exception as exc:  # the answer is the finding
        return f"no ({type(exc).__name__}: {exc})"


PHASES: dict[str, Callable[[Bench], Section]] = {
    "host": phase_host,
    "idle": phase_idle,
    "cpu": phase_cpu,
    "warm": phase_warm,
    "sdk": phase_sdk,
    "cli": phase_cli,
    "sandbox": phase_sandbox,
    "throughput": phase_throughput,
    "idle-sandboxes": phase_idle_sandboxes,
}
OPT_IN = {"idle-sandboxes"}


def run_phase(name: str, bench: Bench) -> Section:
    """Run one phase; a phase that fails is reported as such and the others go on."""
    started = time.monotonic()
    try:
        section = PHASES[name](bench)
    except Exception as exc:  # one broken door must not hide the other figures
        traceback.print_exc()
        section = Section(f"{name}: failed", [bench.host.row()], [f"- {type(exc).__name__}: {exc}"])
    section.notes.append(f"- phase `{name}` took {time.monotonic() - started:.0f} s")
    print("\n".join(["", *section.markdown()]), flush=True)
    return section


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", action="append", default=[], help="PHASE[,PHASE...], repeatable")
    parser.add_argument("--runs", type=int, default=30, help="runs of each kind (default 30)")
    parser.add_argument(
        "--seconds", type=float, default=30.0, help="length of the throughput phase"
    )
    parser.add_argument("--clients", type=int, default=8, help="clients in the throughput phase")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="window of idle CPU")
    parser.add_argument(
        "--sandboxes", type=int, default=150, help="idle-sandboxes: how many to try"
    )
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()
    args.phases = [p for item in args.only for p in item.split(",") if p]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        parser.error(
            f"unknown phase(s) {', '.join(sorted(unknown))}: choose from {', '.join(PHASES)}"
        )
    if args.runs < 2 or args.clients < 1 or args.seconds < 1 or args.sandboxes < 1:
        parser.error("--runs must be at least 2; --clients, --seconds and --sandboxes at least 1")
    return args


def checkout() -> str:
    """Which fission is measured: its directory and commit."""
    root = Path(fission.__file__).resolve().parent.parent
    found = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return f"{root} at {found.stdout.strip() or 'an unknown commit'}"


def main() -> None:
    """Measure the chosen phases, print their tables, record them."""
    args = parse_args()
    chosen = [
        name for name in PHASES if name in args.phases or (not args.phases and name not in OPT_IN)
    ]
    load_before = os.getloadavg()
    sections = []
    with tempfile.TemporaryDirectory(prefix="fission-speed-", ignore_cleanup_errors=True) as tmp:
        bench = Bench(args, Path(tmp), measure_host(args.runs))
        try:
            sections = [run_phase(name, bench) for name in chosen]
        finally:
            bench.stop_daemon()
    if Path(tmp).exists():
        print(f"bench: could not remove all of {tmp}: remove it by hand", file=sys.stderr)
    load_after = os.getloadavg()
    facts = [
        host_line(bench.accel),
        f"fission: {checkout()}; load average (1 min) {load_before[0]:.2f} at the start, "
        f"{load_after[0]:.2f} at the end; phases: {', '.join(chosen)}; --runs {args.runs}.",
        "",
    ]
    if not args.no_write:
        lines = facts + [line for section in sections for line in [*section.markdown(), ""]]
        append_section(f"Speed, issue 16's targets ({bench.accel}, --runs {args.runs})", lines)
    print("\n" + "\n".join(facts))


if __name__ == "__main__":
    main()
