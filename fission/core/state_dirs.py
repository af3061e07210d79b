"""State directories: one process's lock on its own, and sweeping what dead processes left.

A daemon holds ``daemon.pid`` in its state dir locked for its lifetime, so a second daemon on the
same dir is refused. Processes with a private state dir (``fission mcp``, embedded runs) name it
``<prefix><pid>`` (``<prefix><pid>-<random>`` when one process runs several) under the runtime
dir; one killed before it could clean up (SIGKILL) leaves it behind, and the next process with
that prefix sweeps it: kills the VMs its journal names and removes it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path
from typing import IO

from fission.core.journal import Journal
from fission.errors import NotReady

log = logging.getLogger("fission.state")


def lock_state_dir(state_dir: Path) -> IO[str]:
    """Hold an exclusive lock on the state dir for this process's lifetime."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    handle = (state_dir / "daemon.pid").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.close()
        raise NotReady(
            f"another fission daemon is using {state_dir}: stop it or pass --state-dir"
        ) from exc
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def pid_alive(pid: int) -> bool:
    """True when a process ``pid`` exists (it may belong to someone else)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(root: Path, prefix: str) -> list[Path]:
    """Clean up the state dirs ``<prefix><pid>[-<random>]`` of dead processes under ``root``."""
    removed = []
    for path in sorted(root.glob(f"{prefix}*")):
        pid = path.name.removeprefix(prefix).split("-", 1)[0]
        # A live pid may be a process still starting (not yet holding its lock): leave it.
        if not pid.isdigit() or pid_alive(int(pid)) or not path.is_dir():
            continue
        try:
            lock = lock_state_dir(path)
        except (NotReady, OSError):
            continue
        try:
            found = Journal(path).reconcile()
            log.warning("removed what a dead process left in %s: %s", path, found)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            lock.close()
    return removed
