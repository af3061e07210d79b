"""envd's ``process.Process`` service (Connect RPC) over fission's sandbox commands.

Each started process is a fission ``exec_command`` in a task of its own, with a small pid of
this table's; its output goes to every stream attached to it (``Start`` and any ``Connect``),
so a background command goes on when its starting stream is dropped and can be connected to
again, listed and killed. A kill (or SIGTERM) cancels the command: the agent kills its whole
process group. A command started with ``stdin=True`` takes input while it runs, a PTY is
fission's terminal (``process_io``). Commands run as the sandbox user; ``user`` is ignored.
``/home/user`` (E2B's home) means ``/home/sandbox`` (``paths.guest_path``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b.envd.process import process_connect, process_pb

from fission.core.sandbox_spec import SandboxRecord
from fission.core.sandboxes import SandboxManager
from fission.e2b.access import SandboxAccess
from fission.e2b.paths import guest_path
from fission.e2b.process_io import (
    StdinPipe,
    Terminal,
    check_pty_command,
    pty_size,
    route_input,
)
from fission.e2b.rpc_errors import oneof, rpc_error
from fission.errors import FissionError

MAX_COMMAND_SECONDS = 3600.0  # fission's longest execution (limits.RANGES["timeout"])
KEEPALIVE_SECONDS = 30.0
KILLED = -1


@dataclass
class ProcessRun:
    """One command of one sandbox and the streams attached to it."""

    pid: int
    sandbox_id: str
    config: process_pb.ProcessConfig
    tag: str | None
    listeners: list[asyncio.Queue[process_pb.ProcessEvent | None]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    killed: bool = False
    stdin: StdinPipe | None = None  # started with stdin=True
    terminal: Terminal | None = None  # a PTY, once its shell started

    def publish(self, event: process_pb.ProcessEvent | None) -> None:
        """Hand ``event`` (None: the stream is over) to every attached stream."""
        for queue in self.listeners:
            queue.put_nowait(event)

    def output(self, stream: str, data: bytes) -> None:
        """An output chunk of the command (``stdout``, ``stderr``, ``pty``), as a DataEvent."""
        name = stream if stream in ("stdout", "pty") else "stderr"
        data_event = process_pb.ProcessEvent.DataEvent(output=oneof(name, data))
        self.publish(process_pb.ProcessEvent(event=oneof("data", data_event)))

    def info(self) -> process_pb.ProcessInfo:
        """envd's ProcessInfo of this command."""
        return process_pb.ProcessInfo(config=self.config, pid=self.pid, tag=self.tag)


def end_event(exit_code: int, status: str, error: str | None = None) -> process_pb.ProcessEvent:
    """envd's EndEvent."""
    end = process_pb.ProcessEvent.EndEvent(
        exit_code=exit_code, exited=exit_code != KILLED, status=status, error=error
    )
    return process_pb.ProcessEvent(event=oneof("end", end))


