"""Warm starts: snapshots, the daemon's pools, and what each clone must not share."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fission.core.languages import resolve_language
from fission.core.spec import RunSpec
from fission.errors import Busy
from fission.sdk._backend import DaemonBackend
from tests.integration.conftest import FISSION, fission_cli
from tests.integration.helpers import run_spec
from tests.integration.servers import deleting_on_stop

pytestmark = pytest.mark.vm

PROBE = (
    "import json, os, random, time, numpy\n"
    "print(json.dumps({'urandom': os.urandom(16).hex(), 'random': random.random(),\n"
    "                  'numpy': float(numpy.random.rand()), 'time': time.time(),\n"
    "                  'marker': os.path.exists('/tmp/marker') or os.path.exists('/home/sandbox/marker')}))\n"
    "open('/tmp/marker', 'w').write('x')\n"
    "open('/home/sandbox/marker', 'w').write('x')\n"
)


def qemu_pids(marker: Path) -> list[int]:
    """Live processes whose command line mentions ``marker`` (a daemon's state dir)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if str(marker).encode() in cmdline and b"qemu" in cmdline:
                found.append(int(entry))
    return found


class Daemon:
    """A `fission serve` subprocess with its own socket and state dir."""

    def __init__(self, *args: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fd-", dir="/tmp"))
        self.socket = self.dir / "d.sock"
        self.state = self.dir / "state"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready: dict[str, int]) -> None:
        """Start and wait until the pools hold ``ready`` VMs per language."""
        argv = [
            FISSION,
            "serve",
            "--socket",
            str(self.socket),
            "--state-dir",
            str(self.state),
            *deleting_on_stop(self.args),
        ]
        with open(self.dir / "daemon.log", "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log
            )
        deadline = time.monotonic() + 240
        with DaemonBackend.connect(self.socket) as client:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, (self.dir / "daemon.log").read_text()
                if client.alive():
                    pools = {p["language"]: p["ready"] for p in client.pools()["pools"]}
                    if all(pools.get(k, 0) >= v for k, v in ready.items()):
                        return
                time.sleep(0.5)
        raise AssertionError(f"daemon not ready: {(self.dir / 'daemon.log').read_text()}")

    def client(self) -> DaemonBackend:
        return DaemonBackend.connect(self.socket)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGTERM)


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    d = Daemon("--pool", "python=2", "--pool", "bash=1")
    d.start({"python": 2, "bash": 1})
    yield d
    d.stop()
    assert qemu_pids(d.state) == []
    import shutil

    shutil.rmtree(d.dir, ignore_errors=True)


def daemon_env(d: Daemon) -> dict[str, str]:
    return {"FISSION_SOCKET": str(d.socket)}


def test_daemon_and_embedded_give_identical_results(daemon: Daemon) -> None:
    code = "import sys\nprint('out', 6 * 7)\nprint('err', file=sys.stderr)\nsys.exit(5)"
    via_daemon = fission_cli("run", "--json", code, env=daemon_env(daemon))
    embedded = fission_cli("run", "--json", "--no-daemon", code, env=daemon_env(daemon))
    assert via_daemon.returncode == embedded.returncode == 5
    a, b = json.loads(via_daemon.stdout), json.loads(embedded.stdout)
    for key in ("stdout", "stderr", "exit_code", "timed_out", "oom", "truncated", "signal"):
        assert a[key] == b[key], key
    assert a["stdout"] == "out 42\n" and a["stderr"] == "err\n"
    # Served by the pool: the daemon's counter moved.
    with daemon.client() as client:
        served = {p["language"]: p["served"] for p in client.pools()["pools"]}
    assert served["python"] >= 1


def test_streaming_and_exit_code_through_the_daemon(daemon: Daemon) -> None:
    proc = fission_cli(
        "run", "--lang", "bash", "echo one; echo two >&2; exit 7", env=daemon_env(daemon)
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, b"one\n", b"two\n")


def test_clones_have_their_own_randomness_clock_and_files(daemon: Daemon) -> None:
    spec = RunSpec(resolve_language("python"), PROBE)
    with daemon.client() as client:
        first = json.loads(client.run(spec).stdout)
        second = json.loads(client.run(spec).stdout)
    for key in ("urandom", "random", "numpy"):
        assert first[key] != second[key], key
    for facts in (first, second):
        assert abs(facts["time"] - time.time()) < 10  # the guest clock is set at restore
        assert facts["marker"] is False  # nothing written by an earlier run is visible


