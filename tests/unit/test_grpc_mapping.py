"""The gRPC translation layer: error -> status mapping and message conversions (no server)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import grpc
import pytest

from fission.api import fission_pb2 as pb
from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.sandbox_spec import SandboxRecord, SandboxSpec, SandboxState
from fission.core.spec import RunResult
from fission.errors import (
    ERRORS_BY_CODE,
    AgentProtocolError,
    BootTimeout,
    Busy,
    Conflict,
    FileNotFound,
    FissionError,
    ImagesNotBuilt,
    InvalidInput,
    LimitOutOfRange,
    NotReady,
    PathNotAllowed,
    QuotaExceeded,
    SandboxNotFound,
    SandboxNotRunning,
    Unauthorized,
    UnknownLanguage,
    VMError,
)
from fission.server import grpc_messages as gm
from fission.server.daemon import build_config, grpc_address
from fission.server.grpc_server import run_events
from fission.server.models import LimitsBody

S = grpc.StatusCode


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("error", "status"),
    [
        (Unauthorized("no key"), S.UNAUTHENTICATED),
        (QuotaExceeded("over"), S.RESOURCE_EXHAUSTED),
        (Busy("full"), S.RESOURCE_EXHAUSTED),
        (SandboxNotFound("gone"), S.NOT_FOUND),
        (FileNotFound("gone"), S.NOT_FOUND),
        (InvalidInput("bad"), S.INVALID_ARGUMENT),
        (UnknownLanguage("cobol"), S.INVALID_ARGUMENT),
        (LimitOutOfRange("big"), S.INVALID_ARGUMENT),
        (PathNotAllowed("../x"), S.INVALID_ARGUMENT),
        (Conflict("state"), S.FAILED_PRECONDITION),
        (SandboxNotRunning("paused"), S.FAILED_PRECONDITION),
        (NotReady("no images"), S.UNAVAILABLE),
        (ImagesNotBuilt("no images"), S.UNAVAILABLE),
        (BootTimeout("slow"), S.DEADLINE_EXCEEDED),
        (VMError("died"), S.INTERNAL),
        (AgentProtocolError("garbage"), S.INTERNAL),
        (FissionError("bug"), S.INTERNAL),
    ],
)
def test_error_to_status(error: FissionError, status: grpc.StatusCode) -> None:
    assert gm.status_of(error) == status
    assert gm.error_metadata(error)[0] == ("fission-error-code", error.code)


def test_every_error_class_maps_by_its_http_status() -> None:
    for cls in ERRORS_BY_CODE.values():
        status = gm.status_of(cls("x"))
        assert status == gm.STATUS_BY_HTTP.get(cls.http_status, S.INTERNAL), cls
        if cls.http_status >= 500 and cls.http_status not in (501, 503, 504):
            assert status == S.INTERNAL


def test_a_rate_limit_says_when_to_retry() -> None:
    assert ("retry-after", "1") in gm.error_metadata(QuotaExceeded("over", retry_after=0.2))
    assert ("retry-after", "3") in gm.error_metadata(QuotaExceeded("over", retry_after=2.01))
    assert len(gm.error_metadata(QuotaExceeded("too many sandboxes"))) == 1


# -- requests --------------------------------------------------------------------------------------
def test_a_run_request_takes_the_rest_defaults() -> None:
    spec = gm.run_spec(pb.RunRequest(code="print(1)"))
    assert spec.language.name == "python" and spec.code == "print(1)"
    assert spec.limits == Limits() and spec.env == {} and spec.stdin is None


def test_a_run_request_with_everything_set() -> None:
    request = pb.RunRequest(
        language="js",
        code="1",
        limits=pb.Limits(timeout=2.5, memory_mb=128, output_limit_mb=0.5),
        env={"A": "b"},
        stdin=b"",
    )
    spec = gm.run_spec(request)
    assert spec.language.name == "node" and spec.env == {"A": "b"} and spec.stdin == b""
    assert spec.limits == Limits(timeout=2.5, memory_mb=128, output_limit_mb=0.5)


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        (pb.RunRequest(language="cobol", code="x"), UnknownLanguage),
        (pb.RunRequest(code="x", limits=pb.Limits(memory_mb=1)), LimitOutOfRange),
        (pb.RunRequest(code="x", limits=pb.Limits(timeout=0)), LimitOutOfRange),
        (pb.RunRequest(code="a\0b"), InvalidInput),
    ],
)
def test_a_bad_run_request_is_invalid_input(request_: pb.RunRequest, error: type) -> None:
    with pytest.raises(error):
        gm.run_spec(request_)


def test_the_limits_message_has_the_rest_fields() -> None:
    assert set(pb.Limits.DESCRIPTOR.fields_by_name) == set(LimitsBody.model_fields)


def test_a_sandbox_request() -> None:
    spec = gm.sandbox_spec(pb.CreateSandboxRequest())
    assert spec.language.name == "python" and spec.ttl == 300 and spec.network.value == "none"
    spec = gm.sandbox_spec(
        pb.CreateSandboxRequest(
            language="bash",
            ttl=60,
            env={"K": "v"},
            metadata={"team": "ml"},
            limits=pb.Limits(cpus=1, disk_mb=1024),
        )
    )
    assert (spec.language.name, spec.ttl, spec.env, spec.metadata) == (
        "bash",
        60,
        {"K": "v"},
        {"team": "ml"},
    )
    assert spec.limits.disk_mb == 1024
    for bad in (
        pb.CreateSandboxRequest(ttl=0),
        pb.CreateSandboxRequest(ttl=10**9),
        pb.CreateSandboxRequest(network="open"),
        pb.CreateSandboxRequest(metadata={"": "empty key"}),
    ):
        with pytest.raises(InvalidInput):
            gm.sandbox_spec(bad)


def test_an_exec_command_is_an_argv_or_a_shell_line() -> None:
    argv = pb.ExecRequest(argv=pb.Argv(args=["ls", "-l"]))
    assert gm.command_of(argv) == ["ls", "-l"]
    assert gm.command_of(pb.ExecRequest(shell="echo hi | wc")) == "echo hi | wc"
    with pytest.raises(InvalidInput, match="argv"):
        gm.command_of(pb.ExecRequest(sandbox_id="sbx_1"))


def test_optional_fields_are_none_when_unset() -> None:
    request = pb.ExecRequest(shell="x")
    assert gm.optional(request, "timeout") is None and gm.optional(request, "stdin") is None
    request = pb.ExecRequest(shell="x", timeout=0.0, cwd="", stdin=b"")
    assert (gm.optional(request, "timeout"), gm.optional(request, "cwd")) == (0.0, "")
    assert gm.optional(request, "stdin") == b""


def test_file_paths_must_be_named() -> None:
    assert gm.file_path("a/b") == "a/b"
    for bad in ("", "x" * 4097):
        with pytest.raises(InvalidInput):
            gm.file_path(bad)


def test_state_filter() -> None:
    assert gm.state_filter(pb.SANDBOX_STATE_UNSPECIFIED) is None
    assert gm.state_filter(pb.SANDBOX_STATE_PAUSED) == SandboxState.PAUSED
    assert gm.state_filter(pb.SANDBOX_STATE_RUNNING) == SandboxState.RUNNING
    with pytest.raises(InvalidInput):
        gm.state_filter(42)


# -- answers ---------------------------------------------------------------------------------------
def record(state: SandboxState = SandboxState.PAUSED) -> SandboxRecord:
    spec = SandboxSpec(
        resolve_language("python"), Limits(timeout=5), ttl=90, metadata={"team": "ml"}
    )
    return SandboxRecord("sbx_0123456789abcdef", spec, "key1", 1000.5, 1090.5, state)


def test_a_sandbox_message_mirrors_the_rest_json() -> None:
    body = record().to_json()
    message = gm.sandbox_message(record())
    assert set(pb.Sandbox.DESCRIPTOR.fields_by_name) == set(body)
    assert message.state == pb.SANDBOX_STATE_PAUSED
    for key, value in body.items():
        if key == "limits":
            assert {f.name: v for f, v in message.limits.ListFields()} == value
        elif key == "metadata":
            assert dict(message.metadata) == value
        elif key == "network_policy":
            assert gm.network_policy(message.network_policy).to_json() == value
        elif key == "lost_reason":  # optional: unset in the message, null in the JSON
            assert gm.optional(message, key) == value
        elif key != "state":
            assert getattr(message, key) == value, key


def test_every_state_has_a_message_value() -> None:
    for state in SandboxState:
        assert gm.sandbox_message(record(state)).state == gm.STATE_TO_PB[state]
        assert gm.state_filter(gm.STATE_TO_PB[state]) == state


def test_run_events() -> None:
    out = gm.output_event("stderr", b"\xff oops")
    assert out.WhichOneof("event") == "output"
    assert (out.output.stream, out.output.data) == (pb.STREAM_STDERR, b"\xff oops")
    result = RunResult(
        124, b"x", b"", True, False, True, 9, 10.5, 1.0, 12.0, checkpoint_id="snap_1"
    )
    message = gm.result_event(result).result
    body = result.to_json()
    del body["stdout"], body["stderr"]
    assert set(pb.Result.DESCRIPTOR.fields_by_name) == set(body)
    for key, value in body.items():
        assert getattr(message, key) == value, key


def test_pools_message() -> None:
    status = {
        "pools": [
            {
                "language": "python",
                "size": 2,
                "ready": 1,
                "starting": 1,
                "in_use": 0,
                "created": 3,
                "served": 2,
                "failed": 0,
                "busy": 0,
                "last_error": None,
                "median_ready_ms": None,
                "something_new": 1,
            }
        ],
        "memory_budget_mb": 4096,
        "memory_reserved_mb": 800,
        "reconciled": {"removed": 2},
        "sandboxes": 1,
    }
    message = gm.pools_message(status)
    pool = message.pools[0]
    assert (pool.language, pool.size, pool.ready, pool.served) == ("python", 2, 1, 2)
    assert not pool.HasField("median_ready_ms") and not pool.HasField("last_error")
    assert dict(message.reconciled) == {"removed": 2} and message.sandboxes == 1


def test_file_info_copies_the_fields_both_sides_know() -> None:
    @dataclasses.dataclass
    class Info:
        name: str
        path: str
        kind: str
        size: int
        mode: int
        mtime: float
        owner: str  # a field the message does not have

    info = Info("a.txt", "dir/a.txt", "file", 12, 0o644, 1.5, "sandbox")
    message = gm.file_info_message(info)
    assert (message.name, message.path, message.kind, message.size) == (
        "a.txt",
        "dir/a.txt",
        "file",
        12,
    )
    assert (message.mode, message.mtime) == (0o644, 1.5)
    assert gm.file_info_message({"name": "b", "size": 3}).size == 3


def test_chunks_of() -> None:
    data = bytes(range(256)) * 10_000
    pieces = list(gm.chunks_of(data, 1000))
    assert b"".join(pieces) == data and max(map(len, pieces)) == 1000
    assert list(gm.chunks_of(b"")) == []
    assert [len(p) for p in gm.chunks_of(b"x" * (2 * gm.MiB + 5))] == [gm.MiB, gm.MiB, 5]


# -- streaming a run ------------------------------------------------------------------------------
RESULT = RunResult(0, b"", b"", False, False, False, 0, 1.0, 0.0, 1.0)


async def test_run_events_streams_output_then_the_result() -> None:
    async def work(sink: Any) -> RunResult:
        sink("stdout", b"a")
        await asyncio.sleep(0)
        sink("stderr", b"b")
        sink("stdout", b"c")
        return RESULT

    events = [event async for event in run_events(work)]
    assert [e.output.data for e in events[:-1]] == [b"a", b"b", b"c"]
    assert events[-1].WhichOneof("event") == "result"


async def test_run_events_raises_the_error_after_the_output() -> None:
    async def work(sink: Any) -> RunResult:
        sink("stdout", b"partial")
        raise SandboxNotFound("deleted")

    seen = []
    with pytest.raises(SandboxNotFound):
        async for event in run_events(work):
            seen.append(event.output.data)
    assert seen == [b"partial"]


async def test_closing_the_stream_cancels_the_work() -> None:
    cancelled = asyncio.Event()

    async def work(sink: Any) -> RunResult:
        sink("stdout", b"first")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return RESULT

    events = run_events(work)
    assert (await anext(events)).output.data == b"first"
    await events.aclose()
    assert cancelled.is_set()


# -- where the daemon listens ----------------------------------------------------------------------
def test_grpc_addresses() -> None:
    assert grpc_address(None, None, None) is None
    assert grpc_address(None, 50051, None) == "127.0.0.1:50051"
    assert grpc_address("0.0.0.0", 1, None) == "0.0.0.0:1"
    assert grpc_address("::1", 443, None) == "[::1]:443"
    assert grpc_address("[::1]", 443, None) == "[::1]:443"
    assert grpc_address(None, None, Path("/run/f/g.sock")) == "unix:/run/f/g.sock"
    for host, port, socket in (
        (None, 0, None),
        (None, 70000, None),
        ("0.0.0.0", None, None),
        (None, 1, Path("/x.sock")),
    ):
        with pytest.raises(InvalidInput):
            grpc_address(host, port, socket)


def test_grpc_on_tcp_needs_keys_and_on_a_socket_does_not(tmp_path: Path) -> None:
    def config(file: Path | None = None, **grpc: Any) -> Any:
        return build_config(
            config_file=file,
            pools=[],
            memory_budget_mb=1024,
            acquire_timeout=None,
            socket=tmp_path / "d.sock",
            host=None,
            port=None,
            state_dir=tmp_path / "state",
            db=tmp_path / "keys.sqlite3",
            **grpc,
        )

    assert config().grpc_address is None
    tcp = config(grpc_port=50051)
    assert (tcp.grpc_address, tcp.grpc_keys_db) == ("127.0.0.1:50051", tmp_path / "keys.sqlite3")
    assert tcp.keys_db is None  # the REST socket still needs no key
    local = config(grpc_socket=tmp_path / "g.sock")
    assert (local.grpc_address, local.grpc_keys_db) == (f"unix:{tmp_path}/g.sock", None)
    toml = tmp_path / "fission.toml"
    toml.write_text(f'grpc_socket = "{tmp_path}/f.sock"\n')
    assert config(toml).grpc_address == f"unix:{tmp_path}/f.sock"
    assert config(toml, grpc_port=9000, grpc_host="::").grpc_address == "[::]:9000"  # flags win
