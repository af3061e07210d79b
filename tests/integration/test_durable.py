"""Sandboxes that outlive their daemon, on real VMs: a `fission serve` is SIGKILLed and
SIGTERMed (``--on-stop keep``, the default) with running and paused sandboxes, and restarted
on the same state dir; the running ones keep their variables, files and processes, a VM killed
meanwhile leaves its sandbox ``lost``; a sandbox holding ~20 MB of files and ~200 MB of process
memory is paused, the daemon restarted, and resumed byte for byte. At the end nothing is left:
no VMM process, no VM or sandbox directory, no jail cgroup, no keeper.

One daemon (one state dir) for the whole module; its VMs live under the state dir, so the
session's ``no_leftovers`` check does not see them: ``assert_nothing_left`` does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fission.sdk import Sandbox
from fission.vmm import cgroups, jailer
from tests.integration.conftest import FISSION, vmm_processes

SANDBOXES = 5
PAUSED = (1, 3)  # of the five, these are paused before each restart
KILLED = 4  # this one's VM is killed while no daemon runs


class DurableDaemon:
    """`fission serve` on a Unix socket with a state dir that outlives each of its processes."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fdur-", dir="/tmp"))
        self.socket = self.dir / "d.sock"
        self.state = self.dir / "state"
        self.url = f"unix:{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        """Start a daemon process and wait until it answers (it re-attaches first)."""
        argv = [
            FISSION, "serve", "--socket", str(self.socket), "--state-dir", str(self.state),
            "--db", str(self.dir / "keys.sqlite3"), "--pool", "python=0",
            "--memory-budget", "12000",
        ]  # fmt: skip
        self.starts += 1
        with open(self.dir / f"daemon-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            with contextlib.suppress(Exception):
                list(Sandbox.list(url=self.url, request_timeout=5))
                return
            time.sleep(0.2)
        raise AssertionError(f"the daemon did not answer within 180 s: {self.log()}")

    def log(self) -> str:
        """What the last daemon process printed."""
        return (self.dir / f"daemon-{self.starts}.log").read_text(errors="replace")

    def stop(self, how: signal.Signals) -> None:
        """End the daemon process with ``how`` and wait for it."""
        assert self.proc is not None
        self.proc.send_signal(how)
        self.proc.wait(timeout=120)

    def catalog(self) -> dict[str, tuple[str, int | None, str | None]]:
        """Each sandbox's state, VMM pid and VM id, as the catalog has them."""
        with contextlib.closing(sqlite3.connect(self.state / "catalog.db")) as db:
            rows = db.execute("SELECT id, state, vmm_pid, vm_id FROM sandboxes").fetchall()
        return {row[0]: (row[1], row[2], row[3]) for row in rows}

    def connect(self, sandbox_id: str) -> Sandbox:
        """A client of one sandbox on the running daemon."""
        return Sandbox.connect(sandbox_id, url=self.url, request_timeout=300)

    def states(self) -> dict[str, str]:
        """Each sandbox's state as the daemon lists it."""
        return {info.id: info.state for info in Sandbox.list(url=self.url)}


def keeper_processes(state: Path) -> list[int]:
    """The keeper processes watching ``state``."""
    found = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if b"fission.core.keeper" in cmdline and str(state).encode() in cmdline:
                found.append(int(entry))
    return found


def holds_slot_lock(vm_id: str | None) -> bool:
    """Whether a process of VM ``vm_id`` (in its jail cgroup) holds a uid slot lock open."""
    if not jailer.decision().enabled:
        return True  # unjailed VMs have no uid slot
    groups = [p for p in cgroups.vm_cgroups(cgroups.detect_layout()) if p.name == f"vm-{vm_id}"]
    for pid in cgroups.pids(groups[0]) if groups else []:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(str(jailer.SLOT_DIR)) and target.endswith(".lock"):
                    return True
    return False


