"""`fission mcp`: serve fission's tools to LLM clients over MCP (stdio or streamable HTTP)."""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from fission.cli.errors import abort
from fission.errors import FissionError


class Transport(StrEnum):
    """How the MCP client reaches the server."""

    STDIO = "stdio"
    HTTP = "http"


def mcp_command(
    transport: Annotated[
        Transport,
        typer.Option(help="stdio: the client starts this command; http: streamable HTTP."),
    ] = Transport.STDIO,
    host: Annotated[str, typer.Option(help="Address for --transport http.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port for --transport http.")] = 8000,
    pool: Annotated[
        list[str] | None, typer.Option(help="LANGUAGE=COUNT warm VMs for run_code, repeatable.")
    ] = None,
    memory_budget: Annotated[
        int | None, typer.Option(help="MB of guest RAM it may reserve (default: half the host's).")
    ] = None,
    allow_host_files: Annotated[
        Path | None,
        typer.Option(
            help="Directory sandbox_upload and sandbox_download may use (off by default).",
            file_okay=False,
        ),
    ] = None,
) -> None:
    """Serve fission as an MCP server: tools to run code and manage sandboxes in microVMs."""
    # Imported here: the SDK is heavy, and `fission --help` should stay fast.
    import dataclasses

    from fission.mcp import build_options, serve
    from fission.server.ports_listener import ports_listener

    # Plain lines on stderr (stdout may be the MCP channel); set before the SDK sets its own.
    logging.basicConfig(level=logging.WARNING, format="fission mcp: %(levelname)s %(message)s")
    try:
        options = build_options(pool or [], memory_budget, allow_host_files)
        options = dataclasses.replace(options, ports_listener=ports_listener)
        if transport == Transport.HTTP:
            where = f"[{host}]" if ":" in host else host
            typer.echo(f"fission MCP server on http://{where}:{port}/mcp", err=True)
        serve(options, transport.value, host, port)
    except FissionError as exc:
        abort(exc)
