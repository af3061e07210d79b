"""Writing audit events from async code: off the event loop, and never failing the caller."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fission import log_context
from fission.auth.audit_log import LOCAL, AuditLog
from fission.core.limits import Limits
from fission.core.spec import RunSpec

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
    """Append one event to ``audit`` (if any) in a worker thread; a failure is only logged.

    The detail records the id of the request the event belongs to, when there is one.
    """
    if audit is None:
        return
    request_id = log_context.request_id.get()
    if request_id is not None:
        detail = {**(detail or {}), "request_id": request_id}
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


async def audit_egress(
    audit: AuditLog | None, who: str, spec: RunSpec, events: list[dict[str, Any]], action: str
) -> None:
    """Append one event per connection the egress proxy allowed or refused."""
    for event in events:
        await audit_event(
            audit,
            who,
            action,
            language=spec.language.name,
            limits=spec.limits,
            outcome=str(event.get("decision", "?")),
            duration_ms=None,
            detail=event,
        )


async def audit_local_egress(spec: RunSpec, events: list[dict[str, Any]], action: str) -> None:
    """Record an embedded run's egress in the default audit log (``fission audit`` shows it)."""
    if not events:
        return
    try:
        audit = await asyncio.to_thread(AuditLog)
    except Exception as exc:  # the audit log must not break the run it describes
        log.warning("could not open the audit log: %s", exc)
        return
    try:
        await audit_egress(audit, LOCAL, spec, events, action)
    finally:
        audit.close()
