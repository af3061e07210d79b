"""The SDK's pure half and its error mapping: requests, responses, streams, connections."""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest

import fission.sdk
from fission.api.run_stream import error_body, output_line, result_line
from fission.core.languages import resolve_language
from fission.core.sandbox_spec import SandboxRecord, SandboxSpec
from fission.core.spec import RunResult, RunSpec
from fission.errors import (
    ERRORS_BY_CODE,
    FissionError,
    InvalidInput,
    NotReady,
    QuotaExceeded,
    SandboxNotFound,
    UnknownLanguage,
)
from fission.sdk import _backend
from fission.sdk import _requests as calls
from fission.sdk._connection import resolve_connection
from fission.sdk._http import SyncHTTP, converted
from fission.sdk._local import atomic_target
from fission.sdk._models import OutputEvent
from fission.sdk._sync import Sandbox

RESULT = RunResult(3, b"", b"", False, False, False, 0, 12.5, 0.0, 20.25)


@pytest.fixture(autouse=True)
def no_sdk_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's FISSION_URL or FISSION_API_KEY must not leak into these tests."""
    monkeypatch.delenv("FISSION_URL", raising=False)
    monkeypatch.delenv("FISSION_API_KEY", raising=False)


def encoded(*lines: dict[str, Any]) -> list[str]:
    """Lines as the daemon sends them."""
    return [json.dumps(line) for line in lines]


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", sorted(ERRORS_BY_CODE))
def test_every_error_code_maps_to_its_class(code: str) -> None:
    cls = ERRORS_BY_CODE[code]
    body = json.dumps({"error": error_body(cls("what went wrong"))}).encode()
    found = calls.error_from_response(cls.http_status, body, {}, "here")
    assert type(found) is cls
    assert found.message == "what went wrong"
    assert isinstance(found, FissionError)


@pytest.mark.parametrize("code", sorted(ERRORS_BY_CODE))
def test_every_streamed_error_maps_to_its_class(code: str) -> None:
    cls = ERRORS_BY_CODE[code]
    assembler = calls.RunAssembler()
    with pytest.raises(cls, match="mid-run") as caught:
        assembler.feed(json.dumps(error_body(cls("failed mid-run"))))
    assert type(caught.value) is cls


def test_the_sdk_reexports_the_one_hierarchy() -> None:
    for cls in ERRORS_BY_CODE.values():
        assert getattr(fission.sdk, cls.__name__) is cls


def test_an_unknown_code_is_a_plain_fission_error() -> None:
    body = b'{"error": {"code": "from_the_future", "message": "new"}}'
    found = calls.error_from_response(500, body, {}, "here")
    assert type(found) is FissionError and found.message == "new"


@pytest.mark.parametrize(
    ("status", "body"),
    [(502, b"<html>Bad Gateway</html>"), (404, b'{"detail": "Not Found"}'), (500, b"")],
)
def test_failures_without_an_error_body_name_the_status(status: int, body: bytes) -> None:
    found = calls.error_from_response(status, body, {}, "http://127.0.0.1:9")
    assert type(found) is FissionError
    assert f"HTTP {status}" in found.message and "http://127.0.0.1:9" in found.message


def test_quota_errors_carry_retry_after() -> None:
    body = json.dumps({"error": error_body(QuotaExceeded("slow down"))}).encode()
    found = calls.error_from_response(429, body, {"retry-after": "7"}, "here")
    assert isinstance(found, QuotaExceeded) and found.retry_after == 7.0
    found = calls.error_from_response(429, body, {}, "here")
    assert isinstance(found, QuotaExceeded) and found.retry_after is None


def test_parse_json() -> None:
    assert calls.parse_json(200, b'{"ok": true}', {}, "here") == {"ok": True}
    assert calls.parse_json(204, b"", {}, "here") is None
    with pytest.raises(FissionError, match="without JSON"):
        calls.parse_json(200, b"not json", {}, "here")
    body = json.dumps({"error": error_body(SandboxNotFound("gone"))}).encode()
    with pytest.raises(SandboxNotFound, match="gone"):
        calls.parse_json(404, body, {}, "here")


# -- streams -------------------------------------------------------------------------------------
def test_downloaded_files_and_install_facts_come_before_the_result() -> None:
    from dataclasses import replace

    from fission.api.run_stream import closing_lines
    from fission.core.provision import InstallResult

    ran = replace(RESULT, files={"/data/out.bin": b"\x00\xffdata", "/data/empty": b""})
    lines = encoded(output_line("stdout", b"x"), *closing_lines(InstallResult(ran, True, 51.5)))
    assembler = calls.RunAssembler()
    events = [assembler.feed(line) for line in lines]
    result = events[-1]
    assert isinstance(result, RunResult) and result.files == ran.files
    assert events[1:-1] == [None, None, None]  # install facts and files are not output events
    assert assembler.install == {"cached": True, "setup_ms": 51.5, "installed": True}
    assert "files" not in result.to_json()  # --json output keeps its shape


