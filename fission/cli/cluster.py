"""`fission cluster status|drain|undrain`: look at a fleet on Ray, and take hosts out of it.

These join the Ray cluster directly (``--address``, default ``auto``: the cluster this machine
runs in), so they work with no front end up; ``GET /v1/cluster`` shows the same to an admin key.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer

from fission.cli.errors import abort
from fission.errors import FissionError

app = typer.Typer(help="A fission fleet on Ray: hosts, capacity, sandboxes.", no_args_is_help=True)
Address = Annotated[str, typer.Option(help="Ray cluster address (auto: the local one).")]


def _with_fleet(address: str, work: Any) -> Any:
    from fission.fleet.cluster_service import ClusterService, default_settings

    async def main() -> Any:
        service = ClusterService(address, default_settings(), create=False)
        await service.start()
        return await work(service)

    return asyncio.run(main())


@app.command("status")
def status_command(
    address: Address = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Hosts (node, alive, draining), memory, pools and sandboxes per host."""
    try:
        status = _with_fleet(address, lambda service: service.cluster_status())
    except FissionError as exc:
        abort(exc)
    if as_json:
        typer.echo(json.dumps(status, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    title = (
        f"{status['alive']} hosts alive; memory {status['memory_reserved_mb']} of "
        f"{status['memory_budget_mb']} MB reserved"
    )
    table = Table(title=title)
    for column in ("host", "node", "state", "memory MB", "pools (ready/size)", "sandboxes"):
        table.add_column(column)
    for host in status["hosts"]:
        state = "draining" if host["draining"] else "alive" if host["alive"] else "lost"
        memory = f"{host['memory_reserved_mb']}/{host['memory_budget_mb']}" if host["alive"] else ""
        pools = ", ".join(f"{p['language']} {p['ready']}/{p['size']}" for p in host["pools"])
        boxes = ", ".join(f"{k} {v}" for k, v in sorted(host["sandboxes"].items()))
        table.add_row(host["name"], host["node_id"][:12], state, memory, pools, boxes)
    Console().print(table)


@app.command("drain")
def drain_command(
    host: Annotated[str, typer.Argument(help="Host name, as `fission cluster status` shows.")],
    address: Address = "auto",
    undo: Annotated[bool, typer.Option("--undo", help="Take work again.")] = False,
) -> None:
    """Place no new runs or sandboxes on HOST (before an upgrade); --undo to take it back."""
    try:
        found = _with_fleet(address, lambda service: service.drain(host, not undo))
    except FissionError as exc:
        abort(exc)
    if not found:
        typer.echo(f"fission: error: no host {host!r} in the fleet", err=True)
        raise typer.Exit(2)
    typer.echo(f"{host}: {'taking work' if undo else 'draining'}")
