"""`fission keys create|list|revoke|limits|role`: manage the API keys TCP clients must present."""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fission.cli.errors import abort
from fission.errors import FissionError, InvalidInput

if TYPE_CHECKING:
    from fission.auth.keys import ApiKey, KeyLimits, KeyStore

app = typer.Typer(help="Create, list, revoke and limit API keys.", no_args_is_help=True)

DbOption = Annotated[
    Path | None,
    typer.Option(
        "--db",
        help="The key and audit database (default: fission.sqlite3 in $FISSION_DATA_DIR, "
        "else in the user data dir).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
# The defaults are spelled out rather than imported: the CLI imports fission.auth lazily.
MaxSandboxesOption = Annotated[
    int | None,
    typer.Option("--max-sandboxes", help="Sandboxes the key may hold at once (default 10)."),
]
RatePerMinuteOption = Annotated[
    int | None,
    typer.Option("--rate-per-minute", help="Requests the key may make a minute (default 600)."),
]
MaxSnapshotMbOption = Annotated[
    int | None,
    typer.Option(
        "--max-snapshot-mb",
        help="Disk the key's snapshots and checkpoints may take (MB, default 4096).",
    ),
]
PausedRetentionOption = Annotated[
    float | None,
    typer.Option(
        "--paused-retention",
        help="Seconds the key's paused (or lost) sandboxes are kept before they are deleted "
        "(default: the daemon's --paused-retention; the shorter of the two applies).",
    ),
]
RoleOption = Annotated[
    str,
    typer.Option(
        "--role",
        help="user: runs code and manages its own sandboxes; admin: also operates the service "
        "(dashboard, metrics, keys).",
    ),
]


def db_path(db: Path | None) -> Path:
    """The database path: ``--db`` or the default."""
    from fission.auth.db import default_db_path

    return db or default_db_path()


def open_existing(db: Path | None) -> KeyStore:
    """The key store at ``db``; InvalidInput when no database is there yet."""
    from fission.auth.keys import KeyStore

    path = db_path(db)
    if not path.exists():
        raise InvalidInput(
            f"no key database at {path}: create a key first with `fission keys create NAME`"
        )
    return KeyStore(path)


def describe(key: ApiKey) -> str:
    """``id (name)`` and the key's limits, for one-line messages."""
    return (
        f"{key.id} ({key.name}, {key.role}): up to {key.limits.max_concurrent_sandboxes} "
        f"sandboxes at once, {key.limits.rate_per_minute} requests a minute, "
        f"{key.limits.max_snapshot_mb} MB of snapshots, paused sandboxes kept "
        + (
            "as long as the daemon keeps them"
            if key.limits.paused_retention is None
            else f"{key.limits.paused_retention:g} s (at most)"
        )
    )


def with_limits(
    base: KeyLimits,
    max_sandboxes: int | None,
    rate_per_minute: int | None,
    max_snapshot_mb: int | None = None,
    paused_retention: float | None = None,
) -> KeyLimits:
    """``base`` with the limits the options set (checked like any KeyLimits)."""
    changes: dict[str, Any] = {}
    if paused_retention is not None:
        changes["paused_retention"] = paused_retention
    if max_snapshot_mb is not None:
        changes["max_snapshot_mb"] = max_snapshot_mb
    if max_sandboxes is not None:
        changes["max_concurrent_sandboxes"] = max_sandboxes
    if rate_per_minute is not None:
        changes["rate_per_minute"] = rate_per_minute
    return dataclasses.replace(base, **changes)


def _os_user() -> str:
    """Who is running this command, for the audit log."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry, e.g. in a container
        return str(os.getuid())


@contextmanager
def audited(path: Path, action: str, detail: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Record ``action`` (with ``detail``, which the block may add to) and its outcome.

    Nothing is recorded when the block failed before any database existed.
    """
    from fission.auth.audit_log import LOCAL, AuditLog, outcome_of_error

    started = time.monotonic()
    outcome = "ok"
    try:
        yield detail
    except BaseException as exc:
        outcome = outcome_of_error(exc)
        raise
    finally:
        if path.exists():
            limits = detail.pop("limits", None)
            with AuditLog(path) as log:
                log.record(
                    LOCAL,
                    action,
                    outcome=outcome,
                    limits=limits,
                    duration_ms=(time.monotonic() - started) * 1000,
                    detail={"user": _os_user(), **detail},
                )


@app.command("create")
def create_command(
    name: Annotated[str, typer.Argument(help="A name for the key (who or what uses it).")],
    max_sandboxes: MaxSandboxesOption = None,
    rate_per_minute: RatePerMinuteOption = None,
    max_snapshot_mb: MaxSnapshotMbOption = None,
    paused_retention: PausedRetentionOption = None,
    role: RoleOption = "user",
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a key and print it once: only its hash is stored."""
    from fission.auth.keys import KeyLimits, KeyStore

    path = db_path(db)
    try:
        with audited(path, "keys.create", {"name": name, "role": role}) as detail:
            limits = with_limits(
                KeyLimits(), max_sandboxes, rate_per_minute, max_snapshot_mb, paused_retention
            )
            detail["limits"] = dataclasses.asdict(limits)
            with KeyStore(path) as store:
                record, plaintext = store.create(name, limits, role)
            detail["key"] = record.id
    except FissionError as exc:
        abort(exc)
    typer.echo(f"Created API key {describe(record)}.", err=True)
    typer.echo("Store the key now: it is shown only this once and cannot be recovered.", err=True)
    if as_json:
        typer.echo(json.dumps({**record.to_json(), "key": plaintext}, indent=2))
    else:
        typer.echo(plaintext)


@app.command("list")
def list_command(
    include_revoked: Annotated[
        bool, typer.Option("--all/--active", help="Also list revoked keys.")
    ] = True,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the keys (ids, names, limits; never secrets)."""
    from rich.console import Console
    from rich.table import Table

    from fission.auth.keys import KeyStore

    path = db_path(db)
    try:
        keys = []
        if path.exists():
            with KeyStore(path) as store:
                keys = store.list(include_revoked=include_revoked)
    except FissionError as exc:
        abort(exc)
    if as_json:
        typer.echo(json.dumps([key.to_json() for key in keys], indent=2))
        return
    if not keys:
        typer.echo(f"No API keys in {path}: create one with `fission keys create NAME`.", err=True)
        return
    table = Table(title=f"API keys in {path}")
    for column in (
        "id",
        "name",
        "role",
        "status",
        "max sandboxes",
        "rate / min",
        "snapshots MB",
        "created (UTC)",
    ):
        table.add_column(column)
    for key in keys:
        status = "active" if key.revoked_at is None else f"revoked {key.revoked_at:%Y-%m-%d %H:%M}"
        table.add_row(
            key.id,
            key.name,
            key.role,
            status,
            str(key.limits.max_concurrent_sandboxes),
            str(key.limits.rate_per_minute),
            str(key.limits.max_snapshot_mb),
            f"{key.created_at:%Y-%m-%d %H:%M:%S}",
        )
    Console().print(table)


@app.command("revoke")
def revoke_command(
    id_or_name: Annotated[str, typer.Argument(help="The key's id or name.")],
    db: DbOption = None,
) -> None:
    """Revoke a key: requests carrying it are refused from now on."""
    from fission.auth.db import to_iso

    path = db_path(db)
    try:
        with (
            audited(path, "keys.revoke", {"target": id_or_name}) as detail,
            open_existing(db) as store,
        ):
            before = store.get(id_or_name)
            detail["key"] = before.id
            key = store.revoke(before.id)
    except FissionError as exc:
        abort(exc)
    if before.revoked_at is not None:
        typer.echo(
            f"API key {key.id} ({key.name}) was already revoked at {to_iso(before.revoked_at)}."
        )
    else:
        typer.echo(f"Revoked API key {key.id} ({key.name}).")


@app.command("limits")
def limits_command(
    id_or_name: Annotated[str, typer.Argument(help="The key's id or name.")],
    max_sandboxes: Annotated[
        int | None, typer.Option("--max-sandboxes", help="New limit of sandboxes at once.")
    ] = None,
    rate_per_minute: Annotated[
        int | None, typer.Option("--rate-per-minute", help="New limit of requests a minute.")
    ] = None,
    max_snapshot_mb: MaxSnapshotMbOption = None,
    paused_retention: PausedRetentionOption = None,
    db: DbOption = None,
) -> None:
    """Show a key's limits, or change them with the options (from its next request)."""
    try:
        with open_existing(db) as store:
            key = store.get(id_or_name)
            options = (max_sandboxes, rate_per_minute, max_snapshot_mb, paused_retention)
            if any(v is not None for v in options):
                with audited(store.path, "keys.limits", {"key": key.id}) as detail:
                    limits = with_limits(key.limits, *options)
                    detail["limits"] = dataclasses.asdict(limits)
                    key = store.set_limits(key.id, limits)
    except FissionError as exc:
        abort(exc)
    typer.echo(f"API key {describe(key)}.")


@app.command("role")
def role_command(
    id_or_name: Annotated[str, typer.Argument(help="The key's id or name.")],
    role: Annotated[str | None, typer.Argument(help="The new role: user or admin.")] = None,
    db: DbOption = None,
) -> None:
    """Show a key's role, or change it (from its next request)."""
    try:
        with open_existing(db) as store:
            key = store.get(id_or_name)
            if role is not None:
                with audited(store.path, "keys.role", {"key": key.id, "role": role}):
                    key = store.set_role(key.id, role)
    except FissionError as exc:
        abort(exc)
    typer.echo(f"API key {key.id} ({key.name}) has the role {key.role}.")
