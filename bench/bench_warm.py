"""Warm starts against the daemon, side by side with cold runs and host sandboxes.

In one sitting, over ``--runs`` runs each (default 50), of ``print(42)`` in Python:

(a) a warm one-shot run through the Python API (``DaemonBackend.run``) against a running daemon,
(b) the same through the ``fission`` CLI (it finds the daemon through ``FISSION_SOCKET``),
(c) a cold embedded ``fission run --no-daemon`` (restore a clone in-process, no daemon),
(d) host ``python3 -c``, (e) host ``bwrap`` + python3, (f) gVisor ``runsc do`` + python3 when
installed; then fresh VMs per second sustained by 8 concurrent clients, and the PSS of each idle
pooled VM's QEMU process (``/proc/PID/smaps_rollup``).

Warm runs (a) and (b) are paced: each starts when the pool is full again, which is what an
interactive agent sees from a pool sized for its load; the throughput phase measures the other
case, a pool drained as fast as it refills. Prints tables and appends them to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import (
    Row,
    append_section,
    descendants,
    fission_cli,
    host_line,
    is_qemu,
    markdown_table,
    print_table,
    process_table,
    time_command,
)

from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.spec import RunSpec
from fission.sdk._backend import DaemonBackend
from fission.vmm.base import default_driver

CODE = "print(42)"
READY_DEADLINE = 180.0


def start_daemon(workdir: Path, pool: int) -> tuple[subprocess.Popen[bytes], Path]:
    """Start ``fission serve`` with a python pool of ``pool`` VMs in ``workdir``."""
    socket = workdir / "fission.sock"
    env = os.environ | {"FISSION_RUNTIME_DIR": str(workdir / "run")}
    argv = [fission_cli(), "serve", "--pool", f"python={pool}", "--socket", str(socket)]
    argv += ["--state-dir", str(workdir / "state")]  # default memory budget: half the host RAM
    log = (workdir / "daemon.log").open("wb")
    daemon = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    return daemon, socket


def stop_daemon(daemon: subprocess.Popen[bytes]) -> None:
    """SIGTERM the daemon we started (by its pid) and wait for it to destroy its VMs."""
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=10)


def wait_pool_full(client: DaemonBackend, deadline: float = READY_DEADLINE) -> dict[str, int]:
    """Block until every pool has all its VMs ready; returns the python pool's status."""
    give_up = time.monotonic() + deadline
    while time.monotonic() < give_up:
        try:
            pools = client.pools()["pools"]
        except Exception:  # the daemon may not listen yet
            time.sleep(0.1)
            continue
        python = next(p for p in pools if p["language"] == "python")
        if python["ready"] >= python["size"]:
            return dict(python)
        if python["failed"] and python["last_error"]:
            raise SystemExit(f"bench: the pool cannot start VMs: {python['last_error']}")
        time.sleep(0.02)
    raise SystemExit(f"bench: the pool was not full within {deadline:.0f} s")


def warm_api_runs(client: DaemonBackend, runs: int) -> list[float]:
    """(a): ms from request to result of ``print(42)`` through the daemon, pool full each time."""
    spec = RunSpec(resolve_language("python"), CODE, Limits())
    samples = []
    for _ in range(runs):
        wait_pool_full(client)
        started = time.perf_counter()
        result = client.run(spec)
        samples.append((time.perf_counter() - started) * 1000)
        if result.stdout != b"42\n" or result.exit_code != 0:
            raise SystemExit(f"bench: daemon run gave {result}")
    return samples


def warm_cli_runs(client: DaemonBackend, socket: Path, runs: int) -> list[float]:
    """(b): ``fission run`` spawn to exit against the daemon, pool full each time."""
    env = os.environ | {"FISSION_SOCKET": str(socket)}
    samples = []
    for _ in range(runs):
        wait_pool_full(client)
        samples += asyncio.run(
            time_command([fission_cli(), "run", "--lang", "python", CODE], 1, env)
        )
    return samples


def throughput(socket: Path, clients: int, seconds: float) -> tuple[float, list[float], int]:
    """Fresh VMs per second with ``clients`` threads running back to back for ``seconds``."""
    spec = RunSpec(resolve_language("python"), CODE, Limits())
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker() -> None:
        with DaemonBackend.connect(socket, request_timeout=120) as client:
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    result = client.run(spec)
                    ok = result.stdout == b"42\n"
                except Exception:
                    ok = False
                with lock:
                    if ok:
                        latencies.append((time.perf_counter() - started) * 1000)
                    else:
                        failures[0] += 1

    began = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    return len(latencies) / elapsed, latencies, failures[0]


