"""The MCP server's own Service: its options, its state dir, and starting and closing it.

Each ``fission mcp`` process keeps its VMs under ``<runtime dir>/mcp-<pid>``, locked for its
lifetime and removed when it stops. A server killed before it could clean up (SIGKILL) leaves
that directory behind; the next server to start sweeps such directories: it kills the VMs their
journals name and removes them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from fission.config import runtime_dir
from fission.core.journal import Journal
from fission.core.service import Service, ServiceConfig
from fission.core.service_options import default_budget_mb, lock_state_dir, parse_pool_flags
from fission.errors import InvalidInput, NotReady

log = logging.getLogger("fission.mcp")
STATE_PREFIX = "mcp-"
CLOSE_DEADLINE = 30.0  # seconds to destroy every VM at shutdown
ServiceFactory = Callable[[ServiceConfig], Service]


@dataclass(frozen=True)
class McpOptions:
    """How the MCP server runs its service."""

    pools: dict[str, int] = field(default_factory=dict)
    memory_budget_mb: int | None = None  # None: half of the host's memory
    acquire_timeout: float = 10.0
    host_files: Path | None = None  # the one host directory sandbox_upload/download may use


def build_options(
    pools: list[str], memory_budget_mb: int | None, host_files: Path | None
) -> McpOptions:
    """Options from the command line's flags, checked."""
    if memory_budget_mb is not None and memory_budget_mb < 256:
        raise InvalidInput(f"--memory-budget {memory_budget_mb} MB is too small: give at least 256")
    if host_files is not None and not host_files.is_dir():
        raise InvalidInput(f"--allow-host-files {host_files}: no such directory")
    return McpOptions(parse_pool_flags(pools), memory_budget_mb, host_files=host_files)


def service_config(options: McpOptions, state_dir: Path) -> ServiceConfig:
    """The Service configuration of a server whose state lives in ``state_dir``."""
    return ServiceConfig(
        state_dir=state_dir,
        pools=dict(options.pools),
        memory_budget_mb=options.memory_budget_mb or default_budget_mb(),
        acquire_timeout=options.acquire_timeout,
        audit_db=None,
    )


def pid_alive(pid: int) -> bool:
    """True when a process ``pid`` exists (it may belong to someone else)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(root: Path) -> list[Path]:
    """Clean up the state dirs of dead MCP servers under ``root``; return the ones removed."""
    removed = []
    for path in sorted(root.glob(f"{STATE_PREFIX}*")):
        pid = path.name.removeprefix(STATE_PREFIX)
        # A live pid may be a server still starting (not yet holding its lock): leave it.
        if not pid.isdigit() or pid_alive(int(pid)) or not path.is_dir():
            continue
        try:
            lock = lock_state_dir(path)
        except (NotReady, OSError):
            continue
        try:
            found = Journal(path).reconcile()
            log.warning("removed what a dead MCP server left in %s: %s", path, found)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            lock.close()
    return removed


@contextlib.asynccontextmanager
async def running_service(
    options: McpOptions, make_service: ServiceFactory = Service
) -> AsyncIterator[Service]:
    """A started Service with a state dir of its own; every VM is destroyed on the way out."""
    root = runtime_dir()
    sweep_stale(root)
    state_dir = root / f"{STATE_PREFIX}{os.getpid()}"
    lock = lock_state_dir(state_dir)
    try:
        service = make_service(service_config(options, state_dir))
        try:
            await service.start()
            yield service
        finally:
            # Shielded: a cancelled server (SIGTERM, a closed connection) must still clean up.
            with anyio.move_on_after(CLOSE_DEADLINE, shield=True) as scope:
                await service.close()
            if scope.cancelled_caught:
                log.error("VMs were still being destroyed after %.0f s", CLOSE_DEADLINE)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
        lock.close()
