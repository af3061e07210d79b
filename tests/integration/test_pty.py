"""Terminals on real VMs: ``fission shell`` on a real host PTY (pexpect) and ``sandbox.pty``.

One keyed daemon on loopback TCP and one sandbox serve the module. ``fission shell`` runs in a
pseudo-terminal of its own, as in a user's terminal: its output, full-screen escape sequences,
Ctrl-C, a resize seen by ``stty size``, ``~.`` leaving with the local terminal restored.
"""

from __future__ import annotations

import asyncio
import os
import re
import termios
import time
from collections.abc import Iterator

import grpc
import pexpect
import pytest

import fission
from fission.api import fission_pb2 as pb
from fission.api import fission_pb2_grpc as pb_grpc
from fission.errors import SandboxNotFound, Unauthorized
from fission.sdk import Terminal
from fission.sdk._connection import Connection, resolve_connection
from tests.integration.conftest import FISSION
from tests.integration.servers import TcpDaemon, free_port

pytestmark = pytest.mark.vm

PROMPT = re.compile(rb"[$#] ")
TIMEOUT = 60  # seconds any one answer of the shell may take on a busy TCG host


@pytest.fixture(scope="module")
def daemon() -> Iterator[tuple[TcpDaemon, str, str]]:
    server = TcpDaemon("--pool", "python=0", "--grpc-port", str(free_port()))
    owner = server.create_key("owner")
    other = server.create_key("other")
    server.start()
    try:
        yield server, owner, other
    finally:
        server.stop()


@pytest.fixture(scope="module")
def box(daemon: tuple[TcpDaemon, str, str]) -> Iterator[str]:
    server, owner, _ = daemon
    with server.client(owner) as client:
        made = client.post("/v1/sandboxes", json={"language": "python", "ttl": 600})
        assert made.status_code == 201, made.text
        sandbox_id = str(made.json()["id"])
        yield sandbox_id
        client.delete(f"/v1/sandboxes/{sandbox_id}")


def shell(server: TcpDaemon, key: str, sandbox_id: str) -> pexpect.spawn:
    """``fission shell`` on a fresh 24x80 pseudo-terminal, at its first prompt."""
    env = dict(os.environ, FISSION_URL=server.url, FISSION_API_KEY=key, TERM="xterm-256color")
    child = pexpect.spawn(
        FISSION, ["shell", sandbox_id], env=env, dimensions=(24, 80), timeout=TIMEOUT
    )
    child.expect(PROMPT)
    return child


def test_fission_shell_echo_screen_ctrl_c_resize_and_leave(
    daemon: tuple[TcpDaemon, str, str], box: str
) -> None:
    server, owner, _ = daemon
    child = shell(server, owner, box)
    try:
        child.sendline("echo hello-$((6 * 7))")
        child.expect("hello-42")
        child.expect(PROMPT)

        # Full-screen output: the terminal's capabilities come from terminfo in the guest.
        child.sendline("tput clear; tput cup 5 10; echo placed; tput cols")
        child.expect(re.escape(b"\x1b[H\x1b[2J"))  # xterm's clear screen
        child.expect(re.escape(b"\x1b[6;11H") + b"placed")  # cursor at row 5, column 10
        child.expect(b"\r\n80\r\n")
        child.expect(PROMPT)
        child.sendline(
            "python3 -c \"import curses; curses.wrapper(lambda s: (s.addstr(2, 3, 'curses-ok'),"
            ' s.refresh()))"; echo curses-done'
        )
        child.expect(b"curses-ok")
        child.expect(b"curses-done")
        child.expect(PROMPT)

        # Ctrl-C reaches the foreground job of the remote terminal at once.
        child.sendline("sleep 30; echo not-interrupted")
        time.sleep(1)
        started = time.monotonic()
        child.sendcontrol("c")
        child.expect(PROMPT)
        assert time.monotonic() - started < 15
        assert b"\nnot-interrupted" not in child.before  # echoed as typed, never printed
        child.sendline("echo status-$?")
        child.expect(b"status-130")
        child.expect(PROMPT)

        # A window size change reaches the shell (SIGWINCH -> resize -> TIOCSWINSZ).
        child.setwinsize(40, 120)
        time.sleep(1)
        child.sendline("stty size")
        child.expect(b"40 120")
        child.expect(PROMPT)

        # ~. at the start of a line leaves; fission exits 0 and the terminal is as it was.
        child.send("\r~.")
        child.expect(pexpect.EOF)
        lflag = termios.tcgetattr(child.child_fd)[3]
        assert lflag & termios.ICANON and lflag & termios.ECHO  # cooked again, not raw
        child.close()
        assert child.exitstatus == 0, child.before
    finally:
        child.close(force=True)


