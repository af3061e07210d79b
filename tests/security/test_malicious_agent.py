"""A compromised guest agent: what the host does when the other end of the channel is hostile.

User code cannot reach the agent's channel (it runs as uid 1000; the port is root's), so these
attacks assume a guest that is already fully compromised. The host side under test is the real
one (``execution.execute`` over a real ``AgentClient``); the guest end is a socket this
test writes by hand. Every attack must end in a clear error or a timeout result within its
deadline, never a hang, a crash of the host process or unbounded host memory.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from fission.agent.client import AgentClient
from fission.core.execution import KILL_GRACE, execute
from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.machines import exec_request
from fission.core.spec import RunSpec
from fission.errors import AgentProtocolError, VMError
from fission.guest import protocol
from fission.guest.protocol import FrameType

SPEC = RunSpec(resolve_language("python"), "print(1)", Limits(timeout=2))


class NoVM:
    """Stands in for the VM: the host only asks it for diagnostics when something fails."""

    def diagnostics(self) -> str:
        return "(a hostile test guest)"


@asynccontextmanager
async def hostile_guest(payload: bytes) -> AsyncIterator[AgentClient]:
    """An AgentClient whose guest answers the first EXEC with ``payload``, then keeps quiet."""
    host_end, guest_end = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=host_end)
    client = AgentClient(reader, writer)
    guest_end.setblocking(False)
    loop = asyncio.get_running_loop()

    async def guest() -> None:
        await loop.sock_recv(guest_end, 65536)  # the EXEC request
        await loop.sock_sendall(guest_end, payload)
        await asyncio.sleep(3600)

    task = asyncio.create_task(guest())
    try:
        yield client
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
        guest_end.close()


ATTACKS = {
    "bad magic": b"XX" + bytes(10),
    "oversized frame": protocol.HEADER.pack(
        protocol.MAGIC, protocol.PROTOCOL_VERSION, int(FrameType.STDOUT), 1, protocol.MAX_GUEST_PAYLOAD + 1
    ),
    "unknown frame type": protocol.HEADER.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, 250, 1, 0),
    "answer to another request": protocol.encode(FrameType.STDOUT, 77, b"x"),
    "exit with nonsense": protocol.encode_json(
        FrameType.EXIT, 1, {"exit_code": 999, "signal": -1, "timed_out": "yes"}
    ),
    "deeply nested json": protocol.encode(FrameType.EXIT, 1, b"[" * 100_000),
    "nan duration": protocol.encode(
        FrameType.EXIT,
        1,
        b'{"exit_code":0,"signal":0,"timed_out":false,"oom":false,'
        b'"output_truncated":false,"duration_ms":NaN}',
    ),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
async def test_garbage_from_the_guest_is_a_clear_error(attack: str) -> None:
    async with hostile_guest(ATTACKS[attack]) as client:
        started = time.monotonic()
        with pytest.raises(AgentProtocolError):
            await execute(client, exec_request(SPEC), diagnostics=NoVM().diagnostics)
        assert time.monotonic() - started < 5
        with pytest.raises(VMError):  # the channel is broken for good: the VM must go
            await execute(client, exec_request(SPEC), diagnostics=NoVM().diagnostics)


async def test_a_guest_that_stalls_ends_at_the_host_deadline() -> None:
    async with hostile_guest(protocol.encode(FrameType.STDOUT, 1, b"half a run")) as client:
        started = time.monotonic()
        result = (await execute(client, exec_request(SPEC), diagnostics=NoVM().diagnostics)).result
    elapsed = time.monotonic() - started
    assert result.timed_out and result.exit_code == 124 and result.stdout == b"half a run"
    assert SPEC.limits.timeout + KILL_GRACE - 0.5 < elapsed < SPEC.limits.timeout + KILL_GRACE + 2


async def test_a_flood_of_output_stays_capped_in_host_memory() -> None:
    chunk = protocol.encode(FrameType.STDOUT, 1, b"x" * protocol.OUTPUT_CHUNK)
    flood = chunk * ((64 * 1024 * 1024) // len(chunk))  # 64 MB, the cap is 1 MB
    spec = RunSpec(SPEC.language, SPEC.code, Limits(timeout=5, output_limit_mb=1))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with hostile_guest(flood) as client:
        result = (await execute(client, exec_request(spec), diagnostics=NoVM().diagnostics)).result
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert result.truncated and len(result.stdout) <= 1024 * 1024
    assert grown_mb < 200, f"the host kept {grown_mb:.0f} MB of a guest's flood"
