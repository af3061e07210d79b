"""`fission install` and `fission repo`: set a VM up through the allowlist, then run a command."""

from __future__ import annotations

import sys
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fission.cli.errors import abort
from fission.cli.output import LiveOutput
from fission.cli.run import report
from fission.errors import FissionError
from fission.sdk._backend import open_backend

if TYPE_CHECKING:
    from fission.core.transfers import Upload

AllowHosts = Annotated[
    list[str] | None,
    typer.Option("--allow-host", help="HOST[:PORT] also reachable (repeatable)."),
]
Lang = Annotated[str, typer.Option("--lang", "-l", help="python or node.")]
Command = Annotated[str, typer.Option("--command", "-c", help="Shell command to run.")]
Timeout = Annotated[float, typer.Option(help="Seconds the command may run.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
NoDaemon = Annotated[
    bool, typer.Option("--no-daemon", help="Run in this process even if a daemon is running.")
]


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
    no_daemon: NoDaemon = False,
) -> None:
    """Install PACKAGES in a sandbox (cached per package set), then run COMMAND."""
    from fission.core.limits import Limits

    on_output = None if as_json else LiveOutput()
    try:
        limits = Limits(timeout=timeout)
        with closing(
            open_backend(embedded=no_daemon, cancel_on_sigterm=True, start_daemon=True)
        ) as backend:
            outcome = backend.install(
                lang,
                [p.strip() for p in packages.split(",") if p.strip()],
                command,
                on_output,
                index_url=index_url,
                allow_hosts=allow_host or [],
                timeout=timeout,
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
    no_daemon: NoDaemon = False,
) -> None:
    """Clone SOURCE (or copy a local directory in), then run COMMAND in it."""
    from fission.core.limits import Limits
    from fission.core.provision import WORKDIR
    from fission.sdk._local import directory_uploads

    on_output = None if as_json else LiveOutput()
    try:
        limits = Limits(timeout=timeout)
        local = Path(source)
        url: str | None = source
        files: tuple[Upload, ...] = ()
        if "://" not in source and local.is_dir():  # a local directory: read here, copied in
            url, files = None, directory_uploads(local, WORKDIR)
        with closing(
            open_backend(embedded=no_daemon, cancel_on_sigterm=True, start_daemon=True)
        ) as backend:
            result = backend.repo(
                lang,
                url,
                command,
                on_output,
                ref=ref,
                allow_hosts=allow_host or [],
                timeout=timeout,
                files=files,
            )
    except FissionError as exc:
        abort(exc)
    report(result, limits, as_json)
