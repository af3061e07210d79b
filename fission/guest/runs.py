"""One program the agent runs for one EXEC request (guest side, stdlib only).

An ``Execution`` validates its request, starts the program in the cheapest way that gives it
the same box, streams its output within the cap, enforces its deadline, and sends EXIT. The
ways to start, fastest first: a code context's live interpreter (``context.py``); a warm
fork-server child (``warm.py``), already confined, that runs the Python script itself or
only has to exec the program; a fresh fork here (the fallback).
Every one of them is the sandbox user, with ``no_new_privs``, in a cgroup of the run's own
(limits written at hand-over) or of its context.

The EXIT frame goes out as soon as the main process has ended and its output is read; what
follows (killing leftovers when none hold the output open, closing pipes, removing the cgroup
and the script directory, preparing the next warm process) happens after it, off the run's
path. With ``trace`` in the request, EXIT also carries the offsets in ms of each step from the
moment the agent read the EXEC frame (``mark``); the host treats them as untrusted numbers.
"""

from __future__ import annotations

import contextlib
import os
import select
import selectors
import shutil
import signal
import sys
import time
from typing import Any

if __package__:
    from . import confine, context, protocol
    from .confine import SANDBOX_HOME, build_env, oom_kills, write_file
    from .protocol import INVALID_INPUT, AgentError
    from .zygote import START_FAILED, child_steps
else:  # run as a script inside the guest, with its modules beside it
    import confine  # type: ignore[no-redef]
    import context  # type: ignore[no-redef]
    import protocol  # type: ignore[no-redef]
    from confine import (  # type: ignore[no-redef]
        SANDBOX_HOME,
        build_env,
        oom_kills,
        write_file,
    )
    from protocol import INVALID_INPUT, AgentError  # type: ignore[no-redef]
    from zygote import START_FAILED, child_steps  # type: ignore[no-redef]

CGROUP_ROOT = "/sys/fs/cgroup"
RUN_DIR = "/run/fission"
STDERR = protocol.FrameType.STDERR  # read before stdout when both wait (see agent.stderr_first)
DRAIN_SECONDS = 1.0  # after the main process ends, how long to collect buffered output
WARM_WAIT = 2.0  # how long a Python run waits for a fork-server child already being forked
MAX_TRACE_STEPS = 24  # the host accepts no more (``fission.agent.client``)
STATUS_WAIT = 0.02  # once a run's output ended, how long to wait for its exit status at once
DRAIN_READS = 16  # reads of a pipe at a status: a whole pipe (at most 1 MiB) in OUTPUT_CHUNKs
KILLED_POLL = 0.1  # a run killed at its deadline: how often to look for its end meanwhile
# Stdin the program has not read yet, at most (the host's cap on a run's stdin): input streamed
# past it while the program does not read would only grow the agent, which the OOM killer spares.
MAX_PENDING_STDIN = 16 * 1024 * 1024


def log(message: str) -> None:
    """Write one line to the kernel console (the VM's serial log on the host)."""
    try:
        with open("/dev/kmsg", "w") as kmsg:
            kmsg.write(f"fission-agent: {message}\n")
    except OSError:
        sys.stderr.write(f"fission-agent: {message}\n")


