"""`fission keys create|list|revoke|limits`: manage the API keys TCP clients must present."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fission.cli.errors import abort
from fission.errors import FissionError, InvalidInput

if TYPE_CHECKING:
    from fission.auth.keys import ApiKey, KeyStore

app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)

DbOption = Annotated[
    Path | None,
    typer.Option(
        "--db",
        help="The key and audit database [default: $FISSION_DATA_DIR/fission.sqlite3, "
        "else in the user data dir].",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
MaxSandboxesOption = Annotated[
    int | None, typer.Option("--max-sandboxes", help="Sandboxes the key may hold at once [10].")
]
RatePerMinuteOption = Annotated[
    int | None, typer.Option("--rate-per-minute", help="Requests the key may make a minute [600].")
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
        f"{key.id} ({key.name}): up to {key.limits.max_concurrent_sandboxes} sandboxes at once, "
        f"{key.limits.rate_per_minute} requests a minute"
    )


@app.command("create")
def create_command(
    name: Annotated[str, typer.Argument(help="A name for the key (who or what uses it).")],
    max_sandboxes: MaxSandboxesOption = None,
    rate_per_minute: RatePerMinuteOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a key and print it once: only its hash is stored."""
    from fission.auth.keys import KeyLimits, KeyStore

    try:
        defaults = KeyLimits()
        limits = KeyLimits(
            max_concurrent_sandboxes=(
                defaults.max_concurrent_sandboxes if max_sandboxes is None else max_sandboxes
            ),
            rate_per_minute=defaults.rate_per_minute
            if rate_per_minute is None
            else rate_per_minute,
        )
        with KeyStore(db_path(db)) as store:
            record, plaintext = store.create(name, limits)
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
    for column in ("id", "name", "status", "max sandboxes", "rate / min", "created (UTC)"):
        table.add_column(column)
    for key in keys:
        status = "active" if key.revoked_at is None else f"revoked {key.revoked_at:%Y-%m-%d %H:%M}"
        table.add_row(
            key.id,
            key.name,
            status,
            str(key.limits.max_concurrent_sandboxes),
            str(key.limits.rate_per_minute),
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

    try:
        with open_existing(db) as store:
            before = store.get(id_or_name)
            key = store.revoke(id_or_name)
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
    max_sandboxes: MaxSandboxesOption = None,
    rate_per_minute: RatePerMinuteOption = None,
    db: DbOption = None,
) -> None:
    """Show a key's limits, or change them with the options (from its next request)."""
    from fission.auth.keys import KeyLimits

    try:
        with open_existing(db) as store:
            key = store.get(id_or_name)
            if max_sandboxes is not None or rate_per_minute is not None:
                limits = KeyLimits(
                    max_concurrent_sandboxes=(
                        key.limits.max_concurrent_sandboxes
                        if max_sandboxes is None
                        else max_sandboxes
                    ),
                    rate_per_minute=(
                        key.limits.rate_per_minute if rate_per_minute is None else rate_per_minute
                    ),
                )
                key = store.set_limits(key.id, limits)
    except FissionError as exc:
        abort(exc)
    typer.echo(f"API key {describe(key)}.")
