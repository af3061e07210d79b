"""`fission serve` and `fission pool status`: the daemon and a look at its pools."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fission.cli.errors import abort
from fission.errors import FissionError, NotReady

pool_app = typer.Typer(help="Inspect the daemon's warm pools.", no_args_is_help=True)


def serve_command(
    config: Annotated[Path | None, typer.Option(help="TOML config file.")] = None,
    pool: Annotated[
        list[str] | None, typer.Option(help="LANGUAGE=COUNT warm VMs, repeatable.")
    ] = None,
    memory_budget: Annotated[
        int | None, typer.Option(help="MB of guest RAM the daemon may reserve.")
    ] = None,
    acquire_timeout: Annotated[
        float | None, typer.Option(help="Seconds a run waits for a free VM.")
    ] = None,
    socket: Annotated[Path | None, typer.Option(help="Unix socket to listen on.")] = None,
    host: Annotated[str | None, typer.Option(help="TCP address (only when asked).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port.")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Where the daemon keeps state.")] = None,
    db: Annotated[
        Path | None, typer.Option(help="SQLite file of API keys and the audit log.")
    ] = None,
    grpc_port: Annotated[
        int | None, typer.Option(help="Also serve the gRPC API on this TCP port (API keys).")
    ] = None,
    grpc_host: Annotated[
        str | None, typer.Option(help="Address of the gRPC port (default 127.0.0.1).")
    ] = None,
    grpc_socket: Annotated[
        Path | None, typer.Option(help="Serve the gRPC API on this Unix socket instead.")
    ] = None,
    idle_exit: Annotated[
        float | None,
        typer.Option(help="Exit after SECONDS with no request and no sandbox (VMs destroyed)."),
    ] = None,
    snapshot_budget: Annotated[
        int | None,
        typer.Option(
            help="MB of disk the sandbox snapshots, checkpoints and install snapshots may take; "
            "the least recently used unused ones are evicted (default: no bound)."
        ),
    ] = None,
    on_stop: Annotated[
        str | None,
        typer.Option(
            help="What a stop (SIGTERM) does with running sandboxes: keep (default: they run "
            "on and the next daemon re-attaches), pause (saved to disk) or delete."
        ),
    ] = None,
    paused_retention: Annotated[
        float | None,
        typer.Option(help="Seconds a paused (or lost) sandbox is kept (default 7 days)."),
    ] = None,
    keeper_grace: Annotated[
        float | None,
        typer.Option(
            help="Seconds past a sandbox's ttl after which the keeper ends its VM when no "
            "daemon did (default 300)."
        ),
    ] = None,
    log_format: Annotated[
        str | None, typer.Option(help="Log lines as text or json (default text).")
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="critical, error, warning (default), info or debug.")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Also serve /metrics on 127.0.0.1:PORT, without an API key."),
    ] = None,
    cluster: Annotated[
        str | None,
        typer.Option(
            help="Be a front end of a fleet on Ray: auto (this machine's Ray cluster), "
            "ray://HOST:PORT or HOST:PORT. Needs pip install 'fission[cluster]'."
        ),
    ] = None,
    fleet_root: Annotated[
        Path | None,
        typer.Option(help="With --cluster: where each host keeps its state (default STATE/fleet)."),
    ] = None,
) -> None:
    """Run the fission daemon: warm pools of VMs behind an HTTP API (and gRPC when asked)."""
    from fission.server.daemon import build_config, serve

    try:
        daemon_config = build_config(
            config_file=config,
            pools=pool or [],
            memory_budget_mb=memory_budget,
            acquire_timeout=acquire_timeout,
            socket=socket,
            host=host,
            port=port,
            state_dir=state_dir,
            db=db,
            grpc_host=grpc_host,
            grpc_port=grpc_port,
            grpc_socket=grpc_socket,
            idle_exit=idle_exit,
            snapshot_budget_mb=snapshot_budget,
            on_stop=on_stop,
            paused_retention=paused_retention,
            keeper_grace=keeper_grace,
            log_format=log_format,
            log_level=log_level,
            metrics_port=metrics_port,
            cluster=cluster,
            fleet_root=fleet_root,
        )
        where = daemon_config.socket or f"{daemon_config.host}:{daemon_config.port}"
        if daemon_config.grpc_address is not None:
            where = f"{where} (gRPC on {daemon_config.grpc_address})"
        if daemon_config.metrics_port is not None:
            where = f"{where}, metrics on 127.0.0.1:{daemon_config.metrics_port}"
        if daemon_config.idle_exit is not None:
            where = f"{where}, exiting after {daemon_config.idle_exit:g} s idle"
        if daemon_config.cluster is not None:
            where = f"{where}, a front end of the fleet on Ray ({daemon_config.cluster})"
        typer.echo(f"fission daemon listening on {where}", err=True)
        serve(daemon_config)
    except FissionError as exc:
        abort(exc)


@pool_app.command("status")
def pool_status_command(
    socket: Annotated[Path | None, typer.Option(help="The daemon's Unix socket.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the daemon's pools: ready, starting and in-use VMs, and the memory budget."""
    from rich.console import Console
    from rich.table import Table

    from fission.sdk._backend import DaemonBackend

    with DaemonBackend.connect(socket) as client:
        try:
            if not client.alive():
                raise NotReady(
                    f"no fission daemon answers on {client.socket}: start `fission serve`"
                )
            status = client.pools()
        except FissionError as exc:
            abort(exc)
    if as_json:
        typer.echo(json.dumps(status, indent=2))
        return
    table = Table(
        title=f"memory: {status['memory_reserved_mb']} of {status['memory_budget_mb']} MB reserved"
    )
    columns = ("language", "size", "ready", "starting", "in_use", "served", "busy", "failed")
    for column in (*columns, "median_ready_ms"):
        table.add_column(column)
    for pool in status["pools"]:
        table.add_row(*(str(pool[c]) for c in columns), str(pool["median_ready_ms"]))
    Console().print(table)
