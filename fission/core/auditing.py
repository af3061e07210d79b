"""Writing audit events from async code: off the event loop, and never failing the caller."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fission.auth.audit import AuditLog
from fission.core.limits import Limits

log = logging.getLogger("fission.audit")


def limits_summary(limits: Limits) -> dict[str, float]:
    """The limits an audit event records."""
    return {
        "timeout": limits.timeout,
        "memory_mb": limits.memory_mb,
        "cpus": limits.cpus,
        "disk_mb": limits.disk_mb,
        "pids": limits.pids,
    }


async def audit_event(
    audit: AuditLog | None,
    who: str,
    action: str,
    *,
    language: str,
    limits: Limits,
    outcome: str,
    duration_ms: float | None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append one event to ``audit`` (if any) in a worker thread; a failure is only logged."""
    if audit is None:
        return
    try:
        await asyncio.to_thread(
            audit.record,
            who,
            action,
            outcome=outcome,
            language=language,
            limits=limits_summary(limits),
            duration_ms=duration_ms,
            detail=detail,
        )
    except Exception as exc:  # the audit log must not break the run it describes
        log.warning("could not write the audit log: %s", exc)