def test_fission_shell_exits_with_the_shells_code(
    daemon: tuple[TcpDaemon, str, str], box: str
) -> None:
    server, owner, _ = daemon
    child = shell(server, owner, box)
    try:
        child.sendline("exit 7")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 7
    finally:
        child.close(force=True)


def test_sdk_terminal_sync_and_async(daemon: tuple[TcpDaemon, str, str], box: str) -> None:
    server, owner, _ = daemon
    sandbox = fission.Sandbox.connect(box, url=server.url, api_key=owner)
    with sandbox.pty(cols=100, rows=30) as term:
        term.send(b"stty size; echo sdk-$((2 + 3))\n")
        assert b"30 100" in read_until(term, b"sdk-5")
        term.resize(90, 20)
        term.send("stty size\n")
        read_until(term, b"20 90")
        term.send("exit 3\n")
        assert term.wait(timeout=TIMEOUT) == 3
        assert term.exit_code == 3
    sandbox.close()

    async def drive() -> int | None:
        remote = await fission.AsyncSandbox.connect(box, url=server.url, api_key=owner)
        try:
            async with await remote.pty() as term:
                await term.send(b"echo async-ok; exit 4\n")
                seen = b""
                while b"async-ok" not in seen:
                    chunk = await term.read(timeout=TIMEOUT)
                    assert chunk, seen
                    seen += chunk
                return await term.wait(timeout=TIMEOUT)
        finally:
            await remote.close()

    assert asyncio.run(drive()) == 4


def read_until(term: Terminal, marker: bytes) -> bytes:
    """Output up to and including ``marker`` (TIMEOUT seconds at most per read)."""
    seen = b""
    while marker not in seen:
        chunk = term.read(timeout=TIMEOUT)
        assert chunk, seen
        seen += chunk
    return seen


def test_refusals_another_key_no_key_and_a_deleted_sandbox(
    daemon: tuple[TcpDaemon, str, str], box: str
) -> None:
    server, owner, other = daemon
    with pytest.raises(SandboxNotFound):
        Terminal._open(conn(server, other), box, 80, 24)
    with pytest.raises(Unauthorized):
        Terminal._open(conn(server, None), box, 80, 24)
    with server.client(owner) as client:
        made = client.post("/v1/sandboxes", json={"language": "python", "ttl": 600})
        assert made.status_code == 201, made.text
        doomed = made.json()["id"]
        assert client.delete(f"/v1/sandboxes/{doomed}").status_code == 204
    with pytest.raises(SandboxNotFound):
        Terminal._open(conn(server, owner), doomed, 80, 24)


def conn(server: TcpDaemon, key: str | None) -> Connection:

    if key is None:
        return resolve_connection(server.url, api_key="")
    return resolve_connection(server.url, api_key=key)


def grpc_ports(server: TcpDaemon) -> tuple[grpc.Channel, pb_grpc.PortsStub]:
    """A channel to the daemon's gRPC port and the Ports service on it."""
    port = server.args[server.args.index("--grpc-port") + 1]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, pb_grpc.PortsStub(channel)


