"""envd's ``process.Process`` service (Connect RPC) over fission's sandbox commands.

Each started process is a fission ``exec_command`` in a task of its own, with a small pid of
this table's; its output goes to every stream attached to it (``Start`` and any ``Connect``),
so a background command goes on when its starting stream is dropped and can be connected to
again, listed and killed. A kill (or SIGTERM) cancels the command: the agent kills its whole
process group. What fission does not have: a PTY (the SDK shows ``UNIMPLEMENTED``; PTYs come
with fission's own terminal support), and stdin sent after the start (a command gets no
stdin: ``send_stdin`` answers ``UNIMPLEMENTED``). Commands run as the sandbox user; ``user``
is ignored. ``/home/user`` (E2B's home) means ``/home/sandbox`` (``paths.guest_path``).
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

    def publish(self, event: process_pb.ProcessEvent | None) -> None:
        """Hand ``event`` (None: the stream is over) to every attached stream."""
        for queue in self.listeners:
            queue.put_nowait(event)

    def output(self, stream: str, data: bytes) -> None:
        """An output chunk of the command, as envd's DataEvent."""
        name = "stdout" if stream == "stdout" else "stderr"
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
        if request.pty is not None:
            raise ConnectError(
                Code.UNIMPLEMENTED, "PTYs are not supported by fission's E2B API yet"
            )
        config = request.process or process_pb.ProcessConfig()
        if not config.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "the process has no cmd")
        try:
            self.manager.check_running(record.id, record.owner)
        except FissionError as exc:
            raise rpc_error(exc) from exc
        run = ProcessRun(next(self._pids), record.id, config, request.tag or None)
        queue: asyncio.Queue[process_pb.ProcessEvent | None] = asyncio.Queue()
        run.listeners.append(queue)
        self.runs.setdefault(record.id, {})[run.pid] = run
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
        """Not supported: fission feeds a command's stdin only when it starts."""
        self._sandbox(ctx)
        raise ConnectError(Code.UNIMPLEMENTED, "fission's E2B API sends no stdin to a command")

    async def close_stdin(self, request: Any, ctx: Any) -> process_pb.CloseStdinResponse:
        """A command's stdin is closed from its start: nothing to do."""
        record = self._sandbox(ctx)
        self._find(record, request.process)
        return process_pb.CloseStdinResponse()

    async def update(self, request: Any, ctx: Any) -> process_pb.UpdateResponse:
        """Resizing a PTY: not supported."""
        self._sandbox(ctx)
        raise ConnectError(Code.UNIMPLEMENTED, "PTYs are not supported by fission's E2B API yet")

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
