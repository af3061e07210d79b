"""A thousand runs through one daemon leave nothing behind.

After ``FISSION_LEAK_RUNS`` runs (default 1000) of a tiny program from a few concurrent clients,
the daemon holds no more than its pool: no extra QEMU process, no file of a finished VM under its
state dir or the runtime dir, no extra open descriptor (sockets included), no ``fission/vm-*``
cgroup of a finished VM, and its resident memory is within ``RSS_SLACK_MB`` of what it was after
a warm-up. Under TCG a fresh VM costs ~0.35 s of the two cores, so 1000 runs take ~6 minutes.

The helpers here (process, cgroup and file accounting) are shared with ``test_crash.py``.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fission.core.languages import resolve_language
from fission.core.spec import RunSpec
from fission.errors import Busy, FissionError
from fission.sdk._backend import DaemonBackend
from fission.vmm.cgroups import CONTROLLERS, GROUP_DIR, VM_PREFIX
from tests.integration.test_warm import Daemon

pytestmark = pytest.mark.vm

RUNS = int(os.environ.get("FISSION_LEAK_RUNS", "1000"))
WARMUP_RUNS = 50
CLIENTS = 8
POOL = 2
RSS_SLACK_MB = 40
FD_SLACK = 8
SETTLE_S = 60.0
CGROUP_ROOT = Path("/sys/fs/cgroup")


def wait_for(condition: Callable[[], bool], deadline_s: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``deadline_s`` seconds."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"{what} within {deadline_s:.0f} s")
        time.sleep(0.1)


def vmm_processes(marker: Path) -> list[int]:
    """QEMU processes themselves (argv[0] is qemu, not the bwrap around it) naming ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]).startswith(b"qemu") and str(marker).encode() in b" ".join(
            argv
        ):
            found.append(int(entry))
    return found


def start_time(pid: int) -> int | None:
    """The start time of ``pid`` (to tell a recycled pid apart), or None when it is gone or a
    zombie (where init does not reap orphans, as in some containers, dead ones linger)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def vm_cgroups() -> dict[str, list[Path]]:
    """Every ``fission/vm-*`` cgroup under the v1 memory, pids and cpu hierarchies, by VM id."""
    found: dict[str, list[Path]] = {}
    for controller in CONTROLLERS:
        for depth in range(4):
            pattern = "/".join(["*"] * depth + [GROUP_DIR, f"{VM_PREFIX}*"])
            for path in (CGROUP_ROOT / controller).glob(pattern):
                if path.is_dir():
                    found.setdefault(path.name[len(VM_PREFIX) :], []).append(path)
    return found


def vm_dirs(state: Path) -> set[str]:
    """Ids of the VMs that have a directory under the daemon's state dir."""
    try:
        return {p.name[len(VM_PREFIX) :] for p in (state / "vms").iterdir()}
    except OSError:
        return set()


def count_files(root: Path, skip: Callable[[Path], bool] = lambda _: False) -> int:
    """Files, sockets and directories under ``root`` (``skip`` prunes a path and its contents)."""
    total = 0
    for directory, dirs, files in os.walk(root):
        base = Path(directory)
        dirs[:] = [d for d in dirs if not skip(base / d)]
        total += len(dirs) + len([f for f in files if not skip(base / f)])
    return total


class VmWatcher:
    """Collects the id of every VM the daemon ever gives a directory (polled every 10 ms), so
    cgroups can be attributed to this daemon even when other fission processes share the host."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            self.seen |= vm_dirs(self.state)

    def __enter__(self) -> VmWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.seen |= vm_dirs(self.state)


def orphan_cgroups(seen: set[str], live: set[str]) -> list[Path]:
    """cgroups of VMs this daemon had that no longer exist."""
    return [path for vm_id, paths in vm_cgroups().items() if vm_id in seen - live for path in paths]


def daemon_rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    """How many descriptors ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def pool_settled(daemon: Daemon, size: int) -> Callable[[], bool]:
    """A condition: the pool is full and idle, and only its VMs have processes and files."""

    def check() -> bool:
        with daemon.client() as client:
            pool = next(p for p in client.pools()["pools"] if p["language"] == "python")
        journal = list((daemon.state / "journal").iterdir())
        return (
            pool["ready"] == size
            and pool["starting"] == 0
            and pool["in_use"] == 0
            and len(vm_dirs(daemon.state)) == size
            and len(journal) == size
            and len(vmm_processes(daemon.state)) == size
        )

    return check