def test_run_requests_carry_policy_uploads_and_downloads() -> None:
    call = calls.one_shot_run(
        "python",
        "print(1)",
        {"timeout": 5},
        network={"enabled": True, "allow_hosts": ["127.0.0.1:8"]},
        uploads=[("/data/in.csv", b"a,b\n")],
        downloads=["/data/out.txt"],
    )
    assert call.json is not None
    assert call.json["network"] == {"enabled": True, "allow_hosts": ["127.0.0.1:8"]}
    assert call.json["uploads"] == [{"path": "/data/in.csv", "data_b64": "YSxiCg=="}]
    assert call.json["downloads"] == ["/data/out.txt"]


def test_a_stream_becomes_events_in_order_then_the_result() -> None:
    lines = encoded(
        output_line("stdout", b"one\n"),
        output_line("stderr", b"warn\n"),
        output_line("stdout", b"\xff\xfe"),  # not UTF-8: sent as data_b64
        output_line("stdout", b"two\n"),
        result_line(RESULT),
    )
    assembler = calls.RunAssembler()
    events = [assembler.feed(line) for line in ["", *lines]]
    assert events[0] is None
    assert events[1:5] == [
        OutputEvent("stdout", b"one\n"),
        OutputEvent("stderr", b"warn\n"),
        OutputEvent("stdout", b"\xff\xfe"),
        OutputEvent("stdout", b"two\n"),
    ]
    result = events[5]
    assert isinstance(result, RunResult) and assembler.result is result
    assert result.stdout == b"one\n\xff\xfetwo\n" and result.stderr == b"warn\n"
    assert (result.exit_code, result.duration_ms, result.total_ms) == (3, 12.5, 20.25)


@pytest.mark.parametrize(
    "line", ["not json", '{"no_type": 1}', '{"type": "output"}', '{"type": "result"}']
)
def test_malformed_lines_are_fission_errors(line: str) -> None:
    with pytest.raises(FissionError, match="cannot read"):
        calls.RunAssembler().feed(line)


def test_an_unknown_line_type_is_an_error() -> None:
    with pytest.raises(FissionError, match="unknown type 'progress'"):
        calls.RunAssembler().feed('{"type": "progress"}')


def test_callbacks_are_picked_by_stream() -> None:
    out, err = object(), object()
    assert calls.callback_for(OutputEvent("stdout", b""), out, err) is out
    assert calls.callback_for(OutputEvent("stderr", b""), out, err) is err
    assert calls.callback_for(OutputEvent("other", b""), out, err) is None


# -- requests ------------------------------------------------------------------------------------
def test_create_body_keeps_ttl_timeout_and_limits_apart() -> None:
    call = calls.create_sandbox(
        "python",
        ttl=600,
        timeout=5,
        memory_mb=512,
        cpus=2,
        disk_mb=1024,
        env={"A": "1"},
        metadata={"team": "ml"},
        network="none",
    )
    assert (call.method, call.path, call.run_timeout) == ("POST", "/v1/sandboxes", None)
    assert call.json == {
        "language": "python",
        "ttl": 600,
        "timeout": 5,
        "memory_mb": 512,
        "cpus": 2,
        "disk_mb": 1024,
        "env": {"A": "1"},
        "metadata": {"team": "ml"},
        "network": "none",
    }


def test_runs_and_commands_stream_with_their_own_deadline() -> None:
    run = calls.run_code(
        "sbx_1", "x", timeout=None, default_timeout=30, env=None, context="c", fresh_context=True
    )
    assert run.path == "/v1/sandboxes/sbx_1/run" and run.run_timeout == 30
    assert run.headers["Accept"] == calls.NDJSON
    assert run.json == {
        "code": "x",
        "timeout": None,
        "env": {},
        "context": "c",
        "fresh_context": True,
    }
    cmd = calls.exec_command(
        "sbx_1", ["ls", "-l"], timeout=4, default_timeout=30, env={"A": "b"}, cwd="/tmp", stdin="hi"
    )
    assert cmd.run_timeout == 4 and cmd.json is not None
    assert cmd.json["command"] == ["ls", "-l"] and cmd.json["cwd"] == "/tmp"
    assert base64.b64decode(cmd.json["stdin_b64"]) == b"hi"
    one_shot = calls.one_shot_run("bash", "echo", {"timeout": 9.0, "memory_mb": 128}, None, b"\0")
    assert one_shot.json is not None and one_shot.run_timeout == 9.0
    assert one_shot.json["memory_mb"] == 128 and one_shot.json["stdin_b64"] == "AA=="


