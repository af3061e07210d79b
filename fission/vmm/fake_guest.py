"""The guest of a fake VM: the agent protocol for real, its programs and files on the host.

A ``FakeGuest`` serves one end of a socketpair whose other end is the VM's agent channel, so the
host's real ``AgentClient`` talks to it as to a guest agent: ``fission.guest.protocol`` frames,
and the agent's own code wherever it runs on a host, so the fake cannot drift from it:

* INIT -> HELLO, PING -> PONG, PREPARE -> READY (there is no fork server: ``zygote`` false);
* EXEC: parsed and checked by the agent's own ``Execution``. ``argv`` (plus the script, written
  to a private run directory) runs as a host subprocess in a session of its own, with the
  environment the agent builds (``HOME`` and ``TMPDIR`` mapped into the VM's private root) and
  the working directory mapped likewise (one outside the agent's roots cannot be). Output goes
  back in ``OUTPUT_CHUNK`` pieces up to the request's cap; at the timeout the session is killed
  and EXIT says ``timed_out``; when the main process ends whatever it left is killed; STDIN and
  KILL work as in the agent;
* Python code contexts are accepted (for Python only, as by the agent) but keep no state: each
  run starts afresh and its EXIT says ``context_reset``; DROP finds no context to drop;
* FILE and DATA: the agent's own ``files.FileOps``, its roots (/home/sandbox, /tmp, /data)
  mapped to directories of the VM's private root, without the switch to the sandbox user;
* LISTEN is refused: a fake VM has no network; CONNECT and PTY are answered CLOSE (nothing
  listens, no terminal), and remembered in ``opened``.

No isolation and no memory or pids limits (``oom`` is never true): a test double for the control
plane, never a sandbox. ``pause`` stops reading frames and SIGSTOPs the programs, like stopped
vCPUs; ``resume`` undoes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

from fission.guest import context, files, protocol, watch
from fission.guest.agent import DRAIN_SECONDS, Execution
from fission.guest.protocol import INVALID_INPUT, AgentError, FrameType

CHANNEL_READ = 1024 * 1024  # most bytes taken from the host at once
KILL_WAIT = 5.0  # seconds to reap a program after SIGKILL
START_FAILED = 127  # the exit code of a program that could not be started, as in the agent


def host_path(base: Path, guest_path: str) -> Path:
    """Where ``guest_path`` (under one of the agent's roots) lives below ``base`` on the host."""
    root, rest = files.split_path(guest_path)
    return base / root.lstrip("/") / rest


class RootedFiles(files.FileOps):
    """The agent's file operations, with its roots mapped below ``base`` on the host."""

    def __init__(self, send: files.Send, base: Path) -> None:
        super().__init__(send, uid=None, gid=None)
        self.base = base

    def open_root(self, root: str) -> int:
        """An O_PATH fd of the host directory standing for the allowed root ``root``."""
        return super().open_root(str(host_path(self.base, root)))


class Run:
    """One program the fake guest runs for one request."""

    def __init__(self, request_id: int, execution: Execution) -> None:
        self.id = request_id
        self.execution = execution
        self.stdin: asyncio.Queue[bytes] = asyncio.Queue()
        self.proc: asyncio.subprocess.Process | None = None
        self.forwarded = 0
        self.truncated = False
        self.timed_out = False

    def signal(self, number: int) -> None:
        """Send ``number`` to every process of the run (its session's process group)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, number)


class FakeGuest:
    """Serves the agent protocol on ``sock``; programs and files live under ``root``."""

    def __init__(
        self,
        sock: socket.socket,
        root: Path,
        clock: Callable[[], float],
        detached: bool = False,
    ) -> None:
        self.root = root
        self.detached = detached
        self._next_sock: asyncio.Queue[socket.socket] = asyncio.Queue()
        self._orphans: set[int] = set()  # runs of a host that went away: output dropped
        self.files = RootedFiles(self._send, root)
        # The agent's own watches (real inotify on the host directories), read by the loop.
        self.watches = watch.Watches(self.files, self._send, self._watch_fd)
        self.watches.unregister = lambda w: asyncio.get_running_loop().remove_reader(w.fd)
        self.runs: dict[int, Run] = {}
        self.execs: list[dict[str, Any]] = []  # every EXEC request received, for tests
        self.inits: list[dict[str, Any]] = []  # every INIT received (the wall clock and a seed)
        self.kills: list[int] = []  # the request ids of every KILL received
        self.opened: list[dict[str, Any]] = []  # every CONNECT and PTY request, refused
        self.cancelled_transfers = 0  # file transfers a KILL cut short
        self.log: list[str] = []
        self._sock = sock
        self._clock = clock
        self._writer: asyncio.StreamWriter | None = None
        self._awake = asyncio.Event()
        self._awake.set()
        self._pump: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the channel ------------------------------------------------------------------------------
    async def serve(self) -> None:
        """Answer the host until it closes the channel; then stop every program.

        A detached guest (a sandbox's VM, which outlives its daemon) instead waits for the
        host to connect again (``reconnect``); the runs of the host that left go on, their
        output dropped, as the agent does.
        """
        try:
            while True:
                await self._serve_connection()
                if not self.detached:
                    return
                self._orphans |= set(self.runs)
                self._sock = await self._next_sock.get()
        finally:
            await self._stop()

    def reconnect(self, sock: socket.socket) -> None:
        """Serve ``sock`` next: a new host end after the last one closed (detached guests)."""
        self._next_sock.put_nowait(sock)

    async def _serve_connection(self) -> None:
        """Serve one host connection until it closes."""
        try:
            reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)
            decoder = protocol.FrameDecoder(protocol.MAX_HOST_PAYLOAD)
            while True:
                data = await reader.read(CHANNEL_READ)
                if not data:
                    return
                await self._awake.wait()  # what arrived while paused waits, as in a stopped VM
                try:
                    frames = decoder.feed(data)
                except protocol.ProtocolError as exc:
                    self.log.append(f"bad frame from host: {exc}")
                    decoder = protocol.FrameDecoder(protocol.MAX_HOST_PAYLOAD)
                    self._send_json(FrameType.ERROR, 0, {"message": f"bad frame: {exc}"})
                    continue
                for frame in frames:
                    self._answer(frame)
                if self.files.downloads and (self._pump is None or self._pump.done()):
                    self._pump = self._spawn(self._pump_files())
                await self._drain()
        except ConnectionError:
            return
        finally:
            if self._writer is not None:
                self._writer.close()

    def _answer(self, frame: protocol.Frame) -> None:
        """Handle one frame; a failure becomes an ERROR frame, as in the agent."""
        try:
            self._handle(frame)
        except AgentError as exc:
            message = {"code": exc.code, "message": exc.message}
            self._send_json(FrameType.ERROR, frame.request_id, message)
        except Exception as exc:
            self.log.append(f"request {frame.request_id} failed: {exc!r}")
            message = {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}
            self._send_json(FrameType.ERROR, frame.request_id, message)

    def _handle(self, frame: protocol.Frame) -> None:
        kind, rid = frame.type, frame.request_id
        if kind == FrameType.INIT:
            self.inits.append(protocol.decode_json(frame.payload))  # a host needs neither
            hello = {"protocol": protocol.PROTOCOL_VERSION, "agent": "fake", "kernel": "fake"}
            self._send_json(FrameType.HELLO, rid, hello)
        elif kind == FrameType.PING:
            self._send_json(FrameType.PONG, rid, {})
        elif kind == FrameType.PREPARE:
            self._send_json(FrameType.READY, rid, {"zygote": False})
        elif kind == FrameType.EXEC:
            self._exec(rid, protocol.decode_json(frame.payload))
        elif kind == FrameType.STDIN:
            if rid in self.runs:
                self.runs[rid].stdin.put_nowait(frame.payload)
        elif kind == FrameType.KILL:
            self.kills.append(rid)
            if rid in self.runs:
                self.runs[rid].signal(signal.SIGKILL)
            elif self.watches.cancel(rid):
                pass
            elif self.files.cancel(rid):
                self.cancelled_transfers += 1
        elif kind == FrameType.FILE:
            self.files.handle(rid, protocol.decode_json(frame.payload))
        elif kind == FrameType.DATA:
            self.files.data(rid, frame.payload)
        elif kind == FrameType.WATCH:
            self.watches.start(rid, protocol.decode_json(frame.payload))
        elif kind == FrameType.DROP:
            context.check_context_id(protocol.decode_json(frame.payload).get("context"))
            self._send_json(FrameType.RESULT, rid, {"dropped": False})
        elif kind == FrameType.LISTEN:
            raise AgentError(INVALID_INPUT, "a fake VM has no network")
        elif kind in (FrameType.CONNECT, FrameType.PTY):  # nothing listens, no terminals
            self.opened.append(protocol.decode_json(frame.payload))
            refusal = {"how": "reset", "error": "a fake VM has no ports or terminals"}
            self._send_json(FrameType.CLOSE, rid, refusal)
        elif kind not in protocol.STREAM_FRAMES:  # no tunnel is ever open: nothing to stream
            raise ValueError(f"frame type {kind.name} is not for the guest")

    def _send(self, frame_type: FrameType, request_id: int, payload: bytes) -> None:
        if request_id in self._orphans and frame_type not in protocol.STREAM_FRAMES:
            return
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(protocol.encode(frame_type, request_id, payload))

    def _send_json(self, frame_type: FrameType, request_id: int, message: dict[str, Any]) -> None:
        self._send(frame_type, request_id, protocol.dump_json(message))

    def _watch_fd(self, started: watch.Watch) -> None:
        def readable() -> None:
            started.on_readable()
            self.watches.flush()

        asyncio.get_running_loop().add_reader(started.fd, readable)

    async def _drain(self) -> None:
        if self._writer is not None and not self._writer.is_closing():
            await self._writer.drain()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _pump_files(self) -> None:
        """Send the reads in flight a chunk at a time, as the agent's loop does."""
        while self.files.downloads:
            await self._awake.wait()
            self.files.pump()
            await self._drain()
            await asyncio.sleep(0)

    # -- pause, resume, stop ----------------------------------------------------------------------
    @property
    def paused(self) -> bool:
        """Whether the guest is frozen (``pause`` without ``resume``)."""
        return not self._awake.is_set()

    def pause(self) -> None:
        """Stop reading frames and freeze every program."""
        self._awake.clear()
        for run in self.runs.values():
            run.signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Thaw the programs and serve again."""
        for run in self.runs.values():
            run.signal(signal.SIGCONT)
        self._awake.set()

    async def _stop(self) -> None:
        """Kill every program and end every task of this guest."""
        self._awake.set()  # a paused run must be able to finish dying
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for rid in list(self.files.uploads) + list(self.files.downloads):
            self.files.cancel(rid)
        self.watches.cancel_all()

    def close(self) -> None:
        """Close this end of the channel (the host then reads its end; idempotent)."""
        if self._writer is not None:
            self._writer.close()
        else:
            self._sock.close()

    # -- runs -------------------------------------------------------------------------------------
    def _exec(self, rid: int, message: dict[str, Any]) -> None:
        if rid in self.runs:
            raise ValueError(f"request {rid} is already running")
        # The agent's own parsing: the same checks and the same errors for a bad request.
        execution = Execution(cast(Any, self), rid, message)
        self.execs.append(message)
        run = self.runs[rid] = Run(rid, execution)
        self._spawn(self._run(run))

    async def _run(self, run: Run) -> None:
        started = self._clock()
        workdir = self.root.parent / "runs" / str(run.id)
        try:
            returncode = await self._start_and_wait(run, workdir)
        except Exception as exc:
            self.log.append(f"run {run.id} failed: {exc!r}")
            message = {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}
            self._send_json(FrameType.ERROR, run.id, message)
            return
        finally:
            if run.proc is not None and run.proc.returncode is None:
                run.signal(signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.proc.wait(), KILL_WAIT)
            shutil.rmtree(workdir, ignore_errors=True)
            self.runs.pop(run.id, None)
        exit_code, signal_number = returncode, 0
        if returncode < 0:
            exit_code, signal_number = 128 - returncode, -returncode
        elapsed = max(0.0, (self._clock() - started) * 1000.0)
        outcome = {
            "exit_code": exit_code,
            "signal": signal_number,
            "timed_out": run.timed_out,
            "oom": False,
            "output_truncated": run.truncated,
            "duration_ms": round(elapsed, 3),
            "warm": False,
            "context_reset": run.execution.context is not None,
        }
        await self._awake.wait()
        self._send_json(FrameType.EXIT, run.id, outcome)
        await self._drain()

    async def _start_and_wait(self, run: Run, workdir: Path) -> int:
        """Start the program and supervise it; its return code (negative: killed by a signal)."""
        execution = run.execution
        argv = list(execution.argv)
        workdir.mkdir(parents=True)
        if isinstance(execution.script, str):
            script = workdir / execution.script_name
            script.write_text(execution.script, encoding="utf-8")
            argv.append(str(script))
        env = dict(execution.env)
        try:
            for name in ("HOME", "TMPDIR"):
                env[name] = str(host_path(self.root, env[name]))
            run.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE
                if execution.wants_stdin
                else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=host_path(self.root, execution.cwd),
                env=env,
                start_new_session=True,
            )
        except (OSError, AgentError) as exc:
            failure = f"fission: cannot start program: {type(exc).__name__}: {exc}\n"
            self._send(FrameType.STDERR, run.id, failure.encode(errors="replace"))
            return START_FAILED
        return await self._supervise(run, run.proc)

    async def _supervise(self, run: Run, proc: asyncio.subprocess.Process) -> int:
        assert proc.stdout is not None and proc.stderr is not None
        readers = [
            asyncio.create_task(self._forward(run, proc.stdout, FrameType.STDOUT)),
            asyncio.create_task(self._forward(run, proc.stderr, FrameType.STDERR)),
        ]
        feeder = asyncio.create_task(self._feed(run, proc.stdin)) if proc.stdin else None
        try:
            try:
                await asyncio.wait_for(proc.wait(), run.execution.timeout)
            except TimeoutError:
                run.timed_out = True
                run.signal(signal.SIGKILL)
                await proc.wait()
            run.signal(signal.SIGKILL)  # whatever the program left behind dies with it
            await asyncio.wait(readers, timeout=DRAIN_SECONDS)
        finally:
            pending = [task for task in (*readers, feeder) if task is not None]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        assert proc.returncode is not None
        return proc.returncode

    async def _forward(self, run: Run, stream: asyncio.StreamReader, kind: FrameType) -> None:
        """Send what the program writes on ``stream`` within the output cap; read it all."""
        while chunk := await stream.read(protocol.OUTPUT_CHUNK):
            room = run.execution.output_limit - run.forwarded
            if len(chunk) > room:
                chunk, run.truncated = chunk[: max(room, 0)], True
            if chunk:
                await self._awake.wait()
                run.forwarded += len(chunk)
                self._send(kind, run.id, chunk)
                await self._drain()

    @staticmethod
    async def _feed(run: Run, stdin: asyncio.StreamWriter) -> None:
        """Write the STDIN frames' bytes to the program until the empty one (end of input)."""
        try:
            while data := await run.stdin.get():
                stdin.write(data)
                await stdin.drain()
        except ConnectionError:  # the program closed its stdin: the rest is dropped
            pass
        finally:
            stdin.close()
