"""The guest agent: PID 1 inside every fission microVM.

Stdlib only (it runs on the guest image's Python, 3.9 or newer). The initramfs has already
mounted /proc, /sys, the cgroup2 tree, /dev, /run and the writable root, brought ``lo`` up and
set the hostname; the agent then:

* opens its virtio-serial port (named ``org.fission.agent``) and speaks the framed protocol of
  ``protocol.py`` over it;
* runs each EXEC request (``runs.py``) as the unprivileged ``sandbox`` user (uid 1000) in a
  cgroup of its own with memory, pids and (through the VM) CPU limits, with an environment
  built only from the request, and a deadline after which the whole cgroup is killed; a
  process prepared ahead of time takes the run when one waits (``warm.py``: a Python
  interpreter, or a confined process that only has to exec), and unless a run is the VM's last
  (``last_run``) the next ones are prepared at idle priority;
* streams stdout and stderr back in chunks, stops forwarding at the output cap and says so;
* ends a run when its main process ends, killing whatever it left behind, and reaps every
  zombie, since orphans are re-parented to PID 1;
* keeps stateful Python code contexts (``context.py``) and carries out file operations for the
  host (``files.py``), interleaved with the runs.

The agent never trusts a request to be well formed: a bad request gets an ERROR frame, and the
agent keeps serving.

The host side may go away and come back (a sandbox VM outlives its daemon, and the next one
re-attaches): on EOF the frame decoder starts over (a partial frame must not corrupt the next
connection), the runs and file transfers in flight become orphans whose frames are dropped
(their processes go on; their output is lost), tunnel streams end, and code contexts stay.
Nothing is sent while no host is connected; a frame cut short by the host leaving is dropped.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import selectors
import signal
import time
import traceback
from typing import Any

if __package__:
    from . import confine, context, files, protocol, tunnel, warm, watch
    from .confine import DEFAULT_PATH, SANDBOX_HOME, build_env
    from .protocol import INVALID_INPUT, AgentError
    from .runs import CGROUP_ROOT, DRAIN_SECONDS, RUN_DIR, WARM_WAIT, Execution, log, remove_tree
    from .zygote import ZygoteHandle
else:  # run as a script inside the guest, with its modules beside it
    import confine  # type: ignore[no-redef]
    import context  # type: ignore[no-redef]
    import files  # type: ignore[no-redef]
    import protocol  # type: ignore[no-redef]
    import tunnel  # type: ignore[no-redef]
    import warm  # type: ignore[no-redef]
    import watch  # type: ignore[no-redef]
    from confine import DEFAULT_PATH, SANDBOX_HOME, build_env  # type: ignore[no-redef]
    from protocol import INVALID_INPUT, AgentError  # type: ignore[no-redef]
    from runs import (  # type: ignore[no-redef]
        CGROUP_ROOT,
        DRAIN_SECONDS,
        RUN_DIR,
        WARM_WAIT,
        Execution,
        log,
        remove_tree,
    )
    from zygote import ZygoteHandle  # type: ignore[no-redef]

__all__ = [
    "DEFAULT_PATH",
    "DRAIN_SECONDS",
    "SANDBOX_HOME",
    "Agent",
    "Execution",
    "build_env",
    "main",
]

AGENT_VERSION = "1"
PORT_NAME = "org.fission.agent"
STDERR = protocol.FrameType.STDERR
RNDRESEEDCRNG = 0x5207  # ioctl: reseed the kernel's CRNG from its input pool now
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 2, 4, 8, 32  # mount(2) flags
DATA_DIR = "/data"
WRITE_POLL_MS = 1000  # how long a blocked write waits before looking again
CHANNEL_READ = 1024 * 1024  # most bytes taken from the host per turn of the loop


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


class Agent:
    """The agent's event loop: one channel, many executions, every child reaped."""

    def __init__(self, channel_fd: int) -> None:
        self.channel_fd = channel_fd
        os.set_blocking(channel_fd, False)  # a write must notice the host leaving (POLLHUP)
        self.connected = True  # a host has the channel's other end
        self.orphans: set[int] = set()  # requests of a host that left: their frames dropped
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
        self.channel_poll_out = select.poll()
        self.channel_poll_out.register(channel_fd, select.POLLOUT)
        self.selector.register(wake_r, selectors.EVENT_READ, ("wake", None))
        self.files = files.FileOps(self.send)
        self.watches = watch.Watches(self.files, self.send, self.watch_fd)
        self.watches.unregister = lambda w: self.selector.unregister(w.fd)
        self.contexts = context.Contexts(self.selector, self.remove_cgroup_later)
        self.tunnel = tunnel.GuestTunnel(self.selector, self.send, self.remove_cgroup_later)
        self.warm_next = False  # a run was not the VM's last: keep warm processes ready
        self.frame_read_at = 0.0  # when the frames being handled were read (for traces)
        self.forks = warm.ForkServers(self.selector, zygote_modules(read_text("/proc/cmdline")))

    def send(self, frame_type: protocol.FrameType, request_id: int, payload: bytes) -> None:
        """Write one whole frame to the host (dropped while none is connected)."""
        if not self.connected or (
            request_id in self.orphans and frame_type not in protocol.STREAM_FRAMES
        ):
            return
        view = memoryview(protocol.encode(frame_type, request_id, payload))
        while view:
            try:
                view = view[os.write(self.channel_fd, view) :]
            except BlockingIOError:
                events = self.channel_poll_out.poll(WRITE_POLL_MS)
                if any(mask & (select.POLLHUP | select.POLLERR) for _, mask in events):
                    self.host_left()  # the rest of this frame is dropped with the connection
                    return

    def host_left(self) -> None:
        """The host closed its end: start over for the next one, keeping runs and contexts."""
        if not self.connected:
            return
        self.connected = False
        self.decoder = protocol.FrameDecoder(protocol.MAX_HOST_PAYLOAD)
        self.orphans.update(self.executions)
        self.orphans.update(self.files.uploads)
        self.orphans.update(self.files.downloads)
        for rid in list(self.files.uploads) + list(self.files.downloads):
            self.files.cancel(rid)
        self.watches.cancel_all()
        for stream in list(self.tunnel.streams.values()):
            self.tunnel.drop(stream)
        log("the host left the channel; runs and contexts go on")

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
            for key, mask in sorted(self.selector.select(timeout), key=stderr_first):
                kind, execution = key.data
                # An event of this batch may be stale: handling an earlier one can close
                # its fd (a run's status drains and closes its output pipes), even reuse it.
                if self.selector.get_map().get(key.fd) is not key:
                    continue
                if kind == "tunnel":
                    self.on_tunnel(execution, mask)
                elif kind == "channel":
                    self.on_channel()
                elif kind == "wake":
                    self.reap()
                elif kind == "zygote":
                    self.on_zygote(execution)
                elif kind == "out" and execution is not None:
                    execution.on_output(key.fd)
                elif kind == "status" and execution is not None:
                    execution.on_status()
                elif kind == "context" and execution is not None:
                    self.contexts.on_event(execution)
                elif kind == "watch":
                    execution.on_readable()
            self.files.pump()
            self.watches.flush()
            self.take_zygote_exits()
            now = time.monotonic()
            for request_id, execution in list(self.executions.items()):
                if execution.tick(now):
                    del self.executions[request_id]
                    self.orphans.discard(request_id)
            self.sweep_cgroups()
            self.prepare_next()

    def prepare_next(self) -> None:
        """Unless the last run was the VM's last, keep a warm child of each kind waiting.

        Asked for once no run is in flight (right after an EXIT): the fork servers prepare at
        idle priority, but a fork's kernel work and a server busy forking (not reporting an
        exit) would still slow a run down.
        """
        if self.warm_next and not self.executions:
            self.forks.start_lean()
            self.forks.request_warm()

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
            self.frame_read_at = time.monotonic()
            # virtio-console hands out one small (page-sized) buffer per read(2): take what
            # else is already there now rather than one page per turn of the loop.
            pieces = [data]
            total = len(data)
            while data and total < CHANNEL_READ and self.channel_poll.poll(0):
                try:
                    data = os.read(self.channel_fd, 256 * 1024)
                except (BlockingIOError, InterruptedError):
                    break
                pieces.append(data)
                total += len(data)
            data = b"".join(pieces)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            self.host_left()
            time.sleep(0.05)  # wait for a new connection
            return
        if not self.connected:
            self.connected = True
            log("a host connected to the channel again")
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
            request = protocol.decode_json(frame.payload)
            execution = Execution(self, rid, request, self.frame_read_at)
            self.warm_next = execution.warm_next
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
            elif not self.watches.cancel(rid):
                self.files.cancel(rid)
        elif kind == protocol.FrameType.FILE:
            self.files.handle(rid, protocol.decode_json(frame.payload))
        elif kind == protocol.FrameType.DATA:
            self.files.data(rid, frame.payload)
        elif kind == protocol.FrameType.WATCH:
            self.watches.start(rid, protocol.decode_json(frame.payload))
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

    def watch_fd(self, started: watch.Watch) -> None:
        """Have the loop read a new watch's inotify events."""
        self.selector.register(started.fd, selectors.EVENT_READ, ("watch", started))

    def enter_context(self, execution: Execution) -> context.Context:
        """The context a run names (see ``context.Contexts.enter``)."""
        return self.contexts.enter(execution, lambda: self.forks.take_context(WARM_WAIT))

    def on_zygote(self, server: ZygoteHandle) -> None:
        """Take one fork-server message; forget the fork server if it has died."""
        if not self.forks.on_message(server):
            log("a fork server died; its kind of run is forked afresh from now on")
        self.take_zygote_exits()

    def take_zygote_exits(self) -> None:
        """Record the exit status of runs the fork servers reaped."""
        for pid, status in self.forks.take_exits():
            execution = self.pids.get(pid)
            if execution is not None:
                execution.set_status(status, "exit_collected")
            else:
                self.tunnel.child_exited(pid, status)

    def prepare_snapshot(self) -> bool:
        """Get a warm child of each kind waiting and flush the disks; True if they wait."""
        warm = self.forks.wait_warm(timeout=300.0)
        self.take_zygote_exits()
        os.sync()
        return warm

    def init(self, message: dict[str, Any]) -> None:
        """Set the clock and seed the kernel's pool; warm children from before it will reseed.

        Unless the host says the VM was only stopped (``restored`` false): its state then
        exists once, and a reseed would only slow the next run down.
        """
        if message.get("restored") is not False:
            self.forks.mark_reseed()
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
            if execution is not None:
                execution.set_status(status, "exit_collected")
            else:
                self.tunnel.child_exited(pid, status)

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


