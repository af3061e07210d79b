"""The Python fork server inside the guest (stdlib only), and the agent's handle on it.

Starting ``python3`` under a software CPU costs hundreds of milliseconds, and importing numpy
and pandas seconds. So the agent starts this process once: it imports the preload modules,
freezes its heap (``gc.freeze()``, so children dirty fewer shared pages) and forks *warm
children* ahead of time. A warm child is in a fresh cgroup from the moment the agent learns of
it (the zygote puts it there: a run's kill must reach it), confines itself exactly as
an exec'd program would be (``confine.confine_process``: sandbox user, no_new_privs, no fds but
its hand-off socket), reseeds every random generator it holds (it shares the zygote's), runs a
warm-up snippet, tells the agent it is waiting, and blocks. The zygote forks at idle priority
and the child prepares at it, so preparing the next child never slows a run in progress; the
agent lifts a child to the normal policy when it hands it a run. The zygote itself otherwise
runs at the normal one: it reports the exits of runs, which must never wait for an idle CPU.

A run is one message on the child's socket (script path, env, cwd) carrying the run's three
streams and a status pipe: the child attaches them and runs the script as ``__main__``. A
message with an ``argv`` and the three streams instead has the child exec that program (its
box already set up, only the exec is left: ``warm.py`` keeps a lean fork server for that). A child
that was waiting when the VM was saved (every clone of a snapshot holds the same one) is told to
``reseed`` again at hand-over; the agent marks those at each INIT, which follows every restore.
A ``{"context": true}`` message instead makes the child a code context's kernel
(``context.serve``).

The zygote talks to the agent over a SOCK_SEQPACKET socket, JSON with SCM_RIGHTS fds:
zygote -> agent ``{"ready": true}``; ``{"warm": pid, "cgroup": path}`` + the child's socket;
``{"exited": pid, "status": wait status}``. agent -> zygote ``{"fork": true, "rehearse":
bool}`` (one more warm child; rehearsed for a Python run, or not: for a program to exec). The
agent hands runs to warm children directly, without waking the zygote. It asks for the next
child when a run takes one, unless the run is the VM's last (``last_run``: a one-shot VM
forks nothing it will not use), and before a snapshot.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import gc
import importlib
import json
import os
import select
import selectors
import signal
import socket
import sys
import time
import traceback
import types
from typing import Any

if __package__:
    from . import confine, context
    from .confine import add_user_site, exit_code_of, fresh_stdio, reseed
else:  # run as a script inside the guest
    import confine  # type: ignore[no-redef]
    import context  # type: ignore[no-redef]
    from confine import add_user_site, exit_code_of, fresh_stdio, reseed  # type: ignore[no-redef]

MAX_MESSAGE = 64 * 1024
CGROUP_ROOT = "/sys/fs/cgroup"
WAITING = b"W"
START_FAILED = b"fission: cannot start program: "
# What a fork-server child reports after its exit code when tracing (monotonic seconds); the
# first three happened before the run (negative offsets) unless the run had to wait for them.
CHILD_STEPS = (
    "prep_forked",
    "prep_confined",
    "prep_warmed",
    "child_woke",
    "child_ready",
    "program_start",
    "program_done",
    "program_end",
)
WARM_UP = "values = [str(i) * 2 for i in range(64)]\nprint(','.join(values).split(',')[-1])\n"
# What a run's environment usually holds: the rehearsal sets it so its pages are the child's.
REHEARSAL_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/home/sandbox",
    "USER": "sandbox",
    "LOGNAME": "sandbox",
    "LANG": "C.UTF-8",
    "TMPDIR": "/tmp",
    "PYTHONUNBUFFERED": "",
}


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    """Send one JSON message, with file descriptors if given."""
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


# -- inside a warm child ----------------------------------------------------------------------
def run_script(request: dict[str, Any], status_fd: int, times: tuple[float, ...]) -> None:
    """Run the request's script as __main__ with its environment; never returns.

    At the end, with the output flushed, the exit code is written to ``status_fd``, so the
    agent can report the run without waiting for this large process to be torn down; the
    teardown itself then runs at idle priority, after the agent's EXIT. With ``trace``,
    the report also carries ``times`` (when this child was forked, confined, warmed up, and
    woke with its run) and when it was ready, began and ended the script.
    """
    env = request["env"]
    begun = done = 0.0
    os.environ.clear()
    os.environ.update(env)
    os.chdir(request["cwd"])
    if request.get("reseed"):
        reseed()
    fresh_stdio(env)
    ready = time.monotonic()
    path = request["path"]
    sys.argv = [path]
    sys.path[0] = os.path.dirname(path)
    add_user_site(env)
    code = 0
    try:
        with open(path, "rb") as f:
            compiled = compile(f.read(), path, "exec")
        main = types.ModuleType("__main__")
        main.__file__ = path
        main.__dict__["__builtins__"] = builtins
        sys.modules["__main__"] = main
        begun = time.monotonic()
        exec(compiled, main.__dict__)
        done = time.monotonic()
    except SystemExit as exc:
        code = exit_code_of(exc)
    except BaseException as exc:
        tb = exc.__traceback__.tb_next if exc.__traceback__ else None
        traceback.print_exception(type(exc), exc, tb)
        code = 1
    try:
        atexit._run_exitfuncs()
    except BaseException:
        code = code or 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    report = str(code)
    if request.get("trace"):
        ended = time.monotonic()
        steps = (*times, ready, begun or done or ended, done or ended, ended)
        report += "".join(f" {at:.6f}" for at in steps)
    # The output is flushed: the status tells the agent it has all of it, so it need not wait
    # for the streams to close (they close only once this large process is torn down). At
    # idle priority from here on, the agent runs first, and the teardown after its EXIT.
    confine.lower_priority()
    with contextlib.suppress(OSError):
        os.write(status_fd, report.encode())
    os._exit(code)


def rehearse() -> None:
    """Walk a run's path once on /dev/null: environment, streams, compile, print, flush.

    Every page a run writes first costs a copy-on-write fault, and every code path it takes
    first costs translation under a software CPU; doing it here, before the run is handed
    over, takes both off the run's path.
    """
    null = os.open(os.devnull, os.O_RDWR)
    confine.attach_stdio(null, null, null)
    os.environ.clear()
    os.environ.update(REHEARSAL_ENV)
    fresh_stdio(REHEARSAL_ENV)
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    exec(compile(WARM_UP, "<warm-up>", "exec"), main.__dict__)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()


def exec_program(request: dict[str, Any], fds: list[int]) -> None:
    """Attach the run's streams and exec its program; never returns.

    A program that cannot be started gets the reason on its stderr and exit code 127, as
    from a freshly forked child.
    """
    try:
        confine.attach_stdio(fds[0], fds[1], fds[2])
        try:
            os.chdir(request["cwd"])
            os.execvpe(request["argv"][0], request["argv"], request["env"])
        except BaseException as exc:
            why = f"{type(exc).__name__}: {exc}".encode(errors="replace")
            os.write(2, START_FAILED + why + b"\n")
    finally:
        os._exit(127)


def receive_run(conn: socket.socket) -> tuple[bytes, list[int]]:
    """The agent's one message (and its fds) to a warm child.

    The agent closes its end right after sending; if our WAITING notice was still unread
    there, the kernel flags this socket ECONNRESET, and a recvmsg(2) just entering its wait
    reports that instead of the queued message. The flag clears once reported: ask again.
    """
    for _ in range(3):
        try:
            message, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 4)
            return message, fds
        except ConnectionResetError:
            continue
    return b"", []


def warm_child(conn: socket.socket, cgroup: str, rehearsed: bool) -> None:
    """In a pre-forked child: confine, warm up, wait for one run and run it; never returns.

    A child meant for a program to exec skips the rehearsal of a Python run (``rehearsed``).
    """
    try:
        forked = time.monotonic()
        confine.confine_process(os.path.join(cgroup, "cgroup.procs"), keep_fds=(conn.fileno(),))
        confined = time.monotonic()
        reseed()  # forked after the agent's INIT, this is fresh; else the hand-over says so
        if rehearsed:
            rehearse()
        prepared = (forked, confined, time.monotonic())
        # The agent may have handed the run over (and closed its end) already: the message
        # is queued all the same, only this notice cannot be delivered.
        with contextlib.suppress(OSError):
            conn.send(WAITING)
        message, fds = receive_run(conn)
        woke = time.monotonic()
        request = json.loads(message) if message else {}
        if request.get("context"):
            if request.get("reseed"):
                reseed()
            context.serve(conn)  # a code context: this socket carries its runs from now on
        if request.get("argv") and len(fds) == 3:
            conn.close()
            exec_program(request, fds)
        if not message or len(fds) != 4:
            os._exit(0)
        conn.close()
        confine.attach_stdio(fds[0], fds[1], fds[2])
        run_script(request, fds[3], (*prepared, woke))
    except BaseException:
        os._exit(127)
    os._exit(127)


def child_steps(report: bytes) -> list[tuple[str, float]]:
    """The named monotonic times after the exit code in a fork-server child's report.

    The report comes from a process that ran user code: anything but finite numbers gives none.
    """
    steps = []
    for name, word in zip(CHILD_STEPS, report.split()[1:]):  # noqa: B905 - Python 3.9
        try:
            value = float(word)
        except ValueError:
            return []
        if value != value or value in (float("inf"), float("-inf")):
            return []
        steps.append((name, value))
    return steps


# -- the zygote process ----------------------------------------------------------------------
class Zygote:
    """The fork server's loop: fork warm children on request, report every exit."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.forked = 0
        self.selector = selectors.DefaultSelector()
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_r = wake_r
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self.selector.register(sock, selectors.EVENT_READ, "agent")
        self.selector.register(wake_r, selectors.EVENT_READ, "wake")

    def fork_warm(self, rehearsed: bool = True) -> None:
        """Fork one warm child in a cgroup of its own and give its socket to the agent."""
        self.forked += 1
        cgroup = os.path.join(CGROUP_ROOT, f"warm-{os.getpid()}-{self.forked}")
        confine.new_cgroup(cgroup)
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The fork's kernel work, and the child's preparation after it (it inherits the
        # policy), wait for an idle CPU; the zygote itself must not: it reports exits.
        confine.lower_priority()
        pid = os.fork()
        if pid == 0:
            parent_end.close()
            self.sock.close()
            warm_child(child_end, cgroup, rehearsed)
        confine.wake(0)
        confine.move_to_cgroup(cgroup, pid)  # before the agent can hand it a run (and kill it)
        child_end.close()
        send(self.sock, {"warm": pid, "cgroup": cgroup}, [parent_end.fileno()])
        parent_end.close()

    def serve(self) -> None:
        """Handle the agent's messages until it closes the socket.

        Exits are reported before any fork: a run's end is waited for, a fork is not.
        """
        self.fork_warm()
        while True:
            events = self.selector.select()
            self.reap()
            for key, _ in events:
                if key.data == "wake":
                    continue
                data = self.sock.recv(MAX_MESSAGE)
                if not data:
                    return
                message = json.loads(data)
                if message.get("fork"):
                    self.reap()
                    self.fork_warm(message.get("rehearse") is not False)

    def reap(self) -> None:
        """Report every exited child to the agent."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 4096):
                pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            send(self.sock, {"exited": pid, "status": status})


def main() -> None:
    """Entry point: ``zygote.py FD MODULE,MODULE,...``."""
    sock = socket.socket(fileno=int(sys.argv[1]))
    for name in filter(None, sys.argv[2].split(",") if len(sys.argv) > 2 else []):
        try:
            importlib.import_module(name)
        except Exception as exc:
            print(f"fission-zygote: cannot preload {name}: {exc}", file=sys.stderr)
    gc.collect()
    gc.freeze()
    send(sock, {"ready": True})
    Zygote(sock).serve()


# -- the agent's side ------------------------------------------------------------------------
def recv_with_fds(sock: socket.socket, flags: int) -> tuple[bytes, list[int]]:
    """One message and the descriptors it carries (``socket.recv_fds`` ignores ``flags``)."""
    data, ancdata, _, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * 4), flags)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(
                int.from_bytes(payload[i : i + 4], sys.byteorder, signed=True)
                for i in range(0, usable, 4)
            )
    return data, fds


class WarmChild:
    """A pre-forked, confined interpreter waiting for one run."""

    def __init__(
        self, pid: int, cgroup: str, sock: socket.socket, reseed: bool, server: ZygoteHandle
    ) -> None:
        self.pid = pid
        self.server = server  # the fork server that reports this child's exit
        self.cgroup = cgroup
        self.sock = sock
        self.waiting = False
        # Waiting since before the last INIT: its generators may be in other clones too.
        self.reseed = reseed
        self.received_at = time.monotonic()

    def hand_over(self, request: dict[str, Any], fds: list[int]) -> bool:
        """Give this child its run at the normal priority; False if it is gone already."""
        if self.reseed:
            request = {**request, "reseed": True}
        confine.wake(self.pid)  # before the send: once it has its run, it runs at once
        try:
            send(self.sock, request, fds)
        except OSError:
            return False
        finally:
            self.sock.close()
        return True


class ZygoteHandle:
    """The agent's end of the fork server: start it, keep warm children, collect exits."""

    def __init__(self, modules: list[str]) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        child_end.set_inheritable(True)
        argv = [
            sys.executable,
            "-E",
            "-s",
            os.path.abspath(__file__),
            str(child_end.fileno()),
            ",".join(modules),
        ]
        # One BLAS thread: the process forks, and forking a threaded BLAS pool is unsafe.
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "OPENBLAS_NUM_THREADS": "1"}
        self.pid = os.fork()
        if self.pid == 0:
            try:
                parent_end.close()
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        child_end.close()
        self.sock = parent_end
        self.ready = False
        self.alive = True
        self.fork_requested = True  # the zygote forks its first warm child by itself
        self.reseed_next = True  # a child forked before the first INIT must reseed again
        self.rehearse = True  # the next child rehearses a Python run (else it is for an exec)
        self.warm: list[WarmChild] = []
        self.exits: list[tuple[int, int]] = []

    def fileno(self) -> int:
        """The socket's fd, for the agent's selector."""
        return self.sock.fileno()

    def receive(self, block: bool = False) -> None:
        """Read one message from the zygote if one is there (or wait for it, with ``block``).

        Never blocks unless asked: a readiness reported by the agent's selector can be stale
        when ``wait_warm`` has read the message in the meantime.
        """
        try:
            data, fds = recv_with_fds(self.sock, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if not data:
            self.alive = False
            return
        message = json.loads(data)
        if message.get("ready"):
            self.ready = True
        elif "warm" in message and fds:
            self.fork_requested = False
            sock = socket.socket(fileno=fds[0])
            pid, cgroup = int(message["warm"]), str(message["cgroup"])
            child = WarmChild(pid, cgroup, sock, self.reseed_next, self)
            self.reseed_next = False
            self.warm.append(child)
        elif "exited" in message:
            pid, status = int(message["exited"]), int(message["status"])
            self.warm = [child for child in self.warm if child.pid != pid]
            self.exits.append((pid, status))

    def mark_reseed(self) -> None:
        """The VM was just restored (INIT): children waiting now, or being forked, reseed."""
        for child in self.warm:
            child.reseed = True
        self.reseed_next = self.reseed_next or self.fork_requested

    def take_warm(self, wait: float = 0.0) -> WarmChild | None:
        """A warm child for a run, or None.

        With ``wait``, a child is asked for unless one is on its way, and waited for up to
        ``wait`` seconds: forking one takes tens of milliseconds, starting a fresh ``python3``
        hundreds. A fork under way is lifted to the normal priority, so a busy run beside this
        one cannot starve it (the zygote drops to idle priority again at its next fork).
        """
        deadline = time.monotonic() + wait
        if wait > 0 and self.ready and not self.warm:
            self.request_warm()
        if self.alive and self.ready and not self.warm and self.fork_requested and wait > 0:
            confine.wake(self.pid)
        while self.alive and self.ready and not self.warm and self.fork_requested:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                break
            self.receive()
        return self.warm.pop(0) if self.ready and self.warm else None

    def request_warm(self) -> None:
        """Ask for one more warm child unless one is waiting or on its way."""
        if self.alive and not self.warm and not self.fork_requested:
            self.fork_requested = True
            try:
                send(self.sock, {"fork": True, "rehearse": self.rehearse})
            except OSError:
                self.alive = False

    def wait_warm(self, timeout: float) -> bool:
        """Block until preloads are imported and a warm child is waiting; False if not."""
        self.request_warm()
        self.sock.settimeout(timeout)
        try:
            while self.alive and not (self.ready and self.warm):
                self.receive(block=True)
            child = self.warm[0] if self.warm else None
            if child is not None and not child.waiting:
                child.sock.settimeout(timeout)
                child.waiting = child.sock.recv(1) == WAITING
                child.sock.settimeout(None)
        except OSError:
            return False
        finally:
            self.sock.settimeout(None)
        return bool(self.alive and self.warm and self.warm[0].waiting)


if __name__ == "__main__":
    main()
