"""E2B's own SDKs (``e2b``, ``e2b-code-interpreter``, pinned) against a fission daemon on loopback.

Everything goes through the SDKs' public API, pointed at the daemon the way a user does it:
``E2B_API_URL`` and ``E2B_SANDBOX_URL`` at ``http://127.0.0.1:PORT/e2b``, ``E2B_API_KEY`` a
fission key. One daemon and one sync sandbox serve the module (real VMs); the async client
gets a sandbox of its own. Also here, on the same daemon: fission's own SDK watching files
(the guest's inotify on a real VM).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from e2b import (
    AuthenticationException,
    CommandExitException,
    FileType,
    NotFoundException,
    PtySize,
    RateLimitException,
    SandboxQuery,
)
from e2b_code_interpreter import AsyncSandbox, Sandbox

from fission.errors import FissionError
from fission.sdk import AsyncSandbox as AsyncFissionSandbox
from fission.sdk import Sandbox as FissionSandbox
from tests.integration.servers import TcpDaemon

pytestmark = pytest.mark.vm
PROGRAMS = "for p in /proc/[0-9]*; do cat $p/cmdline; echo; done"  # every process's command line


@pytest.fixture(scope="module")
def daemon() -> Iterator[TcpDaemon]:
    server = TcpDaemon("--pool", "python=0", "--on-stop", "delete")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def key(daemon: TcpDaemon) -> str:
    return daemon.create_key("e2b", "--max-sandboxes", "4")


@pytest.fixture(autouse=True)
def e2b_env(daemon: TcpDaemon, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings a user sets to point E2B's SDK at fission (docs/e2b.md)."""
    monkeypatch.setenv("E2B_API_URL", f"{daemon.url}/e2b")
    monkeypatch.setenv("E2B_SANDBOX_URL", f"{daemon.url}/e2b")
    monkeypatch.setenv("E2B_API_KEY", key)
    for name in ("E2B_DOMAIN", "E2B_DEBUG", "E2B_ACCESS_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def sbx(daemon: TcpDaemon, key: str) -> Iterator[Sandbox]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("E2B_API_URL", f"{daemon.url}/e2b")
        patch.setenv("E2B_SANDBOX_URL", f"{daemon.url}/e2b")
        patch.setenv("E2B_API_KEY", key)
        sandbox = Sandbox.create(timeout=600, metadata={"suite": "e2b", "kind": "sync"})
    try:
        yield sandbox
    finally:
        sandbox.kill()


def test_commands_stream_and_exit_codes(sbx: Sandbox) -> None:
    seen: list[tuple[str, float]] = []
    result = sbx.commands.run(
        "echo one; sleep 1; echo two; echo warn >&2",
        on_stdout=lambda text: seen.append((text, time.monotonic())),
        on_stderr=lambda text: seen.append((f"err:{text}", time.monotonic())),
    )
    assert (result.exit_code, result.stdout, result.stderr) == (0, "one\ntwo\n", "warn\n")
    texts = [text for text, _ in seen]
    assert texts[0] == "one\n" and "err:warn\n" in texts
    assert seen[-1][1] - seen[0][1] > 0.5, "output came as it was printed, not at the end"
    with pytest.raises(CommandExitException) as failed:
        sbx.commands.run("echo nope >&2; exit 7")
    assert (failed.value.exit_code, failed.value.stderr) == (7, "nope\n")


def test_background_command_killed_by_its_handle(sbx: Sandbox) -> None:
    handle = sbx.commands.run("echo up; sleep 120", background=True)
    assert handle.pid in [p.pid for p in sbx.commands.list()]
    assert handle.kill() is True
    with pytest.raises(CommandExitException):
        handle.wait()
    assert handle.pid not in [p.pid for p in sbx.commands.list()]
    # Killed right after its start, the program is gone too (a KILL that reached the guest
    # while it handed the program over used to miss it); a dying one may show a moment more.
    deadline = time.monotonic() + 10
    while "sleep" in (programs := sbx.commands.run(PROGRAMS).stdout):
        assert time.monotonic() < deadline, programs
        time.sleep(0.2)


def test_stdin_sent_to_a_running_command(sbx: Sandbox) -> None:
    asked = sbx.commands.run("python3 -c \"print('read', input())\"", background=True, stdin=True)
    sbx.commands.send_stdin(asked.pid, "typed\n")
    assert asked.wait().stdout == "read typed\n"
    cat = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(cat.pid, "one ")
    sbx.commands.stream_input(cat.pid, ["two ", b"three\n"])
    sbx.commands.close_stdin(cat.pid)
    assert cat.wait().stdout == "one two three\n"


def test_pty_shell_resize_exit_code_and_kill(sbx: Sandbox) -> None:
    terminal = sbx.pty.create(PtySize(rows=24, cols=80))
    assert terminal.pid in [p.pid for p in sbx.commands.list()]
    sbx.pty.resize(terminal.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(terminal.pid, b"stty size; echo mark-$((6 * 7))\nexit 3\n")
    screen: list[bytes] = []
    with pytest.raises(CommandExitException) as ended:
        terminal.wait(on_pty=screen.append)
    assert ended.value.exit_code == 3
    text = b"".join(screen)
    assert b"30 100" in text and b"mark-42" in text, text  # typed, run, answered
    other = sbx.pty.create(PtySize(rows=24, cols=80))
    assert sbx.pty.kill(other.pid) is True
    with pytest.raises(CommandExitException):
        other.wait()
    assert other.pid not in [p.pid for p in sbx.commands.list()]


def test_files_and_a_watch_that_sees_a_write(sbx: Sandbox) -> None:
    assert sbx.files.make_dir("/home/user/work") is True
    watcher = sbx.files.watch_dir("/home/user/work")
    info = sbx.files.write("/home/user/work/notes.txt", "hello from e2b")
    assert info.path == "/home/user/work/notes.txt"
    assert sbx.files.read("/home/user/work/notes.txt") == "hello from e2b"
    assert sbx.commands.run("cat work/notes.txt").stdout == "hello from e2b"
    listed = {(e.name, e.type) for e in sbx.files.list("/home/user/work")}
    assert listed == {("notes.txt", FileType.FILE)}
    events: list[Any] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(e.name == "notes.txt" for e in events):
        events += watcher.get_new_events()
        time.sleep(0.2)
    watcher.stop()
    assert any(e.name == "notes.txt" for e in events), events
    sbx.files.remove("/home/user/work/notes.txt")
    assert sbx.files.list("/home/user/work") == []
    with pytest.raises(NotFoundException):
        sbx.files.read("/home/user/work/notes.txt")


def test_run_code_keeps_state_and_reports_errors(sbx: Sandbox) -> None:
    first = sbx.run_code("x = 41\nprint('set')")
    assert first.logs.stdout == ["set\n"] and first.error is None
    second = sbx.run_code("x + 1")
    assert second.text == "42"
    failed = sbx.run_code("def f():\n    return 1 / 0\nf()")
    assert failed.error is not None
    assert (failed.error.name, failed.error.value) == ("ZeroDivisionError", "division by zero")
    assert "return 1 / 0" in failed.error.traceback
    assert sbx.run_code("x").text == "41", "an error keeps the context's state"
    context = sbx.create_code_context()
    assert sbx.run_code("y = 5", context=context).error is None
    assert sbx.run_code("y", context=context).text == "5"
    assert sbx.run_code("'y' in globals()").text == "False", "contexts are separate"


def test_list_with_metadata_and_set_timeout(sbx: Sandbox) -> None:
    found = Sandbox.list(query=SandboxQuery(metadata={"suite": "e2b", "kind": "sync"}))
    assert [s.sandbox_id for s in found.next_items()] == [sbx.sandbox_id]
    assert Sandbox.list(query=SandboxQuery(metadata={"suite": "other"})).next_items() == []
    before = sbx.get_info().end_at
    sbx.set_timeout(900)
    assert sbx.get_info().end_at > before


def test_pause_then_connect_resumes(sbx: Sandbox) -> None:
    sbx.files.write("/home/user/kept.txt", "still here")
    sbx.run_code("kept = 'in memory'")
    assert sbx.pause() is True
    assert Sandbox.get_info(sbx.sandbox_id).state.value == "paused"
    again = Sandbox.connect(sbx.sandbox_id)
    assert again.files.read("/home/user/kept.txt") == "still here"
    assert again.run_code("kept").text == "'in memory'"
    assert again.commands.run("echo back").stdout == "back\n"


def test_errors_the_e2b_way(daemon: TcpDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NotFoundException):
        Sandbox.connect("sbx_0000000000000000")
    monkeypatch.setenv("E2B_API_KEY", "fission_not_a_key")
    with pytest.raises(AuthenticationException):
        Sandbox.create()
    monkeypatch.setenv("E2B_API_KEY", daemon.create_key("one", "--max-sandboxes", "1"))
    first = Sandbox.create(timeout=60)
    try:
        with pytest.raises(RateLimitException):
            Sandbox.create(timeout=60)
    finally:
        first.kill()


async def test_the_async_client() -> None:
    sbx = await AsyncSandbox.create(timeout=300, metadata={"suite": "e2b", "kind": "async"})
    try:
        chunks: list[str] = []
        result = await sbx.commands.run("echo async", on_stdout=chunks.append)
        assert (result.stdout, chunks) == ("async\n", ["async\n"])
        with pytest.raises(CommandExitException):
            await sbx.commands.run("exit 2")
        events: list[Any] = []
        await sbx.files.make_dir("/home/user/aw")
        handle = await sbx.files.watch_dir("/home/user/aw", on_event=events.append)
        await sbx.files.write("/home/user/aw/a.txt", "async write")
        async with asyncio.timeout(20):
            while not any(e.name == "a.txt" for e in events):
                await asyncio.sleep(0.1)
        await handle.stop()
        assert await sbx.files.read("/home/user/aw/a.txt") == "async write"
        await sbx.run_code("z = 3")
        assert (await sbx.run_code("z * 2")).text == "6"
        found = await AsyncSandbox.list(query=SandboxQuery(metadata={"kind": "async"})).next_items()
        assert [s.sandbox_id for s in found] == [sbx.sandbox_id]
        await sbx.set_timeout(600)
    finally:
        assert await sbx.kill() is True
    with pytest.raises(NotFoundException):
        await AsyncSandbox.connect(sbx.sandbox_id)


def test_fission_sdk_watches_files_on_a_real_vm(daemon: TcpDaemon, key: str) -> None:
    with FissionSandbox(language="python", url=daemon.url, api_key=key) as box:
        box.files.mkdir("w")
        with box.files.watch("w", recursive=True) as changes:
            box.exec("mkdir w/sub && echo 1 > w/sub/f && mv w/sub/f w/g && rm w/g")
            seen = []
            for event in changes:
                seen.append((event.type, event.path, event.to))
                if event.type == "delete" and event.path == "g":
                    break
        assert ("create", "sub", "") in seen
        assert ("create", "sub/f", "") in seen  # the new directory was watched too
        # a move inside the watch is one event with both names (or, when inotify hands its
        # halves over in two reads, a move and a create)
        assert ("move", "sub/f", "g") in seen or {
            ("move", "sub/f", ""),
            ("create", "g", ""),
        } <= set(seen)
        assert ("delete", "g", "") in seen


def test_fission_sdk_speaks_e2b_names(daemon: TcpDaemon, key: str) -> None:
    with FissionSandbox(language="python", url=daemon.url, api_key=key) as box:
        seen: list[bytes] = []
        done = box.commands.run("echo hi; exit 3", on_stdout=seen.append)
        assert (done.exit_code, done.stdout, seen) == (3, b"hi\n", [b"hi\n"])
        handle = box.commands.run("echo started; sleep 120", background=True)
        time.sleep(1.5)
        assert handle.kill() is True and handle.kill() is False
        with pytest.raises(FissionError):
            handle.wait()
        assert (
            box.commands.run("for p in /proc/[0-9]*; do cat $p/cmdline; echo; done").stdout.count(
                b"sleep"
            )
            == 0
        )
        quick = box.commands.run("echo bg", background=True)
        assert quick.wait(timeout=60).stdout == b"bg\n"
        assert box.files.make_dir("d/e").kind == "dir"
        assert box.files.get_info("d/e").kind == "dir"
        assert box.run_code("n = 20").exit_code == 0
        assert box.run_code("print(n + 1)").stdout == b"21\n"  # the default context keeps state
        assert box.run_code("print('n' in globals())", context="other").stdout == b"False\n"
        assert box.run("print('n' in globals())").stdout == b"False\n"  # run stays stateless
        before = box.info().expires_at
        assert box.set_timeout(900).expires_at > before
        again = FissionSandbox.connect(box.id, url=daemon.url, api_key=key)
        assert again.run_code("print(n)").stdout == b"20\n"
        again.close()
        assert box.kill() is True
        assert box.kill() is False


async def test_fission_async_sdk_speaks_e2b_names(daemon: TcpDaemon, key: str) -> None:
    async with AsyncFissionSandbox(language="python", url=daemon.url, api_key=key) as box:
        assert (await box.commands.run("echo hi")).stdout == b"hi\n"
        handle = await box.commands.run("sleep 120", background=True)
        await asyncio.sleep(1.5)
        assert await handle.kill() is True
        with pytest.raises(FissionError):
            await handle.wait()
        await box.run_code("m = 2")
        assert (await box.run_code("print(m * 3)")).stdout == b"6\n"
        assert (await box.files.get_info(".")).kind == "dir"
        async with await box.files.watch(".") as changes:
            await box.files.write("seen.txt", b"x")
            async with asyncio.timeout(20):
                async for event in changes:
                    # files.write lands under a temporary name, then is renamed onto its own
                    if event.type == "move" and event.to == "seen.txt":
                        break