def assert_nothing_left(daemon: DurableDaemon, vm_ids: set[str]) -> None:
    """No VMM process, VM or sandbox directory, jail cgroup or keeper of ``daemon`` remains."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and keeper_processes(daemon.state):
        time.sleep(0.2)
    assert keeper_processes(daemon.state) == [], "the keeper outlived the last sandbox"
    assert vmm_processes(daemon.state) == [], "a sandbox VM outlived its daemon's delete"
    assert list((daemon.state / "vms").iterdir()) == []
    assert list((daemon.state / "sandboxes").iterdir()) == []
    left = {p.name for p in cgroups.vm_cgroups(cgroups.detect_layout())}
    assert not left & {f"vm-{vm_id}" for vm_id in vm_ids}, "a jail cgroup was left behind"


@pytest.fixture(scope="module")
def daemon() -> Iterator[DurableDaemon]:
    daemon = DurableDaemon()
    daemon.start()
    try:
        yield daemon
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            for info in Sandbox.list(url=daemon.url):
                with contextlib.suppress(Exception):
                    daemon.connect(info.id).delete()
            daemon.stop(signal.SIGTERM)
        with contextlib.suppress(Exception):  # a failed test may have left VMs: end them
            for pid in vmm_processes(daemon.state):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(daemon.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def boxes(daemon: DurableDaemon) -> list[str]:
    """Five python sandboxes, each with a variable in a context and a file, two paused."""
    ids = []
    for n in range(SANDBOXES):
        box = Sandbox.create("python", ttl=900, url=daemon.url, request_timeout=300)
        assert box.run(f"x = {100 + n}", context="k").exit_code == 0
        box.files.write("/home/sandbox/note.txt", f"note {n}")
        ids.append(box.id)
    for n in PAUSED:
        assert daemon.connect(ids[n]).pause().state == "paused"
    return ids


def check_alive(daemon: DurableDaemon, ids: list[str], numbers: range | list[int]) -> None:
    """Each sandbox still has its context's variable and its file."""
    for n in numbers:
        box = daemon.connect(ids[n])
        if box.info().state == "paused":
            box.resume()
        ran = box.run("print(x)", context="k")
        assert (ran.exit_code, ran.stdout) == (0, f"{100 + n}\n".encode()), ran.stderr
        assert box.files.read("/home/sandbox/note.txt") == f"note {n}".encode()


def test_a_sigkilled_daemon_takes_its_sandboxes_back(
    daemon: DurableDaemon, boxes: list[str]
) -> None:
    catalog = daemon.catalog()
    daemon.stop(signal.SIGKILL)
    # Each running sandbox's VM still holds its jail's uid slot (the daemon's lock died with it).
    running = [vm_id for state, _, vm_id in catalog.values() if state == "running"]
    assert len(running) == 3 and all(holds_slot_lock(vm_id) for vm_id in running)
    _, pid, _ = catalog[boxes[KILLED]]
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # its VM ends while no daemon manages it
    daemon.start()
    states = daemon.states()
    expected = {sid: "running" for sid in boxes}
    expected |= {boxes[n]: "paused" for n in PAUSED} | {boxes[KILLED]: "lost"}
    assert states == expected
    lost = daemon.connect(boxes[KILLED]).info()
    assert f"pid {pid}" in lost.lost_reason and "no daemon managed it" in lost.lost_reason
    check_alive(daemon, boxes, [0, 2, *PAUSED])


def test_a_sigtermed_daemon_keeps_them_running(daemon: DurableDaemon, boxes: list[str]) -> None:
    daemon.stop(signal.SIGTERM)  # --on-stop keep (the default)
    pids = {sid: pid for sid, (state, pid, _) in daemon.catalog().items() if state == "running"}
    assert len(pids) == 4 and all(vm_alive(pid) for pid in pids.values())
    daemon.start()
    assert sum(1 for state in daemon.states().values() if state == "running") == 4
    check_alive(daemon, boxes, [0, 1, 2, 3])
    daemon.connect(boxes[KILLED]).delete()
    vm_ids = {vm_id for _, _, vm_id in daemon.catalog().values() if vm_id}
    for sid in boxes[:KILLED]:
        daemon.connect(sid).delete()
    assert daemon.states() == {}
    assert_nothing_left(daemon, vm_ids)


def vm_alive(pid: int | None) -> bool:
    """Whether a process ``pid`` exists."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


HOLD = """
import hashlib, os
data = bytearray(os.urandom(200 * 2**20))
digest = hashlib.sha256(data).hexdigest()
print(os.getpid(), digest)
"""
CHECK = "import hashlib, os\nprint(os.getpid(), hashlib.sha256(data).hexdigest())\n"
FILES = "for n in 1 2 3 4; do head -c 5M /dev/urandom > /home/sandbox/blob$n; done; sha256sum /home/sandbox/blob*"


def test_a_paused_sandbox_comes_back_byte_for_byte_after_a_restart(
    daemon: DurableDaemon,
) -> None:
    box = Sandbox.create("python", ttl=900, memory_mb=512, url=daemon.url, request_timeout=300)
    written = box.exec(FILES, timeout=120)
    assert written.exit_code == 0, written.stderr
    held = box.run(HOLD, context="mem", timeout=240)
    assert held.exit_code == 0, held.stderr
    assert box.pause().state == "paused"
    vm_ids = {vm_id for _, _, vm_id in daemon.catalog().values() if vm_id}
    daemon.stop(signal.SIGTERM)
    daemon.start()
    box = daemon.connect(box.id)
    assert box.info().state == "paused"
    assert box.resume().state == "running"
    assert box.exec("sha256sum /home/sandbox/blob*").stdout == written.stdout
    assert box.run(CHECK, context="mem", timeout=120).stdout == held.stdout
    vm_ids |= {vm_id for _, _, vm_id in daemon.catalog().values() if vm_id}
    box.delete()
    assert_nothing_left(daemon, vm_ids)
