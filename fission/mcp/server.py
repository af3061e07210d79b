"""The MCP server: the SDK's ``MCPServer`` (FastMCP's successor in mcp 2.x) with fission's tools.

Two transports: stdio (the client starts ``fission mcp`` and talks over its stdin and stdout;
the server stops when stdin closes) and streamable HTTP (``/mcp`` on loopback by default).
Either way the service starts in the server's lifespan and every VM is destroyed when it ends,
including on SIGTERM and SIGINT.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import anyio
from mcp.server.mcpserver import MCPServer
from mcp_types import ToolAnnotations

from fission import __version__
from fission.core.service import Service
from fission.mcp.errors import translating_errors
from fission.mcp.files import HostFiles
from fission.mcp.runtime import CLOSE_DEADLINE, McpOptions, ServiceFactory, running_service
from fission.mcp.tools import FissionTools

log = logging.getLogger("fission.mcp")
Transport = Literal["stdio", "http"]
HTTP_PATH = "/mcp"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
GRACEFUL_SHUTDOWN = 3  # seconds open HTTP streams get before they are cut at shutdown

INSTRUCTIONS = """\
fission runs code in isolated microVMs (each with its own Linux kernel and no network access).
For a one-off computation use run_code or run_command: a fresh VM per call, nothing persists.
For multi-step work create a sandbox (sandbox_create): it keeps files under /home/sandbox and,
with sandbox_run_code, variables between calls, until it is deleted or its ttl runs out.
Delete sandboxes when done. Output is capped at 1 MiB per call."""


def _read_only() -> ToolAnnotations:
    return ToolAnnotations(read_only_hint=True, open_world_hint=False)


def _acts(destructive: bool = False, idempotent: bool = False) -> ToolAnnotations:
    return ToolAnnotations(
        read_only_hint=False,
        destructive_hint=destructive,
        idempotent_hint=idempotent,
        open_world_hint=False,
    )


# Every tool, with the hints clients use to decide what needs the user's confirmation.
TOOLS: dict[str, ToolAnnotations] = {
    "run_code": _acts(),
    "run_command": _acts(),
    "sandbox_create": _acts(),
    "sandbox_run_code": _acts(destructive=True),
    "sandbox_exec": _acts(destructive=True),
    "sandbox_write_file": _acts(destructive=True, idempotent=True),
    "sandbox_read_file": _read_only(),
    "sandbox_list_files": _read_only(),
    "sandbox_pause": _acts(idempotent=True),
    "sandbox_resume": _acts(idempotent=True),
    "sandbox_delete": _acts(destructive=True, idempotent=True),
    "sandbox_list": _read_only(),
    "sandbox_snapshot": _acts(),
    "sandbox_fork": _acts(),
    "sandbox_rewind": _acts(destructive=True),
    "snapshot_list": _read_only(),
    "snapshot_delete": _acts(destructive=True, idempotent=True),
    "template_list": _read_only(),
    "template_delete": _acts(destructive=True, idempotent=True),
    "sandbox_expose": _acts(),
    "sandbox_ports": _read_only(),
    "sandbox_unexpose": _acts(destructive=True, idempotent=True),
}
HOST_FILE_TOOLS: dict[str, ToolAnnotations] = {
    "template_build": _acts(idempotent=True),
    "sandbox_upload": _acts(destructive=True, idempotent=True),
    "sandbox_download": _acts(destructive=True, idempotent=True),
}


def register(server: MCPServer[Any], tools: FissionTools) -> None:
    """Add every tool of ``tools`` to ``server`` (the host-file ones only when shared)."""
    table = dict(TOOLS)
    if tools.host_files is not None:
        table |= HOST_FILE_TOOLS
    for name, hints in table.items():
        method = getattr(tools, name)
        server.add_tool(
            translating_errors(method),
            name=name,
            description=inspect.cleandoc(method.__doc__ or ""),
            annotations=hints,
        )


def build_server(
    options: McpOptions,
    make_service: ServiceFactory = Service,
    on_stop: Callable[[], None] | None = None,
) -> MCPServer[Any]:
    """An MCP server whose lifespan runs a Service; ``on_stop`` is called once it is closed."""
    host_files = HostFiles(options.host_files) if options.host_files is not None else None
    tools = FissionTools(host_files)

    @contextlib.asynccontextmanager
    async def lifespan(_: MCPServer[Any]) -> AsyncIterator[dict[str, Any]]:
        try:
            async with (
                running_service(options, make_service) as service,
                contextlib.AsyncExitStack() as listeners,
            ):
                if options.ports_listener is not None:
                    tools.ports_url = await listeners.enter_async_context(
                        options.ports_listener(service.sandboxes, service.config.state_dir)
                    )
                tools.running = service
                try:
                    yield {}
                finally:
                    tools.running = None
                    tools.ports_url = None
        finally:
            if on_stop is not None:
                on_stop()

    server: MCPServer[Any] = MCPServer(
        "fission",
        title="fission: run code in microVMs",
        version=__version__,
        instructions=INSTRUCTIONS,
        lifespan=lifespan,
        log_level="WARNING",
    )
    register(server, tools)
    return server


def serve(
    options: McpOptions,
    transport: Transport,
    host: str = "127.0.0.1",
    port: int = 8000,
    make_service: ServiceFactory = Service,
) -> None:
    """Serve until the client goes away (stdio), or SIGTERM or SIGINT; then destroy every VM."""
    if transport == "stdio":
        anyio.run(serve_stdio, options, make_service)
    else:
        serve_http(build_server(options, make_service), host, port)


async def serve_stdio(options: McpOptions, make_service: ServiceFactory = Service) -> None:
    """Serve over stdin and stdout until stdin ends or a signal arrives."""
    stopped = anyio.Event()
    server = build_server(options, make_service, on_stop=stopped.set)
    serving = anyio.CancelScope()

    async def stop_on_signal() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                serving.cancel()  # the lifespan then closes the service, shielded
                with anyio.move_on_after(CLOSE_DEADLINE + 5):
                    await stopped.wait()
                # The SDK reads stdin in a worker thread that only the end of stdin releases,
                # so the server cannot return by itself: end the process the way the signal
                # would have, now that nothing is left behind.
                sys.stderr.flush()
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

    async with anyio.create_task_group() as group:
        group.start_soon(stop_on_signal)
        with serving:
            await server.run_stdio_async()
        group.cancel_scope.cancel()


def serve_http(server: MCPServer[Any], host: str, port: int) -> None:
    """Serve streamable HTTP at ``http://host:port/mcp``; uvicorn turns signals into shutdown."""
    import uvicorn

    if host not in LOOPBACK:
        log.warning(
            "listening on %s: anyone who can reach it can run code here (no authentication)", host
        )
    # The SDK turns on DNS-rebinding protection (Host and Origin checks) for loopback hosts.
    app = server.streamable_http_app(streamable_http_path=HTTP_PATH, host=host)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
    )
    uvicorn.Server(config).run()
