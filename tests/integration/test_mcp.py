"""`fission mcp` end to end, driven by the MCP SDK's own client over stdio and streamable HTTP.

Each test starts the installed command as a subprocess whose runtime dir is this session's, so
the ``no_leftovers`` fixture also proves that the server destroyed every VM and removed its
state dir when it stopped (stdin closed, or SIGTERM).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TextIO

import anyio
import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult, TextContent

from fission.agent.client import AgentClient
from tests.integration.conftest import FISSION, vmm_processes

pytestmark = pytest.mark.vm

TOOLS = {
    "run_code",
    "run_command",
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
    "snapshot_list",
    "snapshot_delete",
    "template_list",
    "template_delete",
    "sandbox_expose",
    "sandbox_ports",
    "sandbox_unexpose",
}
CALL_DEADLINE = 120.0
START_DEADLINE = 30.0
STOP_DEADLINE = 30.0
# The SDK's stdio client closes the server's stdin, waits 2 s, then sends SIGTERM.
STDIO_GRACE = 2.0
BIG_FILE = 20 * 1024 * 1024
needs_agent_files = pytest.mark.skipif(
    not hasattr(AgentClient, "write_file"),
    reason="the guest agent has no file operations or contexts yet (AgentClient.write_file): "
    "sandbox files and stateful runs land with it",
)


def server_env(runtime: Path) -> dict[str, str]:
    """The server's environment: this session's FISSION_* settings and runtime dir."""
    env = {key: value for key, value in os.environ.items() if key.startswith("FISSION_")}
    env["FISSION_RUNTIME_DIR"] = str(runtime)
    return env


def server_pid(runtime: Path) -> int:
    """The pid of the one MCP server running on ``runtime`` (its state dir is mcp-<pid>)."""
    (state,) = [p.name for p in runtime.iterdir() if p.name.startswith("mcp-")]
    return int(state.removeprefix("mcp-"))


def gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie not yet reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def wait_for(predicate: Any, deadline: float, what: str) -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``deadline`` seconds."""
    with anyio.move_on_after(deadline):
        while not predicate():
            await anyio.sleep(0.05)
        return
    pytest.fail(f"{what} did not happen within {deadline:.0f} s")


async def call(session: ClientSession, name: str, **arguments: Any) -> CallToolResult:
    with anyio.fail_after(CALL_DEADLINE):
        return await session.call_tool(name, arguments)


async def ok(session: ClientSession, name: str, **arguments: Any) -> dict[str, Any]:
    """The structured result of a tool call that must succeed."""
    outcome = await call(session, name, **arguments)
    assert not outcome.is_error, f"{name} failed: {error_text(outcome)}"
    assert outcome.structured_content is not None
    return outcome.structured_content


async def failure(session: ClientSession, name: str, **arguments: Any) -> str:
    """The error text of a tool call that must fail."""
    outcome = await call(session, name, **arguments)
    assert outcome.is_error, f"{name} succeeded: {outcome.structured_content}"
    return error_text(outcome)


def error_text(outcome: CallToolResult) -> str:
    return " ".join(b.text for b in outcome.content if isinstance(b, TextContent))


@contextlib.asynccontextmanager
async def stdio_session(runtime: Path, errlog: TextIO, *args: str) -> AsyncIterator[ClientSession]:
    """A session with `fission mcp ARGS` started over stdio; closing it closes the server."""
    params = StdioServerParameters(command=FISSION, args=["mcp", *args], env=server_env(runtime))
    async with (
        stdio_client(params, errlog=errlog) as (read, write),
        ClientSession(read, write, read_timeout_seconds=CALL_DEADLINE) as session,
    ):
        with anyio.fail_after(START_DEADLINE):
            await session.initialize()
        yield session


@contextlib.asynccontextmanager
async def http_session(url: str) -> AsyncIterator[ClientSession]:
    async with (
        streamable_http_client(url) as (read, write),
        ClientSession(read, write, read_timeout_seconds=CALL_DEADLINE) as session,
    ):
        with anyio.fail_after(START_DEADLINE):
            await session.initialize()
        yield session


