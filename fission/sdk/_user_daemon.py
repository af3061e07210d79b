"""A user daemon on demand: ``fission serve --idle-exit`` started in the background.

When ``fission run`` (or ``install``, ``repo``) finds no daemon on the default local socket, it
runs embedded as always and, after that run, starts this user's daemon on that socket for the
next command, like Gradle's and Bazel's servers: the second run in a row is served warm. The
daemon is a detached process (its own session, working directory ``/``, stdin from
``/dev/null``, output appended to ``daemon.log`` in its state dir) and exits by itself after
``IDLE_EXIT`` seconds with no request and no sandbox, destroying its VMs.

It is not started when ``FISSION_AUTOSTART=0`` (tests set it), with ``--no-daemon``, when the
command named a daemon (``FISSION_URL``), when ``fission[server]`` is not installed, or when
another daemon holds the state dir's lock (one is starting: two CLIs that race both look, and
the lock lets only one daemon run; the other exits at once, saying so in the log).
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from fission.config import daemon_state_dir

AUTOSTART_ENV = "FISSION_AUTOSTART"
IDLE_EXIT = 300.0  # seconds: a few minutes of RAM for the next command's warm start
LOG_NAME = "daemon.log"
LOCK_NAME = "daemon.pid"  # the file `fission serve` holds locked (core.state_dirs)
SERVER_MODULES = ("uvicorn", "fastapi")


def autostart_enabled() -> bool:
    """False when ``FISSION_AUTOSTART`` is 0, false, no or off."""
    value = os.environ.get(AUTOSTART_ENV, "1").strip().lower()
    return value not in ("0", "false", "no", "off")


def state_dir_locked(state_dir: Path) -> bool:
    """True when a daemon holds ``state_dir``'s lock (it is running or starting)."""
    try:
        with (state_dir / LOCK_NAME).open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except FileNotFoundError:
        return False
    return False  # closing the file released the lock we took


def daemon_argv() -> list[str]:
    """The command of a user daemon: this interpreter's ``fission serve`` with an idle exit."""
    return [sys.executable, "-m", "fission", "serve", "--idle-exit", f"{IDLE_EXIT:g}"]


class UserDaemon:
    """This user's daemon as the command found things, to start once its run is done.

    The environment is taken when the command starts: an embedded run points this process's
    ``FISSION_RUNTIME_DIR`` at its own private directory, and a daemon must not inherit that.
    """

    def __init__(self) -> None:
        self.env = dict(os.environ)
        self.state_dir = daemon_state_dir()

    def start(self) -> int | None:
        """Start the daemon in the background if it may and can be; its pid, else None."""
        if not autostart_enabled():
            return None
        if any(importlib.util.find_spec(name) is None for name in SERVER_MODULES):
            return None  # `fission serve` needs fission[server]: stay embedded, quietly
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if state_dir_locked(self.state_dir):
            return None
        with (self.state_dir / LOG_NAME).open("ab") as log:
            process = subprocess.Popen(
                daemon_argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd="/",
                env=self.env,
                start_new_session=True,  # no terminal's Ctrl-C or hang-up reaches it
            )
        return process.pid
