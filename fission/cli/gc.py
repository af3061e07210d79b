"""`fission gc`: show what snapshots take on disk and reclaim it.

Asks the running daemon (its ``/v1/gc``, on the local socket) when one answers; otherwise works
on the state dir directly, holding its lock so no daemon starts meanwhile. What goes: unfinished
saves, install snapshots whose base template is gone, then unused snapshots, least recently
used first, until the total fits ``--budget`` (default: the daemon's ``--snapshot-budget``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fission.cli.errors import abort
from fission.errors import FissionError

MB = 1024 * 1024


def gc_command(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would go; remove nothing.")
    ] = False,
    budget: Annotated[
        int | None,
        typer.Option(help="Evict unused snapshots (LRU) until all take at most this many MB."),
    ] = None,
    socket: Annotated[Path | None, typer.Option(help="The daemon's Unix socket.")] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="Work on this state dir directly (no daemon may be using it)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the space snapshots take and reclaim it (--dry-run to only look)."""
    try:
        report = _daemon_gc(socket, dry_run, budget) if state_dir is None else None
        if report is None:
            report = _local_gc(state_dir, dry_run, budget)
    except FissionError as exc:
        abort(exc)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    print_report(report)


def _daemon_gc(socket: Path | None, dry_run: bool, budget: int | None) -> dict[str, Any] | None:
    """The daemon's report, or None when no daemon answers."""
    from fission.sdk._backend import DaemonBackend

    with DaemonBackend.connect(socket) as client:
        if not client.alive():
            return None
        return client.gc(dry_run, budget)


def _local_gc(state_dir: Path | None, dry_run: bool, budget: int | None) -> dict[str, Any]:
    """Reclaim in a state dir no daemon uses (its lock held meanwhile)."""
    from fission.config import daemon_state_dir
    from fission.core import derived
    from fission.core.snapshot_gc import reclaim_state_dir
    from fission.core.state_dirs import lock_state_dir

    directory = state_dir or daemon_state_dir()
    lock = lock_state_dir(directory)
    try:
        return reclaim_state_dir(
            directory, derived.derived_dir(), dry_run=dry_run, budget_mb=budget
        )
    finally:
        lock.close()


def print_report(report: dict[str, Any]) -> None:
    """The report for people."""
    used = report["used_bytes"] / MB
    budget = report.get("budget_mb")
    kinds = ", ".join(f"{k} {v / MB:.1f} MB" for k, v in sorted(report["used_by_kind"].items()))
    typer.echo(
        f"snapshots take {used:.1f} MB"
        + (f" of a {budget} MB budget" if budget is not None else "")
        + (f" ({kinds})" if kinds else "")
    )
    verb = "would remove" if report["dry_run"] else "removed"
    for entry in report["removed"]:
        typer.echo(f"  {verb} {entry['kind']} {entry['id']} ({entry['size_bytes'] / MB:.1f} MB)")
    typer.echo(f"{verb} {report['reclaimed_bytes'] / MB:.1f} MB; in use: {len(report['in_use'])}")