async def test_stdio_runs_and_a_sandbox_that_pauses_and_resumes(
    runtime_dir: Path, tmp_path: Path
) -> None:
    with (tmp_path / "server.log").open("w+") as errlog:
        async with stdio_session(runtime_dir, errlog) as session:
            pid = server_pid(runtime_dir)
            tools = (await session.list_tools()).tools
            assert {tool.name for tool in tools} == TOOLS
            assert all(tool.description and tool.output_schema for tool in tools)

            ran = await ok(session, "run_code", code="print('hello from mcp')")
            assert (ran["stdout"], ran["exit_code"], ran["timed_out"]) == (
                "hello from mcp\n",
                0,
                False,
            )
            command = await ok(session, "run_command", command="echo hi; exit 3")
            assert (command["stdout"], command["exit_code"]) == ("hi\n", 3)
            assert "language" in await failure(session, "run_code", code="1", language="cobol")
            missing = await failure(session, "sandbox_exec", sandbox_id="sbx_missing", command="ls")
            assert "sandbox_not_found" in missing and "sandbox_create" in missing

            box = await ok(
                session, "sandbox_create", language="bash", ttl=300, metadata={"test": "mcp"}
            )
            assert box["state"] == "running" and box["expires_in_seconds"] > 200
            listed = await ok(session, "sandbox_list")
            assert [b["id"] for b in listed["sandboxes"]] == [box["id"]]
            wrote = await ok(
                session, "sandbox_exec", sandbox_id=box["id"], command="echo kept > note.txt; pwd"
            )
            assert wrote["stdout"] == "/home/sandbox\n"
            paused = await ok(session, "sandbox_pause", sandbox_id=box["id"])
            assert paused["state"] == "paused" and paused["expires_at"] is None
            refused = await failure(session, "sandbox_exec", sandbox_id=box["id"], command="true")
            assert "sandbox_not_running" in refused and "sandbox_resume" in refused
            await ok(session, "sandbox_resume", sandbox_id=box["id"])
            kept = await ok(session, "sandbox_exec", sandbox_id=box["id"], command="cat note.txt")
            assert kept["stdout"] == "kept\n"
            assert (await ok(session, "sandbox_delete", sandbox_id=box["id"]))["deleted"] is True
            assert "sandbox_not_found" in await failure(
                session, "sandbox_pause", sandbox_id=box["id"]
            )

            # Left running: closing the session must destroy it.
            await ok(session, "sandbox_create", language="bash")
            assert vmm_processes(runtime_dir)
            closing = time.monotonic()
        elapsed = time.monotonic() - closing
        errlog.seek(0)
        log = errlog.read()
    assert gone(pid)
    assert elapsed < STDIO_GRACE, f"the server needed a signal to stop ({elapsed:.1f} s):\n{log}"
    assert "Traceback" not in log, log


async def test_stdio_sigterm_destroys_the_pool(runtime_dir: Path, tmp_path: Path) -> None:
    with (tmp_path / "server.log").open("w+") as errlog:
        async with stdio_session(runtime_dir, errlog, "--pool", "bash=1") as session:
            pid = server_pid(runtime_dir)
            await wait_for(lambda: vmm_processes(runtime_dir), START_DEADLINE, "the pool's VM")
            ran = await ok(session, "run_command", command="uname -s")
            assert ran["stdout"] == "Linux\n"
            os.kill(pid, signal.SIGTERM)
            await wait_for(lambda: gone(pid), STOP_DEADLINE, "the server's exit on SIGTERM")
    assert vmm_processes(runtime_dir) == []