def stderr_first(event: tuple[selectors.SelectorKey, int]) -> int:
    """Sort key: a run's stderr before anything else of one batch of events.

    When both streams of a run have output waiting, which came first is lost; stderr (short,
    and what explains a failure) goes first, so bulk stdout cannot crowd it out of the cap.
    """
    kind, execution = event[0].data
    return 0 if kind == "out" and execution.out_fds.get(event[0].fd) is STDERR else 1


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


def favor_cgroup_moves() -> None:
    """Remount the cgroup tree with ``favordynmods`` (Linux 6.0+; kept if refused).

    Every run moves a process into a cgroup of its own; by default each move waits for an RCU
    grace period, tens of milliseconds under a software CPU. This makes moves cheap and forks
    and exits a little dearer.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    flags = MS_REMOUNT | MS_NOSUID | MS_NODEV | MS_NOEXEC
    if libc.mount(b"cgroup2", CGROUP_ROOT.encode(), b"cgroup2", flags, b"favordynmods") != 0:
        log(f"cannot remount the cgroup tree with favordynmods: errno {ctypes.get_errno()}")


def prepare_system() -> None:
    """Delegate the cgroup controllers and protect the agent from the OOM killer."""
    favor_cgroup_moves()
    try:
        confine.write_file(os.path.join(CGROUP_ROOT, "cgroup.subtree_control"), "+memory +pids")
    except OSError as exc:
        log(f"cannot enable cgroup controllers: {exc}")
    with contextlib.suppress(OSError):
        confine.write_file("/proc/self/oom_score_adj", "-1000")
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
    try:
        Agent(channel_fd).run()
    finally:
        os.close(channel_fd)  # else a restart finds the port busy


if __name__ == "__main__":
    while True:  # PID 1 must never exit: that would panic the guest kernel
        try:
            main()
        except Exception:
            log(f"agent crashed, restarting: {traceback.format_exc()}")
            time.sleep(0.5)
