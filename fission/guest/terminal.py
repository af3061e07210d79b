"""Interactive terminals in the guest (stdlib only): a shell on a pseudo-terminal.

A PTY frame from the host starts the sandbox user's shell on a new terminal, confined as a run
is (``confine.confine_process``: its own session and cgroup with the request's memory and pids
limits, the sandbox user, ``no_new_privs``), with the terminal as its controlling tty so job
control and Ctrl-C work as on any terminal. The tunnel (``tunnel.py``) then reads and writes the
terminal's master side like a socket; closing it hangs the terminal up and kills whatever the
session left behind (the whole cgroup).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import struct
import termios
from collections.abc import Callable
from typing import Any

if __package__:
    from . import confine
    from .runs import CGROUP_ROOT
else:  # run as a script inside the guest, with its modules beside it
    import confine  # type: ignore[no-redef]
    from runs import CGROUP_ROOT  # type: ignore[no-redef]

SHELLS = ("/bin/bash", "/bin/sh")
MAX_SIZE = 1000  # most columns or rows a terminal may have
TTY_GID = 5  # the ``tty`` group of Debian images: owns every terminal's slave side
MS_NOSUID, MS_NOEXEC = 2, 8


class Terminal:
    """The master side of a shell's terminal, read and written like a non-blocking socket."""

    def __init__(self, master: int, pid: int, cgroup: str, remove_cgroup: Callable[[str], None]):
        self.master = master
        self.pid = pid
        self.cgroup = cgroup
        self._remove_cgroup = remove_cgroup

    def fileno(self) -> int:
        """The master fd (for the selector)."""
        return self.master

    def recv(self, size: int) -> bytes:
        """What the shell wrote; EIO (an OSError) once every process let the terminal go."""
        return os.read(self.master, size)

    def send(self, data: bytes | bytearray) -> int:
        """Type ``data`` into the terminal; BlockingIOError while its input queue is full."""
        return os.write(self.master, data)

    def resize(self, message: dict[str, Any]) -> None:
        """Set the terminal's size (TIOCSWINSZ); its foreground process group gets SIGWINCH."""
        cols, rows = check_size(message)
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def try_wait(self) -> int | None:
        """The shell's wait status if it has exited (and was not reaped elsewhere), else None."""
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return None
        return status if pid else None

    def hang_up(self) -> None:
        """Kill what the shell's session left behind, so the terminal's last holder lets go."""
        with contextlib.suppress(OSError):
            confine.write_file(os.path.join(self.cgroup, "cgroup.kill"), "1")

    def close(self) -> None:
        """Hang the terminal up and kill every process of its session's cgroup (idempotent)."""
        if self.master < 0:
            return
        with contextlib.suppress(OSError):
            os.close(self.master)
        self.master = -1
        self.hang_up()
        self._remove_cgroup(self.cgroup)


def check_size(message: dict[str, Any]) -> tuple[int, int]:
    """The request's (cols, rows), each an int from 1 to ``MAX_SIZE``; ValueError otherwise."""
    cols, rows = message.get("cols"), message.get("rows")
    for name, value in (("cols", cols), ("rows", rows)):
        if type(value) is not int or not 1 <= value <= MAX_SIZE:
            raise ValueError(f"a terminal's {name} must be an int from 1 to {MAX_SIZE}")
    return cols, rows  # type: ignore[return-value]


def ensure_devpts() -> None:
    """Mount a devpts instance on /dev/pts unless one is there (the initramfs mounts none)."""
    if os.path.ismount("/dev/pts"):
        return
    os.makedirs("/dev/pts", exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    options = f"ptmxmode=0666,mode=0620,gid={TTY_GID}".encode()
    if libc.mount(b"devpts", b"/dev/pts", b"devpts", MS_NOSUID | MS_NOEXEC, options) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"cannot mount /dev/pts: {os.strerror(error)}")


def spawn(message: dict[str, Any], name: str, remove_cgroup: Callable[[str], None]) -> Terminal:
    """Start the shell a PTY frame asks for; ValueError or OSError if it cannot be."""
    cols, rows = check_size(message)
    memory_bytes, pids_max = message.get("memory_bytes", 0), message.get("pids_max", 0)
    if type(memory_bytes) is not int or type(pids_max) is not int:
        raise ValueError("memory_bytes and pids_max must be ints")
    requested = message.get("env") or {}
    if not isinstance(requested, dict):
        raise ValueError("env must be an object of strings")
    env = confine.build_env(requested)
    env.setdefault("TERM", "xterm-256color")
    cwd = message.get("cwd") or confine.SANDBOX_HOME
    if not isinstance(cwd, str):
        raise ValueError("cwd must be a string")
    shell = next((path for path in SHELLS if os.access(path, os.X_OK)), SHELLS[-1])
    ensure_devpts()
    cgroup = os.path.join(CGROUP_ROOT, name)
    confine.new_cgroup(cgroup)
    try:
        if memory_bytes > 0:
            confine.write_file(os.path.join(cgroup, "memory.max"), str(memory_bytes))
        if pids_max > 0:
            confine.write_file(os.path.join(cgroup, "pids.max"), str(pids_max))
        master, slave = os.openpty()
    except BaseException:
        remove_cgroup(cgroup)
        raise
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        os.fchown(slave, confine.SANDBOX_UID, TTY_GID)
        pid = fork_shell(shell, slave, cgroup, cwd, env)
    except BaseException:
        os.close(master)
        remove_cgroup(cgroup)
        raise
    finally:
        os.close(slave)
    os.set_blocking(master, False)
    os.set_inheritable(master, False)
    return Terminal(master, pid, cgroup, remove_cgroup)


def fork_shell(shell: str, slave: int, cgroup: str, cwd: str, env: dict[str, str]) -> int:
    """Fork the confined shell with ``slave`` as its controlling terminal; its pid."""
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: never returns
        confine.confine_process(os.path.join(cgroup, "cgroup.procs"), keep_fds=(slave,))
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)  # a new session (setsid): its terminal
        confine.attach_stdio(slave, slave, slave)
        with contextlib.suppress(OSError):
            os.chdir(cwd)
        os.execve(shell, [f"-{os.path.basename(shell)}"], env)
    finally:
        os._exit(127)
