"""`fission install` and `fission repo`: set a VM up through the allowlist, then run a command."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer

from fission.cli.errors import abort
from fission.cli.run import LiveOutput, report
from fission.errors import FissionError

AllowHosts = Annotated[
    list[str] | None,
    typer.Option("--allow-host", help="HOST[:PORT] also reachable (repeatable)."),
]
Lang = Annotated[str, typer.Option("--lang", "-l", help="python or node.")]
Command = Annotated[str, typer.Option("--command", "-c", help="Shell command to run.")]
Timeout = Annotated[float, typer.Option(help="Seconds the command may run.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def install_command(
    packages: Annotated[str, typer.Option("--packages", "-p", help="Comma-separated packages.")],
    command: Command,
    lang: Lang = "python",
    index_url: Annotated[
        str | None, typer.Option("--index-url", help="Package index instead of the public one.")
    ] = None,
    allow_host: AllowHosts = None,
    timeout: Timeout = 30.0,
    as_json: Json = False,
) -> None:
    """Install PACKAGES in a sandbox (cached per package set), then run COMMAND."""
    from fission.core.languages import resolve_language
    from fission.core.limits import Limits
    from fission.core.provision import install

    limits = Limits(timeout=timeout)
    on_output = None if as_json else LiveOutput()
    try:
        outcome = asyncio.run(
            install(
                resolve_language(lang),
                [p.strip() for p in packages.split(",") if p.strip()],
                command,
                index_url=index_url,
                allow_hosts=allow_host or [],
                limits=limits,
                on_output=on_output,
            )
        )
    except FissionError as exc:
        abort(exc)
    if not outcome.installed:
        sys.stderr.write("fission: installing failed; the command did not run\n")
    else:
        how = "restored from the cache" if outcome.cached else "installed and cached"
        sys.stderr.write(f"fission: environment {how} in {outcome.setup_ms / 1000:.1f} s\n")
    report(outcome.result, limits, as_json)


def repo_command(
    source: Annotated[str, typer.Argument(help="A git URL, or a local directory to copy in.")],
    command: Command,
    ref: Annotated[str | None, typer.Option("--ref", help="Branch, tag or commit.")] = None,
    lang: Lang = "python",
    allow_host: AllowHosts = None,
    timeout: Timeout = 60.0,
    as_json: Json = False,
) -> None:
    """Clone SOURCE (or copy a local directory in), then run COMMAND in it."""
    from fission.core.languages import resolve_language
    from fission.core.limits import Limits
    from fission.core.provision import repo

    limits = Limits(timeout=timeout)
    on_output = None if as_json else LiveOutput()
    try:
        result = asyncio.run(
            repo(
                resolve_language(lang),
                str(Path(source)) if "://" not in source else source,
                command,
                ref=ref,
                allow_hosts=allow_host or [],
                limits=limits,
                on_output=on_output,
            )
        )
    except FissionError as exc:
        abort(exc)
    report(result, limits, as_json)
