"""What every front end that runs its own Service (daemon, MCP server) shares: pool flags, the
default memory budget, and the lock that keeps one Service per state dir."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from fission.core.languages import resolve_language
from fission.errors import InvalidInput, NotReady


def parse_pool_flags(flags: list[str]) -> dict[str, int]:
    """``["python=2", "node=1"]`` -> ``{"python": 2, "node": 1}``, checking each part."""
    pools: dict[str, int] = {}
    for flag in flags:
        name, sep, count = flag.partition("=")
        if not sep or not count.isdigit():
            raise InvalidInput(f"--pool {flag!r} is not LANGUAGE=COUNT (e.g. python=2)")
        if int(count) > 64:
            raise InvalidInput(f"--pool {flag}: at most 64 VMs per language")
        pools[resolve_language(name).name] = int(count)
    return pools


def default_budget_mb() -> int:
    """Half of this host's memory."""
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return int(pages * page_size / 2**20 / 2)


def lock_state_dir(state_dir: Path) -> IO[str]:
    """Hold an exclusive lock on the state dir for this daemon's lifetime."""
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
