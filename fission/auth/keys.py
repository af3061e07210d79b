"""API keys: ``fsk_<id>_<secret>``, shown once at creation and stored only as a hash.

The id (12 hex digits) is public: it names the key in listings, quotas and the audit log. The
secret is ``secrets.token_urlsafe(32)``, 256 random bits. The database keeps SHA-256 of it, not
a slow password hash: slow hashes (scrypt, argon2) exist to make guessing low-entropy passwords
expensive, but 2**256 secrets cannot be enumerated at any hash speed, and a fast hash keeps
checking a key on every request cheap. Hashes are compared with ``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from fission.auth.db import Database, default_db_path, from_iso, to_iso, utc_now
from fission.errors import InvalidInput, LimitOutOfRange, Unauthorized

KEY_PREFIX = "fsk"
DEFAULT_MAX_SANDBOXES = 10
DEFAULT_RATE_PER_MINUTE = 600
MAX_SANDBOXES_CAP = 10_000
RATE_PER_MINUTE_CAP = 1_000_000
DEFAULT_MAX_SNAPSHOT_MB = 4096  # disk a key's sandbox snapshots and checkpoints may take
MAX_SNAPSHOT_MB_CAP = 10_000_000
PAUSED_RETENTION_CAP = 366 * 24 * 3600.0  # seconds; the daemon's own retention caps it anyway
# What a key may do besides using sandboxes: ``admin`` also operates the service (the
# dashboard, metrics, other keys); ``user`` runs code and manages its own sandboxes only.
USER = "user"
ADMIN = "admin"
ROLES = (USER, ADMIN)

_ID_BYTES = 6  # 12 hex digits: ids only need to be unique, the secret carries the entropy
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
_KEY = re.compile(rf"{KEY_PREFIX}_([0-9a-f]{{{2 * _ID_BYTES}}})_([A-Za-z0-9_-]{{43}})")
_HASH_CONTEXT = b"fission-api-key-v1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_at TEXT NOT NULL,
    revoked_at TEXT,
    max_concurrent_sandboxes INTEGER NOT NULL,
    rate_per_minute INTEGER NOT NULL,
    role TEXT NOT NULL DEFAULT 'user',
    max_snapshot_mb INTEGER NOT NULL DEFAULT 4096,
    paused_retention REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_active_name ON api_keys (name)
    WHERE revoked_at IS NULL;
"""
_COLUMNS = (
    "id, name, created_at, revoked_at, max_concurrent_sandboxes, rate_per_minute, role, "
    "max_snapshot_mb, paused_retention"
)


def _check_limit(option: str, value: object, high: int, unit: str) -> None:
    """Refuse a per-key limit that is not a whole number from 1 to ``high``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise LimitOutOfRange(f"{option} must be a whole number, got {value!r}")
    if not 1 <= value <= high:
        raise LimitOutOfRange(f"{option} {value} is out of range: use 1 to {high} {unit}")


def _check_retention(value: object) -> None:
    """Refuse a paused retention that is not a number of seconds above 0, up to the cap."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LimitOutOfRange(f"--paused-retention must be a number of seconds, got {value!r}")
    if not 0 < value <= PAUSED_RETENTION_CAP:
        raise LimitOutOfRange(
            f"--paused-retention {value} is out of range: use more than 0 and at most "
            f"{PAUSED_RETENTION_CAP:.0f} seconds"
        )


@dataclass(frozen=True)
class KeyLimits:
    """What one API key may use: sandboxes alive at once, requests per minute, the disk its
    sandbox snapshots and checkpoints may take (MB), and how long its paused (or lost)
    sandboxes are kept (seconds; None: the daemon's ``--paused-retention``; the shorter of the
    two applies)."""

    max_concurrent_sandboxes: int = DEFAULT_MAX_SANDBOXES
    rate_per_minute: int = DEFAULT_RATE_PER_MINUTE
    max_snapshot_mb: int = DEFAULT_MAX_SNAPSHOT_MB
    paused_retention: float | None = None

    def __post_init__(self) -> None:
        _check_limit(
            "--max-sandboxes", self.max_concurrent_sandboxes, MAX_SANDBOXES_CAP, "sandboxes"
        )
        _check_limit(
            "--rate-per-minute", self.rate_per_minute, RATE_PER_MINUTE_CAP, "requests per minute"
        )
        _check_limit("--max-snapshot-mb", self.max_snapshot_mb, MAX_SNAPSHOT_MB_CAP, "MB")
        _check_retention(self.paused_retention)


