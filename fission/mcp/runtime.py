"""The MCP server's own Service: its options, its state dir, and starting and closing it.

Each ``fission mcp`` process keeps its VMs under ``<runtime dir>/mcp-<pid>`` (a private state
dir: ``fission.core.service.private_service``), locked for its lifetime and removed when it
stops. A server killed before it could clean up (SIGKILL) leaves that directory behind; the next
server to start sweeps such directories: it kills the VMs their journals name and removes them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fission.core import state_dirs
from fission.core.sandboxes import SandboxManager
from fission.core.service import Service, ServiceConfig, private_service
from fission.core.service_options import default_budget_mb, parse_pool_flags
from fission.errors import InvalidInput

log = logging.getLogger("fission.mcp")
STATE_PREFIX = "mcp-"
CLOSE_DEADLINE = 30.0  # seconds to destroy every VM at shutdown
ServiceFactory = Callable[[ServiceConfig], Service]
PortsListener = Callable[[SandboxManager, Path], contextlib.AbstractAsyncContextManager[str]]


@dataclass(frozen=True)
class McpOptions:
    """How the MCP server runs its service."""

    pools: dict[str, int] = field(default_factory=dict)
    memory_budget_mb: int | None = None  # None: half of the host's memory
    acquire_timeout: float = 10.0
    host_files: Path | None = None  # the one host directory sandbox_upload/download may use
    # Serves exposed ports on loopback for sandbox_expose's URLs (given by `fission mcp`, which
    # may use the server layer): (sandbox manager, state dir) -> its base URL while it runs.
    ports_listener: PortsListener | None = None


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


def running_service(
    options: McpOptions, make_service: ServiceFactory = Service
) -> contextlib.AbstractAsyncContextManager[Service]:
    """A started Service with a state dir of its own; every VM is destroyed on the way out."""
    return private_service(
        STATE_PREFIX,
        lambda state_dir: service_config(options, state_dir),
        CLOSE_DEADLINE,
        make=make_service,
    )


def sweep_stale(root: Path) -> list[Path]:
    """Clean up the state dirs of dead MCP servers under ``root``; return the ones removed."""
    return state_dirs.sweep_stale(root, STATE_PREFIX)