class ProcessService(process_connect.Process):
    """The ``process.Process`` service for every sandbox of the daemon (what it does not
    define, e.g. ``StreamInput``, answers UNIMPLEMENTED from the generated base)."""

    def __init__(self, manager: SandboxManager, access: SandboxAccess) -> None:
        self.manager = manager
        self.access = access
        self._pids = itertools.count(1000)
        self.runs: dict[str, dict[int, ProcessRun]] = {}

    def _sandbox(self, ctx: Any) -> SandboxRecord:
        headers = ctx.request_headers
        try:
            return self.access.check(headers.get("e2b-sandbox-id"), headers.get("x-access-token"))
        except FissionError as exc:
            raise rpc_error(exc) from exc

    def _find(self, record: SandboxRecord, selector: Any) -> ProcessRun:
        runs = self.runs.get(record.id, {})
        chosen = selector.selector if selector is not None else None
        for run in runs.values():
            if chosen == oneof("pid", run.pid) or (
                run.tag is not None and chosen == oneof("tag", run.tag)
            ):
                return run
        raise ConnectError(Code.NOT_FOUND, f"no process {chosen} in sandbox {record.id}")

    async def list(self, request: Any, ctx: Any) -> process_pb.ListResponse:
        """The commands running in the sandbox."""
        record = self._sandbox(ctx)
        runs = self.runs.get(record.id, {}).values()
        return process_pb.ListResponse(processes=[run.info() for run in runs])

    async def start(self, request: Any, ctx: Any) -> AsyncIterator[process_pb.StartResponse]:
        """Start a command and stream its events (start, output, end)."""
        record = self._sandbox(ctx)
        config = request.process or process_pb.ProcessConfig()
        if not config.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "the process has no cmd")
        if request.pty is not None:
            check_pty_command(config)
            size = pty_size(request.pty.size)
        try:
            self.manager.check_running(record.id, record.owner)
        except FissionError as exc:
            raise rpc_error(exc) from exc
        run = ProcessRun(next(self._pids), record.id, config, request.tag or None)
        queue: asyncio.Queue[process_pb.ProcessEvent | None] = asyncio.Queue()
        run.listeners.append(queue)
        self.runs.setdefault(record.id, {})[run.pid] = run  # its task's end forgets it
        if request.pty is not None:
            opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            run.task = asyncio.create_task(self._terminal(run, record, size, opened, ctx))
            try:
                await opened  # the shell started, or why not (an RPC error for the caller)
            except BaseException:
                run.task.cancel()
                raise
        else:
            run.stdin = StdinPipe() if request.stdin else None
            run.task = asyncio.create_task(self._execute(run, record, self._seconds(ctx)))
        started = process_pb.ProcessEvent.StartEvent(pid=run.pid)
        yield process_pb.StartResponse(event=process_pb.ProcessEvent(event=oneof("start", started)))
        async for event in self._follow(run, queue):
            yield process_pb.StartResponse(event=event)

    async def connect(self, request: Any, ctx: Any) -> AsyncIterator[process_pb.ConnectResponse]:
        """Attach to a running command: its events from now on."""
        record = self._sandbox(ctx)
        run = self._find(record, request.process)
        queue: asyncio.Queue[process_pb.ProcessEvent | None] = asyncio.Queue()
        run.listeners.append(queue)
        started = process_pb.ProcessEvent.StartEvent(pid=run.pid)
        yield process_pb.ConnectResponse(
            event=process_pb.ProcessEvent(event=oneof("start", started))
        )
        async for event in self._follow(run, queue):
            yield process_pb.ConnectResponse(event=event)

    async def send_signal(self, request: Any, ctx: Any) -> process_pb.SendSignalResponse:
        """SIGKILL or SIGTERM: end the command (and everything it started)."""
        record = self._sandbox(ctx)
        run = self._find(record, request.process)
        run.killed = True
        if run.task is not None:
            run.task.cancel()
        return process_pb.SendSignalResponse()

    async def send_input(self, request: Any, ctx: Any) -> process_pb.SendInputResponse:
        """Bytes for a command's stdin (started with stdin=True) or a PTY's terminal."""
        record = self._sandbox(ctx)
        run = self._find(record, request.process)
        await route_input(request.input, run.stdin, run.terminal)
        return process_pb.SendInputResponse()

    async def stream_input(self, request: Any, ctx: Any) -> process_pb.StreamInputResponse:
        """A stream of input: a start event naming the process, then data events, in order."""
        record = self._sandbox(ctx)
        run = None
        async for message in request:
            event = message.event
            if event is None or event.field == "keepalive":
                continue
            if event.field == "start":
                run = self._find(record, event.value.process)
            elif run is None:
                raise ConnectError(Code.INVALID_ARGUMENT, "the input stream must start first")
            else:
                await route_input(event.value.input, run.stdin, run.terminal)
        return process_pb.StreamInputResponse()

    async def close_stdin(self, request: Any, ctx: Any) -> process_pb.CloseStdinResponse:
        """EOF on a command's stdin (without stdin=True it had none: nothing to do)."""
        record = self._sandbox(ctx)
        run = self._find(record, request.process)
        if run.stdin is not None:
            await run.stdin.close()
        return process_pb.CloseStdinResponse()

    async def update(self, request: Any, ctx: Any) -> process_pb.UpdateResponse:
        """Resize a PTY."""
        record = self._sandbox(ctx)
        run = self._find(record, request.process)
        if run.terminal is None:
            raise ConnectError(Code.FAILED_PRECONDITION, f"process {run.pid} has no PTY")
        if request.pty is None:
            raise ConnectError(Code.INVALID_ARGUMENT, "the update has no PTY size")
        await run.terminal.resize(request.pty.size)
        return process_pb.UpdateResponse()

    @staticmethod
    def _seconds(ctx: Any) -> float:
        """The command's deadline: the client's stream deadline, else fission's longest."""
        remaining = ctx.timeout_ms
        if not remaining:
            return MAX_COMMAND_SECONDS
        return min(max(remaining / 1000.0, 1.0), MAX_COMMAND_SECONDS)

    async def _execute(self, run: ProcessRun, record: SandboxRecord, seconds: float) -> None:
        """Run the command; publish its end (whatever ends it) and forget it."""
        config = run.config
        end = end_event(KILLED, "signal: killed")
        try:
            result = await self.manager.exec_command(
                record.id,
                [config.cmd, *config.args],
                owner=record.owner,
                timeout=seconds,
                env=dict(config.envs) or None,
                cwd=guest_path(config.cwd) if config.cwd else None,
                on_output=run.output,
                stdin=run.stdin.chunks() if run.stdin is not None else None,
            )
            if result.timed_out:
                end = end_event(KILLED, "signal: killed", f"timed out after {seconds:g} s")
            else:
                end = end_event(result.exit_code, f"exit status {result.exit_code}")
        except asyncio.CancelledError:
            if not run.killed:
                raise
        except FissionError as exc:
            end = end_event(KILLED, "error", str(exc))
        finally:
            if run.stdin is not None:
                run.stdin.end()
            self._finish(run, end)

    async def _terminal(
        self,
        run: ProcessRun,
        record: SandboxRecord,
        size: tuple[int, int],
        opened: asyncio.Future[None],
        ctx: Any,
    ) -> None:
        """Run a PTY: open fission's terminal, stream its bytes until the shell exits."""
        config = run.config
        seconds = self._seconds(ctx)
        end = end_event(KILLED, "signal: killed")
        try:
            async with self.manager.ports.open_pty(
                record.id,
                record.owner,
                *size,
                env=dict(config.envs),
                cwd=guest_path(config.cwd) if config.cwd else None,
            ) as (stream, ingress):
                run.terminal = Terminal(stream, ingress)
                opened.set_result(None)
                async with asyncio.timeout(seconds):
                    while data := await stream.read():
                        run.output("pty", data)
                code = stream.exit_code
                if code is None:
                    end = end_event(KILLED, "error", "the sandbox stopped under the terminal")
                else:
                    end = end_event(code, f"exit status {code}")
        except TimeoutError:
            end = end_event(KILLED, "signal: killed", f"timed out after {seconds:g} s")
        except asyncio.CancelledError:
            if not run.killed:
                raise
        except FissionError as exc:
            if not opened.done():
                opened.set_exception(rpc_error(exc))
            end = end_event(KILLED, "error", str(exc))
        finally:
            if not opened.done():  # the guest did not answer in time, or the start was dropped
                why = "the sandbox's terminal did not start in time"
                opened.set_exception(ConnectError(Code.UNAVAILABLE, why))
            self._finish(run, end)

    def _finish(self, run: ProcessRun, end: process_pb.ProcessEvent) -> None:
        """Publish the run's end to its streams and forget it."""
        self.runs.get(run.sandbox_id, {}).pop(run.pid, None)
        run.publish(end)
        run.publish(None)

    @staticmethod
    async def _follow(
        run: ProcessRun, queue: asyncio.Queue[process_pb.ProcessEvent | None]
    ) -> AsyncIterator[process_pb.ProcessEvent]:
        """The events of ``run`` for one stream, with keepalives while it is quiet."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    keepalive = process_pb.ProcessEvent.KeepAlive()
                    yield process_pb.ProcessEvent(event=oneof("keepalive", keepalive))
                    continue
                if event is None:
                    return
                yield event
        finally:
            with contextlib.suppress(ValueError):
                run.listeners.remove(queue)

    def forget(self, sandbox_id: str) -> None:
        """Drop the table of a sandbox that is gone."""
        self.runs.pop(sandbox_id, None)
