"""The keeper: ends sandbox VMs whose daemon is gone once their ttl (plus a grace) has passed.

A sandbox VM is detached: it outlives its daemon, so something outside the daemon must end it
if no daemon ever comes back. Its guest cannot do it (an idle sandbox's vCPUs are stopped, so
no guest timer fires), hence a small host process per state dir, ``python -m
fission.core.keeper STATE_DIR``: every ``interval`` seconds it reads the catalog and kills
(pid and start time checked, then whatever is left in its jail's cgroups) each running sandbox
VM past ``expires_at + grace``, marking it ``lost`` in the catalog (the next daemon removes
what is left of it). The daemon itself still expires sandboxes at their ttl; the grace only
covers a daemon that is down or wedged.

The daemon starts it (``ensure``) whenever a running sandbox VM is catalogued; one runs per
state dir (an ``flock`` on ``keeper.lock``), detached from the daemon, and it exits once no
running sandbox VM is left to watch. Before exiting it lets go of the lock and looks once more,
so a VM catalogued meanwhile (by a daemon that saw the lock still held) is never left unwatched.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from fission.core.catalog import Catalog, CatalogEntry
from fission.core.sandbox_spec import SandboxState
from fission.vmm import cgroups
from fission.vmm.processes import kill_group, same_process

log = logging.getLogger("fission.keeper")
LOCK_NAME = "keeper.lock"
LOG_NAME = "keeper.log"
DEFAULT_GRACE = 300.0
DEFAULT_INTERVAL = 5.0
_started: list[subprocess.Popen[bytes]] = []  # keepers this process started (reaped later)


def try_lock(state_dir: Path) -> int | None:
    """The keeper lock's descriptor if this process got it, else None (a keeper runs)."""
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def ensure(state_dir: Path, grace: float = DEFAULT_GRACE) -> None:
    """Start the keeper of ``state_dir`` unless one runs (cheap when one does)."""
    for child in list(_started):
        if child.poll() is not None:
            _started.remove(child)
    fd = try_lock(state_dir)
    if fd is None:
        return
    os.close(fd)  # a keeper started now takes it (a second one finds it taken and exits)
    with open(state_dir / LOG_NAME, "ab") as out:
        _started.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fission.core.keeper",
                    str(state_dir),
                    "--grace",
                    str(grace),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,  # not in the daemon's process group: it outlives it
                close_fds=True,
            )
        )


def overdue(entry: CatalogEntry, grace: float, now: float) -> bool:
    """Whether a running sandbox's VM is past its ttl plus ``grace``."""
    return entry.state == SandboxState.RUNNING.value and now > entry.expires_at + grace


def kill_vm(entry: CatalogEntry) -> None:
    """Kill a sandbox's VMM (if it is still that process) and whatever its cgroups hold."""
    kill_group(entry.vmm_pid, entry.vmm_start_time)
    jail = (entry.attachment or {}).get("jail") or {}
    for directory in jail.get("cgroup_dirs", []):
        cgroups.kill_all(Path(directory))


def sweep(catalog: Catalog, grace: float, now: float) -> int:
    """Kill every overdue sandbox VM (marking it lost); returns how many VMs are left to watch."""
    watched = 0
    for entry in catalog.entries():
        if entry.state != SandboxState.RUNNING.value:
            continue
        alive = same_process(entry.vmm_pid, entry.vmm_start_time)
        if alive and overdue(entry, grace, now):
            log.warning(
                "sandbox %s: ttl + %g s passed with no daemon: ending its VM", entry.id, grace
            )
            kill_vm(entry)
            catalog.mark_lost(
                entry.id,
                f"its VM (pid {entry.vmm_pid}) was ended by the keeper {grace:g} s after its "
                "ttl ran out, while no daemon managed it",
                only_if_state=SandboxState.RUNNING.value,
            )
        elif alive:
            watched += 1
    return watched


def run(state_dir: Path, grace: float, interval: float) -> None:
    """Watch ``state_dir``'s catalog until nothing is left to watch (one keeper at a time)."""
    fd = try_lock(state_dir)
    if fd is None:
        return
    catalog = Catalog(state_dir)
    try:
        while True:
            if not sweep(catalog, grace, time.time()):
                os.close(fd)
                # Looked at once more without the lock: a daemon that catalogued a VM while we
                # held it did not start another keeper.
                if not sweep(catalog, grace, time.time()):
                    return
                fd = try_lock(state_dir)
                if fd is None:
                    return  # another keeper took over
            time.sleep(interval)
    finally:
        catalog.close()
        with contextlib.suppress(OSError):
            os.close(fd)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    """``python -m fission.core.keeper STATE_DIR [--grace S] [--interval S]``."""
    parser = argparse.ArgumentParser(prog="fission-keeper", description=__doc__.splitlines()[0])
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE)
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s keeper %(message)s")
    run(args.state_dir, args.grace, args.interval)


if __name__ == "__main__":
    main()
