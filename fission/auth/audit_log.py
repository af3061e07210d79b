"""The audit log: who (API key id or ``local``) did what, when, with which limits, and how it ended.

It lives in the same SQLite file as the keys, in its own table. Timestamps are UTC ISO 8601.
Outcomes are short strings: ``ok``, ``exit 1``, ``signal 9``, ``timeout``, ``oom`` or
``error:<code>`` (``outcome_of_result`` and ``outcome_of_error`` make them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from fission.auth.db import Database, default_db_path, from_iso, to_iso, utc_now
from fission.errors import FissionError, InvalidInput

LOCAL = "local"  # who: a request on the local Unix socket, which needs no key
MAX_QUERY_LIMIT = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    who TEXT NOT NULL,
    action TEXT NOT NULL,
    language TEXT,
    limits TEXT,
    outcome TEXT NOT NULL,
    duration_ms REAL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log (at);
CREATE INDEX IF NOT EXISTS audit_log_who_at ON audit_log (who, at);
"""
_COLUMNS = "id, at, who, action, language, limits, outcome, duration_ms, detail"


@dataclass(frozen=True)
class AuditEvent:
    """One audited request."""

    id: int
    at: datetime
    who: str
    action: str
    outcome: str
    language: str | None = None
    limits: dict[str, Any] | None = None
    duration_ms: float | None = None
    detail: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The event as a JSON-ready dict."""
        return {
            "id": self.id,
            "at": to_iso(self.at),
            "who": self.who,
            "action": self.action,
            "language": self.language,
            "limits": self.limits,
            "outcome": self.outcome,
            "duration_ms": self.duration_ms,
            "detail": self.detail,
        }


class FinishedRun(Protocol):
    """What an outcome is made of: the fields of ``fission.core.spec.RunResult`` (a layer above)."""

    @property
    def exit_code(self) -> int: ...
    @property
    def timed_out(self) -> bool: ...
    @property
    def oom(self) -> bool: ...
    @property
    def signal(self) -> int: ...


def outcome_of_result(result: FinishedRun) -> str:
    """The outcome of a finished run: ``timeout``, ``oom``, ``signal N``, ``exit N`` or ``ok``."""
    if result.timed_out:
        return "timeout"
    if result.oom:
        return "oom"
    if result.signal:
        return f"signal {result.signal}"
    return "ok" if result.exit_code == 0 else f"exit {result.exit_code}"


def outcome_of_error(error: BaseException) -> str:
    """The outcome of a request that failed: ``error:<code>`` (``internal`` if not ours)."""
    code = error.code if isinstance(error, FissionError) else FissionError.code
    return f"error:{code}"


def describe_code(code: str) -> dict[str, Any]:
    """What the log keeps of a program instead of its text: size and SHA-256."""
    data = code.encode("utf-8", errors="surrogatepass")
    return {"code_bytes": len(data), "code_sha256": hashlib.sha256(data).hexdigest()}


def _dumps(value: Mapping[str, Any] | None) -> str | None:
    """``value`` as compact JSON (values JSON cannot hold become strings)."""
    if value is None:
        return None
    return json.dumps(dict(value), sort_keys=True, separators=(",", ":"), default=str)


def _row_to_event(row: tuple[Any, ...]) -> AuditEvent:
    """An AuditEvent from a row of ``_COLUMNS``."""
    event_id, at, who, action, language, limits, outcome, duration_ms, detail = row
    return AuditEvent(
        id=event_id,
        at=from_iso(at),
        who=who,
        action=action,
        outcome=outcome,
        language=language,
        limits=json.loads(limits) if limits is not None else None,
        duration_ms=duration_ms,
        detail=json.loads(detail) if detail is not None else None,
    )


class AuditLog:
    """The audit table in the fission database at ``path`` (default: ``default_db_path()``)."""

    def __init__(self, path: Path | None = None, *, now: Callable[[], datetime] = utc_now) -> None:
        self.path = path or default_db_path()
        self._now = now
        self._db = Database(self.path)
        self._db.ensure_schema(_SCHEMA)

    def record(
        self,
        who: str,
        action: str,
        *,
        outcome: str,
        language: str | None = None,
        limits: Mapping[str, Any] | None = None,
        duration_ms: float | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> AuditEvent:
        """Append one event (``who``: key id or ``LOCAL``; ``duration_ms`` in milliseconds)."""
        if not who or not action or not outcome:
            raise ValueError("an audit event needs who, action and outcome")
        at = self._now()
        values = (
            to_iso(at),
            who,
            action,
            language,
            _dumps(limits),
            outcome,
            duration_ms,
            _dumps(detail),
        )
        with self._db.write() as conn:
            cursor = conn.execute(
                "INSERT INTO audit_log (at, who, action, language, limits, outcome, duration_ms,"
                " detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
            event_id = cursor.lastrowid
        assert event_id is not None
        return _row_to_event((event_id, *values))

    def query(
        self,
        *,
        since: datetime | None = None,
        key: str | None = None,
        action: str | None = None,
        limit: int = 100,
    ) -> list[AuditEvent]:
        """Newest first: events at or after ``since``, by ``key``, of ``action`` or ``action.*``."""
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int)
            or not 1 <= limit <= MAX_QUERY_LIMIT
        ):
            raise InvalidInput(
                f"--limit {limit} is out of range: use 1 to {MAX_QUERY_LIMIT} events"
            )
        clauses: list[str] = []
        params: list[Any] = []
        if since is not None:
            clauses.append("at >= ?")
            params.append(to_iso(since))
        if key is not None:
            clauses.append("who = ?")
            params.append(key)
        if action is not None:
            # `sandbox` also matches `sandbox.create`; substr, not LIKE, so _ and % are literal.
            clauses.append("(action = ? OR substr(action, 1, ?) = ?)")
            params.extend((action, len(action) + 1, action + "."))
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._db.read() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM audit_log{where} ORDER BY at DESC, id DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
        return [_row_to_event(row) for row in rows]

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
