"""`fission run`'s fast path against a real daemon: the same output, exit codes and messages as
the full command on the same inputs; the user daemon started on demand; the idle exit.

Each case runs both ways: the fast path (``fission.__main__``, under ``-X importtime`` so the test
sees whether typer was loaded, i.e. whether the fast path served it or handed it over) and the
full command (``fission.cli.main``, typer), and compares exit code, stdout and stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.spec import RunSpec
from fission.sdk._backend import DaemonBackend
from tests.integration.conftest import vmm_processes
from tests.integration.test_sdk import Daemon

pytestmark = pytest.mark.vm

FAST = "import sys; sys.argv[0] = 'fission'; from fission.__main__ import main; main()"
FULL = "import sys; sys.argv[0] = 'fission'; from fission.cli import main; main()"
TIMINGS = ("duration_ms", "boot_ms", "total_ms")


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    # Each case runs twice back to back; on a busy 2-core host a refill can take over 10 s.
    d = Daemon("--pool", "python=1", "--pool", "bash=1", "--acquire-timeout", "120")
    d.start()
    try:
        yield d
    finally:
        d.stop()
        d.remove()


def environment(extra: dict[str, str]) -> dict[str, str]:
    """This session's environment, no daemon named, ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if k not in ("FISSION_URL", "FISSION_API_KEY")}
    return {**env, "COLUMNS": "100", **extra}


def command(
    program: str,
    args: list[str],
    env: dict[str, str],
    stdin: bytes | None = None,
    merged: bool = False,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``fission run ARGS`` through ``program`` (FAST under -X importtime, or FULL)."""
    flags = ["-X", "importtime"] if program == FAST else []
    return subprocess.run(
        [sys.executable, *flags, "-c", program, "run", *args],
        input=stdin if stdin is not None else b"",
        capture_output=not merged,
        stdout=subprocess.PIPE if merged else None,
        stderr=subprocess.STDOUT if merged else None,
        env=env,
        timeout=180,
        check=False,
    )


def without_importtime(text: bytes) -> tuple[bytes, bool]:
    """``text`` without ``-X importtime``'s lines, and whether they show typer loaded."""
    lines = text.splitlines(keepends=True)
    timing = [line for line in lines if line.startswith(b"import time:")]
    loaded_typer = any(line.split(b"|")[-1].strip() == b"typer" for line in timing)
    return b"".join(line for line in lines if not line.startswith(b"import time:")), loaded_typer


def both(
    daemon: Daemon, args: list[str], stdin: bytes | None = None, merged: bool = False
) -> tuple[subprocess.CompletedProcess[bytes], bool]:
    """Run ``args`` both ways; assert the same exit code, stdout and stderr; the fast run, and
    whether the fast path served it itself."""
    env = environment({"FISSION_SOCKET": str(daemon.socket)})
    fast = command(FAST, args, env, stdin, merged)
    full = command(FULL, args, env, stdin, merged)
    if merged:
        fast_out, fell_through = without_importtime(fast.stdout)
        assert (fast.returncode, fast_out) == (full.returncode, full.stdout)
        return fast, not fell_through
    fast_err, fell_through = without_importtime(fast.stderr)
    assert fast.returncode == full.returncode, (fast_err, full.stderr)
    assert fast_err == full.stderr
    if "--json" in args:
        mine, theirs = json.loads(fast.stdout), json.loads(full.stdout)
        for timing in TIMINGS:
            assert isinstance(mine.pop(timing), float) and isinstance(theirs.pop(timing), float)
        assert mine == theirs
    else:
        assert fast.stdout == full.stdout
    return fast, not fell_through


def test_a_run_is_served_fast_with_the_same_output(daemon: Daemon) -> None:
    proc, served = both(daemon, ["--lang", "python", "print(42)"])
    assert served and proc.returncode == 0 and proc.stdout == b"42\n"


def test_a_non_zero_exit_and_stderr(daemon: Daemon) -> None:
    proc, served = both(daemon, ["-l", "bash", "echo out; echo err >&2; exit 7"])
    assert served and proc.returncode == 7 and proc.stdout == b"out\n"


def test_a_timeout_exits_124_and_says_so(daemon: Daemon) -> None:
    proc, served = both(daemon, ["--timeout", "1", "import time; time.sleep(30)"])
    assert served and proc.returncode == 124
    assert b"fission: timed out after 1 s (--timeout)" in proc.stderr


def test_json_and_env(daemon: Daemon) -> None:
    args = ["--json", "-l", "bash", "-e", "WHO=world", "--env=N=2"]
    proc, served = both(daemon, [*args, 'echo "hi $WHO $N"; echo oops >&2; exit 4'])
    assert served and proc.returncode == 4
    assert json.loads(proc.stdout)["stdout"] == "hi world 2\n"


def test_stdin(daemon: Daemon) -> None:
    proc, served = both(daemon, ["-i", "-l", "bash", "tr a-z A-Z"], stdin=b"shout\n")
    assert served and proc.stdout == b"SHOUT\n"


def test_a_program_file_and_bytes_that_are_not_utf8(daemon: Daemon, tmp_path: Path) -> None:
    program = tmp_path / "main.sh"
    program.write_text("printf 'caf\\xe9\\n'\n")
    proc, served = both(daemon, ["-l", "bash", "--file", str(program)])
    assert served and proc.stdout == b"caf\xe9\n"


def test_streaming_order_across_stdout_and_stderr(daemon: Daemon) -> None:
    code = "echo one; sleep 0.3; echo two >&2; sleep 0.3; echo three"
    proc, served = both(daemon, ["-l", "bash", code], merged=True)
    assert served
    assert without_importtime(proc.stdout)[0] == b"one\ntwo\nthree\n"


def test_output_streams_before_the_program_ends(daemon: Daemon) -> None:
    env = environment({"FISSION_SOCKET": str(daemon.socket)})
    code = "import time; print('first', flush=True); time.sleep(2); print('second')"
    started = time.monotonic()
    with subprocess.Popen(
        [sys.executable, "-c", FAST, "run", code],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"first\n"
        first = time.monotonic() - started
        assert proc.stdout.read() == b"second\n"
        assert proc.wait(timeout=60) == 0
        ended = time.monotonic() - started
    assert ended - first >= 1.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lang", "cobol", "x"], b"unknown language 'cobol': choose one of python"),
        (["--memory", "1", "x"], b"--memory 1 is out of range: use 32 to 16384 MB"),
        (["--timeout", "0", "x"], b"--timeout 0 is out of range"),
        (["--env", "1BAD=x", "x"], b"--env name '1BAD' must be letters"),
        (["--allow-host", "example.com", "x"], b"--allow-host needs --network"),
        ([], b"give the code as an argument or with --file PATH"),
    ],
)
def test_bad_input_gets_the_full_commands_message(
    daemon: Daemon, args: list[str], message: bytes
) -> None:
    proc, served = both(daemon, args)
    assert not served and proc.returncode == 2
    assert message in proc.stderr