@dataclass
class Tally:
    ok: int = 0
    busy: int = 0
    errors: list[str] = field(default_factory=list)


def run_many(daemon: Daemon, runs: int, clients: int = CLIENTS) -> Tally:
    """``runs`` runs of ``print(1)`` from ``clients`` threads; a Busy answer is retried."""
    spec = RunSpec(resolve_language("python"), "print(1)")
    tally = Tally()
    lock = threading.Lock()
    left = [runs]

    def worker() -> None:
        with DaemonBackend.connect(daemon.socket, request_timeout=60) as client:
            while True:
                with lock:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                try:
                    result = client.run(spec)
                    outcome = (
                        "ok" if (result.stdout, result.exit_code) == (b"1\n", 0) else repr(result)
                    )
                except Busy:
                    outcome = "busy"
                except FissionError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                with lock:
                    if outcome == "ok":
                        tally.ok += 1
                    elif outcome == "busy":
                        tally.busy += 1
                        left[0] += 1  # retried: the daemon said so cleanly
                    else:
                        tally.errors.append(outcome)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(120.0, runs * 1.5))
        assert not thread.is_alive(), "a client hung"
    return tally


@dataclass
class Snapshot:
    rss_mb: float
    fds: int
    vmms: int
    state_files: int
    runtime_files: int


def snapshot(daemon: Daemon, runtime: Path) -> Snapshot:
    """The daemon's footprint, not counting its pool's VM directories and journal entries."""
    assert daemon.proc is not None
    pool_paths = {daemon.state / "vms", daemon.state / "journal"}
    return Snapshot(
        rss_mb=daemon_rss_mb(daemon.proc.pid),
        fds=open_fds(daemon.proc.pid),
        vmms=len(vmm_processes(daemon.state)),
        state_files=count_files(daemon.state, lambda p: p.parent in pool_paths),
        runtime_files=count_files(runtime),
    )


@pytest.mark.timeout(1200)
def test_many_runs_leak_nothing(runtime_dir: Path) -> None:
    daemon = Daemon("--pool", f"python={POOL}")
    daemon.start({"python": POOL})
    assert daemon.proc is not None
    try:
        with VmWatcher(daemon.state) as watcher:
            warm = run_many(daemon, WARMUP_RUNS)
            assert warm.errors == [], warm.errors
            wait_for(
                pool_settled(daemon, POOL), SETTLE_S, "the pool did not settle after the warm-up"
            )
            before = snapshot(daemon, runtime_dir)
            started = time.monotonic()
            tally = run_many(daemon, RUNS)
            elapsed = time.monotonic() - started
            wait_for(pool_settled(daemon, POOL), SETTLE_S, "the pool did not settle after the runs")
            after = snapshot(daemon, runtime_dir)
            live = vm_dirs(daemon.state)
        print(
            f"\n{RUNS} runs in {elapsed:.0f} s ({RUNS / elapsed:.2f}/s, {tally.busy} busy retried); "
            f"{len(watcher.seen)} VMs seen\n"
            f"RSS {before.rss_mb:.1f} -> {after.rss_mb:.1f} MB, fds {before.fds} -> {after.fds}, "
            f"QEMU {before.vmms} -> {after.vmms}, state files {before.state_files} -> "
            f"{after.state_files}, runtime files {before.runtime_files} -> {after.runtime_files}"
        )
        assert tally.errors == [], tally.errors[:10]
        assert tally.ok == RUNS
        assert len(watcher.seen) >= RUNS  # every run had a fresh VM
        assert after.vmms == POOL
        assert after.state_files <= before.state_files
        assert after.runtime_files <= before.runtime_files
        assert after.fds <= before.fds + FD_SLACK
        wait_for(lambda: not orphan_cgroups(watcher.seen, live), 10, "cgroups of finished VMs left")
        assert after.rss_mb < before.rss_mb + RSS_SLACK_MB
    finally:
        daemon.stop()
    assert vmm_processes(daemon.state) == []
    assert vm_dirs(daemon.state) == set()
    assert not orphan_cgroups(watcher.seen, set())
    shutil.rmtree(daemon.dir, ignore_errors=True)
