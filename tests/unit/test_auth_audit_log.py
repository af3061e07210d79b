"""The audit log: what is recorded, query filters and order, UTC timestamps, outcome strings."""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import asdict
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from fission.auth.audit_log import (
    LOCAL,
    AuditLog,
    describe_code,
    outcome_of_error,
    outcome_of_result,
)
from fission.auth.keys import KeyStore
from fission.core.limits import Limits
from fission.core.spec import RunResult
from fission.errors import Busy, InvalidInput, QuotaExceeded

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


class StepClock:
    """A wall clock that moves one minute each time it is read."""

    def __init__(self, start: datetime = T0) -> None:
        self.next = start

    def __call__(self) -> datetime:
        moment, self.next = self.next, self.next + timedelta(minutes=1)
        return moment


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "fission.sqlite3"


@pytest.fixture
def log(db: Path) -> AuditLog:
    """A log whose events are one minute apart, starting at T0."""
    return AuditLog(db, now=StepClock())


def fill(log: AuditLog) -> None:
    """Six events: two keys and the local socket, several actions."""
    log.record("k1", "run", outcome="ok", language="python", duration_ms=12.5)
    log.record("k2", "sandbox.create", outcome="ok", language="bash")
    log.record("k1", "exec", outcome="exit 1", language="python")
    log.record(LOCAL, "run", outcome="timeout", language="node")
    log.record("k1", "files.write", outcome="error:invalid_input")
    log.record("k2", "sandbox.delete", outcome="ok")


def test_record_returns_the_stored_event(log: AuditLog) -> None:
    limits = {"timeout": 30.0, "memory_mb": 256}
    event = log.record(
        "k1",
        "run",
        outcome="exit 3",
        language="python",
        limits=limits,
        duration_ms=41.5,
        detail={"code_bytes": 9},
    )
    assert event.at == T0
    assert (event.who, event.action, event.outcome, event.language) == (
        "k1",
        "run",
        "exit 3",
        "python",
    )
    assert event.limits == limits
    assert event.duration_ms == 41.5
    assert event.detail == {"code_bytes": 9}
    assert log.query() == [event]


def test_query_is_newest_first(log: AuditLog) -> None:
    fill(log)
    events = log.query()
    assert [event.action for event in events] == [
        "sandbox.delete",
        "files.write",
        "run",
        "exec",
        "sandbox.create",
        "run",
    ]
    assert [event.at for event in events] == sorted((event.at for event in events), reverse=True)


def test_same_instant_keeps_insertion_order(db: Path) -> None:
    log = AuditLog(db, now=lambda: T0)
    for action in ("a", "b", "c"):
        log.record("k", action, outcome="ok")
    assert [event.action for event in log.query()] == ["c", "b", "a"]


def test_filter_by_key(log: AuditLog) -> None:
    fill(log)
    assert [event.action for event in log.query(key="k1")] == ["files.write", "exec", "run"]
    assert [event.outcome for event in log.query(key=LOCAL)] == ["timeout"]
    assert log.query(key="nobody") == []


def test_filter_by_action_and_its_children(log: AuditLog) -> None:
    fill(log)
    assert [event.who for event in log.query(action="run")] == [LOCAL, "k1"]
    assert [event.action for event in log.query(action="sandbox")] == [
        "sandbox.delete",
        "sandbox.create",
    ]
    assert [event.action for event in log.query(action="sandbox.create")] == ["sandbox.create"]
    assert log.query(action="sand") == []  # a prefix only counts up to a dot


def test_action_wildcards_are_literal(log: AuditLog) -> None:
    log.record("k", "files.write", outcome="ok")
    assert log.query(action="files_write") == []
    assert log.query(action="files%") == []
    assert log.query(action="%") == []


def test_filter_by_time(log: AuditLog) -> None:
    fill(log)
    since = T0 + timedelta(minutes=3)
    assert [event.at for event in log.query(since=since)] == [
        T0 + timedelta(minutes=5),
        T0 + timedelta(minutes=4),
        T0 + timedelta(minutes=3),
    ]
    # The same instant in another timezone selects the same events.
    other_zone = since.astimezone(timezone(timedelta(hours=-7)))
    assert log.query(since=other_zone) == log.query(since=since)


def test_filters_combine_and_limit(log: AuditLog) -> None:
    fill(log)
    assert [e.action for e in log.query(key="k1", action="run")] == ["run"]
    assert [e.action for e in log.query(key="k2", since=T0 + timedelta(minutes=2))] == [
        "sandbox.delete"
    ]
    assert [e.action for e in log.query(limit=2)] == ["sandbox.delete", "files.write"]


