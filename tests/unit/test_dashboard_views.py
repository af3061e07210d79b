"""The dashboard's numbers: percentiles, runs per minute, error rate, filters (pure functions)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fission.auth.audit_log import AuditEvent
from fission.errors import InvalidInput
from fission.server.dashboard.views import (
    event_row,
    filter_outcome,
    parse_since,
    percentile,
    run_stats,
    sparkline,
)

NOW = datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC)


def event(minutes_ago: float, action: str = "run", outcome: str = "ok", ms: float = 10.0):
    at = NOW - timedelta(minutes=minutes_ago)
    return AuditEvent(1, at, "k1", action, outcome, duration_ms=ms)


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.5) is None


def test_run_stats_count_runs_errors_and_latency_per_minute() -> None:
    events = [
        event(0, ms=100.0),
        event(0, "sandbox.run", "exit 1", 300.0),  # a program's failure is not an error
        event(1, "sandbox.exec", "error:busy", 1.0),
        event(5, "sandbox.egress", "refused", 0.0),  # not a run
        event(45),  # before the window
    ]
    stats = run_stats(events, NOW)
    assert stats["runs"] == 3 and stats["errors"] == 1
    assert stats["error_rate"] == pytest.approx(1 / 3, abs=1e-4)
    assert stats["runs_last_minute"] == 2
    assert stats["p50_ms"] == 100.0 and stats["p99_ms"] == 300.0
    last = stats["minutes"][-1]
    assert (last["runs"], last["p50_ms"], last["p99_ms"]) == (2, 100.0, 300.0)
    assert len(stats["minutes"]) == stats["window_minutes"]
    assert run_stats([], NOW)["error_rate"] is None


def test_sparklines_share_a_scale_when_given_one() -> None:
    assert sparkline([None, 10.0], top=20.0) == "0.0,39.0 240.0,20.0"
    assert sparkline([0.0, 10.0]).split()[-1] == "240.0,1.0"
    assert sparkline([]) == ""


def test_since_takes_durations_and_iso_times_and_names_bad_ones() -> None:
    assert parse_since("15m", NOW) == NOW - timedelta(minutes=15)
    assert parse_since("2h", NOW) == NOW - timedelta(hours=2)
    assert parse_since("2026-01-01T10:00:00", NOW) == datetime(2026, 1, 1, 10, tzinfo=UTC)
    for bad in ("yesterday", "5y", "999999d", ""):
        with pytest.raises(InvalidInput):
            parse_since(bad, NOW)


def test_outcome_filter_matches_prefixes_and_rows_pull_out_egress_and_request_ids() -> None:
    events = [event(0, outcome="error:busy"), event(0, outcome="ok")]
    assert [e.outcome for e in filter_outcome(events, "error")] == ["error:busy"]
    assert filter_outcome(events, "") == events
    egress = AuditEvent(
        2,
        NOW,
        "k1",
        "run.egress",
        "allowed",
        detail={"host": "pypi.org", "port": 443, "request_id": "req-9", "sandbox": "sbx_1"},
    )
    row = event_row(egress)
    assert row["egress"] and row["target"] == "pypi.org:443"
    assert row["request_id"] == "req-9" and row["sandbox"] == "sbx_1"