@pytest.mark.parametrize("args", [["--help"], ["--timeout", "abc", "x"], ["x", "--bogus"]])
def test_help_and_usage_errors_are_the_full_commands(daemon: Daemon, args: list[str]) -> None:
    proc, served = both(daemon, args)
    assert not served
    assert proc.returncode == (0 if args == ["--help"] else 2)


# -- the user daemon on demand ------------------------------------------------------------------
def user_daemons(runtime: Path) -> list[int]:
    """PIDs of live `fission serve --idle-exit` processes whose environment names ``runtime``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        mine = any(str(runtime).encode() in variable for variable in environ)
        if mine and b"serve" in cmdline and b"--idle-exit" in cmdline and state != "Z":
            found.append(int(entry))
    return found


def wait_until(check: object, seconds: float, what: str) -> None:
    """Poll ``check()`` until true, or fail naming ``what``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} within {seconds:g} s")


def test_a_user_daemon_starts_on_demand_and_serves_the_next_run() -> None:
    runtime = Path(tempfile.mkdtemp(prefix="fauto-", dir="/tmp"))  # short: sockets live there
    env = environment({"FISSION_RUNTIME_DIR": str(runtime), "FISSION_AUTOSTART": "1"})
    env.pop("FISSION_SOCKET", None)
    socket, state = runtime / "fission.sock", runtime / "daemon"
    try:
        # Two commands at once and no daemon: both run embedded, then at most one daemon runs.
        racing = [
            subprocess.Popen(
                [sys.executable, "-c", FAST, "run", "print(1)"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
            for _ in range(2)
        ]
        for proc in racing:
            out, err = proc.communicate(timeout=180)
            assert (proc.returncode, out) == (0, b"1\n"), err
        with DaemonBackend.connect(socket) as client:
            wait_until(client.alive, 120, "the user daemon did not answer")
            time.sleep(2)  # a racing second daemon, if any, has found the lock taken by now
            pid = int((state / "daemon.pid").read_text())
            assert user_daemons(runtime) == [pid]
            assert os.getsid(pid) == pid, "the daemon has a session of its own"
            assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
            assert os.readlink(f"/proc/{pid}/fd/1") == str(state / "daemon.log")
            assert os.readlink(f"/proc/{pid}/cwd") == "/"
            # The next command is the daemon's, through the fast path.
            proc = command(FAST, ["print(42)"], env)
            err, fell_through = without_importtime(proc.stderr)
            assert (proc.returncode, proc.stdout, fell_through) == (0, b"42\n", False), err
            assert sum(pool["served"] for pool in client.pools()["pools"]) >= 1
    finally:
        for pid in user_daemons(runtime):
            os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not user_daemons(runtime), 60, "the user daemon did not stop")
        assert vmm_processes(runtime) == [], "a VM outlived the user daemon"
        assert not socket.exists(), "the user daemon left its socket"
        shutil.rmtree(runtime, ignore_errors=True)


def test_an_idle_daemon_exits_cleanly_but_never_mid_run() -> None:
    d = Daemon("--pool", "python=1", "--idle-exit", "6")
    d.start()
    try:
        spec = RunSpec(
            resolve_language("python"),
            "import time; time.sleep(8); print('done')",
            Limits(timeout=30),
        )
        with DaemonBackend.connect(d.socket) as client:
            assert client.run(spec).stdout == b"done\n"  # longer than the idle time
        assert d.proc is not None
        assert d.proc.wait(timeout=60) == 0
        assert "idle for 6 s with no sandbox: exiting" in d.log()
        assert not d.socket.exists()
        assert vmm_processes(d.state) == []
    finally:
        d.stop()
        d.remove()
