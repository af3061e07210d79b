"""Processes a VMM driver or a watchdog did not start itself: same process or not, and ending one.

A pid alone may have been recycled by the time a later process looks at it, so every check
pairs it with the process's start time (clock ticks since boot, ``/proc/<pid>/stat`` field 22),
recorded when the VMM was started.
"""

from __future__ import annotations

import contextlib
import os
import signal


def process_start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of process ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):  # a zombie is gone for our purposes (init may never reap it)
        return None
    return int(fields[19])  # field 22 of stat; the first two were split off above


def same_process(pid: int | None, start_time: int | None) -> bool:
    """True while ``pid`` is still the process that started at ``start_time``."""
    return pid is not None and start_time is not None and process_start_time(pid) == start_time


def kill_group(pid: int | None, start_time: int | None) -> bool:
    """SIGKILL ``pid``'s process group (and ``pid``) if it is still that process; True if sent."""
    if pid is None or not same_process(pid, start_time):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    return True
