"""`fission keys ...` and `fission audit`: output, exit codes and the database they use."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from fission.auth.audit_log import LOCAL, AuditLog
from fission.auth.keys import DEFAULT_MAX_SANDBOXES, DEFAULT_RATE_PER_MINUTE, KeyStore
from fission.cli import app
from fission.cli.audit import parse_last, parse_since, since_from
from fission.errors import InvalidInput, Unauthorized


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "fission.sqlite3"


def cli(*args: str) -> Result:
    """Run the fission CLI in-process."""
    return CliRunner().invoke(app, list(args))


def create(db: Path, name: str, *options: str) -> str:
    """Create a key through the CLI and return the plaintext it printed."""
    result = cli("keys", "create", name, "--db", str(db), *options)
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip()


def test_create_prints_the_key_once_with_a_warning(db: Path) -> None:
    result = cli("keys", "create", "ci", "--db", str(db), "--max-sandboxes", "3")
    assert result.exit_code == 0, result.stderr
    plaintext = result.stdout.strip()
    assert result.stdout == plaintext + "\n"  # only the key on stdout, for $(...)
    assert "shown only this once" in result.stderr
    assert "up to 3 sandboxes" in result.stderr
    key = KeyStore(db).authenticate(plaintext)
    assert (key.name, key.limits.max_concurrent_sandboxes, key.limits.rate_per_minute) == (
        "ci",
        3,
        600,
    )
    listing = cli("keys", "list", "--db", str(db), "--json")
    assert plaintext.split("_", 2)[2] not in listing.stdout


def test_help_states_the_real_defaults() -> None:
    result = CliRunner().invoke(app, ["keys", "create", "--help"], env={"COLUMNS": "250"})
    assert f"(default {DEFAULT_MAX_SANDBOXES})" in result.stdout
    assert f"(default {DEFAULT_RATE_PER_MINUTE})" in result.stdout
    assert "$FISSION_DATA_DIR" in result.stdout


def test_create_json(db: Path) -> None:
    result = cli("keys", "create", "ci", "--db", str(db), "--rate-per-minute", "7", "--json")
    assert result.exit_code == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["name"] == "ci" and body["rate_per_minute"] == 7
    assert KeyStore(db).authenticate(body["key"]).id == body["id"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-sandboxes", "0"], "--max-sandboxes 0 is out of range"),
        (["--rate-per-minute", "-5"], "--rate-per-minute -5 is out of range"),
        (["--rate-per-minute", "9999999"], "use 1 to 1000000"),
    ],
)
def test_create_with_bad_limits(db: Path, args: list[str], message: str) -> None:
    result = cli("keys", "create", "ci", "--db", str(db), *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_create_with_a_non_number_is_a_usage_error(db: Path) -> None:
    result = cli("keys", "create", "ci", "--db", str(db), "--max-sandboxes", "many")
    assert result.exit_code == 2


def test_create_a_bad_or_taken_name(db: Path) -> None:
    bad = cli("keys", "create", "two words", "--db", str(db))
    assert (bad.exit_code, bad.stdout) == (2, "")
    assert "not allowed" in bad.stderr
    create(db, "ci")
    taken = cli("keys", "create", "ci", "--db", str(db))
    assert taken.exit_code == 2
    assert "fission keys revoke ci" in taken.stderr


def test_list(db: Path) -> None:
    create(db, "alpha")
    create(db, "beta", "--rate-per-minute", "42")
    cli("keys", "revoke", "alpha", "--db", str(db))
    listed = json.loads(cli("keys", "list", "--db", str(db), "--json").stdout)
    assert [(k["name"], k["active"], k["rate_per_minute"]) for k in listed] == [
        ("alpha", False, 600),
        ("beta", True, 42),
    ]
    active = json.loads(cli("keys", "list", "--active", "--db", str(db), "--json").stdout)
    assert [k["name"] for k in active] == ["beta"]
    table = cli("keys", "list", "--db", str(db))
    assert table.exit_code == 0
    assert "alpha" in table.stdout and "revoked" in table.stdout and "active" in table.stdout


def test_list_without_a_database_creates_none(db: Path) -> None:
    result = cli("keys", "list", "--db", str(db), "--json")
    assert (result.exit_code, json.loads(result.stdout)) == (0, [])
    table = cli("keys", "list", "--db", str(db))
    assert table.exit_code == 0
    assert "fission keys create" in table.stderr
    assert not db.exists()


def test_revoke_by_name_then_id_then_again(db: Path) -> None:
    plaintext = create(db, "ci")
    key = KeyStore(db).authenticate(plaintext)
    result = cli("keys", "revoke", "ci", "--db", str(db))
    assert result.exit_code == 0
    assert f"Revoked API key {key.id} (ci)" in result.stdout
    with pytest.raises(Unauthorized, match="revoked"):
        KeyStore(db).authenticate(plaintext)
    again = cli("keys", "revoke", key.id, "--db", str(db))
    assert again.exit_code == 0
    assert "already revoked" in again.stdout


def test_revoke_unknown(db: Path) -> None:
    create(db, "ci")
    result = cli("keys", "revoke", "nobody", "--db", str(db))
    assert result.exit_code == 2
    assert "no API key has the id or name 'nobody'" in result.stderr


def test_revoke_without_a_database(db: Path) -> None:
    result = cli("keys", "revoke", "ci", "--db", str(db))
    assert result.exit_code == 2
    assert "fission keys create" in result.stderr
    assert not db.exists()


def test_limits_show_and_change(db: Path) -> None:
    plaintext = create(db, "ci")
    shown = cli("keys", "limits", "ci", "--db", str(db))
    assert "up to 10 sandboxes at once, 600 requests a minute" in shown.stdout
    changed = cli("keys", "limits", "ci", "--rate-per-minute", "5", "--db", str(db))
    assert changed.exit_code == 0, changed.stderr
    assert "up to 10 sandboxes at once, 5 requests a minute" in changed.stdout
    assert KeyStore(db).authenticate(plaintext).limits.rate_per_minute == 5
    bad = cli("keys", "limits", "ci", "--max-sandboxes", "0", "--db", str(db))
    assert bad.exit_code == 2


def test_key_management_is_audited(db: Path) -> None:
    create(db, "ci", "--max-sandboxes", "2")
    key_id = KeyStore(db).get("ci").id
    assert cli("keys", "limits", "ci", "--rate-per-minute", "5", "--db", str(db)).exit_code == 0
    assert cli("keys", "limits", "ci", "--db", str(db)).exit_code == 0  # only shows: not audited
    assert cli("keys", "revoke", "ci", "--db", str(db)).exit_code == 0
    assert cli("keys", "revoke", "nobody", "--db", str(db)).exit_code == 2
    events = json.loads(cli("audit", "--db", str(db), "--json", "--action", "keys").stdout)
    assert [(e["action"], e["outcome"], e["who"]) for e in events] == [
        ("keys.revoke", "error:invalid_input", LOCAL),
        ("keys.revoke", "ok", LOCAL),
        ("keys.limits", "ok", LOCAL),
        ("keys.create", "ok", LOCAL),
    ]
    assert events[0]["detail"]["target"] == "nobody"
    assert events[1]["detail"]["key"] == key_id
    assert events[2]["limits"] == {
        "max_concurrent_sandboxes": 2,
        "rate_per_minute": 5,
        "max_snapshot_mb": 4096,
        "paused_retention": None,
    }
    assert events[3]["limits"] == {
        "max_concurrent_sandboxes": 2,
        "rate_per_minute": 600,
        "max_snapshot_mb": 4096,
        "paused_retention": None,
    }
    assert events[3]["detail"]["key"] == key_id and events[3]["detail"]["name"] == "ci"
    assert all(e["detail"]["user"] for e in events)
    # The audit log never holds the key itself.
    assert "fsk_" not in json.dumps(events)


def test_default_database_follows_fission_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FISSION_DATA_DIR", str(tmp_path / "data"))
    plaintext = cli("keys", "create", "ci").stdout.strip()
    assert KeyStore(tmp_path / "data" / "fission.sqlite3").authenticate(plaintext).name == "ci"


def test_a_database_that_is_not_one(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"not sqlite at all\n" * 200)
    result = cli("keys", "list", "--db", str(bogus))
    assert result.exit_code == 125
    assert "bogus" in result.stderr


def audit_db(db: Path) -> str:
    """Events an hour ago and a minute ago; returns the id of the key that made them."""
    key, _ = KeyStore(db).create("ci")
    now = datetime.now(UTC)
    old = AuditLog(db, now=lambda: now - timedelta(hours=1))
    old.record(key.id, "run", outcome="ok", language="python", limits={"timeout": 30})
    recent = AuditLog(db, now=lambda: now - timedelta(minutes=1))
    recent.record(LOCAL, "sandbox.create", outcome="ok", language="bash")
    recent.record(key.id, "exec", outcome="exit 1", language="python", duration_ms=12.0)
    return key.id


def test_audit_json_and_filters(db: Path) -> None:
    key_id = audit_db(db)
    every = json.loads(cli("audit", "--db", str(db), "--json").stdout)
    assert [e["action"] for e in every] == ["exec", "sandbox.create", "run"]
    assert every[2]["limits"] == {"timeout": 30}
    mine = json.loads(cli("audit", "--db", str(db), "--json", "--key", key_id).stdout)
    assert [e["action"] for e in mine] == ["exec", "run"]
    sandboxes = json.loads(cli("audit", "--db", str(db), "--json", "--action", "sandbox").stdout)
    assert [e["who"] for e in sandboxes] == [LOCAL]
    last = json.loads(cli("audit", "--db", str(db), "--json", "--last", "30m").stdout)
    assert [e["action"] for e in last] == ["exec", "sandbox.create"]
    since = (datetime.now(UTC) - timedelta(minutes=30)).isoformat()
    assert json.loads(cli("audit", "--db", str(db), "--json", "--since", since).stdout) == last
    one = json.loads(cli("audit", "--db", str(db), "--json", "--limit", "1").stdout)
    assert [e["action"] for e in one] == ["exec"]


def test_audit_table_names_the_keys(db: Path) -> None:
    key_id = audit_db(db)
    result = CliRunner().invoke(app, ["audit", "--db", str(db)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.stderr
    assert f"{key_id} (ci)" in result.stdout
    assert "exit 1" in result.stdout and "timeout=30" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "2024-01-01", "--last", "1h"], "not both"),
        (["--last", "1y"], "--last '1y' is not a span"),
        (["--since", "yesterday"], "not an ISO 8601 time"),
        (["--limit", "0"], "--limit 0 is out of range"),
    ],
)
def test_audit_bad_input(db: Path, args: list[str], message: str) -> None:
    audit_db(db)
    result = cli("audit", "--db", str(db), *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_audit_without_a_database(db: Path) -> None:
    assert json.loads(cli("audit", "--db", str(db), "--json").stdout) == []
    assert cli("audit", "--db", str(db)).exit_code == 0
    assert not db.exists()


@pytest.mark.parametrize(
    ("text", "span"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("1h", timedelta(hours=1)),
        (" 1.5H ", timedelta(hours=1.5)),
        ("2d", timedelta(days=2)),
        ("1w", timedelta(weeks=1)),
    ],
)
def test_parse_last(text: str, span: timedelta) -> None:
    assert parse_last(text) == span


@pytest.mark.parametrize("text", ["", "h", "1", "-1h", "1 hour", "1e3s", "99999999999w"])
def test_parse_last_refuses(text: str) -> None:
    with pytest.raises(InvalidInput, match="--last"):
        parse_last(text)


def test_parse_since() -> None:
    assert parse_since("2024-05-01") == datetime(2024, 5, 1, tzinfo=UTC)
    assert parse_since("2024-05-01T12:00:00Z") == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert parse_since("2024-05-01T14:00:00+02:00") == datetime(2024, 5, 1, 12, tzinfo=UTC)


def test_since_from() -> None:
    now = datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert since_from(None, None, now) is None
    assert since_from(None, "1h", now) == datetime(2024, 5, 1, 11, tzinfo=UTC)
    with pytest.raises(InvalidInput, match="too long ago"):
        since_from(None, "999999w", now)


def test_create_an_admin_and_change_roles(db: Path) -> None:
    plaintext = create(db, "ops", "--role", "admin")
    assert KeyStore(db).authenticate(plaintext).is_admin
    create(db, "ci")
    shown = cli("keys", "role", "ci", "--db", str(db))
    assert shown.exit_code == 0 and "has the role user" in shown.stdout
    changed = cli("keys", "role", "ci", "admin", "--db", str(db))
    assert changed.exit_code == 0 and "has the role admin" in changed.stdout
    listing = json.loads(cli("keys", "list", "--db", str(db), "--json").stdout)
    assert {key["name"]: key["role"] for key in listing} == {"ops": "admin", "ci": "admin"}
    actions = [event.action for event in AuditLog(db).query()]
    assert "keys.role" in actions


def test_a_bad_role_is_refused_and_changes_nothing(db: Path) -> None:
    bad = cli("keys", "create", "ci", "--db", str(db), "--role", "root")
    assert bad.exit_code != 0 and "use one of user, admin" in bad.stderr
    create(db, "ci")
    refused = cli("keys", "role", "ci", "owner", "--db", str(db))
    assert refused.exit_code != 0 and "unknown role" in refused.stderr
    assert KeyStore(db).get("ci").role == "user"
