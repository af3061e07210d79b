"""The Python SDK against a real `fission serve`: sync and async sandboxes, one-shot runs, keys.

One daemon on a Unix socket serves the module; the API-key test starts its own on TCP. File
transfers and persistent contexts need the guest agent's file and context operations: those
tests skip until ``AgentClient`` has them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fission
from fission.agent.client import AgentClient, ExecRequest
from fission.sdk import (
    AsyncSandbox,
    FileNotFound,
    InvalidInput,
    LimitOutOfRange,
    OutputEvent,
    PathNotAllowed,
    RunResult,
    Sandbox,
    SandboxNotFound,
    SandboxNotRunning,
    Unauthorized,
    UnknownLanguage,
)
from fission.sdk._backend import DaemonBackend
from tests.integration.conftest import FISSION, vmm_processes
from tests.integration.servers import deleting_on_stop

pytestmark = pytest.mark.vm

AGENT_FILES = hasattr(AgentClient, "write_file")
AGENT_CONTEXTS = "context" in {f.name for f in dataclasses.fields(ExecRequest)}
needs_agent_files = pytest.mark.skipif(
    not AGENT_FILES,
    reason="the guest agent has no file operations yet (AgentClient.write_file); "
    "runs once they land",
)
needs_agent_contexts = pytest.mark.skipif(
    not AGENT_CONTEXTS,
    reason="the guest agent has no persistent contexts yet (ExecRequest.context); "
    "runs once they land",
)

# Prints on both streams, pauses, prints again: output must arrive live and in order.
STREAMING = (
    "import sys, time\n"
    "for i in range(5):\n"
    "    print(i, flush=True)\n"
    "print('half', file=sys.stderr, flush=True)\n"
    "time.sleep(1.0)\n"
    "print('last', flush=True)\n"
)
STREAMED_STDOUT = b"0\n1\n2\n3\n4\nlast\n"
BIG = 20 * 1024 * 1024


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Daemon:
    """A `fission serve` subprocess: on a Unix socket, or on 127.0.0.1 needing API keys."""

    def __init__(self, *args: str, tcp: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fsdk-", dir="/tmp"))
        self.socket = self.dir / "d.sock"
        self.state = self.dir / "state"
        self.db = self.dir / "keys.sqlite3"
        self.port = free_port() if tcp else None
        self.url = f"http://127.0.0.1:{self.port}" if tcp else f"unix:{self.socket}"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start and wait (up to 120 s) until it answers /v1/health."""
        listen = ["--socket", str(self.socket)]
        if self.port is not None:
            listen = ["--host", "127.0.0.1", "--port", str(self.port)]
        argv = [
            FISSION,
            "serve",
            *listen,
            "--state-dir",
            str(self.state),
            "--db",
            str(self.db),
            *deleting_on_stop(self.args),
        ]
        with open(self.dir / "daemon.log", "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        probe = (
            DaemonBackend.connect(url=self.url) if self.port else DaemonBackend.connect(self.socket)
        )
        deadline = time.monotonic() + 120
        with probe:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.log()
                if probe.alive():
                    return
                time.sleep(0.2)
        raise AssertionError(f"the daemon did not answer within 120 s: {self.log()}")

    def keys(self, *args: str) -> str:
        """Run `fission keys ...` on this daemon's database; what it printed on stdout."""
        out = subprocess.run(
            [FISSION, "keys", *args, "--db", str(self.db)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout.strip()

    def log(self) -> str:
        """What the daemon printed."""
        return (self.dir / "daemon.log").read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM the daemon by its pid and wait; then nothing of it may be left."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError(f"the daemon ignored SIGTERM: {self.log()}") from None
        assert vmm_processes(self.state) == [], "a VM outlived the daemon"

    def remove(self) -> None:
        """Delete the daemon's directory."""
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_sdk_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's FISSION_URL or FISSION_API_KEY must not steer these tests."""
    monkeypatch.delenv("FISSION_URL", raising=False)
    monkeypatch.delenv("FISSION_API_KEY", raising=False)


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    d = Daemon("--pool", "python=1")
    d.start()
    try:
        yield d
        leftovers = sorted(p.name for p in (d.state / "sandboxes").iterdir())
        assert leftovers == [], f"sandboxes outlived their with blocks: {leftovers}"
    finally:
        d.stop()
        d.remove()


def recorder(seen: list[tuple[str, float, bytes]], stream: str) -> Any:
    """An output callback noting (stream, arrival time, chunk)."""
    return lambda data: seen.append((stream, time.monotonic(), data))


def check_streamed(seen: list[tuple[str, float, bytes]], result: RunResult) -> None:
    """Callbacks got every chunk, in order, while the program was still running."""
    stdout = [(at, data) for stream, at, data in seen if stream == "stdout"]
    assert b"".join(data for _, data in stdout) == result.stdout == STREAMED_STDOUT
    assert b"".join(data for stream, _, data in seen if stream == "stderr") == b"half\n"
    first = next(at for at, data in stdout if data.startswith(b"0"))
    last = next(at for at, data in stdout if b"last" in data)
    assert last - first > 0.5, "output was delivered at the end, not as it was printed"


def check_events(events: list[Any]) -> None:
    """An event stream: OutputEvents in order, then exactly one RunResult."""
    *outputs, result = events
    assert isinstance(result, RunResult) and all(isinstance(e, OutputEvent) for e in outputs)
    assert b"".join(e.data for e in outputs if e.stream == "stdout") == STREAMED_STDOUT
    assert b"".join(e.data for e in outputs if e.stream == "stderr") == b"half\n"
    assert result.stdout == STREAMED_STDOUT and result.exit_code == 0


def test_sync_sandbox_lifecycle(daemon: Daemon) -> None:
    labels = {"suite": "sdk", "side": "sync"}
    with fission.sandbox(url=daemon.url, ttl=120, timeout=20, metadata=labels) as s:
        info = s.info()
        assert s.id.startswith("sbx_") and info.state == "running"
        assert (info.ttl, info.timeout, info.metadata) == (120, 20, labels)

        result = s.run("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)")
        assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")

        seen: list[tuple[str, float, bytes]] = []
        result = s.run(
            STREAMING, on_stdout=recorder(seen, "stdout"), on_stderr=recorder(seen, "stderr")
        )
        check_streamed(seen, result)
        check_events(list(s.run_stream(STREAMING)))

        result = s.exec("echo hello; echo oops >&2; exit 4")
        assert (result.exit_code, result.stdout, result.stderr) == (4, b"hello\n", b"oops\n")
        assert s.exec(["printf", "%s|", "a b", "c"]).stdout == b"a b|c|"
        assert s.exec("cat", stdin=b"fed in").stdout == b"fed in"
        assert s.exec("pwd", cwd="/tmp").stdout == b"/tmp\n"
        assert s.exec("echo $GREETING", env={"GREETING": "hi"}).stdout == b"hi\n"
        seen = []
        result = s.exec(
            f'python3 -c "{STREAMING}"',
            on_stdout=recorder(seen, "stdout"),
            on_stderr=recorder(seen, "stderr"),
        )
        check_streamed(seen, result)
        check_events(list(s.exec_stream(["python3", "-c", STREAMING])))
        slow = s.exec("sleep 10", timeout=1)
        assert slow.timed_out and slow.exit_code == 124

        renewed = s.set_ttl(600)
        assert renewed.ttl == 600 and renewed.expires_at > time.time() + 500
        assert [i.id for i in Sandbox.list(metadata=labels, url=daemon.url)] == [s.id]

        assert s.exec("echo kept > note.txt").exit_code == 0
        assert s.pause().state == "paused"
        with pytest.raises(SandboxNotRunning, match="resume"):
            s.exec("true")
        assert s.id in [i.id for i in Sandbox.list(state="paused", url=daemon.url)]
        assert s.resume().state == "running"
        assert s.exec("cat note.txt").stdout == b"kept\n"

        again = Sandbox.connect(s.id, url=daemon.url)
        assert again.exec("cat note.txt").stdout == b"kept\n"
        again.close()

        s.delete()
        with pytest.raises(SandboxNotFound):
            s.info()
        with pytest.raises(SandboxNotFound):
            s.run("print(1)")
        with pytest.raises(SandboxNotFound):
            Sandbox.connect(s.id, url=daemon.url)
    assert list(Sandbox.list(metadata=labels, url=daemon.url)) == []


async def test_async_sandbox_lifecycle(daemon: Daemon) -> None:
    labels = {"suite": "sdk", "side": "async"}
    async with AsyncSandbox(url=daemon.url, metadata=labels) as s:
        result = await s.run("import sys\nprint('out')\nsys.exit(3)")
        assert (result.exit_code, result.stdout) == (3, b"out\n")

        seen: list[tuple[str, float, bytes]] = []

        async def on_stdout(data: bytes) -> None:  # callbacks may be coroutine functions
            seen.append(("stdout", time.monotonic(), data))

        result = await s.run(STREAMING, on_stdout=on_stdout, on_stderr=recorder(seen, "stderr"))
        check_streamed(seen, result)
        check_events([event async for event in s.run_stream(STREAMING)])
        check_events([event async for event in s.exec_stream(["python3", "-c", STREAMING])])

        result = await s.exec("echo hello; cat; exit 4", stdin="fed")
        assert (result.exit_code, result.stdout) == (4, b"hello\nfed")

        assert (await s.set_ttl(500)).ttl == 500
        assert [i.id async for i in AsyncSandbox.list(metadata=labels, url=daemon.url)] == [s.id]

        assert (await s.exec("echo kept > note.txt")).exit_code == 0
        assert (await s.pause()).state == "paused"
        with pytest.raises(SandboxNotRunning):
            await s.run("print(1)")
        assert (await s.resume()).state == "running"
        assert (await s.exec("cat note.txt")).stdout == b"kept\n"

        await s.delete()
        with pytest.raises(SandboxNotFound):
            await s.info()
        with pytest.raises(SandboxNotFound):
            await AsyncSandbox.connect(s.id, url=daemon.url)
    assert [i async for i in AsyncSandbox.list(metadata=labels, url=daemon.url)] == []


def random_file(path: Path) -> str:
    """Fill ``path`` with BIG random bytes; their sha256."""
    data = os.urandom(BIG)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def sha256_of(path: Path) -> str:
    """The sha256 of a local file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sha256_inside(s: Sandbox, path: str) -> str:
    """The sha256 of a file in the sandbox, computed there."""
    result = s.exec(["sha256sum", path])
    assert result.exit_code == 0, result.stderr
    return result.stdout.split()[0].decode()


@needs_agent_files
async def test_files_move_both_ways_sync_and_async(daemon: Daemon, tmp_path: Path) -> None:
    with Sandbox(url=daemon.url) as s:
        box = await AsyncSandbox.connect(s.id, url=daemon.url)
        try:
            assert s.files.write("a.txt", b"bytes\x00\xff").size == 7
            assert s.files.read("a.txt") == b"bytes\x00\xff"
            await box.files.write("b.txt", "text é")
            assert await box.files.read("b.txt") == "text é".encode()
            s.files.write("c.bin", io.BytesIO(b"from a file object"))
            assert b"".join([c async for c in box.files.read_stream("c.bin")]) == (
                b"from a file object"
            )

            s.files.mkdir("d/e")
            await box.files.write("d/e/f.txt", b"deep")
            assert [(e.name, e.is_dir) for e in s.files.list("d")] == [("e", True)]
            assert [e.name for e in await box.files.list("d/e")] == ["f.txt"]
            assert (await box.files.stat("d/e/f.txt")).size == 4
            await box.files.remove("d", recursive=True)
            with pytest.raises(FileNotFound):
                s.files.stat("d")
            with pytest.raises(FileNotFound):
                await box.files.read("missing.txt")
            with pytest.raises(PathNotAllowed):
                s.files.read("../../etc/passwd")

            # 20 MB each way: sync up and async down, then async up and sync down.
            source, back = tmp_path / "up.bin", tmp_path / "back.bin"
            digest = random_file(source)
            assert s.files.upload(source, "big.bin").size == BIG
            assert sha256_inside(s, "big.bin") == digest
            await box.files.download("big.bin", back)
            assert sha256_of(back) == digest
            digest = random_file(source)
            assert (await box.files.upload(source, "big.bin")).size == BIG
            assert sha256_inside(s, "big.bin") == digest
            s.files.download("big.bin", back)  # over the earlier download
            assert sha256_of(back) == digest
            assert sorted(p.name for p in tmp_path.iterdir()) == ["back.bin", "up.bin"]
        finally:
            await box.close()


@needs_agent_contexts
async def test_a_context_keeps_variables_across_runs(daemon: Daemon) -> None:
    with Sandbox(url=daemon.url) as s:
        assert s.run("x = 41", context="a").exit_code == 0
        assert s.run("print(x + 1)", context="a").stdout == b"42\n"
        assert s.run("print(x)").exit_code != 0  # no context: a fresh interpreter
        assert s.run("print(x)", context="a", fresh_context=True).exit_code != 0
        box = await AsyncSandbox.connect(s.id, url=daemon.url)
        try:
            await box.run("y = 'kept'", context="b")
            assert (await box.run("print(y)", context="b")).stdout == b"kept\n"
        finally:
            await box.close()


def test_one_shot_runs(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks: list[bytes] = []
    code = "import os, sys\nprint(os.environ['GREETING'], sys.stdin.read())\nsys.exit(2)"
    result = fission.run(
        code, env={"GREETING": "hi"}, stdin="there", on_stdout=chunks.append, url=daemon.url
    )
    assert (result.exit_code, result.stdout) == (2, b"hi there\n")
    assert b"".join(chunks) == result.stdout
    # No url: the local socket (FISSION_SOCKET) answers, so the daemon runs it, not this process.
    monkeypatch.setenv("FISSION_SOCKET", str(daemon.socket))
    monkeypatch.setattr("fission.sdk._backend.EmbeddedBackend.run", None)  # must not be used
    assert fission.run("print(6 * 7)", timeout=10).stdout == b"42\n"


async def test_errors_map_to_their_classes(daemon: Daemon) -> None:
    with pytest.raises(UnknownLanguage, match="cobol"):
        fission.run("x", "cobol", url=daemon.url)
    with pytest.raises(UnknownLanguage, match="cobol"):
        Sandbox.create("cobol", url=daemon.url)
    with pytest.raises(LimitOutOfRange, match="memory"):
        await AsyncSandbox.create(memory_mb=1, url=daemon.url)
    with pytest.raises(InvalidInput, match="ttl"):
        Sandbox.create(ttl=0, url=daemon.url)
    with pytest.raises(InvalidInput, match="network"):
        Sandbox.create(network="open", url=daemon.url)
    with pytest.raises(SandboxNotFound):
        Sandbox.connect("sbx_0000000000000000", url=daemon.url)
    with pytest.raises(SandboxNotFound):
        await AsyncSandbox.connect("sbx_0000000000000000", url=daemon.url)


async def test_a_tcp_daemon_needs_a_valid_key(monkeypatch: pytest.MonkeyPatch) -> None:
    d = Daemon("--pool", "python=0", tcp=True)
    try:
        key = d.keys("create", "sdk-tests").splitlines()[0]
        d.start()
        with fission.sandbox(url=d.url, api_key=key) as s:
            assert s.run("print(6 * 7)").stdout == b"42\n"
            assert [i.id for i in Sandbox.list(url=d.url, api_key=key)] == [s.id]
            with monkeypatch.context() as env:  # the same through FISSION_URL / FISSION_API_KEY
                env.setenv("FISSION_URL", d.url)
                env.setenv("FISSION_API_KEY", key)
                Sandbox.connect(s.id).close()
        with pytest.raises(Unauthorized, match="fission keys create"):
            Sandbox.create(url=d.url)
        with pytest.raises(Unauthorized):
            fission.run("print(1)", url=d.url)
        with pytest.raises(Unauthorized):
            list(Sandbox.list(url=d.url, api_key="fsk_0000_not-a-key"))
        d.keys("revoke", "sdk-tests")
        with pytest.raises(Unauthorized):
            list(Sandbox.list(url=d.url, api_key=key))
        with pytest.raises(Unauthorized):
            await AsyncSandbox.create(url=d.url, api_key=key)
    finally:
        d.stop()
        d.remove()