def vmm_pss_mib(daemon_pid: int) -> list[dict[str, float]]:
    """PSS in MiB of each QEMU process the daemon runs (anywhere under it: QEMU is a grandchild
    under the jail's bwrap), by kind of memory.

    ``total`` is the whole process; ``guest_ram`` the mapping of the snapshot's memory file
    (pages shared with the other clones count a share each); ``tcg_code`` the anonymous
    executable mapping where TCG keeps translated guest code (absent under KVM).
    """
    found = []
    for pid in sorted(descendants(daemon_pid, process_table())):
        try:
            if not is_qemu(pid):
                continue
            found.append(pss_by_kind(Path(f"/proc/{pid}/smaps").read_text()))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def pss_by_kind(smaps: str) -> dict[str, float]:
    """Sum the Pss lines of one ``/proc/PID/smaps`` text into total, guest_ram and tcg_code."""
    sizes = {"total": 0.0, "guest_ram": 0.0, "tcg_code": 0.0}
    kind = "total"
    for line in smaps.splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
            perms, path = fields[1], fields[5] if len(fields) > 5 else ""
            if path.endswith("/memory") and "/snapshots/" in path:
                kind = "guest_ram"
            elif perms == "rwxp" and not path:
                kind = "tcg_code"
            else:
                kind = "total"
        elif fields and fields[0] == "Pss:":
            mib = int(fields[1]) / 1024
            sizes["total"] += mib
            if kind != "total":
                sizes[kind] += mib
    return sizes


def pss_line(pss: list[dict[str, float]], pool: int) -> str:
    """One markdown line: median PSS per idle pooled VM and what it is made of."""
    if not pss:
        return "- PSS per idle pooled VM: no QEMU process found"

    def median(kind: str) -> float:
        return statistics.median(sizes[kind] for sizes in pss)

    rest = median("total") - median("guest_ram") - median("tcg_code")
    return (
        f"- PSS per idle pooled VM (QEMU process, pool of {pool}): median "
        f"**{median('total'):.1f} MiB**: guest RAM {median('guest_ram'):.1f} MiB, "
        f"TCG translated code {median('tcg_code'):.1f} MiB, QEMU itself {rest:.1f} MiB"
    )


def host_sandbox_rows(runs: int) -> tuple[list[Row], list[str]]:
    """(d), (e), (f): host python3, bwrap + python3, runsc do + python3 (where installed)."""
    python = shutil.which("python3") or sys.executable
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else python
    rows: list[Row] = [
        ("(d) host python3 -c", asyncio.run(time_command([python, "-c", CODE], runs)))
    ]
    skipped = []
    bwrap = shutil.which("bwrap")
    if bwrap:
        argv = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-all"]
        argv += ["--die-with-parent", "--new-session", python, "-c", CODE]
        rows.append(("(e) host bwrap + python3", asyncio.run(time_command(argv, runs))))
    else:
        skipped.append("(e) bwrap is not installed (apt-get install bubblewrap)")
    runsc = shutil.which("runsc")
    if runsc:
        argv = [runsc, "--platform=ptrace", "--network=none", "do", python, "-c", CODE]
        rows.append(("(f) gVisor runsc do + python3", asyncio.run(time_command(argv, runs))))
    else:
        skipped.append("(f) runsc is not installed (apt-get install runsc)")
    return rows, skipped


def main() -> None:
    """Parse flags, measure everything, print and record it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=50, help="runs of each kind (default 50)")
    parser.add_argument("--pool", type=int, default=4, help="python VMs in the daemon's pool")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the load phase")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()
    if args.runs < 2 or args.pool < 1 or args.clients < 1:
        parser.error("--runs must be at least 2, --pool and --clients at least 1")
    accel = asyncio.run(default_driver().host()).accel
    with tempfile.TemporaryDirectory(prefix="fission-bench-") as tmp:
        daemon, socket = start_daemon(Path(tmp), args.pool)
        try:
            with DaemonBackend.connect(socket, request_timeout=120) as client:
                wait_pool_full(client)
                time.sleep(2)  # let the last restores settle before measuring memory
                pss = vmm_pss_mib(daemon.pid)
                rows: list[Row] = [
                    ("(a) warm, Python API -> daemon", warm_api_runs(client, args.runs))
                ]
                rows.append(
                    ("(b) warm, fission CLI -> daemon", warm_cli_runs(client, socket, args.runs))
                )
                wait_pool_full(client)
                rate, latencies, failures = throughput(socket, args.clients, args.seconds)
        finally:
            stop_daemon(daemon)
    cold = [fission_cli(), "run", "--no-daemon", "--lang", "python", CODE]
    rows.append(("(c) cold embedded fission run", asyncio.run(time_command(cold, args.runs))))
    host_rows, skipped = host_sandbox_rows(args.runs)
    rows += host_rows
    rows.append((f"run latency under load ({args.clients} clients)", latencies))
    print_table(f"python print(42), {accel} (wall-clock ms)", rows)
    facts = [
        f"- sustained fresh VMs per second, {args.clients} clients for {args.seconds:.0f} s: "
        f"**{rate:.2f}** ({len(latencies)} runs, {failures} failed or busy)",
        pss_line(pss, args.pool),
        *(f"- skipped: {reason}" for reason in skipped),
    ]
    print("\n".join(facts))
    if not args.no_write:
        heading = f"Warm starts ({accel}, --runs {args.runs}, pool {args.pool})"
        append_section(heading, [host_line(accel), *markdown_table(rows), "", *facts])


if __name__ == "__main__":
    main()
