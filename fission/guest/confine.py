"""Confining a freshly forked child before it runs user code (guest side, stdlib only).

Shared by the agent's fork-and-exec path and the Python fork server, so both give user code
exactly the same box: its own session, the run's cgroup, default signal handling, no inherited
file descriptors but the three standard streams, no core dumps, ``no_new_privs``, and the
unprivileged ``sandbox`` user with no supplementary groups.

It is split in two so the fork server can do the expensive part ahead of time, in a child
that then waits for its run already confined: ``confine_process`` (everything that needs root)
and ``attach_stdio`` (the run's own streams). ``fresh_stdio``, ``reseed`` and ``exit_code_of``
are what a pre-started Python interpreter (a fork-server child, a code context) does per run.
Every cgroup a run lands in is made by ``new_cgroup`` (``oom_kills`` reads what it saw), every
program's environment by ``build_env``; processes prepared ahead of time wait at
idle priority (``lower_priority``) until the agent ``wake``s them with a run.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import resource
import signal
import sys

SANDBOX_HOME = "/home/sandbox"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SANDBOX_UID = 1000
SANDBOX_GID = 1000
PR_SET_NO_NEW_PRIVS = 38
RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGTERM, signal.SIGINT)


def write_file(path: str, text: str) -> None:
    """Write ``text`` to a (sysfs, procfs or cgroup) file: one open, one write, one close."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def new_cgroup(path: str) -> None:
    """Make a cgroup for one run: no swap, and an OOM kill takes every process in it.

    The run's own memory and pids limits are written when it is handed a run.
    """
    os.mkdir(path)
    write_file(os.path.join(path, "memory.swap.max"), "0")
    write_file(os.path.join(path, "memory.oom.group"), "1")


def move_to_cgroup(cgroup: str, pid: int) -> None:
    """Put a child just forked into its run's cgroup, from the parent, before it is announced.

    The child moves itself too (``confine_process``), but maybe only much later (it prepares at
    idle priority): a ``cgroup.kill`` in between would miss it, and a KILL sent right after
    its run starts would be lost. A child that has died already needs no moving, and one the
    move failed for fails its own move and exits without running anything.
    """
    with contextlib.suppress(OSError):
        write_file(os.path.join(cgroup, "cgroup.procs"), str(pid))


def lower_priority(pid: int = 0) -> None:
    """Run ``pid`` (0: this process) only when the CPU is otherwise idle (SCHED_IDLE)."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))


def wake(pid: int) -> None:
    """Give ``pid`` the normal scheduling policy again (only root may raise it: the agent)."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))


def close_fds_except(keep: tuple[int, ...]) -> None:
    """Close every fd from 3 up except those in ``keep``."""
    low = 3
    for fd in sorted(set(keep)):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 65536)


def confine_process(cgroup_procs: str, keep_fds: tuple[int, ...] = ()) -> None:
    """Move the calling (forked, root) process into its box and drop to the sandbox user.

    Raises OSError if any step fails; the caller must then exit without running user code.
    """
    os.setsid()
    write_file(cgroup_procs, str(os.getpid()))
    # The agent shields itself from the OOM killer; its children must not inherit that.
    write_file("/proc/self/oom_score_adj", "0")
    for sig in RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    signal.set_wakeup_fd(-1)
    close_fds_except(keep_fds)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    os.setgroups([])
    os.setgid(SANDBOX_GID)
    os.setuid(SANDBOX_UID)


def attach_stdio(stdin: int, stdout: int, stderr: int) -> None:
    """Make the run's streams fds 0, 1 and 2 and close the originals."""
    for target, fd in enumerate((stdin, stdout, stderr)):
        os.dup2(fd, target)
    for fd in {stdin, stdout, stderr}:
        if fd > 2:
            os.close(fd)


def add_user_site(env: dict[str, str]) -> None:
    """Put the user's site-packages on ``sys.path`` when it appeared after this interpreter
    started (``pip install --user`` in a template or ``fission install``): ``site`` adds it
    only if it exists at start-up, and warm interpreters start before any install."""
    if env.get("PYTHONNOUSERSITE") or not env.get("HOME"):
        return
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    user_site = os.path.join(env["HOME"], ".local", "lib", version, "site-packages")
    if user_site not in sys.path and os.path.isdir(user_site):
        import site

        site.addsitedir(user_site)


def fresh_stdio(env: dict[str, str]) -> None:
    """Standard streams over fds 0-2 as ``python3`` would make them for this environment."""
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    stdin_raw = io.FileIO(0, "rb", closefd=False)
    stdout_raw = io.FileIO(1, "wb", closefd=False)
    stderr_raw = io.FileIO(2, "wb", closefd=False)
    stdout_bin = stdout_raw if unbuffered else io.BufferedWriter(stdout_raw)
    stderr_bin = stderr_raw if unbuffered else io.BufferedWriter(stderr_raw)
    sys.stdin = io.TextIOWrapper(io.BufferedReader(stdin_raw), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(stdout_bin, encoding="utf-8", write_through=unbuffered)
    sys.stderr = io.TextIOWrapper(
        stderr_bin,
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
        write_through=unbuffered,
    )


def reseed() -> None:
    """Give this process random streams of its own (the parent's were shared by every clone)."""
    random = sys.modules.get("random")
    if random is not None:
        random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        with contextlib.suppress(Exception):
            numpy.random.seed()


def exit_code_of(exc: SystemExit) -> int:
    """The process exit code Python gives ``raise SystemExit(code)``."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


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
