"""E2B's API on the fake driver, driven by the real ``e2b`` SDK (sync, in a thread) over
loopback HTTP: control plane, envd processes and files, watches, errors the E2B way."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import pytest_asyncio
import uvicorn
from e2b import (
    AuthenticationException,
    CommandExitException,
    FileType,
    InvalidArgumentException,
    NotFoundException,
    PtySize,
    RateLimitException,
    Sandbox,
    SandboxException,
    SandboxQuery,
)

from fission.core.service import Service
from fission.e2b import create_e2b_app
from fission.errors import Unauthorized

T = TypeVar("T")
KEY = "fission_test_key"
OTHER_KEY = "fission_other_key"


@dataclass(frozen=True)
class FakeCaller:
    owner: str | None
    max_sandboxes: int | None


async def admit(authorization: str | None, api_key: str | None) -> FakeCaller:
    if api_key == OTHER_KEY:
        return FakeCaller("key-2", 3)
    if api_key != KEY:
        raise Unauthorized("that API key is not known")
    return FakeCaller("key-1", 3)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest_asyncio.fixture(loop_scope="function")
async def e2b_url(service: Service, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """The E2B API of ``service`` on loopback, and the SDK's environment pointing at it."""
    port = free_port()
    config = uvicorn.Config(
        create_e2b_app(service.sandboxes, admit), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:
            await asyncio.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("E2B_API_URL", url)
    monkeypatch.setenv("E2B_SANDBOX_URL", url)
    monkeypatch.setenv("E2B_API_KEY", KEY)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    yield url
    server.should_exit = True
    await task


async def sdk(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A blocking SDK call, off the loop that serves it."""
    return await asyncio.to_thread(call, *args, **kwargs)


async def test_commands_files_and_lifecycle(e2b_url: str) -> None:
    sbx = await sdk(Sandbox.create, "bash", timeout=60, metadata={"team": "ml"})
    seen: list[str] = []
    result = await sdk(sbx.commands.run, "echo hi; echo oops >&2", on_stdout=seen.append)
    assert (result.exit_code, result.stdout, result.stderr) == (0, "hi\n", "oops\n")
    assert seen == ["hi\n"]
    with pytest.raises(CommandExitException) as failed:
        await sdk(sbx.commands.run, "echo bad >&2; exit 3")
    assert failed.value.exit_code == 3 and failed.value.stderr == "bad\n"

    await sdk(sbx.files.write, "/home/user/dir/a.txt", "hello")
    assert await sdk(sbx.files.read, "dir/a.txt") == "hello"
    assert await sdk(sbx.files.make_dir, "/home/user/new") is True
    assert await sdk(sbx.files.make_dir, "/home/user/new") is False
    listed = await sdk(sbx.files.list, "/home/user")
    assert {(e.name, e.type) for e in listed} >= {("dir", FileType.DIR), ("new", FileType.DIR)}
    moved = await sdk(sbx.files.rename, "/home/user/dir/a.txt", "/home/user/b.txt")
    assert moved.path == "/home/user/b.txt"
    await sdk(sbx.files.remove, "/home/user/b.txt")
    assert await sdk(sbx.files.exists, "/home/user/b.txt") is False
    with pytest.raises(NotFoundException):
        await sdk(sbx.files.read, "/home/user/missing")

    found = await sdk(
        lambda: Sandbox.list(query=SandboxQuery(metadata={"team": "ml"})).next_items()
    )
    assert [s.sandbox_id for s in found] == [sbx.sandbox_id]
    none = await sdk(lambda: Sandbox.list(query=SandboxQuery(metadata={"team": "x"})).next_items())
    assert none == []
    await sdk(sbx.set_timeout, 120)
    assert await sdk(sbx.kill) is True
    with pytest.raises(NotFoundException):
        await sdk(Sandbox.connect, sbx.sandbox_id)


async def test_background_command_killed_by_its_handle(e2b_url: str) -> None:
    sbx = await sdk(Sandbox.create, "bash", timeout=60)
    handle = await sdk(sbx.commands.run, "echo started; sleep 60", background=True)
    listed = await sdk(sbx.commands.list)
    assert [p.pid for p in listed] == [handle.pid]
    assert await sdk(handle.kill) is True
    with pytest.raises(CommandExitException):
        await sdk(handle.wait)
    assert await sdk(sbx.commands.list) == []
    await sdk(sbx.kill)


async def test_stdin_sent_to_a_running_command(e2b_url: str) -> None:
    sbx = await sdk(Sandbox.create, "bash", timeout=60)
    handle = await sdk(sbx.commands.run, "cat", background=True, stdin=True)
    await sdk(sbx.commands.send_stdin, handle.pid, "hello ")
    await sdk(sbx.commands.stream_input, handle.pid, ["streamed ", b"bytes\n"])
    await sdk(sbx.commands.close_stdin, handle.pid)
    result = await sdk(handle.wait)
    assert (result.exit_code, result.stdout) == (0, "hello streamed bytes\n")

    # Without stdin=True a command reads EOF at once and takes no input.
    quiet = await sdk(sbx.commands.run, "cat; sleep 30", background=True)
    with pytest.raises(SandboxException, match="without stdin"):
        await sdk(sbx.commands.send_stdin, quiet.pid, "x")
    with pytest.raises(SandboxException, match="has no PTY"):
        await sdk(sbx.pty.resize, quiet.pid, PtySize(rows=10, cols=40))
    await sdk(quiet.kill)
    await sdk(sbx.kill)


async def test_pty_refusals(e2b_url: str) -> None:
    # The fake guest has no terminals: the start fails with the reason, nothing is left.
    sbx = await sdk(Sandbox.create, "bash", timeout=60)
    with pytest.raises(SandboxException, match="accepted the stream"):
        await sdk(sbx.pty.create, PtySize(rows=24, cols=80))
    with pytest.raises(InvalidArgumentException, match="cols must be"):
        await sdk(sbx.pty.create, PtySize(rows=24, cols=5000))
    assert await sdk(sbx.commands.list) == []
    await sdk(sbx.kill)


async def test_watch_sees_a_write(e2b_url: str) -> None:
    sbx = await sdk(Sandbox.create, "bash", timeout=60)
    await sdk(sbx.files.make_dir, "/home/user/w")
    watcher = await sdk(sbx.files.watch_dir, "/home/user/w")
    await sdk(sbx.files.write, "/home/user/w/f.txt", "x")
    events: list[Any] = []
    for _ in range(50):
        events += await sdk(watcher.get_new_events)
        if any(e.name == "f.txt" for e in events):
            break
        await asyncio.sleep(0.1)
    assert any(e.name == "f.txt" for e in events), events
    await sdk(watcher.stop)
    await sdk(sbx.kill)


async def test_code_interpreter_results_and_errors(e2b_url: str) -> None:
    from e2b_code_interpreter import Sandbox as CodeSandbox

    # The fake guest keeps no context state (each run starts afresh): results and errors only.
    sbx = await sdk(CodeSandbox.create, timeout=60)
    done = await sdk(sbx.run_code, "print('a', flush=True)\nprint('b')\n6 * 7")
    assert ("".join(done.logs.stdout), done.text, done.error) == ("a\nb\n", "42", None)
    failed = await sdk(sbx.run_code, "def f():\n    raise KeyError('k')\nf()")
    assert failed.error is not None and failed.error.name == "KeyError"
    assert failed.error.value == "'k'" and "raise KeyError('k')" in failed.error.traceback
    context = await sdk(sbx.create_code_context)
    assert [c.id for c in await sdk(sbx.list_code_contexts)] == [context.id]
    assert (await sdk(sbx.run_code, "1 + 1", context=context)).text == "2"
    await sdk(sbx.remove_code_context, context)
    await sdk(sbx.kill)


async def test_errors_the_e2b_way(e2b_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NotFoundException):
        await sdk(Sandbox.connect, "sbx_nothere")
    monkeypatch.setenv("E2B_API_KEY", "wrong")
    with pytest.raises(AuthenticationException):
        await sdk(Sandbox.create, "bash")
    monkeypatch.setenv("E2B_API_KEY", KEY)
    boxes = [await sdk(Sandbox.create, "bash", timeout=60) for _ in range(3)]
    with pytest.raises(RateLimitException):
        await sdk(Sandbox.create, "bash")
    for box in boxes:
        await sdk(box.kill)


async def test_another_key_and_forged_access_tokens_are_refused(
    e2b_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sandbox is the key's that made it; envd calls need that sandbox's own access token."""
    import httpx

    mine = await sdk(Sandbox.create, "bash", timeout=60)
    theirs = await sdk(Sandbox.create, "bash", timeout=60)
    try:
        monkeypatch.setenv("E2B_API_KEY", OTHER_KEY)
        with pytest.raises(NotFoundException):
            await sdk(Sandbox.connect, mine.sandbox_id)
        assert mine.sandbox_id not in [s.sandbox_id for s in await sdk(_all_listed)]
        monkeypatch.setenv("E2B_API_KEY", KEY)
        async with httpx.AsyncClient(base_url=e2b_url) as client:
            connected = await client.post(
                f"/sandboxes/{mine.sandbox_id}/connect",
                json={"timeout": 60},
                headers={"X-API-Key": KEY},
            )
            token = connected.json()["envdAccessToken"]  # what the control plane hands out

            async def read(sandbox_id: str, token: str | None) -> int:
                headers = {"E2b-Sandbox-Id": sandbox_id}
                if token is not None:
                    headers["X-Access-Token"] = token
                answer = await client.get("/files", params={"path": "x"}, headers=headers)
                return answer.status_code

            assert await read(mine.sandbox_id, None) == 401
            assert await read(mine.sandbox_id, "0" * 64) == 401
            assert await read(theirs.sandbox_id, token) == 401  # another sandbox's token
            assert await read(mine.sandbox_id, token) in (200, 404)  # its own: let in
    finally:
        monkeypatch.setenv("E2B_API_KEY", KEY)
        for box in (mine, theirs):
            await sdk(box.kill)


def _all_listed() -> list[Any]:
    return Sandbox.list().next_items()