def test_listing_params_repeat_metadata_and_carry_the_cursor() -> None:
    call = calls.list_sandboxes("paused", {"team": "ml", "job": "a:b"}, "123.0~sbx_1")
    assert call.params == (
        ("limit", str(calls.PAGE_SIZE)),
        ("state", "paused"),
        ("metadata", "team:ml"),
        ("metadata", "job:a:b"),
        ("cursor", "123.0~sbx_1"),
    )
    assert calls.list_sandboxes(None, None).params == (("limit", str(calls.PAGE_SIZE)),)


def test_ids_and_paths_are_quoted_and_sent_as_parameters() -> None:
    assert calls.get_sandbox("../x?y").path == "/v1/sandboxes/..%2Fx%3Fy"
    call = calls.remove_file("sbx_1", "a dir/f", True)
    assert (call.method, call.path) == ("DELETE", "/v1/sandboxes/sbx_1/files")
    assert call.params == (("path", "a dir/f"), ("recursive", "true"))
    assert calls.make_dir("sbx_1", "d").json == {"path": "d"}


# -- responses -----------------------------------------------------------------------------------
def test_a_sandbox_record_reads_back_as_sandbox_info() -> None:
    spec = SandboxSpec(resolve_language("node"), ttl=90, metadata={"team": "ml"})
    record = SandboxRecord("sbx_0123", spec, None, 100.0, 190.0)
    info = calls.parse_sandbox(record.to_json())
    assert (info.id, info.language, info.state, info.ttl) == ("sbx_0123", "node", "running", 90)
    assert (info.created_at, info.expires_at, info.timeout) == (100.0, 190.0, 30.0)
    assert (info.memory_mb, info.cpus, info.disk_mb, info.metadata) == (256, 1, 512, {"team": "ml"})
    page, cursor = calls.parse_page({"sandboxes": [record.to_json()], "next_cursor": "c"})
    assert page == [info] and cursor == "c"
    with pytest.raises(FissionError, match="cannot read"):
        calls.parse_sandbox({"id": "x"})


def test_file_facts_read_back() -> None:
    info = calls.parse_file_info({"path": "d/f.txt", "type": "file", "size": 3, "mode": 0o644})
    assert (info.name, info.kind, info.size, info.is_dir) == ("f.txt", "file", 3, False)
    assert calls.parse_file_info({"path": "d/", "is_dir": True}).is_dir
    entries = calls.parse_entries({"entries": [{"path": "a", "name": "a", "type": "dir"}]})
    assert [e.name for e in entries] == ["a"] and entries[0].is_dir
    with pytest.raises(FissionError, match="cannot read"):
        calls.parse_file_info({"size": 1})


# -- connections ---------------------------------------------------------------------------------
def test_the_default_is_the_local_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FISSION_SOCKET", str(tmp_path / "d.sock"))
    conn = resolve_connection()
    assert conn.socket == tmp_path / "d.sock" and not conn.explicit
    assert "Authorization" not in conn.headers and conn.request_timeout == 60.0


def test_urls_keys_and_their_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FISSION_URL", "http://10.0.0.1:8080/")
    monkeypatch.setenv("FISSION_API_KEY", "fsn_env")
    conn = resolve_connection(request_timeout=5)
    assert (conn.base_url, conn.socket, conn.explicit) == ("http://10.0.0.1:8080", None, True)
    assert conn.headers["Authorization"] == "Bearer fsn_env"
    conn = resolve_connection("unix:///run/f.sock", api_key="fsn_arg")
    assert conn.socket == Path("/run/f.sock") and conn.headers["Authorization"] == "Bearer fsn_arg"
    assert resolve_connection("unix:/run/g.sock").socket == Path("/run/g.sock")


@pytest.mark.parametrize("url", ["ftp://x", "localhost:8080", "unix:"])
def test_bad_urls_are_invalid_input(url: str) -> None:
    with pytest.raises(InvalidInput, match="url"):
        resolve_connection(url)


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), True])
def test_request_timeout_must_be_positive_seconds(value: float) -> None:
    with pytest.raises(InvalidInput, match="request_timeout"):
        resolve_connection("http://x", request_timeout=value)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_no_daemon_on_the_socket_is_not_ready(tmp_path: Path) -> None:
    with pytest.raises(
        NotReady, match=r"no fission daemon answers at the Unix socket .*fission serve"
    ):
        Sandbox.create(url=f"unix:{tmp_path / 'none.sock'}")


