"""Who and what a log line is about: request id, sandbox id and key id, per task.

The adapters set the request id (from a valid ``X-Request-Id`` or a new one) and the key id
when they admit a caller; the sandbox manager sets the sandbox id of the sandbox a call is on
(for a one-shot run, the id of its VM). They are context variables, so each request's task
(and the tasks it starts) sees its own. ``ContextFilter`` copies them onto every log record,
and the audit log records the request id of the event it writes.
"""

from __future__ import annotations

import logging
import re
import secrets
from contextvars import ContextVar

REQUEST_ID_HEADER = "X-Request-Id"
# A caller's own id is kept when it is short and plain (safe in logs, headers and JSON).
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

request_id: ContextVar[str | None] = ContextVar("fission_request_id", default=None)
sandbox_id: ContextVar[str | None] = ContextVar("fission_sandbox_id", default=None)
key_id: ContextVar[str | None] = ContextVar("fission_key_id", default=None)

FIELDS = ("request_id", "sandbox_id", "key_id")
_VARS = (request_id, sandbox_id, key_id)


def new_request_id() -> str:
    """A fresh request id: 32 hex digits."""
    return secrets.token_hex(16)


def accept_request_id(incoming: str | None) -> str:
    """``incoming`` when it is a valid id (1-128 of ``A-Za-z0-9._:-``), else a fresh one."""
    if incoming is not None and _VALID_REQUEST_ID.fullmatch(incoming):
        return incoming
    return new_request_id()


def current() -> dict[str, str]:
    """The ids set in this context (request, sandbox, key), without the unset ones."""
    return {name: value for name, var in zip(FIELDS, _VARS, strict=True) if (value := var.get())}


class ContextFilter(logging.Filter):
    """Puts ``request_id``, ``sandbox_id`` and ``key_id`` on every record (``-`` when unset)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate ``record``; never drops one."""
        for name, var in zip(FIELDS, _VARS, strict=True):
            if not hasattr(record, name):
                setattr(record, name, var.get() or "-")
        return True
