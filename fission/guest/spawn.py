"""A pre-forked, confined process that only has to exec the next program (guest side, stdlib only).

Forking the agent (a Python process) and confining the child costs tens of milliseconds under
a software CPU, most of it copy-on-write faults in the child. So while the agent is idle it
keeps one *spare*: forked, in a cgroup of its own, confined exactly like any run
(``confine.confine_process``: sandbox user, no_new_privs, no fds but its socket), blocked on
its socket. A run that execs a program (a command, a shell line, a language without a fork
server) hands it argv, env, cwd and the three streams; the spare attaches them and execs, so
the run pays for the exec alone. A spare that cannot exec writes why to the run's stderr and
exits 127, as a freshly forked child would.

Preparing processes ahead of time must not slow down a run in progress: spares (and the fork
server, ``zygote.py``) prepare at ``SCHED_IDLE``, using the CPU only when nothing else wants
it, and the agent lifts a process to the normal policy (``confine.wake``) when it hands it a
run.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

if __package__:
    from . import confine
    from .zygote import WAITING, receive_run
else:  # run as a script inside the guest
    import confine  # type: ignore[no-redef]
    from zygote import WAITING, receive_run  # type: ignore[no-redef]

CGROUP_ROOT = "/sys/fs/cgroup"
START_FAILED = b"fission: cannot start program: "


def exec_program(message: bytes, fds: list[int]) -> None:
    """In a spare: attach the run's streams and exec its program; never returns."""
    try:
        request = json.loads(message)
        confine.attach_stdio(fds[0], fds[1], fds[2])
        try:
            os.chdir(request["cwd"])
            os.execvpe(request["argv"][0], request["argv"], request["env"])
        except BaseException as exc:
            why = f"{type(exc).__name__}: {exc}".encode(errors="replace")
            os.write(2, START_FAILED + why + b"\n")
    finally:
        os._exit(127)


def spare_main(conn: socket.socket, cgroup: str) -> None:
    """In a freshly forked spare: confine, say so, wait for one program and exec it."""
    try:
        confine.lower_priority()
        confine.confine_process(os.path.join(cgroup, "cgroup.procs"), keep_fds=(conn.fileno(),))
        with contextlib.suppress(OSError):  # the agent may have handed over and closed already
            conn.send(WAITING)
        message, fds = receive_run(conn)
        if message and len(fds) == 3:
            conn.close()
            exec_program(message, fds)
    finally:
        os._exit(127)


class Spare:
    """The agent's handle on one spare: its pid, cgroup and socket."""

    def __init__(self, pid: int, cgroup: str, sock: socket.socket) -> None:
        self.pid = pid
        self.cgroup = cgroup
        self.sock = sock
        self.waiting = False
        self.forked_at = time.monotonic()

    def hand_over(self, argv: list[str], env: dict[str, str], cwd: str, fds: list[int]) -> bool:
        """Give the spare its program and streams; False if it is gone (start another way)."""
        message = json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode()
        try:
            socket.send_fds(self.sock, [message], fds)
        except OSError:
            return False
        finally:
            self.sock.close()
        confine.wake(self.pid)
        return True


class Spawner:
    """Keeps at most one spare for the agent; the agent reports every child that exits."""

    def __init__(self) -> None:
        self.spare: Spare | None = None
        self.made = 0

    def take(self) -> Spare | None:
        """The spare, if one is ready to be handed a program (it is the caller's from now on)."""
        spare, self.spare = self.spare, None
        return spare

    def refill(self) -> None:
        """Fork a new spare unless one is there; a failure leaves none (runs fork afresh)."""
        if self.spare is not None:
            return
        self.made += 1
        cgroup = os.path.join(CGROUP_ROOT, f"spare-{self.made}")
        try:
            confine.new_cgroup(cgroup)
        except OSError:
            return
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # child: never returns
            parent_end.close()
            spare_main(child_end, cgroup)
        child_end.close()
        self.spare = Spare(pid, cgroup, parent_end)

    def forget(self, pid: int) -> str | None:
        """The spare ``pid`` exited before it was used: drop it; its cgroup, to remove."""
        spare = self.spare
        if spare is None or spare.pid != pid:
            return None
        spare.sock.close()
        self.spare = None
        return spare.cgroup

    def wait_ready(self, timeout: float) -> bool:
        """Block until the spare is confined and waiting (before a snapshot); False if not."""
        spare = self.spare
        if spare is None:
            return False
        if not spare.waiting:
            spare.sock.settimeout(timeout)
            try:
                spare.waiting = spare.sock.recv(1) == WAITING
            except OSError:
                return False
            finally:
                spare.sock.settimeout(None)
        return spare.waiting