def test_grpc_pty_and_ports(daemon: tuple[TcpDaemon, str, str], box: str) -> None:
    server, owner, other = daemon
    channel, ports = grpc_ports(server)
    keyed = (("authorization", f"Bearer {owner}"),)
    with channel:

        def inputs() -> Iterator[pb.PtyInput]:
            yield pb.PtyInput(start=pb.PtyStart(sandbox_id=box, cols=70, rows=15))
            yield pb.PtyInput(data=b"stty size; echo grpc-$((1 + 1))\n")
            time.sleep(3)  # the first command has run before the resize
            yield pb.PtyInput(resize=pb.PtySize(cols=60, rows=12))
            yield pb.PtyInput(data=b"stty size; exit 5\n")

        seen, exit_code = b"", None
        for output in ports.Pty(inputs(), metadata=keyed, timeout=TIMEOUT):
            if output.WhichOneof("part") == "data":
                seen += output.data
            else:
                exit_code = output.exit.exit_code
        assert b"15 70" in seen and b"grpc-2" in seen and b"12 60" in seen, seen
        assert exit_code == 5

        others = (("authorization", f"Bearer {other}"),)
        start = [pb.PtyInput(start=pb.PtyStart(sandbox_id=box))]
        with pytest.raises(grpc.RpcError) as refused:
            list(ports.Pty(iter(start), metadata=others, timeout=TIMEOUT))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as nobody:
            list(ports.Pty(iter(start), timeout=TIMEOUT))
        assert nobody.value.code() == grpc.StatusCode.UNAUTHENTICATED

        exposed = ports.Expose(pb.ExposePortRequest(sandbox_id=box, port=8000), metadata=keyed)
        assert exposed.path == f"/v1/sandboxes/{box}/ports/8000/"
        token = ports.MintPortToken(
            pb.MintPortTokenRequest(sandbox_id=box, port=8000), metadata=keyed
        )
        assert token.token.startswith("fpt_")
        listed = ports.ListPorts(pb.ListPortsRequest(sandbox_id=box), metadata=keyed)
        assert [(p.port, list(p.token_ids)) for p in listed.ports] == [(8000, [token.token_id])]
        ports.RevokePortToken(
            pb.RevokePortTokenRequest(sandbox_id=box, port=8000, token_id=token.token_id),
            metadata=keyed,
        )
        ports.Unexpose(pb.UnexposePortRequest(sandbox_id=box, port=8000), metadata=keyed)
        assert not ports.ListPorts(pb.ListPortsRequest(sandbox_id=box), metadata=keyed).ports
        with pytest.raises(grpc.RpcError) as strange:
            ports.Expose(pb.ExposePortRequest(sandbox_id=box, port=8000), metadata=others)
        assert strange.value.code() == grpc.StatusCode.NOT_FOUND


def test_big_output_arrives_whole_and_terminals_are_capped(
    daemon: tuple[TcpDaemon, str, str], box: str
) -> None:
    server, owner, _ = daemon
    sandbox = fission.Sandbox.connect(box, url=server.url, api_key=owner)
    try:
        with sandbox.pty() as term:
            # 2 MB through the flow-controlled stream (8 windows): nothing lost or reordered.
            term.send(b"echo ST''ART; head -c 2000000 /dev/zero | tr '\\0' Q; echo EN''D\n")
            seen = read_until(term, b"END")
            body = seen[seen.index(b"START") : seen.index(b"END")]
            assert body.count(b"Q") == 2_000_000
        opened = [sandbox.pty() for _ in range(4)]
        try:
            with pytest.raises(fission.sdk.Busy):
                sandbox.pty()
        finally:
            for term in opened:
                term.close()
        with sandbox.pty() as again:  # a closed terminal frees its place
            again.send(b"exit\n")
            assert again.wait(timeout=TIMEOUT) == 0
    finally:
        sandbox.close()
