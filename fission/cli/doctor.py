"""`fission doctor`: which layers of defence are active around each VM on this host."""

from __future__ import annotations

from typing import Annotated

import typer


def doctor_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Report each layer around a VM (KVM, seccomp, jail, cgroups): OK or MISSING, and the fix."""
    from fission.vmm.layer_checks import as_json as layers_json
    from fission.vmm.layer_checks import check_all

    layers = check_all()
    if as_json:
        typer.echo(layers_json(layers))
        return
    for layer in layers:
        status = (
            typer.style("OK     ", fg="green") if layer.ok else typer.style("MISSING", fg="red")
        )
        typer.echo(f"{status}  {layer.name}: {layer.detail}")
        if not layer.ok and layer.fix:
            typer.echo(f"         fix: {layer.fix}")
    missing = sum(not layer.ok for layer in layers)
    typer.echo(f"{len(layers) - missing} of {len(layers)} layers active")