async def test_embedded_clones_differ_too() -> None:
    spec = RunSpec(resolve_language("python"), PROBE)
    first = json.loads((await run_spec(spec)).stdout)
    second = json.loads((await run_spec(spec)).stdout)
    for key in ("urandom", "random", "numpy"):
        assert first[key] != second[key], key
    assert first["marker"] is False and second["marker"] is False


async def test_clones_keep_a_precise_clock_and_their_timers_fire() -> None:
    """A template booted on a busy host once lost its TSC to the clocksource watchdog; every
    clone then ran on jiffies and a run's timeout fired only at the host's deadline."""
    from fission.core.limits import Limits
    from fission.vmm.base import default_driver

    accel = (await default_driver().host()).accel
    clocksource = "/sys/devices/system/clocksource/clocksource0/current_clocksource"
    spec = RunSpec(resolve_language("python"), f"print(open({clocksource!r}).read().strip())")
    result = await run_spec(spec)
    if accel == "tcg":
        assert result.stdout == b"tsc\n", result
    # Address randomisation stays on (it costs TCG retranslations, but it is a layer).
    aslr = RunSpec(resolve_language("bash"), "cat /proc/sys/kernel/randomize_va_space")
    assert (await run_spec(aslr)).stdout == b"2\n"
    sleeper = RunSpec(resolve_language("python"), "import time; time.sleep(30)", Limits(timeout=2))
    started = time.monotonic()
    slept = await run_spec(sleeper)
    assert slept.timed_out and slept.duration_ms < 2000 + 1000, slept  # the guest's own timer
    assert time.monotonic() - started < 2 + 2 + 5  # boot included


def test_a_full_pool_answers_busy_naming_the_setting() -> None:
    d = Daemon("--pool", "python=1", "--memory-budget", "1200", "--acquire-timeout", "1")
    d.start({"python": 1})
    try:
        slow = RunSpec(resolve_language("python"), "import time; time.sleep(8)")
        holder = threading.Thread(target=lambda: d.client().run(slow))
        holder.start()
        time.sleep(1.0)
        with d.client() as client, pytest.raises(Busy, match="--pool python=N"):
            client.run(RunSpec(resolve_language("python"), "print(1)"))
        proc = fission_cli("run", "print(1)", env={"FISSION_SOCKET": str(d.socket)})
        assert proc.returncode == 125 and b"--acquire-timeout" in proc.stderr
        holder.join(timeout=60)
    finally:
        d.stop()
    assert qemu_pids(d.state) == []


def test_sigterm_destroys_every_vm() -> None:
    d = Daemon("--pool", "python=2")
    d.start({"python": 2})
    assert len(qemu_pids(d.state)) >= 2
    d.signal(signal.SIGTERM)
    assert qemu_pids(d.state) == []
    assert list((d.state / "journal").iterdir()) == []
    assert list((d.state / "vms").iterdir()) == []
    assert not d.socket.exists()


def test_restart_after_sigkill_reconciles() -> None:
    d = Daemon("--pool", "python=1")
    d.start({"python": 1})
    old_vms = sorted(p.name for p in (d.state / "vms").iterdir())
    assert old_vms
    d.signal(signal.SIGKILL)
    # The dead daemon's VMs die with it (parent-death signal); its files stay behind.
    deadline = time.monotonic() + 10
    while qemu_pids(d.state) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert qemu_pids(d.state) == []
    assert list((d.state / "journal").iterdir())
    d.start({"python": 1})
    try:
        with d.client() as client:
            status = client.pools()
        assert status["reconciled"]["removed"] >= len(old_vms)
        current = {p.name for p in (d.state / "vms").iterdir()}
        assert not current & set(old_vms)
        assert len(list((d.state / "journal").iterdir())) == len(current)
    finally:
        d.stop()
    assert qemu_pids(d.state) == []


def test_pool_status_command(daemon: Daemon) -> None:
    proc = subprocess.run(
        [FISSION, "pool", "status", "--json", "--socket", str(daemon.socket)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert {p["language"] for p in status["pools"]} == {"python", "bash"}
    assert status["memory_reserved_mb"] <= status["memory_budget_mb"]


def test_pool_status_without_a_daemon_says_how_to_start_one(tmp_path: Path) -> None:
    proc = subprocess.run(
        [FISSION, "pool", "status", "--socket", str(tmp_path / "none.sock")],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 125
    assert b"fission serve" in proc.stderr
