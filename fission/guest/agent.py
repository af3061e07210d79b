"""The guest agent: PID 1 inside every fission microVM.

Stdlib only (it runs on the guest image's Python, 3.9 or newer). The initramfs has already
mounted /proc, /sys, the cgroup2 tree, /dev, /run and the writable root, brought ``lo`` up and
set the hostname; the agent then:

* opens its virtio-serial port (named ``org.fission.agent``) and speaks the framed protocol of
  ``protocol.py`` over it;
* runs each EXEC request as the unprivileged ``sandbox`` user (uid 1000) in a cgroup of its own
  with memory, pids and (through the VM) CPU limits, with an environment built only from the
  request, and a deadline after which the whole cgroup is killed;
* streams stdout and stderr back in chunks, stops forwarding at the output cap and says so;
* ends a run when its main process ends, killing whatever it left behind, and reaps every
  zombie, since orphans are re-parented to PID 1;
* keeps stateful Python code contexts (``context.py``) and carries out file operations for the
  host (``files.py``), interleaved with the runs.

The agent never trusts a request to be well formed: a bad request gets an ERROR frame, and the
agent keeps serving.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import selectors
import signal
import sys
import time
import traceback
from typing import Any

if __package__:
    from . import confine, context, files, protocol, tunnel
    from .protocol import INVALID_INPUT, AgentError
    from .zygote import ZygoteHandle
else:  # run as a script inside the guest, with its modules beside it
    import confine  # type: ignore[no-redef]
    import context  # type: ignore[no-redef]
    import files  # type: ignore[no-redef]
    import protocol  # type: ignore[no-redef]
    import tunnel  # type: ignore[no-redef]
    from protocol import INVALID_INPUT, AgentError  # type: ignore[no-redef]
    from zygote import ZygoteHandle  # type: ignore[no-redef]

AGENT_VERSION = "1"
PORT_NAME = "org.fission.agent"
SANDBOX_HOME = "/home/sandbox"
CGROUP_ROOT = "/sys/fs/cgroup"
RUN_DIR = "/run/fission"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RNDRESEEDCRNG = 0x5207  # ioctl: reseed the kernel's CRNG from its input pool now
DRAIN_SECONDS = 1.0  # after the main process ends, how long to collect buffered output
WARM_WAIT = 2.0  # how long a Python run waits for a fork-server child already being forked
DATA_DIR = "/data"
CHANNEL_READ = 1024 * 1024  # most bytes taken from the host per turn of the loop


def log(message: str) -> None:
    """Write one line to the kernel console (the VM's serial log on the host)."""
    try:
        with open("/dev/kmsg", "w") as kmsg:
            kmsg.write(f"fission-agent: {message}\n")
    except OSError:
        sys.stderr.write(f"fission-agent: {message}\n")


def find_port(sys_root: str = "/sys/class/virtio-ports") -> str:
    """Return the /dev path of the agent's virtio-serial port."""
    for entry in sorted(os.listdir(sys_root)):
        try:
            with open(os.path.join(sys_root, entry, "name")) as f:
                if f.read().strip() == PORT_NAME:
                    return "/dev/" + entry
        except OSError:
            continue
    raise RuntimeError(f"no virtio port named {PORT_NAME}")


def write_file(path: str, text: str) -> None:
    """Write ``text`` to a (sysfs or cgroup) file."""
    with open(path, "w") as f:
        f.write(text)


def oom_kills(cgroup: str) -> int:
    """How many OOM kills the cgroup has seen so far."""
    events = read_cgroup_events(cgroup)
    return events.get("oom_kill", 0) + events.get("oom_group_kill", 0)


def read_cgroup_events(cgroup: str, name: str = "memory.events") -> dict[str, int]:
    """Parse a cgroup ``key value`` file into a dict."""
    events: dict[str, int] = {}
    try:
        with open(os.path.join(cgroup, name)) as f:
            for line in f:
                key, _, value = line.partition(" ")
                events[key] = int(value or 0)
    except (OSError, ValueError):
        pass
    return events


def build_env(requested: dict[str, str]) -> dict[str, str]:
    """The program's whole environment: safe defaults overlaid with what the request names."""
    env = {
        "PATH": DEFAULT_PATH,
        "HOME": SANDBOX_HOME,
        "USER": "sandbox",
        "LOGNAME": "sandbox",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
    }
    for key, value in requested.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key or "=" in key:
            raise ValueError(f"bad environment entry {key!r}")
        if "\0" in key or "\0" in value:
            raise ValueError(f"environment entry {key!r} holds a NUL byte")
        env[key] = value
    return env


class Execution:
    """One program the agent is running for one request."""

    def __init__(self, agent: Agent, request_id: int, request: dict[str, Any]) -> None:
        self.agent = agent
        self.request_id = request_id
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

    # -- start -------------------------------------------------------------------------------
    def start(self) -> None:
        """Prepare the cgroup and script file, then start the program."""
        os.makedirs(self.workdir, mode=0o755, exist_ok=True)
        argv = list(self.argv)
        script_path = ""
        if isinstance(self.script, str):
            script_path = os.path.join(self.workdir, self.script_name)
            with open(script_path, "w", encoding="utf-8") as f:
                f.write(self.script)
            os.chmod(script_path, 0o644)
            argv.append(script_path)
        zygote = self.agent.zygote
        warm = None
        if self.context is not None:
            self.ctx = self.agent.enter_context(self)
            self.cgroup = self.ctx.cgroup
        elif self.mode == "python" and script_path and zygote is not None:
            warm = zygote.take_warm(WARM_WAIT)
        if warm is not None:
            self.cgroup = warm.cgroup  # the warm child is already in it
            self.warm = True
        elif self.ctx is None:
            os.mkdir(self.cgroup)
        self._set_limits()
        self.oom_before = oom_kills(self.cgroup)
        in_r, in_w = os.pipe() if self.wants_stdin else (os.open("/dev/null", os.O_RDONLY), -1)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        child_fds = [in_r, out_w, err_w]
        try:
            if self.ctx is not None:
                self.begin_in_context(script_path, child_fds)
            elif warm is not None:
                status_r, status_w = os.pipe()
                child_fds.append(status_w)
                self.status_fd = status_r
                os.set_blocking(status_r, False)
                self.agent.selector.register(status_r, selectors.EVENT_READ, ("status", self))
                request = {"path": script_path, "env": self.env, "cwd": self.cwd}
                warm.hand_over(request, child_fds)
                self.pid = warm.pid
            else:
                self.pid = self._fork_exec(argv, child_fds)
        finally:
            for fd in child_fds:
                os.close(fd)
        self.started = time.monotonic()
        self.deadline = self.started + self.timeout
        self.agent.pids[self.pid] = self
        for fd, kind in ((out_r, protocol.FrameType.STDOUT), (err_r, protocol.FrameType.STDERR)):
            os.set_blocking(fd, False)
            self.out_fds[fd] = kind
            self.agent.selector.register(fd, selectors.EVENT_READ, ("out", self))
        if in_w >= 0:
            os.set_blocking(in_w, False)
            self.stdin_fd = in_w

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
        if self.memory_bytes > 0:
            write_file(os.path.join(self.cgroup, "memory.max"), str(self.memory_bytes))
            write_file(os.path.join(self.cgroup, "memory.swap.max"), "0")
            write_file(os.path.join(self.cgroup, "memory.oom.group"), "1")
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
            os.write(child_fds[2], b"fission: cannot start program: " + failure + b"\n")
        return pid

    # -- running -----------------------------------------------------------------------------
    def on_output(self, fd: int) -> None:
        """Read what the program wrote on ``fd`` and forward it within the output cap."""
        try:
            data = os.read(fd, protocol.OUTPUT_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_output(fd)
            return
        room = self.output_limit - self.forwarded
        if room <= 0:
            self.truncated = True
            return
        if len(data) > room:
            data = data[:room]
            self.truncated = True
        self.forwarded += len(data)
        self.agent.send(self.out_fds[fd], self.request_id, data)

    def on_status(self) -> None:
        """The fork-server child reported its exit code just before exiting: take it."""
        try:
            data = os.read(self.status_fd, 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.close_status()
        if data.isdigit() and int(data) <= 255 and self.status is None:
            self.status = int(data) << 8  # as a wait status: exited with that code

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

    def feed_stdin(self, data: bytes) -> None:
        """Queue bytes for the program's stdin; empty ``data`` closes it after the queue."""
        if self.stdin_fd < 0:
            return
        if data:
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
            # The main process is gone: whatever it left behind dies with it (but a context's
            # kernel, which reported the end of its run, lives on).
            if not self.keep_processes:
                self.kill()
            self.drain_deadline = now + DRAIN_SECONDS
        if self.out_fds and now < self.drain_deadline:
            return False
        self.finish()
        return True

    def next_wakeup(self) -> float:
        """The monotonic time at which tick() must next run."""
        if self.status is None:
            return self.deadline
        return self.drain_deadline or time.monotonic()

    def finish(self) -> None:
        """Send EXIT, then release the pipes, the cgroup and the script directory."""
        for fd in list(self.out_fds):
            self._close_output(fd)
        self.close_status()
        if self.stdin_fd >= 0:
            os.close(self.stdin_fd)
            self.stdin_fd = -1
        oom = oom_kills(self.cgroup) > self.oom_before
        if self.ctx is not None:
            self.ctx.execution = None
            lost_now = not self.keep_processes  # the kernel died with this run
            self.context_reset = self.context_reset or lost_now
            if lost_now or not self.ctx.alive:
                self.agent.contexts.end(self.ctx, lost=lost_now)
        status = self.status or 0
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            exit_code, signal_number = 128 + sig, sig
        else:
            exit_code, signal_number = os.WEXITSTATUS(status), 0
        self.agent.send_json(
            protocol.FrameType.EXIT,
            self.request_id,
            {
                "exit_code": exit_code,
                "signal": signal_number,
                "timed_out": self.timed_out,
                "oom": oom,
                "output_truncated": self.truncated,
                "duration_ms": round((time.monotonic() - self.started) * 1000.0, 3),
                "warm": self.warm,
                "context_reset": self.context_reset,
            },
        )
        self.agent.pids.pop(self.pid, None)
        if self.ctx is None:
            self.agent.remove_cgroup_later(self.cgroup)
        remove_tree(self.workdir)


def remove_tree(path: str) -> None:
    """Remove a directory tree the agent made, ignoring what is already gone."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class Agent:
    """The agent's event loop: one channel, many executions, every child reaped."""

    def __init__(self, channel_fd: int) -> None:
        self.channel_fd = channel_fd
        self.selector = selectors.DefaultSelector()
        self.decoder = protocol.FrameDecoder(protocol.MAX_HOST_PAYLOAD)
        self.executions: dict[int, Execution] = {}
        self.pids: dict[int, Execution] = {}
        self.stale_cgroups: list[str] = []
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_r = wake_r
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self.selector.register(channel_fd, selectors.EVENT_READ, ("channel", None))
        self.channel_poll = select.poll()
        self.channel_poll.register(channel_fd, select.POLLIN)
        self.selector.register(wake_r, selectors.EVENT_READ, ("wake", None))
        self.files = files.FileOps(self.send)
        self.contexts = context.Contexts(self.selector, self.remove_cgroup_later)
        self.tunnel = tunnel.GuestTunnel(self.selector, self.send)
        self.zygote: ZygoteHandle | None = None
        modules = zygote_modules(read_text("/proc/cmdline"))
        if modules is not None:
            self.zygote = ZygoteHandle(modules)
            self.selector.register(self.zygote.fileno(), selectors.EVENT_READ, ("zygote", None))

    def send(self, frame_type: protocol.FrameType, request_id: int, payload: bytes) -> None:
        """Write one whole frame to the host."""
        view = memoryview(protocol.encode(frame_type, request_id, payload))
        while view:
            view = view[os.write(self.channel_fd, view) :]

    def send_json(
        self, frame_type: protocol.FrameType, request_id: int, message: dict[str, Any]
    ) -> None:
        """Write one control frame to the host."""
        self.send(frame_type, request_id, protocol.dump_json(message))

    def run(self) -> None:
        """Serve requests until the VM is destroyed."""
        while True:
            now = time.monotonic()
            wakeups = [e.next_wakeup() for e in self.executions.values()]
            timeout = max(0.0, min(wakeups) - now) if wakeups else None
            if any(e.stdin_buffer for e in self.executions.values()):
                timeout = 0.01 if timeout is None else min(timeout, 0.01)
            if self.files.downloads:
                timeout = 0.0  # a file is being read: send its next chunk right away
            for key, mask in self.selector.select(timeout):
                kind, execution = key.data
                if kind == "tunnel":
                    self.on_tunnel(execution, mask)
                elif kind == "channel":
                    self.on_channel()
                elif kind == "wake":
                    self.reap()
                elif kind == "zygote":
                    self.on_zygote()
                elif kind == "out" and execution is not None:
                    execution.on_output(key.fd)
                elif kind == "status" and execution is not None:
                    execution.on_status()
                elif kind == "context" and execution is not None:
                    self.contexts.on_event(execution)
            self.files.pump()
            self.reap()
            self.take_zygote_exits()
            now = time.monotonic()
            for request_id, execution in list(self.executions.items()):
                if execution.tick(now):
                    del self.executions[request_id]
            self.sweep_cgroups()
            if self.zygote is not None:
                self.zygote.request_warm()

    def on_tunnel(self, stream: Any, mask: int) -> None:
        """Serve the egress tunnel; a failure ends that stream, never the agent."""
        try:
            self.tunnel.on_event(stream, mask)
        except Exception:
            log(f"egress tunnel failed: {traceback.format_exc()}")
            if stream is not None:
                self.tunnel.drop(stream)

    def on_channel(self) -> None:
        """Read from the host and act on every whole frame."""
        try:
            data = os.read(self.channel_fd, 256 * 1024)
            # virtio-console hands out one small (page-sized) buffer per read(2): take what
            # else is already there now rather than one page per turn of the loop.
            pieces = [data]
            total = len(data)
            while data and total < CHANNEL_READ and self.channel_poll.poll(0):
                data = os.read(self.channel_fd, 256 * 1024)
                pieces.append(data)
                total += len(data)
            data = b"".join(pieces)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            time.sleep(0.05)  # host side disconnected; wait for a new connection
            return
        try:
            frames = self.decoder.feed(data)
        except protocol.ProtocolError as exc:
            log(f"bad frame from host: {exc}")
            self.decoder = protocol.FrameDecoder(protocol.MAX_HOST_PAYLOAD)
            self.send_json(protocol.FrameType.ERROR, 0, {"message": f"bad frame: {exc}"})
            return
        for frame in frames:
            try:
                self.handle(frame)
            except AgentError as exc:
                self.send_json(
                    protocol.FrameType.ERROR,
                    frame.request_id,
                    {"code": exc.code, "message": exc.message},
                )
            except Exception as exc:
                log(f"request {frame.request_id} failed: {traceback.format_exc()}")
                self.send_json(
                    protocol.FrameType.ERROR,
                    frame.request_id,
                    {"code": "internal", "message": f"{type(exc).__name__}: {exc}"},
                )

    def handle(self, frame: protocol.Frame) -> None:
        """Act on one frame from the host."""
        kind, rid = frame.type, frame.request_id
        if kind == protocol.FrameType.INIT:
            self.init(protocol.decode_json(frame.payload))
            self.send_json(
                protocol.FrameType.HELLO,
                rid,
                {
                    "protocol": protocol.PROTOCOL_VERSION,
                    "agent": AGENT_VERSION,
                    "kernel": os.uname().release,
                },
            )
        elif kind == protocol.FrameType.PING:
            self.send_json(protocol.FrameType.PONG, rid, {})
        elif kind == protocol.FrameType.PREPARE:
            self.send_json(protocol.FrameType.READY, rid, {"zygote": self.prepare_snapshot()})
        elif kind == protocol.FrameType.EXEC:
            if rid in self.executions:
                raise ValueError(f"request {rid} is already running")
            execution = Execution(self, rid, protocol.decode_json(frame.payload))
            try:
                execution.start()
            except BaseException:
                remove_tree(execution.workdir)
                if execution.ctx is None:
                    self.remove_cgroup_later(execution.cgroup)
                raise
            self.executions[rid] = execution
        elif kind == protocol.FrameType.STDIN:
            running = self.executions.get(rid)
            if running is not None:
                running.feed_stdin(frame.payload)
        elif kind == protocol.FrameType.KILL:
            running = self.executions.get(rid)
            if running is not None:
                running.kill()
            else:
                self.files.cancel(rid)
        elif kind == protocol.FrameType.FILE:
            self.files.handle(rid, protocol.decode_json(frame.payload))
        elif kind == protocol.FrameType.DATA:
            self.files.data(rid, frame.payload)
        elif kind in protocol.STREAM_FRAMES:
            self.tunnel.handle(frame)
        elif kind == protocol.FrameType.LISTEN:
            port = protocol.decode_json(frame.payload).get("port")
            if type(port) is not int:
                raise AgentError(INVALID_INPUT, "LISTEN needs an integer port")
            self.tunnel.listen(port)
            self.send_json(protocol.FrameType.RESULT, rid, self.tunnel.state())
        elif kind == protocol.FrameType.DROP:
            name = context.check_context_id(protocol.decode_json(frame.payload).get("context"))
            self.send_json(protocol.FrameType.RESULT, rid, {"dropped": self.contexts.drop(name)})
        else:
            raise ValueError(f"frame type {kind.name} is not for the guest")

    def enter_context(self, execution: Execution) -> context.Context:
        """The context a run names (see ``context.Contexts.enter``)."""
        zygote = self.zygote
        return self.contexts.enter(
            execution, lambda: zygote.take_warm(WARM_WAIT) if zygote is not None else None
        )

    def on_zygote(self) -> None:
        """Take one fork-server message; forget the fork server if it has died."""
        zygote = self.zygote
        if zygote is None:
            return
        zygote.receive()
        self.take_zygote_exits()
        if not zygote.alive:
            log("the fork server died; programs are exec'd from now on")
            self.selector.unregister(zygote.fileno())
            zygote.sock.close()
            self.zygote = None

    def take_zygote_exits(self) -> None:
        """Record the exit status of runs the fork server reaped."""
        if self.zygote is None:
            return
        exits, self.zygote.exits = self.zygote.exits, []
        for pid, status in exits:
            execution = self.pids.get(pid)
            if execution is not None and execution.status is None:
                execution.status = status

    def prepare_snapshot(self) -> bool:
        """Wait for a warm fork-server child and flush the disks; True if one is waiting."""
        warm = False
        if self.zygote is not None:
            warm = self.zygote.wait_warm(timeout=300.0)
            self.take_zygote_exits()
        os.sync()
        return warm

    def init(self, message: dict[str, Any]) -> None:
        """Set the wall clock and mix the host's seed into the kernel's random pool."""
        time_ns = message.get("time_ns")
        if isinstance(time_ns, int) and time_ns > 0:
            try:
                time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)
            except OSError as exc:
                log(f"cannot set the clock: {exc}")
        seed = message.get("seed")
        if isinstance(seed, str) and seed:
            try:
                with open("/dev/urandom", "wb") as f:
                    f.write(bytes.fromhex(seed))
                    f.flush()
                    # Reseed the kernel's generator now: a restored clone must not keep
                    # producing the stream its snapshot would have produced.
                    fcntl.ioctl(f.fileno(), RNDRESEEDCRNG)
            except (OSError, ValueError) as exc:
                log(f"cannot seed the random pool: {exc}")

    def reap(self) -> None:
        """Collect every exited child; remember the status of the runs' main processes."""
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            execution = self.pids.get(pid)
            if execution is not None and execution.status is None:
                execution.status = status

    def remove_cgroup_later(self, cgroup: str) -> None:
        """Remove a run's cgroup once its last process is gone."""
        self.stale_cgroups.append(cgroup)
        self.sweep_cgroups()

    def sweep_cgroups(self) -> None:
        """Try to remove cgroups of finished runs; keep the busy ones for later."""
        remaining = []
        for cgroup in self.stale_cgroups:
            try:
                os.rmdir(cgroup)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    remaining.append(cgroup)
        self.stale_cgroups = remaining


def read_text(path: str) -> str:
    """A small file's text, or empty if it cannot be read."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def zygote_modules(cmdline: str) -> list[str] | None:
    """Modules the fork server preloads (``fission.zygote=a,b``), or None if it is off."""
    for token in cmdline.split():
        if token.startswith("fission.zygote="):
            value = token.partition("=")[2]
            return [] if value in ("", "none") else value.split(",")
    return None


def prepare_system() -> None:
    """Delegate the cgroup controllers and protect the agent from the OOM killer."""
    try:
        write_file(os.path.join(CGROUP_ROOT, "cgroup.subtree_control"), "+memory +pids")
    except OSError as exc:
        log(f"cannot enable cgroup controllers: {exc}")
    with contextlib.suppress(OSError):
        write_file("/proc/self/oom_score_adj", "-1000")
    os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
    # File operations take the sandbox user's fsuid/fsgid; no supplementary group may add to it.
    os.setgroups([])
    if not os.path.isdir(DATA_DIR):
        os.mkdir(DATA_DIR, 0o755)
        os.chown(DATA_DIR, confine.SANDBOX_UID, confine.SANDBOX_GID)
        os.chmod(DATA_DIR, 0o755)


def main() -> None:
    """Entry point inside the VM."""
    prepare_system()
    port = find_port()
    channel_fd = os.open(port, os.O_RDWR | os.O_CLOEXEC)
    log(f"ready on {port}")
    Agent(channel_fd).run()


if __name__ == "__main__":
    while True:  # PID 1 must never exit: that would panic the guest kernel
        try:
            main()
        except Exception:
            log(f"agent crashed, restarting: {traceback.format_exc()}")
            time.sleep(0.5)