def test_no_daemon_on_tcp_is_not_ready() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(NotReady, match=f"no fission daemon answers at {url}: start one"):
        list(Sandbox.list(url=url))


RUN_CALL = calls.run_code(
    "s", "x", timeout=3, default_timeout=30, env=None, context=None, fresh_context=False
)


@pytest.mark.parametrize(
    ("call", "raised", "expected", "message"),
    [
        (calls.health(), httpx.ReadTimeout("slow"), FissionError, r"request_timeout=7 s: raise"),
        (RUN_CALL, httpx.ReadTimeout("slow"), FissionError, r"timeout=3 s \+ request_timeout=7"),
        (RUN_CALL, httpx.RemoteProtocolError("eof"), FissionError, r"lost the .* POST /v1/sand"),
        (RUN_CALL, httpx.ConnectError("refused"), NotReady, r"no fission daemon answers at http"),
    ],
)
def test_transport_errors_are_converted_in_one_place(
    call: calls.Call, raised: Exception, expected: type[FissionError], message: str
) -> None:
    conn = resolve_connection("http://h:1", request_timeout=7)
    with pytest.raises(expected, match=message) as caught, converted(conn, call):
        raise raised
    assert caught.value.__cause__ is raised


def test_a_closed_client_says_so() -> None:
    http = SyncHTTP(resolve_connection("http://h:1"))
    http.close()
    with pytest.raises(FissionError, match="closed"):
        http.json(calls.health())


# -- fission.run falls back only for the local socket -------------------------------------------
def test_run_goes_embedded_when_no_local_daemon_answers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FISSION_SOCKET", str(tmp_path / "none.sock"))
    monkeypatch.delenv("FISSION_URL", raising=False)
    seen: list[RunSpec] = []

    def embedded(self: Any, spec: RunSpec, *rest: Any) -> RunResult:
        seen.append(spec)
        return RESULT

    monkeypatch.setattr(_backend.EmbeddedBackend, "run", embedded)
    assert fission.sdk.run("print(1)", "bash", timeout=4, memory_mb=128) is RESULT
    assert (seen[0].code, seen[0].language.name) == ("print(1)", "bash")
    assert (seen[0].limits.timeout, seen[0].limits.memory_mb) == (4, 128)


