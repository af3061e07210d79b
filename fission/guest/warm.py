"""The agent's warm processes: two fork servers and the children they keep waiting (stdlib only).

Every run starts in a process prepared before its request came (``zygote.py``: forked,
confined, reseeded, rehearsed, waiting at idle priority). Two fork servers prepare them:

* the *full* one preloads the language's modules (numpy, pandas): for Python runs that import
  anything beyond the standard library, and for code contexts. Forking it costs tens of
  milliseconds under a software CPU (its page tables and copy-on-write faults);
* the *lean* one preloads nothing, so its children are cheap to prepare: for Python runs that
  import only the standard library, and for every program run by path (a command, a shell
  line, a language without a fork server), which the child simply execs.

The lean server starts when first needed: before a snapshot (so every clone holds a child of
each), or once a VM serves more than one run (a sandbox); a one-shot VM started from scratch
never pays for it. ``fission.zygote=none`` on the kernel command line means a Python VM
without preloads: the lean server then serves everything.
"""

from __future__ import annotations

import re
import selectors
import sys
from typing import Any

if __package__:
    from .zygote import WarmChild, ZygoteHandle
else:  # run as a script inside the guest
    from zygote import WarmChild, ZygoteHandle  # type: ignore[no-redef]

IMPORTS = re.compile(r"^[ \t]*(?:from[ \t]+([\w.]+)[ \t]+import|import[ \t]+([\w., \t]+))", re.M)
STDLIB = frozenset(getattr(sys, "stdlib_module_names", ()))


def stdlib_only(script: str) -> bool:
    """True when every module ``script`` imports by statement is in the standard library.

    A cheap look at import statements, not a proof: a module imported another way only costs
    the time its import takes in the lean interpreter.
    """
    if not STDLIB:  # Python 3.9: no list to check against
        return False
    for found in IMPORTS.finditer(script):
        names = [found.group(1)] if found.group(1) else found.group(2).split(",")
        for name in names:
            root = name.split()[0].split(".")[0] if name.split() else ""
            if root and root not in STDLIB:
                return False
    return True


class ForkServers:
    """The full and lean fork servers of one agent, registered with its selector."""

    def __init__(self, selector: selectors.BaseSelector, preloads: list[str] | None) -> None:
        self.selector = selector
        self.full: ZygoteHandle | None = None
        self.lean: ZygoteHandle | None = None
        self.lean_lost = False  # a lean server died: not started again (runs fork afresh)
        if preloads:
            self.full = self._start(preloads)
        elif preloads is not None:
            self.lean = self._start([])

    def _start(self, modules: list[str]) -> ZygoteHandle:
        handle = ZygoteHandle(modules)
        self.selector.register(handle.fileno(), selectors.EVENT_READ, ("zygote", handle))
        return handle

    def handles(self) -> list[ZygoteHandle]:
        """The servers running now."""
        return [handle for handle in (self.full, self.lean) if handle is not None]

    def start_lean(self) -> None:
        """Start the lean server unless it runs (or has died: then programs are forked)."""
        if self.lean is None and not self.lean_lost:
            self.lean = self._start([])

    def take_python(self, script: str, wait: float) -> WarmChild | None:
        """A warm child for a Python script: a lean one if the script allows, else a full one.

        A script that imports more than the standard library waits for a full child rather
        than importing numpy in a lean one (seconds against tens of milliseconds).
        """
        if not stdlib_only(script):
            handle = self.full or self.lean
            return handle.take_warm(wait) if handle is not None else None
        if self.lean is not None:
            self.lean.rehearse = True  # lean children are for Python runs again
        servers = [handle for handle in (self.lean, self.full) if handle is not None]
        for handle in servers:
            child = handle.take_warm(0.0)
            if child is not None:
                return child
        for handle in servers:
            child = handle.take_warm(wait)
            if child is not None:
                return child
        return None

    def take_exec(self, wait: float) -> WarmChild | None:
        """A warm lean child to exec a program in, or None (then the agent forks one).

        The lean server's next children skip the rehearsal of a Python run (until a Python run
        takes one of them): in a run of commands each child is ready sooner.
        """
        if self.lean is None:
            return None
        self.lean.rehearse = False
        return self.lean.take_warm(wait)

    def take_context(self, wait: float) -> WarmChild | None:
        """A warm child to become a code context's kernel (the full one: notebooks import)."""
        handle = self.full or self.lean
        return handle.take_warm(wait) if handle is not None else None

    def on_message(self, handle: ZygoteHandle) -> bool:
        """Take one message from ``handle``; False once that server has died (forgotten)."""
        handle.receive()
        if handle.alive:
            return True
        self.selector.unregister(handle.fileno())
        handle.sock.close()
        if handle is self.full:
            self.full = None
        if handle is self.lean:
            self.lean, self.lean_lost = None, True
        return False

    def take_exits(self) -> list[tuple[int, int]]:
        """(pid, wait status) of every child the servers reaped since the last call."""
        exits: list[tuple[int, int]] = []
        for handle in self.handles():
            exits += handle.exits
            handle.exits = []
        return exits

    def mark_reseed(self) -> None:
        """The VM was just restored: every child waiting now reseeds at its run."""
        for handle in self.handles():
            handle.mark_reseed()

    def request_warm(self) -> None:
        """Ask each server for a child unless one waits or is on its way."""
        for handle in self.handles():
            handle.request_warm()

    def wait_warm(self, timeout: float) -> bool:
        """Before a snapshot: block until each server has a child waiting; True if all do."""
        self.start_lean()
        return all([handle.wait_warm(timeout) for handle in self.handles()])

    def state(self) -> dict[str, Any]:
        """Which servers run, for the agent's READY answer."""
        return {"full": self.full is not None, "lean": self.lean is not None}
