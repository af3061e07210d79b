"""What envd's processes take while they run: a command's stdin, a PTY's terminal.

A command started with ``stdin=True`` gets a ``StdinPipe``: ``SendInput``/``StreamInput`` put
chunks in a bounded queue the execution drains into the guest as fast as the agent channel
takes them (a writer waits while the queue is full; what the program has not read yet waits
in the guest agent), ``CloseStdin`` ends it (the program reads EOF).
A PTY is fission's terminal (``SandboxManager.ports.open_pty``: the sandbox user's login
shell, under the sandbox's limits); ``Terminal`` holds its stream for input and resizes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b.envd.process import process_pb

from fission.agent.ingress import IngressTunnel
from fission.agent.tunnel_streams import TunnelStream
from fission.core.sandbox_ports import DEFAULT_SHELL_SIZE, check_size
from fission.e2b.rpc_errors import rpc_error
from fission.errors import FissionError

STDIN_QUEUE = 16  # chunks a command's stdin holds before a writer waits for the program
# What a PTY may ask to run: fission's terminal is always the sandbox user's login shell
# (E2B's SDK asks for ``/bin/bash -i -l``).
PTY_SHELLS = frozenset({"/bin/bash", "bash", "/bin/sh", "sh"})
PTY_SHELL_FLAGS = frozenset({"-i", "-l", "--login"})


class StdinPipe:
    """A running command's stdin: chunks queued for the execution, then EOF."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=STDIN_QUEUE)
        self._ended = asyncio.Event()  # the command is over: nobody drains the queue
        self.closed = False

    async def write(self, data: bytes) -> None:
        """Queue ``data`` for the program (waits while the queue is full)."""
        if self.closed:
            raise ConnectError(Code.FAILED_PRECONDITION, "the process's stdin is closed")
        await self._put(data)

    async def close(self) -> None:
        """End the program's input (EOF once it has read what was queued); safe twice."""
        if not self.closed:
            self.closed = True
            await self._put(None)

    def end(self) -> None:
        """The command is over: writers waiting for room give up."""
        self.closed = True
        self._ended.set()

    async def chunks(self) -> AsyncIterator[bytes]:
        """What was written, in order, until the pipe is closed (the execution's stdin)."""
        while (chunk := await self._queue.get()) is not None:
            yield chunk

    async def _put(self, item: bytes | None) -> None:
        await first_of(self._queue.put(item), self._ended.wait())


async def first_of(*waits: Awaitable[Any]) -> None:
    """Wait until the first of ``waits`` is done; cancel the others."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


@dataclass
class Terminal:
    """A PTY process's terminal: its stream into the guest and the tunnel that resizes it."""

    stream: TunnelStream
    ingress: IngressTunnel

    async def write(self, data: bytes) -> None:
        """Type ``data`` into the terminal."""
        await self.stream.write(data)

    async def resize(self, size: Any) -> None:
        """Give the terminal envd's ``PTY.Size`` (cols x rows)."""
        cols, rows = pty_size(size)
        await self.ingress.resize(self.stream, cols, rows)


def pty_size(size: Any) -> tuple[int, int]:
    """The (cols, rows) of envd's ``PTY.Size`` (80x24 when none), checked."""
    if size is None:
        return DEFAULT_SHELL_SIZE
    try:
        return check_size(size.cols, size.rows)
    except FissionError as exc:
        raise rpc_error(exc) from exc


def check_pty_command(config: process_pb.ProcessConfig) -> None:
    """Refuse a PTY that asks for something other than a login shell."""
    if config.cmd not in PTY_SHELLS or not set(config.args) <= PTY_SHELL_FLAGS:
        command = " ".join([config.cmd, *config.args])
        raise ConnectError(
            Code.INVALID_ARGUMENT,
            f"a PTY runs the sandbox user's login shell (/bin/bash -i -l), not {command!r}: "
            "start the shell and type the command into it",
        )


def route_input(
    message: Any, stdin: StdinPipe | None, terminal: Terminal | None
) -> Awaitable[None]:
    """Where envd's ``ProcessInput`` goes: the command's stdin or the PTY's terminal."""
    chosen = message.input if message is not None else None
    if chosen is None:
        raise ConnectError(Code.INVALID_ARGUMENT, "the input has neither stdin nor pty bytes")
    if chosen.field == "pty":
        if terminal is None:
            raise ConnectError(Code.FAILED_PRECONDITION, "the process has no PTY: send stdin")
        return terminal.write(chosen.value)
    if stdin is None:
        raise ConnectError(
            Code.FAILED_PRECONDITION,
            "the process was started without stdin (start it with stdin=True; a PTY takes "
            "pty input)",
        )
    return stdin.write(chosen.value)
