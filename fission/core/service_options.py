"""What every front end that runs its own Service (daemon, MCP server, embedded runs) shares:
pool flags and the default memory budget. (The state dir's lock is ``state_dirs``.)"""

from __future__ import annotations

import os

from fission.core.languages import resolve_language
from fission.errors import InvalidInput


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