@pytest.mark.parametrize("limit", [0, -1, 10_001, True])
def test_limit_out_of_range(log: AuditLog, limit: int) -> None:
    with pytest.raises(InvalidInput, match="--limit"):
        log.query(limit=limit)


def test_timestamps_are_utc_iso_8601(db: Path) -> None:
    zone = timezone(timedelta(hours=2))
    log = AuditLog(db, now=lambda: datetime(2024, 5, 1, 14, 0, tzinfo=zone))
    event = log.record("k", "run", outcome="ok")
    assert event.at == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    with sqlite3.connect(db) as conn:
        (stored,) = conn.execute("SELECT at FROM audit_log").fetchone()
    assert stored == "2024-05-01T12:00:00.000000+00:00"
    assert event.to_json()["at"] == stored


def test_the_real_clock_by_default(db: Path) -> None:
    before = datetime.now(UTC)
    event = AuditLog(db).record("k", "run", outcome="ok")
    assert before <= event.at <= datetime.now(UTC)
    assert event.at.utcoffset() == timedelta(0)


def test_limits_from_a_limits_object_and_odd_detail(log: AuditLog) -> None:
    event = log.record(
        "k",
        "run",
        outcome="ok",
        limits=asdict(Limits()),
        detail={"path": Path("/tmp/x"), "when": T0},
    )
    assert event.limits == asdict(Limits())
    assert event.detail == {"path": "/tmp/x", "when": str(T0)}
    assert log.query()[0] == event


def test_who_action_and_outcome_are_required(log: AuditLog) -> None:
    for who, action, outcome in (("", "run", "ok"), ("k", "", "ok"), ("k", "run", "")):
        with pytest.raises(ValueError):
            log.record(who, action, outcome=outcome)


def test_to_json(log: AuditLog) -> None:
    event = log.record("k", "exec", outcome="oom", language="python", duration_ms=5.0)
    assert event.to_json() == {
        "id": event.id,
        "at": "2024-05-01T12:00:00.000000+00:00",
        "who": "k",
        "action": "exec",
        "language": "python",
        "limits": None,
        "outcome": "oom",
        "duration_ms": 5.0,
        "detail": None,
    }


def test_keys_and_audit_share_one_file(db: Path) -> None:
    keys, log = KeyStore(db), AuditLog(db)
    record, _ = keys.create("ci")
    keys.revoke(record.id)
    log.record(record.id, "keys.revoke", outcome="ok")
    assert log.query(key=record.id)[0].action == "keys.revoke"
    with sqlite3.connect(db) as conn:
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
    assert {"api_keys", "audit_log"} <= tables


def test_a_second_log_sees_the_first_ones_events(db: Path) -> None:
    writer, reader = AuditLog(db), AuditLog(db)
    writer.record("k", "run", outcome="ok")
    assert len(reader.query()) == 1
    writer.close()
    writer.close()


def result(**overrides: object) -> RunResult:
    """A RunResult that exited 0, with ``overrides``."""
    fields: dict[str, object] = {
        "exit_code": 0,
        "stdout": b"",
        "stderr": b"",
        "timed_out": False,
        "oom": False,
        "truncated": False,
        "signal": 0,
        "duration_ms": 1.0,
        "boot_ms": 1.0,
        "total_ms": 2.0,
    }
    fields.update(overrides)
    return RunResult(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "outcome"),
    [
        ({}, "ok"),
        ({"truncated": True}, "ok"),
        ({"exit_code": 1}, "exit 1"),
        ({"exit_code": 124, "timed_out": True}, "timeout"),
        ({"exit_code": 137, "signal": 9, "oom": True}, "oom"),
        ({"exit_code": 143, "signal": 15}, "signal 15"),
    ],
)
def test_outcome_of_result(overrides: dict[str, object], outcome: str) -> None:
    assert outcome_of_result(result(**overrides)) == outcome


def test_outcome_of_error() -> None:
    assert outcome_of_error(Busy("full")) == "error:busy"
    assert outcome_of_error(QuotaExceeded("over")) == "error:quota_exceeded"
    assert outcome_of_error(InvalidInput("bad")) == "error:invalid_input"
    assert outcome_of_error(RuntimeError("bug")) == "error:internal"


def test_describe_code() -> None:
    assert describe_code("print(1)") == {
        "code_bytes": 8,
        "code_sha256": hashlib.sha256(b"print(1)").hexdigest(),
    }
    assert describe_code("\u20ac")["code_bytes"] == 3
    assert describe_code("\ud800")["code_bytes"] == 3  # a lone surrogate does not crash it
