"""Per-key paused retention: the key's limit (``KeyLimits.paused_retention``), its CLI options,
and the sandbox manager keeping a key's paused or lost sandboxes the shorter of the daemon's
retention and the key's (fake VMM driver).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from fission.auth.keys import PAUSED_RETENTION_CAP, KeyLimits, KeyStore, hash_secret
from fission.cli import app
from fission.core.catalog import Catalog
from fission.core.languages import resolve_language
from fission.core.sandbox_restore import lose
from fission.core.sandbox_spec import SandboxSpec, SandboxState
from fission.core.service import Service
from fission.errors import LimitOutOfRange
from fission.server.app import create_app
from tests.unit.conftest import ServiceStarter, eventually

BASH = SandboxSpec(resolve_language("bash"))
DAY = 24 * 3600.0


def cli(*args: str) -> Result:
    """Run the fission CLI in-process."""
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("bad", [0, -1.0, PAUSED_RETENTION_CAP + 1, float("nan"), "60", True])
def test_a_bad_paused_retention_is_refused_naming_the_option(bad: object) -> None:
    with pytest.raises(LimitOutOfRange, match="--paused-retention"):
        KeyLimits(paused_retention=bad)  # type: ignore[arg-type]


def test_the_key_store_keeps_the_retention(tmp_path: Path) -> None:
    with KeyStore(tmp_path / "db.sqlite3") as store:
        default, _ = store.create("default")
        short, _ = store.create("short", KeyLimits(paused_retention=90.0))
        assert default.limits.paused_retention is None
        assert store.get("short").limits.paused_retention == 90.0
        changed = store.set_limits("short", KeyLimits(paused_retention=30.5))
        assert changed.limits.paused_retention == 30.5
        assert store.get(short.id).to_json()["paused_retention"] == 30.5


def test_a_database_from_before_per_key_retention_gets_the_column(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE api_keys (id TEXT PRIMARY KEY, name TEXT NOT NULL,"
            " secret_sha256 TEXT NOT NULL, created_at TEXT NOT NULL, revoked_at TEXT,"
            " max_concurrent_sandboxes INTEGER NOT NULL, rate_per_minute INTEGER NOT NULL,"
            " role TEXT NOT NULL DEFAULT 'user', max_snapshot_mb INTEGER NOT NULL DEFAULT 4096)"
        )
        conn.execute(
            "INSERT INTO api_keys VALUES ('0123456789ab', 'old', ?, ?, NULL, 2, 60, 'user', 64)",
            (hash_secret("0123456789ab", "s" * 43), "2026-01-01T00:00:00.000000+00:00"),
        )
    with KeyStore(db) as store:
        key = store.authenticate("fsk_0123456789ab_" + "s" * 43)
        assert (key.limits.max_snapshot_mb, key.limits.paused_retention) == (64, None)
        store.set_limits("old", KeyLimits(paused_retention=60.0))
    with KeyStore(db) as again:  # a second open finds the column and keeps the value
        assert again.get("old").limits.paused_retention == 60.0


def test_the_cli_sets_and_shows_the_retention(tmp_path: Path) -> None:
    db = str(tmp_path / "db.sqlite3")
    created = cli("keys", "create", "ci", "--paused-retention", "3600", "--json", "--db", db)
    assert created.exit_code == 0, created.stderr
    assert json.loads(created.stdout)["paused_retention"] == 3600.0
    changed = cli("keys", "limits", "ci", "--paused-retention", "60", "--db", db)
    assert changed.exit_code == 0, changed.stderr
    assert "paused sandboxes kept 60 s (at most)" in changed.stdout
    with KeyStore(Path(db)) as store:
        assert store.get("ci").limits == KeyLimits(paused_retention=60.0)
    bad = cli("keys", "limits", "ci", "--paused-retention", "0", "--db", db)
    assert bad.exit_code != 0 and "--paused-retention" in bad.output
    with KeyStore(Path(db)) as store:
        assert store.get("ci").limits.paused_retention == 60.0  # unchanged by the refusal


async def durable(start: ServiceStarter, state_dir: Path, retention: float) -> Service:
    return await start(state_dir=state_dir, durable_sandboxes=True, paused_retention=retention)


async def test_a_key_with_a_shorter_retention_has_its_paused_sandboxes_deleted_sooner(
    start_service: ServiceStarter, tmp_path: Path
) -> None:
    service = await durable(start_service, tmp_path / "state", DAY)
    manager = service.sandboxes
    manager.retention_for = {"short": 1.0, "long": 10 * DAY}.get
    short = await manager.create(BASH, owner="short", max_sandboxes=2)
    long = await manager.create(BASH, owner="long", max_sandboxes=2)
    plain = await manager.create(BASH, owner="plain", max_sandboxes=2)
    before = time.time()
    for record in (short, long, plain):
        await manager.pause(record.id)
    assert manager.get(short.id).expires_at <= time.time() + 1.0
    # A key never keeps them longer than the daemon; a key without a retention gets the daemon's.
    for record in (long, plain):
        assert before + DAY <= manager.get(record.id).expires_at <= time.time() + DAY

    catalog = Catalog(tmp_path / "state")

    def short_gone() -> bool:
        listed = {b.id for b in manager.list_sandboxes()[0]}
        return listed == {long.id, plain.id} == {e.id for e in catalog.entries()}

    await eventually(short_gone, "the short-retention key's paused sandbox to expire", 5)
    catalog.close()


async def test_a_lost_sandbox_is_kept_for_its_keys_retention(
    start_service: ServiceStarter, tmp_path: Path
) -> None:
    service = await durable(start_service, tmp_path / "state", DAY)
    manager = service.sandboxes
    manager.retention_for = {"short": 2.0}.get
    record = await manager.create(BASH, owner="short", max_sandboxes=1)
    await lose(manager, manager._box(record.id, None), "its VM ended")
    lost = manager.get(record.id)
    assert lost.state == SandboxState.LOST and lost.expires_at <= time.time() + 2.0


async def test_an_unknown_key_falls_back_to_the_daemons_retention(
    start_service: ServiceStarter, tmp_path: Path
) -> None:
    service = await durable(start_service, tmp_path / "state", 3600.0)
    db = tmp_path / "keys.sqlite3"
    with KeyStore(db) as store:
        key, _ = store.create("ci", KeyLimits(paused_retention=5.0))
    create_app(service, keys_db=db)  # a TCP listener's app wires its key store in
    manager = service.sandboxes
    assert await manager.retention_of(key.id) == 5.0
    assert await manager.retention_of("000000000000") == 3600.0  # no such key
    assert await manager.retention_of(None) == 3600.0  # the local socket
