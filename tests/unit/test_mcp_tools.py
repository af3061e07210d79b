"""The MCP adapter without QEMU: tools, schemas, descriptions, error translation, file transfers.

The server runs in-process (the SDK's own ``Client`` over memory) around a real Service on the
fake VMM driver (``ObservedService``, which also notes that it started and closed and what it
ran), so every tool is checked down to the guest agent's protocol without a VM.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, cast

import anyio
import httpx
import pytest
from mcp import Client
from mcp_types import CallToolResult, TextContent

import fission.mcp
from fission.core.service import Service, ServiceConfig
from fission.core.spec import RunResult, RunSpec
from fission.errors import (
    FissionError,
    InvalidInput,
    PathNotAllowed,
    SandboxNotFound,
    SandboxNotRunning,
)
from fission.mcp import McpOptions, build_options, build_server
from fission.mcp.errors import tool_error
from fission.mcp.files import MAX_INLINE_BYTES, HostFiles, decode_content, encode_content
from fission.mcp.runtime import STATE_PREFIX, running_service, sweep_stale
from fission.mcp.tools import shell_program
from fission.vmm.fake import FakeDriver, FakeVM
from tests.unit.conftest import Calls, eventually, record_calls

SANDBOX_TOOLS = {
    "sandbox_create",
    "sandbox_run_code",
    "sandbox_exec",
    "sandbox_write_file",
    "sandbox_read_file",
    "sandbox_list_files",
    "sandbox_pause",
    "sandbox_resume",
    "sandbox_delete",
    "sandbox_list",
    "sandbox_snapshot",
    "sandbox_fork",
    "sandbox_rewind",
    "sandbox_expose",
    "sandbox_ports",
    "sandbox_unexpose",
}
TEMPLATE_TOOLS = {"template_list", "template_delete"}
TOOLS = {"run_code", "run_command", "snapshot_list", "snapshot_delete"} | SANDBOX_TOOLS
TOOLS |= TEMPLATE_TOOLS
HOST_TOOLS = {"sandbox_upload", "sandbox_download", "template_build"}
RUN_SECONDS = 0.01234  # every run takes this long by the fake driver's clock


def ticking_clock() -> Any:
    """A clock that advances RUN_SECONDS each time it is read, so durations are exact."""
    ticks = itertools.count()
    return lambda: next(ticks) * RUN_SECONDS


class ObservedService(Service):
    """The real Service on its own fake driver, noting its start, close and one-shot runs."""

    made: ClassVar[list[ObservedService]] = []

    def __init__(self, config: ServiceConfig) -> None:
        self.fake = FakeDriver(clock=ticking_clock())
        super().__init__(dataclasses.replace(config, driver=self.fake))
        self.runs: list[RunSpec] = []
        self.sandbox_calls: Calls = []
        record_calls(
            self.sandboxes,
            "run_code",
            self.sandbox_calls,
            lambda sandbox_id, code, **options: ("run_code", options),
        )
        self.started = self.closed = False
        ObservedService.made.append(self)

    async def start(self) -> None:
        await super().start()
        self.started = True

    async def close(self) -> None:
        await super().close()
        self.closed = True

    async def run(self, spec: RunSpec, *args: Any, **kwargs: Any) -> RunResult:
        self.runs.append(spec)
        return await super().run(spec, *args, **kwargs)

    def vm(self) -> FakeVM:
        """The one VM running now (a sandbox's)."""
        (vm,) = self.fake.live
        return vm


def fake_factory(config: ServiceConfig) -> Service:
    return ObservedService(config)


@pytest.fixture(autouse=True)
def no_vm_left(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No QEMU can be used by mistake, and no fake VM outlives its test."""
    monkeypatch.setenv("FISSION_QEMU", str(tmp_path / "no-qemu-here"))
    ObservedService.made.clear()
    yield
    for service in ObservedService.made:
        assert service.fake.live == [], "a fake VM outlived the MCP server"


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "runtime"
    monkeypatch.setenv("FISSION_RUNTIME_DIR", str(path))
    return path


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    path = tmp_path / "shared"
    path.mkdir()
    return path


async def call(client: Client, name: str, **arguments: Any) -> CallToolResult:
    with anyio.fail_after(10):
        return await client.call_tool(name, arguments)


def data(outcome: CallToolResult) -> dict[str, Any]:
    assert not outcome.is_error, text_of(outcome)
    return cast(dict[str, Any], outcome.structured_content)


def text_of(outcome: CallToolResult) -> str:
    block = outcome.content[0]
    assert isinstance(block, TextContent)
    return block.text


# -- the tool list ----------------------------------------------------------------------------


async def test_tool_names_and_host_tools_only_when_shared(runtime: Path, shared: Path) -> None:
    async with Client(build_server(McpOptions(), fake_factory)) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
    assert names == TOOLS
    options = McpOptions(host_files=shared)
    async with Client(build_server(options, fake_factory)) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
    assert names == TOOLS | HOST_TOOLS


async def test_descriptions_tell_an_llm_what_it_needs(runtime: Path, shared: Path) -> None:
    server = build_server(McpOptions(host_files=shared), fake_factory)
    async with Client(server) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert client.instructions and "no network" in client.instructions
    for tool in tools.values():
        assert tool.description and len(tool.description) > 40, tool.name
        assert not tool.description.startswith(" "), "docstring indentation leaked"
        assert tool.output_schema is not None, f"{tool.name} has no structured output"
        assert tool.annotations is not None and tool.annotations.open_world_hint is False
    assert "no network" in tools["run_code"].description
    assert "1 MiB" in tools["run_code"].description
    assert "/home/sandbox" in tools["sandbox_create"].description
    assert "ttl" in tools["sandbox_create"].description
    assert "persist" in tools["sandbox_run_code"].description
    assert "truncated" in tools["sandbox_read_file"].description
    assert "--allow-host-files" in tools["sandbox_upload"].description
    assert tools["sandbox_list"].annotations and tools["sandbox_list"].annotations.read_only_hint
    assert (
        tools["sandbox_delete"].annotations and tools["sandbox_delete"].annotations.destructive_hint
    )


async def test_input_schemas(runtime: Path) -> None:
    async with Client(build_server(McpOptions(), fake_factory)) as client:
        schemas = {tool.name: tool.input_schema for tool in (await client.list_tools()).tools}
    assert schemas["run_code"]["required"] == ["code"]
    language = schemas["run_code"]["properties"]["language"]
    assert language["enum"] == ["python", "node", "bash", "go"] and language["default"] == "python"
    timeout = schemas["run_code"]["properties"]["timeout"]
    assert (timeout["default"], timeout["minimum"], timeout["maximum"]) == (30.0, 0.1, 3600)
    assert schemas["run_command"]["properties"]["language"]["default"] == "bash"
    create = schemas["sandbox_create"]["properties"]
    assert create["ttl"]["default"] == 600.0 and create["memory_mb"]["default"] == 256
    assert "required" not in schemas["sandbox_create"]
    run = schemas["sandbox_run_code"]
    assert run["required"] == ["sandbox_id", "code"]
    assert run["properties"]["context"]["default"] == "default"
    assert run["properties"]["fresh_context"]["default"] is False
    assert schemas["sandbox_read_file"]["properties"]["encoding"]["enum"] == ["utf-8", "base64"]
    assert schemas["sandbox_list_files"]["properties"]["path"]["default"] == "."
    for name in SANDBOX_TOOLS - {"sandbox_create", "sandbox_list"}:
        assert "sandbox_id" in schemas[name]["required"], name


def test_the_package_exports_what_it_lists() -> None:
    for name in fission.mcp.__all__:
        assert hasattr(fission.mcp, name), name


# -- errors -----------------------------------------------------------------------------------


def test_tool_error_carries_code_message_and_next_step() -> None:
    error = tool_error(
        SandboxNotFound("no sandbox 'sbx_1': it was deleted, expired, or never existed")
    )
    assert str(error) == (
        "sandbox_not_found: no sandbox 'sbx_1': it was deleted, expired, or never existed. "
        "Create a new one with sandbox_create; sandbox_list shows the live ones."
    )
    paused = tool_error(SandboxNotRunning("sandbox sbx_1 is paused: resume it first."))
    assert str(paused).endswith("resume it first. Call sandbox_resume, then retry.")
    assert str(tool_error(FissionError("boom"))) == "internal: boom"


async def test_fission_errors_come_back_as_tool_errors(runtime: Path) -> None:
    async with Client(build_server(McpOptions(), fake_factory)) as client:
        missing = await call(client, "sandbox_exec", sandbox_id="sbx_gone", command="ls")
        assert missing.is_error
        assert text_of(missing).startswith("Error executing tool sandbox_exec: sandbox_not_found:")
        created = await call(client, "sandbox_create")
        sandbox = data(created)["id"]
        await call(client, "sandbox_pause", sandbox_id=sandbox)
        paused = await call(client, "sandbox_exec", sandbox_id=sandbox, command="ls")
        assert paused.is_error and "sandbox_not_running" in text_of(paused)
        assert "sandbox_resume" in text_of(paused)


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({"code": "1", "language": "cobol"}, "language"),
        ({"code": "1", "timeout": 0}, "timeout"),
        ({"code": "1", "timeout": 7200}, "timeout"),
        ({}, "code"),
    ],
)
async def test_bad_arguments_are_tool_errors(
    runtime: Path, arguments: dict[str, Any], fragment: str
) -> None:
    async with Client(build_server(McpOptions(), fake_factory)) as client:
        outcome = await call(client, "run_code", **arguments)
    assert outcome.is_error and fragment in text_of(outcome)


# -- tools over a fake service ----------------------------------------------------------------


async def test_run_code_and_run_command(runtime: Path) -> None:
    async with Client(build_server(McpOptions(), fake_factory)) as client:
        outcome = await call(client, "run_code", code="print('hello')", timeout=5)
        assert not outcome.is_error
        assert outcome.structured_content == {
            "stdout": "hello\n",
            "stderr": "",
            "exit_code": 0,
            "timed_out": False,
            "oom": False,
            "truncated": False,
            "duration_ms": 12.3,
        }
        await call(client, "run_command", command="uname -r", language="python")
        service = ObservedService.made[-1]
        assert service.started and service.config.pools == {}
    assert service.closed
    first, second = service.runs
    assert (first.language.name, first.code, first.limits.timeout) == (
        "python",
        "print('hello')",
        5,
    )
    assert first.limits.output_limit_mb == 1.0
    assert second.language.name == "python" and '"uname -r"' in second.code


async def test_a_sandbox_through_its_tools(runtime: Path) -> None:
    async with Client(build_server(McpOptions(), fake_factory)) as client:
        # Python: the tool's default code context is for Python only (the agent refuses it
        # for other languages).
        created = await call(
            client,
            "sandbox_create",
            language="python",
            ttl=60,
            memory_mb=512,
            metadata={"job": "7"},
        )
        info = data(created)
        assert info["id"].startswith("sbx_") and info["state"] == "running"
        assert info["language"] == "python" and info["memory_mb"] == 512
        assert info["metadata"] == {"job": "7"} and 55 < info["expires_in_seconds"] <= 60
        assert info["expires_at"].endswith("+00:00")
        sandbox = info["id"]
        ran = await call(client, "sandbox_run_code", sandbox_id=sandbox, code="print('ran x = 1')")
        assert data(ran)["stdout"] == "ran x = 1\n"
        await call(
            client,
            "sandbox_run_code",
            sandbox_id=sandbox,
            code="y",
            context=None,
            fresh_context=True,
        )
        done = await call(client, "sandbox_exec", sandbox_id=sandbox, command="exit 3")
        assert data(done)["exit_code"] == 3
        paused = await call(client, "sandbox_pause", sandbox_id=sandbox)
        assert data(paused)["expires_at"] is None
        listed = await call(client, "sandbox_list")
        assert data(listed)["sandboxes"][0]["state"] == "paused"
        resumed = await call(client, "sandbox_resume", sandbox_id=sandbox)
        assert data(resumed)["state"] == "running"
        deleted = await call(client, "sandbox_delete", sandbox_id=sandbox)
        assert deleted.structured_content == {"id": sandbox, "deleted": True}
        again = await call(client, "sandbox_delete", sandbox_id=sandbox)
        assert again.is_error and "sandbox_not_found" in text_of(again)
    service = ObservedService.made[-1]
    assert service.sandbox_calls[0] == (
        "run_code",
        {"timeout": 30.0, "context": "default", "fresh_context": False},
    )
    assert service.sandbox_calls[1] == (
        "run_code",
        {"timeout": 30.0, "context": None, "fresh_context": True},
    )
    assert service.sandboxes.count() == 0


async def test_run_code_in_a_bash_sandbox_runs_afresh_by_default(runtime: Path) -> None:
    # Code contexts are Python interpreters: the tool's default context must not break other
    # languages (the agent refuses a context for them), while an explicit one is still refused.
    async with Client(build_server(McpOptions(), fake_factory)) as client:
        sandbox = data(await call(client, "sandbox_create", language="bash", ttl=60))["id"]
        ran = await call(client, "sandbox_run_code", sandbox_id=sandbox, code="echo $((6 * 7))")
        assert not ran.is_error and data(ran)["stdout"] == "42\n"
        named = await call(
            client, "sandbox_run_code", sandbox_id=sandbox, code="true", context="nb"
        )
        assert named.is_error and "context" in text_of(named)
        await call(client, "sandbox_delete", sandbox_id=sandbox)


async def test_files_inline(runtime: Path) -> None:
    async with Client(build_server(McpOptions(), fake_factory)) as client:
        sandbox = data(await call(client, "sandbox_create"))["id"]
        wrote = await call(
            client, "sandbox_write_file", sandbox_id=sandbox, path="a.txt", content="h\u00e9llo\n"
        )
        assert wrote.structured_content == {"path": "a.txt", "size": 7}
        blob = bytes(range(256))
        await call(
            client,
            "sandbox_write_file",
            sandbox_id=sandbox,
            path="b.bin",
            content=base64.b64encode(blob).decode(),
            encoding="base64",
        )
        text = await call(client, "sandbox_read_file", sandbox_id=sandbox, path="a.txt")
        assert text.structured_content == {
            "path": "a.txt",
            "encoding": "utf-8",
            "content": "h\u00e9llo\n",
            "size": 7,
            "truncated": False,
        }
        binary = await call(
            client, "sandbox_read_file", sandbox_id=sandbox, path="b.bin", encoding="base64"
        )
        assert base64.b64decode(data(binary)["content"]) == blob
        as_text = await call(client, "sandbox_read_file", sandbox_id=sandbox, path="b.bin")
        assert as_text.is_error and "encoding='base64'" in text_of(as_text)
        bad = await call(
            client,
            "sandbox_write_file",
            sandbox_id=sandbox,
            path="c",
            content="%%%",
            encoding="base64",
        )
        assert bad.is_error and "invalid_input: content is not valid base64" in text_of(bad)
        listed = await call(client, "sandbox_list_files", sandbox_id=sandbox)
        entries = data(listed)["entries"]
        # The agent client's FileInfo, as JSON: the entry's type is its "kind".
        assert [(e["name"], e["kind"], e["size"], e["path"]) for e in entries] == [
            ("a.txt", "file", 7, "a.txt"),
            ("b.bin", "file", 256, "b.bin"),
        ]


async def test_large_reads_are_truncated_and_stop_early(runtime: Path) -> None:
    async with Client(build_server(McpOptions(), fake_factory)) as client:
        sandbox = data(await call(client, "sandbox_create"))["id"]
        vm = ObservedService.made[-1].vm()
        # A multi-byte character straddles the cap: it is dropped, not mangled.
        (vm.home / "big.txt").write_bytes(
            b"a" * (MAX_INLINE_BYTES - 1) + "\u00e9".encode() + b"b" * 4 * MAX_INLINE_BYTES
        )
        outcome = await call(client, "sandbox_read_file", sandbox_id=sandbox, path="big.txt")
        guest = vm.guest
        assert guest is not None
        # The tool stopped reading early: the guest is told to drop the rest of the transfer.
        await eventually(lambda: len(guest.kills) == 1, "the abandoned read to be killed")
    content = data(outcome)
    assert content["truncated"] is True and content["size"] == MAX_INLINE_BYTES
    assert content["content"] == "a" * (MAX_INLINE_BYTES - 1)
    assert len(guest.kills) == 1  # killed once, and only that read


def test_inline_content_codec() -> None:
    assert decode_content("aGk=", "base64") == b"hi"
    assert decode_content("hi", "utf-8") == b"hi"
    with pytest.raises(InvalidInput, match="at most"):
        decode_content("x" * (MAX_INLINE_BYTES + 1), "utf-8")
    with pytest.raises(InvalidInput, match="UTF-8"):
        decode_content("\ud800", "utf-8")
    assert encode_content(b"\xff", "base64", False) == "/w=="
    with pytest.raises(InvalidInput, match="base64"):
        encode_content(b"\xff", "utf-8", False)
    assert encode_content("\u00e9".encode()[:1], "utf-8", True) == ""


# -- host files -------------------------------------------------------------------------------


def test_host_paths_stay_in_the_shared_directory(shared: Path, tmp_path: Path) -> None:
    host = HostFiles(shared)
    assert host.resolve("data/x.csv") == shared.resolve() / "data" / "x.csv"
    assert host.resolve(str(shared / "y")) == shared.resolve() / "y"
    (tmp_path / "secret").write_text("no")
    (shared / "link").symlink_to(tmp_path / "secret")
    for path in ("../secret", "/etc/passwd", "link", ".", "a/../../secret"):
        with pytest.raises(PathNotAllowed, match="--allow-host-files"):
            host.resolve(path)
    with pytest.raises(InvalidInput):
        host.resolve("")
    with pytest.raises(InvalidInput, match="no such directory"):
        HostFiles(tmp_path / "missing")


async def test_upload_and_download(runtime: Path, shared: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 5)
    (shared / "in.bin").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    async with Client(build_server(McpOptions(host_files=shared), fake_factory)) as client:
        sandbox = data(await call(client, "sandbox_create"))["id"]
        up = await call(
            client, "sandbox_upload", sandbox_id=sandbox, host_path="in.bin", path="data/in.bin"
        )
        assert up.structured_content == {
            "path": "data/in.bin",
            "host_path": str(shared.resolve() / "in.bin"),
            "size": len(payload),
            "sha256": digest,
        }
        assert (ObservedService.made[-1].vm().home / "data" / "in.bin").read_bytes() == payload
        down = await call(
            client, "sandbox_download", sandbox_id=sandbox, path="data/in.bin", host_path="out.bin"
        )
        assert data(down)["sha256"] == digest
        assert (shared / "out.bin").read_bytes() == payload
        missing = await call(
            client, "sandbox_upload", sandbox_id=sandbox, host_path="nope", path="x"
        )
        assert missing.is_error and "file_not_found" in text_of(missing)
        escape = await call(
            client, "sandbox_download", sandbox_id=sandbox, path="data/in.bin", host_path="../out"
        )
        assert escape.is_error and "path_not_allowed" in text_of(escape)
    assert sorted(p.name for p in shared.iterdir()) == ["in.bin", "out.bin"], (
        "a temporary file was left"
    )


# -- shell commands in other images -----------------------------------------------------------


def test_shell_program_per_language() -> None:
    assert shell_program("bash", "ls -l") == "ls -l"
    command = 'echo "it\'s" $((1+2)); exit 3'
    program = shell_program("python", command)
    # The wrapper is itself a program: run it with this host's Python.
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, timeout=30, check=False
    )
    assert (done.stdout, done.returncode) == (b"it's 3\n", 3)
    assert '"echo \\"it\'s\\" $((1+2)); exit 3"' in shell_program("node", command)


# -- the server's own state -------------------------------------------------------------------


def test_options() -> None:
    assert build_options(["python=2"], None, None).pools == {"python": 2}
    with pytest.raises(InvalidInput, match="memory-budget"):
        build_options([], 100, None)
    with pytest.raises(InvalidInput, match="LANGUAGE=COUNT"):
        build_options(["python"], None, None)
    with pytest.raises(InvalidInput, match="allow-host-files"):
        build_options([], None, Path("/nonexistent/dir"))


async def test_state_dir_lives_as_long_as_the_service(runtime: Path) -> None:
    async with running_service(McpOptions(pools={"python": 1}), fake_factory) as service:
        state = ObservedService.made[-1].config.state_dir
        assert state == runtime / f"{STATE_PREFIX}{os.getpid()}" and state.is_dir()
        assert cast(ObservedService, service).config.pools == {"python": 1}
    assert not state.exists() and ObservedService.made[-1].closed


async def test_the_service_is_closed_when_the_server_is_cancelled(runtime: Path) -> None:
    with anyio.move_on_after(0.2):
        async with running_service(McpOptions(), fake_factory):
            await anyio.sleep(30)
    assert ObservedService.made[-1].closed


def test_sweep_removes_only_dead_servers_dirs(runtime: Path) -> None:
    runtime.mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    stale = runtime / f"{STATE_PREFIX}{int(dead.stdout)}"
    (stale / "vms" / "vm1").mkdir(parents=True)
    alive = runtime / f"{STATE_PREFIX}{os.getpid()}"
    alive.mkdir()
    other = runtime / "daemon"
    other.mkdir()
    assert sweep_stale(runtime) == [stale]
    assert sorted(p.name for p in runtime.iterdir()) == sorted([alive.name, "daemon"])


async def test_snapshot_fork_checkpoint_and_rewind_tools(runtime: Path) -> None:
    async with Client(build_server(McpOptions(), fake_factory)) as client:
        sandbox = data(await call(client, "sandbox_create", language="bash"))["id"]
        step = await call(
            client, "sandbox_exec", sandbox_id=sandbox, command="echo a > f", checkpoint=True
        )
        checkpoint = data(step)["checkpoint_id"]
        assert checkpoint.startswith("snap_")
        await call(client, "sandbox_exec", sandbox_id=sandbox, command="echo b > f")
        snap = data(await call(client, "sandbox_snapshot", sandbox_id=sandbox))
        assert (snap["kind"], snap["sandbox_id"]) == ("snapshot", sandbox)
        forked = data(await call(client, "sandbox_fork", sandbox_id=sandbox, n=2))
        assert len(forked["sandboxes"]) == 2 and forked["snapshot"]["kind"] == "fork"
        copy = forked["sandboxes"][0]["id"]
        seen = await call(client, "sandbox_exec", sandbox_id=copy, command="cat f")
        assert data(seen)["stdout"] == "b\n"
        too_many = await call(client, "sandbox_fork", sandbox_id=sandbox, n=17)
        assert too_many.is_error
        made = data(await call(client, "sandbox_create", from_snapshot=snap["id"]))
        assert made["language"] == "bash"
        await call(client, "sandbox_rewind", sandbox_id=sandbox, checkpoint_id=checkpoint)
        back = await call(client, "sandbox_exec", sandbox_id=sandbox, command="cat f")
        assert data(back)["stdout"] == "a\n"
        listed = data(await call(client, "snapshot_list", sandbox_id=sandbox))["snapshots"]
        assert {s["kind"] for s in listed} == {"checkpoint", "snapshot", "fork"}
        busy = await call(client, "snapshot_delete", snapshot_id=snap["id"])
        assert busy.is_error and "conflict" in text_of(busy)
        await call(client, "sandbox_delete", sandbox_id=made["id"])
        gone = await call(client, "snapshot_delete", snapshot_id=snap["id"])
        assert data(gone) == {"id": snap["id"], "deleted": True}
        unknown = await call(client, "sandbox_create", from_snapshot=snap["id"])
        assert unknown.is_error and "snapshot_not_found" in text_of(unknown)


# -- exposed ports ----------------------------------------------------------------------------


async def test_expose_gives_a_url_with_a_token_on_the_loopback_listener(runtime: Path) -> None:
    from fission.server.ports_listener import ports_listener

    options = McpOptions(ports_listener=ports_listener)
    async with Client(build_server(options, fake_factory)) as client:
        created = data(await call(client, "sandbox_create", language="bash", ttl=60))
        box = created["id"]
        exposed = data(await call(client, "sandbox_expose", sandbox_id=box, port=8000))
        url = exposed["url"]
        assert url.startswith("http://127.0.0.1:") and "fission_token=fpt_" in url
        assert f"/v1/sandboxes/{box}/ports/8000/" in url
        async with httpx.AsyncClient(timeout=10) as http:
            # The token admits (then the fake guest has nothing listening: 502).
            reached = await http.get(url, follow_redirects=True)
            assert reached.status_code == 502, reached.text
            assert reached.json()["error"]["code"] == "port_unreachable"
            async with httpx.AsyncClient(timeout=10) as stranger:  # no token, no cookie
                assert (await stranger.get(url.split("?")[0])).status_code == 401
            listed = data(await call(client, "sandbox_ports", sandbox_id=box))
            assert [p["port"] for p in listed["ports"]] == [8000]
            data(await call(client, "sandbox_unexpose", sandbox_id=box, port=8000))
            assert (await http.get(url)).status_code in (401, 404)
            assert data(await call(client, "sandbox_ports", sandbox_id=box))["ports"] == []
        await call(client, "sandbox_delete", sandbox_id=box)


async def test_expose_without_a_listener_says_so(runtime: Path) -> None:
    async with Client(build_server(McpOptions(), fake_factory)) as client:
        box = data(await call(client, "sandbox_create", language="bash", ttl=60))["id"]
        outcome = await call(client, "sandbox_expose", sandbox_id=box, port=8000)
        assert outcome.is_error and "listener" in text_of(outcome)
        await call(client, "sandbox_delete", sandbox_id=box)