@dataclass(frozen=True)
class ApiKey:
    """One key as stored, without its secret."""

    id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None = None
    limits: KeyLimits = field(default_factory=KeyLimits)
    role: str = USER

    @property
    def is_admin(self) -> bool:
        """Whether the key may operate the service (dashboard, metrics, keys)."""
        return self.role == ADMIN

    @property
    def active(self) -> bool:
        """Whether the key is still accepted (not revoked)."""
        return self.revoked_at is None

    def to_json(self) -> dict[str, Any]:
        """The key as a JSON-ready dict (never the secret, which is not stored)."""
        return {
            "id": self.id,
            "name": self.name,
            "created_at": to_iso(self.created_at),
            "revoked_at": to_iso(self.revoked_at) if self.revoked_at else None,
            "active": self.active,
            "max_concurrent_sandboxes": self.limits.max_concurrent_sandboxes,
            "rate_per_minute": self.limits.rate_per_minute,
            "role": self.role,
            "max_snapshot_mb": self.limits.max_snapshot_mb,
            "paused_retention": self.limits.paused_retention,
        }


_Keys = list[ApiKey]  # `KeyStore.list` shadows the builtin inside the class body


def hash_secret(key_id: str, secret: str) -> str:
    """SHA-256 (hex) of a key's secret, bound to its id so a hash cannot be moved to another key."""
    data = b"\0".join((_HASH_CONTEXT, key_id.encode(), secret.encode()))
    return hashlib.sha256(data).hexdigest()


def parse_key(plaintext: str) -> tuple[str, str]:
    """The (id, secret) of a key in ``fsk_<id>_<secret>`` form; anything else is Unauthorized."""
    match = _KEY.fullmatch(plaintext.strip()) if isinstance(plaintext, str) else None
    if match is None:
        raise Unauthorized(f"malformed API key: expected {KEY_PREFIX}_<id>_<secret>")
    return match.group(1), match.group(2)


def key_from_authorization(header: str | None) -> str | None:
    """The key in an ``Authorization: Bearer <key>`` header (or gRPC metadata); None if absent."""
    if header is None or not header.strip():
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be `Bearer <API key>`")
    return token.strip()


def _check_name(name: str) -> None:
    """Refuse key names that would be awkward in a table, a shell or a log line."""
    if not _NAME.fullmatch(name):
        raise InvalidInput(
            f"key name {name!r} is not allowed: use 1 to 64 letters, digits and . _ @ + -, "
            "starting with a letter or digit"
        )


