"""The daemon under sustained overload: 50 clients with mixed programs for two minutes.

Starts its own ``fission serve`` (``--pool python=4`` unless told otherwise) in a fresh runtime
and state dir, then ``--clients`` threads (default 50), each with its own ``DaemonBackend``, run
back to back for ``--seconds`` (default 120), each picking a program at random:

* 60% ``print(42)``;
* 20% numpy and pandas arithmetic (a few hundred ms of guest CPU under TCG);
* 10% a busy loop that must hit its 2 s timeout;
* 10% a bash command (served by an unpooled clone unless ``--pool bash=N``).

Every answer is counted by kind: ``ok`` (the expected output), ``timeout`` (the run timed
out: expected of the busy loop), ``busy`` (a clean 429 ``Busy``: no VM free within the
daemon's ``--acquire-timeout``), ``wrong`` (a result, but not the expected one) and errors
(any other exception, by type). Reports the
latency of ok runs per kind, the daemon's RSS at the start, its peak during the load and 30 s
after the load ended, and how many QEMU processes remain (must be the pools' size). Prints
tables and appends them to docs/benchmarks.md (``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench_warm import stop_daemon
from benchlib import Row, append_section, fission_cli, host_line, markdown_table, print_table
from rich.console import Console
from rich.table import Table

from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.spec import RunResult, RunSpec
from fission.errors import Busy
from fission.sdk._backend import DaemonBackend
from fission.vmm.base import default_driver

READY_DEADLINE = 240.0
SETTLE_SECONDS = 30.0
NUMPY = (
    "import numpy as np, pandas as pd\n"
    "rng = np.random.default_rng()\n"
    "df = pd.DataFrame(rng.random((100_000, 4)), columns=list('abcd'))\n"
    "df['k'] = (df.a * 20).astype(int)\n"
    "summary = df.groupby('k').agg({'b': 'mean', 'c': 'sum', 'd': 'max'})\n"
    "m = rng.random((200, 200))\n"
    "print(len(summary), round(float(np.linalg.det(m @ m.T + np.eye(200)) > 0)))\n"
)


@dataclass(frozen=True)
class Workload:
    """One kind of program: its share of the runs, its spec, and what an ok answer prints."""

    name: str
    weight: float
    spec: RunSpec
    expect: bytes | None  # None: any output with exit code 0
    expect_timeout: bool = False


def workloads() -> list[Workload]:
    """The mix: 60% print, 20% numpy/pandas, 10% busy loop with a 2 s timeout, 10% bash."""
    python, bash = resolve_language("python"), resolve_language("bash")
    return [
        Workload("print(42)", 0.6, RunSpec(python, "print(42)", Limits()), b"42\n"),
        Workload("numpy/pandas", 0.2, RunSpec(python, NUMPY, Limits()), b"20 1\n"),
        Workload(
            "busy loop, 2 s timeout",
            0.1,
            RunSpec(python, "while True:\n    pass\n", Limits(timeout=2.0)),
            None,
            expect_timeout=True,
        ),
        Workload("bash", 0.1, RunSpec(bash, "echo hi; ls / | wc -l >/dev/null", Limits()), b"hi\n"),
    ]


@dataclass
class Tally:
    """Outcomes by workload and kind, latencies of ok runs, guest durations."""

    outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    latency_ms: dict[str, list[float]] = field(default_factory=dict)
    duration_ms: dict[str, list[float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, work: Workload, kind: str, latency: float, result: RunResult | None) -> None:
        with self.lock:
            self.outcomes.setdefault(work.name, Counter())[kind] += 1
            if kind == "ok":
                self.latency_ms.setdefault(work.name, []).append(latency)
            if result is not None and kind in ("ok", "timeout"):
                self.duration_ms.setdefault(work.name, []).append(result.duration_ms)


def classify(work: Workload, result: RunResult) -> str:
    """ok, timeout or wrong for a result of ``work``."""
    if result.timed_out:
        return "timeout"
    if work.expect_timeout or result.exit_code != 0:
        return "wrong"
    return "ok" if work.expect is None or result.stdout == work.expect else "wrong"


def client_loop(socket: Path, mix: list[Workload], stop_at: float, tally: Tally, seed: int) -> None:
    """One client: pick a workload, run it, count the answer, until ``stop_at``."""
    pick = random.Random(seed)
    weights = [w.weight for w in mix]
    with DaemonBackend.connect(socket, request_timeout=120) as client:
        while time.monotonic() < stop_at:
            work = pick.choices(mix, weights)[0]
            started = time.perf_counter()
            result: RunResult | None = None
            try:
                result = client.run(work.spec)
                kind = classify(work, result)
            except Busy:
                kind = "busy"
            except Exception as exc:  # counted by type: the point is to see them
                kind = f"error: {type(exc).__name__}"
            elapsed = (time.perf_counter() - started) * 1000
            tally.add(work, kind, elapsed, result)


def rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` in MB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def vmm_count(marker: Path) -> int:
    """QEMU processes (argv[0] is QEMU, not the bwrap around it) whose command line names
    ``marker``."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if Path(argv[0].decode(errors="replace")).name.startswith("qemu") and (
            str(marker).encode() in b"\0".join(argv)
        ):
            count += 1
    return count


def start_daemon(workdir: Path, pools: dict[str, int]) -> tuple[subprocess.Popen[bytes], Path]:
    """``fission serve`` with ``pools`` in ``workdir`` (default budget and acquire timeout)."""
    socket = workdir / "fission.sock"
    env = os.environ | {"FISSION_RUNTIME_DIR": str(workdir / "run")}
    argv = [fission_cli(), "serve", "--socket", str(socket), "--state-dir", str(workdir / "state")]
    for language, size in pools.items():
        argv += ["--pool", f"{language}={size}"]
    log = (workdir / "daemon.log").open("wb")
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT), socket


