"""`fission audit`: who ran what, when, with which limits, and how it ended."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer

from fission.cli.errors import abort
from fission.cli.keys import DbOption, db_path
from fission.errors import FissionError, InvalidInput

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_last(text: str) -> timedelta:
    """A span like ``90s``, ``15m``, ``1h``, ``2d`` or ``1w`` (for ``--last``)."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise InvalidInput(f"--last {text!r} is not a span: use e.g. 90s, 15m, 1h, 2d or 1w")
    try:
        return timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    except OverflowError as exc:
        raise InvalidInput(f"--last {text!r} is too long ago") from exc


def parse_since(text: str) -> datetime:
    """An ISO 8601 date or time for ``--since``; one without a timezone is taken as UTC."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise InvalidInput(
            f"--since {text!r} is not an ISO 8601 time: use e.g. 2024-05-01 or 2024-05-01T12:00:00Z"
        ) from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def since_from(since: str | None, last: str | None, now: datetime) -> datetime | None:
    """The earliest time to show, from ``--since`` or ``--last`` (at most one of them)."""
    if since is not None and last is not None:
        raise InvalidInput("give --since or --last, not both")
    if since is not None:
        return parse_since(since)
    if last is not None:
        try:
            return now - parse_last(last)
        except OverflowError as exc:
            raise InvalidInput(f"--last {last!r} is too long ago") from exc
    return None


def _limits_text(limits: dict[str, Any] | None) -> str:
    """Limits as ``name=value`` pairs for the table."""
    return " ".join(f"{name}={value}" for name, value in (limits or {}).items()) or "-"


def audit_command(
    since: Annotated[
        str | None, typer.Option(help="Only events at or after this ISO 8601 time (UTC if bare).")
    ] = None,
    last: Annotated[
        str | None, typer.Option(help="Only events in this span up to now: 90s, 15m, 1h, 2d, 1w.")
    ] = None,
    key: Annotated[
        str | None, typer.Option(help="Only this key's events (its id, or `local`).")
    ] = None,
    action: Annotated[
        str | None, typer.Option(help="Only this action (`sandbox` also matches `sandbox.*`).")
    ] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many events.")] = 100,
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the audit log, newest first: who ran what, when, with which limits and outcome."""
    from rich.console import Console
    from rich.table import Table

    from fission.auth.audit_log import AuditLog
    from fission.auth.keys import KeyStore

    path = db_path(db)
    try:
        start = since_from(since, last, datetime.now(UTC))
        events = []
        names: dict[str, str] = {}
        if path.exists():
            with AuditLog(path) as log:
                events = log.query(since=start, key=key, action=action, limit=limit)
            with KeyStore(path) as store:
                names = {k.id: k.name for k in store.list()}
    except FissionError as exc:
        abort(exc)
    if as_json:
        typer.echo(json.dumps([event.to_json() for event in events], indent=2))
        return
    if not events:
        typer.echo(f"No audit events in {path} match.", err=True)
        return
    table = Table(title=f"audit log in {path} (newest first)")
    for column in ("time (UTC)", "who", "action", "language", "limits", "outcome", "ms"):
        table.add_column(column)
    for event in events:
        who = f"{event.who} ({names[event.who]})" if event.who in names else event.who
        table.add_row(
            f"{event.at:%Y-%m-%d %H:%M:%S}",
            who,
            event.action,
            event.language or "-",
            _limits_text(event.limits),
            event.outcome,
            "-" if event.duration_ms is None else f"{event.duration_ms:.0f}",
        )
    Console().print(table)