def test_the_backend_is_chosen_in_one_place(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FISSION_SOCKET", str(tmp_path / "none.sock"))
    monkeypatch.delenv("FISSION_URL", raising=False)
    assert _backend.open_backend().where == "embedded"  # no socket: no probe, no HTTP client
    assert _backend.open_backend(embedded=True).where == "embedded"
    (tmp_path / "none.sock").touch()  # a socket file nobody answers on: probed, then embedded
    assert _backend.open_backend().where == "embedded"
    named = _backend.open_backend(url=f"unix:{tmp_path / 'other.sock'}")
    assert named.where == "daemon"  # a named daemon is never replaced by an embedded run
    named.close()


def test_run_never_falls_back_from_a_named_daemon(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(_backend.EmbeddedBackend, "run", None)  # would fail if called
    with pytest.raises(NotReady):
        fission.sdk.run("print(1)", url=f"unix:{tmp_path / 'none.sock'}")


def test_runs_refuse_an_unknown_language_before_any_vm() -> None:
    with pytest.raises(UnknownLanguage, match="cobol"):
        fission.sdk.run("x", "cobol")


# -- local files ---------------------------------------------------------------------------------
def test_atomic_target_appears_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_target(target) as out:
        out.write(b"partial")
        raise RuntimeError("the download broke")
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]
    with atomic_target(target) as out:
        out.write(b"new")
    assert target.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [target]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def mock_sandbox(handler: Any) -> Sandbox:
    """A Sandbox bound to ``sbx_1`` whose HTTP calls go to ``handler`` (no daemon)."""
    box = Sandbox.__new__(Sandbox)
    box._attach(resolve_connection("http://mock"), "sbx_1")
    box._http._client = httpx.Client(base_url="http://mock", transport=httpx.MockTransport(handler))
    return box


def sandbox_json(sandbox_id: str) -> dict[str, Any]:
    spec = SandboxSpec(resolve_language("python"), metadata={"team": "ml"})
    return SandboxRecord(sandbox_id, spec, None, 1.0, 2.0).to_json()


def paged(request: httpx.Request) -> httpx.Response:
    """Two pages of sandboxes, the second after the cursor the first gave."""
    assert request.url.params.get_list("metadata") == ["team:ml"]
    if request.url.params.get("cursor") == "next":
        return httpx.Response(200, json={"sandboxes": [sandbox_json("sbx_3")], "next_cursor": None})
    first = [sandbox_json("sbx_1"), sandbox_json("sbx_2")]
    return httpx.Response(200, json={"sandboxes": first, "next_cursor": "next"})


def test_list_walks_every_page(monkeypatch: pytest.MonkeyPatch) -> None:
    real = httpx.Client

    def mocked(**options: Any) -> httpx.Client:
        return real(**{**options, "transport": httpx.MockTransport(paged)})

    monkeypatch.setattr(httpx, "Client", mocked)
    found = Sandbox.list(metadata={"team": "ml"}, url="http://mock")
    assert [info.id for info in found] == ["sbx_1", "sbx_2", "sbx_3"]


async def test_async_list_walks_every_page(monkeypatch: pytest.MonkeyPatch) -> None:
    real = httpx.AsyncClient

    def mocked(**options: Any) -> httpx.AsyncClient:
        return real(**{**options, "transport": httpx.MockTransport(paged)})

    monkeypatch.setattr(httpx, "AsyncClient", mocked)
    found = fission.sdk.AsyncSandbox.list(metadata={"team": "ml"}, url="http://mock")
    assert [info.id async for info in found] == ["sbx_1", "sbx_2", "sbx_3"]


def test_a_failed_download_leaves_nothing_behind(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.dumps({"error": error_body(fission.sdk.FileNotFound("no f.bin"))})
        return httpx.Response(404, content=body)

    with pytest.raises(fission.sdk.FileNotFound, match=r"no f\.bin"):
        mock_sandbox(handler).files.download("f.bin", tmp_path / "f.bin")
    assert list(tmp_path.iterdir()) == []


def test_uploads_stream_a_file_in_chunks(tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(calls.CHUNK_SIZE * 2 + 5))
    received: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.method == "PUT" and request.url.params["path"] == "dst.bin"
        assert "content-length" not in request.headers  # streamed, not read whole
        received.append(request.read())
        return httpx.Response(200, json={"path": "dst.bin", "type": "file", "size": 1})

    info = mock_sandbox(handler).files.upload(source, "dst.bin")
    assert info.path == "dst.bin" and received == [source.read_bytes()]


def test_snapshot_fork_rewind_and_checkpoint_requests() -> None:
    snap = calls.snapshot_sandbox("sbx_1", "n")
    assert (snap.method, snap.path, snap.json) == (
        "POST",
        "/v1/sandboxes/sbx_1/snapshots",
        {"name": "n"},
    )
    fork = calls.fork_sandbox("sbx_1", 3)
    assert (fork.path, fork.json) == ("/v1/sandboxes/sbx_1/fork", {"n": 3})
    rewind = calls.rewind_sandbox("sbx_1", "snap_2")
    assert (rewind.path, rewind.json) == ("/v1/sandboxes/sbx_1/rewind", {"checkpoint_id": "snap_2"})
    listing = calls.list_snapshots("sbx_1", None)
    assert (listing.path, listing.params) == ("/v1/snapshots", (("sandbox_id", "sbx_1"),))
    assert calls.delete_snapshot("snap/x").path == "/v1/snapshots/snap%2Fx"
    run = calls.run_code(
        "sbx_1",
        "x",
        timeout=None,
        default_timeout=30,
        env=None,
        context=None,
        fresh_context=False,
        checkpoint=True,
    )
    assert run.json is not None and run.json["checkpoint"] is True
    body = {
        "id": "snap_1",
        "name": None,
        "kind": "fork",
        "sandbox_id": "sbx_1",
        "language": "python",
        "size_bytes": 10,
        "created_at": 1.0,
        "last_used_at": 2.0,
    }
    info = calls.parse_snapshot(body)
    assert (info.id, info.kind, info.size_bytes, info.name) == ("snap_1", "fork", 10, None)
    snapshot, sandboxes = calls.parse_fork({"snapshot": body, "sandboxes": [{"id": "sbx_2"}]})
    assert snapshot == info and sandboxes == [{"id": "sbx_2"}]
    with pytest.raises(FissionError, match="snapshot"):
        calls.parse_snapshot({"id": "x"})
    created = calls.create_sandbox(
        "python",
        ttl=60,
        timeout=30,
        memory_mb=256,
        cpus=1,
        disk_mb=512,
        env=None,
        metadata=None,
        network="none",
        from_snapshot="snap_1",
    )
    assert created.json is not None and created.json["from_snapshot"] == "snap_1"
