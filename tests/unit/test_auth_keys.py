"""API keys: create, list, revoke, authenticate; only hashes on disk; a private database file."""

from __future__ import annotations

import stat
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fission.auth.db import default_db_path
from fission.auth.keys import (
    ApiKey,
    KeyLimits,
    KeyStore,
    hash_secret,
    key_from_authorization,
    parse_key,
)
from fission.errors import FissionError, InvalidInput, LimitOutOfRange, Unauthorized


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A database path in a directory that does not exist yet."""
    return tmp_path / "state" / "fission.sqlite3"


@pytest.fixture
def store(db: Path) -> KeyStore:
    """An empty key store."""
    return KeyStore(db)


def test_create_then_authenticate(store: KeyStore) -> None:
    record, plaintext = store.create("ci", KeyLimits(max_concurrent_sandboxes=3, rate_per_minute=7))
    assert plaintext.startswith(f"fsk_{record.id}_")
    assert len(record.id) == 12
    assert record.active and record.revoked_at is None
    assert record.limits == KeyLimits(3, 7)
    assert record.created_at.tzinfo is not None
    assert store.authenticate(plaintext) == record
    assert store.authenticate(f"  {plaintext}\n") == record  # header whitespace is harmless


def test_default_limits(store: KeyStore) -> None:
    record, _ = store.create("defaults")
    assert record.limits == KeyLimits(max_concurrent_sandboxes=10, rate_per_minute=600)


def test_every_key_is_different(store: KeyStore) -> None:
    made = [store.create(f"k{i}") for i in range(20)]
    assert len({record.id for record, _ in made}) == 20
    assert len({plaintext for _, plaintext in made}) == 20


def test_list_shows_records_and_never_secrets(store: KeyStore) -> None:
    first, plain_a = store.create("a")
    second, plain_b = store.create("b")
    store.revoke("a")
    listed = store.list()
    assert [key.id for key in listed] == [first.id, second.id]
    assert [key.active for key in listed] == [False, True]
    assert [key.id for key in store.list(include_revoked=False)] == [second.id]
    text = repr(listed) + repr([key.to_json() for key in listed])
    for plaintext in (plain_a, plain_b):
        assert plaintext.split("_", 2)[2] not in text


def test_to_json(store: KeyStore) -> None:
    record, _ = store.create("ci")
    body = record.to_json()
    assert body == {
        "id": record.id,
        "name": "ci",
        "created_at": body["created_at"],
        "revoked_at": None,
        "active": True,
        "max_concurrent_sandboxes": 10,
        "rate_per_minute": 600,
        "role": "user",
        "max_snapshot_mb": 4096,
        "paused_retention": None,
    }
    assert body["created_at"].endswith("+00:00")


def test_secrets_are_not_stored_in_plain_text(db: Path, store: KeyStore) -> None:
    secrets = [store.create(f"k{i}")[1] for i in range(5)]
    store.revoke("k0")
    # While the store is open the rows may sit in the write-ahead log: read every file.
    files = [path for path in db.parent.iterdir() if path.name.startswith(db.name)]
    data = b"".join(path.read_bytes() for path in files)
    assert b"api_keys" in data  # the bytes read really are the database
    for plaintext in secrets:
        _, secret = parse_key(plaintext)
        assert secret.encode() not in data
        assert plaintext.encode() not in data
    store.close()
    data = db.read_bytes()
    for plaintext in secrets:
        assert parse_key(plaintext)[1].encode() not in data


def test_database_and_its_directory_are_private(db: Path, store: KeyStore) -> None:
    store.create("ci")
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    for suffix in ("-wal", "-shm"):  # SQLite gives its side files the database's mode
        side = db.with_name(db.name + suffix)
        assert side.exists()
        assert stat.S_IMODE(side.stat().st_mode) == 0o600


def test_private_even_with_a_permissive_umask(db: Path) -> None:
    import os

    old = os.umask(0)
    try:
        KeyStore(db).create("ci")
    finally:
        os.umask(old)
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_an_existing_file_keeps_its_mode(db: Path) -> None:
    KeyStore(db).close()
    db.chmod(0o640)
    KeyStore(db).create("ci")
    assert stat.S_IMODE(db.stat().st_mode) == 0o640


def test_wrong_secret(store: KeyStore) -> None:
    record, _ = store.create("ci")
    other = store.create("other")[1]
    forged = f"fsk_{record.id}_{parse_key(other)[1]}"
    with pytest.raises(Unauthorized, match="invalid API key"):
        store.authenticate(forged)


def test_unknown_id(store: KeyStore) -> None:
    _, plaintext = store.create("ci")
    _, secret = parse_key(plaintext)
    with pytest.raises(Unauthorized, match="invalid API key"):
        store.authenticate(f"fsk_000000000000_{secret}")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "fsk_",
        "Bearer fsk_0123456789ab_" + "a" * 43,
        "fsk_0123456789ab_" + "a" * 42,
        "fsk_0123456789ab_" + "a" * 44,
        "fsk_0123456789AB_" + "a" * 43,
        "fsk_0123456789a_" + "a" * 43,
        "sk_0123456789ab_" + "a" * 43,
        "fsk_0123456789ab_" + "a" * 42 + "=",
        "fsk_0123456789ab_" + "a" * 42 + "\u00e9",
    ],
)
def test_malformed_keys(store: KeyStore, text: str) -> None:
    with pytest.raises(Unauthorized, match="malformed") as caught:
        store.authenticate(text)
    assert caught.value.http_status == 401
    assert caught.value.code == "unauthorized"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyStore, str]:
    """One store holding one key, for the hypothesis tests (a file per example is slow)."""
    store = KeyStore(tmp_path_factory.mktemp("shared") / "db.sqlite3")
    return store, store.create("shared")[1]


@given(text=st.text(max_size=80))
def test_any_text_is_a_key_or_unauthorized(shared: tuple[KeyStore, str], text: str) -> None:
    store, _ = shared
    with pytest.raises(Unauthorized):
        store.authenticate(text)


@given(position=st.integers(min_value=0, max_value=42), char=st.sampled_from("aZ09-_"))
def test_any_changed_secret_character_is_refused(
    shared: tuple[KeyStore, str], position: int, char: str
) -> None:
    store, plaintext = shared
    prefix, secret = plaintext[:-43], plaintext[-43:]
    changed = secret[:position] + char + secret[position + 1 :]
    if changed == secret:
        assert store.authenticate(prefix + changed).name == "shared"
    else:
        with pytest.raises(Unauthorized, match="invalid"):
            store.authenticate(prefix + changed)


def test_no_key_at_all(store: KeyStore) -> None:
    with pytest.raises(Unauthorized, match="needs an API key"):
        store.authenticate(None)
    with pytest.raises(Unauthorized, match="malformed"):
        store.authenticate(b"fsk_0123456789ab_" + b"a" * 43)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("header", "key"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("Bearer fsk_x", "fsk_x"),
        ("bearer   fsk_x ", "fsk_x"),
        ("BEARER fsk_x", "fsk_x"),
    ],
)
def test_key_from_authorization(header: str | None, key: str | None) -> None:
    assert key_from_authorization(header) == key


@pytest.mark.parametrize(
    "header", ["fsk_x", "Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "Token fsk_x"]
)
def test_key_from_a_bad_authorization(header: str) -> None:
    with pytest.raises(Unauthorized, match="Bearer <API key>"):
        key_from_authorization(header)


def test_a_bearer_header_end_to_end(store: KeyStore) -> None:
    record, plaintext = store.create("ci")
    assert store.authenticate(key_from_authorization(f"Bearer {plaintext}")) == record


def test_revoked_key_is_refused(store: KeyStore) -> None:
    record, plaintext = store.create("ci")
    revoked = store.revoke("ci")
    assert revoked.id == record.id and not revoked.active
    with pytest.raises(Unauthorized, match=f"{record.id} \\(ci\\) was revoked"):
        store.authenticate(plaintext)


def test_revoke_by_id_and_twice(store: KeyStore) -> None:
    record, _ = store.create("ci")
    first = store.revoke(record.id)
    again = store.revoke(record.id)
    assert first.revoked_at is not None
    assert again.revoked_at == first.revoked_at


def test_revoke_unknown(store: KeyStore) -> None:
    with pytest.raises(InvalidInput, match="fission keys list"):
        store.revoke("nobody")


def test_names_are_unique_among_active_keys(store: KeyStore) -> None:
    old, _ = store.create("ci")
    with pytest.raises(InvalidInput, match="active key named 'ci'"):
        store.create("ci")
    store.revoke("ci")
    new, plaintext = store.create("ci")
    assert new.id != old.id
    assert store.get("ci").id == new.id  # the active one wins over the revoked one
    assert store.authenticate(plaintext).id == new.id
    store.revoke("ci")
    assert store.get("ci").id == new.id  # then the newest revoked one


def test_an_id_wins_over_a_name(store: KeyStore) -> None:
    first, _ = store.create("first")
    second, _ = store.create(first.id)  # a name that happens to equal another key's id
    assert store.get(first.id).name == "first"
    assert store.get(second.name).id == first.id
    assert store.revoke(first.id).name == "first"


@pytest.mark.parametrize("name", ["", " ci", "a b", "-x", "x" * 65, "k\n", "caf\u00e9", "a/b"])
def test_bad_names(store: KeyStore, name: str) -> None:
    with pytest.raises(InvalidInput, match="not allowed"):
        store.create(name)


@pytest.mark.parametrize("name", ["ci", "alice@example.com", "bot-1.prod+eu", "x" * 64, "9_lives"])
def test_good_names(store: KeyStore, name: str) -> None:
    assert store.create(name)[0].name == name


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"max_concurrent_sandboxes": 0}, "--max-sandboxes"),
        ({"max_concurrent_sandboxes": -1}, "--max-sandboxes"),
        ({"max_concurrent_sandboxes": 10_001}, "--max-sandboxes"),
        ({"max_concurrent_sandboxes": True}, "--max-sandboxes"),
        ({"max_concurrent_sandboxes": 2.0}, "--max-sandboxes"),
        ({"rate_per_minute": 0}, "--rate-per-minute"),
        ({"rate_per_minute": 1_000_001}, "--rate-per-minute"),
        ({"rate_per_minute": "5"}, "--rate-per-minute"),
    ],
)
def test_limits_out_of_range(kwargs: dict[str, object], option: str) -> None:
    with pytest.raises(LimitOutOfRange, match=option):
        KeyLimits(**kwargs)  # type: ignore[arg-type]


def test_set_limits(store: KeyStore) -> None:
    record, plaintext = store.create("ci")
    changed = store.set_limits("ci", KeyLimits(2, 30))
    assert changed.limits == KeyLimits(2, 30)
    assert store.authenticate(plaintext).limits == KeyLimits(2, 30)
    store.revoke(record.id)
    with pytest.raises(InvalidInput, match="revoked"):
        store.set_limits(record.id, KeyLimits())


def test_injected_clock(db: Path) -> None:
    moment = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    store = KeyStore(db, now=lambda: moment)
    record, _ = store.create("ci")
    assert record.created_at == moment
    assert store.revoke("ci").revoked_at == moment
    assert store.list()[0].created_at == moment


def test_two_stores_on_one_file_see_each_other(db: Path) -> None:
    # Like the daemon and a `fission keys revoke` in another process: nothing is cached.
    daemon, admin = KeyStore(db), KeyStore(db)
    record, plaintext = admin.create("ci")
    assert daemon.authenticate(plaintext).id == record.id
    admin.revoke(record.id)
    with pytest.raises(Unauthorized, match="revoked"):
        daemon.authenticate(plaintext)


def test_concurrent_use_from_threads(db: Path) -> None:
    shared = KeyStore(db)
    _, plaintext = shared.create("seed")
    errors: list[BaseException] = []
    made: list[ApiKey] = []

    def work(i: int) -> None:
        try:
            own = KeyStore(db)  # a second connection, as another process would have
            for j in range(5):
                made.append(own.create(f"t{i}-{j}")[0])
                made.append(shared.create(f"s{i}-{j}")[0])
                assert shared.authenticate(plaintext).name == "seed"
            own.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len({key.id for key in made}) == 60
    assert len(shared.list()) == 61


def test_default_path_follows_fission_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FISSION_DATA_DIR", str(tmp_path / "data"))
    assert default_db_path() == tmp_path / "data" / "fission.sqlite3"
    with KeyStore() as store:
        assert store.path == tmp_path / "data" / "fission.sqlite3"
        store.create("ci")
    assert (tmp_path / "data" / "fission.sqlite3").exists()


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_bytes(b"these are not the tables you are looking for\n" * 100)
    with pytest.raises(FissionError, match=r"notes\.txt") as caught:
        KeyStore(bogus)
    assert type(caught.value) is FissionError


def test_the_hash_is_bound_to_the_id() -> None:
    assert hash_secret("aaaaaaaaaaaa", "s") != hash_secret("bbbbbbbbbbbb", "s")
    assert hash_secret("aaaaaaaaaaaa", "s") == hash_secret("aaaaaaaaaaaa", "s")
    assert len(hash_secret("aaaaaaaaaaaa", "s")) == 64


def test_close_twice(store: KeyStore) -> None:
    store.close()
    store.close()


def test_unauthorized_crosses_the_wire() -> None:
    from fission.api.run_stream import error_body, error_from_body

    error = error_from_body(error_body(Unauthorized("no key")))
    assert type(error) is Unauthorized
    assert (error.message, error.http_status) == ("no key", 401)


def test_keys_are_users_unless_made_admins(store: KeyStore) -> None:
    user, user_key = store.create("ci")
    admin, admin_key = store.create("ops", role="admin")
    assert (user.role, user.is_admin) == ("user", False)
    assert store.authenticate(admin_key).is_admin
    assert not store.authenticate(user_key).is_admin
    assert store.set_role("ci", "admin").is_admin
    assert store.authenticate(user_key).is_admin  # from its next request on
    assert not store.set_role(admin.id, "user").is_admin


def test_an_unknown_role_is_refused_with_the_choices(store: KeyStore) -> None:
    with pytest.raises(InvalidInput, match="use one of user, admin"):
        store.create("ci", role="root")
    store.create("ci")
    with pytest.raises(InvalidInput, match="unknown role 'owner'"):
        store.set_role("ci", "owner")
    assert store.get("ci").role == "user"


def test_a_revoked_key_cannot_be_given_a_role(store: KeyStore) -> None:
    store.create("ci")
    store.revoke("ci")
    with pytest.raises(InvalidInput, match="revoked"):
        store.set_role("ci", "admin")


def test_a_database_from_before_roles_gets_the_column(db: Path) -> None:
    """Keys made before roles existed stay valid, as users."""
    import sqlite3

    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE api_keys (id TEXT PRIMARY KEY, name TEXT NOT NULL,"
            " secret_sha256 TEXT NOT NULL, created_at TEXT NOT NULL, revoked_at TEXT,"
            " max_concurrent_sandboxes INTEGER NOT NULL, rate_per_minute INTEGER NOT NULL)"
        )
        conn.execute(
            "INSERT INTO api_keys VALUES ('0123456789ab', 'old', ?, ?, NULL, 2, 60)",
            (hash_secret("0123456789ab", "s" * 43), "2026-01-01T00:00:00.000000+00:00"),
        )
    store = KeyStore(db)
    key = store.authenticate("fsk_0123456789ab_" + "s" * 43)
    assert (key.name, key.role, key.limits.max_concurrent_sandboxes) == ("old", "user", 2)
    store.close()
    KeyStore(db).close()  # a second open finds the column there and changes nothing
