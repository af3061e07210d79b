"""The gRPC API against a real daemon: `fission serve --grpc-port` as a subprocess, real VMs.

One daemon for the module (REST and gRPC on loopback TCP, so every call needs an API key),
SIGTERMed at the end, after which no VM of it may be left.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from fission.agent.client import AgentClient
from fission.api import fission_pb2 as pb
from fission.api import fission_pb2_grpc as pb_grpc
from tests.integration.conftest import FISSION
from tests.integration.test_warm import qemu_pids

pytestmark = pytest.mark.vm

MiB = 1024 * 1024
needs_agent_files = pytest.mark.skipif(
    not hasattr(AgentClient, "write_file"),
    reason="the guest agent has no file operations yet (AgentClient.write_file)",
)
needs_agent_contexts = pytest.mark.skipif(
    not hasattr(AgentClient, "write_file"),
    reason="the guest agent has no code contexts yet (lands with its file operations)",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class GrpcDaemon:
    """`fission serve` with REST and gRPC on 127.0.0.1, its own state dir and key database."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fgr-", dir="/tmp"))
        self.state = self.dir / "state"
        self.db = self.dir / "keys.sqlite3"
        self.port, self.grpc_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None

    def keys(self, *args: str) -> str:
        """Run `fission keys ARGS --db DB`; its stdout."""
        out = subprocess.run(
            [FISSION, "keys", *args, "--db", str(self.db)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout

    def create_key(self, name: str, *options: str) -> str:
        """A new API key; `keys create` prints it alone on stdout."""
        return self.keys("create", name, *options).strip()

    def start(self) -> None:
        """Start, and wait until gRPC answers and the python pool has a VM ready."""
        self.key = self.create_key("grpc-main")
        argv = [
            FISSION,
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--grpc-port",
            str(self.grpc_port),
            "--state-dir",
            str(self.state),
            "--db",
            str(self.db),
            "--pool",
            "python=1",
            "--on-stop",
            "delete",
        ]
        with open(self.dir / "daemon.log", "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        fission = pb_grpc.FissionStub(self.channel)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                pools = fission.Pools(pb.PoolsRequest(), metadata=auth(self.key), timeout=5)
                if any(p.language == "python" and p.ready >= 1 for p in pools.pools):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"daemon not ready: {self.log()}")

    def log(self) -> str:
        return (self.dir / "daemon.log").read_text(errors="replace")

    def stop(self) -> int | None:
        """SIGTERM the daemon by its pid and wait; its exit status."""
        if self.channel is not None:
            self.channel.close()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
                raise AssertionError(f"daemon ignored SIGTERM: {self.log()}") from None
        return self.proc.returncode


def auth(key: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``key``."""
    return (("authorization", f"Bearer {key}"),) if key else ()


@pytest.fixture(scope="module")
def daemon() -> Iterator[GrpcDaemon]:
    d = GrpcDaemon()
    try:
        d.start()
        yield d
    finally:
        d.stop()
        leftovers = qemu_pids(d.state)
        log = d.log() if (d.dir / "daemon.log").exists() else ""
        shutil.rmtree(d.dir, ignore_errors=True)
        assert leftovers == [], f"VMs outlived SIGTERM: {log}"


@pytest.fixture(scope="module")
def fission(daemon: GrpcDaemon) -> pb_grpc.FissionStub:
    assert daemon.channel is not None
    return pb_grpc.FissionStub(daemon.channel)


@pytest.fixture(scope="module")
def sandboxes(daemon: GrpcDaemon) -> pb_grpc.SandboxesStub:
    assert daemon.channel is not None
    return pb_grpc.SandboxesStub(daemon.channel)


def failure(call: object) -> grpc.RpcError:
    """The RpcError a call (a zero-argument callable) raises."""
    with pytest.raises(grpc.RpcError) as info:
        result = call()  # type: ignore[operator]
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    return info.value


def error_code(error: grpc.RpcError) -> str:
    """fission's code slug in an error's trailing metadata."""
    return dict(error.trailing_metadata() or ())["fission-error-code"]


def collect(events: Iterator[pb.RunEvent]) -> tuple[list[tuple[str, bytes]], pb.Result]:
    """Output chunks (consecutive chunks of one stream joined) and the result of a run."""
    chunks: list[tuple[str, bytes]] = []
    result = None
    for event in events:
        assert result is None, "nothing may follow the result"
        if event.WhichOneof("event") == "output":
            stream = pb.Stream.Name(event.output.stream)
            if chunks and chunks[-1][0] == stream:
                chunks[-1] = (stream, chunks[-1][1] + event.output.data)
            else:
                chunks.append((stream, event.output.data))
        else:
            result = event.result
    assert result is not None, "a run ends with its result"
    return chunks, result


def stdout_of(events: Iterator[pb.RunEvent]) -> bytes:
    chunks, result = collect(events)
    assert result.exit_code == 0, chunks
    return b"".join(data for stream, data in chunks if stream == "STREAM_STDOUT")


# -- auth ------------------------------------------------------------------------------------------
def test_health_needs_no_key_and_everything_else_does(
    daemon: GrpcDaemon, fission: pb_grpc.FissionStub, sandboxes: pb_grpc.SandboxesStub
) -> None:
    health = fission.Health(pb.HealthRequest(), timeout=10)
    assert health.ok and health.version
    for call in (
        lambda: fission.Pools(pb.PoolsRequest(), timeout=10),
        lambda: sandboxes.List(pb.ListSandboxesRequest(), timeout=10),
        lambda: fission.Run(pb.RunRequest(code="print(1)"), timeout=10),
        lambda: fission.Pools(pb.PoolsRequest(), metadata=auth("fsk_nope"), timeout=10),
    ):
        error = failure(call)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        assert error_code(error) == "unauthorized"


def test_a_revoked_key_is_unauthenticated(daemon: GrpcDaemon, fission: pb_grpc.FissionStub) -> None:
    key = daemon.create_key("grpc-revoked")
    assert fission.Pools(pb.PoolsRequest(), metadata=auth(key), timeout=10).memory_budget_mb > 0
    daemon.keys("revoke", "grpc-revoked")
    error = failure(lambda: fission.Pools(pb.PoolsRequest(), metadata=auth(key), timeout=10))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in (error.details() or "")


def test_a_quota_overrun_is_resource_exhausted(
    daemon: GrpcDaemon, sandboxes: pb_grpc.SandboxesStub
) -> None:
    key = daemon.create_key("grpc-one-sandbox", "--max-sandboxes", "1")
    first = sandboxes.Create(
        pb.CreateSandboxRequest(language="python"), metadata=auth(key), timeout=120
    )
    try:
        error = failure(
            lambda: sandboxes.Create(pb.CreateSandboxRequest(), metadata=auth(key), timeout=120)
        )
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_code(error) == "quota_exceeded"
        assert "--max-sandboxes" in (error.details() or "")
    finally:
        sandboxes.Delete(
            pb.DeleteSandboxRequest(sandbox_id=first.id), metadata=auth(key), timeout=60
        )


# -- one-shot runs ---------------------------------------------------------------------------------
def test_one_shot_run_streams_in_order(daemon: GrpcDaemon, fission: pb_grpc.FissionStub) -> None:
    code = (
        "import sys, time\nprint('one')\ntime.sleep(0.3)\nprint('two', file=sys.stderr)\n"
        "time.sleep(0.3)\nprint('three')\nsys.exit(3)\n"
    )
    chunks, result = collect(
        fission.Run(
            pb.RunRequest(language="python", code=code), metadata=auth(daemon.key), timeout=120
        )
    )
    assert chunks == [
        ("STREAM_STDOUT", b"one\n"),
        ("STREAM_STDERR", b"two\n"),
        ("STREAM_STDOUT", b"three\n"),
    ]
    assert (result.exit_code, result.timed_out, result.oom, result.signal) == (3, False, False, 0)
    assert result.duration_ms > 0

    lines = fission.Run(
        pb.RunRequest(language="bash", code="seq 1 500", stdin=b""),
        metadata=auth(daemon.key),
        timeout=120,
    )
    assert stdout_of(lines) == "".join(f"{i}\n" for i in range(1, 501)).encode()

    error = failure(
        lambda: fission.Run(
            pb.RunRequest(language="cobol", code="x"), metadata=auth(daemon.key), timeout=30
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_code(error) == "unknown_language"


def test_a_cancelled_run_ends_cleanly(daemon: GrpcDaemon, fission: pb_grpc.FissionStub) -> None:
    code = "import time\nfor i in range(600):\n    print(i)\n    time.sleep(0.1)\n"
    call = fission.Run(pb.RunRequest(code=code), metadata=auth(daemon.key), timeout=120)
    first = next(call)
    assert first.output.data.startswith(b"0")
    call.cancel()
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    # The machine went back (destroyed, the pool refilled): the daemon serves the next run.
    after = fission.Run(pb.RunRequest(code="print(7)"), metadata=auth(daemon.key), timeout=120)
    assert stdout_of(after) == b"7\n"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pools = fission.Pools(pb.PoolsRequest(), metadata=auth(daemon.key), timeout=10)
        if all(pool.in_use == 0 for pool in pools.pools):
            break
        time.sleep(0.2)
    assert all(pool.in_use == 0 for pool in pools.pools)


# -- sandboxes -------------------------------------------------------------------------------------
@pytest.fixture
def sandbox(daemon: GrpcDaemon, sandboxes: pb_grpc.SandboxesStub) -> Iterator[pb.Sandbox]:
    created = sandboxes.Create(
        pb.CreateSandboxRequest(
            language="python", ttl=300, metadata={"suite": "grpc"}, env={"GREETING": "hi"}
        ),
        metadata=auth(daemon.key),
        timeout=120,
    )
    yield created
    try:
        sandboxes.Delete(
            pb.DeleteSandboxRequest(sandbox_id=created.id), metadata=auth(daemon.key), timeout=60
        )
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND  # the test deleted it itself


def test_sandbox_lifecycle(
    daemon: GrpcDaemon, sandboxes: pb_grpc.SandboxesStub, sandbox: pb.Sandbox
) -> None:
    md = auth(daemon.key)
    sid = sandbox.id
    assert sid.startswith("sbx_") and sandbox.state == pb.SANDBOX_STATE_RUNNING
    assert sandbox.limits.memory_mb == 256 and sandbox.ttl == 300

    # The message mirrors the REST JSON of the same sandbox.
    rest = httpx.get(
        f"http://127.0.0.1:{daemon.port}/v1/sandboxes/{sid}",
        headers={"Authorization": f"Bearer {daemon.key}"},
        timeout=30,
    ).json()
    got = sandboxes.Get(pb.GetSandboxRequest(sandbox_id=sid), metadata=md, timeout=30)
    assert rest["state"] == "running" and rest["language"] == got.language == "python"
    assert rest["metadata"] == dict(got.metadata) and rest["ttl"] == got.ttl
    assert rest["limits"]["memory_mb"] == got.limits.memory_mb
    assert rest["expires_at"] == pytest.approx(got.expires_at)

    listed = sandboxes.List(
        pb.ListSandboxesRequest(metadata={"suite": "grpc"}, page_size=10), metadata=md, timeout=30
    )
    assert sid in [s.id for s in listed.sandboxes] and listed.next_page_token == ""
    paused_only = sandboxes.List(
        pb.ListSandboxesRequest(state=pb.SANDBOX_STATE_PAUSED), metadata=md, timeout=30
    )
    assert sid not in [s.id for s in paused_only.sandboxes]

    code = "import os, sys\nprint(os.environ['GREETING'])\nprint('warn', file=sys.stderr)\n"
    chunks, result = collect(
        sandboxes.RunCode(pb.RunCodeRequest(sandbox_id=sid, code=code), metadata=md, timeout=120)
    )
    assert result.exit_code == 0
    # Written back to back with nothing between: two pipes do not order them against each other
    # (test_one_shot_run_streams_in_order checks the order when time separates the writes).
    by_stream: dict[str, bytes] = {}
    for stream, data in chunks:
        by_stream[stream] = by_stream.get(stream, b"") + data
    assert by_stream == {"STREAM_STDOUT": b"hi\n", "STREAM_STDERR": b"warn\n"}

    argv = pb.ExecRequest(
        sandbox_id=sid,
        argv=pb.Argv(args=["sh", "-c", "echo $FOO; pwd"]),
        env={"FOO": "bar"},
        cwd="/tmp",
    )
    assert stdout_of(sandboxes.Exec(argv, metadata=md, timeout=120)) == b"bar\n/tmp\n"
    piped = pb.ExecRequest(sandbox_id=sid, shell="tr a-z A-Z", stdin=b"quiet\n")
    assert stdout_of(sandboxes.Exec(piped, metadata=md, timeout=120)) == b"QUIET\n"
    write = pb.ExecRequest(sandbox_id=sid, shell="echo kept > /home/sandbox/keep.txt")
    assert stdout_of(sandboxes.Exec(write, metadata=md, timeout=120)) == b""
    error = failure(lambda: sandboxes.Exec(pb.ExecRequest(sandbox_id=sid), metadata=md, timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT

    paused = sandboxes.Pause(pb.PauseSandboxRequest(sandbox_id=sid), metadata=md, timeout=120)
    assert paused.state == pb.SANDBOX_STATE_PAUSED
    error = failure(
        lambda: sandboxes.Exec(
            pb.ExecRequest(sandbox_id=sid, shell="true"), metadata=md, timeout=30
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_code(error) == "sandbox_not_running"
    resumed = sandboxes.Resume(pb.ResumeSandboxRequest(sandbox_id=sid), metadata=md, timeout=120)
    assert resumed.state == pb.SANDBOX_STATE_RUNNING
    read = pb.ExecRequest(sandbox_id=sid, argv=pb.Argv(args=["cat", "/home/sandbox/keep.txt"]))
    assert stdout_of(sandboxes.Exec(read, metadata=md, timeout=120)) == b"kept\n"

    extended = sandboxes.SetTtl(pb.SetTtlRequest(sandbox_id=sid, ttl=600), metadata=md, timeout=30)
    assert extended.ttl == 600 and extended.expires_at > resumed.expires_at
    error = failure(
        lambda: sandboxes.SetTtl(pb.SetTtlRequest(sandbox_id=sid, ttl=0), metadata=md, timeout=30)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT

    sandboxes.Delete(pb.DeleteSandboxRequest(sandbox_id=sid), metadata=md, timeout=60)
    error = failure(
        lambda: sandboxes.Get(pb.GetSandboxRequest(sandbox_id=sid), metadata=md, timeout=30)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error_code(error) == "sandbox_not_found"


def test_another_keys_sandbox_is_not_found(
    daemon: GrpcDaemon, sandboxes: pb_grpc.SandboxesStub, sandbox: pb.Sandbox
) -> None:
    other = daemon.create_key("grpc-other")
    error = failure(
        lambda: sandboxes.Get(
            pb.GetSandboxRequest(sandbox_id=sandbox.id), metadata=auth(other), timeout=30
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    listed = sandboxes.List(pb.ListSandboxesRequest(), metadata=auth(other), timeout=30)
    assert list(listed.sandboxes) == []


@needs_agent_files
def test_a_20_mb_file_both_ways(
    daemon: GrpcDaemon, sandboxes: pb_grpc.SandboxesStub, sandbox: pb.Sandbox
) -> None:
    md = auth(daemon.key)
    data = os.urandom(20 * MiB)
    path = "big/blob.bin"
    sandboxes.MakeDir(pb.MakeDirRequest(sandbox_id=sandbox.id, path="big"), metadata=md, timeout=60)

    def upload() -> Iterator[pb.WriteFileRequest]:
        yield pb.WriteFileRequest(header=pb.WriteFileHeader(sandbox_id=sandbox.id, path=path))
        for start in range(0, len(data), MiB):
            yield pb.WriteFileRequest(data=data[start : start + MiB])

    info = sandboxes.WriteFile(upload(), metadata=md, timeout=240)
    assert info.size == len(data)
    digest, sizes = hashlib.sha256(), []
    for chunk in sandboxes.ReadFile(
        pb.ReadFileRequest(sandbox_id=sandbox.id, path=path), metadata=md, timeout=240
    ):
        digest.update(chunk.data)
        sizes.append(len(chunk.data))
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert sum(sizes) == len(data) and max(sizes) <= MiB

    stat = sandboxes.StatFile(
        pb.StatFileRequest(sandbox_id=sandbox.id, path=path), metadata=md, timeout=60
    )
    assert stat.size == len(data)
    listing = sandboxes.ListFiles(
        pb.ListFilesRequest(sandbox_id=sandbox.id, path="big"), metadata=md, timeout=60
    )
    assert [entry.name for entry in listing.entries] == ["blob.bin"]
    sandboxes.RemoveFile(
        pb.RemoveFileRequest(sandbox_id=sandbox.id, path="big", recursive=True),
        metadata=md,
        timeout=60,
    )
    error = failure(
        lambda: sandboxes.StatFile(
            pb.StatFileRequest(sandbox_id=sandbox.id, path=path), metadata=md, timeout=60
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    escape = failure(
        lambda: sandboxes.ReadFile(
            pb.ReadFileRequest(sandbox_id=sandbox.id, path="../../etc/shadow"),
            metadata=md,
            timeout=60,
        )
    )
    assert escape.code() == grpc.StatusCode.INVALID_ARGUMENT


@needs_agent_contexts
def test_a_stateful_context(
    daemon: GrpcDaemon, sandboxes: pb_grpc.SandboxesStub, sandbox: pb.Sandbox
) -> None:
    md = auth(daemon.key)

    def run(code: str, **extra: object) -> bytes:
        request = pb.RunCodeRequest(sandbox_id=sandbox.id, code=code, **extra)  # type: ignore[arg-type]
        return stdout_of(sandboxes.RunCode(request, metadata=md, timeout=120))

    assert run("x = 41", context="notebook") == b""
    assert run("print(x + 1)", context="notebook") == b"42\n"
    assert run("print('x' in globals())", context="notebook", fresh_context=True) == b"False\n"
    assert run("print('x' in globals())") == b"False\n"  # no context: a fresh interpreter