def write_script(path: str, text: str) -> None:
    """Write a run's script, readable by the sandbox user (a handful of syscalls, no io stack)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(text.encode("utf-8"))
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, 0o644)  # whatever the umask
    finally:
        os.close(fd)


def remove_tree(path: str) -> None:
    """Remove a directory tree the agent made, ignoring what is already gone."""
    shutil.rmtree(path, ignore_errors=True)


class Execution:
    """One program the agent is running for one request."""

    def __init__(
        self, agent: Any, request_id: int, request: dict[str, Any], read_at: float = 0.0
    ) -> None:
        self.agent = agent
        self.request_id = request_id
        self.trace: list[list[Any]] | None = [] if request.get("trace") is True else None
        self.trace_base = read_at or time.monotonic()
        argv = request.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("argv must be a non-empty list of strings")
        if any("\0" in a for a in argv):
            raise ValueError("argv holds a NUL byte")
        self.argv = list(argv)
        self.env = build_env(request.get("env") or {})
        self.cwd = str(request.get("cwd") or SANDBOX_HOME)
        self.timeout = float(request.get("timeout", 30.0))
        self.memory_bytes = int(request.get("memory_bytes", 0))
        self.pids_max = int(request.get("pids_max", 0))
        self.output_limit = int(request.get("output_limit", 10 * 1024 * 1024))
        self.wants_stdin = bool(request.get("stdin", False))
        # Unless this VM ends with this run, prepare the next warm processes for the next one.
        self.warm_next = request.get("last_run") is not True
        if self.timeout <= 0 or self.output_limit < 0:
            raise ValueError("timeout must be positive and output_limit not negative")
        self.script = request.get("script")
        self.script_name = os.path.basename(str(request.get("script_name") or "main"))
        self.mode = str(request.get("mode") or "exec")
        self.context: str | None = None
        self.fresh_context = bool(request.get("fresh_context", False))
        if request.get("context") is not None:
            if self.mode != "python" or not isinstance(self.script, str):
                raise AgentError(
                    INVALID_INPUT,
                    "code contexts are for python only: run this language without a context",
                )
            self.context = context.check_context_id(request["context"])
        self.ctx: context.Context | None = None
        self.context_reset = False
        self.keep_processes = False  # the context's kernel outlives the run
        self.warm = False
        self.server: Any = None  # the fork server whose child runs the program, if any
        self.oom_before = 0
        self.workdir = os.path.join(RUN_DIR, str(request_id))
        self.cgroup = os.path.join(CGROUP_ROOT, f"run-{request_id}")
        self.pid = 0
        self.status: int | None = None
        self.stdin_fd = -1
        self.stdin_buffer = bytearray()
        self.stdin_closing = False
        self.out_fds: dict[int, protocol.FrameType] = {}
        self.forwarded = 0
        self.truncated = False
        self.timed_out = False
        self.killed = False
        self.started = 0.0
        self.deadline = 0.0
        self.drain_deadline = 0.0
        self.status_fd = -1
        self.mark("parsed")

    def mark(self, step: str, at: float = 0.0) -> None:
        """Record that ``step`` happened now (or at monotonic ``at``), when tracing."""
        if self.trace is not None and len(self.trace) < MAX_TRACE_STEPS:
            offset = ((at or time.monotonic()) - self.trace_base) * 1000.0
            self.trace.append([step, round(offset, 3)])

    # -- start -------------------------------------------------------------------------------
    def start(self) -> None:
        """Write the script, take a process for the program, set its limits and start it."""
        with contextlib.suppress(FileExistsError):  # a new host connection reuses ids
            os.mkdir(self.workdir, 0o755)
        argv = list(self.argv)
        script_path = ""
        if isinstance(self.script, str):
            script_path = os.path.join(self.workdir, self.script_name)
            write_script(script_path, self.script)
            argv.append(script_path)
        self.mark("script_written")
        forks = self.agent.forks
        warm = None
        if self.context is not None:
            self.ctx = self.agent.enter_context(self)
            self.cgroup = self.ctx.cgroup
            self.oom_before = oom_kills(self.cgroup)  # a live kernel's cgroup has a past
        elif self.mode == "python" and isinstance(self.script, str):
            warm = forks.take_python(self.script, WARM_WAIT)
        else:
            warm = forks.take_exec(WARM_WAIT)
        if warm is not None:
            self.cgroup = warm.cgroup  # the warm child is already in it
            self.server = warm.server
            self.warm = self.mode == "python"  # a Python interpreter was waiting
            self.mark("prep_received", warm.received_at)
        elif self.ctx is None:
            confine.new_cgroup(self.cgroup)
        self.mark("child_taken")
        self._set_limits()
        self.mark("limits_set")
        self._launch(argv, script_path, warm)
        self.started = time.monotonic()
        self.deadline = self.started + self.timeout
        self.agent.pids[self.pid] = self
        self.mark("handed_over", self.started)

    def _launch(self, argv: list[str], script_path: str, warm: Any) -> None:
        """Give the program its streams and start it in the process chosen for it."""
        in_r, in_w = os.pipe() if self.wants_stdin else (os.open("/dev/null", os.O_RDONLY), -1)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        child_fds = [in_r, out_w, err_w]
        # Listen before the hand-over: the program may run (and end) before the agent is back.
        for fd, kind in ((out_r, protocol.FrameType.STDOUT), (err_r, protocol.FrameType.STDERR)):
            os.set_blocking(fd, False)
            self.out_fds[fd] = kind
            self.agent.selector.register(fd, selectors.EVENT_READ, ("out", self))
        try:
            if self.ctx is not None:
                self.begin_in_context(script_path, child_fds)
            elif warm is not None and self._hand_over(warm, argv, script_path, child_fds):
                self.pid = warm.pid
            else:
                if warm is not None:  # it died before its run: start this one afresh
                    self.close_status()
                    self.agent.remove_cgroup_later(self.cgroup)
                    self.cgroup = os.path.join(CGROUP_ROOT, f"run-{self.request_id}")
                    self.server = None
                    self.warm = False
                    confine.new_cgroup(self.cgroup)
                    self._set_limits()
                self.pid = self._fork_exec(argv, child_fds[:3])
        except BaseException:
            for fd in list(self.out_fds):
                self.agent.selector.unregister(fd)
                os.close(fd)
            self.out_fds.clear()
            raise
        finally:
            for fd in child_fds:
                os.close(fd)
        if in_w >= 0:
            os.set_blocking(in_w, False)
            self.stdin_fd = in_w

    def _hand_over(
        self, warm: Any, argv: list[str], script_path: str, child_fds: list[int]
    ) -> bool:
        """Give a warm child the run: a script to run itself, or a program to exec."""
        request: dict[str, Any] = {"env": self.env, "cwd": self.cwd}
        if self.mode == "python" and script_path:
            status_r, status_w = os.pipe()
            child_fds.append(status_w)
            self.status_fd = status_r
            os.set_blocking(status_r, False)
            self.agent.selector.register(status_r, selectors.EVENT_READ, ("status", self))
            request["path"] = script_path
            if self.trace is not None:
                request["trace"] = True
        else:
            request["argv"] = argv
        return bool(warm.hand_over(request, child_fds))

    def begin_in_context(self, script_path: str, child_fds: list[int]) -> None:
        """Hand the run to its context's kernel (which may have died a moment ago)."""
        assert self.ctx is not None
        request = {"path": script_path, "env": self.env, "cwd": self.cwd}
        try:
            self.ctx.begin(request, child_fds)
        except OSError as exc:
            self.agent.contexts.end(self.ctx, lost=True)
            raise AgentError(
                "internal",
                f"the interpreter of context {self.context!r} has just ended ({exc}): "
                "run again, it starts afresh",
            ) from exc
        self.ctx.execution = self
        self.pid = self.ctx.pid

    def _set_limits(self) -> None:
        """Write the run's memory and pids limits into its cgroup (``confine.new_cgroup``'s)."""
        if self.memory_bytes > 0:
            write_file(os.path.join(self.cgroup, "memory.max"), str(self.memory_bytes))
        if self.pids_max > 0:
            write_file(os.path.join(self.cgroup, "pids.max"), str(self.pids_max))

    def _fork_exec(self, argv: list[str], child_fds: list[int]) -> int:
        """Fork a confined child that execs ``argv``; a failure to exec goes to its stderr."""
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        procs = os.path.join(self.cgroup, "cgroup.procs")
        pid = os.fork()
        if pid == 0:  # child: never returns
            try:
                confine.confine_process(procs, keep_fds=(*child_fds, report_w))
                confine.attach_stdio(child_fds[0], child_fds[1], child_fds[2])
                os.chdir(self.cwd)
                os.execvpe(argv[0], argv, self.env)
            except BaseException as exc:
                try:
                    os.write(report_w, f"{type(exc).__name__}: {exc}".encode(errors="replace"))
                finally:
                    os._exit(127)
        os.close(report_w)
        failure = b""
        while chunk := os.read(report_r, 4096):
            failure += chunk
        os.close(report_r)
        if failure:
            os.write(child_fds[2], START_FAILED + failure + b"\n")
        return pid

    # -- running -----------------------------------------------------------------------------
    def set_status(self, status: int, step: str) -> None:
        """Record how the main process ended (the first report wins)."""
        if self.status is None:
            self.status = status
            self.mark(step)

    def on_output(self, fd: int) -> bool:
        """Read what the program wrote on ``fd`` and forward it within the output cap.

        False once there is nothing more to read on ``fd`` for now (or ever).
        """
        try:
            data = os.read(fd, protocol.OUTPUT_CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._close_output(fd)
            return False
        room = self.output_limit - self.forwarded
        if room <= 0:
            self.truncated = True
            return True
        if len(data) > room:
            data = data[:room]
            self.truncated = True
        if self.forwarded == 0:
            self.mark("first_output")
        self.forwarded += len(data)
        self.agent.send(self.out_fds[fd], self.request_id, data)
        return True

    def on_status(self) -> None:
        """The fork-server child reported its exit code just before exiting: take it.

        The child flushed its output before, so the pipes hold all of it: read it now, and
        unless other processes of the run are left (which may hold the pipes and write on),
        stop reading there, without waiting for the end-of-file that comes only after this
        large process is torn down.
        """
        try:
            data = os.read(self.status_fd, 256)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.close_status()
        code = data.split(b" ", 1)[0]
        if code.isdigit() and int(code) <= 255 and self.status is None:
            if self.trace is not None:
                for step, at in child_steps(data):
                    self.mark(step, at)
            self.set_status(int(code) << 8, "status_read")  # as a wait status: exited with code
            for fd in sorted(self.out_fds, key=lambda fd: self.out_fds[fd] != STDERR):
                # Bounded: a process the run left behind may write on as fast as it reads.
                for _ in range(DRAIN_READS):
                    if fd not in self.out_fds or not self.on_output(fd):
                        break
            if self.out_fds and self._only_main_left():
                for fd in list(self.out_fds):
                    self.agent.selector.unregister(fd)
                    os.close(fd)
                self.out_fds.clear()
                self.mark("output_read")

    def _only_main_left(self) -> bool:
        """True when no process of the run's cgroup is left but (maybe) its main one."""
        try:
            with open(os.path.join(self.cgroup, "cgroup.procs"), "rb") as procs:
                left = procs.read().split()
        except OSError:
            return False
        return all(int(pid) == self.pid for pid in left)

    def close_status(self) -> None:
        """Stop listening for the fork-server child's exit code."""
        if self.status_fd >= 0:
            self.agent.selector.unregister(self.status_fd)
            os.close(self.status_fd)
            self.status_fd = -1

    def _close_output(self, fd: int) -> None:
        self.agent.selector.unregister(fd)
        os.close(fd)
        del self.out_fds[fd]
        if not self.out_fds:
            self.mark("output_closed")
            self._await_status()

    def _await_status(self) -> None:
        """The output ended: the main process reports its end a moment later; take it now.

        A fork-server child writes its status, and an exec'd program's exit raises SIGCHLD,
        right after its streams close; a context's kernel answers on its socket. Waiting here
        for a few ms sends EXIT in this turn of the loop instead of after another wake-up.
        """
        if self.status is not None:
            return
        if self.ctx is not None:
            if self.ctx.alive and select.select([self.ctx.sock], [], [], STATUS_WAIT)[0]:
                self.agent.contexts.on_event(self.ctx)
        elif self.status_fd >= 0:
            if select.select([self.status_fd], [], [], STATUS_WAIT)[0]:
                self.on_status()
        elif self.server is not None:  # an exec'd program: its fork server reaps it
            if self.server.alive and select.select([self.server.sock], [], [], STATUS_WAIT)[0]:
                self.agent.on_zygote(self.server)
        elif select.select([self.agent.wake_r], [], [], STATUS_WAIT)[0]:
            self.agent.reap()

    def feed_stdin(self, data: bytes) -> None:
        """Queue bytes for the program's stdin; empty ``data`` closes it after the queue."""
        if self.stdin_fd < 0:
            return
        if data and len(self.stdin_buffer) + len(data) > MAX_PENDING_STDIN:
            log(f"run {self.request_id}: over {MAX_PENDING_STDIN} bytes of stdin unread; closed")
            self.stdin_buffer.clear()
            self.stdin_closing = True
        elif data:
            self.stdin_buffer += data
        else:
            self.stdin_closing = True
        self.flush_stdin()

    def flush_stdin(self) -> None:
        """Write as much queued stdin as the pipe takes now."""
        if self.stdin_fd < 0:
            return
        try:
            while self.stdin_buffer:
                written = os.write(self.stdin_fd, self.stdin_buffer[: 64 * 1024])
                del self.stdin_buffer[:written]
        except BlockingIOError:
            pass
        except OSError:  # the program closed its stdin: drop the rest
            self.stdin_buffer.clear()
            self.stdin_closing = True
        if not self.stdin_buffer and self.stdin_closing:
            os.close(self.stdin_fd)
            self.stdin_fd = -1

    def kill(self, timed_out: bool = False) -> None:
        """Kill every process of this run (the whole cgroup)."""
        self.timed_out = self.timed_out or timed_out
        self.killed = True
        try:
            write_file(os.path.join(self.cgroup, "cgroup.kill"), "1")
        except OSError as exc:
            log(f"cgroup.kill of {self.cgroup} failed: {exc}")
            if self.status is None and self.pid:
                os.kill(-self.pid, signal.SIGKILL)

    def tick(self, now: float) -> bool:
        """Advance deadlines; return True when the run is over and EXIT has been sent."""
        if self.status is None:
            if now >= self.deadline and not self.timed_out:
                self.kill(timed_out=True)
            if self.stdin_fd >= 0 and self.stdin_buffer:
                self.flush_stdin()
            return False
        if self.drain_deadline == 0.0:
            self.drain_deadline = now + DRAIN_SECONDS
            if self.out_fds and not self.keep_processes:
                # Something the main process left behind may hold the output open: whatever
                # it left dies with it (a context's kernel, which reported the end of its
                # run, lives on). With the output closed already, this waits until after EXIT.
                self.kill()
        if self.out_fds and now < self.drain_deadline:
            return False
        self.finish()
        return True

    def next_wakeup(self) -> float:
        """The monotonic time at which tick() must next run."""
        if self.status is None:
            # Killed at its deadline: the end comes as an event (a poll only in case).
            return self.deadline if not self.timed_out else time.monotonic() + KILLED_POLL
        return self.drain_deadline or time.monotonic()

    def finish(self) -> None:
        """Send EXIT, then kill what is left and release the pipes, cgroup and script dir."""
        for fd in list(self.out_fds):
            self._close_output(fd)
        self.close_status()
        oom = oom_kills(self.cgroup) > self.oom_before
        lost_now = False
        if self.ctx is not None:
            lost_now = not self.keep_processes  # the kernel died with this run
            self.context_reset = self.context_reset or lost_now
        self.send_exit(oom)
        if not self.keep_processes and not self.killed:
            self.kill()
        if self.stdin_fd >= 0:
            os.close(self.stdin_fd)
            self.stdin_fd = -1
        if self.ctx is not None:
            self.ctx.execution = None
            if lost_now or not self.ctx.alive:
                self.agent.contexts.end(self.ctx, lost=lost_now)
        self.agent.pids.pop(self.pid, None)
        if self.ctx is None:
            self.agent.remove_cgroup_later(self.cgroup)
        remove_tree(self.workdir)

    def send_exit(self, oom: bool) -> None:
        """Send the EXIT frame: how the main process ended, and the trace if asked for."""
        status = self.status or 0
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            exit_code, signal_number = 128 + sig, sig
        else:
            exit_code, signal_number = os.WEXITSTATUS(status), 0
        message: dict[str, Any] = {
            "exit_code": exit_code,
            "signal": signal_number,
            "timed_out": self.timed_out,
            "oom": oom,
            "output_truncated": self.truncated,
            "duration_ms": round((time.monotonic() - self.started) * 1000.0, 3),
            "warm": self.warm,
            "context_reset": self.context_reset,
        }
        if self.trace is not None:
            self.mark("exit_sent")
            message["trace"] = self.trace
        self.agent.send_json(protocol.FrameType.EXIT, self.request_id, message)
