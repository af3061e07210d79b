"""`fission run`: run code in a fresh microVM and exit with the program's exit code."""

from __future__ import annotations

import asyncio
import json
import sys
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from fission.cli.errors import abort, interrupted
from fission.cli.output import LiveOutput, end_notes, finish
from fission.core.limits import Limits
from fission.core.spec import RunResult, RunSpec
from fission.errors import FissionError, InvalidInput
from fission.net.policy import NetworkPolicy
from fission.sdk._backend import open_backend
from fission.sdk._local import parse_download, parse_upload, save_downloads


def read_code(code: str | None, file: Path | None) -> str:
    """The program text from the argument or ``--file`` (exactly one of them)."""
    if (code is None) == (file is None):
        raise InvalidInput("give the code as an argument or with --file PATH (one of the two)")
    if file is None:
        assert code is not None
        return code
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InvalidInput(f"--file {file}: no such file") from exc
    except IsADirectoryError as exc:
        raise InvalidInput(f"--file {file} is a directory, not a file") from exc
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"--file {file} is not UTF-8 text") from exc
    except OSError as exc:
        raise InvalidInput(f"--file {file}: {exc.strerror}") from exc


def network_policy(network: bool, allow_host: list[str] | None) -> NetworkPolicy:
    """The policy of ``--network`` and ``--allow-host`` (InvalidInput for hosts without it)."""
    if allow_host and not network:
        raise InvalidInput("--allow-host needs --network")
    return NetworkPolicy.allowing(allow_host or []) if network else NetworkPolicy.none()


def run_command(
    code: Annotated[
        str | None, typer.Argument(help="The program text.", show_default=False)
    ] = None,
    lang: Annotated[
        str, typer.Option("--lang", "-l", help="python, node (javascript), go or bash.")
    ] = "python",
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Read the program from PATH.")
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds the program may run (boot excluded).")
    ] = 30.0,
    memory: Annotated[int, typer.Option(help="Memory for the program, in MB.")] = 256,
    cpus: Annotated[int, typer.Option(help="Virtual CPUs.")] = 1,
    disk: Annotated[int, typer.Option(help="Writable disk space, in MB.")] = 512,
    pids: Annotated[int, typer.Option(help="Most processes and threads at once.")] = 256,
    output_limit: Annotated[float, typer.Option(help="Cap on stdout+stderr, in MB.")] = 10.0,
    env: Annotated[
        list[str] | None,
        typer.Option(
            "--env", "-e", help="KEY=VALUE, repeatable; the host's environment never leaks in."
        ),
    ] = None,
    stdin: Annotated[
        bool, typer.Option("--stdin", "-i", help="Pass this process's stdin to the program.")
    ] = False,
    network: Annotated[
        bool, typer.Option("--network", help="Give the program a way out (see --allow-host).")
    ] = False,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            help="HOST[:PORT] the program may reach (repeatable; *.example.com wildcards).",
        ),
    ] = None,
    upload: Annotated[
        list[str] | None,
        typer.Option("--upload", help="LOCAL:REMOTE, repeatable: copy a file in before the run."),
    ] = None,
    download: Annotated[
        list[str] | None,
        typer.Option("--download", help="REMOTE:LOCAL, repeatable: copy a file out after the run."),
    ] = None,
    template: Annotated[
        str | None,
        typer.Option(
            "--template", "-t", help="Start from this built template (its language, env, limits)."
        ),
    ] = None,
    no_daemon: Annotated[
        bool,
        typer.Option("--no-daemon", help="Run in this process even if a daemon is running."),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of streaming.")
    ] = False,
) -> None:
    """Run CODE in a fresh microVM; exit with its exit code (124 on timeout)."""
    from fission.core.languages import resolve_language
    from fission.core.limits import parse_env

    try:
        spec = RunSpec(
            language=resolve_language(lang),
            code=read_code(code, file),
            limits=Limits(
                timeout=timeout,
                memory_mb=memory,
                cpus=cpus,
                disk_mb=disk,
                pids=pids,
                output_limit_mb=output_limit,
            ),
            env=parse_env(env or []),
            stdin=sys.stdin.buffer.read() if stdin else None,
            network=network_policy(network, allow_host),
        )
        if template is not None:  # resolved where the run happens (daemon or this process)
            spec = replace(spec, template=template)
        uploads = tuple(parse_upload(u) for u in upload or [])
        downloads = tuple(parse_download(d) for d in download or [])
        on_output = None if as_json else LiveOutput()
        with closing(
            open_backend(embedded=no_daemon, cancel_on_sigterm=True, start_daemon=True)
        ) as backend:
            result = backend.run(spec, on_output, uploads, [d.remote for d in downloads])
        save_downloads(downloads, result.files)
    except FissionError as exc:
        abort(exc)
    except (KeyboardInterrupt, asyncio.CancelledError):
        interrupted()
    report(result, spec.limits, as_json)


def report(result: RunResult, limits: Limits, as_json: bool) -> NoReturn:
    """Print the result's JSON (``--json``) or notes on how it ended; exit with its code."""
    notes = end_notes(
        timed_out=result.timed_out,
        oom=result.oom,
        truncated=result.truncated,
        timeout=limits.timeout,
        memory_mb=limits.memory_mb,
        output_limit_mb=limits.output_limit_mb,
    )
    finish(result.exit_code, json.dumps(result.to_json()) if as_json else None, notes)