def wait_pools_full(client: DaemonBackend, deadline: float = READY_DEADLINE) -> None:
    """Block until every pool holds all its VMs."""
    give_up = time.monotonic() + deadline
    while time.monotonic() < give_up:
        try:
            pools = client.pools()["pools"]
        except Exception:  # not listening yet
            time.sleep(0.2)
            continue
        if all(p["ready"] >= p["size"] for p in pools):
            return
        time.sleep(0.2)
    raise SystemExit(f"bench: the pools were not full within {deadline:.0f} s")


class RssSampler:
    """Samples a process's RSS every half second; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, rss_mb(self.pid))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class Outcome:
    """What one load run measured."""

    tally: Tally
    elapsed_s: float
    rss_start: float
    rss_peak: float
    rss_after: float
    vmms_after: int
    pool_total: int


def load(args: argparse.Namespace, pools: dict[str, int]) -> Outcome:
    """Start a daemon, load it, let it settle, measure, stop it."""
    with tempfile.TemporaryDirectory(prefix="fission-load-") as tmp:
        daemon, socket = start_daemon(Path(tmp), pools)
        try:
            with DaemonBackend.connect(socket, request_timeout=120) as client:
                wait_pools_full(client)
            time.sleep(2)
            rss_start = rss_mb(daemon.pid)
            sampler = RssSampler(daemon.pid)
            tally = Tally()
            mix = workloads()
            began = time.monotonic()
            stop_at = began + args.seconds
            threads = [
                threading.Thread(target=client_loop, args=(socket, mix, stop_at, tally, i))
                for i in range(args.clients)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=args.seconds + 180)
                if thread.is_alive():
                    raise SystemExit("bench: a client hung past its deadline")
            elapsed = time.monotonic() - began
            time.sleep(SETTLE_SECONDS)
            sampler.stop()
            rss_after = rss_mb(daemon.pid)
            vmms = vmm_count(Path(tmp) / "state")
        finally:
            stop_daemon(daemon)
    return Outcome(tally, elapsed, rss_start, sampler.peak, rss_after, vmms, sum(pools.values()))


def count_table(tally: Tally) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the outcome counts per workload, with a total row."""
    kinds = ["ok", "timeout", "busy", "wrong"]
    extra = sorted({k for c in tally.outcomes.values() for k in c} - set(kinds))
    columns = ["workload", *kinds, *extra, "total"]
    rows = []
    total: Counter[str] = Counter()
    for name, counts in tally.outcomes.items():
        total.update(counts)
        rows.append([name, *(str(counts[k]) for k in kinds + extra), str(sum(counts.values()))])
    rows.append(["all", *(str(total[k]) for k in kinds + extra), str(sum(total.values()))])
    return columns, rows


def main() -> None:
    """Parse flags, run the load, print and record it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=120.0, help="length of the load")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients")
    parser.add_argument(
        "--pool", action="append", default=[], help="LANG=N, repeatable (default python=4)"
    )
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()
    pools: dict[str, int] = {}
    for item in args.pool or ["python=4"]:
        language, _, size = item.partition("=")
        if not size.isdigit() or int(size) < 1:
            parser.error(f"--pool {item}: use LANG=N with N at least 1")
        pools[language] = int(size)
    if args.seconds <= 0 or args.clients < 1:
        parser.error("--seconds must be positive and --clients at least 1")
    accel = asyncio.run(default_driver().host()).accel
    out = load(args, pools)
    tally = out.tally
    columns, rows = count_table(tally)
    table = Table(title=f"outcomes, {args.clients} clients for {out.elapsed_s:.0f} s ({accel})")
    for column in columns:
        table.add_column(column, justify="left" if column == "workload" else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    every_ok = [ms for samples in tally.latency_ms.values() for ms in samples]
    latency: list[Row] = [("ok runs, all kinds", every_ok)] if every_ok else []
    latency += [(f"ok: {name}", ms) for name, ms in tally.latency_ms.items() if ms]
    duration: list[Row] = [(f"in guest: {n}", ms) for n, ms in tally.duration_ms.items() if ms]
    print_table("latency of ok runs, request to result (ms)", latency)
    print_table("program run time inside the guest (ms)", duration)
    pool_text = ", ".join(f"{k}={v}" for k, v in pools.items())
    answered = sum(sum(c.values()) for c in tally.outcomes.values())
    facts = [
        f"- {answered} answers in {out.elapsed_s:.0f} s ({answered / out.elapsed_s:.2f}/s); "
        f"ok runs {len(every_ok)} ({len(every_ok) / out.elapsed_s:.2f}/s)",
        f"- daemon RSS: **{out.rss_start:.1f} MB** at the start, peak {out.rss_peak:.1f} MB "
        f"under load, **{out.rss_after:.1f} MB** {SETTLE_SECONDS:.0f} s after the load ended",
        f"- QEMU processes {SETTLE_SECONDS:.0f} s after the load: **{out.vmms_after}** "
        f"(pool size {out.pool_total})",
    ]
    print("\n".join(facts))
    if not args.no_write:
        heading = f"Load ({accel}, {args.clients} clients, {args.seconds:.0f} s, pool {pool_text})"
        lines = [
            host_line(accel),
            "Mix: 60% `print(42)`, 20% numpy/pandas, 10% busy loop "
            "with a 2 s timeout (counted under timeout, as expected), 10% bash.",
            "",
        ]
        lines += ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines += ["", *markdown_table(latency), "", *markdown_table(duration), "", *facts]
        append_section(heading, lines)


if __name__ == "__main__":
    main()
