"""A daemon killed with SIGKILL while runs are in flight: clients fail fast, a restart cleans up.

Every client gets a ``FissionError`` (none hangs); the restarted daemon on the same state dir
reconciles: no QEMU of the dead daemon lives (jailed ones included: bubblewrap sits between the
daemon and QEMU), no VM directory, socket or overlay of it is left, and no ``fission/vm-*`` cgroup
of its VMs; a run then works, and SIGTERM leaves nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from fission.core.languages import resolve_language
from fission.core.spec import RunResult, RunSpec
from fission.errors import FissionError
from fission.sdk._backend import DaemonBackend
from tests.integration.test_warm import Daemon
from tests.security.test_leaks import (
    VmWatcher,
    count_files,
    orphan_cgroups,
    start_time,
    vm_dirs,
    vmm_processes,
    wait_for,
)

pytestmark = pytest.mark.vm

CLIENTS = 20
POOL = 2
CLIENT_DEADLINE_S = 20.0
SLOW = "import time\ntime.sleep(2)\nprint('done')"


def all_processes_of(marker: Path) -> list[tuple[int, int | None]]:
    """(pid, start time) of every process naming ``marker`` and qemu (bwrap and QEMU alike)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if str(marker).encode() in cmdline and b"qemu" in cmdline:
                found.append((int(entry), start_time(int(entry))))
    return found


@pytest.mark.timeout(600)
def test_sigkill_with_runs_in_flight_then_restart_cleans_up() -> None:
    daemon = Daemon("--pool", f"python={POOL}")
    daemon.start({"python": POOL})
    assert daemon.proc is not None
    outcomes: list[RunResult | BaseException | None] = [None] * CLIENTS
    spec = RunSpec(resolve_language("python"), SLOW)

    def client(index: int) -> None:
        try:
            with DaemonBackend.connect(daemon.socket, request_timeout=60) as c:
                outcomes[index] = c.run(spec)
        except BaseException as exc:
            outcomes[index] = exc

    with VmWatcher(daemon.state) as watcher:
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()

        def in_flight() -> bool:
            with daemon.client() as c:
                return bool(c.pools()["pools"][0]["in_use"] >= POOL)

        wait_for(in_flight, 30, "runs did not start")
        old_processes = all_processes_of(daemon.state)
        killed_at = time.monotonic()
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(timeout=10)
        # Also what it forked between the first look and its death: nothing else names the
        # state dir until the restart.
        old_processes = sorted(set(old_processes) | set(all_processes_of(daemon.state)))
        end = killed_at + CLIENT_DEADLINE_S
        for thread in threads:
            thread.join(timeout=max(0.0, end - time.monotonic()))
        hung = sum(thread.is_alive() for thread in threads)
        failed_in = time.monotonic() - killed_at
    kinds = sorted({type(o).__name__ for o in outcomes})
    print(
        f"\nclients: {hung} hung, failed within {failed_in:.1f} s as {kinds}; "
        f"{len(old_processes)} VMM-related processes at the kill, {len(watcher.seen)} VMs seen"
    )
    assert hung == 0, "a client hung after the daemon died"
    assert all(isinstance(o, FissionError) for o in outcomes), outcomes
    old_dirs = vm_dirs(daemon.state)
    assert old_dirs, "the dead daemon left no VM directory: nothing to reconcile"

    restarted = VmWatcher(daemon.state)
    daemon.start({"python": POOL})
    try:
        restarted.__enter__()
        with daemon.client() as c:
            reconciled = c.pools()["reconciled"]
        print(f"reconciled: {reconciled}")
        assert reconciled["removed"] >= len(old_dirs) > 0
        survivors = [
            pid for pid, started in old_processes if started and start_time(pid) == started
        ]
        # Checked last (like the cgroups below), so the rest of the recovery is exercised too;
        # what survived is killed now, being this test's own litter.
        stuck = [describe(pid) for pid in survivors]
        kill_survivors(old_processes)
        live = vm_dirs(daemon.state)
        assert not live & old_dirs
        assert len(list((daemon.state / "journal").iterdir())) == len(live)
        leftovers = orphan_cgroups(watcher.seen, live)
        with daemon.client() as c:
            result = c.run(RunSpec(resolve_language("python"), "print(6 * 7)"))
        assert (result.stdout, result.exit_code) == (b"42\n", 0)
    finally:
        daemon.stop()
        restarted.__exit__()
    assert vmm_processes(daemon.state) == [] and all_processes_of(daemon.state) == []
    assert vm_dirs(daemon.state) == set()
    assert list((daemon.state / "journal").iterdir()) == []
    assert count_files(daemon.state / "sandboxes") == 0
    assert not daemon.socket.exists()
    assert orphan_cgroups(restarted.seen, set()) == []
    shutil.rmtree(daemon.dir, ignore_errors=True)
    remove_empty(leftovers)  # this test's own litter, whatever the verdict
    assert survivors == [], f"processes of the dead daemon survived the restart: {stuck}"
    assert leftovers == [], (
        f"reconcile left the cgroups of {len(leftovers)} dead VMs (reconciled {reconciled}): "
        f"{[str(p) for p in leftovers]}"
    )


def describe(pid: int) -> str:
    """A process's pid, state, parent, pid-namespace pids and cgroup, for the failure message."""
    try:
        status = dict(
            line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        cgroup = Path(f"/proc/{pid}/cgroup").read_text().split()
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return f"{pid} (gone)"
    return (
        f"{pid} {status.get('Name')} state {status.get('State')} ppid {status.get('PPid')} "
        f"NSpid {status.get('NSpid')} waiting in {wchan} cgroups {cgroup}"
    )


def kill_survivors(processes: list[tuple[int, int | None]]) -> None:
    """SIGKILL, by pid, whatever the dead daemon started and is still the same process."""
    for pid, started in processes:
        if started is not None and start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    wait_for(lambda: all(start_time(pid) != s for pid, s in processes), 10, "survivors dying")


def remove_empty(cgroups: list[Path]) -> None:
    """Remove cgroups that hold no process (what reconcile should have removed)."""
    for path in cgroups:
        if not (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                path.rmdir()