@needs_agent_files
async def test_stdio_files_contexts_and_a_20_mb_transfer(runtime_dir: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    payload = os.urandom(BIG_FILE)
    (shared / "big.bin").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    with (tmp_path / "server.log").open("w+") as errlog:
        async with stdio_session(runtime_dir, errlog, "--allow-host-files", str(shared)) as session:
            names = {tool.name for tool in (await session.list_tools()).tools}
            assert names == TOOLS | {"sandbox_upload", "sandbox_download", "template_build"}
            box = (await ok(session, "sandbox_create", language="python"))["id"]

            await ok(session, "sandbox_run_code", sandbox_id=box, code="x = 41")
            answer = await ok(session, "sandbox_run_code", sandbox_id=box, code="print(x + 1)")
            assert answer["stdout"] == "42\n"
            fresh = await ok(
                session,
                "sandbox_run_code",
                sandbox_id=box,
                code="print('x' in globals())",
                fresh_context=True,
            )
            assert fresh["stdout"] == "False\n"
            await ok(session, "sandbox_run_code", sandbox_id=box, code="x = 41")

            text = "h\u00e9llo\n"
            await ok(
                session, "sandbox_write_file", sandbox_id=box, path="notes/hello.txt", content=text
            )
            read = await ok(session, "sandbox_read_file", sandbox_id=box, path="notes/hello.txt")
            assert (read["content"], read["truncated"]) == (text, False)
            entries = (await ok(session, "sandbox_list_files", sandbox_id=box, path="notes"))[
                "entries"
            ]
            assert [entry["name"] for entry in entries] == ["hello.txt"]

            up = await ok(
                session, "sandbox_upload", sandbox_id=box, host_path="big.bin", path="big.bin"
            )
            assert (up["size"], up["sha256"]) == (BIG_FILE, digest)
            inside = await ok(session, "sandbox_exec", sandbox_id=box, command="sha256sum big.bin")
            assert inside["stdout"].split()[0] == digest
            down = await ok(
                session, "sandbox_download", sandbox_id=box, path="big.bin", host_path="back.bin"
            )
            assert (down["size"], down["sha256"]) == (BIG_FILE, digest)
            assert hashlib.sha256((shared / "back.bin").read_bytes()).hexdigest() == digest
            head = await ok(
                session, "sandbox_read_file", sandbox_id=box, path="big.bin", encoding="base64"
            )
            assert head["truncated"] is True and head["size"] == 1024 * 1024

            await ok(session, "sandbox_pause", sandbox_id=box)
            await ok(session, "sandbox_resume", sandbox_id=box)
            again = await ok(session, "sandbox_read_file", sandbox_id=box, path="notes/hello.txt")
            assert again["content"] == text
            remembered = await ok(session, "sandbox_run_code", sandbox_id=box, code="print(x)")
            assert remembered["stdout"] == "41\n"
            await ok(session, "sandbox_delete", sandbox_id=box)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


async def test_streamable_http_and_sigterm(runtime_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ) | server_env(runtime_dir)
    with (tmp_path / "server.log").open("w+") as log:
        server = subprocess.Popen(
            [FISSION, "mcp", "--transport", "http", "--port", str(port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            await wait_for(
                lambda: port_open(port) or server.poll() is not None, START_DEADLINE, "listening"
            )
            assert server.poll() is None, "the server exited at start"
            async with http_session(f"http://127.0.0.1:{port}/mcp") as session:
                assert {tool.name for tool in (await session.list_tools()).tools} == TOOLS
                ran = await ok(session, "run_code", code="console.log(6 * 7)", language="node")
                assert ran["stdout"] == "42\n"
                box = await ok(session, "sandbox_create", language="bash")
                done = await ok(
                    session, "sandbox_exec", sandbox_id=box["id"], command="echo $((6 * 7))"
                )
                assert done["stdout"] == "42\n"
                assert "sandbox_not_found" in await failure(
                    session, "sandbox_delete", sandbox_id="sbx_0"
                )
                # SIGTERM with the sandbox still running: the server must destroy it.
                server.send_signal(signal.SIGTERM)
                with anyio.fail_after(STOP_DEADLINE):
                    while server.poll() is None:
                        await anyio.sleep(0.05)
        finally:
            if server.poll() is None:
                server.kill()
            server.wait(timeout=STOP_DEADLINE)
        log.seek(0)
        output = log.read()
    # uvicorn re-raises the signal after its graceful shutdown.
    assert server.returncode in (0, -signal.SIGTERM), output
    assert vmm_processes(runtime_dir) == []
    assert not list(runtime_dir.glob("mcp-*")), output