def check_role(role: str) -> str:
    """``role`` if it is one of ``ROLES``; InvalidInput naming the choices otherwise."""
    if role not in ROLES:
        raise InvalidInput(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    return role


def _row_to_key(row: tuple[Any, ...]) -> ApiKey:
    """An ApiKey from a row of ``_COLUMNS``."""
    key_id, name, created_at, revoked_at, max_sandboxes, rate, role, snapshot_mb, retention = row
    return ApiKey(
        id=key_id,
        name=name,
        created_at=from_iso(created_at),
        revoked_at=from_iso(revoked_at) if revoked_at else None,
        limits=KeyLimits(max_sandboxes, rate, snapshot_mb, retention),
        role=role,
    )


def _add_role_column(db: Database) -> None:
    """Give a key table made before roles existed its ``role`` column (every key a user)."""
    with db.write() as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(api_keys)")}
        if "role" not in columns:
            conn.execute("ALTER TABLE api_keys ADD COLUMN role TEXT NOT NULL DEFAULT 'user'")


def _add_snapshot_quota_column(db: Database) -> None:
    """Give a key table made before snapshot quotas existed its ``max_snapshot_mb`` column."""
    with db.write() as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(api_keys)")}
        if "max_snapshot_mb" not in columns:
            conn.execute(
                "ALTER TABLE api_keys ADD COLUMN max_snapshot_mb INTEGER NOT NULL "
                f"DEFAULT {DEFAULT_MAX_SNAPSHOT_MB}"
            )


def _add_retention_column(db: Database) -> None:
    """Give a key table made before per-key retention existed its ``paused_retention`` column
    (NULL: the daemon's retention)."""
    with db.write() as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(api_keys)")}
        if "paused_retention" not in columns:
            conn.execute("ALTER TABLE api_keys ADD COLUMN paused_retention REAL")


class KeyStore:
    """The API keys in the fission database at ``path`` (default: ``default_db_path()``)."""

    def __init__(self, path: Path | None = None, *, now: Callable[[], datetime] = utc_now) -> None:
        self.path = path or default_db_path()
        self._now = now
        self._db = Database(self.path)
        self._db.ensure_schema(_SCHEMA)
        _add_role_column(self._db)
        _add_snapshot_quota_column(self._db)
        _add_retention_column(self._db)

    def create(
        self, name: str, limits: KeyLimits | None = None, role: str = USER
    ) -> tuple[ApiKey, str]:
        """Make a key; returns its record and the plaintext key, which is never shown again."""
        _check_name(name)
        check_role(role)
        limits = limits or KeyLimits()
        secret = secrets.token_urlsafe(32)
        with self._db.write() as conn:
            if conn.execute(
                "SELECT 1 FROM api_keys WHERE name = ? AND revoked_at IS NULL", (name,)
            ).fetchone():
                raise InvalidInput(
                    f"an active key named {name!r} exists: revoke it first "
                    f"(`fission keys revoke {name}`) or choose another name"
                )
            key_id = secrets.token_hex(_ID_BYTES)
            while conn.execute("SELECT 1 FROM api_keys WHERE id = ?", (key_id,)).fetchone():
                key_id = secrets.token_hex(_ID_BYTES)
            record = ApiKey(key_id, name, self._now(), None, limits, role)
            conn.execute(
                "INSERT INTO api_keys (id, name, secret_sha256, created_at, revoked_at,"
                " max_concurrent_sandboxes, rate_per_minute, role, max_snapshot_mb,"
                " paused_retention) VALUES (?, ?, ?, ?, NULL, ?, ?, ?, ?, ?)",
                (
                    key_id,
                    name,
                    hash_secret(key_id, secret),
                    to_iso(record.created_at),
                    limits.max_concurrent_sandboxes,
                    limits.rate_per_minute,
                    role,
                    limits.max_snapshot_mb,
                    limits.paused_retention,
                ),
            )
        return record, f"{KEY_PREFIX}_{key_id}_{secret}"

    def list(self, *, include_revoked: bool = True) -> _Keys:
        """Every key, oldest first (revoked ones too unless ``include_revoked`` is False)."""
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        with self._db.read() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM api_keys{where} ORDER BY created_at, id"
            ).fetchall()
        return [_row_to_key(row) for row in rows]

    def get(self, id_or_name: str) -> ApiKey:
        """The key with this id, else the active (or newest revoked) key with this name."""
        with self._db.read() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM api_keys WHERE id = ? OR name = ?"
                " ORDER BY id = ? DESC, revoked_at IS NULL DESC, created_at DESC, rowid DESC"
                " LIMIT 1",
                (id_or_name, id_or_name, id_or_name),
            ).fetchone()
        if row is None:
            raise InvalidInput(
                f"no API key has the id or name {id_or_name!r}: see `fission keys list`"
            )
        return _row_to_key(row)

    def revoke(self, id_or_name: str) -> ApiKey:
        """Stop accepting a key (by id or name); revoking a revoked key changes nothing."""
        key = self.get(id_or_name)
        if not key.active:
            return key
        revoked_at = self._now()
        with self._db.write() as conn:
            conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (to_iso(revoked_at), key.id),
            )
        return self.get(key.id)

    def set_limits(self, id_or_name: str, limits: KeyLimits) -> ApiKey:
        """Change an active key's limits; they apply from its next request."""
        key = self.get(id_or_name)
        if not key.active:
            raise InvalidInput(f"API key {key.id} ({key.name}) is revoked: create a new one")
        with self._db.write() as conn:
            conn.execute(
                "UPDATE api_keys SET max_concurrent_sandboxes = ?, rate_per_minute = ?,"
                " max_snapshot_mb = ?, paused_retention = ? WHERE id = ?",
                (
                    limits.max_concurrent_sandboxes,
                    limits.rate_per_minute,
                    limits.max_snapshot_mb,
                    limits.paused_retention,
                    key.id,
                ),
            )
        return self.get(key.id)

    def set_role(self, id_or_name: str, role: str) -> ApiKey:
        """Change an active key's role; it applies from its next request."""
        check_role(role)
        key = self.get(id_or_name)
        if not key.active:
            raise InvalidInput(f"API key {key.id} ({key.name}) is revoked: create a new one")
        with self._db.write() as conn:
            conn.execute("UPDATE api_keys SET role = ? WHERE id = ?", (role, key.id))
        return self.get(key.id)

    def authenticate(self, plaintext: str | None) -> ApiKey:
        """The active key whose plaintext this is; None or anything else raises Unauthorized."""
        if plaintext is None:
            raise Unauthorized(
                "this listener needs an API key (`Authorization: Bearer fsk_...`); "
                "an operator creates one with `fission keys create NAME`"
            )
        key_id, secret = parse_key(plaintext)
        with self._db.read() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS}, secret_sha256 FROM api_keys WHERE id = ?", (key_id,)
            ).fetchone()
        # Ids are public, so answering "unknown" faster than "wrong secret" reveals nothing.
        if row is None or not hmac.compare_digest(row[-1], hash_secret(key_id, secret)):
            raise Unauthorized("invalid API key: it is not one this service issued")
        key = _row_to_key(row[:-1])
        if key.revoked_at is not None:
            raise Unauthorized(
                f"API key {key.id} ({key.name}) was revoked at {to_iso(key.revoked_at)}"
            )
        return key

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
