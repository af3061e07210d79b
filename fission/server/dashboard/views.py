"""What the dashboard's pages show, computed from the Service's own records; no I/O here.

Run statistics come from audit events (the same log `fission audit` reads): a run is an event
whose action is in ``RUN_ACTIONS``; an error is an outcome ``error:<code>`` (a non-zero exit,
a timeout or an OOM kill is the program's result, not the service's error).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fission.auth.audit_log import AuditEvent
from fission.core.sandbox_spec import SandboxRecord
from fission.errors import InvalidInput

RUN_ACTIONS = frozenset({"run", "install", "repo", "sandbox.run", "sandbox.exec"})
WINDOW_MINUTES = 30
SANDBOX_SORTS = ("created", "expires", "state", "language", "owner", "id")
PAGE_SIZES = (10, 25, 50, 100)
_SINCE = re.compile(r"(\d{1,6})([mhd])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile of ``values`` (``fraction`` 0.5 for p50), None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class MinuteStats:
    """Runs in one minute: how many, how many failed, p50 and p99 of their duration (ms)."""

    start: datetime
    runs: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None


def run_stats(events: Iterable[AuditEvent], now: datetime) -> dict[str, Any]:
    """Runs per minute, error rate and latency over the last ``WINDOW_MINUTES``, per minute."""
    first = (now - timedelta(minutes=WINDOW_MINUTES - 1)).replace(second=0, microsecond=0)
    buckets: list[list[AuditEvent]] = [[] for _ in range(WINDOW_MINUTES)]
    for event in events:
        if event.action not in RUN_ACTIONS or event.at < first:
            continue
        index = int((event.at - first).total_seconds() // 60)
        if 0 <= index < WINDOW_MINUTES:
            buckets[index].append(event)
    minutes = [_minute(first + timedelta(minutes=i), bucket) for i, bucket in enumerate(buckets)]
    every = [e for bucket in buckets for e in bucket]
    durations = [e.duration_ms for e in every if e.duration_ms is not None]
    errors = sum(1 for e in every if e.outcome.startswith("error:"))
    return {
        "window_minutes": WINDOW_MINUTES,
        "runs": len(every),
        "runs_per_minute": round(len(every) / WINDOW_MINUTES, 2),
        "runs_last_minute": minutes[-1].runs,
        "errors": errors,
        "error_rate": round(errors / len(every), 4) if every else None,
        "p50_ms": _rounded(percentile(durations, 0.5)),
        "p99_ms": _rounded(percentile(durations, 0.99)),
        "spark": latency_sparklines(minutes),
        "minutes": [
            {
                "start": m.start.isoformat(),
                "runs": m.runs,
                "errors": m.errors,
                "p50_ms": m.p50_ms,
                "p99_ms": m.p99_ms,
            }
            for m in minutes
        ],
    }


def latency_sparklines(minutes: Sequence[MinuteStats]) -> dict[str, str]:
    """p50 and p99 per minute as SVG polyline points on one scale (p99's highest at the top)."""
    top = max((m.p99_ms or 0.0 for m in minutes), default=0.0) or None
    return {
        "p50": sparkline([m.p50_ms for m in minutes], top),
        "p99": sparkline([m.p99_ms for m in minutes], top),
    }


def _minute(start: datetime, events: list[AuditEvent]) -> MinuteStats:
    durations = [e.duration_ms for e in events if e.duration_ms is not None]
    errors = sum(1 for e in events if e.outcome.startswith("error:"))
    return MinuteStats(
        start,
        len(events),
        errors,
        _rounded(percentile(durations, 0.5)),
        _rounded(percentile(durations, 0.99)),
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def sparkline(
    values: Sequence[float | None], top: float | None = None, width: int = 240, height: int = 40
) -> str:
    """SVG polyline points for ``values`` (gaps count as 0) in ``width`` x ``height``.

    ``top`` is the value at the top edge (default: the largest), so several lines can share
    one scale.
    """
    if not values:
        return ""
    numbers = [v or 0.0 for v in values]
    top = top or max(numbers) or 1.0
    step = width / max(1, len(numbers) - 1)
    return " ".join(
        f"{i * step:.1f},{height - (v / top) * (height - 2) - 1:.1f}" for i, v in enumerate(numbers)
    )


def machines_by_state(status: dict[str, Any], records: Iterable[SandboxRecord]) -> dict[str, int]:
    """VMs by what they are doing: pool machines ready, starting or in use; sandboxes by state."""
    counts = {"pool ready": 0, "pool starting": 0, "pool in use": 0}
    for pool in status.get("pools", []):
        counts["pool ready"] += int(pool.get("ready", 0))
        counts["pool starting"] += int(pool.get("starting", 0))
        counts["pool in use"] += int(pool.get("in_use", 0))
    for record in records:
        name = f"sandbox {record.state.value}"
        counts[name] = counts.get(name, 0) + 1
    return counts


def sort_sandboxes(
    records: list[SandboxRecord], sort: str, descending: bool
) -> list[SandboxRecord]:
    """Sandboxes ordered by one of ``SANDBOX_SORTS`` (id breaks ties)."""
    keys: dict[str, Any] = {
        "created": lambda r: (r.created_at, r.id),
        "expires": lambda r: (r.expires_at, r.id),
        "state": lambda r: (r.state.value, r.id),
        "language": lambda r: (r.spec.language.name, r.id),
        "owner": lambda r: (r.owner or "", r.id),
        "id": lambda r: r.id,
    }
    if sort not in keys:
        raise InvalidInput(f"cannot sort sandboxes by {sort[:40]!r}: use one of {SANDBOX_SORTS}")
    return sorted(records, key=keys[sort], reverse=descending)


def parse_since(text: str, now: datetime) -> datetime:
    """``15m``, ``2h``, ``7d`` before ``now``, or an ISO 8601 time; InvalidInput otherwise."""
    match = _SINCE.fullmatch(text.strip())
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        try:
            return now - timedelta(**{_UNITS[unit]: amount})
        except OverflowError as exc:
            raise InvalidInput(f"since {text!r} reaches too far back") from exc
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise InvalidInput(
            f"since {text[:40]!r} is not a time: use 15m, 2h, 7d or an ISO 8601 time"
        ) from exc
    return when if when.tzinfo else when.replace(tzinfo=now.tzinfo)


def filter_outcome(events: Iterable[AuditEvent], outcome: str | None) -> list[AuditEvent]:
    """Events whose outcome is ``outcome`` or starts with it (``error`` matches ``error:busy``)."""
    if not outcome:
        return list(events)
    return [e for e in events if e.outcome == outcome or e.outcome.startswith(outcome)]


def event_row(event: AuditEvent) -> dict[str, Any]:
    """An audit event as the table shows it: request id and egress target pulled out of detail."""
    detail = dict(event.detail or {})
    target = None
    if "host" in detail:
        target = f"{detail.get('host')}:{detail.get('port', '')}".rstrip(":")
    return {
        "id": event.id,
        "at": event.at.strftime("%Y-%m-%d %H:%M:%S"),
        "who": event.who,
        "action": event.action,
        "language": event.language or "",
        "outcome": event.outcome,
        "error": event.outcome.startswith("error:"),
        "egress": event.action.endswith(".egress"),
        "target": target,
        "duration_ms": None if event.duration_ms is None else round(event.duration_ms, 1),
        "request_id": detail.get("request_id"),
        "sandbox": detail.get("sandbox"),
        "detail": detail,
    }
